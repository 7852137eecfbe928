"""`trainkit run` end to end: real torchrun generations on gloo, several agents as nodes.

Every test has a timeout and kills the whole process tree it started.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distributed import subprocess_env

pytestmark = pytest.mark.timeout(240)

CRASHY = textwrap.dedent("""
    import os, sys, time, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    crash_node = os.environ.get("CRASH_NODE")
    always = os.environ.get("CRASH_ALWAYS") == "1"
    for step in range(8):
        t = torch.ones(4); dist.all_reduce(t)
        first_gen = os.environ["TRAINKIT_GENERATION"] == "0"
        if (crash_node == os.environ["TRAINKIT_NODE"] and (always or first_gen)
                and step == 2 and os.environ["LOCAL_RANK"] == "0"):
            os.kill(os.getpid(), 9)
        time.sleep(0.05)
    print("finished", os.environ["TRAINKIT_NODE"], os.environ["TRAINKIT_GENERATION"], flush=True)
    dist.destroy_process_group()
""")


def _trainkit_run(tmp_path: Path, args: list[str], script: str, *, env: dict[str, str],
                  timeout: float = 200) -> tuple[subprocess.CompletedProcess, list[dict]]:
    path = tmp_path / "job.py"
    path.write_text(script)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainkit", "run", "--run-dir", str(run_dir), *args, "--",
           "--nproc-per-node=2", "--monitor-interval=0.1", str(path)]
    proc = subprocess.Popen(cmd, env=subprocess_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"trainkit run timed out:\n{out[-5000:]}")
    finally:
        _kill_leftovers(run_dir)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None), events


def _kill_leftovers(run_dir: Path) -> None:
    """Kill any process still running with this run dir on its command line."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(run_dir) in " ".join(p.info["cmdline"] or []):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def test_crash_without_detector_restarts_and_names_the_node(tmp_path):
    proc, events = _trainkit_run(tmp_path, ["--local-nodes", "2", "--no-detect"], CRASHY,
                                 env={"CRASH_NODE": "node1"})
    assert proc.returncode == 0, proc.stdout[-4000:]
    decisions = [e for e in events if e["event"] == "decision"]
    assert len(decisions) == 1
    assert decisions[0]["action"] == "restart"
    assert decisions[0]["culprits"] == ["node1"]
    assert decisions[0]["fault"] == "crash"
    assert [e["gen"] for e in events if e["event"] == "generation_start"] == [0, 1]
    assert events[-1]["event"] == "done"
    finished_gen1 = re.findall(r"finished node\d 1", proc.stdout)
    assert len(finished_gen1) == 4, proc.stdout[-4000:]  # 2 nodes x 2 ranks in generation 1


def test_max_restarts_exhausted_exits_nonzero_with_summary(tmp_path):
    proc, events = _trainkit_run(tmp_path, ["--local-nodes", "2", "--no-detect",
                                            "--max-restarts", "1", "--exclude-after", "99"],
                                 CRASHY, env={"CRASH_NODE": "node1", "CRASH_ALWAYS": "1"})
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert "giving up after 1 restart(s)" in proc.stdout
    assert "--max-restarts=1 exhausted" in proc.stdout
    kinds = [e["event"] for e in events]
    assert kinds.count("generation_start") == 2
    assert kinds[-1] == "give_up"
