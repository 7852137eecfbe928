"""Micro-benchmark: the per-collective cost of trainkit.detect's recording wrapper.

Gloo ranks issue N small allreduces (``work.wait()`` after each), in
interleaved blocks on the raw group and on the monitored wrapper (connected to a
real aggregator, so the side channel's cost is included). Reported: median
microseconds per collective for each arm and their difference, medians over
blocks, in ABBA order so drift on a shared machine cancels; and the CPU time of
all the ranks' threads per collective.

    python benchmarks/detect_micro.py --ranks 1    # the wrapper's own cost, no network
    python benchmarks/detect_micro.py              # 2 ranks, 20 blocks x 200 calls
    python benchmarks/detect_micro.py --quick
    python benchmarks/detect_micro.py --profile    # cProfile of rank 0's wrapped calls

With ``--ranks 1`` the collective still goes through gloo's worker thread and
its future, so the recording, the completion stamp and their GIL hand-offs are
all measured, while the network's latency (which on a loaded 2-core machine
swamps a few microseconds) is not. With 2 ranks gloo busy-polls while it waits
for the peer, so the CPU figure there scales with latency.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainkit.detect.drill import free_port  # noqa: E402



def worker(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=20)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--numel", type=int, default=256)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args(argv)
    import torch
    import torch.distributed as dist

    from trainkit.detect import CollectiveMonitor

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mon = CollectiveMonitor(run_dir=a.run_dir, hang_timeout=60.0, wrap_default=False,
                            link_probe=False).start()
    raw = dist.distributed_c10d._get_default_group()
    wrapped = mon.wrap(raw)
    t = torch.ones(a.numel)
    arms = {"off": raw, "on": wrapped}
    per_call: dict[str, list[float]] = {"off": [], "on": []}
    cpu_call: dict[str, list[float]] = {"off": [], "on": []}   # this process, all threads
    for _ in range(20):                      # warm both paths
        for pg in arms.values():
            pg.allreduce([t]).wait()
    prof = cProfile.Profile() if a.profile else None
    for block in range(2 * a.blocks):
        name = ("on", "off")[(block + block // 2) % 2]        # ABBA
        pg = arms[name]
        raw.barrier().wait()
        if prof is not None and name == "on":
            prof.enable()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(a.calls):
            pg.allreduce([t]).wait()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if prof is not None and name == "on":
            prof.disable()
        per_call[name].append(dt / a.calls)
        cpu_call[name].append(dc / a.calls)
    mon.close()
    cpus: list = [None] * dist.get_world_size()
    dist.all_gather_object(cpus, cpu_call, group=raw)
    if rank == 0:
        if prof is not None:
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
            print(out.getvalue(), flush=True)
        # CPU per call summed over ranks, block by block, then the median over blocks.
        per_call["cpu_on"] = [sum(c["on"][i] for c in cpus) for i in range(len(cpus[0]["on"]))]
        per_call["cpu_off"] = [sum(c["off"][i] for c in cpus) for i in range(len(cpus[0]["off"]))]
        print("RESULT " + json.dumps(per_call), flush=True)
    dist.destroy_process_group()
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=20)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--numel", type=int, default=256, help="float32 elements per allreduce")
    ap.add_argument("--quick", action="store_true", help="6 blocks x 100 calls")
    ap.add_argument("--profile", action="store_true", help="print rank 0's cProfile of 'on'")
    ap.add_argument("--ranks", type=int, default=2, choices=(1, 2, 4))
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.blocks, args.calls = 6, 100
    port = free_port()
    run_dir = tempfile.mkdtemp(prefix="detect-micro-")
    procs = []
    world = args.ranks
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(REPO))
        cmd = [sys.executable, __file__, "--worker", "--blocks", str(args.blocks), "--calls",
               str(args.calls), "--numel", str(args.numel), "--run-dir", run_dir]
        if args.profile:
            cmd.append("--profile")
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    line = next((ln for ln in outs[0].splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        print(outs[0][-3000:], file=sys.stderr)
        return 1
    if args.profile:
        print(outs[0].split("RESULT ")[0])
    per_call = json.loads(line[7:])
    on, off = statistics.median(per_call["on"]), statistics.median(per_call["off"])
    con, coff = statistics.median(per_call["cpu_on"]), statistics.median(per_call["cpu_off"])
    res = {"ranks": world, "numel": args.numel, "blocks": args.blocks, "calls": args.calls,
           "on_us": on * 1e6, "off_us": off * 1e6, "added_us": (on - off) * 1e6,
           "cpu_on_us": con * 1e6, "cpu_off_us": coff * 1e6, "cpu_added_us": (con - coff) * 1e6}
    print(f"per allreduce ({args.numel * 4} B, {world} gloo rank(s)), medians of {args.blocks} "
          f"blocks x {args.calls} calls each, ABBA:\n"
          f"  wall: off {res['off_us']:.1f} us, on {res['on_us']:.1f} us, "
          f"added {res['added_us']:+.1f} us\n"
          f"  CPU (both ranks, all threads): off {res['cpu_off_us']:.1f} us, "
          f"on {res['cpu_on_us']:.1f} us, added {res['cpu_added_us']:+.1f} us")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
