"""The trainkit demo: kill a 2-rank training job with SIGKILL, resume it, and show that
the loss curve is the same, step for step and bit for bit, as a run never interrupted.

    .venv/bin/python examples/demo.py            # or: bash scripts/demo.sh

It runs ``examples/train.py`` under the real ``torchrun --nproc-per-node=2`` (gloo, CPU)
three times:

1. uninterrupted, as the reference;
2. killed with SIGKILL (the whole process group: agent and both workers) in the middle
   of the run, while lazy checkpoints are being written;
3. restarted with the same command; it resumes from the newest committed checkpoint.

Exits 0 when every loss of runs 2+3 equals the reference's, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "examples" / "train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, name: str, args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(TRAIN), *args]
    log = open(out / f"{name}.log", "a")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=REPO)


def read_losses(path: Path) -> list[tuple[int, str]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            rows.append((int(parts[0]), parts[1]))
    return rows


def kill_job(proc: subprocess.Popen) -> list[int]:
    """SIGKILL torchrun and every worker at once. torchrun starts its workers in their
    own sessions, so killing its process group alone would leave them running."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    proc.wait()
    return [p.pid for p in procs]


def finish(proc: subprocess.Popen, timeout: float, what: str) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        raise SystemExit(f"demo: {what} did not finish within {timeout:.0f}s")
    if rc != 0:
        raise SystemExit(f"demo: {what} failed with exit code {rc}; see its log")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--ckpt-every", type=int, default=20)
    p.add_argument("--kill-at", type=int, default=110, help="SIGKILL once this step is logged")
    p.add_argument("--out", default=str(REPO / "runs" / "demo"))
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    common = ["--steps", str(args.steps), "--ckpt-every", str(args.ckpt_every),
              "--step-delay", "0.01"]
    t0 = time.monotonic()

    print(f"[demo] 1/3 reference run: torchrun --nproc-per-node=2 train.py, {args.steps} steps, "
          f"lazy checkpoint every {args.ckpt_every}", flush=True)
    ref_log = out / "reference_loss.txt"
    finish(torchrun(out, "reference", [*common, "--ckpt-dir", str(out / "ckpt_reference"),
                                       "--loss-log", str(ref_log)]), 150, "the reference run")

    print(f"[demo] 2/3 same job, SIGKILLed (agent and both ranks) after step {args.kill_at}",
          flush=True)
    ckpt_dir = out / "ckpt_killed"
    run_log = out / "killed_then_resumed_loss.txt"
    run_args = [*common, "--ckpt-dir", str(ckpt_dir), "--loss-log", str(run_log)]
    proc = torchrun(out, "killed", run_args)
    deadline = time.monotonic() + 150
    while not any(s >= args.kill_at for s, _ in read_losses(run_log)):
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_job(proc)
            raise SystemExit("demo: the run ended before it could be killed; see killed.log")
        time.sleep(0.005)
    killed = kill_job(proc)
    logged_before = max(s for s, _ in read_losses(run_log))
    committed = sorted(int(d.name[5:]) for d in ckpt_dir.glob("step_*")
                       if (d / "zarr.json").exists())
    partial = sorted(int(d.name[5:]) for d in ckpt_dir.glob("step_*")
                     if not (d / "zarr.json").exists())
    print(f"[demo]     SIGKILLed {len(killed)} processes after step {logged_before}; committed checkpoints: {committed}"
          + (f"; uncommitted (ignored): {partial}" if partial else ""), flush=True)

    print("[demo] 3/3 restart with the same command: it resumes from the newest committed "
          "checkpoint", flush=True)
    finish(torchrun(out, "resumed", run_args), 150, "the resumed run")

    reference = dict(read_losses(ref_log))
    rows = read_losses(run_log)
    mismatches = [(s, v, reference.get(s)) for s, v in rows if reference.get(s) != v]
    covered = {s for s, _ in rows}
    missing = sorted(set(reference) - covered)
    replayed = len(rows) - len(covered)
    print(f"[demo] compared {len(rows)} logged losses ({replayed} steps ran twice: before the "
          f"kill and after the resume) against the reference's {len(reference)}")
    print(f"[demo] reference loss: step 1 {reference[1]}, step {args.steps} "
          f"{reference[args.steps]}")
    print(f"[demo] elapsed {time.monotonic() - t0:.1f}s; logs and checkpoints in {out}")
    if mismatches or missing:
        for s, got, want in mismatches[:10]:
            print(f"[demo] MISMATCH at step {s}: {got} != reference {want}")
        if missing:
            print(f"[demo] MISSING steps: {missing[:10]}")
        print("[demo] FAIL: the resumed run diverged from the reference")
        return 1
    print("[demo] PASS: the killed-and-resumed run reproduced every loss exactly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
