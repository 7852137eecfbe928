"""Benchmark of trainkit.detect on 4-rank gloo DDP jobs on CPU.

Three parts (``--parts``):

- ``matrix``: per fault class, ``--runs-per-class`` injected runs at different
  ranks and steps, plus as many clean runs (with uneven first steps and
  checkpoint pauses). Precision and recall of the named culprit with Wilson 95%
  intervals; median/p95 detection latency from the fault (its marker) to the
  finding.
- ``overhead``: step time with the monitor on vs off, interleaved A/B blocks in
  one job, on an allreduce-heavy DDP loop with fixed bucket sizes.
- ``zero-code`` (not in the default parts): the same for zero-code monitoring, as
  ``trainkit run``'s bootstrap installs it (``trainkit.detect.auto``): the default
  group wrapped at ``init_process_group``, steps from the optimizer hook.
- ``contrast``: plain torch on the same hang, with a lowered gloo timeout, with
  and without ``TORCH_DISTRIBUTED_DEBUG=DETAIL``: time to an error, whether the
  error names the culprit; the default 30-minute gloo timeout is extrapolated;
  DETAIL's own overhead on step time (interleaved jobs).

    python benchmarks/detect_bench.py --quick            # a few minutes
    python benchmarks/detect_bench.py --runs-per-class 20 --out bench.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainkit.detect.drill import free_port, run_drill  # noqa: E402

DEMO = REPO / "examples" / "detect_demo.py"
WORLD = 4
CLASSES = ("hang_noncomm", "hang_comm", "crash", "straggler", "slow_link")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# -- matrix --------------------------------------------------------------------------------
def plan(cls: str, i: int, hang_timeout: float | str, compute_ms: float = 20.0) -> dict:
    """The i-th run of a class: which rank, which step, which fault, which loop."""
    rank = i % WORLD
    common = ["--hang-timeout", str(hang_timeout), "--gloo-timeout", "300",
              "--compute-ms", f"{compute_ms:g}"]
    if cls in ("hang_noncomm", "hang_comm", "crash"):
        step = 5 + (i * 7) % 20
        kind = {"hang_noncomm": "hang", "hang_comm": "hang_comm", "crash": "crash"}[cls]
        return {"rank": rank, "step": step, "fault": f"rank={rank},step={step},kind={kind}",
                "args": [*common, "--steps", "400"],
                "timeout": (30.0 if hang_timeout == "auto" else float(hang_timeout)) + 60}
    if cls == "straggler":
        step = 6 + (i * 3) % 15
        return {"rank": rank, "step": step, "fault": f"rank={rank},step={step},kind=slow:2.0",
                "args": [*common, "--steps", str(step + 45)], "timeout": 90}
    if cls == "slow_link":
        step = 6 + (i * 3) % 15
        peer = (rank + 1) % WORLD           # the ring sends to rank+1
        return {"rank": rank, "step": step, "peer": peer,
                "fault": f"rank={rank},step={step},kind=delay_peer:{peer}:20",
                "args": [*common, "--steps", str(step + 45), "--p2p"], "timeout": 90}
    # clean: uneven first steps and rank-0 checkpoint pauses; half with point-to-point traffic
    args = [*common, "--steps", "60", "--first-step-pause", "0.4", "--ckpt-every", "10",
            "--ckpt-pause", "0.4"] + (["--p2p"] if i % 2 else [])
    return {"rank": None, "step": None, "fault": None, "args": args, "timeout": 90}


def correct(cls: str, p: dict, f: dict) -> bool:
    if f["class"] != cls:
        return False
    if cls == "slow_link":
        return f["link"] == sorted([p["rank"], p["peer"]])
    if cls == "hang_comm":   # the culprit is the group; the injected rank must be among the named
        return f["group"] == "0" and p["rank"] in f["ranks"]
    return f["ranks"] == [p["rank"]]


def run_matrix(runs: int, hang_timeout: float | str, workdir: Path, log,
               classes: tuple[str, ...] = (*CLASSES, "clean"), compute_ms: float = 20.0) -> dict:
    results: dict[str, list[dict]] = {c: [] for c in (*CLASSES, "clean")}
    order = [(c, i) for i in range(runs) for c in classes]   # interleave classes
    for n, (cls, i) in enumerate(order):
        p = plan(cls, i, hang_timeout, compute_ms)
        run_dir = workdir / f"{cls}-{i}"
        res = run_drill(DEMO, world=WORLD, run_dir=run_dir, fault=p["fault"],
                        script_args=p["args"], timeout=p["timeout"])
        entry = {"i": i, "plan": p, "findings": [{k: f[k] for k in ("time", "class", "ranks",
                                                                    "link", "step", "group", "seq")}
                                                 for f in res.findings],
                 "fault_time": res.fault_time, "wall_s": res.wall_s, "timed_out": res.timed_out}
        results[cls].append(entry)
        ok = (cls == "clean" and not res.findings) or any(correct(cls, p, f) for f in res.findings)
        log(f"[{n + 1}/{len(order)}] {cls:12s} #{i:2d} {'OK ' if ok else 'MISS'} "
            f"findings={[(f['class'], f['ranks'], f['link']) for f in res.findings]} "
            f"wall={res.wall_s:.1f}s")
    return results


def summarise(results: dict) -> dict:
    summary = {}
    all_runs = [(c, e) for c, entries in results.items() for e in entries]
    for cls in CLASSES:
        entries = results[cls]
        if not entries:
            continue
        tp, latencies, step_lat = 0, [], []
        for e in entries:
            hit = [f for f in e["findings"] if correct(cls, e["plan"], f)]
            if hit:
                tp += 1
                if e["fault_time"] is not None:
                    latencies.append(hit[0]["time"] - e["fault_time"])
                if hit[0]["step"] is not None and e["plan"]["step"] is not None:
                    step_lat.append(hit[0]["step"] - e["plan"]["step"])
        named = sum(1 for c, e in all_runs for f in e["findings"] if f["class"] == cls)
        right = sum(1 for c, e in all_runs for f in e["findings"]
                    if f["class"] == cls and c == cls and correct(cls, e["plan"], f))
        n = len(entries)
        summary[cls] = {"runs": n, "recall": tp / n if n else float("nan"),
                        "recall_ci": wilson(tp, n), "findings": named,
                        "precision": right / named if named else float("nan"),
                        "precision_ci": wilson(right, named),
                        "latency_s_median": statistics.median(latencies) if latencies else None,
                        "latency_s_p95": pct(latencies, 0.95) if latencies else None,
                        "latency_steps_median": statistics.median(step_lat) if step_lat else None,
                        "latency_steps_p95": pct(step_lat, 0.95) if step_lat else None}
    clean = results["clean"]
    fp_runs = sum(1 for e in clean if e["findings"])
    summary["clean"] = {"runs": len(clean), "runs_with_findings": fp_runs,
                        "rate_ci": wilson(fp_runs, len(clean))}
    return summary


# -- workers for overhead and contrast ---------------------------------------------------------
def worker(argv: list[str]) -> int:
    """Runs inside each rank (RANK/WORLD_SIZE/MASTER_* set by the parent)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["overhead", "hang", "steps"], required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--params-m", type=float, default=2.0)
    ap.add_argument("--bucket-mb", type=float, default=2.0)
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--block-steps", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--hang-rank", type=int, default=2)
    ap.add_argument("--hang-step", type=int, default=5)
    ap.add_argument("--aa", action="store_true", help="overhead control: both arms unmonitored")
    ap.add_argument("--zero-code", action="store_true",
                    help="overhead of zero-code monitoring: trainkit.detect.auto installed before "
                         "init_process_group, steps from the optimizer hook, no mon.step()")
    a = ap.parse_args(argv)
    if a.zero_code:
        os.environ["TRAINKIT_RUN_DIR"] = a.run_dir
        from trainkit.detect import auto

        auto.install()          # what `trainkit run`'s worker bootstrap does
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=a.timeout))
    rank = dist.get_rank()
    width = int(math.sqrt(a.params_m * 1e6 / 4))

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(4)])

    x = torch.randn(4, width)
    if a.mode == "overhead" and a.zero_code:
        return _zero_code_overhead(a, model, x)
    if a.mode == "overhead":
        from trainkit.detect import CollectiveMonitor

        mon = CollectiveMonitor(run_dir=a.run_dir, hang_timeout=60.0, wrap_default=False).start()
        raw = dist.distributed_c10d._get_default_group()
        on = torch.nn.parallel.DistributedDataParallel(model(), process_group=raw if a.aa else
                                                       mon.wrap(raw), bucket_cap_mb=a.bucket_mb)
        off = torch.nn.parallel.DistributedDataParallel(model(), process_group=raw,
                                                        bucket_cap_mb=a.bucket_mb)
        times: dict = {"on": [], "off": [], "blocks": []}
        cpu = {"on": 0.0, "off": 0.0}           # this process's CPU (all its threads)
        agg_cpu = {"on": 0.0, "off": 0.0}       # the aggregator's CPU, read by rank 0
        step = 0
        for block in range(2 * a.blocks):
            name, ddp = (("on", on), ("off", off))[(block + block // 2) % 2]   # ABBA order
            c0, g0 = time.process_time(), _proc_cpu(mon.aggregator_pid)
            block = []
            for _ in range(a.block_steps):
                mon.step(step)
                step += 1
                dist.barrier(group=raw)
                t0 = time.perf_counter()
                ddp(x).sum().backward()
                block.append(time.perf_counter() - t0)
            times[name] += block
            times["blocks"].append([name, statistics.median(block)])
            cpu[name] += time.process_time() - c0
            agg_cpu[name] += _proc_cpu(mon.aggregator_pid) - g0
        mon.close()
        _cpu_result(times, cpu, agg_cpu, a.blocks * a.block_steps, raw)
        if rank == 0:
            print("RESULT " + json.dumps(times), flush=True)
    elif a.mode == "steps":
        step_fn = _manual_ddp(model())
        times = []
        for _ in range(a.blocks * a.block_steps):
            dist.barrier()
            t0 = time.perf_counter()
            step_fn(x)
            times.append(time.perf_counter() - t0)
        if rank == 0:
            print("RESULT " + json.dumps(times), flush=True)
    else:   # plain-torch hang: one rank stops issuing collectives
        step_fn = _manual_ddp(model())
        try:
            for step in range(1000):
                if step == a.hang_step and rank == a.hang_rank:
                    print(f"HANG_AT {time.time()}", flush=True)
                    while True:
                        time.sleep(3600)
                step_fn(x)
        except Exception as exc:  # noqa: BLE001 - the error is what we measure
            text = " ".join(str(exc).split())
            print(f"ERROR_AT {time.time()} {type(exc).__name__}: {text[:1500]}", flush=True)
            os._exit(1)
    dist.destroy_process_group()
    return 0


def _zero_code_overhead(a: argparse.Namespace, model, x) -> int:
    """Like the overhead mode, for a script that never imports trainkit: the "on" arm's DDP
    uses the default group (wrapped by the bootstrap's monitor at init_process_group) and
    its optimizer's steps are the step markers; the "off" arm uses the raw group and its
    optimizer is ignored by the hook (the first optimizer that steps owns the clock).
    Each timed step is forward, backward and ``optimizer.step()``, in both arms."""
    import torch
    import torch.distributed as dist

    from trainkit.detect import auto

    mon = auto.active_monitor()
    wrapped = mon.process_group
    raw = wrapped.inner
    on = torch.nn.parallel.DistributedDataParallel(model(), process_group=wrapped,
                                                   bucket_cap_mb=a.bucket_mb)
    off = torch.nn.parallel.DistributedDataParallel(model(), process_group=raw,
                                                    bucket_cap_mb=a.bucket_mb)
    opts = {"on": torch.optim.SGD(on.parameters(), lr=1e-6),
            "off": torch.optim.SGD(off.parameters(), lr=1e-6)}
    times: dict = {"on": [], "off": [], "blocks": []}
    cpu = {"on": 0.0, "off": 0.0}
    agg_cpu = {"on": 0.0, "off": 0.0}
    for block in range(2 * a.blocks):
        name, ddp = (("on", on), ("off", off))[(block + block // 2) % 2]   # ABBA, "on" first
        c0, g0 = time.process_time(), _proc_cpu(mon.aggregator_pid)
        steps = []
        for _ in range(a.block_steps):
            dist.barrier(group=raw)
            t0 = time.perf_counter()
            ddp(x).sum().backward()
            opts[name].step()
            steps.append(time.perf_counter() - t0)
        times[name] += steps
        times["blocks"].append([name, statistics.median(steps)])
        cpu[name] += time.process_time() - c0
        agg_cpu[name] += _proc_cpu(mon.aggregator_pid) - g0
    times["auto_steps"] = mon.recorder.step
    _cpu_result(times, cpu, agg_cpu, a.blocks * a.block_steps, raw)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(times), flush=True)
    dist.destroy_process_group()
    return 0


def _cpu_result(times: dict, cpu: dict, agg_cpu: dict, steps: int, group) -> None:
    """Add every rank's CPU per step (all its threads) and the aggregator's to ``times``
    (collective: every rank calls it; the aggregator's is read by rank 0)."""
    import torch.distributed as dist

    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, cpu, group=group)
    times["cpu_per_step_s"] = {k: sum(c[k] for c in per_rank) / steps for k in cpu}
    times["aggregator_cpu_per_step_s"] = {k: v / steps for k, v in agg_cpu.items()}


def _proc_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) used so far by process ``pid``; 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _manual_ddp(model):
    """Data-parallel step with one allreduce per gradient.

    Plain torch.distributed instead of DDP because, on torch 2.13 CPU, DDP's
    constructor segfaults under TORCH_DISTRIBUTED_DEBUG=DETAIL (in
    ``_ddp_init_helper``); both contrast arms use this same loop.
    """
    import torch.distributed as dist

    def step(x):
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)

    return step


def launch(args: list[str], env_extra: dict[str, str], timeout: float,
           stop_after_exits: int = WORLD) -> tuple[list[str], float, list[int]]:
    port = free_port()
    procs = []
    t0 = time.time()
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(REPO), **env_extra)
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    while (sum(p.poll() is not None for p in procs) < stop_after_exits
           and time.time() - t0 < timeout):
        time.sleep(0.1)
    wall = time.time() - t0
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, 9)
    outs = [p.communicate()[0] for p in procs]
    return outs, wall, [p.returncode for p in procs]


def _result(outs: list[str]) -> object:
    for line in outs[0].splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError("worker printed no result:\n" + outs[0][-3000:])


def run_overhead(blocks: int, workdir: Path, log, block_steps: int = 10,
                 aa: bool = False, zero_code: bool = False) -> dict:
    """Monitor on vs off in one job; with ``aa`` both arms are off (the method's own bias);
    with ``zero_code`` the monitor is the one `trainkit run`'s bootstrap installs."""
    name = "overhead-zero-code" if zero_code else "overhead"
    outs, _, _ = launch(["--mode", "overhead", "--run-dir", str(workdir / name),
                         "--blocks", str(blocks), "--block-steps", str(block_steps),
                         *(["--aa"] if aa else []), *(["--zero-code"] if zero_code else [])],
                        {}, 600)
    times = _result(outs)
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    paired = paired_ratios(times["blocks"])
    lo, hi = bootstrap_median_ci(paired)
    res = {"steps_each": len(times["on"]), "block_steps": block_steps, "aa_control": aa,
           "zero_code": zero_code, "auto_steps": times.get("auto_steps"),
           "median_on_s": on, "median_off_s": off, "overhead": on / off - 1, "params_m": 2.0, "bucket_mb": 2.0,
           "paired_overhead_median": statistics.median(paired) - 1,
           "paired_overhead_ci95": [lo - 1, hi - 1], "pairs": len(paired),
           "blocks": times["blocks"],
           "ranks_cpu_per_step_s": times.get("cpu_per_step_s"),
           "aggregator_cpu_per_step_s": times.get("aggregator_cpu_per_step_s")}
    log(f"overhead{' (zero-code)' if zero_code else ''}: on {on * 1e3:.2f} ms, off {off * 1e3:.2f} ms, {res['overhead'] * 100:+.2f}%; "
        f"paired blocks: median {res['paired_overhead_median'] * 100:+.2f}% "
        f"[95% CI {lo * 100 - 100:+.2f}%, {hi * 100 - 100:+.2f}%] over {len(paired)} pairs")
    if res["ranks_cpu_per_step_s"]:
        rc, ac = res["ranks_cpu_per_step_s"], res["aggregator_cpu_per_step_s"]
        log(f"CPU per step, all ranks: on {rc['on'] * 1e3:.2f} ms, off {rc['off'] * 1e3:.2f} ms; "
            f"aggregator: on {ac['on'] * 1e3:.2f} ms, off {ac['off'] * 1e3:.2f} ms")
    return res


def paired_ratios(blocks: list) -> list[float]:
    """on/off ratio of each adjacent block pair (ABBA: every pair holds one of each).

    Pairing neighbours cancels the slow drift of a shared machine's load, which
    a ratio of the two arms' overall medians does not.
    """
    out = []
    for i in range(0, len(blocks) - 1, 2):
        pair = dict(blocks[i:i + 2])
        if set(pair) == {"on", "off"}:
            out.append(pair["on"] / pair["off"])
    return out


def bootstrap_median_ci(values: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the median (fixed seed: reproducible from the JSON)."""
    import random

    if not values:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(reps))
    return meds[int(0.025 * reps)], meds[int(0.975 * reps) - 1]


def run_contrast(timeout_s: float, reps: int, workdir: Path, log) -> dict:
    out: dict = {"lowered_timeout_s": timeout_s}
    for label, env in (("plain", {}), ("detail", {"TORCH_DISTRIBUTED_DEBUG": "DETAIL"})):
        outs, wall, rcs = launch(["--mode", "hang", "--run-dir", str(workdir / "c"),
                                  "--timeout", str(timeout_s)], env, timeout_s * 6 + 60,
                                 stop_after_exits=WORLD - 1)
        hang_at = next((float(line.split()[1]) for o in outs for line in o.splitlines()
                        if line.startswith("HANG_AT")), None)
        errors = {r: line for r, o in enumerate(outs) for line in o.splitlines()
                  if line.startswith("ERROR_AT")}
        times = [float(line.split()[1]) for line in errors.values()]
        names = [r for r, line in errors.items()
                 if re.search(r"\branks?[: ]*\[?2\b|\brank 2\b", line, re.IGNORECASE)]
        entry = {"time_to_error_s": (min(times) - hang_at) if times and hang_at else None,
                 "ranks_erroring": sorted(errors), "ranks_whose_error_names_rank_2": names,
                 "names_culprit": bool(names),
                 "errors": {str(r): line.split(" ", 2)[2][:600] for r, line in errors.items()}}
        if entry["time_to_error_s"] is not None:
            entry["default_timeout_extrapolated_s"] = entry["time_to_error_s"] - timeout_s + 1800
        out[label] = entry
        log(f"contrast {label}: time to error {entry['time_to_error_s']}, "
            f"names culprit: {entry['names_culprit']} ({names})")
    # DETAIL overhead on step time, interleaved jobs
    med = {"plain": [], "detail": []}
    for rep in range(reps):
        for label, env in (("plain", {}), ("detail", {"TORCH_DISTRIBUTED_DEBUG": "DETAIL"})):
            outs, _, _ = launch(["--mode", "steps", "--run-dir", str(workdir / "s"),
                                 "--blocks", "3"], env, 300)
            med[label].append(statistics.median(_result(outs)))
    out["detail_overhead"] = statistics.median(med["detail"]) / statistics.median(med["plain"]) - 1
    out["detail_step_medians_s"] = med
    log(f"DETAIL overhead: {out['detail_overhead'] * 100:+.1f}%")
    return out


def markdown(report: dict) -> str:
    """The tables for docs/benchmarks.md, from a saved ``--out`` JSON."""
    lines = []
    summary = report.get("summary")
    if summary:
        lines += ["| class | runs | recall [95% CI] | precision [95% CI] | latency median / p95 |",
                  "|---|---|---|---|---|"]
        for cls in CLASSES:
            if cls not in summary:
                continue
            s = summary[cls]
            lat = (f"{s['latency_s_median']:.1f} s / {s['latency_s_p95']:.1f} s"
                   if s["latency_s_median"] is not None else "n/a")
            if cls == "straggler" and s["latency_steps_median"] is not None:
                lat += (f" ({s['latency_steps_median']:.0f} / {s['latency_steps_p95']:.0f} steps)")
            rc, pc = s["recall_ci"], s["precision_ci"]
            lines.append(f"| {cls} | {s['runs']} | {s['recall']:.2f} [{rc[0]:.2f}, {rc[1]:.2f}] | "
                         f"{s['precision']:.2f} [{pc[0]:.2f}, {pc[1]:.2f}] ({s['findings']} findings)"
                         f" | {lat} |")
        c = summary["clean"]
        lines.append(f"| clean | {c['runs']} | runs with any finding: {c['runs_with_findings']} "
                     f"[{c['rate_ci'][0]:.2f}, {c['rate_ci'][1]:.2f}] | | |")
    if "overhead" in report:
        o = report["overhead"]
        lines += ["", f"Overhead (allreduce-heavy DDP, {o['params_m']}M params, {o['bucket_mb']} MB "
                      f"buckets, {o['steps_each']} steps per arm, ABBA blocks in one job): "
                      f"on {o['median_on_s'] * 1e3:.2f} ms vs off {o['median_off_s'] * 1e3:.2f} ms "
                      f"median step, **{o['overhead'] * 100:+.2f}%**."]
        if "paired_overhead_median" in o:
            lo, hi = o["paired_overhead_ci95"]
            lines.append(f"Paired adjacent blocks ({o['pairs']} pairs): median "
                         f"**{o['paired_overhead_median'] * 100:+.2f}%** "
                         f"[95% bootstrap CI {lo * 100:+.2f}%, {hi * 100:+.2f}%].")
    if "contrast" in report:
        c = report["contrast"]
        lines += ["", "| plain torch, same hang | time to error | error names the culprit |",
                  "|---|---|---|"]
        for label in ("plain", "detail"):
            e = c[label]
            t = e["time_to_error_s"]
            extra = (f" (default 30 min timeout: ~{e['default_timeout_extrapolated_s']:.0f} s)"
                     if "default_timeout_extrapolated_s" in e else "")
            lines.append(f"| {label} (gloo timeout {c['lowered_timeout_s']:.0f} s) | "
                         f"{t:.1f} s{extra} | {e['names_culprit']} |" if t is not None else
                         f"| {label} | no error | {e['names_culprit']} |")
        lines.append(f"\nDETAIL overhead on step time: **{c['detail_overhead'] * 100:+.1f}%**.")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2:])
    if len(sys.argv) > 2 and sys.argv[1] == "--markdown":
        print(markdown(json.loads(Path(sys.argv[2]).read_text())))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-per-class", type=int, default=20)
    ap.add_argument("--hang-timeout", default="10.0",
                    help="seconds, or 'auto' (learned; the default of `trainkit run`)")
    ap.add_argument("--compute-ms", type=float, default=20.0,
                    help="matrix: simulated compute per step (the step time; 300 gives the "
                         "issue's 0.3 s steps)")
    ap.add_argument("--quick", action="store_true", help="3 runs per class, hang_timeout 3 s")
    ap.add_argument("--parts", default="matrix,overhead,contrast")
    ap.add_argument("--classes", default=",".join((*CLASSES, "clean")),
                    help="comma-separated subset of the matrix classes")
    ap.add_argument("--overhead-blocks", type=int, default=10, help="ABBA block pairs per arm")
    ap.add_argument("--overhead-block-steps", type=int, default=10, help="steps per block")
    ap.add_argument("--overhead-aa", action="store_true",
                    help="A/A control: the 'on' arm runs unmonitored too")
    ap.add_argument("--contrast-timeout", type=float, default=10.0)
    ap.add_argument("--contrast-reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    if args.quick:
        args.runs_per_class, args.hang_timeout = 3, 3.0
        args.overhead_blocks, args.contrast_reps, args.contrast_timeout = 4, 1, 5.0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="detect-bench-"))
    parts = set(args.parts.split(","))
    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:7.1f}s] {msg}", flush=True)

    report: dict = {"config": vars(args), "world": WORLD, "started": started}
    if "matrix" in parts:
        classes = tuple(c for c in args.classes.split(",") if c)
        unknown = set(classes) - {*CLASSES, "clean"}
        if unknown:
            ap.error(f"unknown classes {sorted(unknown)}")
        if not args.compute_ms > 0:
            ap.error(f"--compute-ms must be > 0, got {args.compute_ms}")
        results = run_matrix(args.runs_per_class, args.hang_timeout, workdir, log, classes,
                             args.compute_ms)
        report["matrix"] = results
        report["summary"] = summarise(results)
        print(json.dumps(report["summary"], indent=1))
    if "overhead" in parts:
        report["overhead"] = run_overhead(args.overhead_blocks, workdir, log,
                                          args.overhead_block_steps, args.overhead_aa)
    if "zero-code" in parts:
        report["overhead_zero_code"] = run_overhead(args.overhead_blocks, workdir, log,
                                                    args.overhead_block_steps, zero_code=True)
    if "contrast" in parts:
        report["contrast"] = run_contrast(args.contrast_timeout, args.contrast_reps, workdir, log)
    report["elapsed_s"] = time.time() - started
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
