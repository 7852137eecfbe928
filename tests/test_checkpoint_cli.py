"""`trainkit ckpt ls|info|verify` on good and broken checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from distributed import subprocess_env
from trainkit.checkpoint import Checkpointer
from trainkit.cli import main

pytestmark = pytest.mark.timeout(120)


_capsys = None


def _cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``trainkit ckpt ARGS`` in this process (torch is imported already)."""
    message = ""
    try:
        rc = main(["ckpt", *args])
    except SystemExit as exc:        # a str code is printed to stderr, exit status 1
        rc = exc.code if isinstance(exc.code, int) else 1
        message = "" if isinstance(exc.code, int) or exc.code is None else f"{exc.code}\n"
    out = _capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err + message)


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
    os.utime(tmp_path / "p" / "step_0000000000", (time.time() - 3600,) * 2)   # long dead
    dry = _cli("gc", str(tmp_path / "p"), "--keep", "2", "--keep-every", "3", "--dry-run")
    assert dry.returncode == 0 and "would delete committed steps [1, 2]" in dry.stdout, dry.stdout
    assert "leftovers [0]" in dry.stdout
    assert sorted(p.name for p in (tmp_path / "p").iterdir())[0] == "step_0000000000"
    done = json.loads(_cli("gc", str(tmp_path / "p"), "--keep", "2", "--keep-every", "3",
                           "--json").stdout)
    assert {k: done[k] for k in ("dry_run", "delete", "leftovers", "kept")} == {
        "dry_run": False, "delete": [1, 2], "leftovers": [0], "kept": [3, 4, 5]}
    assert done["failed"] == [] and done["young_kept"] == []
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "step_0000000003", "step_0000000004", "step_0000000005"]
    assert _cli("gc", str(tmp_path / "p"), "--keep", "0").returncode == 2


# -- every except branch of the ckpt CLI: one line on stderr, non-zero exit, no traceback --

@pytest.fixture
def dcp_dir(tmp_path):
    """A plain torch.distributed.checkpoint directory (not a trainkit one)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # "assuming ... a single process"
        dcp.save({"w": torch.randn(3)}, checkpoint_id=str(tmp_path / "dcp"))
    return tmp_path / "dcp"


def _one_line_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode != 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    for needle in needles:
        assert needle in out.stderr, out.stderr


def test_plain_dcp_directory_is_explained(dcp_dir):
    for args in (("verify", str(dcp_dir)), ("verify", str(dcp_dir), "3"),
                 ("info", str(dcp_dir), "3")):
        _one_line_error(_cli(*args), "torch.distributed.checkpoint directory", "import-dcp")


def test_missing_step(ckpt_dir):
    _one_line_error(_cli("info", str(ckpt_dir), "999"), "step 999 is not a committed",
                    "[5, 10]")
    out = _cli("verify", str(ckpt_dir), "999")
    assert out.returncode == 1 and "step 999: CORRUPT" in out.stdout and "Traceback" not in out.stderr


def test_not_a_checkpoint_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(_cli("info", str(tmp_path / "empty"), "1"), "holds no trainkit checkpoint")
    (tmp_path / "file").write_text("x")
    for action in (("info", str(tmp_path / "file"), "1"), ("verify", str(tmp_path / "file")),
                   ("ls", str(tmp_path / "nope")), ("gc", str(tmp_path / "nope"), "--keep", "1")):
        out = _cli(*action)
        _one_line_error(out, "is not a directory")
        assert out.returncode == 2, out.stderr      # bad input, as every other bad input
    _one_line_error(_cli("ls", str(tmp_path / "nope")), "does not exist")


def test_corrupt_commit_record_is_a_row_not_a_crash(ckpt_dir):
    (ckpt_dir / "step_0000000005" / "zarr.json").write_text("{not json")
    rows = json.loads(_cli("ls", str(ckpt_dir), "--json").stdout)
    bad = next(r for r in rows if r["step"] == 5)
    assert not bad["committed"] and "not valid JSON" in bad["error"]
    _one_line_error(_cli("info", str(ckpt_dir), "5"), "not valid JSON")


class _Unreachable:
    url = "s3://bucket/ck"

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def step_dirs(self) -> list[int]:
        raise self.exc


@pytest.mark.parametrize("exc,needle", [(ImportError("no module named s3fs"), "URL support"),
                                        (OSError("connection refused"), "cannot read")])
def test_unreachable_url(monkeypatch, exc, needle):
    from trainkit.checkpoint import reader

    monkeypatch.setattr(reader, "as_tier", lambda where: _Unreachable(exc))
    out = _cli("ls", "s3://bucket/ck")
    _one_line_error(out, needle, "s3://bucket/ck")
    assert out.returncode == 2


def test_export_and_import_errors(ckpt_dir, dcp_dir, tmp_path, monkeypatch):
    from trainkit.checkpoint.interop import dcp_import, export

    _one_line_error(_cli("export", str(ckpt_dir), "10", "--to", str(tmp_path / "o"),
                         "--prefix", "net."), "no tensors under the prefix")
    _one_line_error(_cli("export", str(ckpt_dir), "10", "--to", str(tmp_path / "o"),
                         "--max-shard-size", "2G"), "bad size", "ambiguous")
    _one_line_error(_cli("import-dcp", str(tmp_path), str(tmp_path / "dst")), "no .metadata")
    (tmp_path / "afile").write_text("x")
    _one_line_error(_cli("import-dcp", str(dcp_dir), str(tmp_path / "afile")),
                    "is not a directory")
    _one_line_error(_cli("import-dcp", str(dcp_dir), str(tmp_path / "dst"), "--step", "-1"),
                    "--step must be >= 0")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "o" / "x"))

    monkeypatch.setattr(export, "export_safetensors", disk_full)
    monkeypatch.setattr(dcp_import, "import_dcp", disk_full)
    _one_line_error(_cli("export", str(ckpt_dir), "10", "--to", str(tmp_path / "o")),
                    "cannot write", "No space left")
    _one_line_error(_cli("import-dcp", str(dcp_dir), str(tmp_path / "dst")), "No space left")


def test_advise_bad_values():
    _one_line_error(_cli("advise", "--stall", "-1", "--persist", "5", "--restore", "30",
                         "--detect", "10", "--node-mtbf-hours", "1000", "--nodes", "8"))


@pytest.mark.parametrize("action", [("info", "10"), ("ls",), ("verify",)])
def test_output_closed_early_is_quiet(ckpt_dir, action):
    """``trainkit ckpt info DIR 10 | head -1``: the reader goes away before the output
    is written, so every write hits a closed pipe."""
    args = [action[0], str(ckpt_dir), *action[1:]]
    proc = subprocess.Popen([sys.executable, "-m", "trainkit", "ckpt", *args],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                              # closed before the child prints
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 1)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_output_closed_after_a_line_is_quiet(tmp_path):
    """The shell form: ``trainkit ckpt info ... | head -1`` with more output than a pipe
    buffer holds, so the writer is still writing when head exits."""
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(1, {f"t{i:05d}": torch.zeros(1) for i in range(3000)}).result(timeout=60)
    cmd = (f"{sys.executable} -m trainkit ckpt info {tmp_path / 'ck'} 1 | head -1")
    proc = subprocess.run(["bash", "-c", cmd], env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.split() == ["rank", "name", "dtype", "shape", "bytes"]
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
