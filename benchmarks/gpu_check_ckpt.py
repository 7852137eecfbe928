"""The checkpoint part of ``benchmarks/gpu_check.py``, and the timing helpers every part uses.

A model of transformer-block matmuls with AdamW (fp32 parameters and moments, 12 bytes
per parameter; bf16 autocast on CUDA) trains at a calibrated step time while it is
checkpointed by trainkit lazy (``Checkpointer(keep_in_memory=1)`` + ``attach``) and by
``dcp.async_save`` with DCP's best staging; see ``gpu_check.py`` for the figures' meaning.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from trainkit._units import format_bytes

__all__ = ["TARGETS", "Clock", "Report", "log", "gb", "raw_bandwidth", "free_bytes", "pinned_bytes",
           "Trainer", "LazySaver", "DcpSaver", "part_ckpt"]

TARGETS = {"lazy_loop_cost_pct_at_every_10_steps_max": 2.0, "snapshot_vs_raw_d2h_min": 0.8,
           "merge_device_vs_cpu_speedup_min": 10.0}
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


def gb(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9


# -- raw copy bandwidth: the physical limits ---------------------------------------------
def raw_bandwidth(clock: Clock, nbytes: int, repeats: int = 5) -> dict:
    """Device<->host copies into/out of pinned memory, ``non_blocking=True`` (on CPU: a
    plain copy), median of ``repeats``: the ceiling for a snapshot and a restore."""
    dev, pin = clock.device, clock.device.type == "cuda"
    src = torch.ones(nbytes, dtype=torch.uint8, device=dev)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    host.copy_(src)                                          # first touch, not timed
    src.copy_(host)
    d2h = [clock.time(lambda: host.copy_(src, non_blocking=True))[0] for _ in range(repeats)]
    h2d = [clock.time(lambda: src.copy_(host, non_blocking=True))[0] for _ in range(repeats)]
    return {"bytes": nbytes, "pinned": pin, "d2h_gbps": gb(nbytes, statistics.median(d2h)),
            "h2d_gbps": gb(nbytes, statistics.median(h2d))}


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
            "snapshot_to_host_s": t_host, "snapshot_gbps": gb(nbytes, t_host),
            "snapshot_vs_raw_d2h": gb(nbytes, t_host) / raw["d2h_gbps"], "last_step": step}


def restore_check(saver: LazySaver, tr: Trainer, step: int, nbytes: int, raw: dict) -> dict:
    """Load the newest step from the memory tier, move it onto the device, compare every
    tensor with the live state (no step ran since that save)."""
    live = list(_tensors(tr.state()))   # each restored tensor goes where its live one is
    t_load, state = tr.clock.time(lambda: saver.ckpt.load(step))
    tier = saver.ckpt.loaded_from
    host = list(_tensors(state))
    if len(host) != len(live):
        raise RuntimeError(f"restored {len(host)} tensors, the live state has {len(live)}")
    t_h2d, moved = tr.clock.time(lambda: [h.to(v.device) for h, v in zip(host, live)])
    exact = all(torch.equal(a, b) for a, b in zip(moved, live))
    del state, host, moved
    total = t_load + t_h2d
    return {"tier": tier, "load_host_s": t_load, "to_device_s": t_h2d, "restore_s": total,
            "restore_gbps": gb(nbytes, total), "restore_vs_raw_h2d": gb(nbytes, total) / raw["h2d_gbps"],
            "exact": exact}


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _guarded(entry: dict, key: str, fn: Callable[[], dict]) -> dict | None:
    """``entry[key] = fn()``; a failure is recorded there (with its traceback) instead,
    so that trainkit's CUDA path failing still leaves DCP's figures, and the reverse."""
    try:
        entry[key] = fn()
        return entry[key]
    except Exception as exc:  # noqa: BLE001
        entry[key] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        return None


def pinned_bytes(clock: Clock) -> int:
    """Bytes torch's pinned-host caching allocator holds (0 on CPU). It rounds every
    request up to a power of two and keeps freed blocks cached."""
    if clock.device.type != "cuda" or not hasattr(torch.cuda, "host_memory_stats"):
        return 0
    return int(torch.cuda.host_memory_stats().get("allocated_bytes.current", 0))


def _lazy_arm(tr: Trainer, mem_root: Path, work: Path, rounds: int, n: int, raw: dict,
              entry: dict) -> None:
    pinned_before = pinned_bytes(tr.clock)
    lazy = LazySaver(tr, mem_root, work)
    try:
        m = _guarded(entry, "trainkit_lazy", lambda: measure_saver(lazy, tr, rounds, n, raw))
        if m is not None:
            m["pinned_bytes_added"] = pinned_bytes(tr.clock) - pinned_before
            _guarded(entry, "restore", lambda: restore_check(lazy, tr, m["last_step"], n, raw))
    finally:
        lazy.close()
    del lazy
    gc.collect()                        # the Checkpointer's pinned buffer goes before DCP's
    if tr.clock.device.type == "cuda" and hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()     # harness only: hand the cached pinned block back


def _dcp_arm(tr: Trainer, shm: Path, shm_free: int, work: Path, rounds: int, n: int,
             raw: dict, entry: dict) -> None:
    shared = tr.clock.device.type != "cuda" or shm_free >= 1.2 * n
    out_root = shm if shm_free >= (3.3 if shared else 2.2) * n else work
    try:
        dcp = DcpSaver(tr, out_root, shared=shared)
    except (ImportError, AttributeError, AssertionError, RuntimeError) as exc:
        entry["dcp_async"] = {"unavailable": f"{type(exc).__name__}: {exc}"}
        return
    try:
        d = _guarded(entry, "dcp_async", lambda: measure_saver(dcp, tr, rounds, n, raw))
        if d is not None:
            d.update(staging_options=dcp.options, output_root=str(out_root))
            if not shared:
                d["note"] = f"/dev/shm has {shm_free} bytes free: staged without shared memory"
    finally:
        dcp.close()


def _ckpt_size(clock: Clock, work: Path, nbytes: int, raw: dict, args: argparse.Namespace,
               report: Report, entry: dict) -> list[str]:
    """One state size: trainkit lazy (then its restore), then DCP, on the same trainer.
    tmpfs holds the memory tier (and DCP's shared staging and output) when it has room;
    otherwise the work directory stands in for it, and the entry says so. Returns the
    failures."""
    shm = Path("/dev/shm")
    usable = shm.is_dir() and os.access(shm, os.W_OK)
    mem_root = shm if usable and free_bytes(shm) >= 2.2 * nbytes else work
    tr = Trainer(nbytes, clock)
    entry.update(state_bytes=tr.state_bytes(), dim=tr.dim, blocks=tr.blocks, memory_tier_root=str(mem_root))
    entry["tokens"] = tr.calibrate(args.step_ms / 1e3)
    n = entry["state_bytes"]
    log(f"ckpt {format_bytes(n)}: {entry['tokens']} tokens per step; trainkit lazy")
    _lazy_arm(tr, mem_root, work, args.rounds, n, raw, entry)
    report.write()
    log(f"ckpt {format_bytes(n)}: dcp.async_save")
    _dcp_arm(tr, shm, free_bytes(shm) if usable else 0, work, args.rounds, n, raw, entry)
    failed = [f"{key}: {entry[key]['error']}" for key in ("trainkit_lazy", "restore", "dcp_async")
              if "error" in entry.get(key, {})]
    m, d = entry.get("trainkit_lazy", {}), entry.get("dcp_async", {})
    if "loop_cost_ms" in m:
        if "loop_cost_ms" in d:
            entry["lazy_minus_dcp_loop_cost_ms"] = m["loop_cost_ms"] - d["loop_cost_ms"]
        entry["targets_met"] = {
            "lazy_loop_cost_le_dcp": entry.get("lazy_minus_dcp_loop_cost_ms", math.inf) <= 0,
            "lazy_loop_cost_pct_le_2": (m["loop_cost_pct_every_10"]
                                        <= TARGETS["lazy_loop_cost_pct_at_every_10_steps_max"]),
            "snapshot_ge_0_8_raw_d2h": m["snapshot_vs_raw_d2h"] >= TARGETS["snapshot_vs_raw_d2h_min"]}
    return failed


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
        if free_bytes(work) < 2.5 * nbytes:
            entry["skipped"] = f"{work} has {free_bytes(work)} bytes free, needs {int(2.5 * nbytes)}"
            continue
        try:
            problems = _ckpt_size(clock, work, nbytes, raw, args, report, entry)
            failed += [f"{format_bytes(nbytes)} {f}" for f in problems]
        except Exception as exc:  # noqa: BLE001 - the next size still runs
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()[-3000:]
            failed.append(f"{format_bytes(nbytes)}: {entry['error']}")
        gc.collect()
        if clock.device.type == "cuda":
            torch.cuda.empty_cache()
        report.write()
    if failed:
        raise RuntimeError("; ".join(failed))
