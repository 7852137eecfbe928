"""The fault drill: a hang on one node, detected, isolated, restarted and resumed.

``trainkit run --drill`` (or ``examples/fault_drill.sh``) runs 3 nodes x 2 processes on
this machine, training ``examples/train.py`` with frequent checkpoints, injects a hang
on node 2 and lets trainkit do the rest: the detector names node 2, the policy excludes
it, the job restarts on the 2 remaining nodes, resumes from the newest committed
checkpoint and finishes. It then prints the recovery timeline from the run's own
records (the fault marker, ``events.jsonl`` and the training progress log).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainkit.rundir import FAULT_ENV, read_fault_markers, read_jsonl
from trainkit.run.events import read_events
from trainkit.run.launcher import RunOptions, run_job

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "examples" / "train.py"


@dataclass(frozen=True, kw_only=True, slots=True)
class Timeline:
    """Seconds since the fault, and the steps it cost."""

    fault_time: float | None
    fault_step: int | None
    detection_s: float | None
    isolation_s: float | None
    restart_s: float | None
    first_step_s: float | None
    resumed_step: int | None
    caught_up_s: float | None
    steps_lost: int | None
    culprits: tuple[str, ...]
    excluded: tuple[str, ...]
    finished: bool
    decision_to_first_step_s: float | None = None   # the decision to the first step done
    restarts: tuple[tuple[int, str], ...] = ()      # (generation, "warm" | "cold") per restart


def build_timeline(run_dir: Path, progress_log: Path) -> Timeline:
    """Assemble the recovery timeline from the records a drill run leaves behind."""
    markers = [m for m in read_fault_markers(run_dir) if "time" in m]
    fault = min(markers, key=lambda m: m["time"]) if markers else None
    events = read_events(run_dir)
    t0 = fault["time"] if fault else None

    def first(pred) -> dict[str, Any] | None:
        return next((e for e in events if pred(e)), None)

    finding = first(lambda e: e["event"] == "finding")
    decision = first(lambda e: e["event"] == "decision" and e.get("action") != "continue")
    restart = first(lambda e: e["event"] == "generation_start" and e.get("gen", 0) >= 1)
    done = first(lambda e: e["event"] == "done")
    losses = read_jsonl(progress_log)
    after = [r for r in losses if restart and r.get("time", 0) >= restart["time"]]
    resumed = after[0] if after else None
    fault_step = fault.get("step") if fault else None
    decided = decision.get("decided", decision["time"]) if decision else None
    caught = next((r for r in after if fault_step is not None and r["step"] >= fault_step), None)

    def rel(e: dict[str, Any] | None) -> float | None:
        return None if e is None or t0 is None else e["time"] - t0

    return Timeline(
        fault_time=t0, fault_step=fault_step, detection_s=rel(finding), isolation_s=rel(decision),
        restart_s=rel(restart), first_step_s=rel(resumed),
        resumed_step=resumed["step"] if resumed else None, caught_up_s=rel(caught),
        steps_lost=(fault_step - resumed["step"]) if resumed and fault_step is not None else None,
        culprits=tuple(decision.get("culprits", ())) if decision else (),
        excluded=tuple(decision.get("exclude", ())) if decision else (),
        finished=done is not None,
        decision_to_first_step_s=(resumed["time"] - decided) if resumed and decided else None,
        restarts=tuple((e["gen"], e.get("path") or ("warm" if e.get("warm") else "cold"))
                       for e in events if e["event"] == "generation_start" and e.get("gen")))


def format_timeline(t: Timeline) -> str:
    def s(v: float | None) -> str:
        return "   n/a" if v is None else f"{v:+7.2f} s"

    rows = [
        ("fault injected", s(0.0 if t.fault_time else None), f"hang at step {t.fault_step}"),
        ("detected", s(t.detection_s), "finding in diagnosis.jsonl"),
        ("isolated", s(t.isolation_s), f"culprit {', '.join(t.culprits) or '?'}; "
                                       f"excluded {', '.join(t.excluded) or 'none'}"),
        ("restarted", s(t.restart_s), "next torchrun generation launched"),
        ("first step after resume", s(t.first_step_s), f"step {t.resumed_step}"),
        ("back at the fault's step", s(t.caught_up_s), f"steps recomputed: {t.steps_lost}"),
        ("decision to first step", "   n/a" if t.decision_to_first_step_s is None else
         f"{t.decision_to_first_step_s:7.2f} s", "restart path: " + (", ".join(
             f"gen {g} ({path})" for g, path in t.restarts) or "none")),
    ]
    width = max(len(r[0]) for r in rows)
    lines = ["recovery timeline (seconds after the fault):"]
    lines += [f"  {name:<{width}}  {when}   {what}" for name, when, what in rows]
    lines.append(f"  job finished: {'yes' if t.finished else 'NO'}")
    return "\n".join(lines)


def run_drill(run_dir: Path, *, steps: int = 40, ckpt_every: int = 4, fault_step: int = 14,
              hang_timeout: float | str = "auto", fault_node: int = 2,
              step_delay: float = 0.3) -> int:
    """Run the drill; 0 when node ``fault_node`` was named, excluded, and training finished."""
    run_dir = run_dir.resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"drill: {run_dir} is not empty; pass a fresh --run-dir")
    progress_log = run_dir / "progress.jsonl"
    os.environ[FAULT_ENV] = f"node={fault_node},step={fault_step},kind=hang"
    torchrun_argv = ["--nnodes=2:3", "--nproc-per-node=2", "--monitor-interval=0.1",
                     str(TRAIN_SCRIPT), "--steps", str(steps), "--ckpt-every", str(ckpt_every),
                     "--ckpt-dir", str(run_dir / "ckpt"), "--progress-log", str(progress_log),
                     "--detect", "--step-delay", str(step_delay)]
    opts = RunOptions(run_dir=run_dir, local_nodes=3, exclude_after=1, max_restarts=2,
                      hang_timeout=hang_timeout)
    print(f"drill: 3 nodes x 2 processes, hang injected on node{fault_node} at step "
          f"{fault_step} ({FAULT_ENV}={os.environ[FAULT_ENV]})", flush=True)
    rc = run_job(opts, torchrun_argv)
    timeline = build_timeline(run_dir, progress_log)
    print(format_timeline(timeline), flush=True)
    ok = (rc == 0 and timeline.finished and timeline.excluded == (f"node{fault_node}",))
    if not ok:
        print(f"drill FAILED (exit code {rc}); see {run_dir}/events.jsonl", file=sys.stderr)
        return 1
    print(f"drill passed: node{fault_node} was named and excluded; the job resumed on 2 nodes "
          f"and finished. Records in {run_dir}", flush=True)
    return 0
