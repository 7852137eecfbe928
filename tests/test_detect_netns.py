"""A real slow link: ranks as separate hosts in Linux network namespaces.

Three namespaces, each with one veth into a bridge that lives in a fourth
("switch") namespace, so the host's own network is never touched. One
direction of one link (rank 1 -> rank 2) is rate-limited with ``tc qdisc htb``
and a destination filter. The job exchanges activations around a ring each
step (pipeline-style point-to-point), as in ``examples/detect_demo.py --p2p``.
The detector must name the link (1, 2). A third test blackholes that link in the
middle of DDP's allreduce: a communication hang, localised by per-peer probes
over trainkit's side channel.

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

    def throttle(self, src: int, dst: int, rate: str, *, burst: str | None = None) -> None:
        """Rate-limit traffic from host ``src`` to host ``dst`` (one direction of one link)."""
        ex = ("ip", "netns", "exec", self.hosts[src])
        _sh(*ex, "tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb",
            "default", "10")
        _sh(*ex, "tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb",
            "rate", "10gbit")
        limits = ("burst", burst, "cburst", burst) if burst else ()
        _sh(*ex, "tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:20", "htb",
            "rate", rate, "ceil", rate, *limits)
        _sh(*ex, "tc", "filter", "add", "dev", "eth0", "protocol", "ip", "parent", "1:0",
            "prio", "1", "u32", "match", "ip", "dst", f"{self.ips[dst]}/32", "flowid", "1:20")

    def blackhole(self, src: int, dst: int) -> None:
        """Stall all traffic from host ``src`` to host ``dst`` without an error.

        ``netem`` and tc actions (``action drop``) are unavailable here, so it is an
        htb class of 8 bit/s with a one-byte burst: after the first packet nothing
        passes, and TCP just retransmits, as over a dead link or a blackholing switch.
        """
        self.throttle(src, dst, "8bit", burst="1")

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


def netns_fabric(world: int):
    """A built :class:`_Fabric` of ``world`` hosts (a generator for fixtures); skips
    where namespaces are not permitted, removes every namespace afterwards."""
    reason = _netns_reason()
    if reason:
        pytest.skip(reason)
    fab = _Fabric(world)
    try:
        try:
            fab.build()
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"could not build the namespace fabric: {exc.stderr.strip()}")
        yield fab
    finally:
        fab.close()


@pytest.fixture
def fabric():
    yield from netns_fabric(WORLD)


class _Job:
    """An aggregator in the switch namespace and one rank per host namespace."""

    def __init__(self, fab: _Fabric, run_dir, script_args: list[str], *, hang_timeout: float = 20):
        self.fab, self.run_dir = fab, run_dir
        self.procs: list[subprocess.Popen] = []
        env = subprocess_env(TRAINKIT_AGG_SECRET="netns-job-secret")
        self.agg = subprocess.Popen(["ip", "netns", "exec", fab.switch, sys.executable, "-m",
                                     "trainkit.detect.aggregator", "--run-dir", str(run_dir),
                                     "--host", fab.switch_ip, "--port", "0", "--hang-timeout",
                                     str(hang_timeout), "--standalone"], env=env, stdout=subprocess.DEVNULL,
                                    stderr=open(run_dir / "aggregator.log", "w"),
                                    start_new_session=True)
        addr = run_dir / "aggregator.json"
        deadline = time.monotonic() + 30
        while not addr.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        info = json.loads(addr.read_text())
        port = 29000 + os.getpid() % 1000
        for rank in range(WORLD):
            rank_env = dict(env, RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK="0",
                            MASTER_ADDR=fab.ips[0], MASTER_PORT=str(port),
                            GLOO_SOCKET_IFNAME="eth0", TRAINKIT_HOSTNAME=fab.hosts[rank],
                            TRAINKIT_AGGREGATOR=f"{info['host']}:{info['port']}")
            self.procs.append(subprocess.Popen(
                ["ip", "netns", "exec", fab.hosts[rank], sys.executable, str(DEMO), "--run-dir",
                 str(run_dir), "--hang-timeout", str(hang_timeout), *script_args], env=rank_env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True))

    def findings(self) -> list[dict]:
        diag = self.run_dir / "diagnosis.jsonl"
        if not diag.exists():
            return []
        return [json.loads(line) for line in diag.read_text().splitlines() if line.strip()]

    def stop(self) -> list[str]:
        stop_aggregator(self.run_dir)
        for p in [*self.procs, self.agg]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        outs = []
        for p in self.procs:
            outs.append(p.communicate(timeout=20)[0] or "")
        self.agg.wait(timeout=20)
        return outs


def _wait_for_step(progress, step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if int(progress.read_text() or 0) >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    pytest.fail(f"the job did not reach step {step}")


def _wait_for_findings(job: "_Job", timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not job.findings() and time.monotonic() < deadline:
        time.sleep(0.2)


def _findings_after_fault(job: "_Job", progress, at_step: int, fault, wait_s: float):
    """Run the job to ``at_step``, apply ``fault()``, wait for findings, stop the job.

    Returns (findings, the time the fault was applied); fails if there are none."""
    try:
        _wait_for_step(progress, at_step, 90)
        fault()
        applied = time.time()
        _wait_for_findings(job, wait_s)
    finally:
        outs = job.stop()
    findings = job.findings()
    assert findings, "no finding after the fault:\n" + "\n".join(o[-800:] for o in outs)
    return findings, applied


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_rate_limited_link_between_namespaces_is_named(fabric, tmp_path):
    """Point-to-point ring traffic over a link rate-limited from the start."""
    fabric.throttle(1, 2, "4mbit")
    job = _Job(fabric, tmp_path, ["--steps", "45", "--p2p", "--p2p-kb", "64",
                                  "--compute-ms", "10"])
    try:
        outs = [p.communicate(timeout=120)[0] for p in job.procs]
        assert all(p.returncode == 0 for p in job.procs), "\n".join(o[-1500:] for o in outs)
        _wait_for_findings(job, 5)
        findings = job.findings()
    finally:
        job.stop()
    assert findings, "no finding for a 4 Mbit/s link"
    assert {f["class"] for f in findings} == {"slow_link"}, findings
    assert findings[0]["link"] == [1, 2]
    assert findings[0]["hosts"] == [fabric.hosts[1], fabric.hosts[2]]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_slow_link_inside_one_allreduce_group_localised_by_probe(fabric, tmp_path):
    """DDP allreduce only (one group): the link slows mid-run; the targeted probe names it."""
    progress = tmp_path / "progress"
    job = _Job(fabric, tmp_path, ["--steps", "100000", "--compute-ms", "10",
                                  "--hidden", "128", "--progress-file", str(progress)])

    def slow_link_1_2() -> None:               # a bad link: both directions
        fabric.throttle(1, 2, "4mbit")
        fabric.throttle(2, 1, "4mbit")

    # Reach step 35 first, so the normal duration is learned.
    findings, _ = _findings_after_fault(job, progress, 35, slow_link_1_2, 60)
    f = findings[0]
    assert f["class"] == "slow_link" and f["link"] == [1, 2], json.dumps(findings)[:3000]
    assert "probe" in f["evidence"]["localisation"] and len(f["evidence"]["probe_rtt_s"]) == 3


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_blackholed_link_hangs_allreduce_and_peer_probes_name_it(fabric, tmp_path):
    """Every rank issued the allreduce and none completes: the link 1-2 stops passing
    traffic (no error, TCP just retransmits). Timings alone can only name the group;
    the per-peer probes over trainkit's own TCP side channel name the link."""
    progress = tmp_path / "progress"
    job = _Job(fabric, tmp_path, ["--steps", "100000", "--compute-ms", "10", "--hidden", "64",
                                  "--progress-file", str(progress)], hang_timeout=4)

    def blackhole_1_2() -> None:
        fabric.blackhole(1, 2)
        fabric.blackhole(2, 1)

    findings, blackholed = _findings_after_fault(job, progress, 20, blackhole_1_2, 40)
    f = findings[0]
    assert f["class"] == "hang_comm", json.dumps(findings)[:3000]
    assert f["link"] == [1, 2] and f["ranks"] == [1, 2], json.dumps(f)[:3000]
    assert f["hosts"] == [fabric.hosts[1], fabric.hosts[2]]
    probe = f["evidence"]["peer_probe"]
    assert probe["failed_pairs"] == [[1, 2]] and probe["pairs_tested"] == 3
    assert {"0->1", "1->0", "0->2", "2->0"} <= set(probe["rtt_s"])     # the healthy links
    assert f["evidence"]["localised"] and f["evidence"]["arrived"] == [0, 1, 2]
    assert f["time"] - blackholed < 4 + 10
