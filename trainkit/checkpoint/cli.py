"""``trainkit ckpt``: look at and verify checkpoint directories.

    trainkit ckpt ls DIR [--json]          steps, committed or not, ranks, sizes, commit times
    trainkit ckpt info DIR STEP            the tensor table of a step
    trainkit ckpt verify DIR [STEP]        every checksum; exit 1 with a report on a mismatch

Handlers import the engine lazily, so ``trainkit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("ckpt", help="inspect and verify checkpoints",
                              description="Inspect and verify trainkit checkpoint directories.")
    sub = p.add_subparsers(dest="ckpt_command", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])

    ls = sub.add_parser("ls", help="list steps: committed or not, ranks, sizes, commit times")
    ls.add_argument("dir", help="checkpoint directory")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_ls)

    info = sub.add_parser("info", help="the tensor table of a committed step")
    info.add_argument("dir")
    info.add_argument("step", type=int)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_info)

    verify = sub.add_parser("verify", help="check every checksum; exit 1 on any mismatch")
    verify.add_argument("dir")
    verify.add_argument("step", type=int, nargs="?", help="one step (default: every committed)")
    verify.set_defaults(func=_verify)

    advise = sub.add_parser(
        "advise", help="the checkpoint interval that maximises goodput (Young/Daly)",
        description="Given the measured checkpoint stall, persist latency, restore time, "
                    "detection latency and a per-node MTBF with the node count, print the "
                    "checkpoint interval that maximises goodput and the expected fraction of "
                    "time lost. Job MTBF = node MTBF / nodes; the interval is never shorter "
                    "than the persist latency; loss per failure = interval/2 + commit "
                    "latency + detection + restore.")
    advise.add_argument("--stall", type=float, required=True,
                        help="training time lost per checkpoint, seconds")
    advise.add_argument("--persist", type=float, required=True,
                        help="persist latency (save call to durable), seconds")
    advise.add_argument("--restore", type=float, required=True, help="restore time, seconds")
    advise.add_argument("--detect", type=float, required=True,
                        help="failure detection latency, seconds")
    advise.add_argument("--node-mtbf-hours", type=float, required=True,
                        help="mean time between failures of one node, hours")
    advise.add_argument("--nodes", type=int, required=True, help="number of nodes in the job")
    advise.add_argument("--commit", type=float, default=None,
                        help="commit latency, seconds (default: the persist latency)")
    advise.add_argument("--json", action="store_true", help="machine-readable output")
    advise.set_defaults(func=_advise)


def _advise(args: argparse.Namespace) -> int:
    from trainkit.checkpoint.advise import advise, format_advice

    try:
        a = advise(stall_s=args.stall, persist_s=args.persist, restore_s=args.restore,
                   detect_s=args.detect, node_mtbf_s=args.node_mtbf_hours * 3600.0,
                   nodes=args.nodes, commit_s=args.commit)
    except ValueError as exc:
        print(f"trainkit ckpt advise: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(a.to_dict(), indent=1))
    else:
        print(format_advice(a))
    return 0


def _require_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise SystemExit(f"trainkit ckpt: {path} is not a directory")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _ls(args: argparse.Namespace) -> int:
    from trainkit.checkpoint import reader

    _require_dir(args.dir)
    rows = []
    for step in reader.as_tier(args.dir).step_dirs():
        try:
            record = reader.read_commit_record(args.dir, step)
        except reader.CheckpointNotFoundError:
            rows.append({"step": step, "committed": False})
            continue
        except reader.CorruptCheckpointError as exc:
            rows.append({"step": step, "committed": False, "error": str(exc)})
            continue
        rows.append({"step": step, "committed": True, "world_size": record["world_size"],
                     "bytes": sum(size for size, _ in record["files"].values()),
                     "tensors": sum(r["ntensors"] for r in record["ranks"]),
                     "committed_at": record["committed_at"]})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"{args.dir}: no checkpoints")
        return 0
    print(f"{'step':>10}  {'state':<11} {'ranks':>5} {'size':>10} {'tensors':>8}  committed at")
    for r in rows:
        if r["committed"]:
            print(f"{r['step']:>10}  {'committed':<11} {r['world_size']:>5} "
                  f"{_human(r['bytes']):>10} {r['tensors']:>8}  {r['committed_at']}")
        else:
            print(f"{r['step']:>10}  {'UNCOMMITTED':<11} {'-':>5} {'-':>10} {'-':>8}  "
                  f"{r.get('error', 'interrupted or failed save; ignored by load()')}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from trainkit.checkpoint import reader

    _require_dir(args.dir)
    try:
        record = reader.read_commit_record(args.dir, args.step)
        table = []
        for rank in range(record["world_size"]):
            index = reader.read_rank_index(args.dir, args.step, rank, record)
            for t in index["tensors"]:
                table.append({"rank": rank, "name": t["name"],
                              "dtype": "pickled" if t.get("pickled") else t["dtype"],
                              "shape": t["shape"], "bytes": t["nbytes"]})
    except reader.CheckpointError as exc:
        print(f"trainkit ckpt info: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    width = max([len(t["name"]) for t in table] + [4])
    print(f"{'rank':>4}  {'name':<{width}}  {'dtype':<14} {'shape':<20} {'bytes':>10}")
    for t in table:
        print(f"{t['rank']:>4}  {t['name']:<{width}}  {t['dtype']:<14} "
              f"{str(tuple(t['shape'])):<20} {_human(t['bytes']):>10}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from trainkit.checkpoint import reader

    _require_dir(args.dir)
    steps = [args.step] if args.step is not None else reader.committed_steps(args.dir)
    if not steps:
        print(f"{args.dir}: no committed checkpoint to verify")
        return 0
    bad = 0
    for step in steps:
        problems = reader.verify_step(args.dir, step)
        if problems:
            bad += 1
            print(f"step {step}: CORRUPT")
            for p in problems:
                print(f"  - {p}")
        else:
            print(f"step {step}: ok")
    if bad:
        print(f"{bad} of {len(steps)} step(s) failed verification")
        return 1
    return 0
