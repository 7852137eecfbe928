"""Zero-code monitoring: a :class:`CollectiveMonitor` for a script that never imports trainkit.

Why: most scripts brought to ``trainkit run`` call ``init_process_group``, build DDP or
FSDP right away and train. Asking them to add a monitor (and to build DDP after its
``start()``) left them unmonitored. :func:`install` patches, in this process only:

- ``init_process_group``: once it returns, a monitor starts and wraps the default group,
  so DDP/FSDP built anywhere afterwards, and plain ``dist.*`` calls, are recorded;
- ``new_group``: a group the script creates later comes back wrapped
  (:meth:`CollectiveMonitor.wrap`); groups trainkit creates for itself (the link probe,
  the checkpointer) are recognised by the caller's module and left alone;
- ``destroy_process_group``: the monitor says goodbye first, so a clean exit is not
  mistaken for a crash;
- the global optimizer step post-hook
  (``torch.optim.optimizer.register_optimizer_step_post_hook``): every ``step()`` of the
  first optimizer that steps marks the start of the next training step, which is the
  clock of the per-step evidence and of ``TRAINKIT_FAULT``'s ``step=``. A script that
  calls ``mon.step()`` itself owns the clock: the hook stands down from then on.

A script that does create its own ``CollectiveMonitor`` shares this one
(:meth:`CollectiveMonitor.start` adopts the active monitor), so nothing is recorded twice.

Who calls what: ``trainkit.run.boot`` calls :func:`install` once, in every worker, before
it runs the user's script. Everything here runs on the training thread.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from trainkit import rundir

__all__ = ["AUTO_MONITOR_ENV", "active_monitor", "install", "installed"]

AUTO_MONITOR_ENV = rundir.AUTO_MONITOR_ENV

_state: dict[str, Any] = {"installed": False, "monitor": None, "optimizer": None, "steps": 0,
                          "hook": None}


def installed() -> bool:
    return bool(_state["installed"])


def active_monitor() -> Any:
    """The monitor :func:`install` started, or None."""
    return _state["monitor"]


# Trainkit modules that sit on every stack of a monitored script, or that only forward.
_PASS_THROUGH = frozenset({__name__, "trainkit.detect.coverage", "trainkit.run.boot",
                           "trainkit.run.warm"})


def _called_from_trainkit(depth: int = 2) -> bool:
    """Whether a trainkit module is on the caller's stack (the bootstrap that runs the
    script and these wrappers aside): its groups are trainkit's own and are never
    monitored nor injected."""
    frame = sys._getframe(depth)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.startswith("trainkit.") and name not in _PASS_THROUGH:
            return True
        frame = frame.f_back
    return False


def _start_monitor() -> None:
    if _state["monitor"] is not None:
        return
    from trainkit.detect.monitor import CollectiveMonitor

    mon = CollectiveMonitor()
    if os.environ.get(rundir.NODE_ENV) and not os.environ.get(rundir.AGGREGATOR_ENV):
        # trainkit run --no-detect: fault injection only, never a self-started aggregator
        # (outside trainkit run, rank 0 starts one, as for any CollectiveMonitor)
        mon.enabled = False
    try:
        mon.start()
    except Exception as exc:  # noqa: BLE001 - never fail training over monitoring
        from trainkit.faults import FaultSpecError

        if isinstance(exc, FaultSpecError):
            raise
        warnings.warn(f"trainkit: zero-code monitoring did not start ({exc}); training "
                      "continues unmonitored", RuntimeWarning, stacklevel=3)
        return
    _state["monitor"] = mon


def _step_hook(optimizer: Any, args: Any, kwargs: Any) -> None:
    mon = _state["monitor"]
    if mon is None or mon.recorder is None or mon.recorder.explicit_steps:
        return
    if _state["optimizer"] is None:
        _state["optimizer"] = optimizer
    elif _state["optimizer"] is not optimizer:
        return            # a second optimizer steps in the same step: count one
    _state["steps"] += 1
    mon.auto_step(_state["steps"])


def install() -> None:
    """Patch ``torch.distributed`` and register the optimizer hook (module docstring).

    Idempotent. Call before the script imports anything that binds
    ``init_process_group`` by name (``from torch.distributed import init_process_group``
    binds the patched function when it runs after this).
    """
    if _state["installed"]:
        return
    _state["installed"] = True
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d
    import torch.optim.optimizer as optim

    orig_init, orig_new, orig_destroy = (c10d.init_process_group, c10d.new_group,
                                         c10d.destroy_process_group)

    def init_process_group(*args: Any, **kwargs: Any) -> Any:
        out = orig_init(*args, **kwargs)
        _start_monitor()
        return out

    def new_group(*args: Any, **kwargs: Any) -> Any:
        pg = orig_new(*args, **kwargs)
        mon = _state["monitor"]
        if (mon is None or not mon.recording or not isinstance(pg, dist.ProcessGroup)
                or _called_from_trainkit()):
            return pg
        return mon.wrap(pg)

    def destroy_process_group(*args: Any, **kwargs: Any) -> Any:
        mon = _state["monitor"]
        if mon is not None and (not args or args[0] is None) and not kwargs.get("group"):
            _state["monitor"] = None
            mon.close()
        return orig_destroy(*args, **kwargs)

    for fn in (init_process_group, new_group, destroy_process_group):
        fn.__wrapped__ = getattr(c10d, fn.__name__)  # type: ignore[attr-defined]
        fn.__doc__ = getattr(c10d, fn.__name__).__doc__
        fn.__module__ = "torch.distributed.distributed_c10d"
        for module in (c10d, dist):
            setattr(module, fn.__name__, fn)
    mesh = sys.modules.get("torch.distributed.device_mesh")
    for name, fn in (("init_process_group", init_process_group), ("new_group", new_group)):
        if mesh is not None and hasattr(mesh, name):
            setattr(mesh, name, fn)
    _state["hook"] = optim.register_optimizer_step_post_hook(_step_hook)
