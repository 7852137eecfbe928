"""``trainkit run [trainkit options] -- [torchrun options] train.py [args]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run", help="torchrun wrapper that detects, isolates, restarts and resumes",
        description="Run a training script under the real torchrun, with anomaly detection, "
                    "node isolation, restarts and resume. Everything after `--` is torchrun's "
                    "(options, then the script and its arguments).",
        usage="trainkit run [options] -- [torchrun options] train.py [args]")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="where events.jsonl, diagnosis.jsonl and logs go (default: "
                        "runs/trainkit-run, or runs/drill-<time> with --drill)")
    p.add_argument("--coordinator", action="store_true",
                   help="this host runs the aggregator and the decisions (multi-host jobs); "
                        "implied when no --rdzv-endpoint is given")
    p.add_argument("--node-id", help="stable name of this node (default: hostname; node0 with "
                                     "--local-nodes)")
    p.add_argument("--local-nodes", type=int, default=1,
                   help="simulate N nodes on this machine, one agent each (default: 1)")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="whole-job restarts trainkit may make, across exclusions (default: 3); "
                        "each torchrun generation itself runs with --max-restarts=0")
    p.add_argument("--exclude-after", type=int, default=2,
                   help="exclude a node once it is the culprit this many times (default: 2)")
    p.add_argument("--spare", type=int, default=0,
                   help="standby nodes beyond --nnodes MAX that replace excluded ones")
    p.add_argument("--hang-timeout", default="auto",
                   help="seconds without progress in a collective before a hang is declared, "
                        "or 'auto' (default): learned from the job's own step and collective "
                        "durations, 4 x p99 with a floor of 2 s (30 s until learned)")
    p.add_argument("--no-detect", dest="detect", action="store_false",
                   help="do not start the anomaly-detection aggregator")
    p.add_argument("--no-monitor", dest="monitor", action="store_false",
                   help="do not monitor a script that never imports trainkit (by default the "
                        "workers' bootstrap wraps the default process group at "
                        "init_process_group and counts optimizer steps)")
    p.add_argument("--tee", action="store_true",
                   help="also stream torchrun's and the workers' output to the console (it "
                        "always goes to RUN_DIR/logs/gen<G>/<node>.log)")
    p.add_argument("--join-timeout", type=float, default=120.0,
                   help="seconds to wait for node agents to register (default: %(default)s)")
    p.add_argument("--stop-timeout", type=float, default=30.0,
                   help="seconds to wait for workers to stop after a decision")
    p.add_argument("--no-warm-start", dest="warm_start", action="store_false",
                   help="do not pre-start the next generation's workers (a restart with the "
                        "same nodes then pays torchrun's and Python's start-up again)")
    p.add_argument("--traffic-plan", metavar="T,P,J",
                   help="topology, placement (empty: the topology's [placement] table) and job files: "
                        "a slow link the policy keeps becomes a new traffic plan (run_dir/plan.gen<G>.json) "
                        "whose NCCL settings the next generation's workers get")
    p.add_argument("--metrics-port", type=int, default=None, metavar="P",
                   help="serve Prometheus metrics (goodput, restarts, step, findings, ...) at "
                        "http://127.0.0.1:P/metrics; needs the `metrics` extra")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address the metrics endpoint binds (default: loopback only)")
    p.add_argument("--drill", action="store_true",
                   help="run the fault drill: 3 local nodes x 2 processes, a hang injected on "
                        "node 2, detection, isolation, restart, resume (no torchrun args)")
    p.add_argument("torchrun", nargs=argparse.REMAINDER,
                   help="`--` then torchrun options, the training script and its arguments")
    p.set_defaults(func=_main)


def _drill_hang_timeout(value: str) -> float | str:
    try:
        return min(float(value), 5.0)
    except ValueError:
        return value        # "auto"; run_job rejects anything else with one line


def _main(args: argparse.Namespace) -> int:
    from trainkit.run.launcher import RunOptions, run_job
    from trainkit.run.torchrun_args import RunArgumentError

    rest = list(args.torchrun)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if args.drill:
        import time

        from trainkit.run.drill import run_drill

        if rest:
            print("trainkit run: error: --drill takes no torchrun arguments", file=sys.stderr)
            return 2
        return run_drill(args.run_dir or Path(f"runs/drill-{time.strftime('%Y%m%d-%H%M%S')}"),
                         hang_timeout=_drill_hang_timeout(args.hang_timeout))
    opts = RunOptions(run_dir=args.run_dir or Path("runs/trainkit-run"), coordinator=args.coordinator, node_id=args.node_id,
                      local_nodes=args.local_nodes, max_restarts=args.max_restarts,
                      exclude_after=args.exclude_after, spare=args.spare,
                      hang_timeout=args.hang_timeout, detect=args.detect,
                      join_timeout=args.join_timeout, stop_timeout=args.stop_timeout,
                      warm_start=args.warm_start, traffic_plan=args.traffic_plan,
                      metrics_port=args.metrics_port, metrics_host=args.metrics_host,
                      monitor=args.monitor, tee=args.tee)
    if args.metrics_port is not None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            print("trainkit run: --metrics-port needs 'prometheus_client'; install it with: "
                  "pip install 'trainkit[metrics]'", file=sys.stderr)
            return 2
    try:
        return run_job(opts, rest)
    except RunArgumentError as exc:
        print(f"trainkit run: error: {exc}", file=sys.stderr)
        return 2
