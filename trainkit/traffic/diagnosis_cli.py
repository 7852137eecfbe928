"""``trainkit plan --from-diagnosis``: print what was inferred, how sure, then the new plan.

    trainkit plan --from-diagnosis runs/x --topology topo.toml --placement hosts.toml \\
        --job job.toml --out plan.json

Also the message for a fabric that sprays packets or routes adaptively, where
``trainkit plan`` emits no port assignments.
"""

from __future__ import annotations

import argparse

from trainkit.traffic.topology import LeafSpine

__all__ = ["from_diagnosis", "not_useful"]


def not_useful(args: argparse.Namespace, topo: LeafSpine) -> int:
    """Say planning does nothing useful here; ``--out`` gets the reason and no ports."""
    from trainkit.traffic.fromdiag import NOT_USEFUL, spraying_document, write_json

    reason = NOT_USEFUL.format(how="sprays packets" if topo.spraying else "routes adaptively")
    print(f"planning          not useful: {reason}")
    if args.out:
        write_json(spraying_document(topo, reason), args.out)
        print(f"wrote {args.out} (no port assignments)")
    return 0


def from_diagnosis(args: argparse.Namespace) -> int:
    from trainkit.traffic.fromdiag import load_inputs, replan_from_run, write_json
    from trainkit.traffic.hashing import HashModel
    from trainkit.traffic.steering import nccl_settings, plan_document

    if args.down or args.degrade:
        print("note              --down/--degrade are ignored with --from-diagnosis (the findings decide)")
    inputs = load_inputs(args.topology, args.placement, args.job)
    if inputs.topology.self_balancing:
        return not_useful(args, inputs.topology)
    r = replan_from_run(args.from_diagnosis, inputs, method=args.method, ran_with=args.ran_with)
    inf = r.inference
    print(f"diagnosis         {args.from_diagnosis}: {len(inf.used)} finding(s) about fabric links, "
          f"{len(inf.host_problems)} inside one leaf")
    print(f"ran under         {r.running_from}")
    print("inferred (before re-planning):")
    for line in inf.lines() or ["nothing: no slow_link or link-naming hang_comm finding"]:
        print(f"  {line}")
    assert r.new is not None and r.unaware is not None
    if not inf.links:
        print("new plan          unchanged: no fabric link implicated")
    else:
        print(f"implicated        {' '.join(link.flag for link in inf.links)}")
    gain = (1 - r.new_s / r.unaware_s) * 100 if r.unaware_s and r.new_s is not None else 0.0
    print(f"method            {r.new.method}")
    print(f"simulated         {r.new_s * 1e3:.4f} ms on the inferred fabric; the plan that ignores the "
          f"findings: {r.unaware_s * 1e3:.4f} ms ({gain:+.1f}% faster)"
          if r.new_s is not None and r.unaware_s is not None else "simulated         -")
    print(f"max link load     {r.new.max_link_load * 1e3:.4f} ms  (fabric {r.new.fabric_load * 1e3:.4f} ms)")
    print(f"nccl              {' '.join(f'{k}={v}' for k, v in nccl_settings(r.new).items())}")
    if args.out:
        hm = HashModel(fields=tuple(f.strip() for f in args.hash_fields.split(",") if f.strip()),
                       seed=args.hash_seed)
        doc = plan_document(r.new, hash_model=hm)
        doc["inferred"] = inf.to_json()
        write_json(doc, args.out)
        print(f"wrote {args.out}")
    return 0
