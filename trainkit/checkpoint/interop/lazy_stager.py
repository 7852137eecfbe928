"""``LazyStager``: trainkit's lazy snapshot for ``dcp.async_save``.

DCP's ``async_save`` first *stages* the state (makes a copy that later training cannot
change), then serializes the copy in a background thread. Its ``DefaultStager`` copies
every tensor; with ``use_async_staging`` the copy runs in a thread, and the loop must not
touch the state until ``staging_completion`` resolves. ``LazyStager`` stages the way
:class:`~trainkit.checkpoint.Checkpointer` snapshots (DataStates-LLM, HPDC'24):

- tensors the attached optimizer does not own (buffers such as BatchNorm statistics,
  anything the next forward may change) are copied inside ``stage()``;
- the optimizer's parameters and state are copied afterwards, in a background thread,
  because only ``optimizer.step()`` changes them; a step pre-hook makes the next
  ``step()`` wait for (and help with) that copy, so forward and backward overlap it;
- the copies land in one packed host buffer (:mod:`~trainkit.checkpoint.snapshot`'s
  plan and copy machinery), reused by the next save.

Usage, a torchtitan-style loop with its save call unchanged::

    stager = LazyStager(optimizer)
    response = dcp.async_save(state, storage_writer=ZarrWriter(path, step=step),
                              async_stager=stager, process_group=ckpt_pg)
    ...                                  # training continues; optimizer.step() may wait
    response.upload_completion.result()  # before the next async_save
    stager.close()                       # after the last one

``stage()`` returns a Future (so ``async_save`` returns DCP's ``AsyncSaveResponse``,
exactly as with ``DefaultStager(StagingOptions(use_async_staging=True))``); it resolves
once every tensor is copied. DTensors are staged through their local shards and come
back as DTensors on the same mesh and placements, so DCP plans them as before.

Buffer reuse: the staged tensors are views of the buffer. The next ``stage()`` reuses the
buffer only once nothing references the previous staged state any more (the upload has
finished and dropped it); while it is still referenced (an upload in flight, or a failed
one whose exception holds it) a second buffer is allocated rather than overwrite bytes
an upload may still be reading. ``stats`` counts both.

Thread-safety: call ``stage``/``close`` from the training thread.
"""

from __future__ import annotations

import copy
import gc
import io
import threading
import time
import weakref
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint.staging import AsyncStager

from trainkit.checkpoint.format.layout import ShardPlan, plan_shard
from trainkit.checkpoint.snapshot import HostBufferPool, Snapshot, describe_tensor, storage_key

__all__ = ["LazyStager"]

_STAGE_CHUNK = 64 << 20   # only the granularity of the snapshot's ready-chunk queue here


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:      # torch built without distributed
        return None
    return DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose bytes are copied: a DTensor's local shard, else ``t``."""
    dt = _dtensor_type()
    if dt is not None and isinstance(t, dt):
        with torch.no_grad():
            return t.to_local()
    return t


def owned_storages(optimizers: Iterable[torch.optim.Optimizer]) -> set[tuple[str, int]]:
    """Storages of the optimizers' parameters and state tensors (DTensors by their local
    shards): only ``optimizer.step()`` changes them, so they may be copied lazily."""
    owned: set[tuple[str, int]] = set()
    for opt in optimizers:
        for group in opt.param_groups:
            owned.update(storage_key(_local(p)) for p in group["params"])
        for st in opt.state.values():
            owned.update(storage_key(_local(v)) for v in st.values()
                         if isinstance(v, torch.Tensor))
    return owned


class _Slot:
    """A host buffer and weak references to the staged tensors that view it."""

    def __init__(self, pin: bool) -> None:
        self.pool = HostBufferPool(pin=pin)
        self.views: list[weakref.ref] = []

    def in_use(self) -> bool:
        return any(r() is not None for r in self.views)


class LazyStager(AsyncStager):
    """An ``AsyncStager`` that copies the optimizer's tensors lazily into reused buffers.

    Args:
        optimizer: the optimizer (or several) whose parameters and state may be copied
            after ``stage()`` returns; its ``step()`` waits until they are. None: every
            tensor is copied inside ``stage()`` (still into reused buffers).
        pin_memory: page-lock the host buffer (default: when CUDA is available), so
            device-to-host copies run at full speed.
    """

    _synchronize_after_execute: bool = False

    def __init__(self, optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None
                 = None, *, pin_memory: bool | None = None) -> None:
        if optimizer is None:
            optimizers: list[torch.optim.Optimizer] = []
        elif isinstance(optimizer, torch.optim.Optimizer):
            optimizers = [optimizer]
        else:
            optimizers = list(optimizer)
        self._optimizers = optimizers
        self._pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self._hooks = [o.register_step_pre_hook(self._before_step) for o in optimizers]
        self._slots: list[_Slot] = []
        self._current: Snapshot | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="trainkit-lazy-stage")
        self._closed = False
        self.stats: dict[str, float] = {"saves": 0, "stage_s": 0.0, "hook_wait_s": 0.0,
                                        "lazy_bytes": 0, "eager_bytes": 0,
                                        "buffer_allocations": 0, "buffer_reuses": 0,
                                        "buffer_bytes": 0}

    # -- the AsyncStager protocol ---------------------------------------------------------
    def stage(self, state_dict: dict[str, Any], **kwargs: Any) -> Future:
        """Copy what the next forward may change now, the rest before the next
        ``optimizer.step()``; return a Future of the staged state (resolved when every
        tensor is copied). Non-tensor values are deep-copied now."""
        if self._closed:
            raise RuntimeError("LazyStager.stage() after close()")
        t0 = time.perf_counter()
        self._finish_current()               # the previous lazy copy must not outlive its save
        leaves: list[torch.Tensor] = []
        skeleton = _skeleton(state_dict, leaves)
        sources = [_local(t) for t in leaves]
        for path_t, t in zip(leaves, sources):
            _check_stageable(path_t, t)
        specs = [describe_tensor(str(i), t) for i, t in enumerate(sources)]
        plan = plan_shard(specs, chunk_bytes=_STAGE_CHUNK)
        owned = owned_storages(self._optimizers) if self._optimizers else set()
        lazy = [i for i, b in enumerate(plan.blobs)
                if owned and b.nbytes and storage_key(sources[b.tensors[0]]) in owned]
        slot, buffer = self._acquire(plan.nbytes)
        try:
            staged_leaves = [_staged_view(buffer, plan, i, leaves[i], sources[i])
                             for i in range(len(leaves))]
            slot.views = [weakref.ref(v) for v in staged_leaves]
            slot.views += [weakref.ref(v._local_tensor) for v in staged_leaves  # noqa: SLF001
                           if hasattr(v, "_local_tensor")]
            staged = _fill(skeleton, staged_leaves)
            snap = Snapshot(plan, buffer, sources, lazy)
        except BaseException:
            slot.pool.release()
            raise
        del sources
        future: Future = Future()
        self._executor.submit(_finish, snap, staged, future)   # copies alongside, then resolves
        snap.wait_eager()
        if not snap.done:
            self._current = snap
        lazy_bytes = sum(plan.blobs[b].nbytes for b in lazy)
        self.stats["saves"] += 1
        self.stats["lazy_bytes"] = lazy_bytes
        self.stats["eager_bytes"] = plan.nbytes - lazy_bytes
        self.stats["buffer_bytes"] = sum(s.pool.capacity for s in self._slots)
        self.stats["stage_s"] += time.perf_counter() - t0
        return future

    def synchronize_staging(self) -> None:
        """Block until the last ``stage()`` has copied everything (DCP's older protocol;
        ``AsyncSaveResponse.staging_completion`` says the same)."""
        self._finish_current()

    def close(self) -> None:
        """Finish the pending copy, detach from the optimizers, free the buffers."""
        if self._closed:
            return
        self._closed = True
        try:
            self._finish_current()
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            self._executor.shutdown(wait=True)
            self._slots.clear()

    # -- internals ------------------------------------------------------------------------
    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        snap = self._current
        if snap is None:
            return
        t0 = time.perf_counter()
        snap.wait()
        self.stats["hook_wait_s"] += time.perf_counter() - t0
        if self._current is snap:
            self._current = None

    def _finish_current(self) -> None:
        snap, self._current = self._current, None
        if snap is not None:
            snap.wait()

    def _acquire(self, nbytes: int) -> tuple[_Slot, torch.Tensor]:
        """A buffer no staged state still views: reuse one, else allocate one more."""
        for attempt in range(2):
            for slot in self._slots:
                if not slot.in_use():
                    slot.pool.release()
            free = [s for s in self._slots if not s.in_use()]
            if free or attempt or not self._slots:
                break
            gc.collect()       # a finished upload may be held only by a reference cycle
        if free:
            slot = free[0]
            self._slots = [s for s in self._slots if s is slot or s.in_use()]
        else:
            slot = _Slot(self._pin)
            self._slots.append(slot)
        allocated = slot.pool.allocations
        buffer = slot.pool.acquire(nbytes, timeout=0)
        key = "buffer_allocations" if slot.pool.allocations > allocated else "buffer_reuses"
        self.stats[key] += 1
        return slot, buffer


def _finish(snap: Snapshot, staged: dict, future: Future) -> None:
    """Background: copy the lazy blobs (with the step pre-hook), then hand the staged
    state to DCP's upload thread, which waits on ``future``."""
    try:
        snap.wait()
    except BaseException as exc:  # noqa: BLE001 - the upload reports it
        future.set_exception(exc)
        return
    future.set_result(staged)


def _skeleton(obj: Any, leaves: list[torch.Tensor]) -> Any:
    """``obj`` with every tensor replaced by its index in ``leaves`` (as a marker) and
    every other value deep-copied, so later changes to them do not reach the save."""
    if isinstance(obj, torch.Tensor):
        leaves.append(obj)
        return _Leaf(len(leaves) - 1)
    if isinstance(obj, dict):
        return {k: _skeleton(v, leaves) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_skeleton(v, leaves) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_skeleton(v, leaves) for v in obj)
    if isinstance(obj, io.BytesIO):
        return io.BytesIO(obj.getvalue())
    return copy.deepcopy(obj)


class _Leaf:
    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def _fill(obj: Any, staged: list[torch.Tensor]) -> Any:
    if isinstance(obj, _Leaf):
        return staged[obj.index]
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = _fill(v, staged)
        return obj
    if isinstance(obj, list):
        return [_fill(v, staged) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_fill(v, staged) for v in obj)
    return obj


def _check_stageable(t: torch.Tensor, local: torch.Tensor) -> None:
    if local.layout != torch.strided or local.is_quantized or local.is_nested \
            or local.device.type == "meta":
        raise TypeError(f"LazyStager cannot stage a {local.layout} {local.device.type} "
                        f"{type(t).__qualname__}: only dense tensors with data")


def _staged_view(buffer: torch.Tensor, plan: ShardPlan, i: int, original: torch.Tensor,
                 local: torch.Tensor) -> torch.Tensor:
    """Tensor ``i`` as it will sit in the buffer once copied (same shape, dtype and,
    for views of one storage, the same sharing); a DTensor again for a DTensor."""
    place = plan.placements[i]
    start = plan.blobs[place.blob].offset + place.offset
    if local.numel() == 0:
        view = torch.empty(local.shape, dtype=local.dtype)
    else:
        itemsize = local.element_size()
        span = sum((d - 1) * s for d, s in zip(local.shape, place.stride)) + 1
        raw = buffer[start:start + span * itemsize]
        view = raw.view(local.dtype).as_strided(tuple(local.shape), place.stride)
    dt = _dtensor_type()
    if dt is not None and isinstance(original, dt):
        return dt.from_local(view, original.device_mesh, original.placements, run_check=False,
                             shape=original.shape, stride=original.stride())
    return view
