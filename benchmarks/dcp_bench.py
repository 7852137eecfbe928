"""DCP interoperability benchmark: ZarrWriter/ZarrReader against DCP's own FileSystem
storage, in one run, plus ``import-dcp`` and ``export`` throughput and memory.

    .venv/bin/python benchmarks/dcp_bench.py              # 2 states x 256 MiB, 5 rounds
    .venv/bin/python benchmarks/dcp_bench.py --quick      # 2 states x 32 MiB, 3 rounds

Two states: "big" (tensors of 16 MiB) and "small" (tensors of 256 KiB), float32, in one
process (DCP without a process group). Per round, interleaved A/B:

* save: ``dcp.save`` with ``FileSystemWriter`` (fsyncs its files) against
  ``ZarrWriter`` (fsyncs chunks, metadata and directories, CRC-32 of every byte);
* load: ``dcp.load`` with ``FileSystemReader`` against ``ZarrReader`` (checks every
  byte's CRC), the page cache of both checkpoints dropped first (posix_fadvise
  DONTNEED), so both read from the device.

Reported: medians, and the median of per-round ratios (DCP time / trainkit time:
above 1 means trainkit is faster). ``import-dcp`` and ``export`` run in a fresh
subprocess each, which reports its peak RSS; the same subprocess's RSS after imports
(torch, trainkit) is subtracted, so the figure is what the operation itself held.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from trainkit.checkpoint import ZarrReader, ZarrWriter  # noqa: E402

MiB = 1 << 20
warnings.filterwarnings("ignore")


def make_state(total_mib: int, tensor_kib: int) -> dict:
    n = max(1, total_mib * 1024 // tensor_kib)
    numel = tensor_kib * 1024 // 4
    g = torch.Generator().manual_seed(0)
    return {"model": {f"layer{i}.weight": torch.randn(numel, generator=g) for i in range(n)},
            "step": 1000}


def drop_cache(path: Path) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def empty_like(state: dict) -> dict:
    return {"model": {k: torch.empty_like(v) for k, v in state["model"].items()}, "step": None}


_CHILD = r"""
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
from trainkit.checkpoint.interop.dcp_import import import_dcp
from trainkit.checkpoint.interop.export import export_safetensors
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
base = rss()
op, a, b = sys.argv[1:4]
t0 = time.perf_counter()
if op == "import":
    import_dcp(a, b, step=0)
else:
    export_safetensors(a, 0, b, prefix="model.")
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "peak_extra": rss() - base}))
"""


def child(op: str, a: Path, b: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", _CHILD, op, str(a), str(b)], env=env,
                         capture_output=True, text=True, timeout=900, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_state(name: str, state: dict, rounds: int, work: Path) -> dict:
    nbytes = sum(t.numel() * t.element_size() for t in state["model"].values())
    save_fs, save_z, load_fs, load_z, r_save, r_load = [], [], [], [], [], []
    for r in range(rounds):
        fs_dir, z_dir = work / f"{name}_fs{r}", work / f"{name}_z{r}"
        pair = [("fs", lambda: dcp.save(state, storage_writer=FileSystemWriter(fs_dir))),
                ("z", lambda: dcp.save(state, storage_writer=ZarrWriter(z_dir, step=0)))]
        if r % 2:
            pair.reverse()
        t = {k: timed(fn) for k, fn in pair}
        save_fs.append(t["fs"])
        save_z.append(t["z"])
        r_save.append(t["fs"] / t["z"])
        tgt_fs, tgt_z = empty_like(state), empty_like(state)
        drop_cache(fs_dir)
        drop_cache(z_dir)
        pair = [("fs", lambda: dcp.load(tgt_fs, storage_reader=FileSystemReader(fs_dir))),
                ("z", lambda: dcp.load(tgt_z, storage_reader=ZarrReader(z_dir, step=0, allow_pickle=True)))]
        if r % 2:
            pair.reverse()
        t = {k: timed(fn) for k, fn in pair}
        load_fs.append(t["fs"])
        load_z.append(t["z"])
        r_load.append(t["fs"] / t["z"])
        first = next(iter(state["model"]))
        assert torch.equal(tgt_z["model"][first], state["model"][first])
        assert tgt_z["step"] == 1000
        if r:                                     # keep round 0 for import/export
            shutil.rmtree(fs_dir)
            shutil.rmtree(z_dir)
    med = statistics.median
    imp = child("import", work / f"{name}_fs0", work / f"{name}_imported")
    exp = child("export", work / f"{name}_z0", work / f"{name}_export")
    return {
        "state": name, "MiB": nbytes / MiB, "tensors": len(state["model"]),
        "dcp_save_s": med(save_fs), "zarr_save_s": med(save_z), "save_ratio": med(r_save),
        "dcp_load_s": med(load_fs), "zarr_load_s": med(load_z), "load_ratio": med(r_load),
        "import_s": imp["seconds"], "import_MiBps": nbytes / MiB / imp["seconds"],
        "import_peak_extra_MiB": imp["peak_extra"] / MiB,
        "export_s": exp["seconds"], "export_MiBps": nbytes / MiB / exp["seconds"],
        "export_peak_extra_MiB": exp["peak_extra"] / MiB,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 x 32 MiB states, 3 rounds")
    ap.add_argument("--mib", type=int, default=None, help="state size in MiB (default 256)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    mib = args.mib or (32 if args.quick else 256)
    rounds = args.rounds or (3 if args.quick else 5)
    work = Path(tempfile.mkdtemp(prefix="dcp_bench_", dir=args.dir))
    try:
        rows = [bench_state("big", make_state(mib, 16 * 1024), rounds, work),
                bench_state("small", make_state(mib, 256), rounds, work)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{mib} MiB per state, {rounds} interleaved rounds, medians; ratio = DCP / trainkit")
    print("| state | dcp.save FS (s) | dcp.save Zarr (s) | save ratio | dcp.load FS (s) | "
          "dcp.load Zarr (s) | load ratio | import-dcp MiB/s | import peak extra MiB | "
          "export MiB/s | export peak extra MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['state']} ({r['tensors']} x {r['MiB'] / r['tensors']:.2f} MiB) | "
              f"{r['dcp_save_s']:.2f} | {r['zarr_save_s']:.2f} | {r['save_ratio']:.2f} | "
              f"{r['dcp_load_s']:.2f} | {r['zarr_load_s']:.2f} | {r['load_ratio']:.2f} | "
              f"{r['import_MiBps']:.0f} | {r['import_peak_extra_MiB']:.0f} | "
              f"{r['export_MiBps']:.0f} | {r['export_peak_extra_MiB']:.0f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"mib": mib, "rounds": rounds, "rows": rows},
                                              indent=1))


if __name__ == "__main__":
    main()
