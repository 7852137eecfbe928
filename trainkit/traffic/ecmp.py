"""The ``ecmp`` planner: what the switches do on their own.

Every flow (or each of its ``qps`` QPs) gets a random RoCEv2 source port from a
seeded generator; the source leaf hashes the 5-tuple over its usable uplinks
(those whose spine still reaches the destination leaf), and with parallel
cables the spine hashes again, with its own seed, over its cables to the
destination leaf. Aggregated leaf-pair rows draw their per-uplink counts from
a multinomial, which is what uniform hashing of random ports gives.
"""

from __future__ import annotations

import numpy as np

from trainkit.traffic.demand import FlowTable
from trainkit.traffic.hashing import ROCE_PORT_MAX, ROCE_PORT_MIN, HashModel
from trainkit.traffic.plan import Assignment
from trainkit.traffic.topology import LeafSpine

__all__ = ["plan_ecmp", "uplink_candidates"]


def uplink_candidates(topo: LeafSpine, src_leaf: np.ndarray, dst_leaf: np.ndarray):
    """ECMP members per row: (candidate uplink ids (rows, S*P) sorted, count), and down members.

    An uplink id is ``spine * P + link``; members come first in id order.
    """
    cap = topo.link_gbps()  # (L, S, P)
    S, P = topo.spines, topo.links_per_spine
    spine_reaches = (cap > 0).any(axis=2)  # (L, S): spine s has a live cable to leaf
    up_ok = (cap[src_leaf] > 0) & spine_reaches[dst_leaf][:, :, None]
    up_ok = up_ok.reshape(len(src_leaf), S * P)
    order = np.argsort(~up_ok, axis=1, kind="stable")
    return order, up_ok.sum(axis=1)


def _down_choice(topo: LeafSpine, hm: HashModel, dst_leaf, spine, src, dst, ports) -> np.ndarray:
    P = topo.links_per_spine
    if P == 1:
        return np.zeros(len(spine), np.int64)
    alive = topo.link_gbps()[dst_leaf, spine] > 0  # (n, P)
    order = np.argsort(~alive, axis=1, kind="stable")
    pick = hm.select(src, dst, ports, alive.sum(axis=1), spine=True)
    return order[np.arange(len(spine)), pick]


def plan_ecmp(
    topo: LeafSpine, table: FlowTable, rows: np.ndarray, /, *, seed: int = 0, hash_model: HashModel | None = None,
    qps: int = 1,
) -> Assignment:
    """Hash the inter-leaf ``rows`` of one phase as the switches would (see module docstring).

    seed: of the random source ports (and of the multinomial for aggregated rows).
    hash_model: the switches' hash (default :class:`HashModel`()).
    qps: QPs per connection; each gets its own source port and ``1/qps`` of the bytes.
    """
    hm = hash_model or HashModel()
    rng = np.random.default_rng(seed)
    P = topo.links_per_spine
    explicit = rows[table.src[rows] >= 0]
    agg = rows[table.src[rows] < 0]
    parts = []
    if len(explicit):
        r = np.repeat(explicit, qps)
        src, dst = table.src[r], table.dst[r]
        ports = rng.integers(ROCE_PORT_MIN, ROCE_PORT_MAX + 1, size=len(r))
        order, n = uplink_candidates(topo, table.src_leaf[r], table.dst_leaf[r])
        pick = hm.select(src, dst, ports, n)
        uplink = order[np.arange(len(r)), pick]
        spine, up = uplink // P, uplink % P
        down = _down_choice(topo, hm, table.dst_leaf[r], spine, src, dst, ports)
        a = Assignment(r, spine, up, down, table.size[r] / qps, np.ones(len(r), np.int64))
        object.__setattr__(a, "info", {"ports": ports})
        parts.append(a)
    for row in agg.tolist():
        order, n = uplink_candidates(topo, table.src_leaf[[row]], table.dst_leaf[[row]])
        counts = rng.multinomial(int(table.count[row]) * qps, np.full(n[0], 1.0 / n[0]))
        hit = np.flatnonzero(counts)
        uplink = order[0, hit]
        spine, up = uplink // P, uplink % P
        cnt = counts[hit]
        down = np.zeros(len(hit), np.int64)
        if P > 1:  # spine spreads each uplink's flows over its live cables
            pieces = []
            for s, u, c in zip(spine.tolist(), up.tolist(), cnt.tolist()):
                alive = np.flatnonzero(topo.link_gbps()[table.dst_leaf[row], s] > 0)
                split = rng.multinomial(c, np.full(len(alive), 1.0 / len(alive)))
                pieces += [(s, u, int(k), int(m)) for k, m in zip(alive, split) if m]
            spine, up, down, cnt = (np.array(x, np.int64) for x in zip(*pieces))
        parts.append(Assignment(np.full(len(spine), row), spine, up, down,
                                np.full(len(spine), table.size[row] / qps), cnt))
    out = Assignment.concat(parts)
    per_uplink = np.bincount(table.src_leaf[out.row] * topo.paths + out.spine * P + out.up_link,
                             weights=out.count, minlength=topo.leaves * topo.paths)
    used_leaves = np.unique(table.src_leaf[rows])
    per_uplink = per_uplink.reshape(topo.leaves, topo.paths)[used_leaves].ravel()
    hist = np.bincount(per_uplink.astype(np.int64))
    out.info["ecmp"] = {
        "seed": seed,
        "subflows_per_uplink_mean": float(per_uplink.mean()) if len(per_uplink) else 0.0,
        "subflows_per_uplink_max": int(per_uplink.max()) if len(per_uplink) else 0,
        "idle_uplinks": int((per_uplink == 0).sum()),
        "histogram": hist.tolist(),  # histogram[n] = uplinks carrying n subflows
    }
    return out
