"""The ``split`` planner: optimal with few subflows (healthy), LP-exact otherwise.

Healthy fabric (every cable at ``uplink_gbps``): the paths are the
``spines x links_per_spine`` planes. With equal flows the planner works in
units of ``size / k``, ``k = X / gcd(Delta, X)`` (see :mod:`decompose`), so
every flow becomes ``k`` equal subflows; that is ``s/g`` in the regular case,
and outside it the subflows of a flow that land on one path are merged so each
flow gets its own count (``k / gcd`` of its per-path units). Unequal flows are
balanced at byte level. Both reach ``max(out_i, in_j) / (X c)`` exactly.

Impaired fabric: the fractional optimum over spines (parallel cables pooled)
comes from the LP; the flows of each leaf pair are laid over its spines in
order, so a flow spans at most the spines its pair uses, and each spine piece
is cut over the parallel cables in proportion to their capacity. First only the pairs that touch an impaired leaf
are re-optimised with the rest fixed at the healthy optimum (fast re-planning
after one failure); if that cannot be certified within ``tolerance`` of the
per-leaf lower bound, the whole phase is re-solved. Before any LP, a local
re-route moves only the excess off the impaired cables onto the slack of the
same pairs' other spines; when it fits under the per-leaf bound x (1 +
tolerance/2) it is certified and no LP runs at all.
"""

from __future__ import annotations

import math

import numpy as np

from trainkit.traffic.decompose import bvn_cut, lay_rows
from trainkit.traffic.demand import FlowTable
from trainkit.traffic.errors import JobError
from trainkit.traffic.lp import check_routable, path_capacity, solve_paths
from trainkit.traffic.pairs import assign_bytes, expand_pooled, leaf_pairs, on_planes, pair_demand
from trainkit.traffic.plan import Assignment
from trainkit.traffic.topology import LeafSpine

__all__ = ["plan_split", "healthy_pair_amounts"]


def healthy_pair_amounts(topo: LeafSpine, pi, pj, demand, *, pooled: bool = False) -> np.ndarray:
    """Byte-level optimum on a healthy fabric: (pairs, planes or spines) bytes."""
    L, X = topo.leaves, (topo.spines if pooled else topo.paths)
    D = np.zeros((L, L))
    np.add.at(D, (pi, pj), demand)
    return bvn_cut(D, X, integer=False)[pi, pj]


def _equal_units(topo: LeafSpine, table: FlowTable, rows, pi, pj, pair_of_row) -> Assignment:
    L, X = topo.leaves, topo.paths
    count, size = table.count[rows], float(table.size[rows][0])
    A = np.zeros((L, L), np.int64)
    np.add.at(A, (table.src_leaf[rows], table.dst_leaf[rows]), count)
    out_deg, in_deg = A.sum(axis=1), A.sum(axis=0)
    delta = int(max(out_deg.max(), in_deg.max()))
    g = math.gcd(delta, X)
    k = X // g
    amounts = bvn_cut(A * k, X, integer=True)[pi, pj]
    r, t, ov = lay_rows(pair_of_row, count * k, amounts)
    ov = np.rint(ov).astype(np.int64)
    regular = bool((out_deg[out_deg > 0] == delta).all() and (in_deg[in_deg > 0] == delta).all())
    d = np.ones(len(r), np.int64)
    explicit = table.src[rows[r]] >= 0
    if not regular and len(r):
        starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
        per_row = np.gcd.reduceat(ov, starts)
        d = np.repeat(per_row, np.diff(np.r_[starts, len(r)]))
        d = np.where(explicit, d, 1)
    info = {"split": {"mode": "units", "k": k, "delta": delta, "gcd": g, "regular": regular}}
    return on_planes(topo, rows[r], t, np.full(len(r), size / k) * d, ov // d, info)


def _leaf_bound(topo: LeafSpine, pi, pj, demand, cap) -> float:
    """Per-leaf lower bound (seconds): each leaf's bytes over its total fabric capacity."""
    up_total = np.bincount(pi, weights=demand, minlength=topo.leaves)
    down_total = np.bincount(pj, weights=demand, minlength=topo.leaves)
    leaf_cap = cap.sum(axis=1) * 1e9 / 8
    return float(max(
        np.max(np.divide(up_total, leaf_cap, out=np.zeros_like(up_total), where=leaf_cap > 0)),
        np.max(np.divide(down_total, leaf_cap, out=np.zeros_like(down_total), where=leaf_cap > 0)),
    ))


def _local_reroute(topo, pi, pj, demand, cap, tolerance):
    """Move only the excess off impaired cables, onto the slack of the same pairs' other spines.

    Targets the per-leaf bound, then that x (1 + tolerance/2); None when the slack
    does not suffice (then an LP decides). Fast: one small vector op per pair
    that crosses an impaired cable.
    """
    healthy = healthy_pair_amounts(topo, pi, pj, demand, pooled=True)
    bound = _leaf_bound(topo, pi, pj, demand, cap)
    for slack_factor in (1.0, 1 + tolerance / 2):
        amounts = _reroute_within(topo, pi, pj, cap * 1e9 / 8 * bound * slack_factor, healthy.copy())
        if amounts is not None:
            return amounts
    return None


def _reroute_within(topo, pi, pj, limit, amounts):
    """One local re-route attempt keeping every link under ``limit`` bytes."""
    up = np.zeros(limit.shape)
    down = np.zeros(limit.shape)
    np.add.at(up, pi, amounts)
    np.add.at(down, pj, amounts)
    bundles = {(spec.leaf, spec.spine) for spec in topo.impaired if spec.factor < 1.0}
    for leaf, spine in sorted(bundles):
        for near, far, near_load, far_load in ((pi, pj, up, down), (pj, pi, down, up)):
            excess = near_load[leaf, spine] - limit[leaf, spine]
            if excess <= 0:
                continue
            movers = np.flatnonzero((near == leaf) & (amounts[:, spine] > 0))
            share = excess / near_load[leaf, spine]
            for p in movers.tolist():
                m = amounts[p, spine] * share
                other = far[p]
                amounts[p, spine] -= m
                near_load[leaf, spine] -= m
                far_load[other, spine] -= m
                slack = np.minimum(limit[leaf] - near_load[leaf], limit[other] - far_load[other]).clip(min=0.0)
                slack[spine] = 0.0
                room = slack.sum()
                if room < m * (1 - 1e-12):
                    return None
                give = slack * (m / room)
                amounts[p] += give
                near_load[leaf] += give
                far_load[other] += give
    return amounts


def _restricted(topo, table, rows, pi, pj, pair_of_row, demand, cap, tolerance):
    """Re-optimise only pairs touching impaired leaves; None if not certified near-optimal."""
    bad_leaves = np.unique([s.leaf for s in topo.impaired if s.factor < 1.0])
    touched = np.isin(pi, bad_leaves) | np.isin(pj, bad_leaves)
    if touched.all() or not touched.any():
        return None
    amounts = healthy_pair_amounts(topo, pi, pj, demand, pooled=True)
    fixed = ~touched
    bg_up = np.zeros(cap.shape)
    bg_down = np.zeros(cap.shape)
    np.add.at(bg_up, pi[fixed], amounts[fixed])
    np.add.at(bg_down, pj[fixed], amounts[fixed])
    # the untouched pairs keep their healthy optimum and enter the LP as fixed bytes
    sub_amounts, t_sub = solve_paths(
        cap, pi[touched], pj[touched], demand[touched], bg_up=bg_up, bg_down=bg_down
    )
    amounts[touched] = sub_amounts
    if t_sub > _leaf_bound(topo, pi, pj, demand, cap) * (1 + tolerance):
        return None
    return amounts, t_sub


def plan_split(
    topo: LeafSpine, table: FlowTable, rows: np.ndarray, /, *, tolerance: float = 0.01, unequal: str = "even"
) -> Assignment:
    """Plan the inter-leaf ``rows`` of one phase (see module docstring).

    unequal: what to do with unequal flows on a healthy fabric. ``"even"``
    splits each evenly over all paths (optimal, and it completes exactly like
    ideal spraying under max-min sharing); ``"balance"`` balances bytes with the
    Birkhoff-von Neumann cut (optimal max load with far fewer subflows, but
    uneven per-flow splits finish later under max-min sharing).
    tolerance: on an impaired fabric, how far above the per-leaf bound a fast
    (local or restricted) answer may be before the whole phase is re-solved.
    """
    if not len(rows):
        return Assignment.concat([])
    pi, pj, pair_of_row = leaf_pairs(topo, table, rows)
    demand = pair_demand(table, rows, pair_of_row)
    if topo.healthy:
        size = table.size[rows]
        if np.all(size == size[0]):
            return _equal_units(topo, table, rows, pi, pj, pair_of_row)
        if unequal == "even":  # every flow evenly over all paths: optimal, and completes like spraying
            X = topo.paths
            r = np.repeat(rows, X)
            t = np.tile(np.arange(X), len(rows))
            info = {"split": {"mode": "even", "k": X}}
            return on_planes(topo, r, t, table.size[r] / X, table.count[r].copy(), info)
        if unequal != "balance":
            raise JobError("unequal", f"must be 'even' or 'balance', got {unequal!r}")
        amounts = healthy_pair_amounts(topo, pi, pj, demand)
        return assign_bytes(topo, table, rows, pair_of_row, amounts, {"split": {"mode": "bytes"}})
    cap = path_capacity(topo, pooled=True)
    check_routable(cap, pi, pj)
    amounts, mode = _local_reroute(topo, pi, pj, demand, cap, tolerance), "local-reroute"
    if amounts is None:
        found, mode = _restricted(topo, table, rows, pi, pj, pair_of_row, demand, cap, tolerance), "restricted-lp"
        amounts = None if found is None else found[0]
    if amounts is None:
        amounts, _ = solve_paths(cap, pi, pj, demand)
        mode = "lp"
    a = assign_bytes(topo, table, rows, pair_of_row, amounts, {"split": {"mode": mode}}, pooled=True)
    return expand_pooled(topo, table, a)
