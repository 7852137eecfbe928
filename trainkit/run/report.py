"""What a training script may tell ``trainkit run`` (all optional, no-ops outside a run).

``trainkit run`` learns most of what it needs from the monitor and the Checkpointer,
which report on their own. A script that uses neither, or that knows something they
cannot see, reports it here::

    from trainkit.run.report import BAD_STEP_EXIT, report_bad_step, report_step

    for step in range(start, steps + 1):
        report_step(step)                     # progress: goodput, the restart-loop guard
        loss = train_step()
        if not math.isfinite(loss):
            report_bad_step(step, f"loss is {loss}")
            sys.exit(BAD_STEP_EXIT)           # trainkit run: this step is bad, not the node

A bad step is not a node fault: nobody is struck or excluded. When it comes back right
after a restore, the restored step is suspect and the next generation resumes from an
older one (``TRAINKIT_RESTORE_BEFORE``), see :mod:`trainkit.run.loops`.
"""

from __future__ import annotations

from trainkit.rundir import BAD_STEP_EXIT, report, report_step

__all__ = ["BAD_STEP_EXIT", "report_bad_step", "report_step"]


def report_bad_step(step: int, reason: str = "") -> None:
    """Say that step ``step`` went bad (a NaN loss, a loss spike), before exiting with
    :data:`BAD_STEP_EXIT`. Any rank may call it."""
    report("bad_step", step=int(step), reason=str(reason))
