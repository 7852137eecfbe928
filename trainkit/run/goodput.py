"""Goodput accounting: where the wall-clock time of a ``trainkit run`` job went.

Pure computation over a run directory: ``events.jsonl`` (the coordinator's decisions),
``reports.jsonl`` (what workers report: steps, checkpoint stalls, commits, restores;
see :func:`trainkit.rundir.report`) and ``faults/`` (when an injected fault fired). The
coordinator writes the result to ``run_dir/goodput.json`` just before its final event;
``trainkit goodput`` prints it and the metrics endpoint serves its ratio.

The job's wall time, from the first event to the last, is cut into intervals, each of
one category, so the parts add up to the wall time exactly. Per generation ``g``::

    generation_start ... first step ... last progress ... decided ... next generation_start
    |<- startup/restart ->|<-- productive -->|<-- detection -->|<-- restart -->|
         (restore inside: checkpoint)   (stalls: checkpoint; progress lost: recompute)

- ``startup``: before the first step of generation 0 (agents, torchrun, imports,
  rendezvous, model build), less the restore.
- ``checkpoint``: time training waited for checkpoints: ``save()`` stalls and the lazy
  copy's wait in the optimizer hook, plus restores (``checkpoint_detail`` splits them).
- ``detection``: from the last progress a worker reported (or an injected fault firing,
  when later) to the coordinator's decision.
- ``restart``: from the decision to the first step of the next generation: stopping the
  workers, the new torchrun, imports and rendezvous, less the restore.
- ``recompute``: progress lost: the time a failed generation spent past the step the next
  one restored (the steps it must train again).
- ``shutdown``: after the last step of the final generation (the last save's persist,
  process exit) and after a decision to give up.

Without step reports (a script with neither the monitor, zero-code monitoring nor
:func:`trainkit.run.report.report_step`) a generation's time counts as productive from
its start to its end: the split is then coarse, and ``step_reports`` says so.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainkit.rundir import (EVENTS_FILE, GOODPUT_FILE, REPORTS_FILE, read_fault_markers,
                             read_jsonl)

__all__ = ["BADPUT", "Goodput", "compute", "compute_run", "write_goodput"]

BADPUT = ("startup", "checkpoint", "detection", "restart", "recompute", "shutdown")
FINAL_EVENTS = ("done", "give_up", "interrupted")


@dataclass(kw_only=True)
class Goodput:
    """The breakdown; ``to_json()`` is the contract of ``goodput.json``."""

    wall_s: float
    productive_s: float
    badput_s: dict[str, float]
    checkpoint_detail: dict[str, float]
    segments: list[tuple[float, float, str, int | None]]
    generations: list[dict[str, Any]]
    measured: dict[str, Any]
    complete: bool
    step_reports: int
    start_time: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def goodput(self) -> float:
        return self.productive_s / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        r = lambda v: round(float(v), 4)  # noqa: E731
        return {"wall_s": r(self.wall_s), "productive_s": r(self.productive_s),
                "badput_s": {k: r(v) for k, v in self.badput_s.items()},
                "goodput": round(self.goodput, 5),
                "checkpoint_detail": {k: r(v) for k, v in self.checkpoint_detail.items()},
                "complete": self.complete, "step_reports": self.step_reports,
                "start_time": self.start_time,
                "generations": self.generations, "measured": self.measured,
                "segments": [[r(a - self.start_time), r(b - self.start_time), c, g]
                             for a, b, c, g in self.segments], **self.extra}


def _clamp(v: float, lo: float, hi: float) -> float:
    return min(max(v, lo), hi)


def _gen_of(record: Mapping[str, Any]) -> int | None:
    g = record.get("gen", record.get("attempt"))
    return g if isinstance(g, int) and not isinstance(g, bool) else None


def compute(events: Sequence[Mapping[str, Any]], reports: Sequence[Mapping[str, Any]] = (),
            markers: Sequence[Mapping[str, Any]] = (), *, now: float | None = None) -> Goodput:
    """The breakdown of one run from its parsed files (module docstring).

    ``now`` ends an unfinished run (default: the newest time in the files)."""
    events = [e for e in events if isinstance(e.get("time"), (int, float))]
    reports = [r for r in reports if isinstance(r.get("time"), (int, float))]
    if not events:
        return Goodput(wall_s=0.0, productive_s=0.0, badput_s={k: 0.0 for k in BADPUT},
                       checkpoint_detail={"save": 0.0, "restore": 0.0}, segments=[],
                       generations=[], measured={}, complete=False, step_reports=0)
    t0 = events[0]["time"]
    final = next((e for e in events if e["event"] in FINAL_EVENTS), None)
    latest = max([e["time"] for e in events] + [r["time"] for r in reports])
    t_end = final["time"] if final is not None else (now if now is not None else latest)
    starts = {e["gen"]: e["time"] for e in events if e["event"] == "generation_start"}
    gens = sorted(starts)
    by_gen: dict[int, list[Mapping[str, Any]]] = {}
    for r in reports:
        g = _gen_of(r)
        if g is not None:
            by_gen.setdefault(g, []).append(r)
    decided: dict[int, float] = {}      # generations a fault ended: when it was decided
    for e in events:
        if e["event"] == "decision" and e.get("action") != "continue" and e.get("gen") in starts:
            decided.setdefault(e["gen"], float(e.get("decided", e["time"])))

    segments: list[tuple[float, float, str, int | None]] = []

    def add(a: float, b: float, cat: str, g: int | None) -> None:
        if b > a:
            segments.append((a, b, cat, g))

    add(t0, starts[gens[0]] if gens else t_end, "startup", None)
    per_gen: list[dict[str, Any]] = []
    restores: list[dict[str, Any]] = []
    detections: list[float] = []
    restarts: list[float] = []
    stalls_all: list[float] = []
    step_times: list[float] = []
    saves: list[int] = []
    for i, g in enumerate(gens):
        gs = starts[g]
        ge = starts[gens[i + 1]] if i + 1 < len(gens) else t_end
        gd = _clamp(decided.get(g, ge), gs, ge)
        mine = [r for r in by_gen.get(g, []) if gs <= r["time"] <= ge + 1.0]
        steps = sorted((r["time"], r["step"]) for r in mine
                       if r["kind"] == "step" and isinstance(r.get("step"), int))
        restore = next((r for r in mine if r["kind"] == "ckpt_restore"), None)
        # a background copy committing during a hang is no progress of the training loop
        progress = [r["time"] for r in mine if r["kind"] in ("step", "ckpt_save")]
        fs = _clamp(steps[0][0] if steps else (restore["time"] if restore else gs), gs, gd)
        lp = max(progress) if progress and steps else gd
        fired = [m["time"] for m in markers if _gen_of(m) == g
                 and isinstance(m.get("time"), (int, float))]
        if fired and steps:
            lp = max(lp, min(fired))
        lp = _clamp(lp, fs, gd)
        # the next generation's restore says how much of this one's progress survived
        nxt = by_gen.get(gens[i + 1], []) if i + 1 < len(gens) else []
        nxt_restore = next((r for r in nxt if r["kind"] == "ckpt_restore"), None)
        waste_from = lp
        if i + 1 < len(gens) and steps:
            kept = nxt_restore["step"] if nxt_restore else None
            if kept is None:
                nxt_steps = [r["step"] for r in nxt if r["kind"] == "step"]
                kept = min(nxt_steps) - 1 if nxt_steps else None
            if kept is not None:
                after = [t for t, s in steps if s > kept]
                waste_from = _clamp(after[0], fs, lp) if after else lp
        stall = [r for r in mine if r["kind"] in ("ckpt_save", "ckpt_stall")
                 and isinstance(r.get("stall_s"), (int, float))]
        stall_s = sum(r["stall_s"] for r in stall if r["time"] <= waste_from)
        stalls_all += [r["stall_s"] for r in stall if r["kind"] == "ckpt_save"]
        saves += [r["step"] for r in stall if r["kind"] == "ckpt_save"]
        r_s = 0.0
        if restore is not None and isinstance(restore.get("seconds"), (int, float)):
            r_s = min(float(restore["seconds"]), fs - gs)
            restores.append({"gen": g, "step": restore.get("step"), "tier": restore.get("tier"),
                             "seconds": float(restore["seconds"])})
        lead = "startup" if i == 0 else "restart"
        add(gs, fs - r_s, lead, g)
        add(fs - r_s, fs, "checkpoint_restore", g)
        stall_s = min(stall_s, waste_from - fs)
        add(fs, waste_from - stall_s, "productive", g)
        add(waste_from - stall_s, waste_from, "checkpoint_save", g)
        add(waste_from, lp, "recompute", g)
        fault = None
        if g in decided:
            add(lp, gd, "detection", g)
            add(gd, ge, "restart" if i + 1 < len(gens) else "shutdown", g)
            fault = gd - lp
            detections.append(fault)
            first = min((r["time"] for r in nxt if r["kind"] == "step"), default=None)
            if first is not None:
                restarts.append(first - gd - (nxt_restore["seconds"] if nxt_restore else 0.0))
        elif final is not None:
            add(lp, ge, "shutdown", g)
        else:                               # still running
            add(lp, ge, "productive", g)
        if len(steps) > 1:
            step_times += [b[0] - a[0] for a, b in zip(steps, steps[1:]) if b[1] == a[1] + 1]
        per_gen.append({"gen": g, "start": round(gs - t0, 4), "first_step": round(fs - t0, 4),
                        "last_progress": round(lp - t0, 4), "decided": round(gd - t0, 4),
                        "end": round(ge - t0, 4),
                        "steps": [steps[0][1], steps[-1][1]] if steps else None,
                        "restored_step": restore.get("step") if restore else None,
                        "detection_s": None if fault is None else round(fault, 4)})
    totals = {k: 0.0 for k in BADPUT}
    detail = {"save": 0.0, "restore": 0.0}
    productive = 0.0
    for a, b, cat, _ in segments:
        if cat == "productive":
            productive += b - a
        elif cat.startswith("checkpoint_"):
            totals["checkpoint"] += b - a
            detail[cat.split("_", 1)[1]] += b - a
        else:
            totals[cat] += b - a
    median = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
    saved_at = {(_gen_of(r), r.get("step")): r["time"] for r in reports
                if r["kind"] == "ckpt_save"}
    latency: dict[str, list[float]] = {}
    for r in reports:
        t = saved_at.get((_gen_of(r), r.get("step")))
        if r["kind"] == "ckpt_commit" and t is not None and r["time"] >= t:
            latency.setdefault(str(r.get("tier")), []).append(r["time"] - t)
    interval = [b - a for a, b in zip(saves, saves[1:]) if b > a]
    measured = {"step_s": median(step_times), "ckpt_stall_s": median(stalls_all),
                "ckpt_saves": len(stalls_all), "ckpt_interval_steps": median(interval),
                "commit_s": {t: median(v) for t, v in latency.items()},
                "restores": restores, "detection_s": detections, "restart_s": restarts}
    return Goodput(wall_s=t_end - t0, productive_s=productive, badput_s=totals,
                   checkpoint_detail=detail, segments=segments, generations=per_gen,
                   measured=measured, complete=final is not None,
                   step_reports=sum(1 for r in reports if r["kind"] == "step"), start_time=t0)


def compute_run(run_dir: str | os.PathLike, *, now: float | None = None) -> Goodput:
    """:func:`compute` over the files of ``run_dir``."""
    run_dir = Path(run_dir)
    return compute(read_jsonl(run_dir / EVENTS_FILE), read_jsonl(run_dir / REPORTS_FILE),
                   read_fault_markers(run_dir), now=now)


def write_goodput(run_dir: str | os.PathLike, *, final: Mapping[str, Any] | None = None
                  ) -> Goodput:
    """Compute and write ``run_dir/goodput.json`` atomically (a reader never sees half).

    ``final``: the final event the coordinator is about to log (``done`` or
    ``give_up``, with its ``gen``), so the file, written before it, accounts for it."""
    run_dir = Path(run_dir)
    events = read_jsonl(run_dir / EVENTS_FILE)
    if final is not None:
        events.append({"time": time.time(), **final})
    result = compute(events, read_jsonl(run_dir / REPORTS_FILE), read_fault_markers(run_dir),
                     now=time.time())
    tmp = run_dir / f".{GOODPUT_FILE}.tmp"
    tmp.write_text(json.dumps(result.to_json(), indent=1) + "\n")
    os.replace(tmp, run_dir / GOODPUT_FILE)
    return result
