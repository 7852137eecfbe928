"""``CollectiveMonitor``: the per-rank entry point of anomaly detection.

    from trainkit.detect import CollectiveMonitor
    mon = CollectiveMonitor(run_dir="runs/exp1", hang_timeout=30.0)  # after init_process_group
    mon.start()
    model = DDP(model)              # created after start(): uses the monitored default group
    for step in range(steps):
        mon.step(step)              # optional: step markers make per-step evidence
        ...
    mon.close()                     # also a context manager

Where the aggregator is: ``TRAINKIT_AGGREGATOR=host:port`` (set by ``trainkit
run``), or else global rank 0 starts a detached one (its own session, so
torchrun's teardown of the workers does not kill it before it has written its
finding) and publishes the address through the default group's store.

The aggregator only listens to ranks that know the job's secret,
``TRAINKIT_AGG_SECRET``: whoever starts the aggregator makes it (:func:`job_secret`)
and hands it to the ranks through the environment (``trainkit run``), or, when rank 0
started it and the variable was not set for the job, through the default group's
store (as unauthenticated as torch's TCPStore is; set the variable on every host to
keep it off the network). A self-started aggregator listens on loopback when the job
runs on one host, else on the interface that routes to ``MASTER_ADDR``.

A monitor whose aggregator is unreachable warns once and lets training run
unmonitored; monitoring never blocks or crashes training. ``start()`` raises
only for a malformed ``TRAINKIT_FAULT`` (a clear error at start-up).
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import secrets
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from trainkit import rundir
from trainkit.detect import knobs
from trainkit.detect.channel import Channel
from trainkit.detect.linkprobe import LinkProbe
from trainkit.detect.peerprobe import (PeerProbeServer, advertised_host, listen_host,
                                       peers_to_probe, probe_peers)
from trainkit.detect.probe import MonitoredProcessGroup, register_group, unregister_group
from trainkit.detect.recorder import Recorder
from trainkit.detect.stacks import StackDumper
from trainkit.faults import FaultInjector
from trainkit.rundir import local_identity

__all__ = ["CollectiveMonitor", "job_secret", "start_aggregator"]

_STORE_KEY = "trainkit/detect/aggregator"
_lookups = itertools.count()     # store-based aggregator look-ups by this process, in order
_STATUS_PERIOD_S = 0.5


def job_secret() -> str:
    """The job's aggregator secret: ``TRAINKIT_AGG_SECRET``, made (and put in this
    process's environment, so children inherit it) when unset."""
    secret = os.environ.get(rundir.AGG_SECRET_ENV)
    if not secret:
        secret = os.environ[rundir.AGG_SECRET_ENV] = secrets.token_urlsafe(32)
    return secret


def start_aggregator(run_dir: str | os.PathLike, *, hang_timeout: float | str,
                     host: str = "127.0.0.1",
                     port: int = 0, standalone: bool = True, timeout: float = 30.0,
                     extra_args: tuple[str, ...] = ()) -> tuple[str, int, int]:
    """Start a detached aggregator process; returns (host, port, pid) once it listens.

    The process gets its own session (``start_new_session``), so killing the
    launcher's or torchrun's process group does not take it down. It accepts only
    ranks whose hello carries :func:`job_secret` (handed over in its environment,
    never on its command line, which other users can read).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    addr_file = run_dir / rundir.AGGREGATOR_ADDR_FILE
    stamp = time.time()
    cmd = [sys.executable, "-m", "trainkit.detect.aggregator", "--run-dir", str(run_dir),
           "--host", host, "--port", str(port), "--hang-timeout", str(hang_timeout)]
    if standalone:
        cmd.append("--standalone")
    cmd.extend(extra_args)
    log = open(run_dir / "aggregator.log", "ab")
    env = dict(os.environ)
    env.pop(rundir.AGGREGATOR_ENV, None)
    env[rundir.AGG_SECRET_ENV] = job_secret()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True, env=env, close_fds=True)
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"aggregator exited with code {proc.returncode}; "
                               f"see {run_dir / 'aggregator.log'}")
        try:
            info = json.loads(addr_file.read_text())
            if info.get("pid") == proc.pid and info.get("started", 0) >= stamp - 1:
                return info["host"], int(info["port"]), proc.pid
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError(f"aggregator did not start listening within {timeout}s")


class CollectiveMonitor:
    """Records every collective of this rank and streams it to the aggregator.

    Args:
        run_dir: run directory for findings and fault markers; defaults to
            ``TRAINKIT_RUN_DIR``, else ``./trainkit-run``.
        hang_timeout: seconds without completion before a collective is a hang, or
            ``"auto"`` (learned from the job's durations; ``TRAINKIT_HANG_TIMEOUT`` overrides).
        wrap_default: install the monitored wrapper as the default group, so
            DDP/FSDP created afterwards and plain ``dist.*`` calls are recorded.
        link_probe: with more than two ranks, create a small private gloo group
            for targeted point-to-point probes that localise a slow link
            (collective: every rank must pass the same value).
        heartbeat_s: heartbeat period of the side channel.
        aggregator_args: extra command-line options for a self-started aggregator.

    Thread safety: ``step`` is meant for the training thread; everything else
    is called once.
    """

    def __init__(self, run_dir: str | os.PathLike | None = None,
                 hang_timeout: float | str = 30.0, *,
                 wrap_default: bool = True, heartbeat_s: float = 0.5,
                 link_probe: bool = True, aggregator_args: tuple[str, ...] = ()):
        from trainkit.detect.hangtime import parse_hang_timeout

        env_timeout = os.environ.get(rundir.HANG_TIMEOUT_ENV)
        if env_timeout:
            try:
                parse_hang_timeout(env_timeout)
            except ValueError:
                raise ValueError(f"{rundir.HANG_TIMEOUT_ENV}={env_timeout!r} is not a number "
                                 f"> 0 nor 'auto'") from None
            hang_timeout = env_timeout
        try:
            fixed = parse_hang_timeout(hang_timeout)
        except ValueError:
            raise ValueError(f"hang_timeout must be > 0 or 'auto', got {hang_timeout}") from None
        self.run_dir = Path(run_dir or os.environ.get(rundir.RUN_DIR_ENV) or "trainkit-run")
        # seconds, or "auto": learned by the aggregator (trainkit.detect.hangtime)
        self.hang_timeout: float | str = "auto" if fixed is None else fixed
        self.wrap_default = wrap_default
        self.heartbeat_s = heartbeat_s
        self.aggregator_args = tuple(aggregator_args)
        self.link_probe = link_probe
        self._link_probe: LinkProbe | None = None
        self.enabled = os.environ.get(rundir.DETECT_ENV, "1") not in ("0", "false", "off")
        self.channel: Channel | None = None
        self.recorder: Recorder | None = None
        self.injector: FaultInjector | None = None
        self.aggregator_pid: int | None = None
        self._wrappers: list[MonitoredProcessGroup] = []
        self._default_wrapper: MonitoredProcessGroup | None = None
        self._stacks: StackDumper | None = None
        self._peer_probe: PeerProbeServer | None = None
        self._prev_excepthook: Any = None
        self._secret = ""
        self._attempt: int | None = None     # agreed with rank 0 when found through the store
        self._started = False
        self._adopted: CollectiveMonitor | None = None
        self._status_at = 0.0 if os.environ.get(rundir.RUN_DIR_ENV) else float("inf")

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> CollectiveMonitor:
        """Connect (starting an aggregator if needed) and begin recording.

        Call after ``init_process_group`` and before building DDP/FSDP.
        """
        if self._started:
            return self
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("CollectiveMonitor.start(): call dist.init_process_group() first")
        self._started = True
        from trainkit.detect import auto

        active = auto.active_monitor()
        if active is not None and active is not self and active.recorder is not None:
            # Under `trainkit run` the workers' bootstrap already monitors this process:
            # share its recorder and channel rather than record everything twice.
            self._adopted = active
            self.recorder, self.channel, self.injector = (active.recorder, active.channel,
                                                          active.injector)
            self._default_wrapper = active._default_wrapper
            return self
        rank, world = dist.get_rank(), dist.get_world_size()
        # A malformed TRAINKIT_FAULT is an error at start-up, monitored or not.
        self.injector = FaultInjector.from_env(rank=rank, run_dir=self.run_dir)
        channel = self._connect(rank, world) if self.enabled else None
        if self.enabled and self.link_probe and world > 2:
            # Decided from arguments and world size only, identical on every rank:
            # new_group is collective even when this rank's channel failed.
            self._link_probe = LinkProbe.create(rank, channel.send if channel else _discard)
        put = channel.put if channel is not None else _discard
        self.recorder = recorder = Recorder(put, rank=rank, injector=self.injector)
        if channel is not None:
            # Stop appending to a dead channel's buffer (the hot path holds its append).
            channel.on_lost = lambda: setattr(recorder, "put", _discard)
        if channel is None and not self.injector.active:
            return self
        if self.wrap_default:
            default = c10d._get_default_group()
            if not isinstance(default, MonitoredProcessGroup):
                self._default_wrapper = self.wrap(default)
                register_group(self._default_wrapper, as_default=True)
        self._install_excepthook()
        atexit.register(self.close)
        if self.recording:
            from trainkit.detect import coverage

            coverage.install(self)
        return self

    def _connect(self, rank: int, world: int) -> Channel | None:
        try:
            address = self._find_aggregator(rank)
        except Exception as exc:  # noqa: BLE001 - never fail training over monitoring
            warnings.warn(f"trainkit.detect: no aggregator ({exc}); training continues unmonitored",
                          RuntimeWarning, stacklevel=3)
            return None
        host, local_rank, attempt, node = local_identity()
        if self._attempt is not None:
            attempt = self._attempt
        hello = {"rank": rank, "world": world, "host": host, "local_rank": local_rank,
                 "attempt": attempt, "node": node, "pid": os.getpid(),
                 "hang_timeout": self.hang_timeout, "secret": self._secret}
        try:
            bind = listen_host()
            self._peer_probe = PeerProbeServer(bind)
            probe_host = bind if bind not in ("0.0.0.0", "") else advertised_host()
            hello["peer_probe"] = [probe_host, self._peer_probe.port]
        except OSError as exc:
            warnings.warn(f"trainkit.detect: no peer-probe server ({exc}); communication hangs "
                          "will not be localised", RuntimeWarning, stacklevel=3)
        channel = Channel(address, hello, on_request=self._on_request, heartbeat_s=self.heartbeat_s)
        if not channel.start():
            self._close_peer_probe()
            return None
        self.channel = channel
        try:
            self._stacks = StackDumper(knobs.stack_signal())
        except (ValueError, OSError) as exc:
            warnings.warn(f"trainkit.detect: stack capture disabled ({exc})", RuntimeWarning,
                          stacklevel=3)
        return channel

    def _find_aggregator(self, rank: int) -> tuple[str, int]:
        text = os.environ.get(rundir.AGGREGATOR_ENV)
        if text:
            # Without the secret the aggregator drops the hello, and the channel's warning
            # says so (one warning, as for an unreachable one).
            self._secret = os.environ.get(rundir.AGG_SECRET_ENV, "")
            return knobs.parse_address(text)
        store = c10d._get_default_store()
        # No restart count in the key, and every rank takes rank 0's attempt: an elastic
        # agent's TORCHELASTIC_RESTART_COUNT can differ between nodes of one round (NVRx's
        # ft_launcher after a crash). torch prefixes a shared agent store per attempt (else
        # each round has a fresh store); the look-up number separates a second monitor.
        key = f"{_STORE_KEY}/{next(_lookups)}"
        if rank == 0:
            try:
                given = os.environ.get(rundir.AGG_SECRET_ENV)
                self._secret = job_secret()
                host, port, pid = start_aggregator(self.run_dir, hang_timeout=self.hang_timeout,
                                                   host=listen_host(),
                                                   extra_args=self.aggregator_args)
                self.aggregator_pid = pid
                value = f"{host}:{port}"
            except Exception as exc:  # noqa: BLE001 - tell the other ranks, then give up
                store.set(key, "error:" + str(exc))
                raise
            # Made here: the other ranks cannot have it in their environment.
            store.set(f"{key}/secret", "" if given else self._secret)
            self._attempt = local_identity()[2]
            store.set(f"{key}/attempt", str(self._attempt))
            store.set(key, value)
        else:
            store.wait([key], _timedelta(60.0))
            value = store.get(key).decode()
            if value.startswith("error:"):
                raise RuntimeError(f"rank 0 could not start the aggregator: {value[6:]}")
            published = store.get(f"{key}/secret").decode()
            self._attempt = int(store.get(f"{key}/attempt").decode())
            self._secret = published or os.environ.get(rundir.AGG_SECRET_ENV, "")
        return knobs.parse_address(value)

    def close(self) -> None:
        """Stop recording, flush, say goodbye; restores the default group."""
        if not self._started:
            return
        self._started = False
        if self._adopted is not None:
            self._adopted = None      # the bootstrap's monitor closes at exit
            return
        from trainkit.detect import coverage

        coverage.uninstall_monitor(self)
        try:
            atexit.unregister(self.close)
        except Exception:  # noqa: BLE001
            pass
        if self._default_wrapper is not None:
            unregister_group(self._default_wrapper)
            self._default_wrapper = None
        if self._prev_excepthook is not None and sys.excepthook is self._excepthook:
            sys.excepthook = self._prev_excepthook
        if self.channel is not None:
            self.channel.close(bye=True)
        if self._stacks is not None:
            self._stacks.close()
            self._stacks = None
        self._close_peer_probe()

    def _close_peer_probe(self) -> None:
        if self._peer_probe is not None:
            self._peer_probe.close()
            self._peer_probe = None

    def __enter__(self) -> CollectiveMonitor:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- per-step API ----------------------------------------------------------------
    def step(self, step: int) -> None:
        """Mark the start of training step ``step`` (also the fault-injection clock)."""
        rundir.report_step(step)      # goodput and the restart-loop guard of trainkit run
        rec = self.recorder
        if rec is None:
            return
        rec.explicit_steps = True
        self.auto_step(step)

    @property
    def recording(self) -> bool:
        """Whether collectives on the default group go through a monitored wrapper."""
        return self.recorder is not None and self._default_wrapper is not None

    def auto_step(self, step: int) -> None:
        """A step marker from :mod:`trainkit.detect.auto`'s optimizer hook: like
        :meth:`step`, without taking the clock over from the hook."""
        rec = self.recorder
        if rec is None:
            return
        rec.step = int(step)
        now = time.time()
        rec.put(("s", int(step), now))
        if rec.rank == 0 and now >= self._status_at:
            self._status_at = now + _STATUS_PERIOD_S
            self._write_status(int(step), now)
        if rec.injector is not None:
            rec.injector.on_step(int(step))

    def wrap(self, pg: dist.ProcessGroup) -> MonitoredProcessGroup:
        """A monitored wrapper of ``pg``, to hand to DDP/FSDP as ``process_group=``."""
        if self.recorder is None:
            raise RuntimeError("CollectiveMonitor.wrap(): call start() first")
        if isinstance(pg, MonitoredProcessGroup):
            return pg
        wrapper = MonitoredProcessGroup(pg, self.recorder)
        if wrapper is not self._default_wrapper and pg is not c10d._get_default_group():
            register_group(wrapper)
        self._wrappers.append(wrapper)
        if self.channel is not None:
            self.channel.send({"t": "group", "name": wrapper.monitor_name,
                               "ranks": wrapper.global_ranks})
        return wrapper

    def _write_status(self, step: int, now: float) -> None:
        """The latest step, for ``trainkit run``'s live status line (rank 0, rate-limited)."""
        try:
            rundir.write_status(self.run_dir, "step", {
                "step": step, "time": now, "gen": self.attempt})
        except OSError:
            self._status_at = float("inf")

    @property
    def attempt(self) -> int:
        """The restart attempt this monitor reports: rank 0's when the aggregator was found
        through the store (so every rank of a round agrees), else this process's own."""
        return self._attempt if self._attempt is not None else local_identity()[2]

    @property
    def process_group(self) -> dist.ProcessGroup:
        """The monitored default group (or the plain one when monitoring is off)."""
        return self._default_wrapper or c10d._get_default_group()

    # -- requests from the aggregator ------------------------------------------------
    def _on_request(self, message: dict[str, Any]) -> None:
        if message.get("t") == "stack_req" and self._stacks is not None and self.channel:
            text = self._stacks.dump()
            step = self.recorder.step if self.recorder else None
            self.channel.send({"t": "stack", "text": text[-20000:], "step": step})
        elif message.get("t") == "probe" and self._link_probe is not None:
            self._link_probe.handle(message)
        elif message.get("t") == "peer_probe" and self.channel is not None and self.recorder:
            addresses = {int(r): addr for r, addr in message["peers"].items()}
            targets = peers_to_probe(self.recorder.rank, list(addresses))
            results = probe_peers({r: addresses[r] for r in targets},
                                  timeout=float(message.get("timeout", 1.0)))
            self.channel.send({"t": "peer_probe_result", "id": message["id"],
                               "results": {str(r): v for r, v in results.items()}})

    def _install_excepthook(self) -> None:
        self._prev_excepthook = sys.excepthook
        sys.excepthook = self._excepthook

    def _excepthook(self, exc_type: Any, exc: BaseException, tb: Any) -> None:
        if self.channel is not None:
            comm = self.recorder.comm_error if self.recorder else None
            self.channel.send({"t": "exit", "error": f"{exc_type.__name__}: {exc}"[:2000],
                               "comm_error": bool(comm) or _looks_like_comm_error(exc)})
        (self._prev_excepthook or sys.__excepthook__)(exc_type, exc, tb)
        self.close()


def _discard(_event: list) -> None:
    return None


def _looks_like_comm_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "timed out", "peer",
                                        "distbackenderror", "collective"))


def _timedelta(seconds: float) -> Any:
    import datetime

    return datetime.timedelta(seconds=seconds)

