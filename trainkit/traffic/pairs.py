"""The leaf-pair view the planners share: group flows by leaf pair, lay bytes back on flows.

Why a module of its own: on a leaf-spine fabric only the leaf pair decides which
links a byte can use, so ``split`` and ``lp`` both solve for bytes per (leaf
pair, path) and then need the same two steps around it: group the rows of a
flow table by leaf pair (:func:`leaf_pairs`), and turn per-pair amounts back
into subflows of concrete flows on concrete cables (:func:`assign_bytes`,
:func:`expand_pooled`). Keeping them here lets ``lp`` and ``split`` import them
without importing each other.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trainkit.traffic.decompose import lay_rows
from trainkit.traffic.demand import FlowTable
from trainkit.traffic.plan import Assignment
from trainkit.traffic.topology import LeafSpine

__all__ = ["leaf_pairs", "pair_demand", "on_planes", "assign_bytes", "expand_pooled"]


def leaf_pairs(topo: LeafSpine, table: FlowTable, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group ``rows`` by (source leaf, destination leaf).

    Returns ``(pi, pj, pair_of_row)``: the distinct pairs' leaves in sorted order
    and, per row, the index of its pair. Every planner that works per leaf pair
    (split, lp) and the routability check of :func:`~trainkit.traffic.planners.plan`
    use this one grouping, so they agree on pair indices.
    """
    L = topo.leaves
    key = table.src_leaf[rows] * L + table.dst_leaf[rows]
    uniq, pair_of_row = np.unique(key, return_inverse=True)
    return uniq // L, uniq % L, pair_of_row


def pair_demand(table: FlowTable, rows: np.ndarray, pair_of_row: np.ndarray) -> np.ndarray:
    """Bytes each leaf pair of :func:`leaf_pairs` must carry."""
    return np.bincount(pair_of_row, weights=table.size[rows] * table.count[rows])


def on_planes(
    topo: LeafSpine, rows: np.ndarray, t: np.ndarray, each: np.ndarray, count: np.ndarray,
    info: dict[str, Any] | None = None,
) -> Assignment:
    """Records on planes ``t`` (``spine * links_per_spine + cable``; the cable keeps its index up and down)."""
    P = topo.links_per_spine
    return Assignment(rows, t // P, t % P, t % P, each, count, info or {})


def _proportional(
    pair_of_row: np.ndarray, row_bytes: np.ndarray, amounts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every flow of a pair split in the pair's path proportions (pieces = paths the pair uses)."""
    frac = amounts / amounts.sum(axis=1, keepdims=True)
    r, t = np.nonzero(frac[pair_of_row] > 1e-12)
    return r, t, row_bytes[r] * frac[pair_of_row[r], t]


def assign_bytes(
    topo: LeafSpine, table: FlowTable, rows: np.ndarray, pair_of_row: np.ndarray, amounts: np.ndarray,
    info: dict[str, Any], *, pooled: bool = False, proportional: bool = False,
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
    return on_planes(topo, rows[r], t, ov / cnt, cnt, info)


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
