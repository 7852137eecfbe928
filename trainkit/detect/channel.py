"""The side channel from a rank to the aggregator: a background thread and a TCP socket.

It is deliberately not the training process group: a rank stuck inside a
collective (its training thread blocked in C++ with the GIL released) still
heartbeats and still answers stack requests through this thread.

Wire format: newline-delimited JSON. Rank to aggregator::

    {"t": "hello", "rank": 0, "world": 4, "host": ..., "local_rank": 0, "attempt": 0, "pid": ...,
     "secret": TRAINKIT_AGG_SECRET}                           # first line, else dropped
    {"t": "b", "now": 1700000000.1, "ev": [EVENT, ...]}      # batch, doubles as heartbeat
    {"t": "group", "name": "0", "ranks": [0, 1, 2, 3]}
    {"t": "stack", "text": "..."}       {"t": "exit", "error": "...", "comm_error": false}
    {"t": "bye"}

with compact events ``["i", group, seq, op, nbytes, dtype, t_issue, step, peer]``
(arrival), ``["d", group, seq, t_done, ok]`` (completion), ``["w", group, seq, t]``
(a point-to-point wait began) and ``["s", step, t]`` (step marker). Aggregator to rank: ``{"t": "welcome", "time": T}`` (clock
offset), ``{"t": "stack_req"}``, ``{"t": "probe", ...}`` (:mod:`linkprobe`) and
``{"t": "peer_probe", "id", "peers", "timeout"}`` (:mod:`peerprobe`), answered by
``{"t": "peer_probe_result", "id", "results"}``. The hello may carry
``"peer_probe": [host or null, port]``.

Who calls what, in order (every rank has one channel; the aggregator has none):

1) (training thread, in ``CollectiveMonitor.install()``) ``Channel(address, hello,
   on_request=...)`` then :meth:`Channel.start`: connect, send the hello, read the
   welcome (clock offset), start the channel thread; False means unmonitored.
2) (any thread) :meth:`Channel.put` for every arrival/completion the recorder stamps,
   :meth:`Channel.send` for groups, stacks and the exit report.
3) (channel thread, every ``flush_s``) drain and send one batch, which is also the
   heartbeat; each request from the aggregator runs ``on_request(message)`` on a
   short-lived thread of its own, so a slow stack dump or probe never delays batches.
4) (training thread, at exit) :meth:`Channel.close`: flush, say bye, join.

Thread safety: :meth:`Channel.put` and :meth:`Channel.send` may be called from
any thread (training thread, gloo callback threads); they never block and never
raise. When the aggregator is unreachable the channel warns once and drops
everything, so training is never blocked or crashed by monitoring.

Cost: ``put`` is the hot path (twice per collective), so it is a bound
``collections.deque.append``: no Python frame, no lock (deque appends and pops
are atomic). The thread drains the deque and sends one batch every
``flush_s`` (default 0.1 s); the deque is bounded, so a stalled connection
can never grow memory without limit.
"""

from __future__ import annotations

import collections
import json
import queue
import select
import socket
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["Channel"]

_FLUSH_S = 0.1
_MAX_BACKLOG = 200_000
# Events per batch line: a backlog drained after a stall goes out as several lines, each
# far below the aggregator's 1 MiB line cap (an event is well under 200 bytes).
_MAX_BATCH_EVENTS = 2_000


class Channel:
    """Rank-side client of the aggregator; see the module docstring for the protocol."""

    def __init__(self, address: tuple[str, int], hello: dict[str, Any], *,
                 on_request: Callable[[dict[str, Any]], None] | None = None,
                 heartbeat_s: float = 0.5, connect_timeout: float = 5.0,
                 flush_s: float = _FLUSH_S):
        self.address = address
        self.hello = hello
        self.on_request = on_request
        self.on_lost: Callable[[], None] | None = None
        """Called once from the channel thread when the connection is lost."""
        self.heartbeat_s = heartbeat_s
        self.connect_timeout = connect_timeout
        self.clock_offset = 0.0
        self.flush_s = flush_s
        self._events: collections.deque = collections.deque(maxlen=_MAX_BACKLOG)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()     # control messages
        self.put: Callable[[Any], None] = _discard
        """Queue a compact event; cheap, thread-safe, never blocks or raises."""
        self._alive = False
        self._warned = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()

    # -- public ------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._alive

    def start(self) -> bool:
        """Connect and start the thread. False (after one warning) if unreachable."""
        try:
            sock = socket.create_connection(self.address, timeout=self.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t0 = time.time()
            sock.sendall((json.dumps({"t": "hello", **self.hello}) + "\n").encode())
            reply = _read_line(sock, self.connect_timeout)
            t1 = time.time()
            welcome = json.loads(reply)
            if welcome.get("t") != "welcome":
                raise ConnectionError(f"unexpected reply {reply[:80]!r}")
            self.clock_offset = float(welcome["time"]) - (t0 + t1) / 2
            sock.settimeout(None)
            sock.setblocking(False)
        except (OSError, ValueError, KeyError, ConnectionError) as exc:
            self._warn(f"aggregator at {self.address[0]}:{self.address[1]} unreachable ({exc}); "
                       "training continues unmonitored")
            return False
        self._sock = sock
        self._alive = True
        self.put = self._events.append
        self._queue.put({"t": "clock", "offset": self.clock_offset})
        self._thread = threading.Thread(target=self._run, name="trainkit-detect-channel", daemon=True)
        self._thread.start()
        return True

    def send(self, message: dict[str, Any]) -> None:
        """Queue a control message (sent with the next flush)."""
        if self._alive:
            self._queue.put(message)

    def close(self, *, bye: bool = True, timeout: float = 2.0) -> None:
        """Flush what is queued, say goodbye, stop the thread."""
        if self._thread is None:
            return
        if bye:
            self.send({"t": "bye"})
        self._stop.set()
        self._thread.join(timeout=timeout)
        self._thread = None
        self._alive = False
        self.put = _discard
        self._events.clear()
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass

    # -- thread --------------------------------------------------------------------
    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"trainkit.detect: {message}", RuntimeWarning, stacklevel=3)

    def _run(self) -> None:
        last_beat = 0.0
        inbuf = b""
        while True:
            stopping = self._stop.is_set()
            events = self._drain()
            controls: list[dict] = []
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, dict):
                    controls.append(item)
                else:
                    events.append(item)
            now = time.time()
            lines = []
            if events or now - last_beat >= self.heartbeat_s:
                for i in range(0, max(len(events), 1), _MAX_BATCH_EVENTS):
                    lines.append(json.dumps({"t": "b", "now": now,
                                             "ev": events[i:i + _MAX_BATCH_EVENTS]},
                                            separators=(",", ":")))
                last_beat = now
            lines.extend(json.dumps(c, separators=(",", ":")) for c in controls)
            if lines and not self._sendall(("\n".join(lines) + "\n").encode()):
                return
            if stopping:
                return
            # Control messages (stacks, probe results, exit) go out on the next turn.
            inbuf = self._receive(inbuf, self.flush_s if self._queue.empty() else 0.0)
            if inbuf is None:
                return

    def _drain(self) -> list:
        events, popleft = [], self._events.popleft
        try:
            for _ in range(len(self._events)):
                events.append(popleft())
        except IndexError:
            pass
        return events

    def _sendall(self, data: bytes) -> bool:
        sock = self._sock
        assert sock is not None
        view = memoryview(data)
        deadline = time.monotonic() + 10.0
        try:
            while view:
                _, writable, _ = select.select([], [sock], [], 0.5)
                if writable:
                    sent = sock.send(view)
                    view = view[sent:]
                elif time.monotonic() > deadline:
                    raise TimeoutError("send stalled for 10 s")
        except OSError as exc:
            self._lost(f"lost the aggregator connection ({exc}); training continues unmonitored")
            return False
        return True

    def _receive(self, inbuf: bytes, wait_s: float) -> bytes | None:
        sock = self._sock
        assert sock is not None
        try:
            readable, _, _ = select.select([sock], [], [], wait_s)
            if not readable:
                return inbuf
            chunk = sock.recv(65536)
        except OSError as exc:
            self._lost(f"lost the aggregator connection ({exc}); training continues unmonitored")
            return None
        if not chunk:
            self._lost("the aggregator closed the connection; training continues unmonitored")
            return None
        inbuf += chunk
        while b"\n" in inbuf:
            line, inbuf = inbuf.split(b"\n", 1)
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if self.on_request is not None:
                threading.Thread(target=self._handle, args=(message,), daemon=True,
                                 name="trainkit-detect-request").start()
        return inbuf

    def _handle(self, message: dict) -> None:
        try:
            assert self.on_request is not None
            self.on_request(message)
        except Exception as exc:  # noqa: BLE001 - a monitoring request must never hurt training
            self._warn(f"request {message.get('t')!r} failed: {exc}")

    def _lost(self, message: str) -> None:
        self._alive = False
        self.put = _discard
        self._events.clear()
        self._warn(message)
        if self.on_lost is not None:
            try:
                self.on_lost()
            except Exception:  # noqa: BLE001 - monitoring must never hurt training
                pass


def _discard(_event: Any) -> None:
    return None


def _read_line(sock: socket.socket, timeout: float) -> str:
    sock.settimeout(timeout)
    buf = b""
    while b"\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed during handshake (the aggregator drops a "
                                  "hello without the job's TRAINKIT_AGG_SECRET)")
        buf += chunk
    return buf.split(b"\n", 1)[0].decode()
