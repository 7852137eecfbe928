"""Copying live tensors into reused host buffers, eagerly or lazily.

The snapshot is what makes ``save()`` cheap. Each blob of the shard plan is copied from
the live tensors into one host buffer. Blobs the attached optimizer owns (its parameters
and state) may be copied later, in a background thread, because only
``optimizer.step()`` changes them, and the step pre-hook waits for the copy (helping with
it, so two cores finish it together). Every other blob is copied inside ``save()``.

As blobs land, the chunks of the packed array they complete become ready, so writing
to disk overlaps the copy. The buffer is returned to the pool only after its chunks are
written; a new save waits for it (backpressure) instead of allocating a second copy.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from trainkit.checkpoint.dtensor import check_not_sharded_tensor, describe_dtensor, is_dtensor
from trainkit.checkpoint.format import codec
from trainkit.checkpoint.format.layout import ShardPlan, TensorSpec, plan_shard

__all__ = ["describe_tensor", "storage_key", "plan_save", "HostMemory", "HOST_MEMORY",
           "HostBufferPool", "Snapshot"]

_ALIGN = 4096


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def describe_tensor(name: str, t: torch.Tensor) -> TensorSpec:
    """Geometry of ``t`` for the planner. Conjugate/negative views are stored densely,
    because their storage bytes differ from their values."""
    itemsize = t.element_size()
    nbytes = t.numel() * itemsize
    shareable = not (t.is_conj() or t.is_neg()) and t.numel() > 0
    if shareable:
        start = t.storage_offset() * itemsize
        last = sum((d - 1) * s for d, s in zip(t.shape, t.stride()))
        end = start + (last + 1) * itemsize
    else:
        start = end = 0
    return TensorSpec(name, t.dtype, tuple(t.shape), tuple(t.stride()),
                      storage_key(t) if shareable else None, start, end, nbytes)


def _bytes_of_storage(t: torch.Tensor, start: int, nbytes: int) -> torch.Tensor:
    """A uint8 view of ``nbytes`` of ``t``'s storage from byte ``start``."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(
        t.untyped_storage(), start, (nbytes,), (1,))


class HostMemory:
    """Bytes of host buffers allocated by the snapshot code and not yet freed, now and at
    the high-water mark (process-wide). A buffer counts until its memory is really freed,
    i.e. until no view of it is left."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current = 0
        self.peak = 0

    def track(self, raw: torch.Tensor) -> None:
        n = raw.numel() * raw.element_size()
        with self._lock:
            self.current += n
            self.peak = max(self.peak, self.current)
        weakref.finalize(raw, self._freed, n)

    def _freed(self, n: int) -> None:
        with self._lock:
            self.current -= n

    def reset_peak(self) -> int:
        """Start a new high-water measurement at the current level; returns it."""
        with self._lock:
            self.peak = self.current
            return self.current


HOST_MEMORY = HostMemory()


class HostBufferPool:
    """One reusable host buffer; ``acquire`` blocks while the previous save holds it."""

    def __init__(self, *, pin: bool) -> None:
        self._pin = pin
        self._buf: torch.Tensor | None = None
        self._free = threading.Condition()
        self._busy = False
        self.allocations = 0          # buffers allocated (a reuse allocates none)
        self.peak_bytes = 0           # the largest buffer held

    def acquire(self, nbytes: int, timeout: float | None = None) -> torch.Tensor:
        with self._free:
            if not self._free.wait_for(lambda: not self._busy, timeout=timeout):
                raise TimeoutError("the previous checkpoint still holds the host buffer")
            self._busy = True
        if self._buf is None or self._buf.numel() < nbytes or self._buf.numel() > 2 * nbytes + (64 << 20):
            self._buf = None  # free the old one first: never hold two
            raw = torch.empty(nbytes + _ALIGN, dtype=torch.uint8, pin_memory=self._pin)
            HOST_MEMORY.track(raw)
            self.allocations += 1
            self.peak_bytes = max(self.peak_bytes, raw.numel())
            start = -raw.data_ptr() % _ALIGN      # page-aligned, for O_DIRECT writes
            self._buf = raw[start:start + nbytes]
        return self._buf[:nbytes]

    def release(self) -> None:
        with self._free:
            self._busy = False
            self._free.notify_all()

    @property
    def capacity(self) -> int:
        return 0 if self._buf is None else self._buf.numel()


class Snapshot:
    """The copy of one save. Eager blobs (not owned by an attached optimizer) must be
    copied before ``save()`` returns; lazy ones before the optimizer's next step.

    Copies are taken from one queue, eager first, by whichever thread asks: the training
    thread inside ``save()`` or the step pre-hook, and the background writer. Two cores
    thus copy together, and every chunk is handed to the writer as soon as the blobs in it
    are copied. Thread-safe.
    """

    def __init__(self, plan: ShardPlan, buffer: torch.Tensor, tensors: list[torch.Tensor],
                 lazy_blobs: Iterable[int]) -> None:
        self.plan = plan
        self.buffer = buffer
        self._tensors: list[torch.Tensor | None] = list(tensors)
        lazy_set = set(lazy_blobs)
        by_offset = sorted(range(len(plan.blobs)), key=lambda b: plan.blobs[b].offset)
        eager = [b for b in by_offset if b not in lazy_set]
        lazy = [b for b in by_offset if b in lazy_set]
        self._pending = list(reversed(eager + lazy))      # pop() from the end: eager first
        self._eager_left = len(eager)
        self._eager_done = threading.Event()
        self._lazy_set = lazy_set
        self._inflight = 0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.error: BaseException | None = None
        self.ready_chunks: queue.Queue[int] = queue.Queue()
        self._waiting = [0] * plan.nchunks
        for b in range(len(plan.blobs)):
            for c in plan.chunks_of(b):
                self._waiting[c] += 1
        for c in range(plan.nchunks):
            if self._waiting[c] == 0:
                self.ready_chunks.put(c)
        if not self._eager_left:
            self._eager_done.set()
        if not self._pending:
            self._finish_tensors()

    def _copy(self, b: int) -> None:
        blob = self.plan.blobs[b]
        if blob.nbytes == 0:
            return
        dst = self.buffer[blob.offset:blob.offset + blob.nbytes]
        if blob.dense_tensor is not None:
            src = self._tensors[blob.dense_tensor]
            assert src is not None
            dst.view(src.dtype).view(src.shape).copy_(src.detach())
        else:
            src = self._tensors[blob.tensors[0]]
            assert src is not None
            raw = _bytes_of_storage(src.detach(), blob.source_start, blob.nbytes)
            if raw.device.type == "cpu":
                # One thread's memcpy, GIL released. torch's copy_ would start an intra-op
                # parallel region from this (background) thread, oversubscribing the cores
                # the training thread's own parallel regions use.
                np.copyto(dst.numpy(), raw.numpy())
            else:
                dst.copy_(raw)

    def _finish_tensors(self) -> None:
        self._tensors = []  # drop references to live tensors
        self._eager_done.set()
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def work(self, limit: int | None = None, *, eager_only: bool = False) -> bool:
        """Copy pending blobs (at most ``limit``; only eager ones if ``eager_only``) until
        none is left to take; others may still be in flight in another thread. Returns
        whether it copied anything."""
        took = 0
        while limit is None or took < limit:
            with self._lock:
                if not self._pending or self.error is not None:
                    return took > 0
                if eager_only and self._pending[-1] in self._lazy_set:
                    return took > 0
                took += 1
                b = self._pending.pop()
                self._inflight += 1
            try:
                self._copy(b)
            except BaseException as exc:  # noqa: BLE001 - handed to wait() and the writer
                with self._lock:
                    self.error = exc
                    self._inflight -= 1
                    self._pending.clear()
                self._finish_tensors()
                return True
            with self._lock:
                self._inflight -= 1
                for c in self.plan.chunks_of(b):
                    self._waiting[c] -= 1
                    if self._waiting[c] == 0:
                        self.ready_chunks.put(c)
                if b not in self._lazy_set:
                    self._eager_left -= 1
                    if self._eager_left == 0:
                        self._eager_done.set()
                finished = not self._pending and self._inflight == 0
            if finished:
                self._finish_tensors()
        return took > 0

    def cancel(self) -> None:
        """The save failed: drop the copies not yet started, so the step pre-hook does not
        spend time on a checkpoint that will not be written (the failure is reported
        through the save's handle, not from ``optimizer.step()``)."""
        with self._lock:
            self._pending.clear()
            finished = self._inflight == 0
        if finished:
            self._finish_tensors()

    def wait_eager(self) -> None:
        """Block until every eager blob is copied, copying alongside the writer thread."""
        self.work(eager_only=True)
        self._eager_done.wait()
        if self.error is not None:
            raise self.error

    def wait(self) -> None:
        """Block until every blob is copied, copying alongside the background thread."""
        self.work()
        self._done.wait()
        if self.error is not None:
            raise self.error


def plan_save(state: Any, *, chunk_bytes: int, sharded: dict[str, int] | None = None,
              dtensors: dict[int, dict] | None = None
              ) -> tuple[Any, list[torch.Tensor], list[TensorSpec], dict[int, int], ShardPlan]:
    """What ``save(step, state)`` writes, decided before any byte is copied: the encoded
    tree (:mod:`~trainkit.checkpoint.format.codec`), the tensors with their
    descriptions, the split tensors (index -> dim) and the shard plan.

    A DTensor is stored as the piece this rank writes (:mod:`~trainkit.checkpoint.dtensor`);
    its metadata goes to ``dtensors`` (tensor index -> entry ``dtensor`` field).

    Raises ``TypeError`` naming the key path for a value that cannot be stored, and
    ``KeyError``/``ValueError`` for a ``sharded`` entry that names no tensor or dimension.
    """
    tensors: list[torch.Tensor] = []
    specs: list[TensorSpec] = []

    def on_tensor(path: codec.KeyPath, t: torch.Tensor) -> int:
        if is_dtensor(t):
            t, meta = describe_dtensor(path, t)
            if dtensors is None:
                raise TypeError(f"a DTensor at {codec.format_key_path(path)}: this caller "
                                f"stores plain tensors only")
            dtensors[len(tensors)] = meta
        _check_tensor(path, t)
        specs.append(describe_tensor("/".join(map(str, path)), t))
        tensors.append(t)
        return len(tensors) - 1

    tree = codec.encode(state, on_tensor)
    split = _sharded_indices(specs, sharded or {})
    return tree, tensors, specs, split, plan_shard(specs, chunk_bytes=chunk_bytes)


def _sharded_indices(specs: list[TensorSpec], sharded: dict[str, int]) -> dict[int, int]:
    """Tensor index -> split dimension, for ``save(..., sharded=...)``."""
    if not sharded:
        return {}
    by_name = {s.name.replace("/", "."): i for i, s in enumerate(specs)}
    out = {}
    for name, dim in sharded.items():
        i = by_name.get(name.replace("/", "."))
        if i is None:
            raise KeyError(f"sharded={{{name!r}: {dim}}}: no tensor with that key path in the "
                           f"state; tensors: {sorted(by_name)[:8]}{' ...' if len(by_name) > 8 else ''}")
        ndim = len(specs[i].shape)
        if isinstance(dim, bool) or not isinstance(dim, int) or not -ndim <= dim < ndim:
            raise ValueError(f"sharded={{{name!r}: {dim!r}}}: the tensor has {ndim} dimensions")
        out[i] = dim % ndim
    return out


def _check_tensor(path: codec.KeyPath, t: torch.Tensor) -> None:
    check_not_sharded_tensor(path, t)
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise TypeError(f"cannot store a {type(t).__qualname__} at {codec.format_key_path(path)}: "
                        f"only plain (dense, strided) tensors are supported")
    if t.layout != torch.strided or t.is_quantized or t.is_nested or t.device.type == "meta":
        raise TypeError(f"cannot store a {t.layout} {t.device.type} tensor at "
                        f"{codec.format_key_path(path)}: only dense tensors with data are "
                        f"supported")
