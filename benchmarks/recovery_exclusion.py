"""The exclusion case of ``recovery_bench.py``: a node hangs and is excluded.

The drill's shape (3 simulated nodes x 2 gloo ranks, examples/train.py, 0.3 s steps,
checkpoints every 4 steps in the memory tier), a hang injected on node2. Two figures per
run, from the run's own records:

- *time lost*: from the fault until training is back at the fault's step on the two
  remaining nodes (recomputation included);
- *decision to first step*: from the coordinator's decision (``decided`` in the decision
  event) until the first step after the restart is done.

Arms, interleaved run by run: ``warm`` (default ``trainkit run``: the survivors' warm
pools take the restart) and ``cold`` (``--no-warm-start``: a fresh torchrun per node).

    python benchmarks/recovery_bench.py --case exclusion [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

__all__ = ["exclusion_case", "exclusion_markdown"]


def exclusion_run(cfg: argparse.Namespace, work: Path, *, warm: bool) -> dict:
    """One run of the exclusion case; its figures, or ``ok: False`` with why."""
    from recovery_bench import TRAIN, _env, _progress, _run

    progress = work / "progress.jsonl"
    fault_step = cfg.exclusion_fault_step
    cmd = [sys.executable, "-m", "trainkit", "run", "--run-dir", str(work), "--local-nodes", "3",
           "--exclude-after", "1", "--max-restarts", "2",
           *([] if warm else ["--no-warm-start"]), "--",
           "--nnodes=2:3", f"--nproc-per-node={cfg.exclusion_nproc}", "--monitor-interval=0.1",
           str(TRAIN), "--steps", str(fault_step + 12), "--ckpt-every", "4",
           "--keep-in-memory", "2", "--ckpt-dir", str(work / "ckpt"),
           "--progress-log", str(progress), "--step-delay", "0.3"]
    rc, wall = _run(cmd, _env(work, TRAINKIT_FAULT=f"node=2,step={fault_step},kind=hang"),
                    timeout=600)
    events = [json.loads(x) for x in (work / "events.jsonl").read_text().splitlines()] \
        if (work / "events.jsonl").exists() else []
    markers = sorted((work / "faults").glob("*.json"))
    decision = next((e for e in events if e["event"] == "decision"), None)
    gen1 = next((e for e in events if e["event"] == "generation_start" and e["gen"] == 1), None)
    if rc != 0 or not markers or decision is None or gen1 is None:
        return {"ok": False, "rc": rc, "work": str(work)}
    t_fault = min(json.loads(m.read_text())["time"] for m in markers)
    rows = [r for r in _progress(progress) if r["generation"] == "1"]
    back = next((r for r in rows if r["step"] >= fault_step), None)
    if not rows or back is None:
        return {"ok": False, "rc": rc, "work": str(work)}
    decided = decision.get("decided", decision["time"])
    return {"ok": True, "path": gen1.get("path"), "lost_s": back["time"] - t_fault,
            "detect_s": decided - t_fault,
            "decision_to_first_step_s": rows[0]["time"] - decided,
            "decision_event_to_first_step_s": rows[0]["time"] - decision["time"],
            "excluded": decision.get("exclude"), "world_after": rows[0]["world"],
            "steps_recomputed": fault_step - rows[0]["step"], "wall_s": wall}


def exclusion_case(cfg: argparse.Namespace, root: Path) -> dict:
    """``cfg.repeats`` runs of each arm, interleaved; medians per arm."""
    runs: dict[str, list[dict]] = {"warm": [], "cold": []}
    for i in range(cfg.repeats):
        for arm in ("warm", "cold"):
            r = exclusion_run(cfg, root / f"exclusion-{arm}-{i}", warm=arm == "warm")
            runs[arm].append(r)
            print(f"exclusion {arm} #{i}: {json.dumps(r)}", flush=True)
    medians: dict[str, dict] = {}
    for arm, rs in runs.items():
        ok = [r for r in rs if r["ok"]]
        medians[arm] = {"runs": len(rs), "ok": len(ok),
                        "paths": sorted({str(r["path"]) for r in ok})}
        for key in ("lost_s", "detect_s", "decision_to_first_step_s",
                    "decision_event_to_first_step_s"):
            medians[arm][key] = statistics.median(r[key] for r in ok) if ok else None
    return {"runs": runs, "medians": medians}


def exclusion_markdown(out: dict) -> str:
    m = out["medians"]
    lines = ["| arm | runs ok | restart path | time lost (s) | fault to decision (s) | "
             "decision to first step (s) | decision event to first step (s) |",
             "|---|---|---|---|---|---|---|"]

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    for arm in ("warm", "cold"):
        a = m[arm]
        lines.append(f"| {arm} | {a['ok']}/{a['runs']} | {', '.join(a['paths'])} | "
                     f"{f(a['lost_s'])} | {f(a['detect_s'])} | "
                     f"{f(a['decision_to_first_step_s'])} | "
                     f"{f(a['decision_event_to_first_step_s'])} |")
    w, c = m["warm"]["decision_to_first_step_s"], m["cold"]["decision_to_first_step_s"]
    if w and c:
        lines += ["", f"- decision to first step, cold / warm: **{c / w:.2f}x**; time lost "
                      f"cold / warm: **{m['cold']['lost_s'] / m['warm']['lost_s']:.2f}x**"]
    return "\n".join(lines)
