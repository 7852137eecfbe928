"""A real slow link: ranks as separate hosts in Linux network namespaces.

Three namespaces, each with one veth into a bridge that lives in a fourth
("switch") namespace, so the host's own network is never touched. One
direction of one link (rank 1 -> rank 2) is rate-limited with ``tc qdisc htb``
and a destination filter. The job exchanges activations around a ring each
step (pipeline-style point-to-point), as in ``examples/detect_demo.py --p2p``.
The detector must name the link (1, 2).

Skipped, with the reason, where network namespaces are not permitted (not
root, no ``ip``/``tc``, or a sandbox that forbids them). Set
``TRAINKIT_SKIP_NETNS=1`` to skip it on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from distributed import REPO_ROOT, subprocess_env
from trainkit.detect.drill import stop_aggregator

DEMO = REPO_ROOT / "examples" / "detect_demo.py"
WORLD = 3


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=20)


class _Fabric:
    """netns + veth + bridge; ``close()`` removes every namespace it made."""

    def __init__(self, world: int):
        tag = f"{os.getpid() % 100000}"
        self.subnet = f"10.{100 + os.getpid() % 100}.{os.getpid() % 250}"
        self.switch = f"tksw{tag}"
        self.hosts = [f"tkh{tag}r{i}" for i in range(world)]
        self.ips = [f"{self.subnet}.{i + 1}" for i in range(world)]
        self.switch_ip = f"{self.subnet}.254"
        self.made: list[str] = []

    def build(self) -> None:
        _sh("ip", "netns", "add", self.switch)
        self.made.append(self.switch)
        sw = ("ip", "netns", "exec", self.switch)
        _sh(*sw, "ip", "link", "add", "br0", "type", "bridge")
        _sh(*sw, "ip", "addr", "add", f"{self.switch_ip}/24", "dev", "br0")
        _sh(*sw, "ip", "link", "set", "br0", "up")
        _sh(*sw, "ip", "link", "set", "lo", "up")
        for i, (ns, ip) in enumerate(zip(self.hosts, self.ips)):
            _sh("ip", "netns", "add", ns)
            self.made.append(ns)
            _sh("ip", "link", "add", f"tkv{os.getpid() % 10000}x{i}", "type", "veth", "peer",
                "name", f"tkp{os.getpid() % 10000}x{i}")
            _sh("ip", "link", "set", f"tkv{os.getpid() % 10000}x{i}", "netns", ns)
            _sh("ip", "link", "set", f"tkp{os.getpid() % 10000}x{i}", "netns", self.switch)
            ex = ("ip", "netns", "exec", ns)
            _sh(*ex, "ip", "link", "set", f"tkv{os.getpid() % 10000}x{i}", "name", "eth0")
            _sh(*ex, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            _sh(*ex, "ip", "link", "set", "eth0", "up")
            _sh(*ex, "ip", "link", "set", "lo", "up")
            _sh(*sw, "ip", "link", "set", f"tkp{os.getpid() % 10000}x{i}", "master", "br0")
            _sh(*sw, "ip", "link", "set", f"tkp{os.getpid() % 10000}x{i}", "up")

    def throttle(self, src: int, dst: int, rate: str) -> None:
        """Rate-limit traffic from host ``src`` to host ``dst`` (one direction of one link)."""
        ex = ("ip", "netns", "exec", self.hosts[src])
        _sh(*ex, "tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb",
            "default", "10")
        _sh(*ex, "tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb",
            "rate", "10gbit")
        _sh(*ex, "tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:20", "htb",
            "rate", rate, "ceil", rate)
        _sh(*ex, "tc", "filter", "add", "dev", "eth0", "protocol", "ip", "parent", "1:0",
            "prio", "1", "u32", "match", "ip", "dst", f"{self.ips[dst]}/32", "flowid", "1:20")

    def close(self) -> None:
        for ns in reversed(self.made):
            _sh("ip", "netns", "del", ns, check=False)


def _netns_reason() -> str | None:
    if os.environ.get("TRAINKIT_SKIP_NETNS") == "1":
        return "TRAINKIT_SKIP_NETNS=1"
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "iproute2 (ip, tc) not installed"
    probe = f"tkprobe{os.getpid()}"
    res = _sh("ip", "netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"network namespaces not permitted here: {res.stderr.strip()}"
    _sh("ip", "netns", "del", probe, check=False)
    return None


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_rate_limited_link_between_namespaces_is_named(tmp_path):
    reason = _netns_reason()
    if reason:
        pytest.skip(reason)
    fab = _Fabric(WORLD)
    procs: list[subprocess.Popen] = []
    agg = None
    try:
        try:
            fab.build()
            fab.throttle(1, 2, "4mbit")
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"could not build the namespace fabric: {exc.stderr.strip()}")
        port = 29000 + os.getpid() % 1000
        env = subprocess_env()
        agg = subprocess.Popen(["ip", "netns", "exec", fab.switch, sys.executable, "-m",
                                "trainkit.detect.aggregator", "--run-dir", str(tmp_path), "--host",
                                fab.switch_ip, "--port", "0", "--hang-timeout", "5",
                                "--standalone"], env=env, stdout=subprocess.DEVNULL,
                               stderr=open(tmp_path / "aggregator.log", "w"),
                               start_new_session=True)
        addr = tmp_path / "aggregator.json"
        deadline = time.monotonic() + 30
        while not addr.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        info = json.loads(addr.read_text())
        for rank in range(WORLD):
            rank_env = dict(env, RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK="0",
                            MASTER_ADDR=fab.ips[0], MASTER_PORT=str(port),
                            GLOO_SOCKET_IFNAME="eth0", TRAINKIT_HOSTNAME=fab.hosts[rank],
                            TRAINKIT_AGGREGATOR=f"{info['host']}:{info['port']}")
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", fab.hosts[rank], sys.executable, str(DEMO), "--run-dir",
                 str(tmp_path), "--steps", "45", "--p2p", "--p2p-kb", "64", "--compute-ms", "10",
                 "--hang-timeout", "5"], env=rank_env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, start_new_session=True))
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(o[-1500:] for o in outs)
        diag = tmp_path / "diagnosis.jsonl"
        deadline = time.monotonic() + 5
        while not diag.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        findings = [json.loads(line) for line in diag.read_text().splitlines()]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        stop_aggregator(tmp_path)
        if agg is not None and agg.poll() is None:
            os.killpg(agg.pid, signal.SIGKILL)
            agg.wait(timeout=10)
        fab.close()
    assert findings, "no finding for a 4 Mbit/s link"
    assert {f["class"] for f in findings} == {"slow_link"}, findings
    assert findings[0]["link"] == [1, 2]
    assert findings[0]["hosts"] == [fab.hosts[1], fab.hosts[2]]
