"""End to end: real multi-process gloo DDP jobs, one per fault class, plus a clean run.

Each job runs ``examples/detect_demo.py`` as separate rank processes (or under
the real torchrun) with a short hang_timeout; every process started, including
the detached aggregator, is stopped by the drill helper or the test.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from distributed import REPO_ROOT, run_ranks, run_torchrun, subprocess_env
from trainkit.detect.drill import free_port, run_drill, stop_aggregator
from trainkit.rundir import FINDING_FIELDS

DEMO = REPO_ROOT / "examples" / "detect_demo.py"
FAST = ["--hang-timeout", "2", "--gloo-timeout", "20", "--compute-ms", "15"]

pytestmark = [pytest.mark.slow]


def _only(findings, cls):
    assert [f["class"] for f in findings] == [cls], json.dumps(findings, indent=1)[:3000]
    f = findings[0]
    assert tuple(f) == FINDING_FIELDS
    return f


@pytest.mark.timeout(90)
def test_clean_run_has_zero_findings(tmp_path):
    res = run_drill(DEMO, world=4, run_dir=tmp_path, timeout=70,
                    script_args=[*FAST, "--steps", "50", "--first-step-pause", "0.3",
                                 "--ckpt-every", "10", "--ckpt-pause", "0.25"])
    assert not res.timed_out and res.returncodes == [0, 0, 0, 0], res.outputs[0][-2000:]
    assert res.findings == []
    assert "step_times" in res.outputs[0]


@pytest.mark.timeout(90)
def test_hang_noncomm_names_rank_with_stack(tmp_path):
    res = run_drill(DEMO, world=3, run_dir=tmp_path, fault="rank=1,step=8,kind=hang",
                    script_args=[*FAST, "--steps", "200"], timeout=60)
    f = _only(res.findings, "hang_noncomm")
    assert f["ranks"] == [1] and f["ids"][0]["local_rank"] == 1 and f["ids"][0]["attempt"] == 0
    assert f["evidence"]["never_arrived"] == [1] and f["step"] == 8
    assert "_hang_forever" in f["evidence"]["stacks"]["1"]          # the captured Python stack
    latency = f["time"] - res.fault_time
    assert 2.0 <= latency < 2.0 + 5.0


@pytest.mark.timeout(90)
def test_ranks_with_different_restart_counts_share_rank_0s_attempt(tmp_path):
    # An elastic agent's TORCHELASTIC_RESTART_COUNT is its own: after a crash under NVRx's
    # ft_launcher one node's can be 1 while another's is 0, in the same round. Every rank
    # must still find the self-started aggregator and land on one timeline.
    env = dict(os.environ)
    env.pop("TRAINKIT_AGGREGATOR", None)
    env.pop("TRAINKIT_GENERATION", None)
    env["TORCHELASTIC_RESTART_COUNT"] = "0"
    res = run_drill(DEMO, world=3, run_dir=tmp_path, fault="rank=1,step=8,kind=hang",
                    script_args=[*FAST, "--steps", "200"], timeout=60, env=env,
                    env_per_rank={1: {"TORCHELASTIC_RESTART_COUNT": "1"},
                                  2: {"TORCHELASTIC_RESTART_COUNT": "3"}})
    f = _only(res.findings, "hang_noncomm")
    assert f["ranks"] == [1] and f["evidence"]["never_arrived"] == [1]
    assert [i["attempt"] for i in f["ids"]] == [0]         # rank 0's, not rank 1's own 1
    for out in res.outputs:      # every rank found it (the drill's stop closes it later)
        assert "no aggregator" not in out, out[-2000:]


@pytest.mark.timeout(90)
def test_hang_comm_names_group(tmp_path):
    res = run_drill(DEMO, world=3, run_dir=tmp_path, fault="rank=2,step=6,kind=hang_comm",
                    script_args=[*FAST, "--steps", "200"], timeout=60)
    f = _only(res.findings, "hang_comm")
    assert f["group"] == "0" and sorted(f["evidence"]["arrived"]) == [0, 1, 2]
    assert 2 in f["ranks"] and f["evidence"]["completed"] == []


@pytest.mark.timeout(120)
def test_crash_under_real_torchrun_detached_aggregator_writes_finding(tmp_path):
    env = subprocess_env(TRAINKIT_FAULT="rank=2,step=6,kind=crash")
    env.pop("TRAINKIT_AGGREGATOR", None)
    try:
        proc = run_torchrun(DEMO, 3, "--run-dir", str(tmp_path), *FAST, "--steps", "200",
                            timeout=90, env=env)
        assert proc.returncode != 0
        diag = tmp_path / "diagnosis.jsonl"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not diag.exists():
            time.sleep(0.1)
        findings = [json.loads(line) for line in diag.read_text().splitlines()]
    finally:
        stop_aggregator(tmp_path)
    f = _only(findings, "crash")
    assert f["ranks"] == [2] and f["evidence"]["per_rank"]["2"]["process_gone"] is True
    fired = json.loads(next((tmp_path / "faults").glob("*.json")).read_text())["time"]
    assert f["time"] - fired < 5.0


@pytest.mark.timeout(90)
def test_straggler_named_within_30_steps(tmp_path):
    res = run_drill(DEMO, world=4, run_dir=tmp_path, fault="rank=3,step=8,kind=slow:2.0",
                    script_args=[*FAST, "--steps", "60"], timeout=70)
    f = _only(res.findings, "straggler")
    assert f["ranks"] == [3] and f["step"] - 8 <= 30
    assert f["evidence"]["lateness_as_last_s"]["median"] > f["evidence"]["threshold_s"]


@pytest.mark.timeout(90)
def test_slow_point_to_point_link_named(tmp_path):
    res = run_drill(DEMO, world=4, run_dir=tmp_path, fault="rank=1,step=5,kind=delay_peer:2:25",
                    script_args=[*FAST, "--steps", "60", "--p2p"], timeout=70)
    f = _only(res.findings, "slow_link")
    assert f["link"] == [1, 2] and f["ranks"] == [1, 2]


@pytest.mark.timeout(60)
def test_unreachable_aggregator_warns_once_and_training_completes(tmp_path):
    env = dict(os.environ, TRAINKIT_AGGREGATOR=f"127.0.0.1:{free_port()}")
    res = run_drill(DEMO, world=2, run_dir=tmp_path, env=env,
                    script_args=[*FAST, "--steps", "10"], timeout=50)
    assert res.returncodes == [0, 0] and not res.timed_out
    for out in res.outputs:
        assert out.count("unreachable") == 1 and "training continues unmonitored" in out
    assert res.findings == []


@pytest.mark.timeout(60)
def test_malformed_fault_is_a_clear_error_at_startup(tmp_path):
    res = run_drill(DEMO, world=2, run_dir=tmp_path, fault="rank=1,step=5,kind=explode",
                    script_args=[*FAST, "--steps", "10"], timeout=50)
    assert all(rc != 0 for rc in res.returncodes)
    assert "FaultSpecError: TRAINKIT_FAULT: unknown kind 'explode'" in res.outputs[0]


def _ddp_records(rank, world):
    """Every collective DDP's C++ reducer issues passes through the wrapper."""
    import torch

    from trainkit.detect.probe import MonitoredProcessGroup, register_group
    from trainkit.detect.recorder import Recorder
    import torch.distributed.distributed_c10d as c10d

    events = []
    wrapper = MonitoredProcessGroup(c10d._get_default_group(), Recorder(events.append, rank=rank))
    register_group(wrapper, as_default=True)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4)), bucket_cap_mb=0.001)
    for _ in range(3):
        model(torch.randn(2, 32)).sum().backward()
    t = torch.ones(2)
    import torch.distributed as dist

    dist.all_reduce(t)
    from trainkit.detect import unmonitored

    n_before = sum(1 for e in list(events) if e[0] == "i")
    with unmonitored():
        dist.all_reduce(t)           # trainkit's own traffic: not recorded
    assert sum(1 for e in list(events) if e[0] == "i") == n_before
    if rank == 0:
        dist.send(t, 1)
    else:
        dist.recv(t, 0)
    time.sleep(0.2)
    return {"ddp": events, "fsdp2": _fsdp2_records(rank, world)}


def _check_ddp(events):
    """Every reducer collective (and a user send) was recorded with its completion."""
    issued = [e for e in events if e[0] == "i"]
    done = {(e[1], e[2]) for e in events if e[0] == "d"}
    ops = [e[3] for e in issued]
    # construction broadcasts + >= 1 bucket allreduce per iteration + the user's allreduce
    assert ops.count("allreduce") >= 4 and "broadcast" in ops
    assert {(e[1], e[2]) for e in issued if e[3] != "send" and e[3] != "recv"} <= done
    p2p = [e for e in issued if e[1].startswith("0:p2p:")]
    assert [e[1] for e in p2p] == ["0:p2p:0-1"]
    assert (p2p[0][1], p2p[0][2]) in done
    assert all(e[4] > 0 for e in issued if e[3] == "allreduce")


def _fsdp2_records(rank, world):
    """FSDP2 (fully_shard on a DeviceMesh) collectives pass through the wrapper too."""
    import torch
    import torch.distributed.distributed_c10d as c10d
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from trainkit.detect.probe import MonitoredProcessGroup, register_group
    from trainkit.detect.recorder import Recorder

    events = []
    wrapper = MonitoredProcessGroup(c10d._get_default_group().inner,
                                    Recorder(events.append, rank=rank))
    register_group(wrapper, as_default=True)
    mesh = init_device_mesh("cpu", (world,))
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for _ in range(2):
        model(torch.randn(2, 16)).sum().backward()
    time.sleep(0.2)
    return events


@pytest.mark.timeout(90)
def test_wrapper_sees_reducer_and_fsdp2_collectives_with_completion():
    out = run_ranks(_ddp_records, 2, timeout=80)
    for rank, result in out.items():
        _check_ddp(result["ddp"])
        events = result["fsdp2"]
        ops = {e[3] for e in events if e[0] == "i"}
        assert {"allgather", "reduce_scatter"} <= ops
        assert len([e for e in events if e[0] == "d"]) == len([e for e in events if e[0] == "i"])


def test_aggregator_cli_rejects_bad_arguments(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "trainkit.detect.aggregator", "--run-dir",
                           str(tmp_path), "--hang-timeout", "-1"], capture_output=True, text=True,
                          env=subprocess_env(), timeout=60)
    assert proc.returncode == 2 and "--hang-timeout must be > 0" in proc.stderr
    _ = signal  # SIGTERM handling is exercised by the drills' stop_aggregator
