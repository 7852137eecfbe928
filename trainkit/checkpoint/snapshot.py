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
from collections import deque
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from trainkit.checkpoint.dtensor import check_not_sharded_tensor, describe_dtensor, is_dtensor
from trainkit.checkpoint.format import codec
from trainkit.checkpoint.format.layout import ShardPlan, TensorSpec, plan_shard
from trainkit.checkpoint.hostbuf import HOST_MEMORY, HostBufferPool, HostMemory

__all__ = ["describe_tensor", "storage_key", "plan_save", "HostMemory", "HOST_MEMORY",
           "HostBufferPool", "Snapshot"]

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


class Snapshot:
    """The copy of one save. Eager blobs (not owned by an attached optimizer) must be
    copied before ``save()`` returns; lazy ones before the optimizer's next step.

    Copies are taken from one queue, eager first, by whichever thread asks: the training
    thread inside ``save()`` or the step pre-hook, and the background writer. Two cores
    thus copy together, and every chunk is handed to the writer as soon as the blobs in it
    are copied. Thread-safe.

    ``slots=None``: ``buffer`` holds the whole packed array and the unit of copy is a
    blob. ``slots=k`` (a host budget smaller than the state): ``buffer`` holds ``k``
    chunks, and the snapshot goes out in waves. The unit of copy is then a blob's piece
    in one chunk; a chunk's pieces are queued once the chunk has a slot, and a slot is
    freed by :meth:`chunk_written`. Chunks holding eager pieces get slots first, so
    ``save()`` waits only for the writes that make room for them; ``optimizer.step()``
    waits until the lazy pieces are copied, i.e. until all but the last ``k`` chunks
    are written: the stall bought with the memory.
    """

    def __init__(self, plan: ShardPlan, buffer: torch.Tensor, tensors: list[torch.Tensor],
                 lazy_blobs: Iterable[int], *, slots: int | None = None) -> None:
        self.plan = plan
        self.buffer = buffer
        self.slots = slots
        self._tensors: list[torch.Tensor | None] = list(tensors)
        lazy_set = set(lazy_blobs)
        self._lazy_set = lazy_set
        flat = buffer.numpy()
        self._view = memoryview(flat) if flat.size else memoryview(b"")
        by_offset = [b for b in sorted(range(len(plan.blobs)), key=lambda b: plan.blobs[b].offset)
                     if plan.blobs[b].nbytes]
        # a piece: (blob, first byte, end byte) inside the blob, and the chunks it fills
        self._pieces: list[tuple[int, int, int, tuple[int, ...]]] = []
        self._waiting = [0] * plan.nchunks
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._pending: deque[int] = deque()
        self._slot_of: dict[int, int] = {}
        self._order: deque[int] = deque()
        self._free_slots: list[int] = []
        self._gaps: list[list[tuple[int, int]]] = []
        chunk = plan.chunk_bytes
        if slots is None:
            for b in by_offset:
                self._pieces.append((b, 0, plan.blobs[b].nbytes, tuple(plan.chunks_of(b))))
            eager = [p for p, (b, *_rest) in enumerate(self._pieces) if b not in lazy_set]
            lazy = [p for p, (b, *_rest) in enumerate(self._pieces) if b in lazy_set]
            self._pending.extend(eager + lazy)
            if plan.array_bytes > plan.nbytes:
                buffer[plan.nbytes:].zero_()
        else:
            per_chunk: list[list[int]] = [[] for _ in range(plan.nchunks)]
            covered: list[list[tuple[int, int]]] = [[] for _ in range(plan.nchunks)]
            for b in by_offset:
                blob = plan.blobs[b]
                for c in plan.chunks_of(b):
                    lo = max(c * chunk, blob.offset)
                    hi = min((c + 1) * chunk, blob.offset + blob.nbytes)
                    per_chunk[c].append(len(self._pieces))
                    self._pieces.append((b, lo - blob.offset, hi - blob.offset, (c,)))
                    covered[c].append((lo - c * chunk, hi - c * chunk))
            for c in range(plan.nchunks):      # padding between pieces: zeroed in the slot
                gaps, at = [], 0
                for lo, hi in sorted(covered[c]):
                    if lo > at:
                        gaps.append((at, lo))
                    at = max(at, hi)
                if at < chunk:
                    gaps.append((at, chunk))
                self._gaps.append(gaps)
            for c in range(plan.nchunks):      # eager pieces first inside a chunk
                per_chunk[c].sort(key=lambda p: self._pieces[p][0] in lazy_set)
            self._per_chunk = per_chunk
            has_eager = [any(self._pieces[p][0] not in lazy_set for p in per_chunk[c])
                         for c in range(plan.nchunks)]
            self._order.extend(sorted(range(plan.nchunks), key=lambda c: (not has_eager[c], c)))
            self._free_slots = list(range(min(slots, plan.nchunks)))[::-1]
        for _, _, _, chunks in self._pieces:
            for c in chunks:
                self._waiting[c] += 1
        self._eager_left = sum(1 for b, *_rest in self._pieces if b not in lazy_set)
        self._eager_queued = self._eager_left if slots is None else 0
        self._left = len(self._pieces)
        self._cancelled = False
        self._eager_done = threading.Event()
        self._inflight = 0
        self._done = threading.Event()
        self.error: BaseException | None = None
        self.ready_chunks: queue.Queue[int] = queue.Queue()
        if slots is None:
            for c in range(plan.nchunks):
                if self._waiting[c] == 0:
                    self.ready_chunks.put(c)
        else:
            with self._lock:
                while self._free_slots and self._order:
                    self._assign(self._free_slots.pop())
        if not self._eager_left:
            self._eager_done.set()
        if not self._left:
            self._finish_tensors()

    # -- waves ----------------------------------------------------------------------------
    def _assign(self, slot: int) -> None:
        """Give ``slot`` to the next chunk and queue that chunk's pieces (lock held)."""
        c = self._order.popleft()
        self._slot_of[c] = slot
        base = slot * self.plan.chunk_bytes
        for lo, hi in self._gaps[c]:
            self.buffer[base + lo:base + hi].zero_()
        for p in self._per_chunk[c]:
            self._pending.append(p)
            if self._pieces[p][0] not in self._lazy_set:
                self._eager_queued += 1
        if self._waiting[c] == 0:
            self.ready_chunks.put(c)
        self._cv.notify_all()

    def chunk_view(self, c: int) -> memoryview:
        """The bytes of chunk ``c`` (once it is ready): in the buffer, or in its slot."""
        chunk = self.plan.chunk_bytes
        base = c * chunk if self.slots is None else self._slot_of[c] * chunk
        return self._view[base:base + chunk]

    def chunk_written(self, c: int) -> None:
        """Chunk ``c`` is on the tier (or abandoned): its slot may take the next chunk."""
        if self.slots is None:
            return
        with self._lock:
            slot = self._slot_of.pop(c, None)
            if slot is None:
                return
            if self._order and self.error is None:
                self._assign(slot)
            else:
                self._free_slots.append(slot)

    # -- copying --------------------------------------------------------------------------
    def _dst(self, c: int, offset: int, nbytes: int) -> torch.Tensor:
        """Where ``nbytes`` at packed-array ``offset`` (inside chunk ``c``) go."""
        if self.slots is not None:
            offset += (self._slot_of[c] - c) * self.plan.chunk_bytes
        return self.buffer[offset:offset + nbytes]

    def _copy(self, p: int) -> None:
        b, lo, hi, chunks = self._pieces[p]
        blob = self.plan.blobs[b]
        dst = self._dst(chunks[0], blob.offset + lo, hi - lo)
        if blob.dense_tensor is not None:
            src = self._tensors[blob.dense_tensor]
            assert src is not None
            src = src.detach()
            if lo == 0 and hi == blob.nbytes:
                dst.view(src.dtype).view(src.shape).copy_(src)
                return
            size = src.element_size()
            out = dst.view(src.dtype)
            for piece, at in _dense_range(src, lo // size, hi // size):
                out[at - lo // size:at - lo // size + piece.numel()].view(piece.shape).copy_(piece)
            return
        src = self._tensors[blob.tensors[0]]
        assert src is not None
        raw = _bytes_of_storage(src.detach(), blob.source_start + lo, hi - lo)
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
        with self._cv:
            self._cv.notify_all()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def work(self, limit: int | None = None, *, eager_only: bool = False) -> bool:
        """Copy pending pieces (at most ``limit``; with ``eager_only``, only while eager
        ones are still queued) until none is left to take; others may still be in flight
        in another thread, or (waves) wait for a slot. Returns whether it copied anything."""
        took = 0
        while limit is None or took < limit:
            with self._lock:
                if not self._pending or self.error is not None:
                    return took > 0
                if eager_only and self._eager_queued == 0:
                    return took > 0
                took += 1
                p = self._pending.popleft()
                eager = self._pieces[p][0] not in self._lazy_set
                if eager:
                    self._eager_queued -= 1
                self._inflight += 1
            try:
                self._copy(p)
            except BaseException as exc:  # noqa: BLE001 - handed to wait() and the writer
                with self._lock:
                    self.error = exc
                    self._inflight -= 1
                    self._pending.clear()
                    self._order.clear()
                self._finish_tensors()
                return True
            with self._lock:
                self._inflight -= 1
                self._left -= 1
                for c in self._pieces[p][3]:
                    self._waiting[c] -= 1
                    if self._waiting[c] == 0:
                        self.ready_chunks.put(c)
                if eager:
                    self._eager_left -= 1
                    if self._eager_left == 0:
                        self._eager_done.set()
                        self._cv.notify_all()
                finished = (self._left == 0 or self._cancelled) and self._inflight == 0
            if finished:
                self._finish_tensors()
        return took > 0

    def cancel(self) -> None:
        """The save failed: drop the copies not yet started, so the step pre-hook does not
        spend time on a checkpoint that will not be written (the failure is reported
        through the save's handle, not from ``optimizer.step()``)."""
        with self._lock:
            self._cancelled = True
            self._pending.clear()
            self._order.clear()
            finished = self._inflight == 0
        if finished:
            self._finish_tensors()

    def _wait(self, event: threading.Event, *, eager_only: bool) -> None:
        """Copy alongside the writer until ``event``; with waves, sleep while the next
        pieces wait for a slot."""
        while True:
            self.work(eager_only=eager_only)
            with self._cv:
                if event.is_set() or self.error is not None:
                    break
                if self._pending and not (eager_only and self._eager_queued == 0):
                    continue
                self._cv.wait(0.5)
        event.wait()
        if self.error is not None:
            raise self.error

    def wait_eager(self) -> None:
        """Block until every eager blob is copied, copying alongside the writer thread."""
        self._wait(self._eager_done, eager_only=True)

    def wait(self) -> None:
        """Block until every blob is copied, copying alongside the background thread."""
        self._wait(self._done, eager_only=False)


def _dense_range(src: torch.Tensor, e0: int, e1: int, at: int = 0
                 ) -> Iterable[tuple[torch.Tensor, int]]:
    """Views of ``src`` covering elements ``[e0, e1)`` of its row-major order, each with
    the index of its first element: a piece of a tensor stored densely, without
    materialising the whole tensor contiguously."""
    if e0 >= e1:
        return
    if src.ndim == 0 or src.is_contiguous():
        yield src.reshape(-1)[e0:e1], at + e0
        return
    inner = src[0].numel()
    r0, r1 = e0 // inner, (e1 - 1) // inner
    if r0 == r1:
        yield from _dense_range(src[r0], e0 - r0 * inner, e1 - r0 * inner, at + r0 * inner)
        return
    if e0 % inner:
        yield from _dense_range(src[r0], e0 - r0 * inner, inner, at + r0 * inner)
        r0 += 1
    end = r1 + 1 if e1 % inner == 0 else r1
    if end > r0:
        yield src[r0:end], at + r0 * inner
    if e1 % inner:
        yield from _dense_range(src[r1], 0, e1 - r1 * inner, at + r1 * inner)


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
