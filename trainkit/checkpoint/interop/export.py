"""``trainkit ckpt export``: the model part of a step as safetensors, for HF tooling.

The tensors under a key prefix (default ``model.``, the key a training loop usually
saves its ``model.state_dict()`` under) are written with the prefix stripped, through
:mod:`trainkit.io`'s sharded writer, so ``transformers``, ``safetensors`` and
``trainkit merge`` read the result directly:

* ``--to DIR`` (or ``--to DIR/model.safetensors``): the Hugging Face layout,
  ``model.safetensors``, or ``model-00001-of-0000N.safetensors`` ... plus
  ``model.safetensors.index.json`` when the model exceeds one shard;
* ``--to NAME.safetensors``: one file, or ``NAME-0000i-of-0000N.safetensors`` plus
  ``NAME.safetensors.index.json`` when it does not fit one shard.

What is read: a step written through DCP (ZarrWriter, import-dcp) through its DCP
metadata, one whole tensor at a time (however DCP spread it over ranks and chunks), so
memory stays about the largest tensor; a step saved by the Checkpointer through rank
0's shard, loaded whole for now (:func:`step_state`).

Atomic: everything is written and fsynced in a hidden staging directory beside the
target, then renamed into place, the index last, so a reader never sees a partial
export. Existing files are not replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from trainkit.checkpoint import reader
from trainkit.checkpoint.interop.dcp_step import assemble_tensor, read_step_metadata
from trainkit.checkpoint.errors import CheckpointError
from trainkit.checkpoint.interop.shard_stream import ShardBlobReader
from trainkit.checkpoint.tiers.local import fsync_dir
from trainkit.checkpoint.tiers import Tier
from trainkit.io import DEFAULT_SHARD_BYTES, ShardedWriter, TensorMeta, flatten_state, plan_shards
from trainkit.io.safetensors_format import TORCH_TO_DTYPE

__all__ = ["export_safetensors", "select_tensors", "output_names", "step_state",
           "step_tensors"]

INDEX_SUFFIX = ".safetensors.index.json"


# name -> (shape and dtype, a call that produces the tensor): metas plan the shards
# before any tensor is read, and tensors are produced one at a time.
Source = dict[str, tuple[TensorMeta, Callable[[], torch.Tensor]]]


def step_state(tier: Tier, step: int) -> Any:
    """The state whose model part is exported, for steps saved by trainkit's
    Checkpointer: the world-size-agnostic view of one process (replicated tensors once,
    split tensors reassembled whole, per-rank values as ``PerRank``). A one-rank step
    is that rank's shard; pickled values come back as opaque bytes and are ignored."""
    record = reader.read_commit_record(tier, step)
    if record["world_size"] == 1:
        return reader.load_shard(tier, step, 0, record=record, pickled_as_bytes=True)
    from trainkit.checkpoint.restore import load_global

    return load_global(tier, step, record, rank=0, world=1)


def step_tensors(tier: Tier, step: int) -> Source:
    """Every tensor of ``step`` by dotted key path. A step written through DCP is read
    through its DCP metadata: each tensor whole (DCP dedups tensors across ranks and
    splits DTensors into chunks on several ranks), one tensor in memory at a time."""
    record = reader.read_commit_record(tier, step)
    if record.get("dcp"):
        return _dcp_tensors(tier, step, record)
    state = step_state(tier, step)
    flat = dict(flatten_state(state)) if isinstance(state, dict) else {}
    return {k: (TensorMeta(tuple(t.shape), t.dtype), lambda t=t: t) for k, t in flat.items()}


def _dcp_tensors(tier: Tier, step: int, record: dict) -> Source:
    md = read_step_metadata(tier, step, record, planner_data=False)
    readers: dict[int, ShardBlobReader] = {}

    def fetch(rank: int, entry: int) -> torch.Tensor:
        if rank not in readers:
            readers[rank] = ShardBlobReader(tier, step, rank, record)
        return readers[rank].tensor(entry)

    out: Source = {}
    for fqn, sm in md.state_dict_metadata.items():
        if not isinstance(sm, TensorStorageMetadata):
            continue
        pieces = [(list(c.offsets),
                   lambda loc=md.storage_data[MetadataIndex(fqn, c.offsets)]: fetch(*loc))
                  for c in sm.chunks]
        out[fqn] = (TensorMeta(tuple(sm.size), sm.properties.dtype),
                    lambda sm=sm, pieces=pieces: assemble_tensor(
                        tuple(sm.size), sm.properties.dtype, pieces))
    return out


def select_tensors(source: Source, prefix: str) -> Source:
    """Tensors whose dotted name starts with ``prefix``, renamed without it."""
    chosen = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
    if not chosen or "" in chosen:
        tops = sorted({k.split(".")[0] for k in source})
        raise CheckpointError(f"no tensors under the prefix {prefix!r} (tensor names are "
                              f"dotted key paths; top-level keys with tensors: "
                              f"{tops[:20] or 'none'}); pass --prefix")
    bad = sorted(k for k, (meta, _) in chosen.items() if meta.dtype not in TORCH_TO_DTYPE)
    if bad:
        raise CheckpointError(f"safetensors cannot hold the dtype of {bad[:5]} "
                              f"({chosen[bad[0]][0].dtype})")
    return chosen


def output_names(to: str | os.PathLike, nshards: int) -> tuple[Path, list[str], str | None]:
    """(directory, shard file names, index file name or None) for ``--to``."""
    to = Path(to)
    if to.name.endswith(".safetensors"):
        directory, stem = to.parent, to.name[:-len(".safetensors")]
    else:
        directory, stem = to, "model"
    if not stem:
        raise CheckpointError(f"{to}: the output file needs a name before .safetensors")
    if nshards == 1:
        return directory, [f"{stem}.safetensors"], None
    names = [f"{stem}-{i + 1:05d}-of-{nshards:05d}.safetensors" for i in range(nshards)]
    return directory, names, f"{stem}{INDEX_SUFFIX}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_safetensors(where: Tier | str, step: int, to: str | os.PathLike, *,
                       prefix: str = "model.", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                       overwrite: bool = False,
                       on_bytes: Callable[[int], None] | None = None,
                       on_total: Callable[[int], None] | None = None) -> list[Path]:
    """Export the tensors under ``prefix`` of committed ``step``; returns the files made.

    ``on_total(n)`` is told the bytes to write once known, ``on_bytes(n)`` as they go.

    Raises :class:`CheckpointError` for a missing step, an empty prefix match, a dtype
    safetensors cannot store, or existing output files (without ``overwrite``).
    """
    if max_shard_bytes <= 0:
        raise CheckpointError(f"the maximum shard size must be positive, got {max_shard_bytes}")
    tier = reader.as_tier(where)
    tensors = select_tensors(step_tensors(tier, step), prefix)
    plan = plan_shards({k: meta for k, (meta, _) in tensors.items()}, max_shard_bytes)
    if on_total is not None:
        on_total(plan.total_size)
    directory, names, index_name = output_names(to, len(plan.shard_names))
    finals = [directory / n for n in names] + ([directory / index_name] if index_name else [])
    existing = [str(p) for p in finals if p.exists()]
    if existing and not overwrite:
        raise CheckpointError(f"{existing[0]} exists; remove it or pass --overwrite")
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    stage = directory / f".trainkit-export-{os.getpid()}-{step}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        with ShardedWriter(stage, plan) as writer:
            for name, (meta, produce) in tensors.items():
                writer.write(name, produce())
                if on_bytes is not None:
                    on_bytes(meta.nbytes)
        renamed = dict(zip(plan.shard_names, names))
        for old in plan.shard_names:
            _fsync(stage / old)
        if index_name:
            index = {"metadata": {"total_size": plan.total_size,
                                  "trainkit": {"source": tier.url, "step": step,
                                               "prefix": prefix}},
                     "weight_map": {k: renamed[s] for k, (s, _) in plan.placement.items()}}
            (stage / index_name).write_text(json.dumps(index, indent=2))
            _fsync(stage / index_name)
        for old in plan.shard_names:             # shards first, the index last
            os.replace(stage / old, directory / renamed[old])
        if index_name:
            os.replace(stage / index_name, directory / index_name)
        fsync_dir(str(directory))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return finals
