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
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from trainkit.run.agent import NodeAgent, terminate_tree
from trainkit.run.console import Console
from trainkit.run.control import Control, connect_store, host_store
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
    return _coordinate(opts, args, run_dir, node_id, host, port, torchrun_argv)


def _coordinate(opts: RunOptions, args: TorchrunArgs, run_dir: Path, node_id: str, host: str,
                port: int, torchrun_argv: list[str]) -> int:
    console = Console(run_dir).start()
    events = EventLog(run_dir, echo=console.line)
    store = host_store(host, port)
    control = Control(store)
    endpoint = f"{host}:{port}"
    children: list[subprocess.Popen] = []
    aggregator = None
    if opts.detect:
        aggregator = start_aggregator(run_dir, host=host, hang_timeout=opts.hang_timeout)
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
        aggregator=aggregator, warm_start=opts.warm_start, monitor=opts.monitor)
    agent_rc: list[int] = []
    # Local nodes share one hostname, and torchrun's c10d rendezvous orders ranks by
    # (address, pid): by pid here, so ranks would move between nodes at every restart and
    # the node-local checkpoint tiers would hold other ranks' shards. A loopback address
    # per local node (127.0.0.k) keeps each node's ranks where they were.
    pin = opts.local_nodes > 1 and opts.local_nodes < 250 and not any(
        a.split("=", 1)[0] in ("--local-addr", "--local_addr") for a in torchrun_argv)
    if pin:
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
