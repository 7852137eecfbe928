"""Corruption detection and clear errors for bad input and failing disks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from distributed import subprocess_env
from trainkit.checkpoint import (
    CheckpointError,
    Checkpointer,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    verify_step,
)

pytestmark = pytest.mark.timeout(120)

STATE = {"w": torch.arange(200_000, dtype=torch.float32), "small": torch.ones(10), "step": 1}


def _saved(tmp_path: Path) -> tuple[str, Path]:
    path = str(tmp_path / "ck")
    with Checkpointer(path, chunk_bytes=128 << 10) as ck:
        ck.save(1, STATE).result(timeout=60)
        ck.save(2, STATE).result(timeout=60)
    return path, tmp_path / "ck" / "step_0000000002" / "rank_00000" / "data" / "c"


def _load(path: str, step: int):
    with Checkpointer(path) as ck:
        return ck.load(step)


def test_truncated_chunk_is_named(tmp_path):
    path, chunks = _saved(tmp_path)
    victim = chunks / "3"
    os.truncate(victim, victim.stat().st_size - 100)
    with pytest.raises(CorruptCheckpointError) as info:
        _load(path, 2)
    msg = str(info.value)
    assert "step 2" in msg and "rank 0" in msg and str(victim) in msg and "'w'" in msg
    assert torch.equal(_load(path, 1)["w"], STATE["w"])     # the other step is unaffected
    assert any(str(victim) in p for p in verify_step(path, 2))
    assert verify_step(path, 1) == []


def test_bit_flip_is_named(tmp_path):
    path, chunks = _saved(tmp_path)
    victim = chunks / "2"
    with open(victim, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CorruptCheckpointError) as info:
        _load(path, 2)
    msg = str(info.value)
    assert "checksum mismatch" in msg and "step 2" in msg and "rank 0" in msg
    assert "'w'" in msg and str(victim) in msg
    assert verify_step(path, 2)


def test_deleted_chunk_is_caught_by_the_inventory(tmp_path):
    path, chunks = _saved(tmp_path)
    (chunks / "1").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"step 2, rank 0: file .*c/1 is missing"):
        _load(path, 2)


def test_tampered_index_is_caught(tmp_path):
    path, chunks = _saved(tmp_path)
    index = chunks.parent.parent / "zarr.json"
    index.write_text(index.read_text().replace('"step":2', '"step":3'))
    with pytest.raises(CorruptCheckpointError, match="step 2, rank 0"):
        _load(path, 2)


def test_missing_and_uncommitted_steps_list_committed_ones(tmp_path):
    path, _ = _saved(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match=r"step 7 .*does not exist.*\[1, 2\]"):
        _load(path, 7)
    os.rename(tmp_path / "ck" / "step_0000000002" / "zarr.json", tmp_path / "elsewhere.json")
    with pytest.raises(CheckpointNotFoundError, match=r"step 2 .*never committed.*\[1\]"):
        _load(path, 2)
    with Checkpointer(path) as ck:
        assert ck.latest() == 1 and torch.equal(ck.load()["w"], STATE["w"])
    empty = Checkpointer(tmp_path / "empty")
    assert empty.latest() is None
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
        empty.load()
    empty.close()


def test_committed_steps_are_never_overwritten(tmp_path):
    path, _ = _saved(tmp_path)
    with Checkpointer(path) as ck:
        with pytest.raises(CheckpointError, match="already committed"):
            ck.save(2, {"x": torch.zeros(1)})
        with pytest.raises(TypeError, match="non-negative int"):
            ck.save(-1, {})


# -- failing disks: each case runs in a child process so its limits stay there ----------

_CHILD = textwrap.dedent("""
    import os, resource, signal, sys, torch
    from trainkit.checkpoint import Checkpointer, CheckpointError
    path, mode = sys.argv[1], sys.argv[2]
    ck = Checkpointer(path, chunk_bytes=1 << 20)
    ck.save(1, {"w": torch.ones(1000)}).result(timeout=60)         # a good, older checkpoint
    if mode == "fsize":                        # the kernel refuses files over 256 KiB: EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, resource.RLIM_INFINITY))
    elif mode == "perm":                        # an unprivileged user in a directory of root's
        os.chmod(path, 0o755)
        if os.geteuid() == 0:
            os.setgid(65534); os.setuid(65534)
        else:
            os.chmod(path, 0o555)
    big = {"w": torch.randn(3 << 20)}                                  # 12 MiB
    handle = ck.save(2, big)
    try:
        handle.result(timeout=60)
        print("RESULT: no error"); sys.exit(3)
    except CheckpointError as exc:
        print("RESULT:", type(exc).__name__, exc)
    try:
        ck.save(3, {"w": torch.ones(1)})
        print("NEXT: no error")
    except CheckpointError as exc:
        print("NEXT:", type(exc).__name__, exc)
    ck.close()
""")


def _run_child(path: str, mode: str) -> str:
    proc = subprocess.run([sys.executable, "-c", _CHILD, path, mode], env=subprocess_env(),
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _assert_failed_cleanly(path: str, out: str, reason: str) -> None:
    result = next(line for line in out.splitlines() if line.startswith("RESULT:"))
    nxt = next(line for line in out.splitlines() if line.startswith("NEXT:"))
    assert "CheckpointWriteError" in result and "step 2, rank 0" in result, out
    assert reason in result, out
    assert "CheckpointWriteError" in nxt and "earlier checkpoint failed" in nxt, out
    with Checkpointer(path) as ck:                 # the older checkpoint is intact
        assert ck.steps() == [1]
        assert torch.equal(ck.load()["w"], torch.ones(1000))
        assert verify_step(path, 1) == []


def test_file_size_limit_surfaces_from_result_and_next_save(tmp_path):
    path = str(tmp_path / "ck")
    _assert_failed_cleanly(path, _run_child(path, "fsize"), "File too large")


def test_permission_denied_surfaces_from_result_and_next_save(tmp_path):
    path = str(tmp_path / "ck")
    os.chmod(tmp_path, 0o755)
    _assert_failed_cleanly(path, _run_child(path, "perm"), "Permission denied")


def test_disk_full_on_a_small_tmpfs(tmp_path):
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root); the RLIMIT_FSIZE test covers "
                    "the same error path")
    try:
        path = str(mnt / "ck")
        _assert_failed_cleanly(path, _run_child(path, "plain"), "No space left on device")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_failed_lazy_save_never_breaks_the_training_step(tmp_path, monkeypatch):
    import errno

    from trainkit.checkpoint.tiers import LocalTier

    model = torch.nn.Linear(256, 256)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 256)).sum().backward()
    opt.step()
    with Checkpointer(tmp_path / "ck") as ck:
        ck.attach(opt)
        ck.save(1, {"model": model.state_dict(), "optim": opt.state_dict()}).result(timeout=60)

        def full(tier, step, rank_dir):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ck"))

        monkeypatch.setattr(LocalTier, "prepare", full)
        handle = ck.save(2, {"model": model.state_dict(), "optim": opt.state_dict()})
        opt.step()                                  # the pre-hook must not raise
        with pytest.raises(CheckpointWriteError, match="step 2, rank 0.*No space left"):
            handle.result(timeout=60)
        with pytest.raises(CheckpointWriteError, match="earlier checkpoint failed"):
            ck.save(3, {"model": model.state_dict()})
        monkeypatch.undo()
        ck.save(4, {"model": model.state_dict()}).result(timeout=60)
        assert ck.steps() == [1, 4]
        assert torch.equal(ck.load(4)["model"]["weight"], model.weight.detach())
