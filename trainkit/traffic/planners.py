"""Planner registry and the ``plan`` entry point.

A planner is a pure function ``(topo, table, rows, **options) -> Assignment``
that places the inter-leaf ``rows`` of one phase; flows within one leaf never
touch a spine and are handled here, once. The registry is an explicit dict:
nothing registers itself on import.

Example::

    p = plan(topo, flows, method="split")
    p.max_link_load, p.subflow_stats()
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from trainkit.traffic.collectives import Flows
from trainkit.traffic.demand import EXPAND_LIMIT, FlowTable, build_table
from trainkit.traffic.ecmp import plan_ecmp
from trainkit.traffic.errors import JobError
from trainkit.traffic.greedy import plan_greedy
from trainkit.traffic.lp import check_routable, path_capacity, solve_paths
from trainkit.traffic.plan import Assignment, PhasePlan, Plan
from trainkit.traffic.split import _pairs, assign_bytes, expand_pooled, plan_split
from trainkit.traffic.topology import LeafSpine

__all__ = ["PLANNERS", "plan", "replan", "plan_lp", "lower_bound"]


def plan_lp(topo: LeafSpine, table: FlowTable, rows: np.ndarray, **_) -> Assignment:
    """Ideal multipath: the fractional LP optimum over spine bundles (parallel cables pooled)."""
    if not len(rows):
        return Assignment.concat([])
    pi, pj, pair_of_row = _pairs(topo, table, rows)
    demand = np.bincount(pair_of_row, weights=table.size[rows] * table.count[rows])
    amounts, seconds = solve_paths(path_capacity(topo, pooled=True), pi, pj, demand)
    a = assign_bytes(topo, table, rows, pair_of_row, amounts, {"lp": {"fabric_seconds": seconds}}, pooled=True)
    return expand_pooled(topo, table, a)


PLANNERS: dict[str, Callable[..., Assignment]] = {
    "ecmp": plan_ecmp,
    "greedy": plan_greedy,
    "split": plan_split,
    "lp": plan_lp,
}


def _intra(table: FlowTable, rows: np.ndarray) -> Assignment:
    z = np.zeros(len(rows), np.int64)
    return Assignment(rows, z - 1, z - 1, z - 1, table.size[rows], table.count[rows].copy())


def plan(
    topo: LeafSpine, flows: Flows, method: str = "split", *, expand_limit: int = EXPAND_LIMIT, **options
) -> Plan:
    """Plan every phase of ``flows`` on ``topo`` with the named planner.

    options go to the planner: ``seed`` and ``hash_model`` (ecmp), ``qps``
    (ecmp QPs per connection), ``tolerance`` (split under failures).
    """
    if method not in PLANNERS:
        raise JobError("method", f"unknown planner {method!r}; choose from {', '.join(PLANNERS)}")
    if not isinstance(topo, LeafSpine):
        raise JobError("topology", f"expected a LeafSpine, got {type(topo).__name__}")
    if not isinstance(flows, Flows):
        raise JobError("flows", f"expected Flows from collective()/combine(), got {type(flows).__name__}")
    start = time.perf_counter()
    tables = [build_table(topo, phase, expand_limit=expand_limit) for phase in flows.phases]
    return _plan_tables(topo, flows, tables, method, start, options)


def replan(previous: Plan, topo: LeafSpine, *, method: str | None = None, **options) -> Plan:
    """Re-plan ``previous`` on a changed fabric (a failed or degraded cable).

    Reuses the flow tables of the previous plan, so only the routing is redone:
    this is the fast path after a link failure.
    """
    method = method or previous.method
    if method not in PLANNERS:
        raise JobError("method", f"unknown planner {method!r}; choose from {', '.join(PLANNERS)}")
    if (topo.leaves, topo.spines, topo.nics, topo.layout) != (
        previous.topology.leaves, previous.topology.spines, previous.topology.nics, previous.topology.layout
    ):
        raise JobError("topology", "replan() needs the same leaves, spines, NICs and layout as the previous plan")
    start = time.perf_counter()
    merged = {**previous.info, **options}
    return _plan_tables(topo, previous.flows, [ph.table for ph in previous.phases], method, start, merged)


def _plan_tables(topo, flows, tables, method, start, options) -> Plan:
    planner = PLANNERS[method]
    phases = []
    cap = path_capacity(topo, pooled=True)
    for index, (phase, table) in enumerate(zip(flows.phases, tables)):
        inter = np.flatnonzero(table.inter)
        if len(inter):
            pi, pj, _ = _pairs(topo, table, inter)
            check_routable(cap, pi, pj)
        fabric = planner(topo, table, inter, **options)
        a = Assignment.concat([_intra(table, np.flatnonzero(~table.inter)), fabric], fabric.info)
        phases.append(PhasePlan.build(topo, index, phase, table, a))
    return Plan(method, topo, flows, tuple(phases), time.perf_counter() - start, dict(options))


def lower_bound(topo: LeafSpine, flows: Flows, *, fabric_only: bool = False) -> float:
    """Closed-form optimum on a healthy fabric: max(host load, max_i out_i / (X c), max_j in_j / (X c)).

    On an impaired fabric this is only a lower bound (per-leaf capacity).
    fabric_only: leave the host links out (the leaf-spine part alone).
    """
    best = 0.0
    cap = topo.link_gbps().sum(axis=(1, 2)) * 1e9 / 8  # bytes/s per leaf
    for phase in flows.phases:
        table = build_table(topo, phase)
        host = max(table.host_tx.max(initial=0.0), table.host_rx.max(initial=0.0)) * 8 / (topo.host_gbps * 1e9)
        inter = table.inter
        b = table.row_bytes[inter]
        out = np.bincount(table.src_leaf[inter], weights=b, minlength=topo.leaves)
        inn = np.bincount(table.dst_leaf[inter], weights=b, minlength=topo.leaves)
        with np.errstate(divide="ignore", invalid="ignore"):
            fabric = np.nan_to_num(np.maximum(out, inn) / cap, nan=0.0, posinf=np.inf)
        best = max(best, 0.0 if fabric_only else host, float(fabric.max(initial=0.0)))
    return best
