"""Time lost per fault: `trainkit run` against torchrun restarts + torch.save checkpoints.

For a hang and for a crash, "time lost" runs from the injected fault until training is
again at the step it had reached when the fault hit (recomputation included). Both sides
run the same job (examples/train.py, 4 gloo ranks) with the same checkpoint overhead
budget (default 3% of step time):

- the baseline saves with synchronous torch.save (+fsync) every N steps, N chosen so the
  measured save cost stays within the budget; it relies on torchrun noticing a worker's
  exit and on the gloo collective timeout to notice a hang (lowered here, and
  extrapolated to the 30 min default by adding the difference: the rest of the recovery
  does not depend on it). torchrun 2.13's own in-place restart (``--max-restarts=3``)
  cannot restart gloo workers here: every retry fails in ``connectFullMesh`` against the
  previous attempt's peer addresses left in the agent's store (static and c10d
  backends alike). The baseline therefore restarts the way a job script does, by
  relaunching torchrun, up to 3 times; that costs one extra Python start (~1-2 s);
- trainkit saves lazily every k steps, k chosen the same way from its measured cost, and
  runs under `trainkit run` (detector + restart + resume).

Each side's checkpoint cost is measured first in fault-free calibration runs, from the
extra time of the 3 steps after each save over the median step. The fault is injected at
a step halfway between two baseline checkpoints (its average case).

    python benchmarks/recovery_bench.py [--quick] [--json out.json]
    python benchmarks/recovery_bench.py --case exclusion [--repeats 3]   # a node excluded

``--case exclusion`` (``benchmarks/recovery_exclusion.py``) measures a hang that gets a
node excluded: time lost until the two remaining nodes are back at the fault's step, and
the decision to the first step after the restart, warm pools against ``--no-warm-start``.

The peer users would pick instead, NVIDIA's ``ft_launcher`` (nvidia-resiliency-ext), is
measured by ``benchmarks/recovery_nvrx.py`` (its own install under /tmp), which also
reports trainkit's goodput from ``goodput.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "examples" / "train.py"
GLOO_DEFAULT_TIMEOUT_S = 1800.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(run_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env["TRAINKIT_RUN_DIR"] = str(run_dir)
    env.pop("TRAINKIT_FAULT", None)
    env.update(extra)
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: float, *,
         relaunches: int = 0) -> tuple[int, float]:
    """Run ``cmd``; relaunch it up to ``relaunches`` times while it fails."""
    t0 = time.time()
    for _ in range(relaunches):
        rc, _ = _run(cmd, env, timeout - (time.time() - t0))
        if rc == 0:
            return rc, time.time() - t0
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=max(1.0, timeout - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = -9
    return rc, time.time() - t0


def _progress(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _train_args(cfg: argparse.Namespace, work: Path, backend: str, every: int, steps: int,
                extra: list[str] = ()) -> list[str]:
    tiers = (["--keep-in-memory", "1", "--persist-every", str(cfg.persist_every)]
             if backend == "trainkit" else [])
    return [str(TRAIN), "--steps", str(steps), "--ckpt-every", str(every), "--ckpt-backend",
            backend, "--ckpt-dir", str(work / "ckpt"), "--progress-log",
            str(work / "progress.jsonl"), "--hidden", str(cfg.hidden), "--step-delay",
            str(cfg.step_delay), "--detect", *tiers, *extra]


def _torchrun(cfg: argparse.Namespace, train_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={cfg.ranks}", "--max-restarts=0", "--monitor-interval=0.1",
            *train_args]


def calibrate(cfg: argparse.Namespace, backend: str, root: Path) -> dict:
    """Per-checkpoint cost: extra time of the 3 steps after each save over the median."""
    work = root / f"calib-{backend}"
    every, steps = 6, 6 * cfg.calib_saves + 4
    rc, _ = _run(_torchrun(cfg, _train_args(cfg, work, backend, every, steps)),
                 _env(work, TRAINKIT_DETECT="0"), timeout=600)
    rows = _progress(work / "progress.jsonl")
    if rc != 0 or len(rows) < steps:
        raise RuntimeError(f"calibration run for {backend} failed (rc={rc}); see {work}")
    dur = {r["step"]: r["time"] - p["time"] for p, r in zip(rows, rows[1:])}
    after = {s + j for s in range(every, steps, every) for j in (1, 2, 3)}
    clean = [d for s, d in dur.items() if s not in after and s > 2]
    median = statistics.median(clean)
    costs = [sum(dur[s + j] - median for j in (1, 2, 3) if s + j in dur)
             for s in range(every, steps - 3, every)]
    cost = max(0.0, statistics.median(costs))
    return {"step_s": median, "cost_s": cost}


def interval(cost_s: float, step_s: float, budget: float) -> int:
    return max(1, math.ceil(cost_s / (budget * step_s)))


def fault_run(cfg: argparse.Namespace, root: Path, side: str, kind: str, every: int,
              fault_step: int) -> dict:
    work = root / f"{side}-{kind}"
    steps = fault_step + cfg.tail_steps
    fault = f"rank=1,step={fault_step},kind={kind}"
    if side == "baseline":
        args = _train_args(cfg, work, "torch", every, steps, ["--pg-timeout", str(cfg.pg_timeout)])
        cmd = _torchrun(cfg, args)
        env = _env(work, TRAINKIT_DETECT="0", TRAINKIT_FAULT=fault)
    else:
        args = _train_args(cfg, work, "trainkit", every, steps)
        cmd = [sys.executable, "-m", "trainkit", "run", "--run-dir", str(work),
               "--hang-timeout", str(cfg.hang_timeout),
               *(["--no-warm-start"] if cfg.no_warm_start else []),
               "--", f"--nproc-per-node={cfg.ranks}",
               "--monitor-interval=0.1", *args]
        env = _env(work, TRAINKIT_FAULT=fault)
    rc, wall = _run(cmd, env, timeout=cfg.pg_timeout + 600,
                    relaunches=3 if side == "baseline" else 0)
    markers = sorted((work / "faults").glob("*.json"))
    rows = _progress(work / "progress.jsonl")
    if rc != 0 or not markers:
        return {"ok": False, "rc": rc, "work": str(work)}
    t_fault = min(json.loads(m.read_text())["time"] for m in markers)
    back = next((r for r in rows if r["step"] == fault_step and r["time"] > t_fault), None)
    resumed = next((r["step"] for r in rows if r["time"] > t_fault), None)
    if back is None:
        return {"ok": False, "rc": rc, "work": str(work)}
    return {"ok": True, "lost_s": back["time"] - t_fault, "resumed_step": resumed,
            "steps_recomputed": fault_step - (resumed or fault_step), "wall_s": wall}


def markdown(out: dict) -> str:
    """The figures as the table docs/benchmarks.md shows."""
    cal, res = out["calibration"], out["results"]
    lines = [
        f"Checkpoint cost (3 steps after a save, over the median step): torch.save "
        f"{1000 * cal['torch']['cost_s']:.0f} ms, trainkit {1000 * cal['trainkit']['cost_s']:.0f} ms "
        f"per checkpoint; median step {cal['torch']['step_s']:.3f} s. Budget "
        f"{100 * out['config']['budget']:.0f}%: baseline saves every {out['baseline_every']} "
        f"steps, trainkit every {out['trainkit_every']}; fault at step {out['fault_step']}.",
        "",
        "| fault | side | time lost (s) | resumed at step | steps recomputed |",
        "|---|---|---|---|---|"]
    for kind in ("crash", "hang"):
        for side in ("baseline", "trainkit"):
            r = res[f"{side}-{kind}"]
            if r["ok"]:
                lines.append(f"| {kind} | {side} | {r['lost_s']:.1f} | {r['resumed_step']} | "
                             f"{r['steps_recomputed']} |")
            else:
                lines.append(f"| {kind} | {side} | failed (rc {r['rc']}) | | |")
    if "summary" in out:
        s = out["summary"]
        lines += ["", f"- crash: baseline / trainkit = **{s['crash_ratio']:.2f}x**",
                  f"- hang, baseline gloo timeout lowered to {out['config']['pg_timeout']:.0f} s: "
                  f"**{s['hang_ratio_lowered_timeout']:.2f}x**",
                  f"- hang, baseline at gloo's default 30 min timeout (extrapolated: lowered "
                  f"result - lowered timeout + 1800 s = "
                  f"{s['baseline_hang_default_timeout_extrapolated_s']:.0f} s): "
                  f"**{s['hang_ratio_default_timeout_extrapolated']:.1f}x**"]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller model, fewer steps")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1536, help="model width (state size)")
    p.add_argument("--step-delay", type=float, default=0.25, help="simulated compute per step")
    p.add_argument("--budget", type=float, default=0.03, help="checkpoint overhead budget")
    p.add_argument("--pg-timeout", type=float, default=60.0,
                   help="baseline's lowered gloo timeout (s)")
    p.add_argument("--hang-timeout", type=float, default=10.0, help="trainkit's hang timeout (s)")
    p.add_argument("--calib-saves", type=int, default=5)
    p.add_argument("--tail-steps", type=int, default=4)
    p.add_argument("--persist-every", type=int, default=5,
                   help="trainkit side: every n-th checkpoint also goes to the persistent "
                        "directory; all go to the memory tier (/dev/shm)")
    p.add_argument("--no-warm-start", action="store_true",
                   help="trainkit side: run without pre-started generations")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--case", choices=("faults", "exclusion"), default="faults",
                   help="faults: crash and hang against the torchrun baseline; exclusion: a "
                        "hung node excluded, warm pools against cold restarts")
    p.add_argument("--repeats", type=int, default=3, help="exclusion: runs per arm")
    p.add_argument("--exclusion-fault-step", type=int, default=14)
    p.add_argument("--exclusion-nproc", type=int, default=2, help="exclusion: ranks per node")
    cfg = p.parse_args()
    if cfg.case == "exclusion":
        from recovery_exclusion import exclusion_case, exclusion_markdown

        root = Path(tempfile.mkdtemp(prefix="recovery-exclusion-"))
        print(f"work dir: {root}", flush=True)
        out = {"config": vars(cfg) | {"json": str(cfg.json)}} | exclusion_case(cfg, root)
        if cfg.json:
            cfg.json.write_text(json.dumps(out, indent=1))
        print(exclusion_markdown(out), flush=True)
        return 0 if all(a["ok"] for a in out["medians"].values()) else 1
    if cfg.quick:
        cfg.hidden, cfg.calib_saves, cfg.pg_timeout = 1024, 4, 30.0
    root = Path(tempfile.mkdtemp(prefix="recovery-bench-"))
    print(f"work dir: {root}", flush=True)
    cal = {b: calibrate(cfg, b, root) for b in ("torch", "trainkit")}
    n_base = interval(cal["torch"]["cost_s"], cal["torch"]["step_s"], cfg.budget)
    k_tk = interval(cal["trainkit"]["cost_s"], cal["trainkit"]["step_s"], cfg.budget)
    fault_step = n_base * 2 + max(1, n_base // 2)
    print(f"calibration: {json.dumps(cal)}", flush=True)
    print(f"checkpoint every: baseline N={n_base}, trainkit k={k_tk}; fault at step "
          f"{fault_step}", flush=True)
    results: dict[str, dict] = {}
    for kind in ("crash", "hang"):
        for side, every in (("baseline", n_base), ("trainkit", k_tk)):
            r = fault_run(cfg, root, side, kind, every, fault_step)
            results[f"{side}-{kind}"] = r
            print(f"{side:8s} {kind:5s}: {json.dumps(r)}", flush=True)
    out = {"config": vars(cfg) | {"json": str(cfg.json)}, "calibration": cal,
           "baseline_every": n_base, "trainkit_every": k_tk, "fault_step": fault_step,
           "results": results}
    bh, th = results["baseline-hang"], results["trainkit-hang"]
    bc, tc = results["baseline-crash"], results["trainkit-crash"]
    if all(r["ok"] for r in (bh, th, bc, tc)):
        default_hang = bh["lost_s"] - cfg.pg_timeout + GLOO_DEFAULT_TIMEOUT_S
        out["summary"] = {
            "hang_ratio_lowered_timeout": bh["lost_s"] / th["lost_s"],
            "hang_ratio_default_timeout_extrapolated": default_hang / th["lost_s"],
            "baseline_hang_default_timeout_extrapolated_s": default_hang,
            "crash_ratio": bc["lost_s"] / tc["lost_s"]}
        print(json.dumps(out["summary"], indent=1), flush=True)
    if cfg.json:
        cfg.json.write_text(json.dumps(out, indent=1))
    print(markdown(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
