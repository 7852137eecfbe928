"""Where a rank's collective events go, and how each backend's completions are stamped.

Per backend (chosen by :class:`~trainkit.detect.probe.MonitoredProcessGroup`):

- gloo collectives: the work's future callback (runs on a gloo thread);
- gloo point-to-point (no future on gloo): :class:`RecordedWork` stamps the
  completion when the caller's ``wait()`` returns;
- NCCL: the future completes at enqueue, so a CUDA event recorded on a private
  side stream made to wait on the work is polled instead (:class:`_CudaEventPoller`).

Events are tuples put on the channel's queue: ``("i", group, seq, op, bytes, dtype, t,
step, peer)`` at issue, ``("w", group, seq, t)`` when a point-to-point wait begins and
``("d", group, seq, t, ok)`` at completion.
"""

from __future__ import annotations

import collections
import datetime
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from trainkit.faults import FaultInjector

__all__ = ["RecordedWork", "Recorder", "payload_info", "stamp_done"]

_now = time.time

_DTYPE_NAMES: dict[torch.dtype, str] = {}


def _dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


def _first_dtype(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return _dtype_name(obj.dtype)
    if isinstance(obj, (list, tuple)):
        for o in obj:
            d = _first_dtype(o)
            if d:
                return d
    return ""


def payload_info(obj: Any) -> tuple[int, str]:
    """(bytes, dtype) of a collective's payload; one tensor in a list is the fast path."""
    if type(obj) is list and len(obj) == 1 and isinstance(obj[0], torch.Tensor):
        t = obj[0]
        return t.nbytes, _dtype_name(t.dtype)
    return _nbytes(obj), _first_dtype(obj)


class Recorder:
    """Shared per-rank state: where events go, the current step, the injector.

    ``put`` is the channel's (thread-safe, non-blocking) queue put.
    """

    def __init__(self, put: Callable[[list], None], *, rank: int,
                 injector: FaultInjector | None = None):
        self.put = put
        self.rank = rank
        self.injector = injector if injector is not None and injector.active else None
        self.step: int | None = None
        self.explicit_steps = False   # the script calls mon.step(): the optimizer hook stands down
        self.comm_error: str | None = None
        self._cuda_poller: _CudaEventPoller | None = None

    def cuda_poller(self) -> _CudaEventPoller:
        if self._cuda_poller is None:
            self._cuda_poller = _CudaEventPoller(self)
        return self._cuda_poller

    def done(self, group: str, seq: int, ok: bool, error: str | None = None) -> None:
        self.put(("d", group, seq, _now(), ok))
        if not ok and self.comm_error is None:
            self.comm_error = error or "collective failed"

    def completion_callback(self, group: str, seq: int) -> Callable[[Any], None]:
        """The future callback that stamps a collective's completion (see :func:`stamp_done`)."""
        return functools.partial(stamp_done, self, group, seq)


def stamp_done(rec: Recorder, group: str, seq: int, fut: Any) -> None:
    """Stamp a collective's completion; bound with ``functools.partial`` per call.

    It runs on the backend's worker thread (gloo) with the GIL, inline in the
    future's completion, so it must be as short as possible: one clock read
    and one append on success; the slow path only on failure. ``rec.put`` is read
    here, not when the call was issued, so a lost channel stops the appends at once.
    """
    try:
        fut.value()
    except Exception as exc:  # noqa: BLE001 - a failed collective is evidence
        rec.done(group, seq, False, str(exc))
        return
    rec.put(("d", group, seq, _now(), True))


class RecordedWork(dist.Work):
    """Wraps a work without a future (gloo send/recv) to stamp completion on wait()."""

    def __init__(self, inner: dist.Work, on_done: Callable[[bool, str | None], None],
                 on_wait: Callable[[], None]):
        super().__init__()
        self._inner = inner
        self._on_done = on_done
        self._on_wait = on_wait
        self._stamped = False

    def _stamp(self, ok: bool, error: str | None = None) -> None:
        if not self._stamped:
            self._stamped = True
            self._on_done(ok, error)

    def wait(self, timeout: datetime.timedelta = datetime.timedelta(0)) -> bool:
        if not self._stamped:
            self._on_wait()   # from here on this rank is blocked on the transfer
        try:
            if timeout:
                result = self._inner.wait(timeout)
            else:
                result = self._inner.wait()
        except Exception as exc:
            self._stamp(False, str(exc))
            raise
        self._stamp(True)
        return bool(result) if result is not None else True

    def is_completed(self) -> bool:
        done = self._inner.is_completed()
        if done:
            self._stamp(True)
        return done

    def is_success(self) -> bool:
        return self._inner.is_success()

    def exception(self) -> Any:
        return self._inner.exception()

    def source_rank(self) -> int:
        return self._inner.source_rank()

    def result(self) -> Any:
        return self._inner.result()

    def synchronize(self) -> None:
        self._inner.synchronize()


class _CudaEventPoller:
    """NCCL completion: a CUDA event per work, polled by one daemon thread."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.stream = torch.cuda.Stream()
        self.pending: collections.deque = collections.deque()
        self.lock = threading.Lock()
        threading.Thread(target=self._poll, daemon=True, name="trainkit-detect-cuda").start()

    def track(self, work: dist.Work, group: str, seq: int) -> None:
        event = torch.cuda.Event()
        with torch.cuda.stream(self.stream):
            work.wait()          # NCCL: makes our side stream wait; does not block the CPU
            event.record(self.stream)
        with self.lock:
            self.pending.append((event, group, seq))

    def _poll(self) -> None:
        while True:
            time.sleep(0.002)
            with self.lock:
                items = list(self.pending)
            finished = [item for item in items if item[0].query()]
            if finished:
                with self.lock:
                    for item in finished:
                        self.pending.remove(item)
                for _, group, seq in finished:
                    self.recorder.done(group, seq, True)
