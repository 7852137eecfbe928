"""Per-rank recording of every collective: a ``dist.ProcessGroup`` wrapper.

Why a wrapper subclass: measured on torch 2.13 CPU, a Python subclass of
``torch.distributed.ProcessGroup`` that forwards to the real gloo (or NCCL)
group sees every collective DDP's C++ reducer and FSDP issue when it is handed
over as ``process_group=`` or installed as the default group, while
``_register_on_completion_hook`` is NCCL-only and a DDP comm hook sees only
bucket allreduces and takes the user's one hook slot.

Each call records the arrival (issue time, op, bytes, dtype, step, per-group
sequence number) and, later, the completion:

- gloo collectives: the work's future callback (runs on a gloo thread);
- gloo point-to-point (no future on gloo): a ``dist.Work`` subclass stamps the
  completion when the caller's ``wait()`` returns;
- NCCL: the future completes at enqueue, so a CUDA event recorded on a private
  side stream made to wait on the work is polled instead.

Fault injection (``trainkit.faults``) acts only here, so groups trainkit
creates for itself are never monitored nor injected.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import faulthandler
import itertools
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from trainkit.faults import FaultInjector

__all__ = ["MonitoredProcessGroup", "Recorder", "StackDumper", "register_group", "unmonitored",
           "unregister_group"]

# Threads inside ``unmonitored()``: ident -> nesting depth. A plain dict rather than a
# threading.local because the hot path tests it on every collective, and an empty
# dict's truth test is the cheapest check there is.
_OFF_THREADS: dict[int, int] = {}
_get_ident = threading.get_ident
_now = time.time


@contextlib.contextmanager
def unmonitored() -> Iterator[None]:
    """Collectives issued by this thread inside the block are neither recorded nor injected.

    For trainkit's own collectives on a monitored group (e.g. a checkpointer's
    barrier on the default group); groups trainkit creates for itself with
    ``dist.new_group`` are never wrapped in the first place.
    """
    ident = _get_ident()
    _OFF_THREADS[ident] = _OFF_THREADS.get(ident, 0) + 1
    try:
        yield
    finally:
        depth = _OFF_THREADS.pop(ident) - 1
        if depth:
            _OFF_THREADS[ident] = depth

# (method name, index of the argument holding the payload tensors, op label)
_COLLECTIVES: tuple[tuple[str, int, str], ...] = (
    ("allreduce", 0, "allreduce"),
    ("allreduce_coalesced", 0, "allreduce"),
    ("broadcast", 0, "broadcast"),
    ("reduce", 0, "reduce"),
    ("allgather", 1, "allgather"),
    ("_allgather_base", 1, "allgather"),
    ("allgather_coalesced", 1, "allgather"),
    ("allgather_into_tensor_coalesced", 1, "allgather"),
    ("reduce_scatter", 1, "reduce_scatter"),
    ("_reduce_scatter_base", 1, "reduce_scatter"),
    ("reduce_scatter_tensor_coalesced", 1, "reduce_scatter"),
    ("gather", 1, "gather"),
    ("scatter", 1, "scatter"),
    ("alltoall", 1, "alltoall"),
    ("alltoall_base", 1, "alltoall"),
    ("barrier", -1, "barrier"),
    # torch >= 2.10 single-tensor APIs (FSDP2 issues these)
    ("all_gather_single", 1, "allgather"),
    ("all_gather_single_coalesced", 1, "allgather"),
    ("reduce_scatter_single", 1, "reduce_scatter"),
    ("reduce_scatter_single_coalesced", 1, "reduce_scatter"),
    ("all_to_all_single", 1, "alltoall"),
)


_DTYPE_NAMES: dict[torch.dtype, str] = {}


def _dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
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


def _payload_info(obj: Any) -> tuple[int, str]:
    """(bytes, dtype) of a collective's payload; one tensor in a list is the fast path."""
    if type(obj) is list and len(obj) == 1 and isinstance(obj[0], torch.Tensor):
        t = obj[0]
        return t.numel() * t.element_size(), _dtype_name(t.dtype)
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
        """The future callback that stamps a collective's completion.

        It runs on the backend's worker thread (gloo) with the GIL, inline in the
        future's completion, so it must be as short as possible: one clock read
        and one append on success; the slow path only on failure.
        """
        put = self.put

        def _on_done(fut: Any) -> None:
            try:
                fut.value()
            except Exception as exc:  # noqa: BLE001 - a failed collective is evidence
                self.done(group, seq, False, str(exc))
                return
            put(("d", group, seq, _now(), True))

        return _on_done


class _RecordedWork(dist.Work):
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


def _global_ranks(pg: dist.ProcessGroup) -> list[int]:
    try:
        return list(dist.get_process_group_ranks(pg))
    except Exception:  # noqa: BLE001 - unregistered groups: assume identity
        return list(range(pg.size()))


class MonitoredProcessGroup(dist.ProcessGroup):
    """A process group that records every collective, then forwards it.

    Hand it to DDP/FSDP (``process_group=mon.wrap(pg)``) or let
    ``CollectiveMonitor`` install it in place of the default group. Attributes
    not defined here are forwarded to the wrapped group.
    """

    def __init__(self, pg: dist.ProcessGroup, recorder: Recorder, *, name: str | None = None,
                 ranks: Sequence[int] | None = None):
        super().__init__(pg.rank(), pg.size())
        self._inner = pg
        self._recorder = recorder
        self._name = name if name is not None else _group_name(pg)
        self._ranks = list(ranks) if ranks is not None else _global_ranks(pg)
        self._seq = itertools.count()
        self._p2p_seq: dict[tuple[int, int], itertools.count] = {}
        self._backend = _backend_name(pg)
        self._use_cuda_events = (self._backend == "nccl" and torch.cuda.is_available()
                                 and os.environ.get("TORCH_NCCL_BLOCKING_WAIT", "0") in ("", "0"))
        try:
            self._set_group_name(self._name)
        except Exception:  # noqa: BLE001 - cosmetic only
            pass
        self._share_backends(pg)

    def _share_backends(self, pg: dist.ProcessGroup) -> None:
        """Expose the wrapped group's backends (DDP's logger looks them up by name)."""
        for device_type in getattr(pg, "_device_types", []):
            try:
                device = torch.device(device_type)
                backend = pg._get_backend(device)
                kind = getattr(dist.ProcessGroup.BackendType, self._backend.upper(),
                               dist.ProcessGroup.BackendType.CUSTOM)
                self._register_backend(device, kind, backend)
            except Exception:  # noqa: BLE001 - optional; recording does not depend on it
                continue

    # -- identity ------------------------------------------------------------------
    @property
    def inner(self) -> dist.ProcessGroup:
        return self._inner

    @property
    def monitor_name(self) -> str:
        return self._name

    @property
    def global_ranks(self) -> list[int]:
        return list(self._ranks)

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return self._backend

    def name(self) -> str:
        return self._backend

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") or attr in ("_inner",):
            raise AttributeError(attr)
        return getattr(self._inner, attr)

    # -- recording -----------------------------------------------------------------
    # The per-collective path is deliberately flat: it runs for every DDP bucket and
    # FSDP shard, so each Python frame and allocation here is paid on every call.
    def _issue(self, method: str, op: str, payload: Any, args: tuple, kwargs: dict,
               group: str, seq_source: Any, peer: int | None) -> Any:
        if _OFF_THREADS and _get_ident() in _OFF_THREADS:
            return getattr(self._inner, method)(*args, **kwargs)
        rec = self._recorder
        injector = rec.injector
        if injector is not None:
            injector.before_issue(op, peer)
        seq = next(seq_source)
        nbytes, dtype = _payload_info(payload)
        rec.put(("i", group, seq, op, nbytes, dtype, _now(), rec.step, peer))
        if injector is not None:
            injector.after_arrival(op, peer)
        work = getattr(self._inner, method)(*args, **kwargs)
        if self._use_cuda_events:
            return self._track_cuda(work, group, seq)
        try:
            future = work.get_future()
        except RuntimeError:
            return self._wrap_p2p(work, group, seq)
        future.add_done_callback(rec.completion_callback(group, seq))
        return work

    def _track_cuda(self, work: Any, group: str, seq: int) -> Any:
        try:
            self._recorder.cuda_poller().track(work, group, seq)
        except Exception:  # noqa: BLE001 - fall back to the future
            self._use_cuda_events = False
            work.get_future().add_done_callback(self._recorder.completion_callback(group, seq))
        return work

    def _wrap_p2p(self, work: Any, group: str, seq: int) -> Any:
        rec = self._recorder
        return _RecordedWork(work, lambda ok, err: rec.done(group, seq, ok, err),
                             lambda: rec.put(("w", group, seq, _now())))

    def _p2p(self, method: str, op: str, tensors: Any, peer_group_rank: int, args: tuple) -> Any:
        me, peer = self._ranks[self.rank()], self._ranks[peer_group_rank]
        src, dst = (me, peer) if op == "send" else (peer, me)
        counter = self._p2p_seq.setdefault((src, dst), itertools.count())
        return self._issue(method, op, tensors, args, {}, f"{self._name}:p2p:{src}-{dst}",
                           counter, peer)

    def send(self, tensors: Any, dst: int, tag: int = 0) -> Any:
        return self._p2p("send", "send", tensors, dst, (tensors, dst, tag))

    def recv(self, tensors: Any, src: int, tag: int = 0) -> Any:
        return self._p2p("recv", "recv", tensors, src, (tensors, src, tag))

    def recv_anysource(self, tensors: Any, tag: int = 0) -> Any:
        """Not recorded: the peer is unknown until completion, so it cannot be matched."""
        return self._inner.recv_anysource(tensors, tag)

    def monitored_barrier(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner.monitored_barrier(*args, **kwargs)


def _make_collective(method: str, index: int, op: str) -> Callable[..., Any]:
    def collective(self: MonitoredProcessGroup, *args: Any, **kwargs: Any) -> Any:
        payload = args[index] if 0 <= index < len(args) else None
        return self._issue(method, op, payload, args, kwargs, self._name, self._seq, None)

    collective.__name__ = method
    collective.__doc__ = f"Record, then forward ``{method}`` to the wrapped group."
    return collective


for _method, _index, _op in _COLLECTIVES:
    setattr(MonitoredProcessGroup, _method, _make_collective(_method, _index, _op))


def _group_name(pg: dist.ProcessGroup) -> str:
    try:
        return str(c10d._get_process_group_name(pg))
    except Exception:  # noqa: BLE001
        return str(getattr(pg, "group_name", "") or id(pg))


def _backend_name(pg: dist.ProcessGroup) -> str:
    try:
        return str(dist.get_backend(pg))
    except Exception:  # noqa: BLE001
        try:
            return str(pg.getBackendName() if hasattr(pg, "getBackendName") else pg.name())
        except Exception:  # noqa: BLE001
            return "unknown"


def register_group(wrapper: MonitoredProcessGroup, *, as_default: bool = False) -> None:
    """Make ``dist.*(group=wrapper)`` and name look-ups reach the wrapper.

    With ``as_default`` it also replaces the default group, so DDP/FSDP built
    afterwards and plain ``dist.*`` calls go through it.
    """
    world = c10d._world
    inner = wrapper.inner
    world.pg_map[wrapper] = world.pg_map[inner]
    world.pg_names[wrapper] = world.pg_names[inner]
    world.pg_group_ranks[wrapper] = world.pg_group_ranks[inner]
    if inner in world.pg_backend_config:
        world.pg_backend_config[wrapper] = world.pg_backend_config[inner]
    if inner in world.pg_to_tag:
        world.pg_to_tag[wrapper] = world.pg_to_tag[inner]
    if as_default:
        world.default_pg = wrapper
    # Code that resolves groups by name in C++ (DeviceMesh, so FSDP2) must get the wrapper too.
    _native_register(world.pg_names[inner], wrapper)


def _native_register(name: str, pg: dist.ProcessGroup) -> None:
    try:
        from torch._C import _distributed_c10d as native

        native._unregister_process_group(name)
        native._register_process_group(name, pg)
    except Exception:  # noqa: BLE001 - older torch: Python-level registration still works
        pass


def unregister_group(wrapper: MonitoredProcessGroup) -> None:
    """Undo :func:`register_group`; restores the wrapped group as default if needed."""
    world = c10d._world
    try:
        if world.default_pg is wrapper:
            world.default_pg = wrapper.inner
    except Exception:  # noqa: BLE001 - the default group may be destroyed already
        pass
    name = world.pg_names.get(wrapper)
    if name is not None:
        _native_register(name, wrapper.inner)
    for mapping in (world.pg_map, world.pg_names, world.pg_group_ranks, world.pg_backend_config,
                    world.pg_to_tag):
        mapping.pop(wrapper, None)


class StackDumper:
    """Python stacks of every thread on demand, even while the training thread is blocked.

    faulthandler's C signal handler writes the stacks without needing the GIL;
    if the signal cannot be registered, ``faulthandler.dump_traceback`` from the
    requesting thread is the fallback.
    """

    def __init__(self, signum: int):
        self.signum = signum
        self._file = tempfile.TemporaryFile(mode="w+b", prefix="trainkit-stacks-")
        self._lock = threading.Lock()
        try:
            faulthandler.register(signum, file=self._file, all_threads=True, chain=False)
            self._registered = True
        except (RuntimeError, ValueError, OSError):
            self._registered = False

    def dump(self, timeout: float = 1.0) -> str:
        with self._lock:
            self._file.seek(0, os.SEEK_END)
            start = self._file.tell()
            if self._registered:
                os.kill(os.getpid(), self.signum)
                deadline = time.monotonic() + timeout
                size = start
                while time.monotonic() < deadline:
                    time.sleep(0.05)
                    self._file.seek(0, os.SEEK_END)
                    new = self._file.tell()
                    if new > start and new == size:
                        break
                    size = new
            else:
                faulthandler.dump_traceback(self._file, all_threads=True)
            self._file.seek(start)
            return self._file.read().decode(errors="replace")

    def close(self) -> None:
        if self._registered:
            try:
                faulthandler.unregister(self.signum)
            except (RuntimeError, ValueError):
                pass
        self._file.close()
