"""Per-peer probes that localise a communication hang: the echo server, the
parallel prober, the pure localisation rule, and the hang classifier using them."""

from __future__ import annotations

import socket
import time

import pytest

from trainkit.detect.classifiers import HangClassifier
from trainkit.detect.knobs import ClassifierConfig
from trainkit.detect.peerprobe import PeerProbeServer, localise, probe_peers
from trainkit.detect.timeline import RankInfo, Timeline

CFG = ClassifierConfig(hang_timeout=2.0, heartbeat_timeout=3.0, stack_wait_s=0.5)
OK = {"ok": True, "rtt_s": 0.001, "error": None}
FAIL = {"ok": False, "rtt_s": None, "error": "TimeoutError: timed out"}


def _all_pairs(members, bad=frozenset(), silent=frozenset()):
    """results[prober][peer], failing every probe that touches a bad pair or a silent rank."""
    out = {}
    for a in members:
        if a in silent:
            continue
        out[a] = {b: (FAIL if frozenset((a, b)) in bad or b in silent else OK)
                  for b in members if b != a}
    return out


@pytest.mark.timeout(30)
def test_server_echoes_and_a_closed_port_fails_fast():
    server = PeerProbeServer("127.0.0.1")
    with socket.socket() as s:                 # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    try:
        t0 = time.monotonic()
        res = probe_peers({1: ("127.0.0.1", server.port), 2: ("127.0.0.1", dead_port)},
                          timeout=1.0)
        assert time.monotonic() - t0 < 2.0
    finally:
        server.close()
    assert res[1]["ok"] and res[1]["rtt_s"] > 0
    assert not res[2]["ok"] and "Connection" in res[2]["error"]


@pytest.mark.timeout(30)
def test_a_listener_that_never_echoes_times_out():
    """A frozen process: the kernel accepts the connection but nobody answers."""
    with socket.create_server(("127.0.0.1", 0)) as frozen:
        t0 = time.monotonic()
        res = probe_peers({3: ("127.0.0.1", frozen.getsockname()[1])}, timeout=0.5)
        assert time.monotonic() - t0 < 1.5
    assert not res[3]["ok"] and "timed out" in res[3]["error"]


def test_localise_one_failed_link():
    out = localise(_all_pairs(range(4), bad={frozenset((1, 2))}), range(4))
    assert out["localised"] and out["link"] == (1, 2) and out["ranks"] == [1, 2]
    assert out["failed_pairs"] == [[1, 2]] and out["pairs_tested"] == 6
    assert "1->2" in out["errors"] and "2->1" in out["errors"]


def test_localise_a_rank_whose_every_link_fails():
    bad = {frozenset((2, r)) for r in (0, 1, 3)}
    out = localise(_all_pairs(range(4), bad=bad), range(4))
    assert out["localised"] and out["ranks"] == [2] and out["link"] is None


def test_localise_a_silent_rank():
    """Rank 3 neither answers the request nor echoes: it is named, even in a pair of two."""
    out = localise(_all_pairs(range(4), silent={3}), range(4))
    assert out["ranks"] == [3] and out["unanswered"] == [3]
    out = localise(_all_pairs(range(2), silent={1}), range(2))
    assert out["ranks"] == [1] and out["link"] is None


def test_localise_healthy_network_says_so():
    out = localise(_all_pairs(range(3)), range(3))
    assert not out["localised"] and out["ranks"] == [] and out["failed_pairs"] == []
    assert "does not localise" in out["summary"]
    assert not localise({}, range(3))["localised"]


def test_localise_unrelated_failures_name_every_rank_involved():
    out = localise(_all_pairs(range(4), bad={frozenset((0, 1)), frozenset((2, 3))}), range(4))
    assert out["ranks"] == [0, 1, 2, 3] and out["link"] is None


def _hung_timeline(world):
    tl = Timeline(0, "h")
    tl.world = world
    for r in range(world):
        tl.ranks[r] = RankInfo(rank=r, host=f"h{r}", last_seen=0.0,
                               peer_probe=(f"10.0.0.{r + 1}", 4000 + r))
    tl.groups["0"] = list(range(world))
    for r in range(world):
        tl.on_issue(r, "0", 3, "allreduce", 8, "float32", 50.0, 1)
    return tl


def test_hang_comm_names_the_link_the_peer_probes_implicate():
    tl = _hung_timeline(3)
    clf = HangClassifier(CFG)
    assert clf.check(tl, 52.5) == []
    (request,) = tl.peer_probe_requests
    assert request["ranks"] == [0, 1, 2] and request["peers"][2] == ("10.0.0.3", 4002)
    tl.peer_probe_results[request["id"]] = _all_pairs(range(3), bad={frozenset((1, 2))})
    for r in range(3):
        tl.ranks[r].stack, tl.ranks[r].stack_time = "stack", 52.6
    (f,) = clf.check(tl, 52.7)                 # every answer in: no need to wait longer
    assert f.cls == "hang_comm" and f.ranks == (1, 2) and f.link == (1, 2)
    assert f.hosts == ("h1", "h2") and f.group == "0"
    assert f.evidence["localised"] and f.evidence["peer_probe"]["failed_pairs"] == [[1, 2]]
    assert "link 1-2" in f.evidence["note"]


def test_hang_comm_with_a_healthy_network_names_the_group_and_says_why():
    tl = _hung_timeline(3)
    clf = HangClassifier(CFG)
    clf.check(tl, 52.5)
    (request,) = tl.peer_probe_requests
    tl.peer_probe_results[request["id"]] = _all_pairs(range(3))
    (f,) = clf.check(tl, 53.1)
    assert f.ranks == (0, 1, 2) and f.link is None and not f.evidence["localised"]
    assert "does not localise" in f.evidence["note"]


def test_peers_to_probe_all_pairs_in_small_groups_ring_neighbours_in_large_ones():
    from trainkit.detect.peerprobe import peers_to_probe

    assert peers_to_probe(1, [0, 1, 2, 3]) == [0, 2, 3]
    assert peers_to_probe(5, [0, 1]) == []
    big = list(range(100))
    assert peers_to_probe(0, big) == [1, 2, 3, 4, 5, 6, 7, 8, 92, 93, 94, 95, 96, 97, 98, 99]


def test_localise_every_pair_failing_is_not_blamed_on_anyone():
    """All probes failing looks like a firewall between hosts, not a culprit."""
    bad = {frozenset((a, b)) for a in range(3) for b in range(3) if a != b}
    out = localise(_all_pairs(range(3), bad=bad), range(3))
    assert not out["localised"] and out["ranks"] == [] and "blocked" in out["summary"]


_FREEZE_JOB = '''
import argparse, datetime, os, signal, time
import torch, torch.distributed as dist
from trainkit.detect import CollectiveMonitor

p = argparse.ArgumentParser()
p.add_argument("--run-dir")
p.add_argument("--freeze-rank", type=int)
p.add_argument("--freeze-step", type=int)
a = p.parse_args()
torch.set_num_threads(1)
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank = dist.get_rank()
mon = CollectiveMonitor(run_dir=a.run_dir, hang_timeout=2.0).start()
t = torch.ones(4096)
for step in range(100000):
    mon.step(step)
    if step == a.freeze_step and rank != a.freeze_rank:
        time.sleep(1.0)                  # arrive only once the frozen rank is frozen
    work = dist.all_reduce(t, async_op=True)
    if step == a.freeze_step and rank == a.freeze_rank:
        time.sleep(0.3)                  # its channel has sent the arrival (100 ms batches)
        os.kill(os.getpid(), signal.SIGSTOP)     # then the whole process freezes
    work.wait()
    time.sleep(0.01)
'''


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_frozen_rank_inside_allreduce_is_named_by_peer_probes(tmp_path):
    """Rank 2 issues allreduce #k and, waiting in it, its whole process stops
    (SIGSTOP): every rank arrived, none completes, so timings only name the group.
    Its peers' probes get no echo and it answers nothing itself, so the finding
    names rank 2. (Frozen before its arrival was sent, it is ``hang_noncomm``.)"""
    from trainkit.detect.drill import run_drill

    script = tmp_path / "freeze_job.py"
    script.write_text(_FREEZE_JOB)
    res = run_drill(script, world=3, run_dir=tmp_path / "run", timeout=60,
                    script_args=["--freeze-rank", "2", "--freeze-step", "8"])
    assert [f["class"] for f in res.findings] == ["hang_comm"], res.findings
    f = res.findings[0]
    assert f["ranks"] == [2] and f["link"] is None and f["step"] == 8
    probe = f["evidence"]["peer_probe"]
    assert probe["unanswered"] == [2] and probe["failed_pairs"] == [[0, 2], [1, 2]]
    assert "0->1" in probe["rtt_s"] and "1->0" in probe["rtt_s"]
    assert sorted(f["evidence"]["arrived"]) == [0, 1, 2] and f["evidence"]["completed"] == []
