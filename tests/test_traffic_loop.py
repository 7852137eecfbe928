"""C4's loop closed: placement files, finding -> link inference, ``plan --from-diagnosis``,
the spraying flag, and the coordinator-side re-planner of ``trainkit run --traffic-plan``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import subprocess_env
from trainkit.rundir import Finding
from trainkit.traffic import LeafSpine, collective, plan
from trainkit.traffic.errors import TrafficError
from trainkit.traffic.files import load_topology
from trainkit.traffic.infer import infer_links
from trainkit.traffic.placement import PlacementError, load_placement, placement_from_mapping

TOPO = """[topology]
leaves = 2
spines = 2
hosts_per_leaf = 2
host_gbps = 100
uplink_gbps = 100
"""
PLACEMENT = """
[placement]
h0 = { leaf = 0 }
h1 = { leaf = 0, nic = 1 }
h2 = "leaf1"
h3 = { leaf = 1, nic = 3 }
"""
JOB = '[[job]]\ncollective = "allreduce_ring"\nhosts = "0-3"\nnbytes = "64MiB"\n'
SMALL = LeafSpine(leaves=2, spines=2, hosts_per_leaf=2, host_gbps=100, uplink_gbps=100)


def _finding(cls: str, a: int, b: int, hosts: tuple[str, str], *, ratio: float | None = 4.0,
             confidence: float = 0.9) -> Finding:
    evidence = {} if ratio is None else {"normal_duration_s": 0.01, "recent_duration_s": {"median": 0.01 * ratio}}
    return Finding(time=1.0, cls=cls, ranks=(a, b), hosts=hosts, link=(a, b), evidence=evidence,
                   confidence=confidence)


def _files(tmp_path: Path, *, topo: str = TOPO + PLACEMENT) -> tuple[Path, Path]:
    (tmp_path / "topo.toml").write_text(topo)
    (tmp_path / "job.toml").write_text(JOB)
    return tmp_path / "topo.toml", tmp_path / "job.toml"


# -- placement ---------------------------------------------------------------------------
def test_placement_next_to_the_topology_parses_and_fills_nics(tmp_path):
    topo_file, _ = _files(tmp_path)
    topo = load_topology(topo_file)        # the [placement] table does not upset the topology
    place = load_placement(topo_file, topo)
    assert {h: (p.leaf, p.nics) for h, p in place.hosts.items()} == {
        "h0": (0, (0,)), "h1": (0, (1,)), "h2": (1, (2,)), "h3": (1, (3,))}
    both = placement_from_mapping([{"host": "a", "leaf": 1, "nic": [2, 3]}, {"host": "b", "leaf": "leaf0"}], topo)
    assert both.nic("a", 1) == 3 and both.nic("a") == 2 and both.leaf("b") == 0


@pytest.mark.parametrize("data, message", [
    ({"h0": {"leaf": 5}}, "unknown leaf 5"),
    ([{"host": "h0", "leaf": 0}, {"host": "h0", "leaf": 1}], "duplicate host"),
    ({"h0": {"leaf": 0, "nic": 3}}, "nic 3 sits on leaf1"),
    ({"h0": {"leaf": 0, "nic": 0}, "h1": {"leaf": 0, "nic": 0}}, "already 'h0'"),
    ({"h0": {"leaf": 0, "rack": 2}}, "unknown field 'rack'"),
    ({"h0": {"leaf": 0}, "h1": {"leaf": 0}, "h2": {"leaf": 0}}, "no free NIC"),
])
def test_placement_errors_name_the_host(data, message):
    with pytest.raises(PlacementError, match=message):
        placement_from_mapping(data, SMALL, source="p.toml")


def test_duplicate_host_in_a_toml_table_is_named(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[placement]\nh0 = { leaf = 0 }\nh0 = { leaf = 1 }\n')
    with pytest.raises(PlacementError, match=r"host 'h0' is placed twice .*line 3"):
        load_placement(path, SMALL)
    (tmp_path / "p.json").write_text('{"placement": {"h0": {"leaf": 0}, "h0": {"leaf": 1}}}')
    with pytest.raises(PlacementError, match="'h0' is placed twice"):
        load_placement(tmp_path / "p.json", SMALL)


# -- inference ---------------------------------------------------------------------------
def _running():
    flows = collective("allreduce_ring", hosts=[0, 1, 2, 3], nbytes=64 << 20)
    return plan(SMALL, flows, method="ecmp")


def _place():
    return placement_from_mapping({f"h{i}": {"leaf": i // 2, "nic": i} for i in range(4)}, SMALL)


def test_inter_leaf_finding_implicates_the_cables_on_the_pair_s_path():
    running = _running()
    spine = next(s.spine for s in running.subflows if (s.src, s.dst) == (1, 2))
    inf = infer_links([_finding("slow_link", 1, 2, ("h1", "h2"))], SMALL, _place(), running=running)
    assert inf.link_set == {f"leaf0:spine{spine}", f"leaf1:spine{spine}"}
    assert all(link.spec.factor == 0.25 and link.tied == 2 for link in inf.links)
    assert all(0 < link.confidence <= 0.45 for link in inf.links)
    assert {link.flag for link in inf.links} == {f"--degrade leaf0:spine{spine}=0.25",
                                                 f"--degrade leaf1:spine{spine}=0.25"}
    assert not inf.host_problems


def test_pair_inside_one_leaf_is_a_host_or_nic_problem():
    inf = infer_links([_finding("slow_link", 0, 1, ("h0", "h1"))], SMALL, _place(), running=_running())
    assert not inf.links
    (hp,) = inf.host_problems
    assert hp.leaf == 0 and hp.hosts == ("h0", "h1") and "host or NIC" in hp.reason


def test_hang_comm_naming_a_link_marks_it_down():
    running = _running()
    spine = next(s.spine for s in running.subflows if (s.src, s.dst) == (3, 0))
    inf = infer_links([_finding("hang_comm", 0, 3, ("h0", "h3"), ratio=None)], SMALL, _place(), running=running)
    assert inf.link_set == {f"leaf0:spine{spine}", f"leaf1:spine{spine}"}
    assert all(link.spec.factor == 0.0 and link.flag.startswith("--down") for link in inf.links)


def test_healthy_flows_exonerate_and_many_findings_pin_one_cable():
    """Four leaves, a ring: the bad cable leaf1:spine0 slows the flows into and out of
    leaf1 on spine 0; the healthy flows clear the other cables on their paths."""
    topo = LeafSpine(leaves=4, spines=2, hosts_per_leaf=1, host_gbps=100, uplink_gbps=100)
    flows = collective("allreduce_ring", hosts=[0, 1, 2, 3], nbytes=64 << 20)
    running = plan(topo, flows, method="greedy")       # every flow on spine 0
    through = [(s.src, s.dst) for s in running.subflows if s.spine == 0 and 1 in (s.src_leaf, s.dst_leaf)]
    assert sorted(through) == [(0, 1), (1, 2)]
    findings = [_finding("slow_link", a, b, (f"h{a}", f"h{b}"), ratio=2.0) for a, b in through]
    place = placement_from_mapping({f"h{i}": {"leaf": i} for i in range(4)}, topo)
    inf = infer_links(findings, topo, place, running=running)
    assert inf.link_set == {"leaf1:spine0"}, inf.lines()
    (link,) = inf.links
    assert link.spec.factor == 0.5 and link.tied == 1 and link.findings == (0, 1)


# -- the CLI -----------------------------------------------------------------------------
def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainkit", "plan", *args], capture_output=True, text=True,
                          env=subprocess_env(), timeout=60)


def test_plan_from_diagnosis_prints_inference_then_plan(tmp_path):
    topo_file, job = _files(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    lines = [_finding("slow_link", 1, 2, ("h1", "h2")).to_json(), _finding("slow_link", 0, 1, ("h0", "h1")).to_json()]
    (run / "diagnosis.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "plan.json"
    res = _plan_cli("--from-diagnosis", str(run), "--topology", str(topo_file), "--job", str(job), "--out", str(out))
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert text.index("inferred") < text.index("method")
    assert "fabric    leaf0:spine" in text and "confidence" in text
    assert "host/NIC  h0, h1" in text
    doc = json.loads(out.read_text())
    assert doc["inferred"]["links"] and doc["nccl"]["NCCL_IB_QPS_PER_CONNECTION"]
    assert any(sf["src_port"] for ph in doc["phases"] for f in ph["flows"] for sf in f["subflows"])


def test_bad_placement_is_one_line_and_exit_2(tmp_path):
    topo_file, job = _files(tmp_path, topo=TOPO)
    (tmp_path / "p.toml").write_text("[placement]\nh0 = { leaf = 7 }\n")
    (tmp_path / "run").mkdir()
    res = _plan_cli("--from-diagnosis", str(tmp_path / "run"), "--topology", str(topo_file), "--job", str(job),
                    "--placement", str(tmp_path / "p.toml"))
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "unknown leaf 7" in res.stderr and "p.toml" in res.stderr


@pytest.mark.parametrize("flag", ["spraying = true", "adaptive_routing = true"])
def test_spraying_fabric_says_planning_is_not_useful(tmp_path, flag):
    topo_file, job = _files(tmp_path, topo=TOPO + flag + "\n" + PLACEMENT)
    out = tmp_path / "plan.json"
    res = _plan_cli("--topology", str(topo_file), "--job", str(job), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "does nothing useful" in res.stdout
    doc = json.loads(out.read_text())
    assert doc["planning"] == "not useful" and doc["phases"] == [] and doc["nccl"] == {}
    (tmp_path / "run").mkdir()
    res = _plan_cli("--from-diagnosis", str(tmp_path / "run"), "--topology", str(topo_file), "--job", str(job))
    assert res.returncode == 0 and "does nothing useful" in res.stdout


# -- trainkit run's re-planner -----------------------------------------------------------
def test_replanner_restarts_once_per_link_set_and_writes_the_plan(tmp_path):
    from trainkit.run.replan import TrafficReplanner, parse_traffic_plan

    topo_file, job = _files(tmp_path, topo=TOPO + "\n[placement]\nnode0 = { leaf = 0, nic = [0, 1] }\n"
                                               "node1 = { leaf = 1, nic = [2, 3] }\n")
    with pytest.raises(TrafficError, match="TOPOLOGY,PLACEMENT,JOB"):
        parse_traffic_plan("a,b")
    t = TrafficReplanner(f"{topo_file},,{job}", tmp_path)
    slow = Finding(time=1.0, cls="slow_link", ranks=(1, 2), hosts=("node0", "node1"), link=(1, 2),
                   ids=({"rank": 1, "host": "node0", "local_rank": 1}, {"rank": 2, "host": "node1", "local_rank": 0}),
                   evidence={"normal_duration_s": 0.01, "recent_duration_s": {"median": 0.05}}, confidence=0.9)
    first = t.consider(slow)
    assert first.restart and len(first.link_set) == 2
    path = t.commit(first, 1)
    assert path == tmp_path / "plan.gen1.json"
    doc = json.loads(path.read_text())
    assert t.env == {**doc["nccl"], "TRAINKIT_PLAN": str(path)}
    assert {lk["link"] for lk in doc["inferred"]["links"]} == first.link_set
    again = t.consider(slow)
    assert not again.restart and "persists" in again.reason
    inside = t.consider(Finding(time=2.0, cls="slow_link", ranks=(0, 1), hosts=("node0", "node0"), link=(0, 1)))
    assert not inside.restart and "host or NIC" in inside.reason
    assert t.consider(Finding(time=2.0, cls="straggler", ranks=(3,), hosts=("node1",))) is None
    # the run dir's plan is what the job runs under from now on
    from trainkit.traffic.fromdiag import running_plan

    running, source = running_plan(t.inputs, tmp_path)
    assert source == "plan.gen1.json (split)" and running.method == "split"


def test_replanner_on_a_spraying_fabric_never_restarts(tmp_path):
    from trainkit.run.replan import TrafficReplanner

    topo_file, job = _files(tmp_path, topo=TOPO + "spraying = true\n" + PLACEMENT)
    t = TrafficReplanner(f"{topo_file},,{job}", tmp_path)
    slow = _finding("slow_link", 1, 2, ("h1", "h2"))
    first = t.consider(slow)
    assert not first.restart and "does nothing useful" in first.reason
    assert t.consider(slow) is None and not list(tmp_path.glob("plan.gen*.json"))


def test_bad_traffic_plan_is_a_run_argument_error(tmp_path):
    from trainkit.run.launcher import RunOptions, run_job
    from trainkit.run.torchrun_args import RunArgumentError

    script = tmp_path / "train.py"
    script.write_text("")
    topo_file, job = _files(tmp_path)
    for spec, message in [("only,two", "TOPOLOGY,PLACEMENT,JOB"),
                          (f"{topo_file},{tmp_path / 'missing.toml'},{job}", "file not found")]:
        with pytest.raises(RunArgumentError, match=message):
            run_job(RunOptions(run_dir=tmp_path / "run", traffic_plan=spec), [str(script)])


# -- the coordinator, against an in-memory store (no torchrun) -------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("max_restarts", [1, 0])
def test_coordinator_replans_within_max_restarts(tmp_path, max_restarts):
    import time

    import torch.distributed as dist

    from trainkit.rundir import DIAGNOSIS_FILE
    from trainkit.run.control import Control
    from trainkit.run.coordinator import Coordinator, CoordinatorConfig
    from trainkit.run.events import EventLog, read_events
    from trainkit.run.policy import PolicyConfig
    from trainkit.run.replan import TrafficReplanner

    born = [float("inf")]

    class Agents(Control):
        """Generation 0 runs until stopped (or 3 s), generation 1 finishes at once."""

        def get(self, key):
            value = super().get(key)
            if value is None and "/exit/" in key:
                gen = int(key.split("/")[2])
                if gen > 0 or time.time() - born[0] > 3:
                    return {"rc": 0, "exitcodes": [0], "time": time.time()}
                if super().get("tk/gen/0/stop") is not None:
                    return {"rc": -15, "exitcodes": [-15], "time": time.time(), "stopped": True}
            return value

    topo_file, job = _files(tmp_path, topo=TOPO + "\n[placement]\nnode0 = { leaf = 0, nic = 1 }\n"
                                               "node1 = { leaf = 1, nic = 2 }\n")
    run = tmp_path / "run"
    run.mkdir()
    control = Agents(dist.HashStore())
    for n in ("node0", "node1"):
        control.register(n, {"host": "h"})
    cfg = CoordinatorConfig(run_dir=run, max_nodes=2, warm_start=False, stop_timeout=5,
                            policy=PolicyConfig(min_nodes=2, max_restarts=max_restarts),
                            traffic=TrafficReplanner(f"{topo_file},,{job}", run))
    slow = Finding(time=time.time() + 60, cls="slow_link", ranks=(0, 1), hosts=("node0", "node1"), link=(0, 1),
                   ids=({"rank": 0, "host": "node0", "local_rank": 0, "attempt": 0},
                        {"rank": 1, "host": "node1", "local_rank": 0, "attempt": 0}),
                   evidence={"normal_duration_s": 0.01, "recent_duration_s": {"median": 0.04}}, confidence=0.9)
    coordinator = Coordinator(control, cfg, EventLog(run, echo=False))   # tails from the file's end
    (run / DIAGNOSIS_FILE).write_text(json.dumps(slow.to_json()) + "\n")
    born[0] = time.time()
    assert coordinator.run() == 0
    events = read_events(run)
    (tp,) = [e for e in events if e["event"] == "traffic_plan"]
    decisions = [e["action"] for e in events if e["event"] == "decision"]
    if max_restarts:
        assert tp["restart"] and decisions == ["continue", "restart"]
        plan1 = control.get("tk/gen/1/plan")
        assert plan1["env"]["TRAINKIT_PLAN"] == str(run / "plan.gen1.json")
        assert control.get("tk/gen/0/plan")["env"] == {}
    else:
        assert not tp["restart"] and "--max-restarts=0 exhausted" in tp["reason"]
        assert decisions == ["continue"] and not (run / "plan.gen1.json").exists()
