"""One short GPU check of trainkit's CUDA paths (issue 15), every figure written as JSON.

Parts (always run in this order, each guarded, the JSON rewritten after each step so a
timeout still leaves figures):

* ``monitor``: NCCL with world size 1 (gloo in ``--dry-run``): ``dist.all_reduce`` and
  ``dist.broadcast`` on device tensors through ``CollectiveMonitor``'s wrapper vs the
  raw group, in paired blocks; per-collective overhead in µs.
* ``ckpt``: a model of transformer-block matmuls plus AdamW, fp32 parameters and fp32
  moments (12 bytes per parameter; bf16 autocast compute), sized to each ``--sizes``
  total, trained with the token count calibrated so a step takes ``--step-ms``. Per
  checkpoint: the training-loop cost (time blocked in the save call plus the inflation of
  the next 3 steps over the median undisturbed step) for trainkit lazy
  (``Checkpointer(keep_in_memory=1)`` + ``attach``) and for ``dcp.async_save`` with
  ``DefaultStager(StagingOptions(True, True, True, True))``; time until the snapshot is
  in host memory against the raw pinned device-to-host bandwidth; restore from the
  memory tier onto the device against the raw host-to-device bandwidth.
* ``merge``: TIES over a base + 4 synthetic bf16 models in safetensors, both scopes,
  through the ``trainkit merge`` CLI on the CPU and, if the CLI has ``--device``, on the
  device; GB/s of input against a raw read of the same files; device vs CPU output.

On the H200 (the device tool's command, with the wheels of ``scripts/gpu_wheels.sh``
carried in ``.whl/``; it finishes in under 6 minutes)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && \
        python3 benchmarks/gpu_check.py --out $OUT/gpu.json

Here, on CPU, the same code paths with tiny sizes (gloo, CPU merge)::

    PYTHONPATH=$PWD python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_dry.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from trainkit._units import format_bytes, parse_size

__all__ = ["main"]

PARTS = ("monitor", "ckpt", "merge")
TARGETS = {"lazy_loop_cost_pct_at_every_10_steps_max": 2.0, "snapshot_vs_raw_d2h_min": 0.8,
           "merge_device_vs_cpu_speedup_min": 10.0}
NOT_AVAILABLE_DEVICE = "not available: --device missing"
_T0 = time.perf_counter()


class Clock:
    """Wall time with the device drained at both ends, so queued GPU work is counted."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out


class Report:
    """The JSON document, rewritten atomically whenever a figure lands."""

    def __init__(self, path: Path, doc: dict) -> None:
        self.path, self.doc, self.t0 = path, doc, time.perf_counter()

    def write(self) -> None:
        self.doc["elapsed_s"] = round(time.perf_counter() - self.t0, 3)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, default=str))
        os.replace(tmp, self.path)


def log(message: str) -> None:
    """Progress on stdout (the device tool shows its tail)."""
    print(f"[gpu_check +{time.perf_counter() - _T0:6.1f}s] {message}", flush=True)


def _gb(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9


# -- raw copy bandwidth: the physical limits ---------------------------------------------
def raw_bandwidth(clock: Clock, nbytes: int, repeats: int = 5) -> dict:
    """Device<->host copies into/out of pinned memory, ``non_blocking=True`` (on CPU: a
    plain copy), median of ``repeats``: the ceiling for a snapshot and a restore."""
    dev, pin = clock.device, clock.device.type == "cuda"
    src = torch.ones(nbytes, dtype=torch.uint8, device=dev)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    host.copy_(src), src.copy_(host)                         # first touch, not timed
    d2h = [clock.time(lambda: host.copy_(src, non_blocking=True))[0] for _ in range(repeats)]
    h2d = [clock.time(lambda: src.copy_(host, non_blocking=True))[0] for _ in range(repeats)]
    return {"bytes": nbytes, "pinned": pin, "d2h_gbps": _gb(nbytes, statistics.median(d2h)),
            "h2d_gbps": _gb(nbytes, statistics.median(h2d))}


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


# -- checkpoint ---------------------------------------------------------------------------
class _Block(torch.nn.Module):
    """A transformer block's matmuls (qkv, out-projection, MLP up/down): 12 d^2 weights.
    The attention scores are an elementwise stand-in: a checkpoint sees parameters only."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d, bias=False), torch.nn.Linear(d, d, bias=False)
        self.up, self.down = torch.nn.Linear(d, 4 * d, bias=False), torch.nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = x + self.proj(q * torch.sigmoid(k) + v)
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class Trainer:
    """Embedding (sized to pad the state to the target) + blocks + AdamW, fp32 state."""

    def __init__(self, nbytes: int, clock: Clock) -> None:
        self.clock, dev = clock, clock.device
        self.cuda = dev.type == "cuda"
        self.dim = d = 2048 if nbytes >= 1 << 30 else 64
        self.blocks = max(1, nbytes // (144 * d * d))         # 12 d^2 params x 12 bytes
        self.rows = max(16, (nbytes - self.blocks * 144 * d * d) // (12 * d))
        with dev:                     # initialised in place: no host-side init of 16 GiB
            self.emb = torch.nn.Embedding(self.rows, d)
            self.body = torch.nn.Sequential(*[_Block(d) for _ in range(self.blocks)])
        self.model = torch.nn.ModuleDict({"emb": self.emb, "body": self.body})
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-6)
        self.ids = torch.zeros(64, dtype=torch.long, device=dev)
        self.step()                                           # creates the AdamW state

    def set_tokens(self, n: int) -> None:
        self.ids = torch.randint(0, self.rows, (n,), device=self.clock.device)

    def step(self, before_step: Callable[[], None] | None = None) -> float:
        def run() -> None:
            with torch.autocast(self.clock.device.type, dtype=torch.bfloat16, enabled=self.cuda):
                loss = self.body(self.emb(self.ids)).float().square().mean()
            loss.backward()
            if before_step is not None:
                before_step()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return self.clock.time(run)[0]

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optim": self.opt.state_dict()}

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in _tensors(self.state()))

    def calibrate(self, target_s: float) -> int:
        """Tokens per step for ``target_s``: a line through two timed token counts, then
        one correction at the predicted count (GPU efficiency grows with the count),
        capped so activations fit in a fraction of free device memory."""
        lo = 2048 if self.cuda else 32
        if self.cuda:
            cap = int(0.7 * torch.cuda.mem_get_info(self.clock.device)[0] / (64 * self.dim * self.blocks))
        else:
            cap = 512

        def timed(n: int) -> float:
            self.set_tokens(n)
            self.step()
            return statistics.median(self.step() for _ in range(3))

        t_lo, t_hi = timed(lo), timed(4 * lo)
        slope = (t_hi - t_lo) / (3 * lo)
        fixed = t_lo - slope * lo
        n = int((target_s - fixed) / slope) if slope > 0 else 4 * lo
        n = max(lo, min(cap, n))
        if self.cuda and n > 4 * lo:
            t_n = timed(n)
            n = max(lo, min(cap, int(n * (target_s - fixed) / max(t_n - fixed, 1e-6))))
        n = max(lo, n - n % 16)
        self.set_tokens(n)
        return n


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


class LazySaver:
    """trainkit lazy mode: the memory tier on /dev/shm, no persistent copy while timing
    (persist_every is huge; only the first save also reaches the persistent directory)."""

    name = "trainkit_lazy"

    def __init__(self, tr: Trainer, mem_root: Path, disk_root: Path) -> None:
        from trainkit.checkpoint import Checkpointer

        self.tr = tr
        self.mem = Path(tempfile.mkdtemp(prefix="gpu_check-mem-", dir=mem_root))
        self.disk = Path(tempfile.mkdtemp(prefix="gpu_check-ckpt-", dir=disk_root))
        self.ckpt = Checkpointer(self.disk, keep_in_memory=1, memory_dir=self.mem,
                                 persist_every=10**9, keep_persistent=1)
        self.ckpt.attach(tr.opt)
        self.handle: Any = None
        self.before_step = None                               # the attach() pre-hook waits

    def save(self, step: int) -> None:
        self.handle = self.ckpt.save(step, self.tr.state())

    def until_host(self) -> None:
        self.tr.opt.step()              # no gradients: only the pre-hook, which waits for the copy

    def finish(self) -> None:
        self.handle.result()
        self.ckpt.wait()

    def close(self) -> None:
        self.ckpt.close(persist_last=False)
        shutil.rmtree(self.mem, ignore_errors=True)
        shutil.rmtree(self.disk, ignore_errors=True)


class DcpSaver:
    """``dcp.async_save`` with DCP's best GPU staging; the loop waits for staging before
    ``optimizer.step()``, as DCP requires."""

    name = "dcp_async"

    def __init__(self, tr: Trainer, out_root: Path, *, shared: bool = True) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        cuda = tr.clock.device.type == "cuda"       # pinned and non-blocking need a device
        self.options = (cuda, shared, True, cuda)
        self.stager = DefaultStager(StagingOptions(*self.options))
        self.dcp, self.tr, self.resp = dcp, tr, None
        self.root = Path(tempfile.mkdtemp(prefix="gpu_check-dcp-", dir=out_root))
        self.dirs: list[Path] = []

    def save(self, step: int) -> None:
        self.dirs.append(self.root / f"step{step}")
        self.resp = self.dcp.async_save(self.tr.state(), checkpoint_id=self.dirs[-1],
                                        async_stager=self.stager, no_dist=True)

    def before_step(self) -> None:
        staged = getattr(self.resp, "staging_completion", None)
        if staged is not None:
            staged.result()

    until_host = before_step

    def finish(self) -> None:
        (getattr(self.resp, "upload_completion", None) or self.resp).result()
        while len(self.dirs) > 1:
            shutil.rmtree(self.dirs.pop(0), ignore_errors=True)

    def close(self) -> None:
        self.stager.close()
        shutil.rmtree(self.root, ignore_errors=True)


def measure_saver(saver: Any, tr: Trainer, rounds: int, nbytes: int, raw: dict) -> dict:
    """Warm-up save (buffers allocated), then ``rounds`` checkpoints inside the loop,
    then one save timed until the snapshot is in host memory."""
    step = 0
    t_first, _ = tr.clock.time(lambda: (saver.save(step), saver.finish()))
    base: list[float] = []
    per: list[dict] = []
    for _ in range(rounds):
        base += [tr.step() for _ in range(3)]
        step += 1
        blocked, _ = tr.clock.time(lambda: saver.save(step))
        after = [tr.step(saver.before_step) for _ in range(3)]
        commit, _ = tr.clock.time(saver.finish)
        per.append({"blocked_ms": blocked * 1e3, "next_steps_ms": [s * 1e3 for s in after],
                    "finish_after_steps_s": commit})
    median = statistics.median(base)
    for r in per:
        r["loop_cost_ms"] = r["blocked_ms"] + sum(s - median * 1e3 for s in r["next_steps_ms"])
    step += 1
    t_host, _ = tr.clock.time(lambda: (saver.save(step), saver.until_host()))
    saver.finish()
    cost = statistics.median(r["loop_cost_ms"] for r in per)
    return {"first_save_s": t_first, "median_step_ms": median * 1e3, "rounds": per,
            "loop_cost_ms": cost, "loop_cost_pct_every_10": cost / (10 * median * 1e3) * 100,
            "snapshot_to_host_s": t_host, "snapshot_gbps": _gb(nbytes, t_host),
            "snapshot_vs_raw_d2h": _gb(nbytes, t_host) / raw["d2h_gbps"], "last_step": step}


def restore_check(saver: LazySaver, tr: Trainer, step: int, nbytes: int, raw: dict) -> dict:
    """Load the newest step from the memory tier, move it onto the device, compare every
    tensor with the live state (no step ran since that save)."""
    t_load, state = tr.clock.time(lambda: saver.ckpt.load(step))
    tier = saver.ckpt.loaded_from
    host = list(_tensors(state))
    t_h2d, moved = tr.clock.time(lambda: [t.to(tr.clock.device) for t in host])
    live = list(_tensors(tr.state()))
    exact = len(moved) == len(live) and all(torch.equal(a, b) for a, b in zip(moved, live))
    del state, host, moved
    total = t_load + t_h2d
    return {"tier": tier, "load_host_s": t_load, "to_device_s": t_h2d, "restore_s": total,
            "restore_gbps": _gb(nbytes, total), "restore_vs_raw_h2d": _gb(nbytes, total) / raw["h2d_gbps"],
            "exact": exact}


def _free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _ckpt_size(clock: Clock, work: Path, nbytes: int, raw: dict, args: argparse.Namespace,
               report: Report, entry: dict) -> None:
    """One state size: trainkit lazy (then its restore), then DCP, on the same trainer.
    tmpfs holds the memory tier (and DCP's shared staging and output) when it has room;
    otherwise the work directory stands in for it, and the entry says so."""
    shm = Path("/dev/shm")
    shm_free = _free(shm) if shm.is_dir() and os.access(shm, os.W_OK) else 0
    mem_root = shm if shm_free >= 2.2 * nbytes else work
    tr = Trainer(nbytes, clock)
    entry.update(state_bytes=tr.state_bytes(), dim=tr.dim, blocks=tr.blocks, memory_tier_root=str(mem_root))
    entry["tokens"] = tr.calibrate(args.step_ms / 1e3)
    n = entry["state_bytes"]
    log(f"ckpt {format_bytes(n)}: {entry['tokens']} tokens per step; trainkit lazy")
    lazy = LazySaver(tr, mem_root, work)
    try:
        entry["trainkit_lazy"] = m = measure_saver(lazy, tr, args.rounds, n, raw)
        entry["restore"] = restore_check(lazy, tr, m["last_step"], n, raw)
    finally:
        lazy.close()
    del lazy
    gc.collect()
    report.write()
    log(f"ckpt {format_bytes(n)}: dcp.async_save")
    shm_free = _free(shm) if shm_free else 0
    shared = not clock.device.type == "cuda" or shm_free >= 1.2 * nbytes
    out_root = shm if shm_free >= (3.3 if shared else 2.2) * nbytes else work
    try:
        dcp = DcpSaver(tr, out_root, shared=shared)
    except (ImportError, AttributeError, AssertionError, RuntimeError) as exc:
        entry["dcp_async"] = {"unavailable": f"{type(exc).__name__}: {exc}"}
    else:
        try:
            entry["dcp_async"] = d = measure_saver(dcp, tr, args.rounds, n, raw)
            d.update(staging_options=dcp.options, output_root=str(out_root))
            if not shared:
                d["note"] = f"/dev/shm has {shm_free} bytes free: staged without shared memory"
        finally:
            dcp.close()
        entry["lazy_minus_dcp_loop_cost_ms"] = m["loop_cost_ms"] - d["loop_cost_ms"]
    entry["targets_met"] = {
        "lazy_loop_cost_le_dcp": entry.get("lazy_minus_dcp_loop_cost_ms", math.inf) <= 0,
        "lazy_loop_cost_pct_le_2": m["loop_cost_pct_every_10"] <= TARGETS["lazy_loop_cost_pct_at_every_10_steps_max"],
        "snapshot_ge_0_8_raw_d2h": m["snapshot_vs_raw_d2h"] >= TARGETS["snapshot_vs_raw_d2h_min"]}


def part_ckpt(clock: Clock, work: Path, args: argparse.Namespace, report: Report) -> None:
    out: dict[str, Any] = {"state": "fp32 parameters + fp32 AdamW moments (12 B/param); "
                                    "bf16 autocast on CUDA, fp32 compute on CPU", "sizes": []}
    report.doc["ckpt"] = out
    raw = out["raw"] = raw_bandwidth(clock, min(1 << 30, max(args.sizes)))
    report.write()
    failed: list[str] = []
    for nbytes in args.sizes:
        entry: dict[str, Any] = {"target_bytes": nbytes}
        out["sizes"].append(entry)
        if _free(work) < 2.5 * nbytes:
            entry["skipped"] = f"{work} has {_free(work)} bytes free, needs {int(2.5 * nbytes)}"
            continue
        try:
            _ckpt_size(clock, work, nbytes, raw, args, report, entry)
        except Exception as exc:  # noqa: BLE001 - the next size still runs
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()[-3000:]
            failed.append(f"{nbytes} bytes: {entry['error']}")
        gc.collect()
        if clock.device.type == "cuda":
            torch.cuda.empty_cache()
        report.write()
    if failed:
        raise RuntimeError("; ".join(failed))


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
    return _gb(n, time.perf_counter() - t0)


def _merge(paths: list[Path], out: Path, scope: str, extra: list[str], nbytes: int) -> dict:
    """One ``trainkit merge ties`` (density 0.2, all cores); its time includes hashing
    the inputs for merge.json and writing the output, as a user would wait for it."""
    t0 = time.perf_counter()
    rc, _, err = _cli("merge", "ties", "--base", str(paths[0]), "--models", *map(str, paths[1:]),
                      "--out", str(out), "--scope", scope, "--density", "0.2", *extra)
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"trainkit merge ties --scope {scope} {' '.join(extra)}: {err.strip()[-500:]}")
    return {"seconds": seconds, "input_gbps": _gb(nbytes, seconds)}


def _compare(a_dir: Path, b_dir: Path) -> dict:
    from safetensors.torch import load_file

    a, b = ({}, {})
    for d, into in ((a_dir, a), (b_dir, b)):
        for f in sorted(d.glob("*.safetensors")):
            into.update(load_file(str(f)))
    diff = [(x.float() - b[k].float()).abs() for k, x in a.items()]
    return {"exact": a.keys() == b.keys() and all(torch.equal(x, b[k]) for k, x in a.items()),
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
    p.add_argument("--sizes", default=None, help="checkpoint state sizes (default 2GiB,16GiB; dry run 2MiB,4MiB)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    p.add_argument("--merge-size", default=None, help="bytes per merged model (default 2GiB; dry run 4MiB)")
    p.add_argument("--step-ms", type=float, default=None, help="target step time (default 200; dry run 20)")
    p.add_argument("--rounds", type=int, default=2, help="timed checkpoints per method and size")
    p.add_argument("--work-dir", default=None, help="scratch directory on disk (default: a temp dir)")
    args = p.parse_args(argv)
    try:
        args.sizes = [parse_size(s) for s in (args.sizes or ("2MiB,4MiB" if args.dry_run else "2GiB,16GiB")).split(",")]
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


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    device = torch.device("cpu" if args.dry_run else "cuda:0")
    clock = Clock(device)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    report = Report(Path(args.out), {
        "schema": 1, "dry_run": args.dry_run, "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv[1:],
        "parts": args.parts, "targets": TARGETS, "errors": {}, "part_s": {},
        "free_bytes": {"work": _free(work), "dev_shm": _free(Path("/dev/shm")) if Path("/dev/shm").is_dir() else 0},
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
