"""The warm pool (trainkit.run.pool): go files, worker environment, readiness, and a
hang that excludes a node with the survivors restarting on their pools.

The end-to-end test runs a real `trainkit run` on loopback: the coordinator, its store
and the aggregator take free ports of their own; it has a timeout and kills what it
started.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from trainkit.run.control import Control
from trainkit.run.pool import GenerationStore, GoPlan, pool_key, pools_ready, worker_env, write_go

TRAIN = Path(__file__).resolve().parent.parent / "examples" / "train.py"


def _go(**kw) -> GoPlan:
    base = dict(node_rank=1, nnodes=2, master_addr="127.0.0.1", master_port=1234,
                run_id="job-g1w", env={"TRAINKIT_GENERATION": "1"})
    return GoPlan(**(base | kw))


def test_worker_env_places_ranks_by_node_position():
    env = worker_env(_go(), local_rank=1, local_world_size=2)
    assert (env["RANK"], env["WORLD_SIZE"], env["GROUP_RANK"], env["GROUP_WORLD_SIZE"]) == \
        ("3", "4", "1", "2")
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == "1234"
    assert env["TORCHELASTIC_USE_AGENT_STORE"] == "True"   # every rank a client of the store
    assert env["TRAINKIT_GENERATION"] == "1"
    first = worker_env(_go(node_rank=0, nnodes=3), local_rank=0, local_world_size=2)
    assert (first["RANK"], first["WORLD_SIZE"]) == ("0", "6")


def test_go_file_round_trips_and_appears_whole(tmp_path):
    path = tmp_path / "go"
    write_go(path, _go())
    assert GoPlan.from_json(json.loads(path.read_text())) == _go()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go"]   # no temporary left


def test_generation_store_listens_on_loopback_and_serves_clients():
    gs = GenerationStore("127.0.0.1")
    client = dist.TCPStore("127.0.0.1", gs.port, is_master=False,
                           timeout=timedelta(seconds=10))
    client.set("k", "v")
    assert gs.store.get("k") == b"v"
    import psutil

    listening = [c for c in psutil.net_connections("tcp")
                 if c.laddr and c.laddr.port == gs.port and c.status == psutil.CONN_LISTEN]
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)
    gs.close()


@pytest.mark.timeout(30)
def test_pools_ready_waits_for_importing_pools_and_refuses_missing_or_failed():
    gs = GenerationStore("127.0.0.1")
    control = Control(gs.store)
    assert pools_ready(control, ("a", "b"), wait=0.1) is None          # none started
    control.put(pool_key("a"), {"seq": 3, "state": "ready"})
    control.put(pool_key("b"), {"seq": 0, "state": "started"})
    assert pools_ready(control, ("a", "b"), wait=0.1) is None          # b still importing
    control.put(pool_key("b"), {"seq": 0, "state": "ready"})
    assert pools_ready(control, ("a", "b"), wait=0.1) == {"a": 3, "b": 0}
    control.put(pool_key("b"), {"seq": 1, "state": "failed"})
    assert pools_ready(control, ("a", "b"), wait=5.0) is None          # no wait for a dead one
    gs.close()


@pytest.mark.timeout(300)
def test_hang_excludes_the_node_and_survivors_restart_on_their_warm_pools(tmp_path):
    from test_run_e2e import _launch

    run_dir = tmp_path / "run"
    progress = tmp_path / "progress.jsonl"
    cmd = [sys.executable, "-m", "trainkit", "run", "--run-dir", str(run_dir),
           "--local-nodes", "3", "--exclude-after", "1", "--max-restarts", "2", "--",
           "--nnodes=2:3", "--nproc-per-node=1", "--monitor-interval=0.1", str(TRAIN),
           "--steps", "26", "--ckpt-every", "4", "--keep-in-memory", "2",
           "--ckpt-dir", str(tmp_path / "ckpt"), "--progress-log", str(progress),
           "--step-delay", "0.3"]
    seen: list = []

    def listeners_during_the_warm_generation(_run_dir: Path) -> None:
        """Once generation 1 trains, every listener of the job's processes (the
        coordinator's stores, the pools' torchruns, the aggregator) is on loopback."""
        import psutil
        from test_run_listeners import _is_loopback, _listeners, _socket_inodes

        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            rows = progress.read_text().splitlines() if progress.exists() else []
            if any(json.loads(x)["generation"] == "1" for x in rows):
                break
            time.sleep(0.2)
        pids = set()
        for p in psutil.process_iter(["cmdline"]):
            if str(tmp_path) in " ".join(p.info["cmdline"] or []):
                pids.add(p.pid)
        seen.extend(_listeners(_socket_inodes(pids)))
        seen.append([e for e in seen if not _is_loopback(e[1])])

    proc, events = _launch(cmd, run_dir, env={"TRAINKIT_FAULT": "node=2,step=16,kind=hang"},
                           timeout=280, during=listeners_during_the_warm_generation)
    *listeners, exposed = seen
    assert len(listeners) >= 3 and exposed == [], (listeners, exposed)
    assert proc.returncode == 0, proc.stdout[-5000:]
    decision = next(e for e in events if e["event"] == "decision")
    assert decision["fault"].startswith("hang") and decision["exclude"] == ["node2"]
    gen1 = next(e for e in events if e["event"] == "generation_start" and e["gen"] == 1)
    assert gen1["members"] == ["node0", "node1"] and gen1["path"] == "warm", gen1
    first = next(e for e in events if e["event"] == "first_step")
    assert first["gen"] == 1 and first["path"] == "warm"
    assert 0 < first["since_decision_s"] < 60
    assert events[-1]["event"] == "done"
    rows = [json.loads(x) for x in progress.read_text().splitlines()]
    after = [r for r in rows if r["generation"] == "1"]
    assert after and after[-1]["step"] == 26 and after[-1]["world"] == 2
    assert min(r["step"] for r in after) <= 16        # resumed from a checkpoint before the fault
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    # the survivors' workers of generation 1 ran in their pools: their log says warm start
    agents = (run_dir / "logs" / "agents.log").read_text()
    assert "generation 1: warm start (pool 0)" in agents
