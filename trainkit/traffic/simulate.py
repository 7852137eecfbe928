"""Flow-level simulator: max-min fair sharing by progressive filling, per phase.

Why flow level: collectives are a few long flows, so per-packet detail adds
nothing a rate allocation does not capture, and max-min fairness is what
congestion-controlled RoCE converges to. Each phase starts all its subflows
together; rates come from progressive filling, and whenever a subflow finishes
the rates are recomputed (event-driven). A phase's time is when its last byte
lands; the collective's time is the sum over phases of repeat x phase time.

Entities carry fractional link weights, so ideal packet spraying is the same
machinery: a sprayed flow puts ``1/paths`` of its rate on every usable path.

Example::

    result = simulate(plan(topo, flows, method="split"))
    ideal = simulate_spraying(topo, flows)
    result.total / ideal.total
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix, csr_matrix

from trainkit.traffic.collectives import Flows
from trainkit.traffic.demand import EXPAND_LIMIT, FlowTable, build_table
from trainkit.traffic.plan import Plan
from trainkit.traffic.topology import LeafSpine

__all__ = ["SimResult", "simulate", "simulate_spraying", "max_min_rates"]


@dataclass(frozen=True)
class SimResult:
    phase_seconds: tuple[float, ...]  # one repeat of each phase
    repeats: tuple[int, ...]

    @property
    def total(self) -> float:
        """Completion time of the whole collective (seconds)."""
        return float(sum(t * r for t, r in zip(self.phase_seconds, self.repeats)))


def max_min_rates(
    A: csr_matrix,
    count: np.ndarray,
    cap: np.ndarray,
    active: np.ndarray,
    AT: csr_matrix | None = None,
    rel_tol: float = 0.0,
) -> np.ndarray:
    """Max-min fair rate per entity: A (entities x links) link weights, count identical copies.

    rel_tol > 0 freezes, in one round, every link whose fair share is within
    rel_tol of the current water level (fewer rounds; rates err low by at most
    that factor).
    """
    rate = np.zeros(A.shape[0])
    residual = cap.astype(np.float64).copy()
    active = active.copy()
    AT = A.T.tocsr() if AT is None else AT
    level = 0.0  # rate every still-active entity has reached
    for _ in range(A.shape[1] + 1):
        if not active.any():
            break
        denom = AT @ (count * active)
        used = denom > 0
        if not used.any():
            break
        share = np.full(len(cap), np.inf)
        share[used] = residual[used] / denom[used]
        inc = max(float(share.min()), 0.0)
        rate[active] += inc
        level += inc
        residual -= inc * denom
        saturated = used & ((residual <= 1e-9 * cap) | (share <= inc + rel_tol * level))
        residual[saturated] = 0.0
        hit = (A @ saturated.astype(np.float64)) > 0
        active &= ~hit
    return rate


def _run(A: csr_matrix, count: np.ndarray, size: np.ndarray, cap: np.ndarray, rel_tol: float = 0.0) -> float:
    remaining = size.astype(np.float64).copy()
    alive = remaining > 0
    now = 0.0
    AT = A.T.tocsr()
    while alive.any():
        rate = max_min_rates(A, count, cap, alive, AT, rel_tol)
        if not (rate[alive] > 0).all():
            return float("inf")  # a subflow crosses a dead link
        finish = remaining[alive] / rate[alive]
        dt = float(finish.min())
        # entities finishing within rel_tol of this moment (absolute time) finish with it
        batch = finish <= (now + dt) * (1 + rel_tol) - now + dt * 1e-12
        now += dt
        remaining[alive] -= rate[alive] * dt
        done = alive & (remaining <= 1e-9 * np.maximum(size, 1.0))
        done[np.flatnonzero(alive)[batch]] = True
        alive &= ~done
    return now


GROUP_LIMIT = 20_000  # above this many subflows, host links of a leaf are pooled


class _Links:
    """Index of every directed link of a phase, with capacities in bytes/s.

    Host links are per NIC, or pooled per leaf (capacity = NICs that send, or
    receive, on the leaf x host_gbps) for aggregated rows and for very large
    phases: exact for symmetric all-to-all, and it keeps the event count
    proportional to leaf pairs rather than NIC pairs.
    """

    def __init__(self, topo: LeafSpine, table: FlowTable) -> None:
        N, L, S, P = topo.nics, topo.leaves, topo.spines, topo.links_per_spine
        self.topo = topo
        self.host_up, self.host_down = 0, N
        self.fab_up, self.fab_down = 2 * N, 2 * N + L * S * P
        self.pool_up, self.pool_down = 2 * N + 2 * L * S * P, 2 * N + 2 * L * S * P + L
        senders = np.bincount(topo.leaf_of(np.flatnonzero(table.host_tx > 0)), minlength=L).astype(float)
        receivers = np.bincount(topo.leaf_of(np.flatnonzero(table.host_rx > 0)), minlength=L).astype(float)
        fab = topo.link_gbps().ravel()
        host = np.full(N, float(topo.host_gbps))
        self.cap = np.concatenate([host, host, fab, fab, senders * topo.host_gbps, receivers * topo.host_gbps])
        self.cap = self.cap * 1e9 / 8

    def host(self, table: FlowTable, rows: np.ndarray, pooled: bool) -> tuple[np.ndarray, np.ndarray]:
        agg = (table.src[rows] < 0) | pooled
        up = np.where(agg, self.pool_up + table.src_leaf[rows], self.host_up + table.src[rows])
        down = np.where(agg, self.pool_down + table.dst_leaf[rows], self.host_down + table.dst[rows])
        return up, down

    def fabric(self, leaf: np.ndarray, spine: np.ndarray, link: np.ndarray, *, down: bool) -> np.ndarray:
        S, P = self.topo.spines, self.topo.links_per_spine
        return (self.fab_down if down else self.fab_up) + (leaf * S + spine) * P + link


def _group_rows(A: csr_matrix, size: np.ndarray, count: np.ndarray):
    """Merge entities with identical link weights and size into one entity with summed count."""
    keys: dict[bytes, int] = {}
    inv = np.empty(A.shape[0], np.int64)
    for r in range(A.shape[0]):
        lo, hi = A.indptr[r], A.indptr[r + 1]
        key = A.indices[lo:hi].tobytes() + np.round(A.data[lo:hi], 12).tobytes() + size[r : r + 1].tobytes()
        inv[r] = keys.setdefault(key, len(keys))
    first = np.unique(inv, return_index=True)[1]
    return A[first], size[first], np.bincount(inv, weights=count)


def simulate(p: Plan, *, group_limit: int = GROUP_LIMIT, rel_tol: float = 0.0) -> SimResult:
    """Completion time of every phase of a plan, under max-min fair sharing.

    The subflows of one flow advance together: NCCL splits each message evenly
    over a connection's QPs and waits for all of them, so a split flow is one
    entity whose rate lands on each path in proportion to the bytes planned
    there (the same machinery as spraying, restricted to the planned paths).
    Aggregated leaf-pair rows are simulated per record (``count`` equal
    subflows on one path), with pooled host links.
    rel_tol trades exactness for speed on plans with many distinct link loads
    (ECMP at scale): rates and finishing events are batched within that factor.
    """
    times = []
    for ph in p.phases:
        a, t = ph.assignment, ph.table
        links = _Links(p.topology, t)
        pooled = len(t) > group_limit
        explicit = t.src >= 0
        # entities: one per explicit flow (its subflows coupled), one per record of aggregated rows
        rec_agg = np.flatnonzero(~explicit[a.row])
        rows_e = np.flatnonzero(explicit)
        n_e, n = len(rows_e), len(rows_e) + len(rec_agg)
        entity_of_row = np.full(len(t), -1, np.int64)
        entity_of_row[rows_e] = np.arange(n_e)
        ent_rows = np.concatenate([rows_e, a.row[rec_agg]])
        hu, hd = links.host(t, ent_rows, pooled)
        rec_entity = entity_of_row[a.row]
        rec_entity[rec_agg] = n_e + np.arange(len(rec_agg))
        fab = a.spine >= 0
        r = a.row[fab]
        rec_bytes = (a.each * a.count)[fab]
        share = np.where(explicit[r], rec_bytes / t.row_bytes[r], 1.0)
        fu = links.fabric(t.src_leaf[r], a.spine[fab], a.up_link[fab], down=False)
        fd = links.fabric(t.dst_leaf[r], a.spine[fab], a.down_link[fab], down=True)
        ent = np.arange(n)
        A = coo_matrix(
            (np.concatenate([np.ones(2 * n), share, share]),
             (np.concatenate([ent, ent, rec_entity[fab], rec_entity[fab]]), np.concatenate([hu, hd, fu, fd]))),
            shape=(n, len(links.cap)),
        ).tocsr()
        A.sum_duplicates()
        size = np.concatenate([t.size[rows_e], a.each[rec_agg]]).astype(np.float64)
        count = np.concatenate([t.count[rows_e], a.count[rec_agg]]).astype(np.float64)
        if pooled:
            A, size, count = _group_rows(A, size, count)
        times.append(_run(A, count, size, links.cap, rel_tol))
    return SimResult(tuple(times), tuple(ph.phase.repeat for ph in p.phases))


def simulate_spraying(
    topo: LeafSpine, flows: Flows, *, expand_limit: int = EXPAND_LIMIT, group_limit: int = GROUP_LIMIT
) -> SimResult:
    """Ideal per-packet spraying: every flow spreads evenly over all usable paths."""
    cap = topo.link_gbps()  # (L, S, P)
    times = []
    for phase in flows.phases:
        t = build_table(topo, phase, expand_limit=expand_limit)
        links = _Links(topo, t)
        rows_all = np.arange(len(t))
        pooled = len(t) > group_limit
        hu, hd = links.host(t, rows_all, pooled)
        size, count = t.size.astype(np.float64), t.count.astype(np.float64)
        if pooled:  # identical flows of a leaf pair spray identically
            key = np.stack([hu, hd, t.src_leaf, t.dst_leaf, size.view(np.int64)], axis=1)
            uniq, first, inv = np.unique(key, axis=0, return_index=True, return_inverse=True)
            hu, hd, src_leaf, dst_leaf = uniq[:, :4].T
            size, count = size[first], np.bincount(inv.ravel(), weights=count)
        else:
            src_leaf, dst_leaf = t.src_leaf, t.dst_leaf
        n = len(size)
        idx = np.arange(n)
        rows, cols_, vals = [idx, idx], [hu, hd], [np.ones(n), np.ones(n)]
        inter = np.flatnonzero(src_leaf != dst_leaf)
        if len(inter):
            pairs, inv = np.unique(src_leaf[inter] * topo.leaves + dst_leaf[inter], return_inverse=True)
            for k, key in enumerate(pairs.tolist()):
                i, j = divmod(key, topo.leaves)
                reach = cap[j] > 0  # (S, P) down cables of spine s to leaf j
                up_ok = (cap[i] > 0) & reach.any(axis=1)[:, None]
                w_up = up_ok / up_ok.sum()
                per_spine = w_up.sum(axis=1)
                w_down = np.where(reach, per_spine[:, None] / np.maximum(reach.sum(axis=1, keepdims=True), 1), 0.0)
                members = inter[inv.ravel() == k]
                for w, leaf, down in ((w_up, i, False), (w_down, j, True)):
                    s_arr, k_arr = np.nonzero(w)
                    lk = links.fabric(np.full(len(s_arr), leaf), s_arr, k_arr, down=down)
                    rows.append(np.repeat(members, len(lk)))
                    cols_.append(np.tile(lk, len(members)))
                    vals.append(np.tile(w[s_arr, k_arr], len(members)))
        A = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols_))),
                       shape=(n, len(links.cap))).tocsr()
        times.append(_run(A, count, size, links.cap))
    return SimResult(tuple(times), tuple(ph.repeat for ph in flows.phases))
