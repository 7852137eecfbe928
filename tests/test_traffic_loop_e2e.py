"""C4's loop end to end: a slow link found by the detector becomes a new traffic plan.

- ``trainkit run --traffic-plan`` (drill style, real torchrun generations on gloo): a
  slow-link finding the policy lets pass ends generation 0; generation 1's workers
  report the plan's NCCL settings and ``TRAINKIT_PLAN`` from their own environment.
- a real 4-rank gloo job whose link 1-2 is slowed with ``tc htb`` between network
  namespaces (the fabric of ``tests/test_detect_netns.py``): its findings go to
  ``trainkit plan --from-diagnosis`` with ranks 1 and 2 under different leaves, and
  the new plan moves traffic off the implicated cables and simulates faster than the
  plan that ignores the finding.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from distributed import subprocess_env
from test_run_e2e import _launch
from test_traffic_loop import JOB, TOPO

# Generation 0: rank 0 reports a slow link 0-1 (node0 -> node1) the way the aggregator
# would; nobody can be excluded (--nnodes=2), so the policy keeps the node and the
# coordinator re-plans. Every rank writes the environment it got.
SCRIPT = textwrap.dedent("""
    import json, os, time, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    gen, rank = int(os.environ["TRAINKIT_GENERATION"]), dist.get_rank()
    run_dir = os.environ["TRAINKIT_RUN_DIR"]
    keys = ("NCCL_IB_QPS_PER_CONNECTION", "NCCL_IB_SPLIT_DATA_ON_QPS", "TRAINKIT_PLAN")
    with open(os.path.join(run_dir, f"env.gen{gen}.rank{rank}.json"), "w") as f:
        json.dump({k: os.environ.get(k) for k in keys}, f)
    if gen == 0 and rank == 0:
        ids = [{"rank": 0, "host": "node0", "local_rank": 0, "attempt": 0},
               {"rank": 1, "host": "node1", "local_rank": 0, "attempt": 0}]
        line = {"time": time.time(), "class": "slow_link", "ranks": [0, 1], "hosts": ["node0", "node1"],
                "ids": ids, "link": [0, 1], "confidence": 0.9,
                "evidence": {"normal_duration_s": 0.01, "recent_duration_s": {"median": 0.05}}}
        with open(os.path.join(run_dir, "diagnosis.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\\n")
    for step in range(150 if gen == 0 else 3):
        t = torch.ones(4); dist.all_reduce(t); time.sleep(0.1)
    dist.destroy_process_group()
""")


@pytest.mark.timeout(200)
def test_run_traffic_plan_hands_the_next_generation_the_plan(tmp_path):
    topo = tmp_path / "topo.toml"
    # one rank per node: rank 0 on NIC 1 (leaf0), rank 1 on NIC 2 (leaf1), the ring's 1 -> 2 flow
    topo.write_text(TOPO + "\n[placement]\nnode0 = { leaf = 0, nic = 1 }\nnode1 = { leaf = 1, nic = 2 }\n")
    (tmp_path / "job.toml").write_text(JOB)
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainkit", "run", "--run-dir", str(run), "--local-nodes", "2", "--no-detect",
           "--traffic-plan", f"{topo},,{tmp_path / 'job.toml'}", "--max-restarts", "1", "--",
           "--nnodes=2", "--nproc-per-node=1", "--monitor-interval=0.1", str(script)]
    proc, events = _launch(cmd, run, env={}, timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:]
    (replan,) = [e for e in events if e["event"] == "traffic_plan"]
    assert replan["restart"] and replan["gen"] == 0 and len(replan["link_set"]) == 2
    assert all(lk["link"].startswith("leaf") and ":spine" in lk["link"] for lk in replan["links"])
    (decision,) = [e for e in events if e["event"] == "decision" and e["action"] != "continue"]
    assert decision["action"] == "restart" and decision["fault"] == "slow_link"
    assert {lk["link"] for lk in decision["links"]} == set(replan["link_set"])
    assert [e["gen"] for e in events if e["event"] == "generation_start"] == [0, 1]
    assert events[-1]["event"] == "done"
    doc = json.loads((run / "plan.gen1.json").read_text())
    want = {**doc["nccl"], "TRAINKIT_PLAN": str(run / "plan.gen1.json")}
    gen0 = [json.loads(p.read_text()) for p in sorted(run.glob("env.gen0.rank*.json"))]
    gen1 = [json.loads(p.read_text()) for p in sorted(run.glob("env.gen1.rank*.json"))]
    assert len(gen0) == len(gen1) == 2
    assert all(e["TRAINKIT_PLAN"] is None for e in gen0)
    assert all(e == want for e in gen1), (gen1, want)


# -- a real slow link between network namespaces ------------------------------------------
from test_detect_netns import _Job, netns_fabric  # noqa: E402

import test_detect_netns  # noqa: E402


@pytest.fixture
def fabric4(monkeypatch):
    monkeypatch.setattr(test_detect_netns, "WORLD", 4)   # _Job reads the module's WORLD
    yield from netns_fabric(4)


def _wait_findings(job: _Job, procs_timeout: float) -> list[dict]:
    outs = [p.communicate(timeout=procs_timeout)[0] for p in job.procs]
    assert all(p.returncode == 0 for p in job.procs), "\n".join(o[-1500:] for o in outs)
    return job.findings()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_netns_slow_link_becomes_a_plan_that_avoids_it(fabric4, tmp_path):
    fabric4.throttle(1, 2, "4mbit")
    job = _Job(fabric4, tmp_path, ["--steps", "40", "--p2p", "--p2p-kb", "64", "--compute-ms", "10"])
    try:
        findings = _wait_findings(job, 120)
    finally:
        job.stop()
    slow = [f for f in findings if f["class"] == "slow_link"]
    assert slow and slow[0]["link"] == [1, 2], findings
    # ranks 0,1 under leaf0 and 2,3 under leaf1: the slow pair crosses the fabric
    hosts = fabric4.hosts
    placement = tmp_path / "placement.toml"
    placement.write_text("[placement]\n" + "".join(f'{h} = {{ leaf = {i // 2}, nic = {i} }}\n'
                                                    for i, h in enumerate(hosts)))
    topo, jobfile = tmp_path / "topo.toml", tmp_path / "job.toml"
    topo.write_text(TOPO)
    jobfile.write_text(JOB)
    out = tmp_path / "plan.json"
    res = subprocess.run([sys.executable, "-m", "trainkit", "plan", "--from-diagnosis", str(tmp_path),
                          "--topology", str(topo), "--placement", str(placement), "--job", str(jobfile),
                          "--out", str(out)], capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert res.returncode == 0, res.stderr + res.stdout
    doc = json.loads(out.read_text())
    implicated = {lk["link"] for lk in doc["inferred"]["links"]}
    assert implicated and implicated <= {f"leaf{l}:spine{s}" for l in (0, 1) for s in (0, 1)}, res.stdout
    spines = {int(x.split("spine")[1]) for x in implicated}
    # the new plan carries (almost) nothing over the implicated cables between leaf0 and leaf1 ...
    on_bad = sum(sf["nbytes"] for ph in doc["phases"] for f in ph["flows"] for sf in f["subflows"]
                 if sf["spine"] in spines)
    total = sum(sf["nbytes"] for ph in doc["phases"] for f in ph["flows"] for sf in f["subflows"]
                if sf["spine"] is not None)
    assert on_bad <= 0.25 * total, (on_bad, total, res.stdout)
    # ... and simulates faster than the plan that ignores the finding, on the inferred fabric
    from trainkit.traffic.fromdiag import load_inputs, replan_from_run

    r = replan_from_run(tmp_path, load_inputs(topo, placement, jobfile))
    assert r.new_s is not None and r.unaware_s is not None and r.new_s < r.unaware_s
    assert "inferred" in res.stdout and "faster" in res.stdout
