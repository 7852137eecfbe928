"""The aggregator against hostile or broken clients (issue 16): only ranks with the job's
secret are heard, junk never kills it, an endless line never grows it."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from trainkit.detect.monitor import start_aggregator
from trainkit.rundir import AGG_SECRET_ENV

pytestmark = pytest.mark.timeout(60)

SECRET = "test-secret-0123456789"


@pytest.fixture()
def agg(tmp_path, monkeypatch):
    monkeypatch.setenv(AGG_SECRET_ENV, SECRET)
    host, port, pid = start_aggregator(tmp_path, hang_timeout=30.0, standalone=False)
    yield tmp_path, (host, port), pid
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _connect(address, *lines: object) -> socket.socket:
    sock = socket.create_connection(address, timeout=5)
    for line in lines:
        data = line if isinstance(line, bytes) else json.dumps(line).encode()
        sock.sendall(data + b"\n")
    return sock


def _hello(rank=0, *, secret=SECRET, attempt=0, host="node1") -> dict:
    msg = {"t": "hello", "rank": rank, "world": 2, "host": host, "local_rank": 0,
           "attempt": attempt, "pid": 999_999_999 - rank}
    if secret is not None:
        msg["secret"] = secret
    return msg


def _welcomed(sock: socket.socket) -> bool:
    buf = b""
    while b"\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            return False
        buf += chunk
    return json.loads(buf.split(b"\n")[0])["t"] == "welcome"


def _closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def _findings(run_dir) -> list[dict]:
    path = run_dir / "diagnosis.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_forged_hello_is_dropped_and_writes_no_finding(agg):
    run_dir, address, pid = agg
    for bad in (_hello(secret=None), _hello(secret="wrong"), _hello(secret=123)):
        sock = _connect(address, bad, {"t": "exit", "error": "forged", "comm_error": False})
        assert _closed_by_peer(sock)
        sock.close()
    sock = _connect(address, {"t": "exit_code", "rank": 0, "code": 9})   # no hello at all
    assert _closed_by_peer(sock)
    time.sleep(1.0)
    assert _findings(run_dir) == []
    # the genuine rank is still heard: the same exit now is a crash finding
    real = _connect(address, _hello())
    assert _welcomed(real)
    real.sendall(json.dumps({"t": "exit", "error": "boom", "comm_error": False}).encode() + b"\n")
    deadline = time.monotonic() + 10
    while not _findings(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    (finding,) = _findings(run_dir)
    assert finding["class"] == "crash" and finding["ranks"] == [0]
    real.close()


def test_unauthenticated_higher_attempt_does_not_wipe_the_timeline(agg):
    run_dir, address, pid = agg
    real = _connect(address, _hello())
    assert _welcomed(real)
    forged = _connect(address, _hello(secret=None, attempt=7))
    assert _closed_by_peer(forged)
    bad_attempt = _connect(address, _hello(attempt=-1))      # authentic but invalid
    assert _closed_by_peer(bad_attempt)
    real.sendall(json.dumps({"t": "exit", "error": "boom", "comm_error": False}).encode() + b"\n")
    deadline = time.monotonic() + 10
    while not _findings(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [f["ranks"] for f in _findings(run_dir)] == [[0]]


def test_junk_messages_are_dropped_and_the_aggregator_lives(agg):
    run_dir, address, pid = agg
    sock = _connect(address, _hello())
    assert _welcomed(sock)
    junk = [b"[1, 2, 3]", b"42", b'"t"', b"not json", b"[" * 100_000 + b"]" * 100_000,
            {"t": "b", "ev": "x"}, {"t": "b", "ev": [["i", "g", "seq", "op", 1, "f", 0, 0, None]]},
            {"t": "b", "ev": [{"a": 1}, [], ["d"], ["s", "x", None], ["i", [1], 1, {}, "n", 1, 1, 1, 1]]},
            {"t": "b", "ev": [["i", "0", 1, "allreduce", 1e400, "f32", 1.0, 0, None]]},
            {"t": "clock", "offset": "x"}, {"t": "group", "name": "g", "ranks": "abc"},
            {"t": "probe_result", "id": [], "rtt": []}, {"t": "peer_probe_result", "id": 1,
                                                        "results": {"x": 1}},
            {"t": "exit_code", "rank": "0", "code": None}, {"t": []}, {"t": {"a": 1}},
            {"t": "hello", "rank": 0, "secret": SECRET, "attempt": 2 ** 80}]
    for item in junk:
        sock.sendall((item if isinstance(item, bytes) else json.dumps(item).encode()) + b"\n")
    time.sleep(1.0)
    assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the aggregator died"
    other = _connect(address, _hello(rank=1))
    assert _welcomed(other), "the aggregator no longer serves"
    sock.close()
    other.close()


def test_endless_line_drops_the_connection_and_keeps_the_aggregator_small(agg):
    run_dir, address, pid = agg
    sock = _connect(address, _hello())
    assert _welcomed(sock)
    before = _rss_kib(pid)
    started = time.monotonic()
    blob = b"x" * (1 << 20)
    try:
        for _ in range(5):               # 5 MiB without a newline
            sock.sendall(blob)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert _closed_by_peer(sock)
    assert time.monotonic() - started < 10
    assert _rss_kib(pid) - before < 16 * 1024, "the aggregator grew with the line"
    other = _connect(address, _hello(rank=1))
    assert _welcomed(other)
    other.close()
    # an unauthenticated client sending without a newline is cut off the same way
    sock = _connect(address)
    try:
        for _ in range(3):
            sock.sendall(blob)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert _closed_by_peer(sock)


def test_aggregator_refuses_to_start_without_a_secret(tmp_path):
    import subprocess
    import sys

    from distributed import subprocess_env

    env = subprocess_env()
    env.pop(AGG_SECRET_ENV, None)
    proc = subprocess.run([sys.executable, "-m", "trainkit.detect.aggregator", "--run-dir",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 2 and AGG_SECRET_ENV in proc.stderr
