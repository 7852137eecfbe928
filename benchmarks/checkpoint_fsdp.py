"""FSDP2 checkpointing on 4 gloo ranks, side by side (``checkpoint_bench.py --parts fsdp``).

    .venv/bin/python benchmarks/checkpoint_bench.py --parts fsdp             # ~1 GiB in all
    .venv/bin/python benchmarks/checkpoint_bench.py --parts fsdp --scale 8   # ~128 MiB
    .venv/bin/python benchmarks/checkpoint_bench.py --parts fsdp --scale 16 --rounds 5

An Embedding / LayerNorm / Linear model under ``fully_shard`` with AdamW: parameters and
optimizer state together are about 1 GiB over the 4 ranks (divided by ``--scale``).
Every arm saves the same DTensor state (``get_state_dict``) while training continues:

* ``trainkit lazy``: ``Checkpointer.attach(optimizer)`` + ``save()``;
* ``dcp.async_save`` + ``DefaultStager(StagingOptions(False, False, True, False))`` into
  ``FileSystemWriter``;
* ``dcp.async_save`` + ``LazyStager(optimizer)`` into ``ZarrWriter``;
* ``dcp.save`` into ``FileSystemWriter``;
* ``trainkit, host budget``: ``Checkpointer(host_budget_bytes=B)`` on each rank's local
  shards as plain tensors (eager; what the budget costs and bounds, independent of the
  DTensor path).

Arms run interleaved over ``--rounds`` rounds (default 3, the first a warm-up that is not
reported; the arm order rotates each round), and every figure is the median over the
measured rounds of the slowest rank's value in that round: *loop cost per checkpoint* =
time from the save call to the end of the next 3 training steps minus 3 steps just
before without a checkpoint; *on the training thread* = the save call plus what the
optimizer's step pre-hook then waited for lazy copies (what the loop pays by itself, with
no other process on its cores); *ckpt CPU* = the rank process's CPU time in the loop window
(save call + 3 steps) and until durable, minus that of the 3 steps before: what the
checkpoint's threads take from cores the ranks share (on this 2-core machine 4 ranks
already fill them, so that CPU shows up as loop cost); time until durable; peak extra RSS over the rank's state
bytes; and the checkpoint's *own* extra RSS: the peak RSS rise during the save (call,
3 steps, wait) minus the peak rise of the 3 steps just before without a save. Why the
difference: the training steps themselves (gloo buffers, autograd) raise RSS by more
than a small host budget, and a figure that mixes them in says nothing about the budget. DCP's collectives run on
a gloo group of their own, as torchtitan does. Then a 2-rank job restores the 4-rank
steps into its own FSDP2 model (resharding), page cache dropped first: ``dcp.load`` from
``FileSystemReader`` against ``ZarrReader`` (checksums verified) and, where it exists,
``Checkpointer.load(step, into=...)``, interleaved over the same number of rounds (the
first a warm-up), median reported.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import socket
import statistics
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

MiB = 1 << 20
STEPS_AFTER = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Model(torch.nn.Module):
    def __init__(self, vocab: int, dim: int, blocks: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 4 * dim),
                                torch.nn.Linear(4 * dim, dim)) for _ in range(blocks))
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for b in self.blocks:
            h = h + b(h)
        return self.norm(h) @ self.emb.weight.t()


def _shape(total_bytes: int) -> tuple[int, int, int]:
    """(vocab, dim, blocks) whose parameters + AdamW state (3 fp32 copies) ~ total."""
    dim = 1024 if total_bytes >= 512 * MiB else 512
    vocab = 4096
    per_block = (8 * dim * dim + 7 * dim) * 12
    blocks = max(1, round((total_bytes - vocab * dim * 12) / per_block))
    return vocab, dim, blocks


def _build(total_bytes: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = _Model(*_shape(total_bytes))
    for b in model.blocks:
        fully_shard(b)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        x = torch.randint(0, 4096, (1, 8))
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return time.perf_counter() - t0


def _local_nbytes(obj: Any) -> int:
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return obj.to_local().numel() * obj.element_size()
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_local_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_local_nbytes(v) for v in obj)
    return 0


def _to_local(obj: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return obj.to_local()
    if isinstance(obj, dict):
        return {k: _to_local(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_local(v) for v in obj]
    return obj


def _arms(root: Path, budget: int, nice: dict) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """(name, start(model, opt, state, step) -> wait()) for every arm, and what they hold."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    from trainkit.checkpoint import Checkpointer, LazyStager, ZarrWriter

    pg = dist.new_group(backend="gloo")
    held: dict[str, Any] = {}

    def trainkit_lazy(model, opt, state, step):
        ck = held.setdefault("ck", Checkpointer(root / "trainkit", timeout=600,
                                                    **nice))
        ck.attach(opt)
        h = ck.save(step, state)
        return h.result

    def dcp_default(model, opt, state, step):
        stager = held.setdefault("default", DefaultStager(StagingOptions(False, False, True,
                                                                         False)))
        r = dcp.async_save(state, storage_writer=FileSystemWriter(str(root / f"fs_{step}")),
                           async_stager=stager, process_group=pg)
        return r.upload_completion.result

    def dcp_lazy(model, opt, state, step):
        stager = held.setdefault("lazy", LazyStager(opt))
        r = dcp.async_save(state, storage_writer=ZarrWriter(root / "zarr", step=step),
                           async_stager=stager, process_group=pg)
        return r.upload_completion.result

    def dcp_save(model, opt, state, step):
        dcp.save(state, storage_writer=FileSystemWriter(str(root / f"sync_{step}")),
                 process_group=pg)
        return lambda: None

    def trainkit_budget(model, opt, state, step):
        ck = held.setdefault("budget", Checkpointer(root / "budget", timeout=600,
                                                    chunk_bytes=MiB,
                                                    host_budget_bytes=budget, **nice))
        h = ck.save(step, _to_local(state), replicated=False)
        held["budget_stats"] = ck.stats
        return h.result

    arms = [("trainkit lazy", trainkit_lazy),
            ("dcp.async_save DefaultStager(async) -> FileSystemWriter", dcp_default),
            ("dcp.async_save LazyStager -> ZarrWriter", dcp_lazy),
            ("dcp.save -> FileSystemWriter", dcp_save),
            (f"trainkit, host_budget_bytes={budget // MiB} MiB (local shards, eager)",
             trainkit_budget)]
    return arms, held


def _hook_wait(held: dict[str, Any]) -> float:
    """Seconds the arms' optimizer pre-hooks have waited for lazy copies, so far."""
    return sum(held[k].stats["hook_wait_s"] for k in ("ck", "budget", "lazy") if k in held)


def _init_rank(rank: int, world: int, port: int) -> Any:
    """A rank process: its environment, one intra-op thread, the gloo group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return dist


def _save_rank(rank: int, world: int, port: int, root: str, total: int, budget: int,
               rounds: int, nice: dict, queue: Any) -> None:
    try:
        dist = _init_rank(rank, world, port)
        from checkpoint_bench import PeakRSS
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, opt = _build(total, 0)
        _train(model, opt, 1)
        arms, held = _arms(Path(root), budget, nice)
        rows: list[list[dict]] = [[] for _ in arms]     # per arm, one row per round
        for rnd in range(rounds):
            for k in range(len(arms)):
                i = (k + rnd) % len(arms)           # rotate the order every round
                name, start = arms[i]
                step = rnd * len(arms) + i
                dist.barrier()
                c0 = time.process_time()
                with PeakRSS() as train_rss:
                    base = _train(model, opt, STEPS_AFTER)
                cpu_base = time.process_time() - c0
                model_sd, optim_sd = get_state_dict(model, opt)
                state = {"model": model_sd, "optim": optim_sd}
                row: dict[str, Any] = {"arm": name, "state_bytes": _local_nbytes(state),
                                       "step": step}
                hooked0 = _hook_wait(held)
                with PeakRSS() as rss:
                    c0, t0 = time.process_time(), time.perf_counter()
                    wait = start(model, opt, state, step)
                    blocked = time.perf_counter() - t0
                    after = _train(model, opt, STEPS_AFTER)
                    loop = time.perf_counter() - t0
                    cpu_loop = time.process_time() - c0
                    wait()
                    durable = time.perf_counter() - t0
                    cpu_total = time.process_time() - c0
                hooked = _hook_wait(held) - hooked0
                train_extra = train_rss.peak - train_rss.base
                row.update(blocked_s=blocked, loop_cost_s=loop - base, durable_s=durable,
                           thread_s=blocked + hooked, hook_wait_s=hooked,
                           ckpt_cpu_loop_s=cpu_loop - cpu_base,
                           ckpt_cpu_s=cpu_total - cpu_base,
                           steps_s=base, after_s=after, peak_extra=rss.peak - rss.base,
                           train_extra=train_extra,
                           own_extra=max(0, rss.peak - rss.base - train_extra))
                if "budget_stats" in held and name.startswith("trainkit, host"):
                    row["buffer_peak"] = held["budget_stats"].get("host_buffer_peak_bytes")
                    row["waves"] = held["budget_stats"].get("waves")
                    row["buffer_held"] = held["budget_stats"].get("host_buffer_bytes")
                rows[i].append(row)
                del state, model_sd, optim_sd
                if rnd < rounds - 1 and rank == 0:      # keep only the last round's DCP dirs
                    for pre in ("fs_", "sync_"):
                        shutil.rmtree(Path(root) / f"{pre}{step}", ignore_errors=True)
        for key in ("ck", "budget"):
            if key in held:
                held[key].close(persist_last=False)
        for key in ("lazy", "default"):
            if key in held:
                held[key].close()
        queue.put((rank, True, rows))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        queue.put((rank, False, traceback.format_exc()))


def _restore_rank(rank: int, world: int, port: int, root: str, total: int, steps: dict,
                  rounds: int, queue: Any) -> None:
    try:
        dist = _init_rank(rank, world, port)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from checkpoint_tiers import drop_cache, files_under
        from trainkit.checkpoint import Checkpointer, ZarrReader

        model, opt = _build(total, 1)
        _train(model, opt, 1)
        out: dict[str, list[float]] = {}
        r = Path(root)
        ck = Checkpointer(r / "trainkit", timeout=600)
        loads = [("dcp.load <- FileSystemReader", r / f"fs_{steps['fs']}",
                  lambda s: dcp.load(s, storage_reader=FileSystemReader(
                      str(r / f"fs_{steps['fs']}")))),
                 ("dcp.load <- ZarrReader (checksums)", r / "zarr",
                  lambda s: dcp.load(s, storage_reader=ZarrReader(
                      r / "zarr", step=steps["zarr"], allow_pickle=True))),
                 ("Checkpointer.load(into=)", r / "trainkit",
                  lambda s: ck.load(steps["trainkit"], into=s))]
        for rnd in range(rounds):
            for k in range(len(loads)):
                name, files_root, load = loads[(k + rnd) % len(loads)]
                if rank == 0:
                    drop_cache(files_under(files_root))
                dist.barrier()
                m_sd, o_sd = get_state_dict(model, opt)
                t0 = time.perf_counter()
                load({"model": m_sd, "optim": o_sd})
                dist.barrier()
                out.setdefault(name, []).append(time.perf_counter() - t0)
        ck.close(persist_last=False)
        queue.put((rank, True, out))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        queue.put((rank, False, traceback.format_exc()))


def _spawn(target: Any, world: int, *args: Any, timeout: float = 3000) -> dict[int, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, queue), daemon=False)
             for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world:
            rank, ok, payload = queue.get(timeout=max(1.0, deadline - time.monotonic()))
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            got[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return got


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def run(scale: float, root: Path, budget: int | None = None, *, rounds: int = 3,
        background_nice: int | None = None) -> dict:
    """Save arms on 4 ranks, then restores on 2; ``rounds`` (>= 2) of each, the first a
    warm-up. Figures: the median over the measured rounds of the slowest rank's.
    ``background_nice``: the trainkit arms' ``Checkpointer(background_nice=)`` (None:
    its default)."""
    if rounds < 2:
        raise ValueError(f"--rounds must be at least 2 (the first is a warm-up), got {rounds}")
    total = int(1024 * MiB / scale)
    budget = budget or max(4 * MiB, total // 4 // 8)        # 1/8 of a rank's state
    root.mkdir(parents=True, exist_ok=True)
    nice = {} if background_nice is None else {"background_nice": background_nice}
    per_rank = _spawn(_save_rank, 4, str(root), total, budget, rounds, nice)
    keys = ("blocked_s", "loop_cost_s", "durable_s", "peak_extra", "train_extra",
            "own_extra", "buffer_peak", "thread_s", "hook_wait_s", "ckpt_cpu_loop_s",
            "ckpt_cpu_s")
    rows = []
    for i, arm_rows in enumerate(per_rank[0]):
        measured = []
        for rnd in range(1, rounds):
            worst = dict(arm_rows[rnd])
            for k in keys:
                vals = [r[i][rnd][k] for r in per_rank.values() if r[i][rnd].get(k) is not None]
                if vals:
                    worst[k] = max(vals)
            measured.append(worst)
        row = dict(measured[-1])
        for k in keys:
            if measured[0].get(k) is not None:
                row[k] = _median([m[k] for m in measured])
        row["rounds"] = {k: [m[k] for m in measured] for k in ("loop_cost_s", "own_extra")}
        # the first save allocates the reused host buffer: its own rise is the full peak
        row["first_own_extra"] = max(r[i][0]["own_extra"] for r in per_rank.values())
        held = [r[i][-1].get("buffer_held") for r in per_rank.values()]
        if None not in held:
            row["buffer_held"] = max(held)
        rows.append(row)
    last = {r["arm"]: r["step"] for r in rows}
    steps = {"fs": next(v for k, v in last.items() if "DefaultStager" in k),
             "zarr": next(v for k, v in last.items() if "LazyStager" in k),
             "trainkit": last["trainkit lazy"]}
    restore = _spawn(_restore_rank, 2, str(root), total, steps, rounds)
    times = {}
    for name in restore[0]:
        worst = [max(r[name][j] for r in restore.values()) for j in range(rounds)]
        times[name] = {"median": _median(worst[1:]), "rounds": worst[1:]}
    return {"total_bytes": total, "budget": budget, "model": _shape(total), "rows": rows,
            "restore_4_to_2": times, "rounds": rounds, "background_nice": background_nice}


def report(res: dict) -> str:
    vocab, dim, blocks = res["model"]
    n = res["rounds"] - 1
    out = [f"FSDP2, 4 gloo ranks, {res['total_bytes'] / MiB:.0f} MiB of parameters + AdamW "
           f"state (vocab {vocab}, dim {dim}, {blocks} blocks); median of {n} measured "
           f"round(s) after a warm-up, the slowest rank per round; trainkit background_nice="
           f"{'default' if res.get('background_nice') is None else res['background_nice']}",
           "", "| arm | blocked (ms) | on the training thread (ms) | loop cost / ckpt (ms) "
           "| % of dcp.save | ckpt CPU in the loop window / all (ms per rank) | durable (s) "
           "| peak extra RSS / rank state | ckpt's own extra RSS (MiB) |",
           "|---|---|---|---|---|---|---|---|---|"]
    ref = next((r for r in res["rows"] if r["arm"].startswith("dcp.save")), None)
    for r in res["rows"]:
        pct = "" if ref is None else f"{100 * r['loop_cost_s'] / ref['loop_cost_s']:.1f}%"
        out.append(f"| {r['arm']} | {1000 * r['blocked_s']:.0f} "
                   f"| {1000 * r.get('thread_s', r['blocked_s']):.0f} "
                   f"| {1000 * r['loop_cost_s']:.0f} | {pct} "
                   f"| {1000 * r.get('ckpt_cpu_loop_s', float('nan')):.0f} / "
                   f"{1000 * r.get('ckpt_cpu_s', float('nan')):.0f} "
                   f"| {r['durable_s']:.2f} | {r['peak_extra'] / r['state_bytes']:.2f}x "
                   f"| {r['own_extra'] / MiB:.1f} |")
    out += ["", "loop cost per round (ms): " + "; ".join(
        f"{r['arm'].split(' (')[0].split(' ->')[0]}: "
        + ", ".join(f"{1000 * x:.0f}" for x in r["rounds"]["loop_cost_s"]) for r in res["rows"])]
    budget_row = next((r for r in res["rows"] if "buffer_peak" in r), None)
    if budget_row is not None:
        own, b = budget_row["own_extra"], res["budget"]
        held = budget_row.get("buffer_held") or 0
        first = budget_row["first_own_extra"]
        out += ["", f"host budget {b / MiB:.1f} MiB per rank, rank state "
                    f"{budget_row['state_bytes'] / MiB:.1f} MiB, {budget_row['waves']} waves: "
                    f"snapshot buffer peak {budget_row['buffer_peak'] / MiB:.2f} MiB "
                    f"({budget_row['buffer_peak'] / b:.2f}x the budget). The checkpoint's own "
                    f"extra RSS (save window minus the same steps without a save): "
                    f"{first / MiB:.1f} MiB at the first save, which allocates the reused "
                    f"buffer ({first / b:.2f}x the budget); at later saves "
                    f"{own / MiB:.1f} MiB on top of the {held / MiB:.1f} MiB buffer it "
                    f"keeps, {(own + held) / MiB:.1f} MiB in all ({(own + held) / b:.2f}x; "
                    f"per round: " + ", ".join(f"{(x + held) / b:.2f}x"
                                               for x in budget_row["rounds"]["own_extra"])
                    + f"). The total RSS rise in the save window, "
                    f"{budget_row['peak_extra'] / MiB:.1f} MiB ({budget_row['peak_extra'] / b:.2f}x), "
                    f"includes {budget_row['train_extra'] / MiB:.1f} MiB for the training steps"]
    out += ["", "restore of the 4-rank steps on 2 ranks (FSDP2, resharded, page cache "
                "dropped), median of the measured rounds:"]
    dcp_t = res["restore_4_to_2"]["dcp.load <- FileSystemReader"]["median"]
    for k, v in res["restore_4_to_2"].items():
        rounds = ", ".join(f"{x:.2f}" for x in v["rounds"])
        out.append(f"- {k}: {v['median']:.2f} s ({v['median'] / dcp_t:.2f}x dcp.load; "
                   f"rounds {rounds})")
    return "\n".join(out)
