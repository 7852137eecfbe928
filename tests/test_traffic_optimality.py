"""The maths: split reaches the LP optimum, with s/g subflows in the regular case.

Evidence, not examples: many random small instances (uneven placements,
oversubscribed fabrics, parallel cables, rail layout, every collective, two
jobs at once) are planned by ``split`` and by the HiGHS LP, and the fabric
loads must agree to 1e-9 relative.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainkit.traffic import PLANNERS, LeafSpine, UnroutableError, collective, flows_from_pairs, lower_bound, plan
from trainkit.traffic.planners import planner_options
from trainkit.traffic.scenarios import random_impairment, random_instance


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def test_split_equals_lp_on_random_healthy_instances():
    rng = np.random.default_rng(2024)
    checked = 0
    for _ in range(150):
        inst = random_instance(rng)
        s = plan(inst.topo, inst.flows, method="split")
        lp = plan(inst.topo, inst.flows, method="lp")
        assert _rel(s.fabric_load, lp.fabric_load) <= 1e-9, inst.label
        assert _rel(s.max_link_load, lp.max_link_load) <= 1e-9, inst.label
        # and both equal the closed-form optimum max(host, out_i/(s c), in_j/(s c))
        assert _rel(s.max_link_load, lower_bound(inst.topo, inst.flows)) <= 1e-9, inst.label
        # every byte of every flow is planned exactly once
        for ph in s.phases:
            planned = np.bincount(ph.assignment.row, weights=ph.assignment.each * ph.assignment.count,
                                  minlength=len(ph.table))
            assert np.allclose(planned, ph.table.row_bytes, rtol=1e-9)
        checked += 1
    assert checked == 150


@pytest.mark.parametrize("r, s", [(1, 4), (2, 4), (3, 4), (4, 4), (6, 4), (5, 8), (3, 6), (8, 2)])
def test_regular_case_uses_exactly_s_over_gcd_subflows(r, s):
    """Every leaf sends and receives r equal flows over s spines: s/gcd(r, s) subflows each."""
    leaves = r + 1
    hosts = r  # NIC k of leaf i sends to leaf i+1+k: r flows out and r in per leaf
    topo = LeafSpine(leaves=leaves, spines=s, hosts_per_leaf=hosts, host_gbps=1000, uplink_gbps=100)
    src, dst = [], []
    for i in range(leaves):
        for k in range(r):
            j = (i + 1 + k) % leaves
            src.append(i * hosts + k)
            dst.append(j * hosts + (hosts - 1 - k))
    flows = flows_from_pairs(src, dst, 1 << 20)
    p = plan(topo, flows, method="split")
    per_flow = p.phases[0].subflows_per_flow()
    assert (per_flow == s // math.gcd(r, s)).all()
    assert p.qps_per_connection() == s // math.gcd(r, s)
    assert p.phases[0].assignment.info["split"]["regular"] is True
    assert _rel(p.fabric_load, plan(topo, flows, method="lp").fabric_load) <= 1e-9
    sizes = [sf.nbytes for sf in p.subflows if sf.spine is not None]
    assert max(sizes) == pytest.approx(min(sizes))  # even split: what NCCL_IB_SPLIT_DATA_ON_QPS does


def test_non_regular_counter_example():
    """s=2; three leaves each send one flow to each of two leaves: unsplit gives 2, optimum 1.5."""
    topo = LeafSpine(leaves=5, spines=2, hosts_per_leaf=2, host_gbps=10_000, uplink_gbps=100)
    src = [0, 1, 2, 3, 4, 5]  # leaves 0, 1, 2 (two NICs each)
    dst = [6, 8, 7, 9, 7, 8]  # each sends one flow to leaf 3 (NICs 6, 7) and one to leaf 4 (8, 9)
    nbytes = 1e9
    flows = flows_from_pairs(src, dst, nbytes)
    unit = nbytes * 8 / (100 * 1e9)  # one flow alone on one cable
    assert plan(topo, flows, method="ecmp", seed=3).fabric_load >= 2 * unit * (1 - 1e-12)
    assert plan(topo, flows, method="greedy").fabric_load >= 2 * unit * (1 - 1e-12)
    s = plan(topo, flows, method="split")
    assert s.fabric_load == pytest.approx(1.5 * unit, rel=1e-12)
    assert plan(topo, flows, method="lp").fabric_load == pytest.approx(1.5 * unit, rel=1e-9)
    assert s.subflow_stats()["max"] == 2  # s / gcd(out=2, in=3, s=2) = 2


def test_unequal_flows_even_split_or_byte_balance():
    topo = LeafSpine(leaves=3, spines=3, hosts_per_leaf=2, host_gbps=10_000, uplink_gbps=100)
    flows = flows_from_pairs([0, 1, 2, 3], [2, 4, 5, 0], [5e8, 1e9, 2e9, 7e8])
    lp = plan(topo, flows, method="lp").fabric_load
    even = plan(topo, flows, method="split")
    assert even.phases[0].assignment.info["split"]["mode"] == "even"
    assert (even.phases[0].subflows_per_flow() == 3).all()
    balanced = plan(topo, flows, method="split", unequal="balance")
    assert balanced.phases[0].assignment.info["split"]["mode"] == "bytes"
    for p in (even, balanced):
        assert _rel(p.fabric_load, lp) <= 1e-9
    assert balanced.subflow_stats()["mean"] < even.subflow_stats()["mean"]


def test_byte_balance_equals_lp_on_random_multi_job_instances():
    rng = np.random.default_rng(99)
    seen = 0
    while seen < 40:
        inst = random_instance(rng)
        if len({float(x) for ph in inst.flows.phases for x in ph.nbytes}) < 2:
            continue
        s = plan(inst.topo, inst.flows, method="split", unequal="balance")
        assert _rel(s.fabric_load, plan(inst.topo, inst.flows, method="lp").fabric_load) <= 1e-9, inst.label
        seen += 1


def test_split_within_one_percent_of_lp_under_failures():
    rng = np.random.default_rng(7)
    ratios = []
    while len(ratios) < 60:
        inst = random_instance(rng)
        topo = random_impairment(rng, inst.topo, links=int(rng.integers(1, 3)))
        try:
            s = plan(topo, inst.flows, method="split")
        except UnroutableError:
            continue
        lp = plan(topo, inst.flows, method="lp")
        ratios.append(s.fabric_load / lp.fabric_load if lp.fabric_load else 1.0)
        assert s.subflow_stats()["max"] <= 4 * topo.paths * topo.links_per_spine
    assert max(ratios) <= 1.01
    assert min(ratios) >= 1 - 1e-9  # the LP is a true lower bound


def test_lp_is_a_lower_bound_for_every_planner():
    rng = np.random.default_rng(11)
    for _ in range(25):
        inst = random_instance(rng)
        lp = plan(inst.topo, inst.flows, method="lp").fabric_load
        for method in PLANNERS:
            seeded = {"seed": 1} if "seed" in planner_options(method) else {}
            assert plan(inst.topo, inst.flows, method=method, **seeded).fabric_load >= lp * (1 - 1e-9)


def test_single_failure_reroutes_locally_and_optimally():
    topo = LeafSpine(leaves=8, spines=4, hosts_per_leaf=4, host_gbps=400, uplink_gbps=100)
    flows = collective("alltoall", hosts=range(32), nbytes=64 << 20)
    healthy = plan(topo, flows, method="split")
    broken = plan(topo.with_down(3, 2), flows, method="split")
    assert broken.phases[0].assignment.info["split"]["mode"] == "local-reroute"
    assert broken.fabric_load == pytest.approx(healthy.fabric_load * 4 / 3, rel=1e-9)
    assert _rel(broken.fabric_load, plan(topo.with_down(3, 2), flows, method="lp").fabric_load) <= 1e-6
    for sf in broken.subflows:  # nothing crosses the dead cable
        assert not (sf.spine == 2 and 3 in (sf.src_leaf, sf.dst_leaf))
