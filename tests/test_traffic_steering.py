"""Steering: every emitted source port really hashes onto its planned path."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from trainkit.traffic import PLANNERS, HashModel, LeafSpine, TrafficError, collective, combine, plan
from trainkit.traffic.ecmp import uplink_candidates
from trainkit.traffic.planners import planner_options
from trainkit.traffic.steering import plan_document, write_plan


def _check_ports(topo: LeafSpine, hm: HashModel, doc: dict) -> int:
    """Recompute every port's hash with zlib itself and compare with the plan."""
    checked = 0
    for ph in doc["phases"]:
        for flow in ph["flows"]:
            src, dst = flow["src"], flow["dst"]
            sl, dl = int(topo.leaf_of(src)), int(topo.leaf_of(dst))
            ports = [sf["src_port"] for sf in flow["subflows"] if sf["spine"] is not None]
            assert len(ports) == len(set(ports)), "two QPs of one connection share a port"
            assert abs(sum(sf["nbytes"] for sf in flow["subflows"]) - flow["nbytes"]) <= 1e-6 * flow["nbytes"]
            for sf in flow["subflows"]:
                if sf["spine"] is None:
                    assert sl == dl and sf["src_port"] is None
                    continue
                port = sf["src_port"]
                assert 49152 <= port <= 65535
                order, n = uplink_candidates(topo, np.array([sl]), np.array([dl]))
                leaf_hash = zlib.crc32(hm.message(src, dst, port), hm.seed)
                assert order[0, leaf_hash % n[0]] == sf["spine"] * topo.links_per_spine + sf["up_link"]
                if topo.links_per_spine > 1:
                    alive = np.flatnonzero(topo.link_gbps()[dl, sf["spine"]] > 0)
                    spine_hash = zlib.crc32(hm.message(src, dst, port, spine=True), hm.spine_seed)
                    assert alive[spine_hash % len(alive)] == sf["down_link"]
                checked += 1
    return checked


def test_vectorised_crc_equals_zlib():
    hm = HashModel(seed=1234, fields=("dst_ip", "src_port", "src_ip", "dst_port"))
    rng = np.random.default_rng(0)
    src, dst = rng.integers(0, 5000, 200), rng.integers(0, 5000, 200)
    ports = rng.integers(49152, 65536, 200)
    got = hm.crc(src, dst, ports)
    want = [zlib.crc32(hm.message(int(a), int(b), int(p)), 1234) for a, b, p in zip(src, dst, ports)]
    assert got.tolist() == want
    got_spine = hm.crc(src, dst, ports, spine=True)
    want_spine = [zlib.crc32(hm.message(int(a), int(b), int(p), spine=True), hm.spine_seed)
                  for a, b, p in zip(src, dst, ports)]
    assert got_spine.tolist() == want_spine


@pytest.mark.parametrize(
    "topo",
    [
        LeafSpine(leaves=8, spines=8, hosts_per_leaf=4, host_gbps=400, uplink_gbps=100),
        LeafSpine(leaves=4, spines=3, hosts_per_leaf=4, nics_per_host=2, uplink_gbps=100, links_per_spine=2),
        LeafSpine(leaves=4, spines=4, hosts_per_leaf=4, uplink_gbps=100, links_per_spine=2).with_down(1, 2, link=0)
        .with_degraded(2, 3, 0.5),
    ],
    ids=["healthy", "parallel", "impaired"],
)
@pytest.mark.parametrize("method", list(PLANNERS))
def test_every_port_hashes_to_its_planned_uplink(topo, method):
    hm = HashModel(seed=77)
    flows = combine(
        collective("allreduce_ring", hosts=range(0, topo.nics // 2), nbytes=64 << 20, channels=2),
        collective("alltoall", hosts=range(topo.nics // 2, topo.nics), nbytes=8 << 20),
    )
    given = {"hash_model": hm, "seed": 5}  # for the planners that hash (ecmp); steering gets hm below
    p = plan(topo, flows, method=method, **{k: v for k, v in given.items() if k in planner_options(method)})
    doc = plan_document(p, hash_model=hm)
    assert _check_ports(topo, hm, doc) > 0


def test_plan_json_fields_and_nccl(tmp_path):
    topo = LeafSpine(leaves=4, spines=4, hosts_per_leaf=2, host_gbps=400, uplink_gbps=100)
    flows = collective("allreduce_ring", hosts=range(8), nbytes=32 << 20)
    p = plan(topo, flows, method="split")
    write_plan(p, tmp_path / "plan.json")
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["method"] == "split" and doc["even_split"] is True
    assert doc["nccl"] == {"NCCL_IB_QPS_PER_CONNECTION": "4", "NCCL_IB_SPLIT_DATA_ON_QPS": "1"}
    assert doc["max_link_load_s"] == pytest.approx(p.max_link_load)
    inter = [f for f in doc["phases"][0]["flows"] if topo.leaf_of(f["src"]) != topo.leaf_of(f["dst"])]
    assert inter and all(len(f["subflows"]) == 4 for f in inter)
    assert {sf["spine"] for f in inter for sf in f["subflows"]} == {0, 1, 2, 3}


def test_hash_model_without_source_port_cannot_steer():
    topo = LeafSpine(leaves=2, spines=2, hosts_per_leaf=1, uplink_gbps=100)
    hm = HashModel(fields=("src_ip", "dst_ip"))
    p = plan(topo, collective("allreduce_ring", hosts=range(2), nbytes=1 << 20), method="split")
    with pytest.raises(TrafficError) as info:
        plan_document(p, hash_model=hm)
    assert info.value.field == "hash.fields"
    with pytest.raises(TrafficError):
        HashModel(fields=("src_ip", "vlan"))


def test_ecmp_is_seeded_and_reports_its_distribution():
    topo = LeafSpine(leaves=8, spines=8, hosts_per_leaf=8, host_gbps=400, uplink_gbps=100)
    flows = collective("alltoall", hosts=range(64), nbytes=64 << 20)
    a = plan(topo, flows, method="ecmp", seed=1)
    b = plan(topo, flows, method="ecmp", seed=1)
    c = plan(topo, flows, method="ecmp", seed=2)
    assert np.array_equal(a.phases[0].assignment.spine, b.phases[0].assignment.spine)
    assert not np.array_equal(a.phases[0].assignment.spine, c.phases[0].assignment.spine)
    info = a.phases[0].assignment.info["ecmp"]
    assert info["subflows_per_uplink_mean"] == pytest.approx(64 * 56 / 64)  # 56 remote peers per NIC
    assert info["subflows_per_uplink_max"] > info["subflows_per_uplink_mean"]
    assert sum(info["histogram"]) == 64
