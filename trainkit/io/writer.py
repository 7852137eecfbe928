"""Sharded safetensors output in the Hugging Face layout, written out of order.

The shard plan is made up front from shapes and dtypes alone (a pure function),
so every file's header is known before any tensor is computed. Each tensor is
then ``pwrite``-n straight to its final offset, from any thread and in any
order: a merge never accumulates a shard in memory, and parallel workers never
wait on each other to write.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from trainkit.io.safetensors_format import TORCH_TO_DTYPE, TensorMeta, encode_header

__all__ = ["ShardPlan", "plan_shards", "ShardedWriter", "DEFAULT_SHARD_BYTES"]

DEFAULT_SHARD_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class ShardPlan:
    """Where each tensor goes: ``placement[name] = (shard file name, byte offset)``."""

    shard_names: tuple[str, ...]
    placement: dict[str, tuple[str, int]]
    metas: dict[str, TensorMeta]
    headers: dict[str, bytes]

    @property
    def total_size(self) -> int:
        return sum(m.nbytes for m in self.metas.values())


def plan_shards(metas: dict[str, TensorMeta], max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> ShardPlan:
    """Assign tensors (in the given order) to shards of at most ``max_shard_bytes``.

    One shard is named ``model.safetensors``; several follow the Hugging Face
    ``model-0000X-of-0000Y.safetensors`` pattern and get an index file.
    """
    groups: list[list[str]] = [[]]
    size = 0
    for name, meta in metas.items():
        if groups[-1] and size + meta.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += meta.nbytes
    n = len(groups)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    placement: dict[str, tuple[str, int]] = {}
    headers: dict[str, bytes] = {}
    for shard, group in zip(names, groups):
        entries: dict[str, dict] = {}
        offset = 0
        for name in group:
            meta = metas[name]
            entries[name] = {
                "dtype": TORCH_TO_DTYPE[meta.dtype],
                "shape": list(meta.shape),
                "data_offsets": [offset, offset + meta.nbytes],
            }
            offset += meta.nbytes
        header = encode_header(entries, {"format": "pt"})
        headers[shard] = header
        for name in group:
            placement[name] = (shard, len(header) + entries[name]["data_offsets"][0])
    return ShardPlan(tuple(names), placement, dict(metas), headers)


class ShardedWriter:
    """Writes the tensors of a :class:`ShardPlan`; ``write`` is thread-safe.

    Usage::

        with ShardedWriter(out_dir, plan) as w:
            w.write("lm_head.weight", tensor)
    """

    def __init__(self, directory: str | Path, plan: ShardPlan):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.plan = plan
        self._fds: dict[str, int] = {}
        self._written: set[str] = set()
        self._lock = threading.Lock()
        for shard in plan.shard_names:
            path = self.directory / shard
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            header = plan.headers[shard]
            os.pwrite(fd, header, 0)
            size = len(header) + sum(
                plan.metas[n].nbytes for n, (s, _) in plan.placement.items() if s == shard
            )
            os.ftruncate(fd, size)
            self._fds[shard] = fd

    def write(self, name: str, tensor: torch.Tensor) -> None:
        meta = self.plan.metas[name]
        if tuple(tensor.shape) != meta.shape or tensor.dtype != meta.dtype:
            raise ValueError(
                f"{name}: planned {meta.dtype} {list(meta.shape)}, got {tensor.dtype} {list(tensor.shape)}"
            )
        shard, offset = self.plan.placement[name]
        data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        fd = self._fds[shard]
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
        with self._lock:
            self._written.add(name)

    def close(self) -> None:
        """Close the shards and write the index; raises if a planned tensor is missing."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        missing = [n for n in self.plan.metas if n not in self._written]
        if missing:
            raise RuntimeError(f"output incomplete, tensors never written: {missing[:10]}")
        if len(self.plan.shard_names) > 1:
            index = {
                "metadata": {"total_size": self.plan.total_size},
                "weight_map": {n: s for n, (s, _) in self.plan.placement.items()},
            }
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
