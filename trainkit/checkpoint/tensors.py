"""The tensors of a step: the read face for tools (export, ``trainkit merge``).

One process, any saved world size, lazily: ``step_tensors(where, step, prefix=...)``
gives every tensor whose dotted key path starts with ``prefix`` as ``name -> (meta,
fetch)``, and :class:`StepTensorReader` wraps that in :mod:`trainkit.io`'s
``TensorReader`` shape so ``trainkit merge trainkit:DIR@STEP#model.`` reads a checkpoint
like any model file.

Why the prefix is applied before any fetch: a training checkpoint is mostly optimizer
state (Adam keeps two moments per parameter), so a reader that wanted only ``model.``
but loaded the step whole would read three times the bytes it uses. Here the key
paths are known from metadata alone (the rank indexes, or DCP's metadata), and only the
blobs under the prefix are ever read.

- A step written through DCP (ZarrWriter, import-dcp) is read through its DCP metadata,
  one tensor at a time, each reassembled whole however DCP spread it over ranks.
- A step saved by the Checkpointer is read as one process's view of any world size
  (replicated tensors once, split tensors whole, per-rank tensors as ``name.RANK``),
  the tensors under the prefix together on first use.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from trainkit.checkpoint import reader
from trainkit.checkpoint.format import codec
from trainkit.checkpoint.format.layout import COMMIT_FILE, step_dirname
from trainkit.checkpoint.interop.dcp_step import assemble_tensor, read_step_metadata
from trainkit.checkpoint.interop.shard_stream import ShardBlobReader
from trainkit.checkpoint.restore import load_global
from trainkit.checkpoint.tiers import LocalTier, Tier
from trainkit.io.readers import flatten_state
from trainkit.io.safetensors_format import TensorMeta

__all__ = ["Source", "step_tensors", "step_names", "prune", "StepTensorReader"]

# name -> (shape and dtype, a call that produces the tensor): metas plan before any
# tensor is read, and tensors are produced one at a time.
Source = dict[str, tuple[TensorMeta, Callable[[], torch.Tensor]]]


def prune(tree: Any, prefix: str, path: str = "") -> Any:
    """The parts of a decoded state tree whose dotted key paths (as
    :func:`trainkit.io.readers.flatten_state` names them) start with ``prefix``."""
    if not prefix or path.startswith(prefix):
        return tree
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return None
    out = {}
    for key, value in items:
        name = f"{path}{key}"
        if name.startswith(prefix):
            out[key] = value
        elif prefix.startswith(name + "."):
            out[key] = prune(value, prefix, name + ".")
    return out


class _Leaf:
    __slots__ = ("entry",)

    def __init__(self, entry: int) -> None:
        self.entry = entry


def _one_rank_state(tier: Tier, step: int, record: dict, prefix: str) -> Any:
    """Rank 0's shard of a one-rank step, only the blobs under ``prefix`` read."""
    index = reader.read_rank_index(tier, step, 0, record)
    tree = prune(codec.decode(index["tree"], _Leaf, lambda i: None), prefix)
    leaves: list[_Leaf] = []

    def collect(node: Any) -> None:
        if isinstance(node, _Leaf):
            leaves.append(node)
        elif isinstance(node, Mapping):
            for v in node.values():
                collect(v)
        elif isinstance(node, (list, tuple, set, frozenset)):
            for v in node:
                collect(v)

    collect(tree)
    table = index["tensors"]
    need = {table[leaf.entry]["blob"] for leaf in leaves}
    storages = reader.load_blobs(tier, step, 0, record, index, only=need) if need else []

    def build(node: Any) -> Any:
        if isinstance(node, _Leaf):
            entry = table[node.entry]
            return reader.tensor_from_blob(entry, storages[entry["blob"]])
        if isinstance(node, Mapping):
            return {k: build(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [build(v) for v in node]
        return node

    return build(tree)


def _dcp_tensors(tier: Tier, step: int, record: dict, prefix: str) -> Source:
    md = read_step_metadata(tier, step, record, planner_data=False)
    readers: dict[int, ShardBlobReader] = {}

    def fetch(rank: int, entry: int) -> torch.Tensor:
        if rank not in readers:
            readers[rank] = ShardBlobReader(tier, step, rank, record)
        return readers[rank].tensor(entry)

    out: Source = {}
    for fqn, sm in md.state_dict_metadata.items():
        if not isinstance(sm, TensorStorageMetadata) or not fqn.startswith(prefix):
            continue
        pieces = [(list(c.offsets),
                   lambda loc=md.storage_data[MetadataIndex(fqn, c.offsets)]: fetch(*loc))
                  for c in sm.chunks]
        out[fqn] = (TensorMeta(tuple(sm.size), sm.properties.dtype),
                    lambda sm=sm, pieces=pieces: assemble_tensor(
                        tuple(sm.size), sm.properties.dtype, pieces))
    return out


def step_tensors(where: Tier | str | os.PathLike, step: int, *, prefix: str = "") -> Source:
    """Every tensor of committed ``step`` whose dotted key path starts with ``prefix``
    (names keep the prefix). Nothing outside the prefix is read."""
    tier = reader.as_tier(where)
    record = reader.read_commit_record(tier, step)
    if record.get("dcp"):
        return _dcp_tensors(tier, step, record, prefix)
    if record["world_size"] == 1:
        state = _one_rank_state(tier, step, record, prefix)
    else:
        state = load_global(tier, step, record, rank=0, world=1,
                            select=lambda tree: prune(tree, prefix))
    flat = dict(flatten_state(state)) if isinstance(state, Mapping) else {}
    return {k: (TensorMeta(tuple(t.shape), t.dtype), lambda t=t: t)
            for k, t in flat.items() if k.startswith(prefix)}


def step_names(where: Tier | str | os.PathLike, step: int) -> list[str]:
    """The dotted names of every tensor of ``step`` as saved (rank 0's table, or DCP's
    metadata), from metadata only: for messages that say what a step holds."""
    tier = reader.as_tier(where)
    record = reader.read_commit_record(tier, step)
    if record.get("dcp"):
        md = read_step_metadata(tier, step, record, planner_data=False)
        return [fqn for fqn, sm in md.state_dict_metadata.items()
                if isinstance(sm, TensorStorageMetadata)]
    index = reader.read_rank_index(tier, step, 0, record)
    return [t["name"].replace("/", ".") for t in index["tensors"]]


class StepTensorReader:
    """The tensors under ``prefix`` of one step, renamed without it: a
    :class:`trainkit.io.TensorReader` for ``trainkit:DIR[@STEP][#PREFIX]`` inputs.

    ``step=None`` reads the newest committed step. ``files()`` is the step's commit
    record, which inventories every file of the step with its checksum: hashing it pins
    the content without reading the (optimizer) bytes outside the prefix.
    """

    def __init__(self, where: Tier | str | os.PathLike, step: int | None = None,
                 prefix: str = "model.") -> None:
        self.tier = reader.as_tier(where)
        if step is None:
            steps = reader.committed_steps(self.tier)
            if not steps:
                raise FileNotFoundError(f"{self.tier.url}: no committed checkpoint")
            step = steps[-1]
        self.step, self.prefix = step, prefix
        source = step_tensors(self.tier, step, prefix=prefix)
        self._source = {k[len(prefix):]: v for k, v in source.items()}
        if not self._source or "" in self._source:
            tops = sorted({k.split(".")[0] for k in step_names(self.tier, step)})
            raise ValueError(f"{self.tier.url} step {step}: no tensors under prefix {prefix!r} "
                             f"(top-level keys: {tops[:20]})")
        self.description = f"trainkit checkpoint {where}@{step}#{prefix}"

    def keys(self) -> list[str]:
        return list(self._source)

    def meta(self, name: str) -> TensorMeta:
        return self._source[name][0]

    def get(self, name: str) -> torch.Tensor:
        return self._source[name][1]()

    def files(self) -> list[Path]:
        if not isinstance(self.tier, LocalTier):
            return []
        return [Path(self.tier.root) / step_dirname(self.step) / COMMIT_FILE]
