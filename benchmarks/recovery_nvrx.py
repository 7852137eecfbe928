"""Recovery against the peer users would pick: NVIDIA's ``ft_launcher`` (nvidia-resiliency-ext).

The same small gloo job (2 nodes x 1 rank on loopback, ~0.2 s steps, a checkpoint every
step) runs under ``trainkit run --local-nodes 2`` and under two ``ft_launcher``
processes (one per simulated node, c10d rendezvous, in-job restarts), with heartbeats
(NVRx) and the hang timeout (trainkit) at the same value. A crash or a hang is injected
on rank 1 at step ``--fault-step``, once; the figure is the time from the fault until
rank 0 is back at the fault's step. The two sides run interleaved. trainkit's runs also
report their goodput from ``goodput.json``, next to a fault-free run's.

NVRx is installed by this script into its own directory under /tmp (``pip install
--target``, the newest version pip finds for this Python, without its torch
requirement: it runs on the benchmark's own torch, so both sides use the same one).

    python benchmarks/recovery_nvrx.py --repeats 1 --json bench_out/recovery_nvrx.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

JOB = textwrap.dedent("""
    import os, signal, sys, time, json, torch, torch.distributed as dist
    from trainkit.checkpoint import Checkpointer, CheckpointNotFoundError
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    work = os.environ["BENCH_WORK"]
    ft = None
    if os.environ.get("BENCH_NVRX"):
        from nvidia_resiliency_ext.fault_tolerance import RankMonitorClient
        ft = RankMonitorClient()
        ft.init_workload_monitoring()
    mon = None
    if os.environ.get("TRAINKIT_AGGREGATOR"):
        from trainkit.detect import CollectiveMonitor
        mon = CollectiveMonitor().start()
    mem = 1 if os.environ.get("TRAINKIT_MEMORY_DIR") else 0
    ckpt = Checkpointer(os.path.join(work, "ckpt"), keep_in_memory=mem,
                        persist_every=10 if mem else 1, keep_persistent=3, timeout=60)
    w, start = torch.zeros(1024), 1
    try:
        state = ckpt.load()
        w, start = state["w"], state["step"] + 1
    except CheckpointNotFoundError:
        pass
    fault, fault_step = os.environ.get("BENCH_FAULT"), int(os.environ.get("BENCH_FAULT_STEP", 0))
    marker = os.path.join(work, "fault.json")
    log = open(os.path.join(work, "progress.jsonl"), "a") if rank == 0 else None
    for step in range(start, int(os.environ["BENCH_STEPS"]) + 1):
        if mon is not None:
            mon.step(step)
        if fault and step == fault_step and rank == 1 and not os.path.exists(marker):
            with open(marker, "w") as f:
                json.dump({"time": time.time(), "kind": fault}, f)
            if fault == "crash":
                os.kill(os.getpid(), signal.SIGKILL)
            while True:
                time.sleep(3600)
        time.sleep(0.2)
        t = w.clone(); dist.all_reduce(t); w = w + 1
        if ft is not None:
            ft.send_heartbeat()
        ckpt.save(step, {"w": w, "step": step})
        if log is not None:
            log.write(json.dumps({"step": step, "time": time.time()}) + "\\n"); log.flush()
    ckpt.close()
    if ft is not None:
        ft.shutdown_workload_monitoring()
    if mon is not None:
        mon.close()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_nvrx(site: Path) -> str:
    """The newest nvidia-resiliency-ext pip finds for this Python, into ``site``."""
    if not (site / "nvidia_resiliency_ext").is_dir():
        for spec in (["--no-deps", "nvidia-resiliency-ext"],
                     ["--no-deps", "nvidia-ml-py", "pynvml", "defusedxml"]):
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(site),
                            *spec], check=True)
    dist = next(site.glob("nvidia_resiliency_ext-*.dist-info"))
    return dist.name[len("nvidia_resiliency_ext-"):-len(".dist-info")]


def _env(work: Path, site: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINKIT_")}
    env.update(BENCH_WORK=str(work), OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(site or ""),
                                                    env.get("PYTHONPATH", "")) if p)
    return env


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_trainkit(work: Path, job: Path, cfg: argparse.Namespace, fault: str | None) -> dict:
    env = _env(work, BENCH_STEPS=str(cfg.steps), BENCH_FAULT=fault or "",
               BENCH_FAULT_STEP=str(cfg.fault_step))
    cmd = [sys.executable, "-m", "trainkit", "run", "--local-nodes", "2",
           "--run-dir", str(work / "run"), "--hang-timeout", str(cfg.timeout), "--",
           "--nproc-per-node=1", "--monitor-interval=0.1", str(job)]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        rc = p.wait(timeout=cfg.run_timeout)
    except subprocess.TimeoutExpired:
        rc = None
    _kill([p])
    out = _result(work, rc, cfg.fault_step)
    gp = work / "run" / "goodput.json"
    if gp.exists():
        doc = json.loads(gp.read_text())
        out.update(goodput=doc["goodput"], badput_s=doc["badput_s"], wall_s=doc["wall_s"])
    return out


def run_nvrx(work: Path, job: Path, cfg: argparse.Namespace, fault: str | None,
             site: Path) -> dict:
    port = _free_port()
    env = _env(work, BENCH_STEPS=str(cfg.steps), BENCH_FAULT=fault or "",
               BENCH_FAULT_STEP=str(cfg.fault_step), BENCH_NVRX="1", site=site)
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "nvidia_resiliency_ext.fault_tolerance.launcher",
               "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=bench", "--max-restarts=3",
               f"--local-addr=127.0.0.{node + 1}", "--monitor-interval=0.1",
               "--ft-initial-rank-heartbeat-timeout=120",
               f"--ft-rank-heartbeat-timeout={cfg.timeout}", str(job)]
        log = open(work / f"nvrx{node}.log", "w")
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    deadline, rc = time.monotonic() + cfg.run_timeout, None
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    if all(p.poll() is not None for p in procs):
        rc = max(p.returncode for p in procs)
    _kill(procs)
    return _result(work, rc, cfg.fault_step)


def _result(work: Path, rc: int | None, fault_step: int) -> dict:
    rows = [json.loads(x) for x in (work / "progress.jsonl").read_text().splitlines()
            if x.strip()] if (work / "progress.jsonl").exists() else []
    out = {"rc": rc, "last_step": max((r["step"] for r in rows), default=None)}
    marker = work / "fault.json"
    if marker.exists():
        t_fault = json.loads(marker.read_text())["time"]
        back = [r["time"] for r in rows if r["time"] > t_fault and r["step"] >= fault_step]
        out["lost_s"] = round(min(back) - t_fault, 3) if back else None
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=4, help="runs per side and fault (median)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--fault-step", type=int, default=15)
    p.add_argument("--timeout", type=float, default=5.0,
                   help="hang timeout (trainkit) and heartbeat timeout (NVRx), seconds")
    p.add_argument("--run-timeout", type=float, default=240.0)
    p.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "trainkit-nvrx")
    p.add_argument("--sides", default="nvrx,trainkit",
                   help="comma-separated sides to run (default: both, interleaved)")
    p.add_argument("--json", type=Path, default=None)
    cfg = p.parse_args()
    sides = tuple(x for x in ("nvrx", "trainkit") if x in cfg.sides.split(","))
    version = install_nvrx(cfg.site) if "nvrx" in sides else None
    root = Path(tempfile.mkdtemp(prefix="trainkit-recovery-nvrx-"))
    job = root / "job.py"
    job.write_text(JOB)
    results: dict = {"nvrx_version": version, "config": {k: str(v) for k, v in vars(cfg).items()},
                     "runs": []}
    n = 0
    base = root / "baseline"
    base.mkdir()
    results["baseline"] = run_trainkit(base, job, cfg, None)
    print("baseline (trainkit, no fault):", results["baseline"], flush=True)
    for rep in range(cfg.repeats):
        for fault in ("crash", "hang"):
            for side in sides:
                n += 1
                work = root / f"{n:02d}-{side}-{fault}"
                work.mkdir()
                r = (run_nvrx(work, job, cfg, fault, cfg.site) if side == "nvrx"
                     else run_trainkit(work, job, cfg, fault))
                r.update(side=side, fault=fault, rep=rep)
                results["runs"].append(r)
                print(r, flush=True)
    summary = {}
    for fault in ("crash", "hang"):
        for side in sides:
            lost = [r["lost_s"] for r in results["runs"] if r["side"] == side
                    and r["fault"] == fault and r.get("lost_s") is not None]
            summary[f"{side}/{fault}"] = {
                "median_lost_s": statistics.median(lost) if lost else None, "n": len(lost),
                "goodput": [r.get("goodput") for r in results["runs"]
                            if r["side"] == side and r["fault"] == fault]}
    results["summary"] = summary
    print(json.dumps(summary, indent=1))
    if cfg.json:
        cfg.json.parent.mkdir(parents=True, exist_ok=True)
        cfg.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
