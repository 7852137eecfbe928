"""Leaf-pair aggregation and re-planning: same answers as the NIC-level path."""

from __future__ import annotations

import numpy as np
import pytest

from trainkit.traffic import LeafSpine, collective, lower_bound, plan, replan
from trainkit.traffic.files import load_job, load_topology
from trainkit.traffic.simulate import simulate, simulate_spraying

EX = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "traffic"


def test_aggregated_alltoall_matches_nic_level():
    topo = LeafSpine(leaves=6, spines=4, hosts_per_leaf=4, host_gbps=400, uplink_gbps=100)
    hosts = np.random.default_rng(0).permutation(topo.nics)[:20].tolist()
    flows = collective("alltoall", hosts=hosts, nbytes=32 << 20)
    for method in ("split", "lp", "greedy"):
        nic = plan(topo, flows, method=method)
        agg = plan(topo, flows, method=method, expand_limit=0)
        assert all(sf.src is None for sf in agg.subflows if sf.spine is not None)
        assert agg.fabric_load == pytest.approx(nic.fabric_load, rel=1e-9)
        assert agg.host_load == pytest.approx(nic.host_load, rel=1e-12)
    spray = simulate_spraying(topo, flows).total
    agg_sim = simulate(plan(topo, flows, method="split", expand_limit=0)).total
    assert agg_sim == pytest.approx(spray, rel=0.02)


def test_replan_reuses_tables_and_matches_a_fresh_plan():
    topo = LeafSpine(leaves=8, spines=8, hosts_per_leaf=8, host_gbps=400, uplink_gbps=100, links_per_spine=2)
    flows = collective("allreduce_ring", hosts=range(topo.nics), nbytes=64 << 20, channels=2)
    healthy = plan(topo, flows, method="split")
    broken = topo.with_down(2, 3).with_degraded(5, 1, 0.5, link=1)
    again = replan(healthy, broken)
    fresh = plan(broken, flows, method="split")
    assert again.phases[0].table is healthy.phases[0].table
    assert again.fabric_load == pytest.approx(fresh.fabric_load, rel=1e-12)
    assert again.fabric_load <= plan(broken, flows, method="lp").fabric_load * 1.01


def test_16k_examples_plan_at_the_optimum():
    topo = load_topology(EX / "fabric_16k.toml")
    assert topo.nics == 16384
    for job in ("ring_16k.toml", "alltoall_16k.toml"):
        flows = load_job(EX / job)
        p = plan(topo, flows, method="split")
        assert p.max_link_load == pytest.approx(lower_bound(topo, flows), rel=1e-9)
        assert p.fabric_load == pytest.approx(lower_bound(topo, flows, fabric_only=True), rel=1e-9)
        broken = topo.with_down(7, 3)
        q = replan(p, broken)
        bound = lower_bound(broken, flows, fabric_only=True)
        assert bound * (1 - 1e-9) <= q.fabric_load <= bound * 1.01
