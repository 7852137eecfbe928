"""One short GPU check of trainkit's CUDA paths (issue 15), every figure written as JSON.

Parts (always run in this order, each guarded, the JSON rewritten after each step so a
timeout still leaves figures):

* ``monitor``: NCCL with world size 1 (gloo in ``--dry-run``): ``dist.all_reduce`` and
  ``dist.broadcast`` on device tensors through ``CollectiveMonitor``'s wrapper vs the
  raw group, in paired blocks; per-collective overhead in µs.
* ``ckpt`` (in ``gpu_check_ckpt.py``): a model of transformer-block matmuls plus
  AdamW, fp32 parameters and fp32 moments (12 bytes per parameter; bf16 autocast
  compute), sized to each ``--sizes`` total, trained with the token count calibrated
  so a step takes ``--step-ms``. Per checkpoint: the training-loop cost (time blocked
  in the save call plus the inflation of the next 3 steps over the median undisturbed
  step) for trainkit lazy
  (``Checkpointer(keep_in_memory=1)`` + ``attach``) and for ``dcp.async_save`` with
  ``DefaultStager(StagingOptions(True, True, True, True))``; time until the snapshot is
  in host memory against the raw pinned device-to-host bandwidth; restore from the
  memory tier onto the device against the raw host-to-device bandwidth.
* ``merge``: TIES over a base + 4 synthetic bf16 models in safetensors, both scopes,
  through the ``trainkit merge`` CLI on the CPU and, if the CLI has ``--device``, on the
  device; GB/s of input against a raw read of the same files; device vs CPU output.

On the H200: the device tool's ``run`` with ``carry: [".whl"]`` (the wheels that
``scripts/gpu_wheels.sh`` downloads) and ``timeout_s`` about 420; it finishes in under
6 minutes::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && \
        python3 benchmarks/gpu_check.py --out $OUT/gpu.json

Here, on CPU, the same code paths with tiny sizes (gloo, CPU merge)::

    PYTHONPATH=$PWD python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_dry.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

from trainkit._units import parse_size

from gpu_check_ckpt import TARGETS, Clock, Report, free_bytes, gb, log, part_ckpt  # beside this file

__all__ = ["main"]

PARTS = ("monitor", "ckpt", "merge")
NOT_AVAILABLE_DEVICE = "not available: --device missing"


# -- monitor ------------------------------------------------------------------------------
def part_monitor(clock: Clock, work: Path, dry: bool) -> dict:
    """Per-collective cost of ``CollectiveMonitor`` on one rank: paired blocks of
    ``calls`` async collectives, raw group and monitored wrapper alternating first."""
    import torch.distributed as dist

    from trainkit.detect import CollectiveMonitor

    backend = "nccl" if clock.device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(clock.device)
    store = dist.FileStore(str(work / "monitor.store"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    blocks, calls = (6, 50) if dry else (20, 100)
    out: dict[str, Any] = {"backend": backend, "world_size": 1, "blocks": blocks,
                           "calls_per_block": calls, "ops": {}}
    try:
        raw = dist.group.WORLD
        with CollectiveMonitor(run_dir=work / "monitor-run", hang_timeout=60.0) as mon:
            wrapped = mon.process_group
            out["monitored"] = wrapped is not raw
            out["aggregator_connected"] = mon.channel is not None
            for op in ("all_reduce", "broadcast"):
                for nbytes in (4096, 16 << 20):
                    t = torch.ones(nbytes // 4, device=clock.device)
                    call = ((lambda g: dist.all_reduce(t, group=g, async_op=True)) if op == "all_reduce"
                            else (lambda g: dist.broadcast(t, src=0, group=g, async_op=True)))

                    def block(g: Any) -> float:
                        def run() -> None:
                            for w in [call(g) for _ in range(calls)]:
                                w.wait()
                        return clock.time(run)[0] / calls * 1e6

                    block(raw), block(wrapped)          # warm both paths
                    pairs = []
                    for b in range(blocks):
                        first, second = (raw, wrapped) if b % 2 == 0 else (wrapped, raw)
                        a, c = block(first), block(second)
                        pairs.append((a, c) if first is raw else (c, a))
                    out["ops"].setdefault(op, {})[str(nbytes)] = {
                        "unmonitored_us": statistics.median(p[0] for p in pairs),
                        "monitored_us": statistics.median(p[1] for p in pairs),
                        "overhead_us": statistics.median(p[1] - p[0] for p in pairs)}
    finally:
        dist.destroy_process_group()
    return out


# -- merge --------------------------------------------------------------------------------
def _cli(*args: str) -> tuple[int, str, str]:
    """The ``trainkit`` CLI in this process (no interpreter start in the timings)."""
    from trainkit.cli import main as trainkit_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = trainkit_main(list(args))
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def _write_models(clock: Clock, folder: Path, nbytes: int) -> list[Path]:
    """A base and 4 fine-tuned variants (base + small noise), bf16, 32 MiB tensors on
    the GPU (128 KiB in a dry run), generated on the device."""
    from safetensors.torch import save_file

    cols = 4096 if nbytes >= 1 << 30 else 256
    rows = min(4096, max(1, nbytes // (2 * cols)))
    count = max(1, nbytes // (rows * cols * 2))
    gen = torch.Generator(device=clock.device).manual_seed(0)
    base = [torch.randn(rows, cols, device=clock.device, generator=gen).mul_(0.02) for _ in range(count)]
    paths = []
    for i in range(5):
        tensors = {f"layers.{j}.weight": (b if i == 0 else b + 0.002 * torch.randn(
            b.shape, device=clock.device, generator=gen)).to(torch.bfloat16).cpu()
            for j, b in enumerate(base)}
        paths.append(folder / ("base.safetensors" if i == 0 else f"ft{i}.safetensors"))
        save_file(tensors, str(paths[-1]))
    return paths


def _raw_read(paths: list[Path]) -> float:
    buf = bytearray(64 << 20)
    t0, n = time.perf_counter(), 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while (k := f.readinto(buf)):
                n += k
    return gb(n, time.perf_counter() - t0)


def _merge(paths: list[Path], out: Path, scope: str, extra: list[str], nbytes: int) -> dict:
    """One ``trainkit merge ties`` (density 0.2, all cores); its time includes hashing
    the inputs for merge.json and writing the output, as a user would wait for it."""
    t0 = time.perf_counter()
    rc, _, err = _cli("merge", "ties", "--base", str(paths[0]), "--models", *map(str, paths[1:]),
                      "--out", str(out), "--scope", scope, "--density", "0.2", *extra)
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"trainkit merge ties --scope {scope} {' '.join(extra)}: {err.strip()[-500:]}")
    return {"seconds": seconds, "input_gbps": gb(nbytes, seconds)}


def _compare(a_dir: Path, b_dir: Path) -> dict:
    from safetensors.torch import load_file

    a, b = ({}, {})
    for d, into in ((a_dir, a), (b_dir, b)):
        for f in sorted(d.glob("*.safetensors")):
            into.update(load_file(str(f)))
    if a.keys() != b.keys() or any(x.shape != b[k].shape for k, x in a.items()):
        return {"exact": False, "max_abs_diff": None, "elements_differing": None,
                "note": f"different tensors: {sorted(a.keys() ^ b.keys())[:5]} or shapes"}
    diff = [(x.float() - b[k].float()).abs() for k, x in a.items()]
    return {"exact": all(torch.equal(x, b[k]) for k, x in a.items()),
            "max_abs_diff": max(float(d.max()) for d in diff),
            "elements_differing": int(sum(int((d > 0).sum()) for d in diff))}


def part_merge(clock: Clock, work: Path, nbytes: int, report: Report) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="gpu_check-merge-", dir=work))
    out: dict[str, Any] = {"model_bytes": nbytes, "models": 4, "dtype": "bfloat16", "scopes": {}}
    report.doc["merge"] = out
    try:
        paths = _write_models(clock, folder, nbytes)
        out["input_bytes"] = total = sum(p.stat().st_size for p in paths)
        out["raw_read_gbps"] = _raw_read(paths)
        has_device = "--device" in _cli("merge", "--help")[1]
        out["device_arm"] = "available" if has_device else NOT_AVAILABLE_DEVICE
        for scope in ("tensor", "global"):
            cpu_out, dev_out = folder / f"cpu-{scope}", folder / f"dev-{scope}"
            r: dict[str, Any] = {"cpu": _merge(paths, cpu_out, scope, [], total)}
            r["cpu"]["vs_raw_read"] = r["cpu"]["input_gbps"] / out["raw_read_gbps"]
            r["device"] = None
            if has_device:
                r["device"] = _merge(paths, dev_out, scope, ["--device", clock.device.type], total)
                r["device"]["speedup_vs_cpu"] = r["cpu"]["seconds"] / r["device"]["seconds"]
                r["device"]["vs_cpu_output"] = _compare(cpu_out, dev_out)
                r["device"]["speedup_target_met"] = (r["device"]["speedup_vs_cpu"]
                                                     >= TARGETS["merge_device_vs_cpu_speedup_min"])
            out["scopes"][scope] = r
            shutil.rmtree(cpu_out, ignore_errors=True)
            shutil.rmtree(dev_out, ignore_errors=True)
            report.write()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


# -- driver -------------------------------------------------------------------------------
def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file for every figure")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, gloo: the same code paths")
    p.add_argument("--sizes", default=None,
                   help="checkpoint state sizes (default 2GiB,16GiB; dry run 2MiB,4MiB)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    p.add_argument("--merge-size", default=None, help="bytes per merged model (default 2GiB; dry run 4MiB)")
    p.add_argument("--step-ms", type=float, default=None, help="target step time (default 200; dry run 20)")
    p.add_argument("--rounds", type=int, default=2, help="timed checkpoints per method and size")
    p.add_argument("--work-dir", default=None, help="scratch directory on disk (default: a temp dir)")
    args = p.parse_args(argv)
    try:
        sizes = args.sizes or ("2MiB,4MiB" if args.dry_run else "2GiB,16GiB")
        args.sizes = [parse_size(s) for s in sizes.split(",")]
        args.merge_size = parse_size(args.merge_size or ("4MiB" if args.dry_run else "2GiB"))
    except ValueError as exc:
        p.error(str(exc))
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if bad := [s for s in args.parts if s not in PARTS]:
        p.error(f"unknown part(s) {bad}; choose from {list(PARTS)}")
    args.step_ms = args.step_ms or (20.0 if args.dry_run else 200.0)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


def _work_root(args: argparse.Namespace) -> Path:
    """The system temp dir, unless it is too small (a tmpfs) for the checkpoint copies
    and the merge inputs: then the git-ignored bench_out/ beside the tree, on disk."""
    need = 2.5 * max(args.sizes) + 7 * args.merge_size
    tmp, repo = Path(tempfile.gettempdir()), Path(__file__).resolve().parents[1] / "bench_out"
    if free_bytes(tmp) >= need:
        return tmp
    repo.mkdir(exist_ok=True)
    return repo


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    device = torch.device("cpu" if args.dry_run else "cuda:0")
    clock = Clock(device)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check-", dir=_work_root(args)))
    work.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm")
    cuda = device.type == "cuda"
    report = Report(Path(args.out), {
        "schema": 1, "dry_run": args.dry_run, "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv[1:],
        "parts": args.parts, "targets": TARGETS, "errors": {}, "part_s": {},
        "free_bytes": {"work": free_bytes(work), "dev_shm": free_bytes(shm) if shm.is_dir() else 0},
        "work_dir": str(work)})
    report.write()
    for part in PARTS:
        if part not in args.parts:
            continue
        log(f"part {part}")
        t0 = time.perf_counter()
        try:
            if part == "monitor":
                report.doc["monitor"] = part_monitor(clock, work, args.dry_run)
            elif part == "ckpt":
                part_ckpt(clock, work, args, report)
            else:
                part_merge(clock, work, args.merge_size, report)
        except Exception as exc:  # noqa: BLE001 - one broken CUDA path must not hide the others
            report.doc["errors"][part] = f"{type(exc).__name__}: {exc}"
            report.doc.setdefault("tracebacks", {})[part] = traceback.format_exc()[-3000:]
            log(f"part {part} failed: {report.doc['errors'][part]}")
        report.doc["part_s"][part] = time.perf_counter() - t0
        report.write()
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    errors = report.doc["errors"]
    print(f"gpu_check: wrote {args.out} in {report.doc['elapsed_s']:.1f} s"
          + (f"; failed parts: {', '.join(errors)}" if errors else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
