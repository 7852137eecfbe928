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
from collections.abc import Iterable
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


def _check_inputs(seconds: Iterable[tuple[str, float]], node_mtbf_s: float, nodes: int) -> None:
    for name, value in seconds:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value}")
    if not math.isfinite(node_mtbf_s) or node_mtbf_s <= 0:
        raise ValueError(f"node MTBF must be > 0 seconds, got {node_mtbf_s}")
    if nodes < 1:
        raise ValueError(f"node count must be >= 1, got {nodes}")


def advise(*, stall_s: float, persist_s: float, restore_s: float, detect_s: float,
           node_mtbf_s: float, nodes: int, commit_s: float | None = None) -> Advice:
    """The goodput-maximising checkpoint interval and the time it still loses.

    ``commit_s`` (save call to committed) defaults to ``persist_s``.
    """
    _check_inputs((("stall", stall_s), ("persist latency", persist_s),
                   ("restore time", restore_s), ("detection latency", detect_s)),
                  node_mtbf_s, nodes)
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


# -- the tiered model -------------------------------------------------------------------
#
# With a memory tier a checkpoint every step can be cheap, and what a failure costs
# depends on which tier survives it. Fault classes (``FAULT_MIX`` gives their default
# shares of all failures):
#
# - ``process``: a worker crashes or hangs, its node stays (``trainkit run`` restarts
#   the workers; the agent's /dev/shm memory tier survives);
# - ``reboot``: the node restarts (memory lost, its local disk kept);
# - ``node``: the node is lost or excluded (only a copy off the node survives).
#
# Every save stalls training once (``stall_s``) and lands on the fastest tier; the slower
# tiers receive background copies of those saves, which cost no stall but take their
# commit latency, so tier t holds a copy at most every ``max(tau_1, commit_t)`` seconds
# (a multiple of tau_1). A failure of class c restores from the fastest tier that
# survives c and loses, on average, half that tier's interval plus its commit latency
# (the newest copy was not yet durable), plus detection, restart and that tier's
# restore. With job MTBF M = node MTBF / nodes and class shares p_c:
#
#     waste(tau_1) = stall / tau_1
#                    + sum_c (p_c / M) * (tau_t(c) / 2 + commit_t(c) + detect + restart
#                                         + restore_t(c))
#
# tau_1 is minimised numerically (the slower tiers' intervals step with it) between the
# fastest tier's commit latency (and one step) and M; goodput = 1 - waste.

FAULT_CLASSES = ("process", "reboot", "node")
TIER_SURVIVES: dict[str, frozenset[str]] = {
    "memory": frozenset({"process"}),
    "local": frozenset({"process", "reboot"}),
    "persistent": frozenset(FAULT_CLASSES),
}
FAULT_MIX: dict[str, float] = {"process": 0.6, "reboot": 0.1, "node": 0.3}


@dataclass(frozen=True, kw_only=True, slots=True)
class TierCost:
    """One tier's costs: save-to-durable latency on it and the time to restore from it."""

    name: str
    commit_s: float
    restore_s: float


@dataclass(frozen=True, kw_only=True, slots=True)
class TieredAdvice:
    goodput: float
    job_mtbf_s: float
    intervals_s: dict[str, float]
    """Seconds between copies on each tier (the first: between saves)."""
    restores_s: dict[str, float]
    survives: dict[str, list[str]]
    """Fault classes each tier survives."""
    restored_from: dict[str, str]
    """Fault class -> the tier its restores come from."""
    terms: dict[str, float]
    """Fractions of wall time lost, by cause; they sum to 1 - goodput."""
    limiting: str
    """The largest term."""

    def to_dict(self) -> dict:
        return asdict(self)


def _tier_costs(tiers: list[TierCost], stall_s: float, detect_s: float, restart_s: float,
                rates: dict[str, float], best: dict[str, int], tau1: float
                ) -> tuple[dict[str, float], dict[str, float]]:
    intervals = {t.name: max(1.0, math.ceil(t.commit_s / tau1)) * tau1 if i else tau1
                 for i, t in enumerate(tiers)}
    terms = {"checkpoint stall": stall_s / tau1, "detection": 0.0, "restart": 0.0,
             "restore": 0.0}
    for cls, rate in rates.items():
        t = tiers[best[cls]]
        terms[f"recompute ({cls} faults, from {t.name})"] = rate * (intervals[t.name] / 2
                                                                   + t.commit_s)
        terms["detection"] += rate * detect_s
        terms["restart"] += rate * restart_s
        terms["restore"] += rate * t.restore_s
    return intervals, terms


def advise_tiers(*, tiers: list[TierCost], stall_s: float, detect_s: float, restart_s: float,
                 node_mtbf_s: float, nodes: int, step_s: float = 0.0,
                 mix: dict[str, float] | None = None,
                 interval_s: float | None = None) -> TieredAdvice:
    """The tiered model (comment above): intervals per tier and the goodput they give.

    ``tiers`` fastest first, named as in :data:`TIER_SURVIVES`; the last must survive
    every fault class of ``mix`` (a persistent tier). ``interval_s`` fixes the save
    interval instead of optimising it (to model a run as it was configured)."""
    mix = dict(FAULT_MIX if mix is None else mix)
    _check_inputs((("stall", stall_s), ("detection latency", detect_s),
                   ("restart time", restart_s), ("step time", step_s),
                   *((f"{t.name} commit latency", t.commit_s) for t in tiers),
                   *((f"{t.name} restore time", t.restore_s) for t in tiers)),
                  node_mtbf_s, nodes)
    if not tiers:
        raise ValueError("at least one tier is needed")
    unknown = [t.name for t in tiers if t.name not in TIER_SURVIVES]
    if unknown:
        raise ValueError(f"unknown tier {unknown[0]!r}; tiers are {', '.join(TIER_SURVIVES)}")
    if any(c not in FAULT_CLASSES or not (0 <= p <= 1) for c, p in mix.items()):
        raise ValueError(f"fault mix must give shares in [0, 1] of {FAULT_CLASSES}, got {mix}")
    best = {}
    for cls in mix:
        idx = next((i for i, t in enumerate(tiers) if cls in TIER_SURVIVES[t.name]), None)
        if idx is None:
            raise ValueError(f"no tier survives {cls} faults: add a persistent tier")
        best[cls] = idx
    mtbf = node_mtbf_s / nodes
    rates = {c: p / mtbf for c, p in mix.items()}
    low = max(tiers[0].commit_s, step_s, 1e-3)
    high = max(low * 1.0001, mtbf)
    grid = ([max(interval_s, 1e-6)] if interval_s is not None else
            [low * (high / low) ** (i / 600) for i in range(601)])
    tau1 = min(grid, key=lambda tau: sum(_tier_costs(tiers, stall_s, detect_s, restart_s,
                                                    rates, best, tau)[1].values()))
    intervals, terms = _tier_costs(tiers, stall_s, detect_s, restart_s, rates, best, tau1)
    return TieredAdvice(goodput=max(0.0, 1.0 - sum(terms.values())), job_mtbf_s=mtbf,
                        intervals_s=intervals, restores_s={t.name: t.restore_s for t in tiers},
                        survives={t.name: sorted(TIER_SURVIVES[t.name] & set(mix), key=
                                                 FAULT_CLASSES.index) for t in tiers},
                        restored_from={c: tiers[i].name for c, i in best.items()},
                        terms=terms, limiting=max(terms, key=terms.__getitem__))


def format_tiered(a: TieredAdvice) -> str:
    def dur(s: float) -> str:
        return f"{s:.2f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"

    lines = [f"job MTBF {dur(a.job_mtbf_s)}; modelled goodput {a.goodput:.4f}; "
             f"limited by: {a.limiting}",
             f"  {'tier':<11} {'every':>10} {'restore':>10}  survives"]
    for name, every in a.intervals_s.items():
        lines.append(f"  {name:<11} {dur(every):>10} {dur(a.restores_s[name]):>10}  "
                     f"{', '.join(a.survives[name])}")
    lines.append("  time lost, by cause:")
    for term, frac in sorted(a.terms.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {100 * frac:7.3f}%  {term}")
    return "\n".join(lines)


# -- costs measured by a trainkit run ---------------------------------------------------
TIER_ORDER = ("memory", "local", "persistent")


@dataclass(frozen=True, kw_only=True, slots=True)
class RunCosts:
    """What ``run_dir/goodput.json`` measured (``trainkit run``'s goodput accounting)."""

    stall_s: float | None
    tiers: list[TierCost]
    estimated_restores: list[str]
    """Tiers the run never restored from: their restore time is set to their commit
    latency (reading a copy back costs about what writing it did)."""
    detect_s: float | None
    restart_s: float | None
    step_s: float | None
    interval_s: float | None
    failures: int
    goodput: float
    steady_wall_s: float
    steady_productive_s: float


def _median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if isinstance(x, (int, float)))
    return xs[len(xs) // 2] if xs else None


def run_costs(run_dir: str) -> RunCosts:
    """The measured costs of a run from its ``goodput.json`` (ValueError, naming the
    file, when it is missing or lacks a field)."""
    import json
    from pathlib import Path

    from trainkit.rundir import GOODPUT_FILE

    path = Path(run_dir) / GOODPUT_FILE
    try:
        doc = json.loads(path.read_text())
        m = doc["measured"]
        bad = doc["badput_s"]
    except FileNotFoundError:
        raise ValueError(f"{path}: not found (goodput.json is written by `trainkit run` at "
                         f"the end of a job)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a goodput.json ({exc})") from None
    commit = m.get("commit_s") or {}
    restores: dict[str, list[float]] = {}
    for r in m.get("restores") or []:
        restores.setdefault(str(r.get("tier")), []).append(r.get("seconds"))
    tiers, estimated = [], []
    for name in TIER_ORDER:
        if name not in commit and name not in restores:
            continue
        c = commit.get(name)
        rs = _median(restores.get(name, []))
        if rs is None:
            estimated.append(name)
        c = c if c is not None else (rs or 0.0)
        tiers.append(TierCost(name=name, commit_s=float(c), restore_s=float(rs if rs is not None
                                                                            else c)))
    interval = None
    if m.get("ckpt_interval_steps") and m.get("step_s"):
        interval = m["ckpt_interval_steps"] * m["step_s"]
    steady = doc["wall_s"] - bad.get("startup", 0.0) - bad.get("shutdown", 0.0)
    return RunCosts(stall_s=m.get("ckpt_stall_s"), tiers=tiers, estimated_restores=estimated,
                    detect_s=_median(m.get("detection_s") or []),
                    restart_s=_median(m.get("restart_s") or []), step_s=m.get("step_s"),
                    interval_s=interval, failures=len(m.get("detection_s") or []),
                    goodput=doc.get("goodput", 0.0), steady_wall_s=steady,
                    steady_productive_s=doc.get("productive_s", 0.0))
