"""``trainkit ckpt import-dcp``: convert a DCP (FileSystemWriter) checkpoint into a step.

The imported step is a one-rank trainkit step holding every tensor whole (the chunks a
sharded save split it into are reassembled), plus the JSON form of DCP's metadata
pointing at them, so it can be read three ways: ``Checkpointer(dst).load(step)``,
``dcp.load(..., storage_reader=ZarrReader(dst, step=step))`` on any number of ranks,
and ``trainkit ckpt export``.

Memory stays bounded: tensors are read from the ``.distcp`` files one at a time, while
the writer streams chunks out (:mod:`~trainkit.checkpoint.interop.shard_stream`). The peak is
about the largest tensor plus a few chunk buffers, not the checkpoint.

Trust: DCP's ``.metadata`` file is a pickle (that is DCP's format), so importing runs
``pickle.load`` on it; only import checkpoints you trust. Tensor data is read with
``torch.load(weights_only=True)``, and non-tensor items are copied as opaque bytes,
never unpickled.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)

from trainkit.checkpoint.errors import CheckpointError
from trainkit.checkpoint.format.dcp_metadata import encode_metadata
from trainkit.checkpoint.format.layout import COMMIT_FILE, DEFAULT_CHUNK_BYTES, step_dirname
from trainkit.checkpoint.interop.dcp_step import (
    assemble_tensor,
    commit_dcp_step,
    dcp_key_path,
    next_free_step,
    state_tree,
)
from trainkit.checkpoint.interop.shard_stream import StreamItem, write_stream_shard
from trainkit.checkpoint.tiers import Tier, open_tier

__all__ = ["import_dcp", "read_dcp_metadata", "dcp_total_bytes"]


def read_dcp_metadata(src: str | os.PathLike) -> Metadata:
    """The ``Metadata`` of a FileSystemWriter checkpoint, with a clear error otherwise."""
    src = os.fspath(src)
    path = os.path.join(src, ".metadata")
    if not os.path.isdir(src):
        raise CheckpointError(f"{src} is not a directory (expected a DCP checkpoint written "
                              f"by FileSystemWriter)")
    if not os.path.isfile(path):
        raise CheckpointError(f"{src} is not a DCP checkpoint: it has no .metadata file")
    with open(path, "rb") as f:
        try:
            md = pickle.load(f)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
            raise CheckpointError(f"{path} is not a readable DCP metadata file: {exc}") from exc
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise CheckpointError(f"{path} is not a FileSystemWriter DCP metadata file")
    return md


def dcp_total_bytes(md: Metadata) -> int:
    """Bytes the import will write (tensor data, plus pickled items' stored sizes)."""
    total = 0
    for fqn, sm in md.state_dict_metadata.items():
        if isinstance(sm, TensorStorageMetadata):
            n = sm.properties.dtype.itemsize
            for d in sm.size:
                n *= d
            total += n
        else:
            total += md.storage_data[MetadataIndex(fqn)].length
    return total


class _SliceReader:
    """Reads ``(file, offset, length)`` slices of the ``.distcp`` files."""

    def __init__(self, src: str) -> None:
        self.src = src

    def read(self, index: MetadataIndex, info: object) -> bytes:
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{index.fqn}: stored with stream transforms "
                                  f"{list(info.transform_descriptors)} (e.g. compression), "  # type: ignore[attr-defined]
                                  f"which import-dcp does not support")
        path = os.path.join(self.src, info.relative_path)  # type: ignore[attr-defined]
        with open(path, "rb") as f:
            f.seek(info.offset)  # type: ignore[attr-defined]
            raw = f.read(info.length)  # type: ignore[attr-defined]
        if len(raw) != info.length:  # type: ignore[attr-defined]
            raise CheckpointError(f"{path}: truncated ({index.fqn} needs bytes "
                                  f"{info.offset}..{info.offset + info.length})")  # type: ignore[attr-defined]
        return raw

    def tensor(self, index: MetadataIndex, info: object) -> torch.Tensor:
        try:
            return torch.load(io.BytesIO(self.read(index, info)), map_location="cpu",
                              weights_only=True)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - say which tensor, not a deep traceback
            raise CheckpointError(f"{index.fqn}: cannot read its data ({exc}); only DCP's "
                                  f"default torch_save serialization is supported") from exc


def _whole_tensor(reader: _SliceReader, md: Metadata, fqn: str,
                  sm: TensorStorageMetadata) -> torch.Tensor:
    """The global tensor of ``fqn``, assembled from its saved chunks."""
    pieces = []
    for chunk in sm.chunks:
        idx = MetadataIndex(fqn, chunk.offsets)
        pieces.append((list(chunk.offsets),
                       lambda idx=idx, chunk=chunk: reader.tensor(
                           idx, md.storage_data[idx]).reshape(tuple(chunk.sizes))))
    return assemble_tensor(tuple(sm.size), sm.properties.dtype, pieces)


def import_dcp(src: str | os.PathLike, dst: str | os.PathLike | Tier, *, step: int | None = None,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               on_bytes: Callable[[int], None] | None = None,
               metadata: Metadata | None = None) -> int:
    """Convert the DCP checkpoint in ``src`` into step ``step`` of ``dst`` (default: the
    step after the newest present). Returns the step written; commits it last."""
    md = metadata if metadata is not None else read_dcp_metadata(src)
    tier = dst if not isinstance(dst, (str, os.PathLike)) else open_tier(os.fspath(dst))
    if step is None:
        step = next_free_step(tier)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"step must be a non-negative int, got {step!r}")
    if tier.size(f"{step_dirname(step)}/{COMMIT_FILE}") is not None:
        raise CheckpointError(f"step {step} is already committed in {tier.url}; checkpoints "
                              f"are never overwritten (pass another --step)")
    reader = _SliceReader(os.fspath(src))
    mappings = md.planner_data if isinstance(md.planner_data, dict) else {}
    items: list[StreamItem] = []
    leaves: list[tuple[tuple, bool]] = []
    new_items: dict[str, object] = {}
    locations: dict[MetadataIndex, tuple[int, int]] = {}
    for fqn, sm in md.state_dict_metadata.items():
        path, name = dcp_key_path(fqn, mappings)
        i = len(items)
        if isinstance(sm, BytesStorageMetadata):
            idx = MetadataIndex(fqn)
            info = md.storage_data[idx]
            items.append(StreamItem(name, torch.uint8, (info.length,),
                                    lambda idx=idx, info=info: reader.read(idx, info),
                                    pickled=True, extra={"fqn": fqn}))
            locations[idx] = (0, i)
            new_items[fqn] = sm
        else:
            size = tuple(sm.size)
            items.append(StreamItem(name, sm.properties.dtype, size,
                                    lambda fqn=fqn, sm=sm: _whole_tensor(reader, md, fqn, sm),
                                    extra={"fqn": fqn}))
            locations[MetadataIndex(fqn, [0] * len(size))] = (0, i)
            new_items[fqn] = TensorStorageMetadata(
                sm.properties, sm.size,
                [ChunkStorageMetadata(torch.Size([0] * len(size)), torch.Size(size))])
        leaves.append((path, isinstance(sm, BytesStorageMetadata)))
    manifest, _ = write_stream_shard(tier, step, 0, 1, items, state_tree(leaves),
                                     chunk_bytes=chunk_bytes, on_bytes=on_bytes)
    new_md = Metadata(state_dict_metadata=new_items, planner_data=md.planner_data,  # type: ignore[arg-type]
                      storage_meta=None, version=md.version)
    commit_dcp_step(tier, step, [manifest], encode_metadata(new_md, locations))
    return step
