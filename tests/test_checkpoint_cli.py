"""`trainkit ckpt ls|info|verify` on good and broken checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from distributed import subprocess_env
from trainkit.checkpoint import Checkpointer
from trainkit.cli import main

pytestmark = pytest.mark.timeout(120)


_capsys = None


def _cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``trainkit ckpt ARGS`` in this process (torch is imported already)."""
    try:
        rc = main(["ckpt", *args])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 2
    out = _capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


@pytest.fixture(autouse=True)
def _capture(capsys):
    global _capsys
    _capsys = capsys
    yield


def test_console_entry_point(ckpt_dir):
    proc = subprocess.run([sys.executable, "-m", "trainkit", "ckpt", "verify", str(ckpt_dir)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "step 10: ok" in proc.stdout, proc.stdout + proc.stderr


@pytest.fixture
def ckpt_dir(tmp_path):
    path = tmp_path / "ck"
    with Checkpointer(path, chunk_bytes=64 << 10) as ck:
        for step in (5, 10):
            ck.save(step, {"w": torch.randn(100, 1000), "b": torch.zeros(3, dtype=torch.bfloat16),
                           "step": step}).result(timeout=60)
    (path / "step_0000000015" / "rank_00000").mkdir(parents=True)   # an interrupted save
    return path


def test_ls_and_info(ckpt_dir):
    out = _cli("ls", str(ckpt_dir))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.split()[:3] == ["5", "persistent", "committed"] for line in lines)
    assert any(line.split()[:3] == ["15", "persistent", "UNCOMMITTED"] for line in lines)
    rows = json.loads(_cli("ls", str(ckpt_dir), "--json").stdout)
    assert [(r["step"], r["committed"]) for r in rows] == [(5, True), (10, True), (15, False)]
    assert rows[0]["world_size"] == 1 and rows[0]["bytes"] > 400_000
    info = _cli("info", str(ckpt_dir), "10")
    assert info.returncode == 0 and "bfloat16" in info.stdout and "(100, 1000)" in info.stdout


def test_verify_good_then_broken(ckpt_dir):
    good = _cli("verify", str(ckpt_dir))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "step 5: ok" in good.stdout and "step 10: ok" in good.stdout
    chunk = ckpt_dir / "step_0000000010" / "rank_00000" / "data" / "c" / "2"
    data = bytearray(chunk.read_bytes())
    data[77] ^= 1
    chunk.write_bytes(bytes(data))
    bad = _cli("verify", str(ckpt_dir))
    assert bad.returncode == 1
    assert "step 5: ok" in bad.stdout and "step 10: CORRUPT" in bad.stdout
    assert str(chunk) in bad.stdout and "'w'" in bad.stdout
    (ckpt_dir / "step_0000000005" / "rank_00000" / "data" / "c" / "0").unlink()
    missing = _cli("verify", str(ckpt_dir), "5")
    assert missing.returncode == 1 and "missing" in missing.stdout
    assert _cli("verify", str(ckpt_dir / "nope")).returncode != 0


def test_ls_shows_every_tier_and_gc_applies_retention(tmp_path):
    with Checkpointer(tmp_path / "p", local_dir=tmp_path / "l", keep_local=None,
                      chunk_bytes=16 << 10) as ck:
        for step in (1, 2, 3, 4, 5):
            ck.save(step, {"w": torch.full((64, 64), float(step))}).result(timeout=60)
    rows = json.loads(_cli("ls", str(tmp_path / "p"), "--local-dir", str(tmp_path / "l"),
                           "--json").stdout)
    assert [(r["step"], r["tier"]) for r in rows][:2] == [(1, "local"), (1, "persistent")]
    assert len(rows) == 10 and all(r["committed"] for r in rows)
    (tmp_path / "p" / "step_0000000000").mkdir()          # leftovers of an interrupted save
    dry = _cli("gc", str(tmp_path / "p"), "--keep", "2", "--keep-every", "3", "--dry-run")
    assert dry.returncode == 0 and "would delete committed steps [1, 2]" in dry.stdout, dry.stdout
    assert "leftovers [0]" in dry.stdout
    assert sorted(p.name for p in (tmp_path / "p").iterdir())[0] == "step_0000000000"
    done = json.loads(_cli("gc", str(tmp_path / "p"), "--keep", "2", "--keep-every", "3",
                           "--json").stdout)
    assert done == {"dry_run": False, "delete": [1, 2], "leftovers": [0], "kept": [3, 4, 5]}
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "step_0000000003", "step_0000000004", "step_0000000005"]
    assert _cli("gc", str(tmp_path / "p"), "--keep", "0").returncode == 2
