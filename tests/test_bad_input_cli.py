"""Bad input files and values (issue 16): one line naming the file and the problem, exit
status 2, inputs untouched, a traceback only with --debug."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from trainkit.cli import main
from trainkit.errors import InputError
from trainkit.io.readers import SafetensorsReader, TorchFileReader

EX = Path(__file__).resolve().parents[1] / "examples" / "traffic"


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def _digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _merge(base, out, *models, extra: str = "") -> list[str]:
    return ["merge", "ties", "--base", str(base), "--models", *map(str, models), "--out", str(out),
            *([extra] if extra else [])]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.fixture()
def models(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 4, generator=g), "b": torch.randn(4, generator=g)}
    bdir = tmp_path / "base"
    bdir.mkdir()
    save_file(base, bdir / "model.safetensors")
    a = tmp_path / "a.safetensors"
    save_file({k: v + 0.1 for k, v in base.items()}, a)
    b = tmp_path / "b.safetensors"
    save_file({k: v - 0.1 for k, v in base.items()}, b)
    return bdir, a, b


def test_pickled_pt_is_refused_in_one_line(tmp_path, models, capsys):
    bdir, a, _ = models
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"w": _Evil()}, fh)
    torch.save({"w": torch.zeros(8, 4), "x": _Evil()}, tmp_path / "evil2.pt")
    for path in (evil, tmp_path / "evil2.pt"):
        with pytest.raises(InputError, match="is not a weights-only torch file"):
            TorchFileReader(path)
    rc = main(_merge(bdir, tmp_path / "out", a, tmp_path / "evil2.pt"))
    assert rc == 2
    _one_line_error(capsys, f"refused: {tmp_path / 'evil2.pt'} is not a weights-only torch file")
    assert not (tmp_path / "out").exists()


def _safetensors(path: Path, header: dict, data: bytes = b"\0" * 64, *, length: int | None = None):
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


@pytest.mark.parametrize("header,length,needle", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 10 ** 6, "header length"),
    ({"w": {"shape": [4], "data_offsets": [0, 16]}}, None, "has no dtype"),
    ({"w": {"dtype": "Q99", "shape": [4], "data_offsets": [0, 16]}}, None, "unsupported dtype"),
    ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, None, "bad shape"),
    ({"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, None, "bad shape"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, None, "needs 16"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, None, "outside"),
    ({"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}, None, "outside"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "v": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, None, "overlap"),
    ({"w": {"dtype": "F32", "shape": [4]}}, None, "data_offsets"),
    ({"w": [1, 2]}, None, "is not an object"),
    ({"__metadata__": {"a": 1}}, None, "__metadata__"),
])
def test_bad_safetensors_header_is_one_clear_error(tmp_path, models, capsys, header, length, needle):
    bad = _safetensors(tmp_path / "bad.safetensors", header, length=length)
    with pytest.raises(InputError, match=needle):
        SafetensorsReader(bad)
    bdir, a, _ = models
    assert main(_merge(bdir, tmp_path / "out", a, bad)) == 2
    _one_line_error(capsys, str(bad), needle)


def test_out_that_is_a_file_or_an_input_is_refused(tmp_path, models, capsys):
    bdir, a, b = models
    before = {**_digest(bdir), **_digest(a), **_digest(b)}
    afile = tmp_path / "file.txt"
    afile.write_text("keep")
    assert main(_merge(bdir, afile, a, b)) == 2
    _one_line_error(capsys, str(afile), "not a directory")
    assert afile.read_text() == "keep"
    assert main(_merge(bdir, a, a, b, extra="--overwrite")) == 2
    _one_line_error(capsys, str(a), "not a directory")
    for out, word in ((bdir, "is"), (tmp_path, "contains")):
        assert main(_merge(bdir, out, a, b, extra="--overwrite")) == 2
        _one_line_error(capsys, "refused", f"{word} the input")
    link = tmp_path / "link"
    link.symlink_to(bdir)
    assert main(_merge(bdir, link, a, b, extra="--overwrite")) == 2
    _one_line_error(capsys, "refused")
    assert {**_digest(bdir), **_digest(a), **_digest(b)} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("topo,job,needle", [
    ("leaves = 2\nspines = 2\nhosts_per_leaf = 1000000000\n", None, "hosts_per_leaf"),
    ("leaves = 100000\nspines = 2\nhosts_per_leaf = 2\n", None, "limit of 4096"),
    ("leaves = 4096\nspines = 2\nhosts_per_leaf = 4096\n", None, "limit of"),
    (None, 'collective = "allreduce_ring"\nhosts = "0-999999999"\nnbytes = "1MiB"\n', "limit of"),
    (None, 'collective = "allreduce_ring"\nhosts = {start = 0, count = 999999999}\nnbytes = 1\n',
     "limit of"),
    (None, 'collective = "allreduce_ring"\nhosts = "0-3"\nnbytes = 1\nchannels = 1000000000\n',
     "channels"),
])
def test_plan_sizes_are_capped(tmp_path, capsys, topo, job, needle):
    tfile = tmp_path / "t.toml"
    tfile.write_text(topo) if topo else tfile.write_text(
        (EX / "ethereal_256.toml").read_text())
    jfile = tmp_path / "j.toml"
    jfile.write_text(job) if job else jfile.write_text((EX / "ring_256.toml").read_text())
    assert main(["plan", "--topology", str(tfile), "--job", str(jfile)]) == 2
    _one_line_error(capsys, needle)


def test_plan_out_in_a_missing_directory(tmp_path, capsys):
    out = tmp_path / "nonexistent" / "dir" / "x"
    assert main(["plan", "--topology", str(EX / "ethereal_256.toml"), "--job",
                 str(EX / "ring_256.toml"), "--out", str(out)]) == 2
    _one_line_error(capsys, f"cannot write {out}")


def test_debug_shows_the_traceback(tmp_path, models):
    bdir, a, _ = models
    bad = _safetensors(tmp_path / "bad.safetensors", {"w": {"shape": [4], "data_offsets": [0, 16]}})
    for argv in (["--debug", *_merge(bdir, tmp_path / "out", a, bad)],
                 [*_merge(bdir, tmp_path / "out", a, bad), "--debug"]):
        with pytest.raises(InputError):
            main(argv)


def test_root_maps_os_errors_to_one_line(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["diagnose", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
