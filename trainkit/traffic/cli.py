"""``trainkit plan``: plan collective traffic, compare planners, re-plan around failures.

    trainkit plan --topology topo.toml --job job.toml --method split --out plan.json
    trainkit plan compare --topology topo.toml --job job.toml --plot loads.png
    trainkit plan --topology topo.toml --job job.toml --down leaf3:spine5 --degrade leaf2:spine1=0.5
    trainkit plan --from-diagnosis runs/x --topology topo.toml --placement hosts.toml --job job.toml

Thin layer: parse, load files, call :func:`trainkit.traffic.plan`, print. Bad
input becomes one line naming the field and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainkit.traffic.hashing import HashModel

__all__ = ["register", "main"]


def register(subparsers: argparse._SubParsersAction) -> None:
    from trainkit.traffic.planners import PLANNERS

    names = " | ".join(PLANNERS)
    p = subparsers.add_parser(
        "plan", help="plan collective traffic on a leaf-spine fabric",
        description=f"Plan collective traffic ({names}), or 'compare' all planners.",
    )
    p.add_argument("action", nargs="?", choices=["compare"], help="compare every planner in one table")
    p.add_argument("--topology", required=True, help="topology file (TOML or JSON)")
    p.add_argument("--job", required=True, help="job file (TOML or JSON)")
    p.add_argument("--method", default="split", help=f"planner: {names} (default split)")
    p.add_argument("--out", help="write plan.json here (steering ports and NCCL settings)")
    p.add_argument("--down", action="append", default=[], metavar="leafI:spineJ[#K]", help="cable down")
    p.add_argument("--degrade", action="append", default=[], metavar="leafI:spineJ[#K]=F",
                   help="cable at fraction F of its capacity")
    p.add_argument("--seed", type=int, default=0, help="ECMP source-port seed (ecmp only)")
    p.add_argument("--hash-seed", type=int, default=0, help="leaf CRC32 seed of the switch hash model")
    p.add_argument("--hash-fields", default="src_ip,dst_ip,proto,src_port,dst_port",
                   help="comma-separated fields hashed by the leaves, in order")
    p.add_argument("--methods", default=",".join(PLANNERS), help="planners for 'compare' (default: all)")
    p.add_argument("--plot", help="compare: write a link-load picture (PNG)")
    p.add_argument("--no-simulate", action="store_true", help="compare: skip the flow-level simulation")
    p.add_argument("--sim-tol", type=float, default=1e-3,
                   help="simulator batching tolerance (0 = exact; default 1e-3)")
    p.add_argument("--from-diagnosis", metavar="RUN_DIR",
                   help="re-plan around the slow links the run's diagnosis.jsonl implicates")
    p.add_argument("--placement", metavar="FILE",
                   help="host -> leaf (and NIC) table; default: the [placement] table of --topology")
    p.add_argument("--ran-with", default="ecmp", metavar="METHOD",
                   help="--from-diagnosis: the planner the job ran under when RUN_DIR holds no "
                        "plan.gen<G>.json (default ecmp: the switches' hashing)")
    p.set_defaults(func=main)


def _inputs(args):
    from trainkit.traffic.files import load_job, load_topology
    from trainkit.traffic.hashing import HashModel
    from trainkit.traffic.topology import parse_link

    topo = load_topology(args.topology)
    specs = [parse_link(text, field_name="--down") for text in args.down]
    specs += [parse_link(text, field_name="--degrade", degrade=True) for text in args.degrade]
    if specs:
        topo = topo.with_impaired(*specs)
    flows = load_job(args.job)
    hm = HashModel(fields=tuple(f.strip() for f in args.hash_fields.split(",") if f.strip()), seed=args.hash_seed)
    return topo, flows, hm


def _options(method: str, args: argparse.Namespace, hm: HashModel) -> dict[str, Any]:
    """The CLI's planner flags (--seed, the hash model) for the planners that declare them."""
    from trainkit.traffic.planners import planner_options

    given = {"seed": args.seed, "hash_model": hm}
    return {k: v for k, v in given.items() if k in planner_options(method)}


def _plan_one(args, topo, flows, hm) -> int:
    from trainkit.traffic.errors import TrafficError
    from trainkit.traffic.planners import lower_bound, plan
    from trainkit.traffic.steering import nccl_settings, write_plan

    p = plan(topo, flows, method=args.method, **_options(args.method, args, hm))
    bound = lower_bound(topo, flows)
    stats = p.subflow_stats()
    print(f"method            {p.method}")
    print(f"max link load     {p.max_link_load * 1e3:.4f} ms  (fabric {p.fabric_load * 1e3:.4f} ms, "
          f"host {p.host_load * 1e3:.4f} ms)")
    label = "optimum" if topo.healthy else "per-leaf bound"
    print(f"{label:<17} {bound * 1e3:.4f} ms  (ratio {p.max_link_load / bound if bound else 1.0:.4f})")
    print(f"subflows per flow mean {stats['mean']:.2f}, max {stats['max']:.0f}")
    print(f"nccl              {' '.join(f'{k}={v}' for k, v in nccl_settings(p).items())}")
    print(f"planning time     {p.seconds * 1e3:.1f} ms")
    if args.out:
        try:
            write_plan(p, args.out, hash_model=hm)
        except OSError as exc:
            raise TrafficError("--out", f"cannot write {args.out}: {exc.strerror or exc}") from None
        print(f"wrote {args.out}")
    return 0


def _compare(args, topo, flows, hm) -> int:
    from trainkit.traffic.planners import plan
    from trainkit.traffic.simulate import simulate, simulate_spraying

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    plans = {m: plan(topo, flows, method=m, **_options(m, args, hm)) for m in methods}
    ref = plans["lp"] if "lp" in plans else plan(topo, flows, method="lp")
    optimum, fabric_opt = ref.max_link_load, ref.fabric_load
    spray = None if args.no_simulate else simulate_spraying(topo, flows).total
    head = f"{'planner':<8} {'load/opt':>9} {'fabric/opt':>10} {'sim/spray':>10} {'subflows':>14} {'QPs':>4} {'plan ms':>9}"
    print(f"optimum (LP): max link load {optimum * 1e3:.4f} ms, fabric {fabric_opt * 1e3:.4f} ms")
    print(head)
    print("-" * len(head))
    for name, p in plans.items():
        sim = "-" if spray is None else f"{simulate(p, rel_tol=args.sim_tol).total / spray:.4f}"
        st = p.subflow_stats()
        print(f"{name:<8} {p.max_link_load / optimum:>9.4f} {p.fabric_load / fabric_opt if fabric_opt else 1:>10.4f} "
              f"{sim:>10} {st['mean']:>7.2f} ({st['max']:>4.0f}) {p.qps_per_connection():>4} {p.seconds * 1e3:>9.1f}")
    if args.plot:
        from trainkit.traffic.plot import plot_loads

        plot_loads(plans, fabric_opt or optimum, args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(args: argparse.Namespace) -> int:
    from trainkit.traffic.errors import TrafficError

    try:
        if args.from_diagnosis:
            from trainkit.traffic.diagnosis_cli import from_diagnosis

            return from_diagnosis(args)
        topo, flows, hm = _inputs(args)
        if topo.self_balancing and args.action != "compare":
            from trainkit.traffic.diagnosis_cli import not_useful

            return not_useful(args, topo)
        return _compare(args, topo, flows, hm) if args.action == "compare" else _plan_one(args, topo, flows, hm)
    except TrafficError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"trainkit plan: error: {exc}", file=sys.stderr)
        return 2
