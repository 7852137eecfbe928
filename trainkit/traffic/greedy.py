"""The ``greedy`` planner: C4P-style global placement of unsplit flows.

With a global view of every flow, place flows largest first, each whole on the
path whose busier hop (up or down, in seconds) ends up least loaded. Flows of an
aggregated leaf-pair row are identical, so they are water-filled in one go,
which is what placing them one by one would do.
"""

from __future__ import annotations

import numpy as np

from trainkit.traffic.demand import FlowTable
from trainkit.traffic.pairs import on_planes
from trainkit.traffic.plan import Assignment
from trainkit.traffic.topology import LeafSpine

__all__ = ["plan_greedy"]


def _water_fill(level: np.ndarray, step: np.ndarray, m: int) -> np.ndarray:
    """Counts per path placing m items of cost step[t] each, always on the lowest level."""
    if m == 1:
        out = np.zeros(len(level), np.int64)
        out[int(np.argmin(level + step))] = 1
        return out
    lo, hi = float((level + step).min()), float((level + step * m).min())
    for _ in range(60):  # bisect the final water level
        mid = (lo + hi) / 2
        n = np.floor(np.maximum(0.0, mid - level) / step)
        if n.sum() >= m:
            hi = mid
        else:
            lo = mid
    n = np.floor(np.maximum(0.0, lo - level) / step).astype(np.int64)
    rest = m - int(n.sum())
    if rest > 0:
        nxt = level + (n + 1) * step
        n[np.argsort(nxt, kind="stable")[:rest]] += 1
    return n


def plan_greedy(topo: LeafSpine, table: FlowTable, rows: np.ndarray, /) -> Assignment:
    """Place the inter-leaf ``rows`` of one phase whole, largest first (see module docstring). No options."""
    cap = topo.link_gbps().reshape(topo.leaves, topo.paths) * 1e9 / 8  # bytes/s per plane
    up = np.zeros(cap.shape)  # seconds already placed on each (leaf, plane) up link
    down = np.zeros(cap.shape)
    order = rows[np.argsort(-table.size[rows], kind="stable")]
    out_rows, out_t, out_cnt = [], [], []
    for row in order.tolist():
        i, j, size = int(table.src_leaf[row]), int(table.dst_leaf[row]), float(table.size[row])
        ok = (cap[i] > 0) & (cap[j] > 0)
        if not ok.any():
            continue  # the planner front-end reports unroutable pairs before we get here
        su = np.where(ok, size / np.where(ok, cap[i], 1.0), np.inf)
        sd = np.where(ok, size / np.where(ok, cap[j], 1.0), np.inf)
        m = int(table.count[row])
        if m == 1:
            t = int(np.argmin(np.maximum(up[i] + su, down[j] + sd)))
            counts_t, counts_n = np.array([t]), np.array([1])
        else:
            level = np.where(ok, np.maximum(up[i], down[j]), np.inf)
            n = _water_fill(level, np.where(ok, np.maximum(su, sd), np.inf), m)
            counts_t = np.flatnonzero(n)
            counts_n = n[counts_t]
        up[i, counts_t] += su[counts_t] * counts_n
        down[j, counts_t] += sd[counts_t] * counts_n
        out_rows.append(np.full(len(counts_t), row))
        out_t.append(counts_t)
        out_cnt.append(counts_n)
    if not out_rows:
        return Assignment.concat([])
    r, t, c = np.concatenate(out_rows), np.concatenate(out_t), np.concatenate(out_cnt)
    return on_planes(topo, r, t, table.size[r], c.astype(np.int64))
