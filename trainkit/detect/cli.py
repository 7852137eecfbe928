"""``trainkit diagnose RUN_DIR [--plot out.png]``: the findings of a run, for a person."""

from __future__ import annotations

import argparse
import sys

from trainkit.detect.report import (DiagnoseError, format_events, format_findings, load_findings,
                                    plot_timeline)

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("diagnose", help="show anomaly-detection findings of a run",
                              description="Print the findings the detector wrote to "
                                          "RUN_DIR/diagnosis.jsonl, optionally with a timeline plot.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory of the job")
    p.add_argument("--plot", metavar="OUT_PNG", help="render per-rank arrival/completion times "
                                                      "around a finding (matplotlib)")
    p.add_argument("--finding", type=int, default=0, help="which finding to plot (default 0)")
    p.add_argument("--json", action="store_true", help="print the raw JSON lines")
    p.add_argument("--no-stacks", action="store_true", help="omit captured Python stacks")
    p.set_defaults(func=_diagnose)


def _diagnose(args: argparse.Namespace) -> int:
    try:
        findings = load_findings(args.run_dir)
    except DiagnoseError as exc:
        print(f"trainkit diagnose: {exc}", file=sys.stderr)
        return 2
    events = format_events(args.run_dir)
    if not findings:
        print(f"trainkit diagnose: no findings in {args.run_dir} "
              f"(no diagnosis.jsonl, or it is empty: nothing was detected or the detector "
              f"did not run)")
        if events:
            print(events)
        return 0
    if args.json:
        import json

        for f in findings:
            print(json.dumps(f))
    else:
        print(format_findings(args.run_dir, findings, show_stacks=not args.no_stacks))
        if events:
            print()
            print(events)
    if args.plot:
        try:
            out = plot_timeline(args.run_dir, args.plot, finding=args.finding)
        except DiagnoseError as exc:
            print(f"trainkit diagnose: {exc}", file=sys.stderr)
            return 2
        print(f"timeline plot written to {out}")
    return 0
