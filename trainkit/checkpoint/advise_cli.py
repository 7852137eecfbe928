"""``trainkit ckpt advise``: the checkpoint interval that maximises goodput, as a command.

Why apart from ``checkpoint/cli.py``: this is the one ``ckpt`` command that reads no
checkpoint. It takes costs (flags, or a ``trainkit run`` directory's ``goodput.json`` via
``--from-run``) and prints the model of :mod:`trainkit.checkpoint.advise`; the inspection
and movement commands share nothing with it but ``register()``. A bad flag value is one
line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_advise_parser", "advise_command"]


def add_advise_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``advise`` to the ``ckpt`` subparsers; the caller sets its handler."""
    advise = sub.add_parser(
        "advise", help="the checkpoint interval that maximises goodput (Young/Daly, tiers)",
        description="Given the measured checkpoint stall, persist latency, restore time, "
                    "detection latency and a per-node MTBF with the node count, print the "
                    "checkpoint interval that maximises goodput and the expected fraction of "
                    "time lost. Job MTBF = node MTBF / nodes; the interval is never shorter "
                    "than the persist latency; loss per failure = interval/2 + commit "
                    "latency + detection + restore. With --tier (repeatable) or --from-run, "
                    "the tiered model: an interval and a restore time per tier, each fault "
                    "class restored from the fastest tier that survives it, and the modelled "
                    "goodput with the term that limits it (docs/checkpoint.md).")
    advise.add_argument("--stall", type=float, default=None,
                        help="training time lost per checkpoint, seconds")
    advise.add_argument("--persist", type=float, default=None,
                        help="persist latency (save call to durable), seconds")
    advise.add_argument("--restore", type=float, default=None, help="restore time, seconds")
    advise.add_argument("--detect", type=float, default=None,
                        help="failure detection latency, seconds")
    advise.add_argument("--node-mtbf-hours", type=float, required=True,
                        help="mean time between failures of one node, hours")
    advise.add_argument("--nodes", type=int, required=True, help="number of nodes in the job")
    advise.add_argument("--commit", type=float, default=None,
                        help="commit latency, seconds (default: the persist latency)")
    advise.add_argument("--tier", action="append", default=None, metavar="NAME:COMMIT:RESTORE",
                        help="a tier (memory, local, persistent) with its save-to-durable "
                             "latency and restore time in seconds, fastest first; repeat per "
                             "tier (overrides a --from-run tier of the same name)")
    advise.add_argument("--restart", type=float, default=None,
                        help="tiered model: seconds from the decision to the first step after "
                             "a restart, less the restore (default with --from-run: measured)")
    advise.add_argument("--fault-mix", default=None, metavar="process=P,reboot=R,node=N",
                        help="tiered model: shares of failures that keep the node (process), "
                             "restart it (reboot) or lose it (node); default "
                             "process=0.6,reboot=0.1,node=0.3")
    advise.add_argument("--from-run", default=None, metavar="RUN_DIR",
                        help="take the stall, tier latencies, restore, detection and restart "
                             "costs a `trainkit run` job measured (its goodput.json)")
    advise.add_argument("--json", action="store_true", help="machine-readable output")
    return advise


def advise_command(args: argparse.Namespace) -> int:
    from trainkit.checkpoint.advise import advise, format_advice

    if args.tier or args.from_run:
        return _advise_tiers(args)
    missing = [f"--{n}" for n in ("stall", "persist", "restore", "detect")
               if getattr(args, n) is None]
    if missing:
        print(f"trainkit ckpt advise: {', '.join(missing)} required (or --tier / --from-run "
              f"RUN_DIR)", file=sys.stderr)
        return 2
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


def _parse_tier(text: str):
    from trainkit.checkpoint.advise import TierCost

    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        return TierCost(name=parts[0], commit_s=float(parts[1]), restore_s=float(parts[2]))
    except ValueError:
        raise ValueError(f"--tier {text!r}: expected NAME:COMMIT_S:RESTORE_S, e.g. "
                         f"memory:0.05:0.3") from None


def _parse_mix(text: str) -> dict[str, float]:
    try:
        return {k.strip(): float(v) for k, v in (p.split("=") for p in text.split(","))}
    except ValueError:
        raise ValueError(f"--fault-mix {text!r}: expected process=P,reboot=R,node=N") from None


def _advise_tiers(args: argparse.Namespace) -> int:
    from trainkit.checkpoint.advise import (TIER_ORDER, advise_tiers, format_tiered,
                                            run_costs)

    try:
        costs = run_costs(args.from_run) if args.from_run else None
        tiers = {t.name: t for t in (costs.tiers if costs else [])}
        for text in args.tier or []:
            t = _parse_tier(text)
            tiers[t.name] = t
        order = sorted(tiers.values(), key=lambda t: TIER_ORDER.index(t.name)
                       if t.name in TIER_ORDER else len(TIER_ORDER))
        pick = lambda flag, measured, what: flag if flag is not None else (  # noqa: E731
            measured if measured is not None else _need(what))
        stall = pick(args.stall, costs and costs.stall_s, "--stall (the run saved nothing)")
        detect = pick(args.detect, costs and costs.detect_s,
                      "--detect (the run had no fault to measure it)")
        restart = pick(args.restart, costs and costs.restart_s,
                       "--restart (the run had no restart to measure it)")
        mix = _parse_mix(args.fault_mix) if args.fault_mix else None
        step = (costs.step_s if costs else None) or 0.0
        a = advise_tiers(tiers=order, stall_s=stall, detect_s=detect, restart_s=restart,
                         node_mtbf_s=args.node_mtbf_hours * 3600.0, nodes=args.nodes,
                         step_s=step, mix=mix)
        check = None
        if costs is not None and costs.failures and costs.interval_s and costs.steady_wall_s > 0:
            # the model at the run's own failure rate and interval, against its measurement
            own = advise_tiers(tiers=order, stall_s=stall, detect_s=detect, restart_s=restart,
                               node_mtbf_s=costs.steady_wall_s / costs.failures, nodes=1,
                               step_s=step, mix={"process": 1.0}, interval_s=costs.interval_s)
            check = {"modelled": own.goodput,
                     "measured": costs.steady_productive_s / costs.steady_wall_s,
                     "failures": costs.failures, "interval_s": costs.interval_s}
    except ValueError as exc:
        print(f"trainkit ckpt advise: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = a.to_dict()
        if costs is not None:
            out["from_run"] = {"estimated_restores": costs.estimated_restores, "check": check}
        print(json.dumps(out, indent=1))
        return 0
    print(format_tiered(a))
    if costs is not None:
        if costs.estimated_restores:
            print(f"  (restore time of {', '.join(costs.estimated_restores)} not measured: "
                  f"taken as its commit latency)")
        if check is not None:
            print(f"  check, at the run's own failure rate ({check['failures']} fault(s)) and "
                  f"interval ({check['interval_s']:.2f} s): modelled {check['modelled']:.3f}, "
                  f"measured {check['measured']:.3f} (startup and shutdown excluded)")
    return 0


def _need(what: str) -> float:
    raise ValueError(f"give {what}")
