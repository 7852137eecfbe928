"""Flow-level simulator: analytic cases, and split against ideal packet spraying."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import csr_matrix

from trainkit.traffic import LeafSpine, collective, flows_from_pairs, plan
from trainkit.traffic.scenarios import random_instance
from trainkit.traffic.simulate import max_min_rates, simulate, simulate_spraying


def test_progressive_filling_textbook_case():
    # links: 0 (cap 10) shared by flows a,b; 1 (cap 4) used by b only
    A = csr_matrix(np.array([[1.0, 0.0], [1.0, 1.0]]))
    rates = max_min_rates(A, np.ones(2), np.array([10.0, 4.0]), np.ones(2, bool))
    assert rates.tolist() == pytest.approx([6.0, 4.0])


def test_collision_doubles_completion_time():
    topo = LeafSpine(leaves=2, spines=2, hosts_per_leaf=2, host_gbps=1000, uplink_gbps=100)
    flows = flows_from_pairs([0, 1], [2, 3], 1e9)
    one_flow = 1e9 * 8 / 100e9
    greedy = simulate(plan(topo, flows, method="greedy"))
    assert greedy.total == pytest.approx(one_flow)  # one flow per spine
    split = simulate(plan(topo, flows, method="split"))
    assert split.total == pytest.approx(one_flow)
    # both on one spine: the shared uplink halves each rate
    p = plan(topo, flows, method="greedy")
    p.phases[0].assignment.spine[:] = 0
    assert simulate(p).total == pytest.approx(2 * one_flow)


def test_phase_repeats_add_up():
    topo = LeafSpine(leaves=4, spines=4, hosts_per_leaf=2, host_gbps=400, uplink_gbps=100)
    flows = collective("allreduce_ring", hosts=range(8), nbytes=64 << 20)
    result = simulate(plan(topo, flows, method="split"))
    assert result.repeats == (14,)
    assert result.total == pytest.approx(14 * result.phase_seconds[0])


def test_spraying_matches_the_optimum_on_a_uniform_alltoall():
    topo = LeafSpine(leaves=4, spines=4, hosts_per_leaf=4, host_gbps=400, uplink_gbps=100)
    flows = collective("alltoall", hosts=range(16), nbytes=16 << 20)
    optimum = plan(topo, flows, method="lp").max_link_load
    assert simulate_spraying(topo, flows).total == pytest.approx(optimum, rel=1e-6)


def test_split_completes_within_one_percent_of_ideal_spraying():
    rng = np.random.default_rng(5)
    worst = 0.0
    for _ in range(25):
        inst = random_instance(rng, max_leaves=5, max_spines=4)
        spray = simulate_spraying(inst.topo, inst.flows).total
        split = simulate(plan(inst.topo, inst.flows, method="split")).total
        worst = max(worst, split / spray)
    assert worst <= 1.01


def test_ecmp_is_slower_than_split_on_an_oversubscribed_ring():
    topo = LeafSpine(leaves=16, spines=16, hosts_per_leaf=16, host_gbps=400, uplink_gbps=100)
    flows = collective("allreduce_ring", hosts=range(256), nbytes=256 << 20)
    ecmp = simulate(plan(topo, flows, method="ecmp", seed=0)).total
    split = simulate(plan(topo, flows, method="split")).total
    spray = simulate_spraying(topo, flows).total
    assert split == pytest.approx(spray, rel=1e-6)
    assert ecmp > 1.5 * split
