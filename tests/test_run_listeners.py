"""Where a one-host `trainkit run` listens (issue 16): every LISTEN socket of the job's
process tree, read from /proc/net/tcp and tcp6 while it runs, is on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distributed import subprocess_env

pytestmark = [pytest.mark.timeout(150), pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs /proc/net/tcp")]

JOB = textwrap.dedent("""
    import os, time, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    run_dir = os.environ["TRAINKIT_RUN_DIR"]
    for step in range(100000):
        t = torch.ones(4); dist.all_reduce(t)
        if os.path.exists(os.path.join(run_dir, "stop")):
            break
        time.sleep(0.05)
        if step == 20:
            open(os.path.join(run_dir, "steady.%d" % dist.get_rank()), "w").close()
    dist.destroy_process_group()
""")


def _tree(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    return seen


def _socket_inodes(pids: set[int]) -> dict[str, int]:
    inodes = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = pid
    return inodes


def _is_loopback(hex_addr: str) -> bool:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return raw[::-1][0] == 127                        # little-endian IPv4
    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]  # IPv6: four little-endian words
    addr = b"".join(words)
    return addr == b"\0" * 15 + b"\1" or (addr[:12] == b"\0" * 10 + b"\xff\xff" and addr[12] == 127)


def _listeners(inodes: dict[str, int]) -> list[tuple[str, str, int, int]]:
    found = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:          # 0A = LISTEN
                addr, port = fields[1].split(":")
                found.append((table, addr, int(port, 16), inodes[fields[9]]))
    return found


def test_one_host_run_listens_only_on_loopback(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainkit", "run", "--run-dir", str(run_dir), "--no-warm-start",
           "--", "--nproc-per-node=2", "--monitor-interval=0.1", str(script)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 100
        while time.monotonic() < deadline and proc.poll() is None:
            if run_dir.exists() and len(list(run_dir.glob("steady.*"))) == 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert len(list(run_dir.glob("steady.*"))) == 2, "the job did not reach steady state"
        listeners = _listeners(_socket_inodes(_tree(proc.pid)))
        kinds = {open(f"/proc/{pid}/cmdline").read().split("\0")[2] for *_, pid in listeners
                 if os.path.exists(f"/proc/{pid}/cmdline")}
        (run_dir / "stop").touch()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    # the coordinator's store, torchrun's worker store, the aggregator and the probe servers
    assert len(listeners) >= 3, listeners
    assert {"trainkit", "trainkit.run.torchrun_main", "trainkit.detect.aggregator"} <= kinds, kinds
    exposed = [entry for entry in listeners if not _is_loopback(entry[1])]
    assert exposed == [], f"listening beyond loopback: {exposed}"
