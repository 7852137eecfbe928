"""A real S3-compatible server for tests, and a TCP proxy in front of it that a test can cut.

- :class:`MotoServer` runs moto's S3 server in a child process (``python s3server.py``:
  ``ThreadedMotoServer`` on port 0, so no port is guessed) and stops it. A process of
  its own keeps the server's request handling off the test's GIL. It ends by itself
  when the test process dies: it serves until its stdin closes.
- :class:`CutProxy` forwards loopback TCP connections to the server and can cut them in
  the middle of a transfer: after N more bytes from client to server, the connection
  carrying byte N is closed, and optionally every later connection is refused until
  ``heal()``. moto keeps its objects in memory, so the server itself is never restarted.
- Fixtures: ``moto_server`` (one per test module) and ``s3_bucket`` (a fresh bucket per
  test). Import them into a test module: ``from s3server import moto_server, s3_bucket``.

Used by ``tests/test_checkpoint_s3.py``, ``tests/test_checkpoint_tier_contract.py`` and
``benchmarks/s3_restore_bench.py``.
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

__all__ = ["MotoServer", "CutProxy", "S3Bucket", "moto_server", "s3_bucket"]

CREDENTIALS = {"key": "testing", "secret": "testing"}


class MotoServer:
    """moto's S3 server in a child process, on a free loopback port."""

    def __init__(self, *, start_timeout: float = 60.0) -> None:
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen | None = None
        self._log: Any = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # The server logs every request: to a file, never to a pipe nobody drains (a full
        # pipe would block the server's threads mid-request).
        self._log = tempfile.TemporaryFile(mode="w+", prefix="moto-server-")
        self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._log, env=env, text=True)
        ready, _, _ = select.select([self._proc.stdout], [], [], self._start_timeout)
        line = self._proc.stdout.readline() if ready else ""
        if not line.startswith("port "):
            self._log.seek(0)
            log = self._log.read()[-2000:]
            self.stop()
            raise RuntimeError(f"moto server did not start within {self._start_timeout}s: "
                               f"{line!r}\n{log}")
        self.port = int(line.split()[1])
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()            # the server's cue to stop
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
        self._log.close()

    def create_bucket(self, name: str) -> None:
        """Create a bucket through s3fs (the client the tier uses)."""
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options()).mkdir(name)

    def storage_options(self, endpoint: str | None = None) -> dict:
        """What an FsspecTier/Checkpointer needs to reach ``endpoint`` (default: the server)."""
        return {"endpoint_url": endpoint or self.endpoint, **CREDENTIALS}

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The same as standard AWS environment variables (for the CLI)."""
        return {"AWS_ENDPOINT_URL": endpoint or self.endpoint,
                "AWS_ACCESS_KEY_ID": CREDENTIALS["key"],
                "AWS_SECRET_ACCESS_KEY": CREDENTIALS["secret"],
                "AWS_DEFAULT_REGION": "us-east-1"}

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _reset(sock: socket.socket) -> None:
    """Close with RST (linger 0): the peer sees the connection die, not a clean end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_RDWR)     # wakes a thread blocked in recv() on it
    except OSError:
        pass
    sock.close()


class CutProxy:
    """A loopback TCP proxy to ``(host, port)`` that can cut transfers mid-stream.

    ``cut_after(n)``: after ``n`` more bytes from clients to the server (counted over all
    connections), the connection carrying byte ``n`` is reset, the bytes before it
    having been forwarded; ``stay_down=True`` also resets every open connection and
    refuses new ones until :meth:`heal`. ``cuts`` counts connections cut mid-transfer,
    ``refused`` the connections refused while down.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: set[tuple[socket.socket, socket.socket]] = set()
        self._budget: int | None = None
        self._stay_down = False
        self._down = False
        self._stopped = False
        self.cuts = 0
        self.refused = 0
        self.forwarded = 0
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, name="cut-proxy", daemon=True)
        self._accept.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut_after(self, nbytes: int, *, stay_down: bool = False) -> None:
        with self._lock:
            self._budget = int(nbytes)
            self._stay_down = stay_down

    def heal(self) -> None:
        with self._lock:
            self._budget = None
            self._down = False

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return                      # listener closed: stop()
            with self._lock:
                down = self._down
                if down:
                    self.refused += 1
            if down:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            pair = (client, upstream)
            with self._lock:
                self._conns.add(pair)
            for src, dst, counted in ((client, upstream, True), (upstream, client, False)):
                t = threading.Thread(target=self._pump, args=(pair, src, dst, counted),
                                     daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, pair: tuple[socket.socket, socket.socket], src: socket.socket,
              dst: socket.socket, counted: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                cut = False
                if counted:
                    with self._lock:
                        if self._budget is not None:
                            if len(data) > self._budget:
                                data, cut = data[:self._budget], True
                                self._budget = None
                                self._down = self._stay_down
                            else:
                                self._budget -= len(data)
                        self.forwarded += len(data)
                if data:
                    dst.sendall(data)
                if cut:
                    with self._lock:
                        self.cuts += 1
                        victims = list(self._conns) if self._down else [pair]
                    for c, u in victims:
                        self._close(c, u)
                    return
        except OSError:
            pass
        self._close(*pair)

    def _close(self, client: socket.socket, upstream: socket.socket) -> None:
        with self._lock:
            if (client, upstream) not in self._conns:
                return
            self._conns.discard((client, upstream))
        _reset(client)
        _reset(upstream)

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            conns = list(self._conns)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)   # wakes the accept() (close does not)
        except OSError:
            pass
        self._listener.close()
        for pair in conns:
            self._close(*pair)
        self._accept.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> CutProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class S3Bucket:
    """A bucket on the test server: ``url(prefix)`` and the options to reach it."""

    server: MotoServer
    name: str

    def url(self, prefix: str = "run1") -> str:
        return f"s3://{self.name}/{prefix}"

    @property
    def storage_options(self) -> dict:
        return self.server.storage_options()

    def proxy(self) -> CutProxy:
        """A cuttable proxy in front of the server (close it: ``with bucket.proxy() as p``)."""
        return CutProxy("127.0.0.1", self.server.port)


_bucket_ids = itertools.count()

try:
    import pytest
except ImportError:  # the benchmark imports this module without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="module")
    def moto_server():
        """moto's S3 server for one test module; skipped only if moto is not installed."""
        pytest.importorskip("moto.server", reason="moto[server] is not installed "
                                                  "(pip install -e '.[dev]')")
        pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[s3]')")
        with MotoServer() as server:
            yield server

    @pytest.fixture
    def s3_bucket(moto_server):
        """A fresh, empty bucket on the module's server."""
        name = f"tk-{next(_bucket_ids)}-{uuid.uuid4().hex[:8]}"
        moto_server.create_bucket(name)
        return S3Bucket(moto_server, name)


def _serve() -> None:
    """Child process: serve S3 on a free loopback port until stdin closes."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(f"port {server.get_host_and_port()[1]}", flush=True)
    try:
        sys.stdin.read()
    except KeyboardInterrupt:
        pass
    deadline = time.monotonic() + 5
    stopper = threading.Thread(target=server.stop, daemon=True)
    stopper.start()
    stopper.join(max(0.0, deadline - time.monotonic()))


if __name__ == "__main__":
    _serve()
