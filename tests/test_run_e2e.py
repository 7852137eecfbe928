"""`trainkit run` end to end: real torchrun generations on gloo, several agents as nodes.

Every test has a timeout and kills the whole process tree it started.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distributed import subprocess_env
from trainkit.rundir import read_jsonl

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
    # ranks share torchrun's stdout, so lines can interleave: count marker files instead
    marker = "finished.{}.gen{}.rank{}".format(os.environ["TRAINKIT_NODE"],
                                               os.environ["TRAINKIT_GENERATION"], dist.get_rank())
    open(os.path.join(os.environ["TRAINKIT_RUN_DIR"], marker), "w").close()
    dist.destroy_process_group()
""")


def _launch(cmd: list[str], run_dir: Path, *, env: dict[str, str], timeout: float,
            during=None) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run a `trainkit run` command to the end (or kill it at ``timeout``) and read its
    events; ``during(run_dir)`` runs while it is going. Everything it started is killed."""
    proc = subprocess.Popen(cmd, env=subprocess_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        if during is not None:
            during(run_dir)
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"trainkit run timed out:\n{out[-5000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _kill_leftovers(run_dir)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None), \
        read_jsonl(run_dir / "events.jsonl")


def _trainkit_run(tmp_path: Path, args: list[str], script: str, *, env: dict[str, str],
                  timeout: float = 200) -> tuple[subprocess.CompletedProcess, list[dict]]:
    path = tmp_path / "job.py"
    path.write_text(script)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainkit", "run", "--run-dir", str(run_dir), *args, "--",
           "--nproc-per-node=2", "--monitor-interval=0.1", str(path)]
    return _launch(cmd, run_dir, env=env, timeout=timeout)


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
    finished = sorted(p.name.split(".")[1:3] for p in (tmp_path / "run").glob("finished.*"))
    # every rank of generation 1 finished: 2 nodes x 2 ranks, none from generation 0
    assert finished == [["node0", "gen1"]] * 2 + [["node1", "gen1"]] * 2, finished


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


# -- with the real training example, the detector and the checkpointer ----------------

TRAIN = Path(__file__).resolve().parent.parent / "examples" / "train.py"


def _train_job(tmp_path: Path, trainkit_args: list[str], train_args: list[str], *,
               env: dict[str, str], timeout: float = 200,
               during=None) -> tuple[subprocess.CompletedProcess, list[dict], list[dict]]:
    run_dir = tmp_path / "run"
    progress = tmp_path / "progress.jsonl"
    cmd = [sys.executable, "-m", "trainkit", "run", "--run-dir", str(run_dir), *trainkit_args,
           "--", "--nproc-per-node=2", "--monitor-interval=0.1", str(TRAIN),
           "--ckpt-dir", str(tmp_path / "ckpt"), "--progress-log", str(progress), *train_args]
    proc, events = _launch(cmd, run_dir, env=env, timeout=timeout,
                           during=None if during is None else lambda d: during(d, progress))
    return proc, events, read_jsonl(progress)


def test_crash_restarts_and_resumes_with_identical_losses(tmp_path):
    """Checkpoints in the memory tier (the agent's /dev/shm), the node-local tier, and
    only the first one in persistent: the restart restores from memory. Memory keeps two
    steps: the crashed node may not have published the newest one's record, and the step
    every rank agrees on is then the one before."""
    # --tee: the script's own "restored step" line is asserted on below; without it the
    # workers' output goes to run_dir/logs only
    proc, events, steps = _train_job(
        tmp_path, ["--local-nodes", "2", "--hang-timeout", "5", "--tee"],
        ["--steps", "16", "--ckpt-every", "3", "--keep-in-memory", "2",
         "--local-dir", str(tmp_path / "local{node}"), "--persist-every", "100"],
        env={"TRAINKIT_FAULT": "node=1,step=10,kind=crash"})
    assert proc.returncode == 0, proc.stdout[-5000:]
    decision = next(e for e in events if e["event"] == "decision")
    assert decision["action"] == "restart" and decision["culprits"] == ["node1"]
    gen1 = next(e for e in events if e["event"] == "generation_start" and e["gen"] == 1)
    assert gen1["warm"] is True         # same nodes: the pre-started generation takes over
    by_gen: dict[str, dict[int, float]] = {}
    for s in steps:
        by_gen.setdefault(s["generation"], {})[s["step"]] = s["loss"]
    first, second = by_gen["0"], by_gen["1"]
    resumed = min(second)
    assert resumed <= 10 and max(second) == 16
    assert resumed - 1 in (3, 6, 9), "resumes right after a committed checkpoint"
    assert f"restored step {resumed - 1} from the memory tier" in proc.stdout, proc.stdout[-3000:]
    for node in ("node0", "node1"):     # each agent freed its node's memory tier
        digest = hashlib.sha1(f"{(tmp_path / 'run').resolve()}|{node}".encode()).hexdigest()
        assert not Path(f"/dev/shm/trainkit-{os.getuid()}/run-{digest[:16]}").exists()
    overlap = sorted(set(first) & set(second))
    assert overlap, "some steps were recomputed after the crash"
    # The same world size and the restored state: the recomputed steps repeat the same
    # computation. The logged loss may still differ in its last bit at a step: the
    # loss's mean is a vectorised sum whose rounding depends on the alignment of a freshly
    # allocated activation (seen: one step of several, 1 ulp, and the next step equal
    # again, so the model did not diverge). Hence: every step within 4 ulps, and most
    # steps bit-identical.
    differ = [s for s in overlap if second[s] != first[s]]
    assert len(differ) <= max(1, len(overlap) // 2), [(s, first[s], second[s]) for s in differ]
    for step in differ:
        assert math.isclose(second[step], first[step], rel_tol=4 * 2.0 ** -23), step
    # goodput.json, written before the final event, adds up and sees the crash's costs
    assert events[-1]["event"] == "done"
    gp = json.loads((tmp_path / "run" / "goodput.json").read_text())
    assert gp["complete"] and gp["step_reports"] > 0
    total = gp["productive_s"] + sum(gp["badput_s"].values())
    assert abs(total - gp["wall_s"]) <= 0.05 * gp["wall_s"], gp
    assert 0 < gp["goodput"] < 1
    for part in ("startup", "checkpoint", "detection", "restart", "recompute"):
        assert gp["badput_s"][part] > 0, (part, gp["badput_s"])
    assert gp["generations"][1]["restored_step"] == resumed - 1


def test_crash_restart_restores_an_fsdp2_job_from_the_memory_tier(tmp_path):
    """FSDP2 (DTensor state, saved lazily, loaded with into=): a crash of one node, and
    the next generation restores from the agents' /dev/shm and repeats the lost steps."""
    # --tee: the "restored step" line below is the workers' output (run_dir/logs otherwise)
    proc, events, steps = _train_job(
        tmp_path, ["--local-nodes", "2", "--hang-timeout", "5", "--tee"],
        ["--fsdp", "--steps", "8", "--ckpt-every", "2", "--keep-in-memory", "2",
         "--hidden", "32", "--persist-every", "100"],
        env={"TRAINKIT_FAULT": "node=1,step=6,kind=crash"})
    assert proc.returncode == 0, proc.stdout[-5000:]
    decision = next(e for e in events if e["event"] == "decision")
    assert decision["action"] == "restart" and decision["culprits"] == ["node1"]
    by_gen: dict[str, dict[int, float]] = {}
    for s in steps:
        by_gen.setdefault(s["generation"], {})[s["step"]] = s["loss"]
    first, second = by_gen["0"], by_gen["1"]
    resumed = min(second)
    assert resumed - 1 in (2, 4) and max(second) == 8, sorted(second)
    assert f"restored step {resumed - 1} from the memory tier" in proc.stdout, proc.stdout[-3000:]
    overlap = sorted(set(first) & set(second))
    assert overlap, "some steps were recomputed after the crash"
    for step in overlap:
        assert math.isclose(second[step], first[step], rel_tol=4 * 2.0 ** -23), step


def test_aggregator_killed_training_continues_unmonitored(tmp_path):
    import psutil

    def kill_aggregator(run_dir: Path, progress: Path) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if progress.exists() and len(progress.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        pid = json.loads((run_dir / "aggregator.json").read_text())["pid"]
        psutil.Process(pid).kill()

    proc, events, steps = _train_job(
        tmp_path, ["--local-nodes", "2", "--hang-timeout", "5"],
        ["--steps", "30", "--ckpt-every", "10", "--step-delay", "0.3"], env={},
        during=kill_aggregator)
    assert proc.returncode == 0, proc.stdout[-5000:]
    warnings = [e for e in events if e["event"] == "warning"]
    assert warnings and "unmonitored" in warnings[0]["reason"]
    assert not [e for e in events if e["event"] == "decision"]
    assert max(s["step"] for s in steps) == 30
    assert events[-1]["event"] == "done"


def test_drill_hang_isolates_node2_and_finishes_on_two_nodes(tmp_path):
    run_dir = tmp_path / "drill"
    proc = subprocess.run([sys.executable, "-m", "trainkit", "run", "--drill", "--run-dir",
                           str(run_dir)], env=subprocess_env(), capture_output=True, text=True,
                          timeout=220, start_new_session=True)
    _kill_leftovers(run_dir)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    finding = next(e for e in events if e["event"] == "finding")["finding"]
    assert finding["class"] == "hang_noncomm" and set(finding["hosts"]) == {"node2"}
    decision = next(e for e in events if e["event"] == "decision")
    assert decision["exclude"] == ["node2"]
    gen1 = next(e for e in events if e["event"] == "generation_start" and e["gen"] == 1)
    assert gen1["members"] == ["node0", "node1"]
    # membership changed, and the survivors' warm pools still take the restart
    assert gen1["warm"] is True and gen1["path"] == "warm"
    first = next(e for e in events if e["event"] == "first_step")
    assert first["gen"] == 1 and first["path"] == "warm" and first["since_decision_s"] > 0
    assert "decision to first step" in proc.stdout and "(warm)" in proc.stdout
    progress = [json.loads(x) for x in (run_dir / "progress.jsonl").read_text().splitlines()]
    assert progress[-1]["step"] == 40 and progress[-1]["world"] == 4
    assert "recovery timeline" in proc.stdout and "job finished: yes" in proc.stdout
