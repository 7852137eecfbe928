"""Fault drills on one machine: run a monitored job locally, inject a fault, collect findings.

Used by the tests and ``benchmarks/detect_bench.py``, and by users rehearsing
failures. Each rank is a plain process with the torchrun environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), all in one new session, so the
whole job, and the detached aggregator it started, can be stopped for sure.

    result = run_drill("examples/detect_demo.py", world=4, run_dir="runs/d1",
                       fault="rank=2,step=10,kind=hang", script_args=["--hang-timeout", "3"])
    result.findings      # the lines of runs/d1/diagnosis.jsonl
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainkit import rundir
from trainkit.rundir import FAULT_ENV, read_fault_markers, read_jsonl

__all__ = ["DrillResult", "run_drill", "stop_aggregator", "free_port"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DrillResult:
    """What a drill produced. ``fault_time`` is when the injected fault fired (marker)."""

    findings: list[dict[str, Any]]
    fault_markers: list[dict[str, Any]]
    returncodes: list[int | None]
    outputs: list[str]
    wall_s: float
    timed_out: bool
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fault_time(self) -> float | None:
        times = [m["time"] for m in self.fault_markers if "time" in m]
        return min(times) if times else None


def stop_aggregator(run_dir: str | os.PathLike, *, grace: float = 3.0) -> bool:
    """SIGTERM (then SIGKILL) the aggregator recorded in run_dir; True if one was running."""
    path = Path(run_dir) / rundir.AGGREGATOR_ADDR_FILE
    try:
        pid = int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def run_drill(script: str | os.PathLike, *, world: int, run_dir: str | os.PathLike,
              fault: str | None = None, script_args: Sequence[str] = (),
              env: dict[str, str] | None = None, timeout: float = 60.0,
              stop_on_finding: bool = True, settle_s: float = 1.0,
              python: str = sys.executable,
              env_per_rank: Mapping[int, Mapping[str, str]] | None = None) -> DrillResult:
    """Run ``script`` as ``world`` local ranks; stop at the first finding or at exit.

    ``env_per_rank`` adds variables for single ranks (say, a restart count that differs
    between nodes, as an elastic agent's can). Every process started (ranks and the
    detached aggregator) is stopped before this returns.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = dict(os.environ if env is None else env)
    repo = str(Path(__file__).resolve().parents[2])
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, base.get("PYTHONPATH")]))
    base.setdefault("OMP_NUM_THREADS", "1")
    base[rundir.RUN_DIR_ENV] = str(run_dir)
    base.pop(FAULT_ENV, None)
    if fault:
        base[FAULT_ENV] = fault
    procs: list[subprocess.Popen] = []
    logs = []
    start = time.monotonic()
    timed_out = False
    try:
        for rank in range(world):
            rank_env = dict(base, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                            LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port), GROUP_RANK="0")
            rank_env.update((env_per_rank or {}).get(rank, {}))
            log = open(run_dir / f"rank{rank}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen([python, str(script), "--run-dir", str(run_dir),
                                           *script_args], env=rank_env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True))
        diag = run_dir / rundir.DIAGNOSIS_FILE
        while True:
            if all(p.poll() is not None for p in procs):
                break
            if stop_on_finding and diag.exists() and diag.stat().st_size > 0:
                time.sleep(settle_s)
                break
            if time.monotonic() - start > timeout:
                timed_out = True
                break
            time.sleep(0.05)
    finally:
        if any(p.poll() is None for p in procs):
            # Stopping a live job: the aggregator goes first, so the kill below is not
            # itself reported as a crash.
            stop_aggregator(run_dir)
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        # A standalone aggregator exits by itself once the ranks are gone; give it a moment
        # to write a last finding, then make sure it is gone.
        deadline = time.monotonic() + 4.0
        addr = run_dir / rundir.AGGREGATOR_ADDR_FILE
        while time.monotonic() < deadline and addr.exists() and _pid_alive(addr):
            time.sleep(0.1)
        stop_aggregator(run_dir)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return DrillResult(findings=read_jsonl(run_dir / rundir.DIAGNOSIS_FILE),
                       fault_markers=read_fault_markers(run_dir),
                       returncodes=[p.returncode for p in procs], outputs=outputs,
                       wall_s=time.monotonic() - start, timed_out=timed_out)


def _pid_alive(addr_file: Path) -> bool:
    try:
        pid = int(json.loads(addr_file.read_text())["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError):
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
