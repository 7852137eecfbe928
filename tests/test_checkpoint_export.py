"""`trainkit ckpt export` (safetensors, HF layout) and `trainkit ckpt import-dcp`, with
their progress bars and their errors on bad input."""

from __future__ import annotations

import io
import json
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemWriter

from distributed import run_ranks
from trainkit.checkpoint import Checkpointer, ZarrReader, ZarrWriter, committed_steps, verify_step
from trainkit.checkpoint.interop.dcp_import import import_dcp
from trainkit.checkpoint.interop.export import export_safetensors
from trainkit._units import Progress
from trainkit.cli import main
from trainkit.io import open_reader

pytestmark = [pytest.mark.timeout(150),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
              pytest.mark.filterwarnings("ignore:Detected an existing checkpoint")]


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        rc = main(["ckpt", *args])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=__import__("sys").stderr)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(200, 64, generator=g),
            "layers.0.attn.weight": torch.randn(64, 64, generator=g).to(torch.bfloat16),
            "layers.0.norm.bias": torch.randn(64, generator=g).to(torch.float16),
            "lm_head.weight": torch.randn(200, 64, generator=g)}


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "ck"
    with Checkpointer(path, chunk_bytes=64 << 10) as ck:
        ck.save(10, {"model": _model(), "optim": {"m": torch.ones(5)}, "step": 10}).result(60)
    return path


def test_export_single_file_and_read_back(ckpt, tmp_path):
    out = tmp_path / "export" / "model.safetensors"
    files = export_safetensors(ckpt, 10, out)
    assert files == [out]
    got = load_file(out)                                   # the safetensors package itself
    want = _model()
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    reader = open_reader(out.parent)                        # trainkit.io, as `merge` reads it
    assert sorted(reader.keys()) == sorted(want)
    assert torch.equal(reader.get("lm_head.weight"), want["lm_head.weight"])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]   # no staging left


def test_export_sharded_hf_layout(ckpt, tmp_path):
    out = tmp_path / "hf"
    files = export_safetensors(ckpt, 10, out, max_shard_bytes=60_000)
    names = sorted(p.name for p in files)
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json"]
    assert all(n.startswith("model-0000") for n in names[:-1])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    want = _model()
    assert set(index["weight_map"]) == set(want)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in want.values())
    reader = open_reader(out)
    for k in want:
        assert torch.equal(reader.get(k), want[k]), k
    merged = {}
    for f in files[:-1]:
        merged.update(load_file(f))
    assert set(merged) == set(want)

    single = export_safetensors(ckpt, 10, tmp_path / "a" / "tiny.safetensors",
                                max_shard_bytes=60_000, prefix="model.layers.")
    assert [p.name for p in single] == ["tiny.safetensors"]
    assert set(load_file(single[0])) == {"0.attn.weight", "0.norm.bias"}
    named = export_safetensors(ckpt, 10, tmp_path / "b" / "tiny.safetensors",
                               max_shard_bytes=8192, prefix="model.layers.")
    assert [p.name for p in named] == ["tiny-00001-of-00002.safetensors",
                                       "tiny-00002-of-00002.safetensors",
                                       "tiny.safetensors.index.json"]
    weight_map = json.loads(named[-1].read_text())["weight_map"]
    assert weight_map == {"0.attn.weight": "tiny-00001-of-00002.safetensors",
                          "0.norm.bias": "tiny-00002-of-00002.safetensors"}
    assert sorted(p.name for p in named[0].parent.iterdir()) == sorted(p.name for p in named)


def test_export_errors(ckpt, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    rc, _, err = _cli(capsys, "export", str(ckpt), "11", "--to", str(out))
    assert rc == 1 and "step 11 is not a committed checkpoint" in err and "[10]" in err
    rc, _, err = _cli(capsys, "export", str(ckpt), "10", "--to", str(out), "--prefix", "net.")
    assert rc == 1 and "no tensors under the prefix 'net.'" in err and "'model'" in err
    rc, _, err = _cli(capsys, "export", str(ckpt), "10", "--to", str(out),
                      "--max-shard-size", "lots")
    assert rc != 0 and "bad size" in err
    rc, _, err = _cli(capsys, "export", str(tmp_path / "nope"), "10", "--to", str(out))
    assert rc == 2 and "is not a directory" in err and "nope" in err
    assert not out.exists()
    rc, stdout, _ = _cli(capsys, "export", str(ckpt), "10", "--to", str(out))
    assert rc == 0 and str(out) in stdout
    rc, _, err = _cli(capsys, "export", str(ckpt), "10", "--to", str(out))
    assert rc == 1 and "exists" in err and "--overwrite" in err
    rc, _, _ = _cli(capsys, "export", str(ckpt), "10", "--to", str(out), "--overwrite",
                    "--prefix", "optim.")
    assert rc == 0 and set(load_file(out)) == {"m"}


def test_export_of_dcp_written_step_ignores_pickled_values(tmp_path):
    state = {"model": _model(), "step": 5, "note": "not a tensor"}
    dcp.save(state, storage_writer=ZarrWriter(tmp_path / "ck", step=5))
    files = export_safetensors(tmp_path / "ck", 5, tmp_path / "m.safetensors")
    got = load_file(files[0])
    assert set(got) == set(_model()) and torch.equal(got["embed.weight"], _model()["embed.weight"])


# -- import-dcp ----------------------------------------------------------------------------

def _dcp_state() -> dict:
    return {"model": _model(), "optim": {"state": {"0": {"exp_avg": torch.randn(64, 64)}},
                                         "param_groups": [{"lr": 0.1, "params": [0]}]},
            "step": 1234}


def test_import_dcp_round_trip(tmp_path, capsys):
    src, dst = tmp_path / "dcp", tmp_path / "ck"
    state = _dcp_state()
    dcp.save(state, storage_writer=FileSystemWriter(src))
    rc, out, err = _cli(capsys, "import-dcp", str(src), str(dst), "--step", "7", "--progress")
    assert rc == 0 and "as step 7" in out, err
    assert "import" in err and "100%" in err                       # the forced progress bar
    assert committed_steps(dst) == [7] and verify_step(dst, 7) == []
    with Checkpointer(dst) as ck:
        loaded = ck.load(7, allow_pickle=True)
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v), k
    assert torch.equal(loaded["optim"]["state"]["0"]["exp_avg"],
                       state["optim"]["state"]["0"]["exp_avg"])
    assert loaded["step"] == 1234 and loaded["optim"]["param_groups"][0]["lr"] == 0.1
    # and back through DCP
    target = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
              "step": None}
    dcp.load(target, storage_reader=ZarrReader(dst, step=7, allow_pickle=True))
    assert torch.equal(target["model"]["embed.weight"], state["model"]["embed.weight"])
    assert target["step"] == 1234
    # default step: the next one; the same step again is refused
    rc, out, _ = _cli(capsys, "import-dcp", str(src), str(dst))
    assert rc == 0 and "as step 8" in out
    rc, _, err = _cli(capsys, "import-dcp", str(src), str(dst), "--step", "7")
    assert rc == 1 and "already committed" in err


def test_import_dcp_errors(tmp_path, capsys):
    rc, _, err = _cli(capsys, "import-dcp", str(tmp_path / "missing"), str(tmp_path / "d"))
    assert rc == 1 and "is not a directory" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = _cli(capsys, "import-dcp", str(tmp_path / "empty"), str(tmp_path / "d"))
    assert rc == 1 and "no .metadata" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ".metadata").write_bytes(b"not a pickle")
    rc, _, err = _cli(capsys, "import-dcp", str(tmp_path / "bad"), str(tmp_path / "d"))
    assert rc == 1 and "not a readable DCP metadata" in err
    src = tmp_path / "dcp"
    dcp.save({"w": torch.ones(4)}, storage_writer=FileSystemWriter(src))
    rc, _, err = _cli(capsys, "import-dcp", str(src), str(tmp_path / "d"), "--step", "-1")
    assert rc == 2 and "--step" in err
    for f in src.glob("*.distcp"):                  # truncated data: named, not a traceback
        f.write_bytes(f.read_bytes()[:10])
    rc, _, err = _cli(capsys, "import-dcp", str(src), str(tmp_path / "d2"))
    assert rc == 1 and "truncated (w needs bytes" in err and "Traceback" not in err
    assert committed_steps(tmp_path / "d2") == []


def _sharded_saves(rank: int, world_size: int, fs_path: str, zarr_path: str) -> bool:
    """A DTensor split over 2 ranks: DCP writes it as two SHARD chunks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.arange(64 * 10, dtype=torch.float32).reshape(64, 10)
    state = {"model": {"w": distribute_tensor(full, mesh, [Shard(0)]),
                       "b": torch.ones(10)}}
    dcp.save(state, storage_writer=FileSystemWriter(fs_path))
    dcp.save(state, storage_writer=ZarrWriter(zarr_path, step=0))
    return True


@pytest.mark.timeout(180)
def test_import_and_reshard_dtensor_checkpoints(tmp_path):
    fs_path, zarr_path = tmp_path / "dcp", tmp_path / "zarr"
    run_ranks(_sharded_saves, 2, str(fs_path), str(zarr_path), timeout=150)
    full = torch.arange(64 * 10, dtype=torch.float32).reshape(64, 10)
    # import-dcp reassembles the two chunks into one tensor
    step = import_dcp(fs_path, tmp_path / "imported", chunk_bytes=4096)
    with Checkpointer(tmp_path / "imported") as ck:
        assert torch.equal(ck.load(step)["model"]["w"], full)
    # a 2-rank ZarrWriter save of the DTensor loads whole in one process (DCP reshards)
    target = {"model": {"w": torch.zeros(64, 10), "b": torch.zeros(10)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, storage_reader=ZarrReader(zarr_path, step=0, allow_pickle=True))
    assert torch.equal(target["model"]["w"], full)
    assert torch.equal(target["model"]["b"], torch.ones(10))
    assert verify_step(zarr_path, 0) == []
    # export joins the DTensor's chunks from both ranks into one safetensors tensor
    files = export_safetensors(zarr_path, 0, tmp_path / "dt.safetensors")
    got = load_file(files[0])
    assert set(got) == {"w", "b"} and torch.equal(got["w"], full)


def test_progress_bar_quiet_unless_forced():
    quiet = io.StringIO()
    with Progress(100, "work", stream=quiet) as bar:
        bar.update(100)
    assert quiet.getvalue() == ""                    # not a terminal: silent
    forced = io.StringIO()
    with Progress(2048, "work", stream=forced, force=True) as bar:
        bar.update(1024)
        bar.update(1024)
    text = forced.getvalue()
    assert "work [" in text and "100%" in text and "2.0 KiB/2.0 KiB" in text


def test_verify_progress_flag(ckpt, capsys):
    rc, out, err = _cli(capsys, "verify", str(ckpt))
    assert rc == 0 and "step 10: ok" in out and err == ""
    rc, out, err = _cli(capsys, "verify", str(ckpt), "--progress")
    assert rc == 0 and "verify step 10" in err and "100%" in err


def test_urls_are_accepted_or_refused_clearly(tmp_path, capsys):
    """Every ckpt command goes through the tier layer: a URL either works (fsspec tier
    present) or fails with one clear line, never a traceback."""
    try:
        import trainkit.checkpoint.tiers.fsspec  # noqa: F401
        have_fsspec_tier = True
    except ImportError:
        have_fsspec_tier = False
    url = "memory://trainkit-test/run"
    src = tmp_path / "dcp"
    dcp.save({"model": {"w": torch.ones(3)}}, storage_writer=FileSystemWriter(src))
    for args in (["ls", url], ["verify", url], ["import-dcp", str(src), url, "--step", "1"]):
        rc, out, err = _cli(capsys, *args)
        if have_fsspec_tier:
            assert rc == 0, (args, out, err)
        else:
            assert rc != 0 and "URL support is not available" in err, (args, err)
            assert "Traceback" not in err
    if have_fsspec_tier:
        rc, out, _ = _cli(capsys, "export", url, "1", "--to", str(tmp_path / "o.safetensors"))
        assert rc == 0 and torch.equal(load_file(tmp_path / "o.safetensors")["w"], torch.ones(3))
