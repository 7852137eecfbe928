"""Per-rank recording of every collective: a ``dist.ProcessGroup`` wrapper.

Why a wrapper subclass: measured on torch 2.13 CPU, a Python subclass of
``torch.distributed.ProcessGroup`` that forwards to the real gloo (or NCCL)
group sees every collective DDP's C++ reducer and FSDP issue when it is handed
over as ``process_group=`` or installed as the default group, while
``_register_on_completion_hook`` is NCCL-only and a DDP comm hook sees only
bucket allreduces and takes the user's one hook slot.

Each call records the arrival (issue time, op, bytes, dtype, step, per-group sequence
number) and attaches the stamp of its completion, which depends on the backend (see
:mod:`trainkit.detect.recorder`). Fault injection (``trainkit.faults``) acts only here,
so groups trainkit creates for itself are never monitored nor injected.

Who calls what: ``CollectiveMonitor.install()`` (every rank, training thread) wraps the
default group and calls :func:`register_group`; from then on every collective the
training code, DDP or FSDP issues runs ``_issue`` on the issuing thread: injector
``before_issue`` -> record the arrival -> injector ``after_arrival`` -> forward -> attach
the completion stamp. ``CollectiveMonitor.close()`` calls :func:`unregister_group`.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from trainkit.detect.recorder import (_DTYPE_NAMES, RecordedWork, Recorder, _dtype_name,
                                      payload_info, stamp_done)

__all__ = ["MonitoredProcessGroup", "register_group", "unmonitored", "unregister_group"]

# Threads inside ``unmonitored()``: ident -> nesting depth. A plain dict rather than a
# threading.local because the hot path tests it on every collective, and an empty
# dict's truth test is the cheapest check there is.
_OFF_THREADS: dict[int, int] = {}
_get_ident = threading.get_ident
_now = time.time
_partial = functools.partial
_Tensor = torch.Tensor


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
        nbytes, dtype = payload_info(payload)
        rec.put(("i", group, seq, op, nbytes, dtype, _now(), rec.step, peer))
        if injector is not None:
            injector.after_arrival(op, peer)
        work = getattr(self._inner, method)(*args, **kwargs)
        if self._use_cuda_events:
            return self._track_cuda(work, group, seq)
        return self._stamp_completion(work, group, seq)

    def _stamp_completion(self, work: Any, group: str, seq: int) -> Any:
        """Stamp the work's completion: its future's callback, or (a gloo point-to-point
        work, which has no future) when the caller's ``wait()`` returns."""
        try:
            future = work.get_future()
        except RuntimeError:
            return self._wrap_p2p(work, group, seq)
        future.add_done_callback(_partial(stamp_done, self._recorder, group, seq))
        return work

    def _track_cuda(self, work: Any, group: str, seq: int) -> Any:
        try:
            self._recorder.cuda_poller().track(work, group, seq)
        except Exception:  # noqa: BLE001 - fall back to the future
            self._use_cuda_events = False
            work.get_future().add_done_callback(_partial(stamp_done, self._recorder, group, seq))
        return work

    def _wrap_p2p(self, work: Any, group: str, seq: int) -> Any:
        rec = self._recorder
        return RecordedWork(work, lambda ok, err: rec.done(group, seq, ok, err),
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
    """The recording override of ``method``.

    The common case (a gloo/NCCL collective, no fault injection, not inside
    ``unmonitored()``) is one flat frame: no call into ``_issue``, the one-tensor payload
    measured inline, the completion stamped by a ``functools.partial`` of a module-level
    function (no closure made per call). Everything else takes
    ``_issue``, which records the same events.
    """

    def collective(self: MonitoredProcessGroup, *args: Any, **kwargs: Any) -> Any:
        rec = self._recorder
        if (rec.injector is not None or self._use_cuda_events
                or (_OFF_THREADS and _get_ident() in _OFF_THREADS)):
            payload = args[index] if 0 <= index < len(args) else None
            return self._issue(method, op, payload, args, kwargs, self._name, self._seq, None)
        seq = next(self._seq)
        group = self._name
        payload = args[index] if 0 <= index < len(args) else None
        if type(payload) is list and len(payload) == 1 and type(tensor := payload[0]) is _Tensor:
            nbytes, dtype = tensor.nbytes, _DTYPE_NAMES.get(tensor.dtype) or _dtype_name(tensor.dtype)
        else:
            nbytes, dtype = payload_info(payload)
        rec.put(("i", group, seq, op, nbytes, dtype, _now(), rec.step, None))
        return self._stamp_completion(getattr(self._inner, method)(*args, **kwargs), group, seq)

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
