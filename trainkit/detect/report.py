"""``trainkit diagnose``: findings for a person, and a timeline plot around each fault."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from trainkit import rundir
from trainkit.errors import TrainkitError
from trainkit.rundir import JsonlError, read_fault_markers, read_jsonl

__all__ = ["DiagnoseError", "load_findings", "format_events", "format_findings", "plot_timeline"]


class DiagnoseError(TrainkitError):
    """A run directory that cannot be diagnosed (missing, or without findings file)."""


def load_findings(run_dir: str | Path) -> list[dict[str, Any]]:
    """The findings of a run, in order, as their JSON objects.

    Raises DiagnoseError for a missing run dir or a complete line that is not JSON; a
    torn last line (the aggregator caught mid-write) is skipped, as every run-dir
    reader does (:func:`trainkit.rundir.read_jsonl`).
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise DiagnoseError(f"run directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise DiagnoseError(f"{run_dir} is not a directory")
    try:
        return read_jsonl(run_dir / rundir.DIAGNOSIS_FILE, strict=True)
    except JsonlError as exc:
        raise DiagnoseError(str(exc)) from None


def _when(t: float | None) -> str:
    if t is None:
        return "?"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3]


def _run_events(run_dir: Path) -> list[dict[str, Any]]:
    """``trainkit run``'s decisions (``events.jsonl``), if this run had a launcher."""
    return read_jsonl(run_dir / rundir.EVENTS_FILE)


def format_events(run_dir: str | Path) -> str:
    """The launcher's events (starts, findings acted on, decisions, restarts) in order."""
    events = _run_events(Path(run_dir))
    if not events:
        return ""
    lines = [f"trainkit run events ({len(events)}):"]
    for e in events:
        gen = f" gen {e['gen']}" if "gen" in e else ""
        lines.append(f"  {_when(e.get('time'))} UTC{gen}  {e.get('event')}: {e.get('reason', '')}")
    return "\n".join(lines)


def format_findings(run_dir: str | Path, findings: list[dict[str, Any]], *,
                    show_stacks: bool = True) -> str:
    run_dir = Path(run_dir)
    lines = [f"{len(findings)} finding(s) in {run_dir / rundir.DIAGNOSIS_FILE}"]
    for fault in read_fault_markers(run_dir):
        lines.append(f"  injected fault fired: {fault.get('fault')} on rank {fault.get('rank')} "
                     f"at {_when(fault.get('time'))} UTC (step {fault.get('step')})")
    for n, f in enumerate(findings, 1):
        who = ", ".join(f"rank {r} on {h}" for r, h in zip(f.get("ranks", []), f.get("hosts", [])))
        link = f.get("link")
        lines.append("")
        lines.append(f"[{n}] {_when(f.get('time'))} UTC  {f.get('class')}  "
                     f"(confidence {f.get('confidence')})")
        lines.append(f"    culprit: {who or 'none named'}" + (f"; link {link[0]}<->{link[1]}"
                                                              if link else ""))
        lines.append(f"    where: group {f.get('group')} seq {f.get('seq')} step {f.get('step')}")
        ids = f.get("ids") or []
        if ids:
            lines.append("    ids: " + "; ".join(
                f"host={i.get('host')} local_rank={i.get('local_rank')} attempt={i.get('attempt')}"
                for i in ids))
        evidence = dict(f.get("evidence") or {})
        stacks = evidence.pop("stacks", {}) or {}
        for key, value in evidence.items():
            lines.append(f"    {key}: {json.dumps(value, default=str)}")
        if show_stacks:
            for rank, text in stacks.items():
                lines.append(f"    stack of rank {rank}:")
                lines.extend("      " + s for s in str(text).splitlines()[:40])
    return "\n".join(lines)


def plot_timeline(run_dir: str | Path, out: str | Path, *, finding: int = 0) -> Path:
    """Per-rank arrival (dot) and completion (bar end) times around finding ``finding``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise DiagnoseError("--plot needs matplotlib (pip install 'trainkit[plot]')") from exc
    run_dir = Path(run_dir)
    path = run_dir / rundir.TIMELINE_FILE
    if not path.exists():
        raise DiagnoseError(f"no timeline recorded in {run_dir} (no findings yet)")
    windows = read_jsonl(path)
    if not 0 <= finding < len(windows):
        raise DiagnoseError(f"finding {finding} out of range (0..{len(windows) - 1})")
    win = windows[finding]
    colls = win.get("colls", [])
    t0 = min((t for c in colls for t in c["issue"].values()), default=win["time"])
    ranks = sorted({int(r) for c in colls for r in c["issue"]} | set(win.get("ranks", [])))
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.6 * max(1, len(ranks))))
    for c in colls:
        for r, ti in c["issue"].items():
            td = c["done"].get(r)
            y = int(r)
            if td is not None:
                ax.plot([ti - t0, td - t0], [y, y], color="tab:blue", lw=4, alpha=0.5,
                        solid_capstyle="butt")
            else:
                ax.plot([ti - t0, win["time"] - t0], [y, y], color="tab:red", lw=2, ls=":")
            ax.plot([ti - t0], [y], "k|", ms=8)
    for r in win.get("ranks", []):
        ax.axhspan(r - 0.4, r + 0.4, color="tab:orange", alpha=0.15)
    ax.axvline(win["time"] - t0, color="tab:red", lw=1)
    span = max(win["time"] - t0, 1.0)
    for e in _run_events(run_dir):   # trainkit run's reaction, when it falls in the window
        if e.get("event") in ("decision", "stopped", "generation_start") \
                and 0 <= e["time"] - t0 <= 1.5 * span:
            ax.axvline(e["time"] - t0, color="tab:green", lw=1, ls="--")
            ax.annotate(e["event"], (e["time"] - t0, ranks[-1] + 0.3 if ranks else 0),
                        fontsize=7, color="tab:green", rotation=90, va="top")
    ax.set_yticks(ranks)
    ax.set_yticklabels([f"rank {r}" for r in ranks])
    ax.set_xlabel(f"seconds since {_when(t0)} UTC  (| arrival, bar = until completion, "
                  f"dotted = never completed, red line = finding, green = trainkit run)")
    ax.set_title(f"{win.get('class')} — culprit ranks {win.get('ranks')}")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
