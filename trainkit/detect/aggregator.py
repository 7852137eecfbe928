"""The aggregator: its own process, so a dead or hung rank 0 does not blind it.

    python -m trainkit.detect.aggregator --run-dir DIR [--port P] [--hang-timeout S] [--standalone]

It accepts one TCP connection per rank (protocol in :mod:`channel`), keeps
per-rank timelines, runs one classifier per fault class on every tick and
appends findings to ``DIR/diagnosis.jsonl`` (one JSON object per line with the
contract fields ``time, class, ranks, hosts, ids, link, step, group, seq,
evidence, confidence``). Around each finding it also appends the nearby
collectives to ``DIR/timeline.jsonl`` for ``trainkit diagnose --plot``.

Once listening it writes ``DIR/aggregator.json`` (``host``, ``port``, ``pid``).
A launcher may report exit codes it sees with a line
``{"t": "exit_code", "rank": R, "code": C}`` on any authenticated connection.

Who may talk to it: whoever starts it makes a per-job secret and hands it over in
``TRAINKIT_AGG_SECRET`` (:func:`trainkit.detect.monitor.job_secret`); every connection's first line
must be a ``hello`` carrying it (compared with :func:`hmac.compare_digest`). Anything
else, a wrong secret, a line over 1 MiB, or a connection silent for 10 s before its
hello, is dropped without a finding. Each message is validated field by field; a
malformed one is dropped and logged, never fatal.

Who calls what: one aggregator per job, in its own process and on one thread (a
selector loop), so timelines and classifiers need no locks. Per connection: the rank's
``hello`` opens (or, for a higher attempt, replaces) the timeline; batches feed it.
Every tick (0.1 s): completed collectives go to every classifier's ``observe`` (registry
order), then every classifier's ``check``; findings are appended as they come; then the
requests classifiers left on the timeline (link probes, peer probes, stacks) are sent to
the ranks they name. The protocol of a seam classifier is
:class:`trainkit.detect.classifiers.Classifier`.

``--standalone`` (used when ``CollectiveMonitor`` starts it) exits a couple of
seconds after every rank has gone; otherwise it runs until SIGTERM/SIGINT and a
higher restart attempt starts a fresh timeline. The attempt is ``TRAINKIT_GENERATION``
under ``trainkit run``; otherwise every rank reports rank 0's
``TORCHELASTIC_RESTART_COUNT`` (agreed through the store), because an elastic agent's
count can differ between the nodes of one round.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from trainkit import rundir
from trainkit.detect.classifiers import Classifier, make_classifiers
from trainkit.detect.knobs import ClassifierConfig
from trainkit.detect.messages import (MAX_RANK, BadMessage, apply_batch, as_dict, as_float,
                                      as_int, as_list, parse_hello)
from trainkit.detect.timeline import RankInfo, Timeline
from trainkit.rundir import Finding

__all__ = ["Aggregator", "main"]

_TICK_S = 0.1
MAX_LINE = 1 << 20          # bytes; a longer line drops the connection
_HELLO_TIMEOUT_S = 10.0     # an unauthenticated connection is closed after this


class _Conn:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.inbuf = bytearray()
        self.scanned = 0            # bytes of inbuf already searched for a newline
        self.opened = time.monotonic()
        self.authenticated = False
        self.rank: int | None = None
        self.attempt = 0
        self.offset = 0.0


class Aggregator:
    """Server + timelines + classifiers; single-threaded (a selector loop)."""

    def __init__(self, run_dir: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 0,
                 advertise: str | None = None, cfg: ClassifierConfig | None = None,
                 hang_timeout_from_ranks: bool = False, standalone: bool = False,
                 linger_s: float = 2.0, first_client_timeout: float = 300.0,
                 secret: str | None = None):
        secret = secret if secret is not None else os.environ.get(rundir.AGG_SECRET_ENV, "")
        if not secret:
            raise ValueError(f"the aggregator needs a per-job secret: set {rundir.AGG_SECRET_ENV}")
        self._secret = secret.encode()
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg or ClassifierConfig()
        self.hang_timeout_from_ranks = hang_timeout_from_ranks
        self.standalone = standalone
        self.linger_s = linger_s
        self.first_client_timeout = first_client_timeout
        self.local_host = os.environ.get(rundir.HOSTNAME_ENV) or socket.gethostname()
        self.timeline = Timeline(0, self.local_host)
        self.classifiers: list[Classifier] = make_classifiers(self.cfg)
        self.selector = selectors.DefaultSelector()
        self.server = socket.create_server((host, port), backlog=1024, reuse_port=False)
        self.server.setblocking(False)
        self.selector.register(self.server, selectors.EVENT_READ, None)
        self.port = self.server.getsockname()[1]
        self.advertise = advertise or (host if host not in ("0.0.0.0", "::", "") else
                                       socket.gethostname())
        self.conns: dict[socket.socket, _Conn] = {}
        self.started = time.time()
        self.ever_connected = False
        self.last_change = time.time()
        self._stop = False
        self.n_findings = 0
        self.n_completed = 0

    # -- files ---------------------------------------------------------------------------
    def write_address(self) -> None:
        path = self.run_dir / rundir.AGGREGATOR_ADDR_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"host": self.advertise, "port": self.port, "pid": os.getpid(),
                                   "started": self.started}))
        os.replace(tmp, path)

    def _write_finding(self, finding: Finding) -> None:
        line = json.dumps(finding.to_json(), default=str)
        with open(self.run_dir / rundir.DIAGNOSIS_FILE, "a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        tl = self.timeline
        around = {"finding": self.n_findings, "class": finding.cls, "time": finding.time,
                  "ranks": list(finding.ranks), "colls": tl.window(finding.time),
                  "steps": {str(r): list(i.steps) for r, i in tl.ranks.items()}}
        with open(self.run_dir / rundir.TIMELINE_FILE, "a") as fh:
            fh.write(json.dumps(around, default=str) + "\n")
        self.n_findings += 1
        print(f"[trainkit.detect] {finding.cls}: ranks {list(finding.ranks)} "
              f"group {finding.group} seq {finding.seq}", file=sys.stderr, flush=True)

    # -- loop ------------------------------------------------------------------------------
    def stop(self, *_: Any) -> None:
        self._stop = True

    def run(self) -> int:
        next_tick = time.monotonic()
        while not self._stop:
            timeout = max(0.0, next_tick - time.monotonic())
            for key, _ in self.selector.select(timeout=timeout):
                if key.data is None:
                    self._accept()
                else:
                    self._read(key.data)
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + _TICK_S
                self.tick(time.time())
                if self._should_exit():
                    break
        for conn in list(self.conns.values()):
            self._close(conn)
        print(f"[trainkit.detect] aggregator exiting: {len(self.timeline.ranks)} ranks, "
              f"{self.n_completed} collectives matched, {self.n_findings} findings",
              file=sys.stderr, flush=True)
        self.selector.close()
        self.server.close()
        return 0

    def _should_exit(self) -> bool:
        if not self.standalone:
            return False
        now = time.time()
        if not self.ever_connected:
            return now - self.started > self.first_client_timeout
        busy = any(c.waiting for c in self.classifiers)
        return not self.conns and not busy and now - self.last_change > self.linger_s

    def tick(self, now: float) -> None:
        stale = time.monotonic() - _HELLO_TIMEOUT_S
        for conn in [c for c in self.conns.values() if not c.authenticated and c.opened < stale]:
            self._drop(conn, "no hello")
        tl = self.timeline
        completed, tl.completed = tl.completed, []
        self.n_completed += len(completed)
        for coll in completed:
            for clf in self.classifiers:
                clf.observe(coll, tl)
        for clf in self.classifiers:
            for finding in clf.check(tl, now):
                self._write_finding(finding)
        probes, tl.probe_requests = tl.probe_requests, []
        for probe in probes:
            message = {"t": "probe", "id": probe["id"], "pairs": probe["pairs"],
                       "nbytes": 65536, "reps": 3}
            for conn in list(self.conns.values()):
                if conn.rank in probe["ranks"] and conn.attempt == tl.attempt:
                    self._send(conn, message)
        peer_probes, tl.peer_probe_requests = tl.peer_probe_requests, []
        for probe in peer_probes:
            message = {"t": "peer_probe", "id": probe["id"], "timeout": self.cfg.peer_probe_timeout_s,
                       "peers": {str(r): list(addr) for r, addr in probe["peers"].items()}}
            for conn in list(self.conns.values()):
                if conn.rank in probe["ranks"] and conn.attempt == tl.attempt:
                    self._send(conn, message)
        requests, tl.stack_requests = tl.stack_requests, []
        for rank in requests:
            conn = next((c for c in self.conns.values() if c.rank == rank
                         and c.attempt == tl.attempt), None)
            if conn is not None:
                self._send(conn, {"t": "stack_req"})

    # -- connections -------------------------------------------------------------------
    def _accept(self) -> None:
        try:
            sock, _ = self.server.accept()
        except OSError:
            return
        sock.setblocking(False)
        conn = _Conn(sock)
        self.conns[sock] = conn
        self.selector.register(sock, selectors.EVENT_READ, conn)

    def _send(self, conn: _Conn, message: dict[str, Any]) -> None:
        try:
            conn.sock.setblocking(True)
            conn.sock.settimeout(1.0)
            conn.sock.sendall((json.dumps(message) + "\n").encode())
        except OSError:
            pass
        finally:
            try:
                conn.sock.setblocking(False)
            except OSError:
                pass

    def _read(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._disconnected(conn)
            return
        buf = conn.inbuf
        buf += chunk
        start, end = 0, buf.find(b"\n", conn.scanned)   # only the new bytes are searched
        while end != -1:
            if end - start > MAX_LINE:
                self._drop(conn, f"a line over {MAX_LINE} bytes")
                return
            line = bytes(buf[start:end])
            start = end + 1
            if line.strip() and not self._line(conn, line):
                return
            if conn.sock.fileno() < 0:
                return
            end = buf.find(b"\n", start)
        del buf[:start]
        conn.scanned = len(buf)
        if len(buf) > MAX_LINE:
            self._drop(conn, f"a line over {MAX_LINE} bytes")

    def _line(self, conn: _Conn, line: bytes) -> bool:
        """Handle one line; False when the connection was dropped for it."""
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            message = None
        if not conn.authenticated:
            if not (isinstance(message, dict) and message.get("t") == "hello"
                    and self._authentic(message)):
                self._drop(conn, "not an authenticated hello")
                return False
            try:
                self._hello(conn, message)
            except (BadMessage, KeyError, TypeError, ValueError) as exc:
                self._drop(conn, f"bad hello: {type(exc).__name__}: {exc}")
                return False
            return True
        if not isinstance(message, dict):
            print(f"[trainkit.detect] dropped a message from rank {conn.rank} that is not a "
                  "JSON object", file=sys.stderr, flush=True)
            return True
        try:
            self._handle(conn, message)
        except (BadMessage, KeyError, TypeError, ValueError, IndexError, AttributeError,
                OverflowError) as exc:
            print(f"[trainkit.detect] bad message from rank {conn.rank}: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return True

    def _authentic(self, hello: dict[str, Any]) -> bool:
        given = hello.get("secret")
        return isinstance(given, str) and hmac.compare_digest(given.encode(), self._secret)

    def _drop(self, conn: _Conn, why: str) -> None:
        """Close a connection that broke the protocol; it leaves no finding."""
        try:
            peer = conn.sock.getpeername()
        except OSError:
            peer = "?"
        print(f"[trainkit.detect] dropped connection from {peer} (rank {conn.rank}): {why}",
              file=sys.stderr, flush=True)
        if conn.authenticated:
            self._disconnected(conn)
        else:
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        self.conns.pop(conn.sock, None)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _disconnected(self, conn: _Conn) -> None:
        self._close(conn)
        self.last_change = time.time()
        info = self._info(conn)
        if info is not None:
            info.connected = False
            if not info.bye and info.lost_at is None:
                info.lost_at = time.time()

    def _info(self, conn: _Conn) -> RankInfo | None:
        if conn.rank is None or conn.attempt != self.timeline.attempt:
            return None
        return self.timeline.ranks.get(conn.rank)

    # -- messages ----------------------------------------------------------------------
    def _handle(self, conn: _Conn, msg: dict[str, Any]) -> None:
        kind = msg.get("t")
        if kind == "hello":
            self._hello(conn, msg)
            return
        if kind == "exit_code":
            info = self.timeline.ranks.get(as_int(msg["rank"], 0, MAX_RANK))
            if info is not None:
                info.exit_code = as_int(msg["code"], -(1 << 31), 1 << 31)
            return
        info = self._info(conn)
        if info is None:
            return
        info.last_seen = time.time()
        if kind == "b":
            self._batch(conn, info, as_list(msg["ev"]))
        elif kind == "clock":
            conn.offset = as_float(msg["offset"])
        elif kind == "group":
            self.timeline.groups[str(msg["name"])] = [as_int(r, 0, MAX_RANK)
                                                      for r in as_list(msg["ranks"])]
        elif kind == "stack":
            info.stack, info.stack_time = str(msg["text"]), time.time()
        elif kind == "exit":
            info.exit_error = str(msg.get("error"))
            info.comm_error = bool(msg.get("comm_error"))
        elif kind == "probe_result":
            self.timeline.probe_results.setdefault(as_int(msg["id"]), {}).update(
                {str(k): as_float(v) for k, v in as_dict(msg["rtt"]).items()})
        elif kind == "peer_probe_result":
            self.timeline.peer_probe_results.setdefault(as_int(msg["id"]), {})[info.rank] = {
                as_int(int(k), 0, MAX_RANK): as_dict(v) for k, v in as_dict(msg["results"]).items()}
        elif kind == "bye":
            info.bye = True

    def _hello(self, conn: _Conn, msg: dict[str, Any]) -> None:
        if not self._authentic(msg):          # also a second hello on a live connection
            raise BadMessage("hello without the job's secret")
        h = parse_hello(msg)
        attempt, rank, world, auto, timeout = h.attempt, h.rank, h.world, h.auto, h.timeout
        conn.authenticated = True
        tl = self.timeline
        if attempt > tl.attempt or (attempt == tl.attempt and not self.ever_connected):
            if attempt != tl.attempt:
                self.timeline = tl = Timeline(attempt, self.local_host)
                previous, self.classifiers = self.classifiers, make_classifiers(self.cfg)
                for old, new in zip(previous, self.classifiers):
                    if hasattr(new, "carry_over") and type(old) is type(new):
                        new.carry_over(old)     # a learned hang timeout outlives a restart
        if self.hang_timeout_from_ranks and (timeout is not None or auto):
            timeout = self.cfg.hang_timeout if auto else timeout
            if timeout != self.cfg.hang_timeout or auto != self.cfg.hang_timeout_auto:
                self.cfg = replace(self.cfg, hang_timeout=timeout, hang_timeout_auto=auto)
                for clf in self.classifiers:
                    clf.cfg = self.cfg
        conn.rank, conn.attempt = rank, attempt
        self.ever_connected = True
        self.last_change = time.time()
        if attempt == tl.attempt:
            tl.world = world or tl.world or None
            tl.ranks[conn.rank] = RankInfo(rank=conn.rank, host=h.host,
                                           local_rank=h.local_rank, attempt=attempt,
                                           node=h.node, pid=h.pid,
                                           peer_probe=_probe_address(conn, msg.get("peer_probe")))
        self._send(conn, {"t": "welcome", "time": time.time()})

    def _batch(self, conn: _Conn, info: RankInfo, events: list) -> None:
        apply_batch(self.timeline, info, conn.offset, events)


def _probe_address(conn: _Conn, advertised: Any) -> tuple[str, int] | None:
    """The rank's peer-probe server; an unknown host is the address its connection came from."""
    try:
        host, port = advertised
        port = int(port)
    except (TypeError, ValueError):
        return None
    if not host or host in ("0.0.0.0", "::"):
        try:
            host = conn.sock.getpeername()[0]
        except OSError:
            return None
    return str(host), port


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainkit.detect.aggregator",
                                description="trainkit anomaly-detection aggregator")
    p.add_argument("--run-dir", required=True, help="findings go to RUN_DIR/diagnosis.jsonl")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=0, help="port to bind (0 picks a free one)")
    p.add_argument("--advertise", default=None, help="host name written to aggregator.json")
    p.add_argument("--hang-timeout", default=None,
                   help="seconds, or 'auto' (learned from the job's step and collective "
                        "durations); default: the value the ranks' monitors send (else 30)")
    p.add_argument("--heartbeat-timeout", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--standalone", action="store_true",
                   help="exit once every rank has gone (how CollectiveMonitor starts it)")
    p.add_argument("--linger", type=float, default=2.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    auto = False
    if args.hang_timeout is not None:
        from trainkit.detect.hangtime import parse_hang_timeout

        try:
            args.hang_timeout = parse_hang_timeout(args.hang_timeout)
        except ValueError:
            print(f"aggregator: --hang-timeout must be > 0 seconds or 'auto', got "
                  f"{args.hang_timeout!r}", file=sys.stderr)
            return 2
        auto = args.hang_timeout is None
    overrides = {k: v for k, v in (("hang_timeout", args.hang_timeout),
                                   ("heartbeat_timeout", args.heartbeat_timeout),
                                   ("warmup_steps", args.warmup_steps),
                                   ("window", args.window)) if v is not None}
    for key in ("hang_timeout", "heartbeat_timeout"):
        if key in overrides and not overrides[key] > 0:
            print(f"aggregator: --{key.replace('_', '-')} must be > 0", file=sys.stderr)
            return 2
    cfg = ClassifierConfig(**overrides, hang_timeout_auto=auto)
    try:
        agg = Aggregator(args.run_dir, host=args.host, port=args.port, advertise=args.advertise,
                         cfg=cfg, hang_timeout_from_ranks=args.hang_timeout is None and not auto,
                         standalone=args.standalone, linger_s=args.linger)
    except ValueError as exc:
        print(f"aggregator: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"aggregator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, agg.stop)
    signal.signal(signal.SIGINT, agg.stop)
    agg.write_address()
    print(f"[trainkit.detect] aggregator listening on {agg.advertise}:{agg.port}",
          file=sys.stderr, flush=True)
    return agg.run()


if __name__ == "__main__":
    sys.exit(main())
