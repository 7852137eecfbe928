"""The isolation policy of `trainkit run`, branch by branch (pure, no processes)."""

from __future__ import annotations

import pytest

from trainkit.run.policy import Fault, PolicyConfig, PolicyState, decide

THREE = PolicyState(members=("node0", "node1", "node2"))


def test_first_hang_restarts_with_every_node_and_counts_a_strike():
    d = decide(Fault(kind="hang_noncomm", nodes=("node2",)), THREE, PolicyConfig(min_nodes=2))
    assert d.action == "restart"
    assert d.state.members == THREE.members
    assert d.state.strikes == {"node2": 1}
    assert d.state.restarts == 1


def test_node_culprit_twice_is_excluded():
    cfg = PolicyConfig(min_nodes=2)
    first = decide(Fault(kind="crash", nodes=("node2",)), THREE, cfg)
    second = decide(Fault(kind="hang_comm", nodes=("node2",)), first.state, cfg)
    assert second.action == "exclude_and_restart"
    assert second.exclude == ("node2",)
    assert second.state.members == ("node0", "node1")
    assert second.state.excluded == ("node2",)
    assert "node2" in second.reason and "2 time" in second.reason


def test_exclude_after_one_and_named_hardware_exclude_at_once():
    d = decide(Fault(kind="hang_noncomm", nodes=("node1",)), THREE,
               PolicyConfig(min_nodes=2, exclude_after=1))
    assert d.action == "exclude_and_restart" and d.exclude == ("node1",)
    d = decide(Fault(kind="crash", nodes=("node0",), hardware=True), THREE,
               PolicyConfig(min_nodes=2))
    assert d.action == "exclude_and_restart" and d.exclude == ("node0",)


def test_exclusion_below_minimum_restarts_instead_and_says_why():
    d = decide(Fault(kind="crash", nodes=("node2",)), THREE,
               PolicyConfig(min_nodes=3, exclude_after=1))
    assert d.action == "restart"
    assert d.state.members == THREE.members
    assert "below 3 nodes" in d.reason


def test_standby_node_replaces_an_excluded_one():
    state = PolicyState(members=("a", "b"), standby=("spare",))
    d = decide(Fault(kind="crash", nodes=("b",), hardware=True), state, PolicyConfig(min_nodes=2))
    assert d.action == "exclude_and_restart"
    assert d.state.members == ("a", "spare") and d.state.standby == ()


@pytest.mark.parametrize("kind", ["straggler", "slow_link"])
def test_slow_node_excluded_when_elastic_minimum_allows(kind):
    d = decide(Fault(kind=kind, nodes=("node1",)), THREE, PolicyConfig(min_nodes=2))
    assert d.action == "exclude_and_restart" and d.exclude == ("node1",)


@pytest.mark.parametrize("kind", ["straggler", "slow_link"])
def test_slow_node_reported_and_job_keeps_going_at_minimum(kind):
    d = decide(Fault(kind=kind, nodes=("node1",)), THREE, PolicyConfig(min_nodes=3))
    assert d.action == "continue"
    assert d.state.restarts == 0 and d.state.members == THREE.members
    assert "keeps going" in d.reason


def test_max_restarts_exhausted_gives_up():
    cfg = PolicyConfig(max_restarts=1, min_nodes=3)
    first = decide(Fault(kind="crash", nodes=("node0",)), THREE, cfg)
    assert first.action == "restart"
    second = decide(Fault(kind="crash", nodes=("node0",)), first.state, cfg)
    assert second.action == "give_up"
    assert "--max-restarts=1" in second.reason


def test_unnamed_culprit_restarts_without_strikes():
    d = decide(Fault(kind="exit"), THREE, PolicyConfig())
    assert d.action == "restart" and d.state.strikes == {}
    assert "no culprit named" in d.reason


def test_culprit_not_a_member_is_ignored():
    d = decide(Fault(kind="crash", nodes=("elsewhere",), hardware=True), THREE, PolicyConfig())
    assert d.action == "restart" and d.exclude == ()
