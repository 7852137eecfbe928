"""The maths of the optimal split: Birkhoff-von Neumann + McNaughton wrap-around.

Why it reaches the optimum. Let ``K[i, j]`` be what leaf ``i`` sends leaf ``j``
(bytes, or integer units of ``size / k``) and ``R`` the largest row or column
sum. Pad ``K`` with dummy mass until every line sums to ``R`` (always possible);
the padded matrix is ``R`` times a doubly stochastic matrix, so it is a sum of
permutation matrices with weights ``w`` summing to ``R`` (Birkhoff-von Neumann;
each perfect matching exists by Koenig's theorem). Lay the permutations end to
end on ``[0, R)`` and cut the line into ``X`` equal segments, one per spine
path: a permutation sends at most one unit of its weight out of each leaf and
into each leaf at every point of the line, so every segment gives every leaf at
most ``R / X`` up and down: exactly ``max(out_i, in_j) / X``, the optimum.

With equal flows of size ``b`` and ``Delta`` the largest flow degree, units of
``b / k`` with ``k = X / gcd(Delta, X)`` make ``R / X = Delta / gcd`` an integer,
so every cut falls on a unit boundary: each flow is ``k`` equal subflows. In the
regular case (every leaf sends and receives ``r`` flows) that is the ``s/g``
split of Koenig's edge colouring.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

__all__ = ["pad_to_regular", "bvn_cut", "lay_rows"]


def pad_to_regular(K: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Add dummy mass (north-west corner rule) so that every row and column sums to R."""
    rows, cols = K.sum(axis=1), K.sum(axis=0)
    R = max(rows.max(initial=0), cols.max(initial=0))
    dr, dc = R - rows, R - cols
    dummy = np.zeros_like(K)
    i = j = 0
    n = K.shape[0]
    while i < n and j < n:
        if dr[i] <= 0:
            i += 1
            continue
        if dc[j] <= 0:
            j += 1
            continue
        w = min(dr[i], dc[j])
        dummy[i, j] += w
        dr[i] -= w
        dc[j] -= w
    return K + dummy, dummy, R


def _matchings(M: np.ndarray, integer: bool, tol: float):
    """Yield (perm, weight) of a Birkhoff-von Neumann decomposition of M (modified in place)."""
    n = M.shape[0]
    rows = np.arange(n)
    while True:
        support = M > tol
        if not support.any():
            return
        match = maximum_bipartite_matching(csr_matrix(support), perm_type="column")
        if (match < 0).any():
            return  # only float round-off can get here; the caller spreads the rest evenly
        w = M[rows, match].min()
        M[rows, match] -= w
        if not integer:
            M[M <= tol] = 0.0
        yield match, w


def bvn_cut(K: np.ndarray, segments: int, *, integer: bool) -> np.ndarray:
    """Split K (L x L) into ``segments`` parts with every line sum <= R / segments.

    Returns amounts of shape (L, L, segments) summing to K over the last axis.
    """
    n = K.shape[0]
    M, dummy, R = pad_to_regular(K.astype(np.int64 if integer else np.float64))
    out = np.zeros((n, n, segments), dtype=M.dtype)
    if R <= 0:
        return out
    seg_len = R // segments if integer else R / segments
    tol = 0 if integer else R * 1e-12
    rows = np.arange(n)
    pos = M.dtype.type(0)
    work = M.copy()
    for match, w in _matchings(work, integer, tol):
        start, end = pos, pos + w
        first = int(start // seg_len)
        last = min(int(-(-end // seg_len)) - 1, segments - 1) if integer else min(int(end / seg_len - 1e-12), segments - 1)
        for t in range(first, last + 1):
            lo, hi = max(start, t * seg_len), min(end, (t + 1) * seg_len)
            if t == last:
                hi = end
            if hi > lo:
                out[rows, match, t] += hi - lo
        pos = end
    if not integer and work.sum() > 0:  # round-off leftovers: an even split keeps every bound
        out += work[:, :, None] / segments
    # remove the dummy mass, taking it from the last segments of each pair
    for i, j in zip(*np.nonzero(dummy)):
        excess = dummy[i, j]
        for t in range(segments - 1, -1, -1):
            take = min(excess, out[i, j, t])
            out[i, j, t] -= take
            excess -= take
            if excess <= 0:
                break
    return out


def lay_rows(
    pair_of_row: np.ndarray, row_len: np.ndarray, pair_amounts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut rows laid end to end inside their pair by the pair's per-path amounts.

    pair_of_row: pair index of every row; row_len: row length (units or bytes);
    pair_amounts: (pairs, paths) amounts whose row sums equal the pair totals.
    Returns (row, path, overlap) for every non-empty piece. Rows of one pair
    occupy consecutive stretches, so a row spans as few paths as the cut allows.
    """
    n_pairs, n_paths = pair_amounts.shape
    order = np.argsort(pair_of_row, kind="stable")
    lens = row_len[order].astype(np.float64)
    pair_sorted = pair_of_row[order]
    pair_total = np.bincount(pair_sorted, weights=lens, minlength=n_pairs)
    pair_base = np.concatenate([[0.0], np.cumsum(pair_total)[:-1]])
    row_end = np.cumsum(lens)
    row_start = row_end - lens
    # path segments in global coordinates, only non-empty ones
    amounts = pair_amounts.astype(np.float64)
    scale = np.divide(pair_total, amounts.sum(axis=1), out=np.ones(n_pairs), where=amounts.sum(axis=1) > 0)
    amounts = amounts * scale[:, None]  # absorb round-off so segments tile each pair exactly
    seg_end_local = np.cumsum(amounts, axis=1)
    seg_end_local[:, -1] = pair_total
    p_idx, t_idx = np.nonzero(amounts > 0)
    seg_end = pair_base[p_idx] + seg_end_local[p_idx, t_idx]
    seg_start = seg_end - amounts[p_idx, t_idx]
    first = np.searchsorted(seg_end, row_start, side="right")
    last = np.searchsorted(seg_start, row_end, side="left") - 1
    last = np.maximum(last, first)
    span = last - first + 1
    rep_row = np.repeat(np.arange(len(order)), span)
    seg = np.repeat(first, span) + (np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span))
    seg = np.minimum(seg, len(seg_end) - 1)
    overlap = np.minimum(row_end[rep_row], seg_end[seg]) - np.maximum(row_start[rep_row], seg_start[seg])
    keep = overlap > 1e-9 * np.maximum(lens[rep_row], 1e-300)
    return order[rep_row[keep]], t_idx[seg[keep]], overlap[keep]
