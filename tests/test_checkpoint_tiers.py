"""Multi-level tiers in one process: the flow down, retention, fallback, the memory tier
surviving a crashed worker, and GC under kill -9."""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from distributed import subprocess_env
from trainkit.checkpoint import Checkpointer, CheckpointNotFoundError, verify_step
from trainkit.checkpoint.tiers.keeper import keeper_pid, live_leases, main as keeper_main
from trainkit.checkpoint.reader import committed_steps
from trainkit.checkpoint.tiers.retention import plan_gc
from trainkit.checkpoint.tiers import LocalTier

pytestmark = pytest.mark.timeout(240)


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(256, 64, generator=g), "step": step}


def _tiers(tmp_path, **kw) -> Checkpointer:
    return Checkpointer(tmp_path / "p", local_dir=tmp_path / "l", memory_dir=tmp_path / "m",
                        chunk_bytes=16 << 10, **kw)


def test_steps_flow_down_with_retention_per_tier(tmp_path):
    with _tiers(tmp_path, keep_in_memory=1, keep_local=2, keep_persistent=2,
                persist_every=2, keep_every=3) as ck:
        for step in range(1, 9):
            ck.save(step, _state(step)).result(timeout=60)
            ck.wait()
            assert ck.tiers(step)[:2] == ["memory", "local"]
        # memory keeps 1, local 2; saves number 0, 2, 4, 6 (steps 1, 3, 5, 7) persisted,
        # 2 kept there plus step 3 (keep_every=3)
        assert committed_steps(LocalTier(str(tmp_path / "m"))) == [8]
        assert committed_steps(LocalTier(str(tmp_path / "l"))) == [7, 8]
        assert committed_steps(LocalTier(str(tmp_path / "p"))) == [3, 5, 7]
        assert ck.tiers(7) == ["local", "persistent"]
    # close() persists the newest step even though persist_every skipped it; retention
    # then keeps 2 of them, plus step 3 (keep_every)
    assert committed_steps(LocalTier(str(tmp_path / "p"))) == [3, 7, 8]
    for step in (3, 7, 8):
        assert verify_step(str(tmp_path / "p"), step) == []


def test_load_takes_the_fastest_tier_and_falls_back(tmp_path, caplog):
    with _tiers(tmp_path, keep_in_memory=1) as ck:
        for step in (1, 2):
            ck.save(step, _state(step))
        ck.wait()
    with _tiers(tmp_path, keep_in_memory=1) as ck:
        assert ck.tiers(2) == ["memory", "local", "persistent"]
        assert torch.equal(ck.load()["w"], _state(2)["w"]) and ck.loaded_step == 2
        assert ck.loaded_from == "memory"
        # corrupt the memory copy, delete the local one: persistent serves, with a log
        chunk = tmp_path / "m" / "step_0000000002" / "rank_00000" / "data" / "c" / "1"
        data = bytearray(chunk.read_bytes())
        data[100] ^= 0xFF
        chunk.write_bytes(bytes(data))
        shutil.rmtree(tmp_path / "l" / "step_0000000002" / "rank_00000")
        with caplog.at_level(logging.WARNING, logger="trainkit.checkpoint"):
            state = ck.load()
        assert ck.loaded_step == 2 and torch.equal(state["w"], _state(2)["w"])
        assert ck.loaded_from == "persistent"
        text = caplog.text
        assert "checksum mismatch" in text and "falling back" in text and "memory" in text
        # every copy of step 2 broken: step by step fallback to step 1
        shutil.rmtree(tmp_path / "p" / "step_0000000002" / "rank_00000")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="trainkit.checkpoint"):
            state = ck.load()
        assert ck.loaded_step == 1 and torch.equal(state["w"], _state(1)["w"])
        assert "falling back to step 1" in caplog.text


def test_wiped_local_disk_restores_from_persistent(tmp_path):
    with _tiers(tmp_path) as ck:
        ck.save(5, _state(5)).result(timeout=60)
    shutil.rmtree(tmp_path / "l")
    with _tiers(tmp_path) as ck:
        assert ck.tiers(5) == ["persistent"]
        assert torch.equal(ck.load()["w"], _state(5)["w"]) and ck.loaded_step == 5


def test_bad_tier_settings_are_named(tmp_path):
    for kw, word in [({"keep_local": 0}, "keep_local"), ({"persist_every": 0}, "persist_every"),
                     ({"keep_in_memory": -1}, "keep_in_memory"), ({"keep_every": "x"},
                                                                  "keep_every")]:
        with pytest.raises(ValueError, match=word):
            Checkpointer(tmp_path / "p", **kw)


def test_plan_gc_rules():
    plan = plan_gc("persistent", [1, 2, 3, 4, 5], [0, 6], keep=2, keep_every=2,
                   protect=frozenset({3}))
    assert plan.delete == (1,) and plan.kept == (2, 3, 4, 5) and plan.leftovers == (0,)
    assert plan_gc("local", [], [4], keep=1).leftovers == ()     # nothing newer committed
    assert plan_gc("x", [1, 2], [], keep=None).delete == ()
    with pytest.raises(ValueError):
        plan_gc("x", [1], [], keep=0)


_CRASHING_WORKER = textwrap.dedent("""
    import os, signal, sys, torch
    from trainkit.checkpoint import Checkpointer
    path = sys.argv[1]
    ck = Checkpointer(path, keep_in_memory=1, persist_every=1000, keeper_ttl=60)
    start = int(sys.argv[2])
    for step in (start, start + 1):
        g = torch.Generator().manual_seed(step)
        ck.save(step, {"w": torch.randn(256, 64, generator=g), "step": step}).result(timeout=60)
    ck.wait()
    print("TIERS", ck.tiers(start), ck.tiers(start + 1), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)       # no close(): a crashed worker
""")

_RESTARTED_WORKER = textwrap.dedent("""
    import sys, torch
    from trainkit.checkpoint import Checkpointer
    ck = Checkpointer(sys.argv[1], keep_in_memory=1, persist_every=1000, keeper_ttl=60)
    print("TIERS", ck.latest(), ck.tiers(ck.latest()), flush=True)
    state = ck.load()
    g = torch.Generator().manual_seed(ck.loaded_step)
    assert torch.equal(state["w"], torch.randn(256, 64, generator=g))
    print("LOADED", ck.loaded_step, ck.loaded_from, flush=True)
    ck.close()
""")


def test_memory_tier_survives_a_crashed_worker(tmp_path):
    from trainkit.checkpoint.tiers.keeper import memory_dir_for

    path = str(tmp_path / "ck")
    mem, owned = memory_dir_for(path)
    assert not owned and mem.startswith("/dev/shm/")
    try:
        crashed = subprocess.run([sys.executable, "-c", _CRASHING_WORKER, path, "1"],
                                 env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr
        # step 1 was persisted (the first save) and left memory (keep 1); step 2 lives only
        # in /dev/shm
        assert "TIERS ['persistent'] ['memory']" in crashed.stdout, crashed.stdout
        assert keeper_pid(mem) is not None        # the keeper outlives the worker
        again = subprocess.run([sys.executable, "-c", _RESTARTED_WORKER, path],
                               env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert "TIERS 2 ['memory']" in again.stdout, again.stdout
        assert "LOADED 2 memory" in again.stdout
        assert committed_steps(path) == [1] and committed_steps(mem) == [2]
    finally:
        pid = keeper_pid(mem)
        if pid:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(mem, ignore_errors=True)


def test_keeper_frees_the_memory_tier_once_no_worker_is_left(tmp_path):
    mem = tmp_path / "shm"
    (mem / ".leases").mkdir(parents=True)
    (mem / ".leases" / "999999999").touch()          # a dead worker's lease
    (mem / "step_0000000001").mkdir()
    t0 = time.monotonic()
    assert keeper_main([str(mem), "--ttl", "0.3"]) == 0
    assert not mem.exists() and time.monotonic() - t0 < 10
    mem.mkdir()
    (mem / ".leases").mkdir()
    (mem / ".leases" / str(os.getpid())).touch()      # a live one keeps it
    assert live_leases(str(mem)) == [os.getpid()]


def _save_forever(path: str, local: str, mem: str, start: int) -> None:
    torch.set_num_threads(1)
    ck = Checkpointer(path, local_dir=local, memory_dir=mem, keep_in_memory=1, keep_local=1,
                      keep_persistent=2, keep_every=7, chunk_bytes=16 << 10)
    step = start
    while True:
        ck.save(step, _state(step))
        step += 1


def test_gc_and_saves_survive_kill_9_at_random_moments(tmp_path):
    """25 trials: a saving process with GC on three tiers is killed at a random moment;
    every step committed on any tier still verifies, and the newest one loads."""
    path, local, mem = str(tmp_path / "p"), str(tmp_path / "l"), str(tmp_path / "m")
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(1234)
    start = 1
    loaded = []
    for trial in range(25):
        proc = ctx.Process(target=_save_forever, args=(path, local, mem, start))
        proc.start()
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        for root in (mem, local, path):
            for step in committed_steps(root) if os.path.isdir(root) else []:
                assert verify_step(root, step) == [], (trial, root, step)
        with Checkpointer(path, local_dir=local, memory_dir=mem, keep_in_memory=1) as ck:
            newest = ck.latest()
            if newest is not None:
                state = ck.load()
                assert ck.loaded_step == newest and state["step"] == newest
                assert torch.equal(state["w"], _state(newest)["w"])
                loaded.append(newest)
            start = (newest or start) + 1
    assert len(loaded) >= 20, loaded
    # one clean save: its GC removes what the killed runs left beyond retention
    with Checkpointer(path, local_dir=local, memory_dir=mem, keep_in_memory=1, keep_local=1,
                      keep_persistent=2, keep_every=7) as ck:
        ck.save(start, _state(start)).result(timeout=60)
        ck.wait()
    persistent = committed_steps(path)
    assert persistent[-1] == start and all(s % 7 == 0 for s in persistent[:-2]), persistent
    assert committed_steps(local) == [start] and committed_steps(mem) == [start]
    assert set(LocalTier(path).step_dirs()) == set(persistent)      # no uncommitted leftovers


def test_no_checkpoint_anywhere_is_a_clear_error(tmp_path):
    with _tiers(tmp_path, keep_in_memory=1) as ck:
        with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
            ck.load()
