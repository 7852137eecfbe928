"""Restore from an S3-compatible object store against restore from local disk, in one run.

    .venv/bin/python benchmarks/s3_restore_bench.py            # 256 MiB, 5 rounds
    .venv/bin/python benchmarks/s3_restore_bench.py --quick    # 64 MiB, 3 rounds
    .venv/bin/python benchmarks/s3_restore_bench.py --json out.json

One single-rank state (float32 tensors of 16 MiB) is saved once with ``Checkpointer`` to
a local directory and once to ``s3://`` on moto's S3 server (its own process, loopback,
started here exactly as the tests start it: ``tests/s3server.py``). Then, interleaved
round by round (local cold, local warm, S3), a fresh ``Checkpointer`` restores the
newest step; the checksums are verified on every load, as always. Local "cold" drops
the checkpoint files from the page cache first (posix_fadvise DONTNEED); "warm" does not.
Reported: median seconds and GiB/s per source, and the median of the per-round ratios
(S3 time / local time).

What this measures: the client path (s3fs, aiobotocore, ranged GETs from 4 threads) plus
a Python S3 server on the same machine. It is not a network benchmark: a real object
store adds network bandwidth and latency, and serves many clients in parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from s3server import MotoServer  # noqa: E402
from trainkit.checkpoint import Checkpointer  # noqa: E402

MiB = 1 << 20


def make_state(total_mib: int) -> dict:
    """``total_mib`` MiB of float32 in 16 MiB tensors, plus a few plain values."""
    g = torch.Generator().manual_seed(0)
    n = max(1, total_mib // 16)
    return {"model": {f"layer{i}.weight": torch.randn(4 * MiB, generator=g) for i in range(n)},
            "step": 100, "data": {"epoch": 2, "offset": 12345}}


def evict(directory: str) -> None:
    """Drop every file under ``directory`` from the page cache."""
    for base, _, names in os.walk(directory):
        for name in names:
            fd = os.open(os.path.join(base, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed_restore(path: str, options: dict | None, expect: dict) -> float:
    with Checkpointer(path, storage_options=options) as ck:
        t0 = time.perf_counter()
        out = ck.load()
        elapsed = time.perf_counter() - t0
    for k, v in expect["model"].items():
        if not torch.equal(out["model"][k], v):
            raise AssertionError(f"{path}: {k} differs after restore")
    return elapsed


def timed_save(path: str, options: dict | None, state: dict) -> float:
    with Checkpointer(path, storage_options=options) as ck:
        t0 = time.perf_counter()
        ck.save(100, state).result(timeout=600)
        return time.perf_counter() - t0


def run(total_mib: int, rounds: int) -> dict:
    state = make_state(total_mib)
    nbytes = sum(t.numel() * t.element_size() for t in state["model"].values())
    results: dict = {"state_mib": nbytes / MiB, "rounds": rounds,
                     "times": {"local_cold": [], "local_warm": [], "s3": []}}
    with tempfile.TemporaryDirectory(prefix="tk-s3-bench-") as tmp, MotoServer() as server:
        server.create_bucket("bench")
        options = server.storage_options()
        local, remote = os.path.join(tmp, "ck"), "s3://bench/run1"
        results["save_s"] = {"local": timed_save(local, None, state),
                             "s3": timed_save(remote, options, state)}
        timed_restore(remote, options, state)                  # warm up the S3 client once
        times = results["times"]
        for r in range(rounds):
            evict(local)
            times["local_cold"].append(timed_restore(local, None, state))
            times["local_warm"].append(timed_restore(local, None, state))
            times["s3"].append(timed_restore(remote, options, state))
            print(f"round {r + 1}/{rounds}: " + ", ".join(
                f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    gib = nbytes / (1 << 30)
    results["median_s"] = {k: statistics.median(v) for k, v in times.items()}
    results["gib_per_s"] = {k: gib / v for k, v in results["median_s"].items()}
    results["ratio_s3_over"] = {
        base: statistics.median(s / b for s, b in zip(times["s3"], times[base]))
        for base in ("local_cold", "local_warm")}
    return results


def markdown(res: dict) -> str:
    m, rate = res["median_s"], res["gib_per_s"]
    lines = [f"state: {res['state_mib']:.0f} MiB, one rank; {res['rounds']} interleaved rounds; "
             f"medians",
             "",
             "| restore from | time (s) | GiB/s | S3 time / this |",
             "|---|---|---|---|",
             f"| local disk, page cache dropped | {m['local_cold']:.3f} | "
             f"{rate['local_cold']:.2f} | {res['ratio_s3_over']['local_cold']:.2f}x |",
             f"| local disk, page cache warm | {m['local_warm']:.3f} | "
             f"{rate['local_warm']:.2f} | {res['ratio_s3_over']['local_warm']:.2f}x |",
             f"| S3 (moto on loopback) | {m['s3']:.3f} | {rate['s3']:.2f} | 1.00x |",
             "",
             f"save (one each, call to committed): local {res['save_s']['local']:.2f} s, "
             f"S3 {res['save_s']['s3']:.2f} s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB, 3 rounds")
    ap.add_argument("--mib", type=int, default=None, help="state size in MiB (default 256)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    mib = args.mib or (64 if args.quick else 256)
    rounds = args.rounds or (3 if args.quick else 5)
    res = run(mib, rounds)
    print(markdown(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
