"""The ``Planner`` contract, checked for every entry of ``PLANNERS``.

Iterates over the registry itself, so a new planner is tested by adding it there:
valid plans (every byte once, on cables that exist and are up), never below the
LP bound, simulable, pure, and loud about options it does not take.
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

from trainkit.traffic import PLANNERS, JobError, LeafSpine, collective, combine, plan, planner_options, replan
from trainkit.traffic.demand import build_table
from trainkit.traffic.simulate import simulate

TOPOLOGIES = {
    "healthy": LeafSpine(leaves=4, spines=3, hosts_per_leaf=3, host_gbps=400, uplink_gbps=100),
    "parallel": LeafSpine(leaves=4, spines=2, hosts_per_leaf=3, uplink_gbps=100, links_per_spine=2),
    "impaired": LeafSpine(leaves=4, spines=3, hosts_per_leaf=3, uplink_gbps=100, links_per_spine=2)
    .with_down(1, 2, link=0).with_degraded(2, 0, 0.5),
}
EPS = 1e-9


def _job(topo: LeafSpine):
    """Two jobs sharing the fabric: equal ring flows plus smaller all-to-all flows, intra-leaf ones included."""
    half = topo.nics // 2
    return combine(
        collective("allreduce_ring", hosts=range(half), nbytes=24 << 20, channels=2),
        collective("alltoall", hosts=range(half, topo.nics), nbytes=6 << 20),
    )


def _lp_bound(topo: LeafSpine, flows, **kw) -> tuple[float, float, float]:
    """(fabric, max link, completion) seconds of the LP optimum as solved, not the lp plan's loads.

    The ``lp`` plan hands out whole flows of aggregated rows, which can land above
    the fractional optimum; the bound is the solver's value, phase by phase.
    """
    lp = plan(topo, flows, method="lp", **kw)
    fabric = [ph.assignment.info.get("lp", {}).get("fabric_seconds", 0.0) for ph in lp.phases]
    link = [max(f, ph.host_time) for f, ph in zip(fabric, lp.phases)]
    return max(fabric), max(link), sum(ph.phase.repeat * t for t, ph in zip(link, lp.phases))


def _check_assignment(topo: LeafSpine, table, a) -> None:
    cap = topo.link_gbps()  # (leaves, spines, parallel cables)
    assert len(a.row) == len(a.spine) == len(a.up_link) == len(a.down_link) == len(a.each) == len(a.count)
    assert (a.count >= 1).all() and (a.each >= 0).all()
    planned = np.bincount(a.row, weights=a.each * a.count, minlength=len(table))
    np.testing.assert_allclose(planned, table.row_bytes, rtol=1e-9)  # every byte once
    fab = a.spine >= 0
    assert (table.src_leaf[a.row[~fab]] == table.dst_leaf[a.row[~fab]]).all()  # no spine only within a leaf
    assert (table.inter[a.row[fab]]).all()
    rows, spine = a.row[fab], a.spine[fab]
    assert (spine < topo.spines).all()
    for link, leaf in ((a.up_link[fab], table.src_leaf[rows]), (a.down_link[fab], table.dst_leaf[rows])):
        assert ((link >= -1) & (link < topo.links_per_spine)).all()
        pinned = link >= 0
        assert (cap[leaf[pinned], spine[pinned], link[pinned]] > 0).all()  # a live cable
        assert (cap[leaf[~pinned], spine[~pinned]].sum(axis=1) > 0).all()  # or a live bundle


@pytest.mark.parametrize("topo_name", list(TOPOLOGIES))
@pytest.mark.parametrize("method", list(PLANNERS))
def test_plan_is_valid_bounded_and_simulable(method, topo_name):
    topo = TOPOLOGIES[topo_name]
    flows = _job(topo)
    p = plan(topo, flows, method=method)
    fabric_bound, bound, completion = _lp_bound(topo, flows)
    assert p.method == method and len(p.phases) == len(flows.phases)
    for ph in p.phases:
        _check_assignment(topo, ph.table, ph.assignment)
    assert p.max_link_load >= bound * (1 - EPS)
    assert p.fabric_load >= fabric_bound * (1 - EPS)
    assert p.total_load >= completion * (1 - EPS)
    sim = simulate(p)  # completion can only be later than the busiest links allow
    assert np.isfinite(sim.total) and sim.total >= p.total_load * (1 - 1e-6)
    assert len(p.subflows) >= sum(int(ph.table.count.sum()) for ph in p.phases)


@pytest.mark.parametrize("method", list(PLANNERS))
def test_aggregated_rows_and_replan(method):
    topo = TOPOLOGIES["parallel"]
    flows = collective("alltoall", hosts=range(topo.nics), nbytes=4 << 20)
    p = plan(topo, flows, method=method, expand_limit=0)  # leaf-pair rows with count > 1
    assert (p.phases[0].table.count > 1).any()
    for ph in p.phases:
        _check_assignment(topo, ph.table, ph.assignment)
    broken = topo.with_down(0, 1, link=1)
    q = replan(p, broken)
    assert q.method == method
    for ph in q.phases:
        _check_assignment(broken, ph.table, ph.assignment)
    assert q.fabric_load >= _lp_bound(broken, flows, expand_limit=0)[0] * (1 - EPS)
    assert p.fabric_load >= _lp_bound(topo, flows, expand_limit=0)[0] * (1 - EPS)


@pytest.mark.parametrize("method", list(PLANNERS))
def test_planner_is_pure_and_declares_its_options(method):
    planner = PLANNERS[method]
    params = list(inspect.signature(planner).parameters.values())
    assert [q.kind for q in params[:3]] == [inspect.Parameter.POSITIONAL_ONLY] * 3
    for q in params[3:]:  # options: keyword-only, with a default, no **kwargs
        assert q.kind is inspect.Parameter.KEYWORD_ONLY and q.default is not inspect.Parameter.empty, q
    assert set(planner_options(method)) == {q.name for q in params[3:]}
    topo = TOPOLOGIES["impaired"]
    table = build_table(topo, _job(topo).phases[0])
    rows = np.flatnonzero(table.inter)
    before = {f.name: getattr(table, f.name).copy() for f in dataclasses.fields(table)}
    a, b = planner(topo, table, rows), planner(topo, table, rows.copy())
    for name in ("row", "spine", "up_link", "down_link", "each", "count"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for k, v in before.items():
        np.testing.assert_array_equal(getattr(table, k), v)  # the table is not modified
    empty = planner(topo, table, np.zeros(0, np.int64))
    assert len(empty.row) == 0


@pytest.mark.parametrize("method", list(PLANNERS))
def test_unknown_option_is_rejected_naming_option_and_planner(method):
    topo = TOPOLOGIES["healthy"]
    flows = _job(topo)
    with pytest.raises(JobError) as info:
        plan(topo, flows, method=method, no_such_option=1)
    assert info.value.field == "no_such_option" and repr(method) in str(info.value)
    table = build_table(topo, flows.phases[0])
    with pytest.raises(TypeError, match="no_such_option"):
        PLANNERS[method](topo, table, np.flatnonzero(table.inter), no_such_option=1)


def test_options_of_one_planner_do_not_reach_another():
    topo = TOPOLOGIES["healthy"]
    flows = _job(topo)
    ecmp = plan(topo, flows, method="ecmp", seed=3)
    with pytest.raises(JobError, match="'split' has no option 'seed'"):
        plan(topo, flows, method="split", seed=3)
    # replan keeps the options of the same planner, and drops them when the planner changes
    assert replan(ecmp, topo).info == {"seed": 3}
    assert replan(ecmp, topo, method="split").info == {}
