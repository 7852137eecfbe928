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
from trainkit.traffic.plan import Assignment
from trainkit.traffic.topology import LeafSpine

__all__ = ["plan_split", "healthy_pair_amounts", "assign_bytes", "expand_pooled"]


def _pairs(topo: LeafSpine, table: FlowTable, rows: np.ndarray):
    L = topo.leaves
    key = table.src_leaf[rows] * L + table.dst_leaf[rows]
    uniq, pair_of_row = np.unique(key, return_inverse=True)
    return uniq // L, uniq % L, pair_of_row


def _with_planes(topo: LeafSpine, rows, t, each, count, info) -> Assignment:
    P = topo.links_per_spine
    return Assignment(rows, t // P, t % P, t % P, each, count, info)


def healthy_pair_amounts(topo: LeafSpine, pi, pj, demand, *, pooled: bool = False) -> np.ndarray:
    """Byte-level optimum on a healthy fabric: (pairs, planes or spines) bytes."""
    L, X = topo.leaves, (topo.spines if pooled else topo.paths)
    D = np.zeros((L, L))
    np.add.at(D, (pi, pj), demand)
    return bvn_cut(D, X, integer=False)[pi, pj]


def _proportional(pair_of_row, row_bytes, amounts):
    """Every flow of a pair split in the pair's path proportions (pieces = paths the pair uses)."""
    frac = amounts / amounts.sum(axis=1, keepdims=True)
    r, t = np.nonzero(frac[pair_of_row] > 1e-12)
    return r, t, row_bytes[r] * frac[pair_of_row[r], t]


def assign_bytes(
    topo: LeafSpine, table: FlowTable, rows, pair_of_row, amounts, info, *, pooled=False, proportional=False
) -> Assignment:
    """Lay every pair's flows over its per-path byte amounts (byte-level subflows).

    proportional: split each flow in its pair's proportions instead of laying
    flows end to end (more subflows, but flows of a pair progress alike).
    """
    size, count = table.size[rows], table.count[rows]
    if proportional:
        r, t, ov = _proportional(pair_of_row, size * count, amounts)
    else:
        r, t, ov = lay_rows(pair_of_row, size * count, amounts)
    agg = table.src[rows[r]] < 0
    cnt = np.where(agg, np.maximum(1, np.rint(ov / size[r])), 1).astype(np.int64)
    if pooled:
        z = np.full(len(r), -1, np.int64)
        return Assignment(rows[r], t, z, z, ov / cnt, cnt, info)
    return _with_planes(topo, rows[r], t, ov / cnt, cnt, info)


def expand_pooled(topo: LeafSpine, table: FlowTable, a: Assignment) -> Assignment:
    """Turn per-spine (pooled) records into concrete (up cable, down cable) pieces.

    A piece of ``x`` bytes on spine ``s`` becomes ``x * u_k * d_k'`` on up cable
    ``k`` and down cable ``k'``, with ``u``/``d`` the capacity shares of the
    parallel cables on each side: every cable then carries exactly its share,
    so the pooled optimum is realised by paths a port can steer.
    """
    pooled = (a.up_link < 0) & (a.spine >= 0)
    if topo.links_per_spine == 1:
        z = np.where(pooled, 0, a.up_link)
        return Assignment(a.row, a.spine, z, np.where(pooled, 0, a.down_link), a.each, a.count, a.info)
    if not pooled.any():
        return a
    cap = topo.link_gbps()
    P = topo.links_per_spine
    rows_all, spines_all = a.row, a.spine
    even = np.zeros(len(a.row), bool)
    even[pooled] = (
        (cap[table.src_leaf[rows_all[pooled]], spines_all[pooled]] == topo.uplink_gbps).all(axis=1)
        & (cap[table.dst_leaf[rows_all[pooled]], spines_all[pooled]] == topo.uplink_gbps).all(axis=1)
        & (table.src[rows_all[pooled]] >= 0)
    )
    if even.any():  # healthy cables on both sides: cable k up, cable k down, 1/P each
        ev = np.flatnonzero(even)
        k = np.tile(np.arange(P), len(ev))
        ev_rep = np.repeat(ev, P)
        simple = Assignment(a.row[ev_rep], a.spine[ev_rep], k, k, a.each[ev_rep] / P, a.count[ev_rep], a.info)
        rest = ~even
        a = Assignment(a.row[rest], a.spine[rest], a.up_link[rest], a.down_link[rest], a.each[rest],
                       a.count[rest], a.info)
        return Assignment.concat([simple, expand_pooled(topo, table, a)], a.info)
    r, s = a.row[pooled], a.spine[pooled]
    up = cap[table.src_leaf[r], s]
    down = cap[table.dst_leaf[r], s]
    u = up / up.sum(axis=1, keepdims=True)
    d = down / down.sum(axis=1, keepdims=True)
    share = u[:, :, None] * d[:, None, :]
    same = np.isclose(u, d).all(axis=1)  # equal marginals: cable k up, cable k down (P pieces, not P^2)
    share[same] = u[same][:, :, None] * np.eye(P)[None]
    idx, ku, kd = np.nonzero(share > 0)
    keep = ~pooled
    each = a.each[pooled][idx] * share[idx, ku, kd]
    count = a.count[pooled][idx]
    agg = table.src[r[idx]] < 0
    if agg.any():  # aggregated rows: share out whole flows rather than cutting each flow P x P ways
        exact = count * share[idx, ku, kd]
        whole = np.floor(exact).astype(np.int64)
        short = a.count[pooled] - np.bincount(idx, weights=whole, minlength=len(r)).astype(np.int64)
        rank = np.lexsort((-(exact - whole), idx))
        pos = np.empty(len(idx), np.int64)
        pos[rank] = np.arange(len(idx)) - np.searchsorted(idx[rank], idx[rank])
        whole += (pos < short[idx]).astype(np.int64)
        count = np.where(agg, whole, count)
        each = np.where(agg, a.each[pooled][idx], each)
    nz = count > 0
    return Assignment(
        np.concatenate([a.row[keep], r[idx][nz]]), np.concatenate([a.spine[keep], s[idx][nz]]),
        np.concatenate([a.up_link[keep], ku[nz]]), np.concatenate([a.down_link[keep], kd[nz]]),
        np.concatenate([a.each[keep], each[nz]]), np.concatenate([a.count[keep], count[nz]]), a.info,
    )


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
    return _with_planes(topo, rows[r], t, np.full(len(r), size / k) * d, ov // d, info)


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
    topo: LeafSpine, table: FlowTable, rows: np.ndarray, *, tolerance: float = 0.01, unequal: str = "even", **_
) -> Assignment:
    """Plan the inter-leaf ``rows`` of one phase (see module docstring).

    unequal: what to do with unequal flows on a healthy fabric. ``"even"``
    splits each evenly over all paths (optimal, and it completes exactly like
    ideal spraying under max-min sharing); ``"balance"`` balances bytes with the
    Birkhoff-von Neumann cut (optimal max load with far fewer subflows, but
    uneven per-flow splits finish later under max-min sharing).
    """
    if not len(rows):
        return Assignment.concat([])
    pi, pj, pair_of_row = _pairs(topo, table, rows)
    demand = np.bincount(pair_of_row, weights=table.size[rows] * table.count[rows])
    if topo.healthy:
        size = table.size[rows]
        if np.all(size == size[0]):
            return _equal_units(topo, table, rows, pi, pj, pair_of_row)
        if unequal == "even":  # every flow evenly over all paths: optimal, and completes like spraying
            X = topo.paths
            r = np.repeat(rows, X)
            t = np.tile(np.arange(X), len(rows))
            info = {"split": {"mode": "even", "k": X}}
            return _with_planes(topo, r, t, table.size[r] / X, table.count[r].copy(), info)
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
