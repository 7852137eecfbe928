"""Checkpoint benchmark: trainkit against torch.save and DCP, side by side in one run.

    .venv/bin/python benchmarks/checkpoint_bench.py            # 2 x ~1 GiB states + tiers
    .venv/bin/python benchmarks/checkpoint_bench.py --quick    # 2 x 64 MiB, ~1 minute
    .venv/bin/python benchmarks/checkpoint_bench.py --parts tiers   # only the issue-3 part
    .venv/bin/python benchmarks/checkpoint_bench.py --parts fsdp --scale 8   # FSDP2, 4 ranks

``--parts loop`` is the training-loop comparison below; ``--parts tiers`` is
``benchmarks/checkpoint_tiers.py``: persistence of a replicated state from 1, 2 and 4
ranks (dedupe), and restore from memory, local and persistent against ``dcp.load``.

Two states held by a real optimizer (SGD with momentum: half the tensors are
parameters, half momentum buffers): 64 x 16 MiB tensors ("big") and 2000 x 512 KiB
("small"). For each competitor:

* loop cost per checkpoint: time blocked in the save call, plus the extra time of the
  next 3 training steps over 3 steps without a checkpoint just before (the background
  copy competes with compute on a small machine, so blocked time alone flatters);
* extra CPU per checkpoint: the process's CPU seconds (all threads) from the call until
  durable, with 3 training steps inside, minus those of 3 steps without a checkpoint.
  On a shared, overloaded machine wall-clock step times swing by seconds; CPU seconds
  are what a background checkpoint takes from training when the cores are busy;
* persistence: time from the call until the checkpoint is durable, against a raw
  sequential write + fsync of the same number of bytes to one file, interleaved
  A/B/A/B; the median of the per-pair ratios (raw time / competitor time);
* restore: load time against a raw read of the same bytes, page cache dropped for
  both first (posix_fadvise DONTNEED), interleaved; median ratio;
* peak extra host memory (RSS sampled every 2 ms) during the first save, over the
  state size.

A training step is a fixed compute burn (matmuls, standing in for forward/backward)
plus ``optimizer.step()``, on one intra-op thread (``torch.set_num_threads(1)``): with
OpenMP spinning on both cores, background work and step times become pure noise. glibc is told to return big frees to the OS
(MALLOC_MMAP_THRESHOLD_) so memory peaks of one competitor do not hide another's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "131072":
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import psutil  # noqa: E402
import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trainkit.checkpoint import Checkpointer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint_tiers import drop_cache, files_under  # noqa: E402

MiB = 1 << 20


# -- the state and the training step ----------------------------------------------------
@dataclass
class Workload:
    name: str
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    burn: Callable[[], None]

    @property
    def nbytes(self) -> int:
        return 2 * sum(p.numel() * p.element_size() for p in self.params)

    def state(self) -> dict:
        sd: dict[str, torch.Tensor] = {}
        for i, p in enumerate(self.params):
            sd[f"param.{i}"] = p
            sd[f"momentum.{i}"] = self.opt.state[p]["momentum_buffer"]
        return sd

    def step(self, before: Callable[[], None] | None = None) -> float:
        t0 = time.perf_counter()
        self.burn()
        if before is not None:
            before()
        self.opt.step()
        return time.perf_counter() - t0


def make_workload(name: str, ntensors: int, tensor_bytes: int, burn_ms: float) -> Workload:
    numel = tensor_bytes // 4
    params = [torch.nn.Parameter(torch.rand(numel)) for _ in range(ntensors // 2)]
    for p in params:
        p.grad = torch.full_like(p, 1e-4)
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=False)
    opt.step()
    a = torch.randn(384, 384)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    per = (time.perf_counter() - t0) / 10
    reps = max(1, int(burn_ms / 1000 / per))

    def burn() -> None:
        for _ in range(reps):
            a @ a

    return Workload(name, params, opt, burn)


# -- competitors ------------------------------------------------------------------------
@dataclass
class Competitor:
    """``call(dir, state)`` starts a save and returns a token; ``before_step(token)`` runs
    before each of the next optimizer steps; ``complete(token)`` waits until durable."""

    name: str
    call: Callable[[Path, dict], object]
    complete: Callable[[object], None] = lambda tok: None
    before_step: Callable[[object], None] | None = None
    setup: Callable[[Workload, Path], None] = lambda w, root: None
    teardown: Callable[[], None] = lambda: None
    load: Callable[[Path, object], object] | None = None
    files: Callable[[Path, object], list[Path]] = field(default=lambda d, tok: files_under(d))


def competitors(quick: bool) -> list[Competitor]:
    out: list[Competitor] = []
    for lazy in (True, False):
        holder: dict = {}

        def setup(w: Workload, root: Path, holder=holder, lazy=lazy) -> None:
            holder["ck"] = Checkpointer(root, timeout=600)
            holder["step"] = 0
            if lazy:
                holder["ck"].attach(w.opt)

        def call(d: Path, sd: dict, holder=holder) -> object:
            holder["step"] += 1
            return holder["step"], holder["ck"].save(holder["step"], sd)

        def teardown(holder=holder) -> None:
            holder.pop("ck").close()

        def load(d: Path, tok: object, holder=holder) -> object:
            return holder["ck"].load(tok[0])

        def files(d: Path, tok: object, holder=holder) -> list[Path]:
            return files_under(holder["ck"].path / Path(f"step_{tok[0]:010d}"))

        out.append(Competitor("trainkit lazy (attached)" if lazy else "trainkit (no attach)",
                              call, lambda tok: tok[1].result(), None, setup, teardown,
                              load, files))

    def torch_save(d: Path, sd: dict) -> object:
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "state.pt", "wb") as f:
            torch.save(sd, f)
            f.flush()
            os.fsync(f.fileno())
        return d

    out.append(Competitor("torch.save + fsync", torch_save,
                          load=lambda d, tok: torch.load(d / "state.pt", weights_only=True)))

    def dcp_load(d: Path, tok: object) -> object:
        sd = {k: torch.empty_like(v) for k, v in _TEMPLATE.items()}
        dcp.load(sd, checkpoint_id=str(d), no_dist=True)
        return sd

    out.append(Competitor("dcp.save", lambda d, sd: dcp.save(sd, checkpoint_id=str(d),
                                                               no_dist=True), load=dcp_load))
    out.append(Competitor("dcp.async_save (default stager)",
                          lambda d, sd: dcp.async_save(sd, checkpoint_id=str(d), no_dist=True),
                          lambda fut: fut.result()))
    stager: dict = {}

    def staged_call(d: Path, sd: dict) -> object:
        return dcp.async_save(sd, checkpoint_id=str(d), no_dist=True, async_stager=stager["s"])

    def staged_setup(w: Workload, root: Path) -> None:
        stager["s"] = DefaultStager(StagingOptions(False, False, True, False))

    out.append(Competitor("dcp.async_save (async staging)", staged_call,
                          lambda r: r.upload_completion.result(),
                          lambda r: r.staging_completion.result(),
                          staged_setup, lambda: stager.pop("s").close()))
    return out


_TEMPLATE: dict[str, torch.Tensor] = {}


# -- measurement helpers ----------------------------------------------------------------
class PeakRSS:
    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def raw_write(path: Path, nbytes: int, block: torch.Tensor) -> float:
    view = memoryview(block.numpy())
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    left = nbytes
    while left:
        left -= os.write(fd, view[:min(left, len(view))])
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def raw_read(path: Path, nbytes: int) -> float:
    t0 = time.perf_counter()
    buf = bytearray(nbytes)
    with open(path, "rb", buffering=0) as f:
        view = memoryview(buf)
        pos = 0
        while pos < nbytes:
            n = f.readinto(view[pos:])
            if not n:
                break
            pos += n
    return time.perf_counter() - t0


def run_workload(w: Workload, comps: list[Competitor], root: Path, reps: int) -> list[dict]:
    global _TEMPLATE
    _TEMPLATE = w.state()
    nbytes = w.nbytes
    block = torch.randint(0, 255, (64 * MiB,), dtype=torch.uint8)
    raw_path = root / "raw.bin"
    rows = []
    for comp in comps:
        gc.collect()
        croot = root / comp.name.replace(" ", "_").replace("(", "").replace(")", "")
        croot.mkdir(parents=True)
        comp.setup(w, croot)
        counter = [0]

        def new_dir() -> Path:
            counter[0] += 1
            return croot / f"save{counter[0]}"

        proc = psutil.Process()

        def cpu() -> float:
            t = proc.cpu_times()
            return t.user + t.system

        def one_save(train_steps: int) -> tuple[float, float, list[float], object, Path]:
            d = new_dir()
            t0 = time.perf_counter()
            tok = comp.call(d, w.state())
            blocked = time.perf_counter() - t0
            before = (lambda: comp.before_step(tok)) if comp.before_step else None
            steps = [w.step(before) for _ in range(train_steps)]
            comp.complete(tok)
            return blocked, time.perf_counter() - t0, steps, tok, d

        with PeakRSS() as mem:                        # first save: includes buffer setup
            one_save(0)
        peak_extra = mem.peak - mem.base
        persist_ratio, costs, blocked_all, cpu_extra, base_med = [], [], [], [], []
        last = None
        for _ in range(reps):
            t_raw = raw_write(raw_path, nbytes, block)
            blocked, total, _, tok, d = one_save(0)
            persist_ratio.append(t_raw / total)
            c0 = cpu()
            base = [w.step() for _ in range(3)]
            c1 = cpu()
            blocked, total, steps, tok, d = one_save(3)
            c2 = cpu()
            costs.append(blocked + sum(steps) - sum(base))
            cpu_extra.append((c2 - c1) - (c1 - c0))
            base_med.append(statistics.median(base))
            blocked_all.append(blocked)
            last = (tok, d)
        restore_ratio = []
        if comp.load is not None and last is not None:
            tok, d = last
            files = comp.files(d, tok)
            for _ in range(reps):
                drop_cache([raw_path])
                t_raw = raw_read(raw_path, nbytes)
                drop_cache(files)
                t0 = time.perf_counter()
                loaded = comp.load(d, tok)
                t_load = time.perf_counter() - t0
                del loaded
                restore_ratio.append(t_raw / t_load)
        comp.teardown()
        rows.append({
            "workload": w.name, "competitor": comp.name, "state_bytes": nbytes,
            "blocked_s": statistics.median(blocked_all),
            "loop_cost_s": statistics.median(costs), "loop_cost_reps": costs,
            "cpu_extra_s": statistics.median(cpu_extra), "base_step_s": statistics.median(base_med),
            "persist_vs_raw": statistics.median(persist_ratio),
            "restore_vs_raw": statistics.median(restore_ratio) if restore_ratio else None,
            "peak_extra_mem_x": peak_extra / nbytes,
        })
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(croot, ignore_errors=True)
    return rows


def table(rows: list[dict]) -> str:
    out = []
    for wname in dict.fromkeys(r["workload"] for r in rows):
        group = [r for r in rows if r["workload"] == wname]
        ts = next((r["loop_cost_s"] for r in group if r["competitor"].startswith("torch.save")), None)
        out.append(f"\n**{wname}** ({group[0]['state_bytes'] / MiB:.0f} MiB of state)\n")
        tc = next((r["cpu_extra_s"] for r in group if r["competitor"].startswith("torch.save")), None)
        out.append("| competitor | blocked (ms) | loop cost / ckpt (ms) | % of torch.save | "
                   "extra CPU / ckpt (s) | % of torch.save | persist vs raw write | "
                   "restore vs raw read | peak extra mem |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in group:
            pct = f"{100 * r['loop_cost_s'] / ts:.1f}%" if ts else "-"
            restore = f"{r['restore_vs_raw']:.2f}" if r["restore_vs_raw"] is not None else "-"
            cpct = f"{100 * r['cpu_extra_s'] / tc:.0f}%" if tc else "-"
            out.append(f"| {r['competitor']} | {1000 * r['blocked_s']:.0f} | "
                       f"{1000 * r['loop_cost_s']:.0f} | {pct} | {r['cpu_extra_s']:.2f} | {cpct} | "
                       f"{r['persist_vs_raw']:.2f} | {restore} | {r['peak_extra_mem_x']:.2f}x |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 x 64 MiB states, 2 repetitions")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--only", default=None, help="run only competitors whose name contains this")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--parts", default="loop,tiers",
                   help="loop, tiers, fsdp (comma-separated; default loop,tiers)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="fsdp part: divide its ~1 GiB of model + AdamW state by this")
    p.add_argument("--rounds", type=int, default=3,
                   help="fsdp part: interleaved rounds of every arm, the first a warm-up "
                        "(default 3; at least 2); medians are reported")
    p.add_argument("--background-nice", type=int, default=None,
                   help="fsdp part: the trainkit arms' Checkpointer(background_nice=) "
                        "(default: the Checkpointer's)")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    if parts - {"loop", "tiers", "fsdp"}:
        p.error(f"unknown part(s) {sorted(parts - {'loop', 'tiers', 'fsdp'})}; use loop, "
                f"tiers and/or fsdp")
    if args.rounds < 2:
        p.error(f"--rounds must be at least 2 (the first round is a warm-up), got {args.rounds}")
    torch.set_num_threads(1)    # training uses one core; the other is left for checkpointing
    scale = 16 if args.quick else 1
    reps = args.reps or (2 if args.quick else 3)
    root = Path(args.dir or tempfile.mkdtemp(prefix="trainkit-bench-"))
    comps = [c for c in competitors(args.quick) if not args.only or args.only in c.name]
    rows: list[dict] = []
    tiers_result = fsdp_result = None
    try:
        if "fsdp" in parts:
            import checkpoint_fsdp

            fsdp_result = checkpoint_fsdp.run(args.scale, root / "fsdp", rounds=args.rounds,
                                              background_nice=args.background_nice)
        if "tiers" in parts:
            import checkpoint_tiers

            tiers_result = checkpoint_tiers.run(args.quick, root / "tiers")
        for name, n, size in ([] if "loop" not in parts else (("big: 64 x 16 MiB", 64, 16 * MiB),
                              ("small: 2000 x 512 KiB", 2000, 512 * 1024))):
            n_eff = n // scale if args.quick else n
            label = name if not args.quick else f"{name.split(':')[0]}: {n_eff} x {size // 1024} KiB"
            torch.manual_seed(0)
            w = make_workload(label, n_eff, size, burn_ms=100 if args.quick else 250)
            wroot = root / name.split(":")[0]
            wroot.mkdir(parents=True, exist_ok=True)
            rows += run_workload(w, comps, wroot, reps)
            del w
            gc.collect()
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if rows:
        print(table(rows))
    if tiers_result is not None:
        import checkpoint_tiers

        print(checkpoint_tiers.report(tiers_result))
    if fsdp_result is not None:
        import checkpoint_fsdp

        print(checkpoint_fsdp.report(fsdp_result))
    if args.json:
        Path(args.json).write_text(json.dumps({"loop": rows, "tiers": tiers_result,
                                               "fsdp": fsdp_result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
