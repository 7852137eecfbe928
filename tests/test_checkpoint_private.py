"""The memory tier is this user's alone; links below a tier's root are never followed;
ZarrReader refuses pickles by default (issue #16)."""

from __future__ import annotations

import os
import stat
import warnings

import pytest
import torch

from trainkit.checkpoint import Checkpointer
from trainkit.checkpoint.errors import UnsafeDirectoryError
from trainkit.checkpoint.tiers import TIERS, LocalTier
from trainkit.checkpoint.tiers import keeper
from trainkit.rundir import MEMORY_DIR_ENV


@pytest.fixture
def shm(tmp_path, monkeypatch):
    """A private stand-in for /dev/shm (world-writable, sticky, like the real one)."""
    root = tmp_path / "shm"
    root.mkdir()
    root.chmod(0o1777)
    monkeypatch.setattr(keeper, "SHM_ROOT", str(root))
    monkeypatch.delenv(MEMORY_DIR_ENV, raising=False)
    return root


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _memory_ck(tmp_path, **kw) -> Checkpointer:
    return Checkpointer(tmp_path / "p", keep_in_memory=1, keeper_ttl=0.5, **kw)


def test_memory_tier_is_created_private(shm, tmp_path):
    with _memory_ck(tmp_path) as ck:
        ck.save(1, {"w": torch.ones(4)}).result(timeout=60)
        ck.wait()
        mine = shm / f"trainkit-{os.getuid()}"
        (mem,) = [p for p in mine.iterdir()]
        assert _mode(mine) == 0o700 and _mode(mem) == 0o700
        files = [os.path.join(d, f) for d, _, fs in os.walk(mem) for f in fs
                 if not f.startswith(".keeper")]
        dirs = [os.path.join(d, x) for d, xs, _ in os.walk(mem) for x in xs]
        assert files and all(_mode(f) == 0o600 for f in files), [(f, oct(_mode(f))) for f in files]
        assert dirs and all(_mode(d) == 0o700 for d in dirs)


def test_planted_world_writable_directory_is_refused(shm, tmp_path):
    planted = shm / f"trainkit-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    (planted / "step_0000000099").mkdir()                 # another user's forged step
    with pytest.raises(UnsafeDirectoryError, match=f"{planted}.*0777"):
        _memory_ck(tmp_path)
    assert not (tmp_path / "p").exists() or not list((tmp_path / "p").iterdir())


def test_symlinked_memory_directory_is_refused(shm, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (shm / f"trainkit-{os.getuid()}").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UnsafeDirectoryError, match="not a real directory"):
        _memory_ck(tmp_path)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a directory another uid owns")
def test_directory_of_another_user_is_refused(shm, tmp_path):
    planted = shm / f"trainkit-{os.getuid()}"
    planted.mkdir(mode=0o700)
    os.chown(planted, 65534, 65534)
    with pytest.raises(UnsafeDirectoryError, match="owned by uid 65534"):
        _memory_ck(tmp_path)


def test_explicit_memory_dir_is_checked_too(tmp_path):
    loose = tmp_path / "mem"
    loose.mkdir()
    loose.chmod(0o777)
    with pytest.raises(UnsafeDirectoryError, match=str(loose)):
        TIERS["memory"](str(loose))
    own = tmp_path / "mem-ok"
    own.mkdir(mode=0o755)                                 # ours, others can only read
    TIERS["memory"](str(own))
    assert _mode(own) == 0o700                            # tightened, not refused


def test_symlinked_step_dir_does_not_redirect_writes(tmp_path):
    tier = LocalTier(str(tmp_path / "tier"))
    target = tmp_path / "victim"
    target.mkdir()
    link = tmp_path / "tier" / "step_0000000005"
    link.symlink_to(target, target_is_directory=True)
    assert tier.step_dirs() == []                         # not listed
    with pytest.raises(OSError):
        tier.prepare(5, "rank_00000")
    with pytest.raises(OSError):
        tier.write("step_0000000005/rank_00000/data/c/0", memoryview(b"x"))
    with pytest.raises(OSError):
        tier.publish(5, {"a": 1})
    assert tier.size("step_0000000005/zarr.json") is None
    tier.remove(5)                                        # unlinks the link only
    assert not link.exists() and target.is_dir() and list(target.iterdir()) == []


def test_planted_file_links_are_replaced_not_written_through(tmp_path):
    tier = LocalTier(str(tmp_path / "tier"))
    tier.prepare(1, "rank_00000")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "tier" / "step_0000000001" / "rank_00000" / "zarr.json").symlink_to(victim)
    tier.write("step_0000000001/rank_00000/zarr.json", memoryview(b"{}"))
    assert victim.read_text() == "precious"
    assert tier.read("step_0000000001/rank_00000/zarr.json") == b"{}"
    os.link(victim, tmp_path / "tier" / "step_0000000001" / "rank_00000" / "hard")
    tier.write("step_0000000001/rank_00000/hard", memoryview(b"new"))
    assert victim.read_text() == "precious"


def test_zarr_reader_refuses_pickles_by_default(tmp_path):
    import torch.distributed.checkpoint as dcp

    from trainkit.checkpoint.interop.dcp import ZarrReader, ZarrWriter

    state = {"w": torch.arange(6.0), "lr": 0.5}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=ZarrWriter(tmp_path, step=0))
        with pytest.raises(dcp.CheckpointException, match="pickled value"):
            dcp.load({"w": torch.zeros(6), "lr": None}, storage_reader=ZarrReader(tmp_path))
        target = {"w": torch.zeros(6), "lr": None}
        dcp.load(target, storage_reader=ZarrReader(tmp_path, allow_pickle=True))
    assert target["lr"] == 0.5 and torch.equal(target["w"], state["w"])
