"""Planner registry, the ``Planner`` seam, and the ``plan``/``replan`` entry points.

A planner places the inter-leaf flows of one phase; flows within one leaf never
touch a spine and are handled here, once. The registry is an explicit dict:
nothing registers itself on import. See :class:`Planner` for the call.

Example::

    p = plan(topo, flows, method="split")
    p.max_link_load, p.subflow_stats()
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from trainkit.traffic.collectives import Flows
from trainkit.traffic.demand import EXPAND_LIMIT, FlowTable, build_table
from trainkit.traffic.ecmp import plan_ecmp
from trainkit.traffic.errors import JobError
from trainkit.traffic.greedy import plan_greedy
from trainkit.traffic.lp import check_routable, path_capacity, plan_lp
from trainkit.traffic.pairs import leaf_pairs
from trainkit.traffic.plan import Assignment, PhasePlan, Plan
from trainkit.traffic.split import plan_split
from trainkit.traffic.topology import LeafSpine

__all__ = ["PLANNERS", "Planner", "plan", "replan", "planner_options", "lower_bound"]


class Planner(Protocol):
    """Places the inter-leaf flows of one phase on paths: ``planner(topo, table, rows, **options)``.

    Who calls it, and in which order (one process; planning is not distributed):

    1. :func:`plan` builds each phase's :class:`FlowTable` (:func:`replan` reuses
       the previous plan's tables instead) and checks the options against the
       planner's signature (:func:`planner_options`): an option it does not
       declare raises :class:`JobError` naming the option and the planner.
    2. Per phase, in phase order, it checks that every leaf pair with traffic
       has a live path (:class:`UnroutableError` otherwise), so a planner may
       assume every pair it sees is routable.
    3. It calls the planner with the fabric, the phase's table and ``rows``, the
       indices of the table's inter-leaf rows (never intra-leaf ones; possibly
       empty), plus the options as keywords.
    4. It adds the intra-leaf records and turns the returned :class:`Assignment`
       into link loads (:meth:`PhasePlan.build`), the same arithmetic for every
       planner.

    The planner returns an :class:`Assignment` that carries every byte of every
    row exactly once (per row, the sum of ``each * count`` is the row's bytes),
    on cables that exist and are up: ``spine`` in range, ``up_link``/``down_link``
    a live parallel cable or ``-1`` (spread over the parallel cables by capacity).
    ``info`` may hold a dict under the planner's name (what it did, for reports).

    It is pure: it does not modify its arguments or keep state between calls;
    randomness comes only from an explicit ``seed`` option, so equal inputs give
    equal plans. Options are keyword-only parameters with defaults, declared in
    its signature (no ``**kwargs``), which is how they are discovered and checked.

    A new planner: a function in its own module, one entry in :data:`PLANNERS`;
    ``tests/test_planner_registry.py`` then checks it against this contract.
    """

    def __call__(self, topo: LeafSpine, table: FlowTable, rows: np.ndarray, /) -> Assignment: ...


PLANNERS: dict[str, Planner] = {
    "ecmp": plan_ecmp,
    "greedy": plan_greedy,
    "split": plan_split,
    "lp": plan_lp,
}


def planner_options(method: str) -> dict[str, Any]:
    """The options planner ``method`` takes, with their defaults (its keyword-only parameters)."""
    if method not in PLANNERS:
        raise JobError("method", f"unknown planner {method!r}; choose from {', '.join(PLANNERS)}")
    params = inspect.signature(PLANNERS[method]).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _check_options(method: str, options: Mapping[str, Any]) -> None:
    known = planner_options(method)
    unknown = sorted(set(options) - set(known))
    if unknown:
        takes = ", ".join(known) if known else "no options"
        raise JobError(unknown[0], f"planner {method!r} has no option {unknown[0]!r} (it takes: {takes})")


def _intra(table: FlowTable, rows: np.ndarray) -> Assignment:
    z = np.zeros(len(rows), np.int64)
    return Assignment(rows, z - 1, z - 1, z - 1, table.size[rows], table.count[rows].copy())


def plan(
    topo: LeafSpine, flows: Flows, method: str = "split", *, expand_limit: int = EXPAND_LIMIT, **options
) -> Plan:
    """Plan every phase of ``flows`` on ``topo`` with the named planner.

    options go to the planner, and only those it declares are accepted
    (:func:`planner_options`): ``seed``, ``hash_model`` and ``qps`` (ecmp),
    ``tolerance`` and ``unequal`` (split); greedy and lp take none.
    """
    _check_options(method, options)
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
    this is the fast path after a link failure. The previous plan's options
    carry over when the planner stays the same; ``options`` override them.
    """
    method = method or previous.method
    carried = previous.info if method == previous.method else {}
    merged = {**carried, **options}
    _check_options(method, merged)
    if (topo.leaves, topo.spines, topo.nics, topo.layout) != (
        previous.topology.leaves, previous.topology.spines, previous.topology.nics, previous.topology.layout
    ):
        raise JobError("topology", "replan() needs the same leaves, spines, NICs and layout as the previous plan")
    start = time.perf_counter()
    return _plan_tables(topo, previous.flows, [ph.table for ph in previous.phases], method, start, merged)


def _plan_tables(
    topo: LeafSpine, flows: Flows, tables: list[FlowTable], method: str, start: float, options: dict[str, Any]
) -> Plan:
    planner: Callable[..., Assignment] = PLANNERS[method]  # options as declared, checked above
    phases = []
    cap = path_capacity(topo, pooled=True)
    for index, (phase, table) in enumerate(zip(flows.phases, tables)):
        inter = np.flatnonzero(table.inter)
        if len(inter):
            pi, pj, _ = leaf_pairs(topo, table, inter)
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
