"""Steering output: per-subflow RoCEv2 source ports and NCCL settings (plan.json).

Why source ports: switches pick an uplink by hashing the 5-tuple, so the only
knob a host has over the path is the UDP source port of each QP. For every
planned subflow we search the RoCEv2 range (49152-65535) for a port whose hash,
under the configured :class:`HashModel`, selects the planned uplink at the
source leaf (and, with parallel cables, the planned cable at the spine). Ports
of one NIC pair are distinct. NCCL cannot pin a QP's source port; a RoCE stack
that sets it per QP (``mlx5dv_modify_qp_udp_sport``) can apply these ports,
and NCCL_IB_QPS_PER_CONNECTION / NCCL_IB_SPLIT_DATA_ON_QPS give the QP count
and the even split the plan assumes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from trainkit.traffic.ecmp import uplink_candidates
from trainkit.traffic.errors import TrafficError
from trainkit.traffic.hashing import ROCE_PORT_MAX, ROCE_PORT_MIN, HashModel
from trainkit.traffic.plan import Plan, PhasePlan
from trainkit.traffic.topology import LeafSpine

__all__ = ["source_ports", "nccl_settings", "plan_document", "write_plan"]

_RANGE = ROCE_PORT_MAX - ROCE_PORT_MIN + 1


def _members(topo: LeafSpine, src_leaf, dst_leaf, spine, up_link, down_link):
    """ECMP member index of the planned uplink and of the planned spine cable, and group sizes."""
    P = topo.links_per_spine
    order, n_up = uplink_candidates(topo, src_leaf, dst_leaf)
    target = spine * P + up_link
    pos_up = np.argmax(order == target[:, None], axis=1)
    if P == 1:
        return pos_up, n_up, np.zeros(len(spine), np.int64), np.ones(len(spine), np.int64)
    alive = topo.link_gbps()[dst_leaf, spine] > 0
    d_order = np.argsort(~alive, axis=1, kind="stable")
    pos_down = np.argmax(d_order == down_link[:, None], axis=1)
    return pos_up, n_up, pos_down, alive.sum(axis=1)


def source_ports(
    topo: LeafSpine, hm: HashModel, src, dst, src_leaf, dst_leaf, spine, up_link, down_link
) -> np.ndarray:
    """A distinct source port per subflow (one row each) that hashes onto its planned path."""
    if not hm.steerable:
        raise TrafficError("hash.fields", "the hash model ignores src_port, so no port can steer a subflow")
    n = len(src)
    ports = np.full(n, -1, np.int64)
    if n == 0:
        return ports
    pos_up, n_up, pos_down, n_down = _members(topo, src_leaf, dst_leaf, spine, up_link, down_link)
    # rank of each subflow among those of the same NIC pair and same target: take the rank-th match
    key = np.stack([src, dst, pos_up, pos_down], axis=1)
    order = np.lexsort(key.T[::-1])
    sk = key[order]
    new = np.r_[True, (sk[1:] != sk[:-1]).any(axis=1)]
    group_start = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - group_start
    width = int(min(_RANGE, max(256, 4 * int((n_up * n_down).max()) * (int(rank.max()) + 1))))
    todo = np.arange(n)
    offset = 0
    while len(todo) and offset < _RANGE:
        span = min(width, _RANGE - offset)
        cand = ROCE_PORT_MIN + offset + np.arange(span)
        s, d = src[todo, None], dst[todo, None]
        ok = hm.select(s, d, cand[None, :], n_up[todo, None]) == pos_up[todo, None]
        if topo.links_per_spine > 1:
            ok &= hm.select(s, d, cand[None, :], n_down[todo, None], spine=True) == pos_down[todo, None]
        hits = np.cumsum(ok, axis=1)
        found = hits[:, -1] > rank[todo]
        where = np.argmax(hits > rank[todo, None], axis=1)
        ports[todo[found]] = cand[where[found]]
        rank[todo] -= hits[:, -1]  # matches in this window are used by lower ranks
        todo = todo[~found]
        offset += span
    if len(todo):
        i = int(todo[0])
        raise TrafficError(
            "hash", f"no free source port steers NIC {int(src[i])} -> {int(dst[i])} onto spine {int(spine[i])}"
        )
    return ports


def nccl_settings(p: Plan) -> dict[str, str]:
    """NCCL environment that yields the planned QPs per connection and an even split."""
    qps = p.qps_per_connection()
    return {"NCCL_IB_QPS_PER_CONNECTION": str(qps), "NCCL_IB_SPLIT_DATA_ON_QPS": "1" if qps > 1 else "0"}


def _even_split(p: Plan) -> bool:
    """True when every flow's subflows carry equal bytes (what NCCL_IB_SPLIT_DATA_ON_QPS does)."""
    for ph in p.phases:
        a = ph.assignment
        if not len(a.row):
            continue
        lo = np.full(len(ph.table), np.inf)
        hi = np.zeros(len(ph.table))
        np.minimum.at(lo, a.row, a.each)
        np.maximum.at(hi, a.row, a.each)
        used = hi > 0
        if (hi[used] > lo[used] * (1 + 1e-9)).any():
            return False
    return True


def _phase_doc(p: Plan, ph: PhasePlan, hm: HashModel) -> dict[str, Any]:
    a, t, topo = ph.assignment, ph.table, p.topology
    # one record per QP for explicit flows; aggregated rows stay per leaf pair
    explicit = t.src[a.row] >= 0
    idx = np.repeat(np.flatnonzero(explicit), a.count[explicit])
    r = a.row[idx]
    fab = a.spine[idx] >= 0
    ports = np.full(len(idx), -1, np.int64)
    if fab.any():
        f = idx[fab]
        ports[fab] = source_ports(
            topo, hm, t.src[a.row[f]], t.dst[a.row[f]], t.src_leaf[a.row[f]], t.dst_leaf[a.row[f]],
            a.spine[f], a.up_link[f], a.down_link[f],
        )
    flows: dict[int, dict[str, Any]] = {}
    for k, (row, i) in enumerate(zip(r.tolist(), idx.tolist())):
        rec = flows.setdefault(row, {"src": int(t.src[row]), "dst": int(t.dst[row]),
                                     "nbytes": float(t.size[row]), "subflows": []})
        spine = int(a.spine[i])
        rec["subflows"].append({
            "nbytes": float(a.each[i]),
            "spine": None if spine < 0 else spine,
            "up_link": None if spine < 0 else int(a.up_link[i]),
            "down_link": None if spine < 0 else int(a.down_link[i]),
            "src_port": None if ports[k] < 0 else int(ports[k]),
        })
    agg = np.flatnonzero(~explicit)
    pairs = [
        {"src_leaf": int(t.src_leaf[a.row[i]]), "dst_leaf": int(t.dst_leaf[a.row[i]]),
         "spine": None if a.spine[i] < 0 else int(a.spine[i]),
         "up_link": None if a.spine[i] < 0 else int(a.up_link[i]),
         "down_link": None if a.spine[i] < 0 else int(a.down_link[i]),
         "subflows": int(a.count[i]), "nbytes": float(a.each[i] * a.count[i])}
        for i in agg.tolist()
    ]
    return {
        "index": ph.index, "name": ph.phase.name, "repeat": ph.phase.repeat,
        "max_link_load_s": ph.max_link_load, "fabric_load_s": ph.fabric_time, "host_load_s": ph.host_time,
        "flows": list(flows.values()), "leaf_pairs": pairs,
    }


def plan_document(p: Plan, *, hash_model: HashModel | None = None) -> dict[str, Any]:
    """The plan.json content: per flow its subflows with bytes, spine/cables and source port."""
    hm = hash_model or p.info.get("hash_model") or HashModel()
    return {
        "format": "trainkit.traffic.plan/1",
        "method": p.method,
        "topology": p.topology.to_dict(),
        "hash": {"fields": list(hm.fields), "seed": hm.seed, "spine_fields": list(hm.spine_fields),
                 "spine_seed": hm.spine_seed,
                 "ip_base": hm.ip_base, "dst_port": hm.dst_port, "proto": hm.proto,
                 "select": "zlib.crc32(packed fields, seed) % ecmp_members"},
        "max_link_load_s": p.max_link_load,
        "fabric_load_s": p.fabric_load,
        "host_load_s": p.host_load,
        "subflows_per_flow": p.subflow_stats(),
        "nccl": nccl_settings(p),
        "even_split": _even_split(p),
        "note": "Source ports need a RoCE stack that sets them per QP (e.g. mlx5dv_modify_qp_udp_sport); "
                "NCCL itself cannot pin them. Aggregated all-to-all phases list per-leaf-pair shares only.",
        "phases": [_phase_doc(p, ph, hm) for ph in p.phases],
    }


def write_plan(p: Plan, path: str | Path, *, hash_model: HashModel | None = None) -> dict[str, Any]:
    doc = plan_document(p, hash_model=hash_model)
    Path(path).write_text(json.dumps(doc, indent=1))
    return doc
