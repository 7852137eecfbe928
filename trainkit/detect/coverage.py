"""No silent blind spots: say when collectives escape the monitor.

Why: the monitor sees a collective only when it goes through a monitored group wrapper.
A DDP model built before ``CollectiveMonitor.start()`` holds the raw default group, so
its gradient allreduces are invisible: a 3x straggler went unreported for 400 steps and
nothing said why. This module finds such blind spots and reports each one once, as a
``RuntimeWarning`` that names the module or group and the fix, and as a ``coverage``
note in ``diagnosis.jsonl`` (:func:`trainkit.rundir.append_note`), which ``trainkit
diagnose`` lists with the findings.

Three checks, installed by :meth:`CollectiveMonitor.start` on every rank when it records:

- at start: every live DDP / FSDP module (found through ``gc``) whose
  ``process_group`` is not a monitored wrapper;
- afterwards: a DDP / FSDP module constructed on an unwrapped group;
- a ``torch.distributed`` collective called with ``group=`` an unwrapped group. Groups
  trainkit creates for itself (called from a trainkit module) are not blind spots;
  each group is judged once, so the per-call cost is one dictionary look-up.

A note is written by one rank per blind spot (rank 0 of the group), so a job's
diagnosis has one line per blind spot, not one per rank.
"""

from __future__ import annotations

import gc
import inspect
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from trainkit import rundir
from trainkit.detect.auto import _called_from_trainkit

__all__ = ["FIX", "check_modules", "install", "report"]

FIX = ("build DDP/FSDP after CollectiveMonitor.start(), pass process_group=mon.wrap(pg), "
       "or run the script under `trainkit run`, which monitors every group from "
       "init_process_group on")

_COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor",
                "all_gather_object", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
                "all_to_all_single", "gather", "scatter", "barrier", "send", "recv", "isend",
                "irecv", "broadcast_object_list", "_all_gather_base", "_reduce_scatter_base")

_state: dict[str, Any] = {"installed": False, "monitor": None, "reported": set(),
                          "judged": {}}


def _is_monitored(pg: Any) -> bool:
    from trainkit.detect.probe import MonitoredProcessGroup

    return isinstance(pg, MonitoredProcessGroup)


def _judged_ok(pg: Any) -> bool:
    """Trainkit's own group, or monitored: never a blind spot (judged once per group)."""
    return _is_monitored(pg) or _called_from_trainkit(depth=4)


def _group_label(pg: Any) -> str:
    import torch.distributed.distributed_c10d as c10d

    try:
        if pg is c10d._world.default_pg or (_is_monitored(c10d._world.default_pg)
                                             and pg is c10d._world.default_pg.inner):
            return "the default group (WORLD)"
    except Exception:  # noqa: BLE001 - default group gone
        pass
    try:
        name = c10d._get_process_group_name(pg)
    except Exception:  # noqa: BLE001
        name = str(id(pg))
    try:
        ranks = c10d.get_process_group_ranks(pg)
    except Exception:  # noqa: BLE001
        ranks = None
    return f"group {name!r}" + (f" (ranks {list(ranks)})" if ranks is not None else "")


def _module_groups(obj: Any) -> list[tuple[str, Any]]:
    """(description, process group) of a DDP / FSDP / FSDP2 module; empty for others."""
    out: list[tuple[str, Any]] = []
    cls = type(obj).__name__
    inner = getattr(obj, "module", None)
    what = f"{cls}({type(inner).__name__})" if inner is not None else cls
    pg = getattr(obj, "process_group", None)
    if pg is not None and cls in ("DistributedDataParallel", "FullyShardedDataParallel"):
        out.append((what, pg))
        return out
    state = getattr(obj, "_get_fsdp_state", None)      # FSDP2: fully_shard(module)
    if callable(state):
        try:
            group = state()._fsdp_param_group
            mesh = group.mesh_info.mesh
            out.append((f"fully_shard({cls})", mesh.get_group()))
        except Exception:  # noqa: BLE001 - no parameters, or a torch without these names
            pass
    return out


def check_modules() -> list[tuple[str, str]]:
    """(module, group) of every live DDP/FSDP module built on an unwrapped group."""
    if "torch.nn.parallel" not in sys.modules and "torch.distributed.fsdp" not in sys.modules:
        return []
    from torch import nn

    out = []
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance reads __class__, which some torch objects
        # (deprecated lazy names) answer with a FutureWarning
        if issubclass(type(obj), nn.Module):
            for what, pg in _module_groups(obj):
                if not _is_monitored(pg):
                    out.append((what, _group_label(pg)))
    return out


def report(kind: str, subject: str, group: str, *, note_rank: bool) -> None:
    """Warn once per blind spot; write the ``coverage`` note when ``note_rank``."""
    key = (kind, subject, group)
    if key in _state["reported"]:
        return
    _state["reported"].add(key)
    mon = _state["monitor"]
    if kind == "module":
        text = (f"trainkit.detect: {subject} was built on {group}, which the monitor does not "
                f"see: its collectives go unrecorded (no hang, straggler or slow-link finding "
                f"can name it). Fix: {FIX}")
    else:
        text = (f"trainkit.detect: a collective ({subject}) ran on {group}, which the monitor "
                f"does not see: it goes unrecorded. Fix: create the group after "
                f"CollectiveMonitor.start() and pass mon.wrap(group), or run under "
                f"`trainkit run`")
    warnings.warn(text, RuntimeWarning, stacklevel=3)
    if not note_rank or mon is None:
        return
    host, local_rank, attempt, _ = rundir.local_identity()
    rank = mon.recorder.rank if mon.recorder is not None else 0
    note = rundir.Finding(time=time.time(), cls="coverage", ranks=(rank,), hosts=(host,),
                          ids=({"rank": rank, "host": host, "local_rank": local_rank,
                                "attempt": attempt},), group=group,
                          evidence={"blind_spot": kind, "subject": subject, "message": text},
                          confidence=1.0)
    try:
        rundir.append_note(Path(mon.run_dir), note)
    except OSError:
        pass


def _group_rank0(pg: Any) -> bool:
    try:
        return pg.rank() == 0
    except Exception:  # noqa: BLE001
        return True


def _judge(pg: Any, op: str) -> None:
    """First sight of an unwrapped group in a collective: trainkit's own, or a blind spot."""
    ok = _judged_ok(pg)
    _state["judged"][id(pg)] = pg       # holds it, so the id is never reused meanwhile
    if not ok:
        report("collective", op, _group_label(pg), note_rank=_group_rank0(pg))


def _watch(fn: Any) -> Any:
    try:
        index = list(inspect.signature(fn).parameters).index("group")
    except (ValueError, TypeError):
        return fn
    judged = _state["judged"]

    def collective(*args: Any, **kwargs: Any) -> Any:
        pg = args[index] if len(args) > index else kwargs.get("group")
        if pg is not None and id(pg) not in judged:
            _judge(pg, fn.__name__)
        return fn(*args, **kwargs)

    collective.__name__, collective.__doc__ = fn.__name__, fn.__doc__
    collective.__wrapped__ = fn  # type: ignore[attr-defined]
    collective.__module__ = fn.__module__
    return collective


def _watch_constructor(cls: Any) -> None:
    init = cls.__init__
    if getattr(init, "_trainkit_coverage", False):
        return

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N807
        init(self, *args, **kwargs)
        if _state["monitor"] is None:
            return
        for what, pg in _module_groups(self):
            if not _is_monitored(pg):
                report("module", what, _group_label(pg), note_rank=_group_rank0(pg))

    __init__._trainkit_coverage = True  # type: ignore[attr-defined]
    __init__.__wrapped__ = init  # type: ignore[attr-defined]
    cls.__init__ = __init__


def install(monitor: Any) -> None:
    """Check the live modules now and watch what comes later (module docstring)."""
    _state["monitor"] = monitor
    for what, group in check_modules():
        report("module", what, group, note_rank=monitor.recorder.rank == 0)
    if _state["installed"]:
        return
    _state["installed"] = True
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    for name in _COLLECTIVES:
        fn = getattr(c10d, name, None)
        if fn is None:
            continue
        wrapped = _watch(fn)
        for module in (c10d, dist):
            if getattr(module, name, None) is fn:
                setattr(module, name, wrapped)
    from torch.nn.parallel import DistributedDataParallel

    _watch_constructor(DistributedDataParallel)
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and hasattr(fsdp, "FullyShardedDataParallel"):
        _watch_constructor(fsdp.FullyShardedDataParallel)


def uninstall_monitor(monitor: Any) -> None:
    """The monitor closed: later constructions are not judged against it."""
    if _state["monitor"] is monitor:
        _state["monitor"] = None
