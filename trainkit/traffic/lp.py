"""The LP bound: ideal fractional multipath over every leaf-spine-leaf path.

Why at leaf-pair level: on a leaf-spine fabric only the leaf pair decides which
links a byte can use, so flows of one pair are interchangeable and the LP has
one variable per (leaf pair with traffic, usable path) plus the objective ``T``
(seconds on the busiest fabric link). Host links are fixed by the job and
enter the final answer as ``max(host load, T)``. Solved with HiGHS through
``scipy.optimize.linprog``.

``paths`` are either bundles (one per spine: parallel cables pooled, the true
lower bound) or planes (spine x parallel index, a path keeps its cable index,
which is what a steered subflow can pin).

:func:`plan_lp` is the ``lp`` planner built on :func:`solve_paths`; ``split``
uses the same solver on impaired fabrics.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

from trainkit.traffic.demand import FlowTable
from trainkit.traffic.errors import TrafficError, UnroutableError
from trainkit.traffic.pairs import assign_bytes, expand_pooled, leaf_pairs, pair_demand
from trainkit.traffic.plan import Assignment
from trainkit.traffic.topology import LeafSpine

__all__ = ["path_capacity", "solve_paths", "check_routable", "plan_lp"]


def path_capacity(topo: LeafSpine, *, pooled: bool) -> np.ndarray:
    """Gbit/s of every (leaf, path): per spine pooled over parallel cables, or per plane."""
    cap = topo.link_gbps()
    return cap.sum(axis=2) if pooled else cap.reshape(topo.leaves, topo.paths)


def check_routable(cap: np.ndarray, pi: np.ndarray, pj: np.ndarray) -> np.ndarray:
    """Usable paths per pair (bool, pairs x paths); raise UnroutableError if a pair has none."""
    usable = (cap[pi] > 0) & (cap[pj] > 0)
    dead = ~usable.any(axis=1)
    if dead.any():
        i, j = int(pi[dead][0]), int(pj[dead][0])
        raise UnroutableError(
            f"leaf{i}->leaf{j}", f"unroutable: every spine path between leaf {i} and leaf {j} is down"
        )
    return usable


def solve_paths(
    cap: np.ndarray,
    pi: np.ndarray,
    pj: np.ndarray,
    demand: np.ndarray,
    *,
    bg_up: np.ndarray | None = None,
    bg_down: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """Minimise the busiest fabric link; return (bytes per pair x path, seconds).

    cap: (leaves, paths) Gbit/s, used for the up hop (src leaf) and the down hop
    (dst leaf) of each path. pi, pj, demand: leaf pairs and their bytes.
    bg_up/bg_down: bytes already fixed on each (leaf, path) up/down link.
    """
    n_pairs, n_paths = len(pi), cap.shape[1]
    if n_pairs == 0:
        return np.zeros((0, n_paths)), 0.0
    usable = check_routable(cap, pi, pj)
    p_idx, t_idx = np.nonzero(usable)
    n_var = len(p_idx)
    # coefficient: seconds the link needs if the whole pair demand took this path
    up_coef = demand[p_idx] * 8.0 / (cap[pi[p_idx], t_idx] * 1e9)
    down_coef = demand[p_idx] * 8.0 / (cap[pj[p_idx], t_idx] * 1e9)
    ref = float(max(up_coef.max(), down_coef.max()))
    up_row_key = pi[p_idx] * n_paths + t_idx
    down_row_key = pj[p_idx] * n_paths + t_idx
    up_rows, up_ids = np.unique(up_row_key, return_inverse=True)
    down_rows, down_ids = np.unique(down_row_key, return_inverse=True)
    n_up = len(up_rows)
    rows = np.concatenate([up_ids, n_up + down_ids])
    cols = np.concatenate([np.arange(n_var), np.arange(n_var)])
    vals = np.concatenate([up_coef, down_coef]) / ref
    n_ub = n_up + len(down_rows)
    b_ub = np.zeros(n_ub)
    t_floor = 0.0
    if bg_up is not None and bg_down is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            up_t = np.where(bg_up > 0, bg_up * 8.0 / (cap * 1e9), 0.0)
            down_t = np.where(bg_down > 0, bg_down * 8.0 / (cap * 1e9), 0.0)
        t_floor = float(max(up_t.max(initial=0.0), down_t.max(initial=0.0)))
        b_ub = -np.concatenate([up_t.ravel()[up_rows], down_t.ravel()[down_rows]]) / ref
    # -T on every link row
    rows = np.concatenate([rows, np.arange(n_ub)])
    cols = np.concatenate([cols, np.full(n_ub, n_var)])
    vals = np.concatenate([vals, -np.ones(n_ub)])
    A_ub = coo_matrix((vals, (rows, cols)), shape=(n_ub, n_var + 1)).tocsr()
    A_eq = coo_matrix((np.ones(n_var), (p_idx, np.arange(n_var))), shape=(n_pairs, n_var + 1)).tocsr()
    c = np.zeros(n_var + 1)
    c[-1] = 1.0
    bounds = [(0, None)] * n_var + [(t_floor / ref, None)]
    res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=np.ones(n_pairs), bounds=bounds, method="highs")
    if res.status != 0:
        raise TrafficError("lp", f"HiGHS failed: {res.message}")
    frac = np.clip(res.x[:n_var], 0.0, None)
    out = np.zeros((n_pairs, n_paths))
    out[p_idx, t_idx] = frac
    out /= out.sum(axis=1, keepdims=True)
    return out * demand[:, None], float(res.x[-1] * ref)


def plan_lp(topo: LeafSpine, table: FlowTable, rows: np.ndarray, /) -> Assignment:
    """Ideal multipath: the fractional LP optimum over spine bundles (parallel cables pooled).

    The pooled per-spine amounts are then cut over the parallel cables in
    proportion to their capacity, so the plan is one a port can steer. No options.
    """
    if not len(rows):
        return Assignment.concat([])
    pi, pj, pair_of_row = leaf_pairs(topo, table, rows)
    amounts, seconds = solve_paths(path_capacity(topo, pooled=True), pi, pj, pair_demand(table, rows, pair_of_row))
    a = assign_bytes(topo, table, rows, pair_of_row, amounts, {"lp": {"fabric_seconds": seconds}}, pooled=True)
    return expand_pooled(topo, table, a)
