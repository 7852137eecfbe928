"""``trainkit goodput RUN_DIR [--json] [--plot F]``: where a run's time went.

Reads the run directory's files (:mod:`trainkit.run.goodput`), so it works on a live
run as well as a finished one; ``goodput.json``, which the coordinator writes at the
end, holds the same numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainkit.rundir import EVENTS_FILE, GOODPUT_FILE

# our category -> the category of goodput-measurement tools (ML Goodput Measurement,
# NVRx's reports) that people already read
TOOL_CATEGORY = {
    "startup": "infrastructure recovery (first start)",
    "checkpoint": "checkpoint save/restore",
    "detection": "infrastructure recovery (fault to decision)",
    "restart": "infrastructure recovery (decision to first step)",
    "recompute": "wasted progress",
    "shutdown": "other (final persist, exit)",
}
COLORS = {"productive": "#2ca02c", "startup": "#7f7f7f", "checkpoint": "#1f77b4",
          "checkpoint_save": "#1f77b4", "checkpoint_restore": "#17becf",
          "detection": "#d62728", "restart": "#ff7f0e", "recompute": "#9467bd",
          "shutdown": "#bcbd22"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "goodput", help="where a run's time went: productive, checkpoint, detection, restart",
        description="Goodput of a `trainkit run` job: its wall time split into productive "
                    "training and badput (startup, checkpoint save/restore, detection, "
                    "restart, recomputed progress, shutdown), from the run directory.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run's --run-dir")
    p.add_argument("--json", action="store_true", help="print goodput.json's fields as JSON")
    p.add_argument("--plot", type=Path, metavar="F",
                   help="write a timeline and a stacked bar of the breakdown to F (PNG, SVG, "
                        "PDF: by extension); needs matplotlib (the `plot` extra)")
    p.set_defaults(func=_main)


def _load(run_dir: Path) -> dict:
    from trainkit.run.goodput import compute_run

    if (run_dir / EVENTS_FILE).is_file():
        return compute_run(run_dir).to_json()
    return json.loads((run_dir / GOODPUT_FILE).read_text())


def _main(args: argparse.Namespace) -> int:
    run_dir: Path = args.run_dir
    if not (run_dir / EVENTS_FILE).is_file() and not (run_dir / GOODPUT_FILE).is_file():
        print(f"trainkit goodput: {run_dir}: not a trainkit run directory (no {EVENTS_FILE} "
              f"or {GOODPUT_FILE})", file=sys.stderr)
        return 2
    try:
        data = _load(run_dir)
    except (OSError, ValueError) as exc:
        print(f"trainkit goodput: {run_dir / GOODPUT_FILE}: unreadable ({exc})", file=sys.stderr)
        return 2
    if args.plot is not None:
        plot(data, args.plot)
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print(format_table(data))
        if args.plot is not None:
            print(f"plot: {args.plot}")
    return 0


def format_table(data: dict) -> str:
    wall = data["wall_s"] or 0.0
    share = lambda v: f"{100 * v / wall:5.1f}%" if wall else "    -"  # noqa: E731
    state = "finished" if data.get("complete") else "running or cut short"
    lines = [f"goodput {data['goodput']:.3f}: productive {data['productive_s']:.2f} s of "
             f"{wall:.2f} s wall, {len(data.get('generations', []))} generation(s), {state}",
             f"  {'category':<11} {'seconds':>8}  {'share':>6}  as goodput tools call it",
             f"  {'productive':<11} {data['productive_s']:8.2f}  {share(data['productive_s'])}"]
    detail = data.get("checkpoint_detail", {})
    for cat, secs in data["badput_s"].items():
        note = TOOL_CATEGORY.get(cat, "")
        if cat == "checkpoint" and detail:
            note += f" (save {detail.get('save', 0):.2f}, restore {detail.get('restore', 0):.2f})"
        lines.append(f"  {cat:<11} {secs:8.2f}  {share(secs)}  {note}")
    if not data.get("step_reports"):
        lines.append("  note: no step reports: each generation counts as productive from start "
                     "to end (see trainkit.run.report)")
    return "\n".join(lines)


def plot(data: dict, out: Path) -> None:
    """A timeline of the run (one bar per category over time) above one stacked bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 3.6),
                                      gridspec_kw={"height_ratios": [3, 1]})
    for a, b, cat, _gen in data.get("segments", []):
        top.broken_barh([(a, b - a)], (0, 1), color=COLORS.get(cat, "#333333"))
    top.set_yticks([])
    top.set_xlabel("seconds since the run started")
    top.set_title(f"goodput {data['goodput']:.3f} over {data['wall_s']:.1f} s")
    left = 0.0
    parts = [("productive", data["productive_s"]), *data["badput_s"].items()]
    for cat, secs in parts:
        if secs > 0:
            bottom.barh([0], [secs], left=left, color=COLORS.get(cat, "#333333"),
                        label=f"{cat} {secs:.1f}s")
            left += secs
    bottom.set_yticks([])
    bottom.set_xlim(0, max(left, 1e-9))
    bottom.legend(loc="upper center", bbox_to_anchor=(0.5, -0.4), ncol=4, fontsize=8,
                  frameon=False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
