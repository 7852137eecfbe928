"""The multi-level part of the checkpoint benchmark (issue #3), run by
``benchmarks/checkpoint_bench.py --parts tiers`` or on its own:

    .venv/bin/python benchmarks/checkpoint_tiers.py            # 1 GiB replicated state
    .venv/bin/python benchmarks/checkpoint_tiers.py --quick    # 128 MiB

1. **Persistence of a replicated state from 1, 2 and 4 ranks.** Real gloo ranks, every
   one holding the same state (64 tensors, plus a per-rank RNG state), saving to a
   memory tier and then down to the persistent directory. Measured per rank: the
   bytes it wrote to the persistent tier, and the time from the commit in memory to the
   commit on the persistent tier. The in-run baseline is the same ranks with
   ``replicated=False`` (every rank writes its full copy). All ranks share this
   machine's one disk, so total bytes, not per-rank bandwidth, bound the time here; on a
   cluster each node brings its own bandwidth.
2. **Restore of a 1-rank state from each tier** (memory in /dev/shm, node-local disk,
   persistent directory; page cache dropped before reading from disk), against
   ``dcp.load`` of the same state from a FileSystemWriter checkpoint (page cache dropped
   too). Local and persistent are the same disk here.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MiB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(total: int, rank: int) -> dict:
    g = torch.Generator().manual_seed(0)
    n = 64
    per = total // n // 4
    return {"model": {f"w{i}": torch.randn(per, generator=g) for i in range(n)},
            "rng": torch.Generator().manual_seed(rank).get_state()}


def _rank_dir_bytes(step_dir: Path, rank: int) -> int:
    d = step_dir / f"rank_{rank:05d}" / "data" / "c"
    return sum(f.stat().st_size for f in d.iterdir()) if d.is_dir() else 0


def _persist_rank(rank: int, world: int, port: int, root: str, total: int, replicated: bool,
                  reps: int, out: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from trainkit.checkpoint import Checkpointer

    dist.init_process_group("gloo", rank=rank, world_size=world)
    state = _state(total, rank)
    rows = []
    with Checkpointer(os.path.join(root, "p"), keep_in_memory=1,
                      memory_dir=os.path.join(root, f"m{rank}"), timeout=120) as ck:
        for step in range(1, reps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            ck.save(step, state, replicated=replicated).result(timeout=600)
            t1 = time.perf_counter()
            ck.wait()
            t2 = time.perf_counter()
            dist.barrier()
            rows.append({"first_tier_s": t1 - t0, "persist_s": t2 - t1,
                         "bytes": _rank_dir_bytes(Path(root, "p", f"step_{step:010d}"), rank)})
    dist.destroy_process_group()
    out.put((rank, rows))


def persistence(total: int, worlds: list[int], reps: int, root: Path) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = []
    for world in worlds:
        for replicated in ([True, False] if world > 1 else [True]):
            d = root / f"persist_{world}_{int(replicated)}"
            d.mkdir(parents=True)
            q: mp.Queue = ctx.Queue()
            port = _free_port()
            procs = [ctx.Process(target=_persist_rank,
                                 args=(r, world, port, str(d), total, replicated, reps, q))
                     for r in range(world)]
            for p in procs:
                p.start()
            got = dict(q.get(timeout=1800) for _ in procs)
            for p in procs:
                p.join(60)
            per_rank_bytes = [statistics.median(r["bytes"] for r in got[k]) for k in sorted(got)]
            results.append({
                "world": world, "dedupe": replicated,
                "state_bytes": total,
                "bytes_per_rank": per_rank_bytes,
                "bytes_total": sum(per_rank_bytes),
                "persist_s": statistics.median(max(got[k][i]["persist_s"] for k in got)
                                               for i in range(reps)),
                "first_tier_s": statistics.median(max(got[k][i]["first_tier_s"] for k in got)
                                                  for i in range(reps)),
            })
            shutil.rmtree(d, ignore_errors=True)
    base = next(r for r in results if r["world"] == 1)
    for r in results:
        r["bytes_per_rank_vs_1"] = max(r["bytes_per_rank"]) / base["bytes_total"]
        r["persist_vs_1"] = r["persist_s"] / base["persist_s"]
    return results


def drop_cache(paths: list[Path]) -> None:
    """Drop the page cache of ``paths`` (fsync first), so a read comes from the disk.
    Shared with ``checkpoint_bench.py``."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_under(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.is_file()]


def restore(total: int, reps: int, root: Path) -> dict:
    import torch.distributed.checkpoint as dcp

    from trainkit.checkpoint import Checkpointer
    from trainkit.checkpoint.reader import load_shard
    from trainkit.checkpoint.tiers import LocalTier

    state = _state(total, 0)
    mem = Path(tempfile.mkdtemp(prefix="trainkit-bench-", dir="/dev/shm"))
    try:
        with Checkpointer(root / "p", local_dir=root / "l", keep_in_memory=1,
                          memory_dir=mem) as ck:
            ck.save(1, state).result()
            ck.wait()
            tiers = ck.tiers(1)
        assert tiers == ["memory", "local", "persistent"], tiers
        dcp.save({"model": state["model"]}, checkpoint_id=str(root / "dcp"))
        target = {"model": {k: torch.empty_like(v) for k, v in state["model"].items()}}
        times: dict[str, list[float]] = {"memory": [], "local": [], "persistent": [],
                                         "dcp.load": []}
        where = {"memory": mem, "local": root / "l", "persistent": root / "p"}
        for _ in range(reps):
            for name, d in where.items():
                if name != "memory":
                    drop_cache(files_under(Path(d)))
                t0 = time.perf_counter()
                got = load_shard(LocalTier(str(d), name=name), 1, 0)
                times[name].append(time.perf_counter() - t0)
                assert torch.equal(got["model"]["w3"], state["model"]["w3"])
                del got
            drop_cache(files_under(root / "dcp"))
            t0 = time.perf_counter()
            dcp.load(target, checkpoint_id=str(root / "dcp"))
            times["dcp.load"].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        return {"state_bytes": total, "seconds": med,
                "vs_dcp_load": {k: med["dcp.load"] / v for k, v in med.items()}}
    finally:
        shutil.rmtree(mem, ignore_errors=True)


def run(quick: bool, root: Path, worlds: list[int] | None = None) -> dict:
    total = (128 if quick else 1024) * MiB
    reps = 2 if quick else 3
    return {"persistence": persistence(total, worlds or [1, 2, 4], reps, root / "persist"),
            "restore": restore(total, reps, root / "restore")}


def report(res: dict) -> str:
    lines = ["persistence of a replicated state (memory tier -> persistent):",
             f"{'ranks':>5} {'dedupe':>6} {'MiB/rank (max)':>15} {'MiB total':>10} "
             f"{'per-rank bytes vs 1 rank':>25} {'persist s':>10} {'vs 1 rank':>9}"]
    for r in res["persistence"]:
        lines.append(f"{r['world']:>5} {str(r['dedupe']):>6} "
                     f"{max(r['bytes_per_rank']) / MiB:>15.1f} {r['bytes_total'] / MiB:>10.1f} "
                     f"{r['bytes_per_rank_vs_1']:>25.2f} {r['persist_s']:>10.2f} "
                     f"{r['persist_vs_1']:>9.2f}")
    rs = res["restore"]
    lines.append(f"restore of {rs['state_bytes'] / MiB:.0f} MiB (1 rank), seconds, and speed-up "
                 f"over dcp.load:")
    for k, v in rs["seconds"].items():
        lines.append(f"  {k:<11} {v:7.3f} s   {rs['vs_dcp_load'][k]:5.2f}x")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--json", default=None)
    p.add_argument("--dir", default=None)
    args = p.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="trainkit-tiers-"))
    try:
        res = run(args.quick, root, [int(x) for x in args.worlds.split(",")])
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
