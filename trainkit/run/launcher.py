"""``trainkit run``: wires the coordinator, the node agents and the detector together.

Modes:

- single host (no ``--rdzv-endpoint`` among the torchrun options): this process is the
  coordinator, hosting the store on a free loopback port, and runs the only agent;
  ``--local-nodes N`` starts N-1 more agents as separate processes ("nodes" on one
  machine, which is how the tests and the drill exercise node isolation for real);
- multi host: every host runs ``trainkit run -- --rdzv-endpoint=HOST:PORT ...`` with the
  same endpoint; the one on HOST adds ``--coordinator`` and hosts the store there.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from trainkit.run.agent import NodeAgent, terminate_tree
from trainkit.rundir import AGG_SECRET_ENV
from trainkit.run.console import Console
from trainkit.run.control import AGG_SECRET_KEY, Control, bind_host, connect_store, host_store
from trainkit.run.coordinator import Coordinator, CoordinatorConfig
from trainkit.run.detector import start_aggregator
from trainkit.run.events import EventLog
from trainkit.run.policy import PolicyConfig
from trainkit.run.torchrun_args import RunArgumentError, TorchrunArgs, parse_torchrun_args


@dataclass(frozen=True, kw_only=True, slots=True)
class RunOptions:
    """trainkit's own options (everything before ``--``); one field per CLI flag."""

    run_dir: Path
    coordinator: bool = False
    node_id: str | None = None
    local_nodes: int = 1
    max_restarts: int = 3
    exclude_after: int = 2
    spare: int = 0
    hang_timeout: float | str = "auto"     # seconds, or "auto" (trainkit.detect.hangtime)
    detect: bool = True
    join_timeout: float = 120.0
    stop_timeout: float = 30.0
    warm_start: bool = True
    traffic_plan: str | None = None   # "TOPOLOGY,PLACEMENT,JOB": re-plan around slow links
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    monitor: bool = True
    tee: bool = False


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise RunArgumentError(f"--rdzv-endpoint must be HOST:PORT, got {endpoint!r}")
    return host, int(port)


def validate(opts: RunOptions, args: TorchrunArgs) -> None:
    if opts.local_nodes < 1:
        raise RunArgumentError(f"--local-nodes must be >= 1, got {opts.local_nodes}")
    if opts.max_restarts < 0:
        raise RunArgumentError(f"--max-restarts must be >= 0, got {opts.max_restarts}")
    if opts.exclude_after < 1:
        raise RunArgumentError(f"--exclude-after must be >= 1, got {opts.exclude_after}")
    if opts.metrics_port is not None and not 0 <= opts.metrics_port <= 65535:
        raise RunArgumentError(f"--metrics-port must be 0..65535, got {opts.metrics_port}")
    from trainkit.detect.hangtime import parse_hang_timeout

    try:
        parse_hang_timeout(opts.hang_timeout)
    except ValueError:
        raise RunArgumentError(f"--hang-timeout must be 'auto' or seconds > 0, got "
                               f"{opts.hang_timeout!r}") from None
    if opts.local_nodes > 1 and args.rdzv_endpoint and not opts.coordinator:
        raise RunArgumentError("--local-nodes starts the agents of one machine; it needs "
                               "--coordinator when --rdzv-endpoint is given")
    if opts.local_nodes > 1 and opts.local_nodes + opts.spare < args.min_nodes:
        raise RunArgumentError(f"--local-nodes={opts.local_nodes} is below --nnodes minimum "
                               f"{args.min_nodes}")
    if not Path(args.script).exists():
        raise RunArgumentError(f"training script not found: {args.script}")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_job(opts: RunOptions, torchrun_argv: list[str]) -> int:
    """Run the job described by ``opts`` and the torchrun options; returns the exit code."""
    args = parse_torchrun_args(torchrun_argv)
    validate(opts, args)
    run_dir = opts.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    node_id = opts.node_id or ("node0" if opts.local_nodes > 1 else socket.gethostname())
    is_coordinator = opts.coordinator or args.rdzv_endpoint is None
    if args.rdzv_endpoint is None:
        host, port = "127.0.0.1", _free_port("127.0.0.1")
    else:
        host, port = _split_endpoint(args.rdzv_endpoint)
    endpoint = f"{host}:{port}"
    if not is_coordinator:
        control = Control(connect_store(host, port))
        return NodeAgent(control, node_id, args, run_dir=run_dir, endpoint=endpoint,
                         tee=opts.tee).run()
    traffic = _traffic_replanner(opts, run_dir)
    return _coordinate(opts, args, run_dir, node_id, host, port, torchrun_argv, traffic)


def _traffic_replanner(opts: RunOptions, run_dir: Path):
    """--traffic-plan's files, loaded before anything starts: bad input is exit 2."""
    if not opts.traffic_plan:
        return None
    from trainkit.run.replan import TrafficReplanner
    from trainkit.traffic.errors import TrafficError

    try:
        return TrafficReplanner(opts.traffic_plan, run_dir)
    except TrafficError as exc:
        raise RunArgumentError(f"--traffic-plan: {exc}") from None


def _coordinate(opts: RunOptions, args: TorchrunArgs, run_dir: Path, node_id: str, host: str,
                port: int, torchrun_argv: list[str], traffic=None) -> int:
    console = Console(run_dir).start()
    events = EventLog(run_dir, echo=console.line)
    store = host_store(host, port)
    control = Control(store)
    endpoint = f"{host}:{port}"
    children: list[subprocess.Popen] = []
    metrics = _serve_metrics(opts, run_dir, events)
    aggregator = None
    if opts.detect:
        user_secret = bool(os.environ.get(AGG_SECRET_ENV))
        aggregator = start_aggregator(run_dir, host=bind_host(host) or "0.0.0.0",
                                      hang_timeout=opts.hang_timeout)
        if aggregator is not None and args.rdzv_endpoint is not None and not user_secret:
            control.put(AGG_SECRET_KEY, aggregator.secret)   # for agents on other hosts
        if aggregator is None:
            events.log("warning", reason="trainkit.detect is not available: hangs and slowness "
                       "go unseen, only process exits are handled")
    max_nodes = max(args.max_nodes, opts.local_nodes - opts.spare) if opts.local_nodes > 1 \
        else args.max_nodes
    cfg = CoordinatorConfig(
        run_dir=run_dir, max_nodes=max_nodes, spare=opts.spare, rdzv_id=args.rdzv_id,
        policy=PolicyConfig(max_restarts=opts.max_restarts, exclude_after=opts.exclude_after,
                            min_nodes=args.min_nodes),
        join_timeout=opts.join_timeout, stop_timeout=opts.stop_timeout,
        aggregator=aggregator, warm_start=opts.warm_start, traffic=traffic,
        monitor=opts.monitor, store_host=host)
    agent_rc: list[int] = []
    # Local nodes share one hostname, and torchrun's c10d rendezvous orders ranks by
    # (address, pid): by pid here, so ranks would move between nodes at every restart and
    # the node-local checkpoint tiers would hold other ranks' shards. A loopback address
    # per local node (127.0.0.k) keeps each node's ranks where they were.
    own_addr = any(a.split("=", 1)[0] in ("--local-addr", "--local_addr") for a in torchrun_argv)
    pin = opts.local_nodes > 1 and opts.local_nodes < 250 and not own_addr
    # A one-host job's workers bootstrap on loopback too (torchrun_main binds their store there).
    if pin or (args.rdzv_endpoint is None and not own_addr):
        args = dataclasses.replace(args, passthrough=("--local-addr=127.0.0.1", *args.passthrough))
    agent = NodeAgent(Control(connect_store(host, port)), node_id, args, run_dir=run_dir,
                      endpoint=endpoint, tee=opts.tee)
    agent_thread = threading.Thread(target=lambda: agent_rc.append(agent.run()),
                                    name="trainkit-local-agent", daemon=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        agent_thread.start()
        argv = [a for a in torchrun_argv]
        if args.rdzv_endpoint is None:
            argv = [f"--rdzv-endpoint={endpoint}", *argv]
        for i in range(1, opts.local_nodes):
            cmd = [sys.executable, "-m", "trainkit", "run", "--run-dir", str(run_dir),
                   "--node-id", f"node{i}", *(["--tee"] if opts.tee else []), "--",
                   *([f"--local-addr=127.0.0.{i + 1}"] if pin else []), *argv]
            children.append(subprocess.Popen(cmd, start_new_session=True))
        coordinator = Coordinator(control, cfg, events)
        rc = coordinator.run()
        coordinator.wait_for_goodbyes(timeout=opts.stop_timeout)
        agent_thread.join(timeout=opts.stop_timeout)
        for child in children:
            try:
                child.wait(timeout=opts.stop_timeout)
            except subprocess.TimeoutExpired:
                terminate_tree(child, 5)
        return rc
    except KeyboardInterrupt:
        events.log("interrupted", reason="trainkit run was interrupted; stopping all workers")
        control.put("tk/final", {"status": "give_up"})
        agent_thread.join(timeout=opts.stop_timeout)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        for child in children:
            if child.poll() is None:
                terminate_tree(child, 5)
        if aggregator is not None:
            aggregator.stop()
        console.close()
        if metrics is not None:
            metrics.close()


def _serve_metrics(opts: RunOptions, run_dir: Path, events: EventLog):
    """The ``--metrics-port`` endpoint (:mod:`trainkit.run.metrics`), or None."""
    if opts.metrics_port is None:
        return None
    from trainkit.run.metrics import serve_metrics

    try:
        server = serve_metrics(run_dir, port=opts.metrics_port, host=opts.metrics_host)
    except OSError as exc:
        raise RunArgumentError(f"--metrics-port {opts.metrics_port}: cannot listen on "
                               f"{opts.metrics_host}: {exc}") from None
    events.log("metrics", url=server.url, reason=f"Prometheus metrics at {server.url}")
    return server
