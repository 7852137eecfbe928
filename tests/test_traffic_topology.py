"""Topology, collectives and job files: placement maths and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from trainkit.traffic import (
    PLANNERS, JobError, LeafSpine, TopologyError, TrafficError, UnroutableError, collective, combine, plan,
)
from trainkit.traffic.collectives import _btree_parents
from trainkit.traffic.files import job_from_dict, load_job, load_topology, parse_size


def test_default_layout_matches_contract():
    topo = LeafSpine(leaves=4, spines=2, hosts_per_leaf=3, nics_per_host=2)
    nic = np.arange(topo.nics)
    assert topo.nics == 24
    assert (topo.host_of(nic) == nic // 2).all()
    assert (topo.leaf_of(nic) == nic // 6).all()


def test_rail_layout_puts_each_rail_on_its_own_leaf():
    topo = LeafSpine(leaves=4, spines=2, hosts_per_leaf=2, nics_per_host=2, layout="rail")
    nic = np.arange(topo.nics)
    leaf = topo.leaf_of(nic)
    assert np.bincount(leaf).tolist() == [4, 4, 4, 4]  # every leaf has hosts_per_leaf*nics ports filled
    for host in range(topo.nics // 2):  # the two NICs of a host sit on different (rail) leaves
        assert leaf[2 * host] != leaf[2 * host + 1]
        assert leaf[2 * host] % 2 == 0 and leaf[2 * host + 1] % 2 == 1


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(leaves=0, spines=2, hosts_per_leaf=1), "leaves"),
        (dict(leaves=2, spines=2, hosts_per_leaf=1, host_gbps=-1), "host_gbps"),
        (dict(leaves=2, spines=2, hosts_per_leaf=40, ports_per_leaf=32), "hosts_per_leaf"),
        (dict(leaves=3, spines=2, hosts_per_leaf=1, nics_per_host=2, layout="rail"), "leaves"),
        (dict(leaves=2, spines=2, hosts_per_leaf=1, layout="torus"), "layout"),
    ],
)
def test_inconsistent_topology_names_the_field(kwargs, field):
    with pytest.raises(TopologyError) as info:
        LeafSpine(**kwargs)
    assert info.value.field == field
    assert field in str(info.value)


def test_dangling_link_is_rejected():
    with pytest.raises(TopologyError, match="dangling link: spine 9"):
        LeafSpine.from_dict({"leaves": 2, "spines": 2, "hosts_per_leaf": 1, "down": ["leaf0:spine9"]})
    with pytest.raises(TopologyError, match="parallel index"):
        LeafSpine(leaves=2, spines=2, hosts_per_leaf=1).with_down(0, 1, link=3)


def test_unknown_topology_field(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text("[topology]\nleaves = 2\nspines = 2\nhosts_per_leaf = 1\nspline = 3\n")
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    assert info.value.field == "spline"


def test_degraded_capacity_and_down():
    topo = LeafSpine(leaves=2, spines=2, hosts_per_leaf=1, uplink_gbps=100, links_per_spine=2)
    cap = topo.with_degraded(1, 0, 0.5).with_down(0, 1, link=1).link_gbps()
    assert cap[1, 0].tolist() == [50.0, 50.0]
    assert cap[0, 1].tolist() == [100.0, 0.0]
    assert topo.healthy and not topo.with_down(0, 0).healthy


def test_ring_phase_bytes_and_repeat():
    flows = collective("allreduce_ring", hosts=range(8), nbytes=8 << 20, channels=2)
    (phase,) = flows.phases
    assert phase.repeat == 14
    assert len(phase.src) == 16
    assert np.allclose(phase.nbytes, (8 << 20) / 16)
    assert set(zip(phase.src.tolist(), phase.dst.tolist())) == {(i, (i + 1) % 8) for i in range(8)}


@pytest.mark.parametrize("n", [2, 3, 7, 8, 13, 16])
def test_double_binary_tree_is_two_spanning_trees(n):
    flows = collective("allreduce_tree", hosts=range(n), nbytes=1 << 20)
    reduce_phase = flows.phases[0]
    edges = list(zip(reduce_phase.src.tolist(), reduce_phase.dst.tolist()))
    assert len(edges) == 2 * (n - 1)
    for tree in (edges[: n - 1], edges[n - 1:]):
        parent = dict(tree)
        assert len(parent) == n - 1  # every non-root has exactly one parent
        for node in parent:  # following parents reaches the root without cycles
            seen = set()
            while node in parent:
                assert node not in seen
                seen.add(node)
                node = parent[node]
    assert (_btree_parents(n)[1:] >= 0).all()


def test_halving_doubling_moves_the_right_bytes():
    n, nbytes = 8, 1 << 20
    flows = collective("allreduce_halving_doubling", hosts=range(n), nbytes=nbytes)
    assert len(flows.phases) == 6
    per_rank = sum(ph.nbytes[ph.src == 0].sum() for ph in flows.phases)
    assert per_rank == pytest.approx(2 * nbytes * (n - 1) / n)  # Rabenseifner's volume
    odd = collective("allreduce_recursive_doubling", hosts=range(6), nbytes=nbytes)
    assert [ph.name for ph in odd.phases] == ["fold_in", "doubling0", "doubling1", "fold_out"]


def test_alltoall_and_combine_run_length():
    a = collective("allreduce_ring", hosts=range(4), nbytes=1 << 20)  # 1 phase x 6
    b = collective("allgather_ring", hosts=range(4, 12), nbytes=1 << 20)  # 1 phase x 7
    both = combine(a, b)
    assert [ph.repeat for ph in both.phases] == [6, 1]
    assert both.phases[0].flow_count == 4 + 8 and both.phases[1].flow_count == 8
    a2a = collective("alltoall", hosts=range(5), nbytes=10.0)
    assert a2a.phases[0].flow_count == 20 and a2a.phases[0].total_bytes == pytest.approx(40.0)
    with pytest.raises(JobError, match="share a NIC"):
        combine(a, a)


def test_bad_jobs_name_the_field():
    topo = LeafSpine(leaves=2, spines=2, hosts_per_leaf=2)
    with pytest.raises(JobError) as info:
        collective("allreduce_butterfly", hosts=range(4), nbytes=1)
    assert info.value.field == "collective"
    with pytest.raises(JobError) as info:
        plan(topo, collective("allreduce_ring", hosts=range(8), nbytes=1 << 20))
    assert info.value.field == "hosts" and "topology has 4 NICs" in str(info.value)
    with pytest.raises(JobError) as info:
        plan(topo, collective("allreduce_ring", hosts=range(4), nbytes=1 << 20), method="magic")
    assert info.value.field == "method"
    with pytest.raises(JobError) as info:
        job_from_dict({"job": [{"collective": "alltoall", "hosts": "0-3", "nbytes": "12 parsecs"}]})
    assert info.value.field == "job[0].nbytes"


def test_every_path_down_is_unroutable():
    topo = LeafSpine(leaves=2, spines=2, hosts_per_leaf=1).with_down(0, 0).with_down(1, 1)
    flows = collective("allreduce_ring", hosts=range(2), nbytes=1 << 20)
    for method in PLANNERS:
        with pytest.raises(UnroutableError) as info:
            plan(topo, flows, method=method)
        assert info.value.field == "leaf0->leaf1" and "unroutable" in str(info.value)


def test_job_file_with_two_jobs(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(
        '[[job]]\ncollective = "allreduce_ring"\nhosts = "0-3"\nnbytes = "1MiB"\nchannels = 2\n'
        '[[job]]\ncollective = "alltoall"\nhosts = {start = 4, count = 4}\nnbytes = 4096\n'
    )
    flows = load_job(path)
    assert flows.phases[0].flow_count == 8 + 12
    assert parse_size("1.5GiB") == 1.5 * (1 << 30)
    with pytest.raises(JobError) as info:
        job_from_dict({"job": [{"collective": "alltoall", "hosts": "0-3"}]})
    assert info.value.field == "job[0].nbytes"


def test_json_files_load_like_toml(tmp_path):
    import json

    topo_path = tmp_path / "topo.json"
    topo_path.write_text(json.dumps({"topology": {"leaves": 4, "spines": 2, "hosts_per_leaf": 2,
                                                  "parallel_links": 2, "degrade": {"leaf1:spine0#1": 0.5}}}))
    topo = load_topology(topo_path)
    assert topo.links_per_spine == 2 and topo.link_gbps()[1, 0].tolist() == [400.0, 200.0]
    job_path = tmp_path / "job.json"
    job_path.write_text(json.dumps({"job": [{"collective": "allreduce_tree", "hosts": [0, 2, 4, 6], "nbytes": 4096}]}))
    assert load_job(job_path).phases[0].flow_count == 6
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TrafficError) as info:
        load_topology(bad)
    assert "cannot parse" in str(info.value) and info.value.field == "topology"
