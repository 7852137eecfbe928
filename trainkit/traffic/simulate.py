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

    rel_tol > 0 freezes every link whose fair share is within that factor of the
    smallest in one round (fewer rounds; rates err low by at most rel_tol).
    """
    rate = np.zeros(A.shape[0])
    residual = cap.astype(np.float64).copy()
    active = active.copy()
    AT = A.T.tocsr() if AT is None else AT
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
        residual -= inc * denom
        saturated = used & ((residual <= 1e-9 * cap) | (share <= inc * (1 + rel_tol)))
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


def _group(cols: np.ndarray, size: np.ndarray, count: np.ndarray):
    """Merge entities with identical links and size (cols: entities x 4, -1 = no link)."""
    key = np.concatenate([cols, size.view(np.int64)[:, None]], axis=1)
    uniq, inv = np.unique(key, axis=0, return_inverse=True)
    return uniq[:, :4], size[np.unique(inv, return_index=True)[1]], np.bincount(inv.ravel(), weights=count)


def _matrix(cols: np.ndarray, n_links: int) -> csr_matrix:
    rows = np.repeat(np.arange(len(cols)), cols.shape[1]).reshape(cols.shape)
    ok = cols >= 0
    return coo_matrix((np.ones(int(ok.sum())), (rows[ok], cols[ok])), shape=(len(cols), n_links)).tocsr()


def simulate(p: Plan, *, group_limit: int = GROUP_LIMIT, rel_tol: float = 0.0) -> SimResult:
    """Completion time of every phase of a plan, under max-min fair sharing.

    rel_tol trades exactness for speed on plans with many distinct link loads
    (ECMP at scale): rates and finishing events are batched within that factor.
    """
    times = []
    for ph in p.phases:
        a, t = ph.assignment, ph.table
        links = _Links(p.topology, t)
        pooled = len(a.row) > group_limit
        hu, hd = links.host(t, a.row, pooled)
        fab = a.spine >= 0
        r = a.row
        fu = np.where(fab, links.fabric(t.src_leaf[r], a.spine, a.up_link, down=False), -1)
        fd = np.where(fab, links.fabric(t.dst_leaf[r], a.spine, a.down_link, down=True), -1)
        cols = np.stack([hu, hd, fu, fd], axis=1)
        size, count = a.each.astype(np.float64), a.count.astype(np.float64)
        if pooled:
            cols, size, count = _group(cols, size, count)
        times.append(_run(_matrix(cols, len(links.cap)), count, size, links.cap, rel_tol))
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
            cols, size, count = _group(np.stack([hu, hd, t.src_leaf, t.dst_leaf], axis=1), size, count)
            hu, hd, src_leaf, dst_leaf = cols.T
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
