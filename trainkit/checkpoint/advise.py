"""How often to checkpoint: Young/Daly's interval from measured costs.

With a checkpoint stall ``delta`` (training time lost per checkpoint) and a job MTBF
``M`` (node MTBF divided by the node count: any node failing stops the job), the time
lost per unit of wall time at checkpoint interval ``tau`` is

    waste(tau) = delta / tau + (tau / 2 + commit + detect + restore) / M

(the checkpoint overhead, plus per failure: half an interval of recomputation on
average, the checkpoint that was not yet committed, the time to notice the failure and
the time to restore). ``d waste / d tau = 0`` gives Young's ``tau = sqrt(2 * delta * M)``.
Daly's higher-order estimate is reported next to it. The interval is never shorter than
the persist latency: a new checkpoint cannot start before the previous one is durable
without piling up copies in host memory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True, kw_only=True, slots=True)
class Advice:
    interval_s: float
    """Recommended seconds between checkpoints (Young, clamped to the persist latency)."""
    daly_interval_s: float
    """Daly's higher-order optimum, for comparison."""
    job_mtbf_s: float
    fraction_lost: float
    """Expected fraction of wall time lost to checkpoints and failures at ``interval_s``."""
    checkpoint_fraction: float
    failure_fraction: float
    loss_per_failure_s: float
    clamped: bool
    """True when Young's interval was shorter than the persist latency."""

    def to_dict(self) -> dict[str, float | bool]:
        return asdict(self)


def waste(interval_s: float, *, stall_s: float, commit_s: float, detect_s: float,
          restore_s: float, job_mtbf_s: float) -> float:
    """Fraction of time lost at a given checkpoint interval (see the module docstring)."""
    return stall_s / interval_s + (interval_s / 2 + commit_s + detect_s + restore_s) / job_mtbf_s


def advise(*, stall_s: float, persist_s: float, restore_s: float, detect_s: float,
           node_mtbf_s: float, nodes: int, commit_s: float | None = None) -> Advice:
    """The goodput-maximising checkpoint interval and the time it still loses.

    ``commit_s`` (save call to committed) defaults to ``persist_s``.
    """
    for name, value in (("stall", stall_s), ("persist latency", persist_s),
                        ("restore time", restore_s), ("detection latency", detect_s)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value}")
    if not math.isfinite(node_mtbf_s) or node_mtbf_s <= 0:
        raise ValueError(f"node MTBF must be > 0 seconds, got {node_mtbf_s}")
    if nodes < 1:
        raise ValueError(f"node count must be >= 1, got {nodes}")
    commit = persist_s if commit_s is None else commit_s
    mtbf = node_mtbf_s / nodes
    young = math.sqrt(2 * stall_s * mtbf)
    if stall_s < 2 * mtbf:
        ratio = stall_s / (2 * mtbf)
        daly = math.sqrt(2 * stall_s * mtbf) * (1 + math.sqrt(ratio) / 3 + ratio / 9) - stall_s
    else:
        daly = mtbf
    interval = max(young, persist_s, 1e-9)
    per_failure = interval / 2 + commit + detect_s + restore_s
    ckpt_frac = stall_s / interval
    fail_frac = per_failure / mtbf
    return Advice(interval_s=interval, daly_interval_s=max(daly, persist_s), job_mtbf_s=mtbf,
                  fraction_lost=ckpt_frac + fail_frac, checkpoint_fraction=ckpt_frac,
                  failure_fraction=fail_frac, loss_per_failure_s=per_failure,
                  clamped=young < persist_s)


def format_advice(a: Advice) -> str:
    def dur(s: float) -> str:
        return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"

    lines = [f"job MTBF:                {dur(a.job_mtbf_s)}",
             f"checkpoint every:        {dur(a.interval_s)}"
             + ("  (clamped to the persist latency)" if a.clamped else "  (Young)"),
             f"Daly's estimate:         {dur(a.daly_interval_s)}",
             f"loss per failure:        {dur(a.loss_per_failure_s)}",
             f"expected time lost:      {100 * a.fraction_lost:.2f}%  "
             f"(checkpoints {100 * a.checkpoint_fraction:.2f}%, "
             f"failures {100 * a.failure_fraction:.2f}%)"]
    return "\n".join(lines)
