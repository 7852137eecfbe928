"""`trainkit merge`: the streamed file path equals the in-memory ties_merge exactly."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainkit.cli import main
from trainkit.merge import METHODS, merge, ties_merge


def _base(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (64, 16),
        "model.layers.0.self_attn.q_proj.weight": (16, 16),
        "model.layers.0.mlp.up_proj.weight": (32, 16),
        "model.layers.1.self_attn.q_proj.weight": (16, 16),
        "model.norm.weight": (16,),
        "lm_head.weight": (64, 16),
    }
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}


def _ft(base, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + 0.02 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}


@pytest.fixture()
def inputs(tmp_path):
    base = _base()
    bdir = tmp_path / "base"
    bdir.mkdir()
    names = list(base)
    shards = [names[:3], names[3:]]
    weight_map = {}
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: base[k] for k in group}, bdir / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in group})
    (bdir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (bdir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (bdir / "tokenizer.json").write_text("{}")
    models = [_ft(base, s) for s in (1, 2, 3)]
    save_file(models[0], tmp_path / "a.safetensors")
    torch.save(models[1], tmp_path / "b.pt")
    cdir = tmp_path / "c"
    cdir.mkdir()
    save_file(models[2], cdir / "model.safetensors")
    paths = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.pt"), str(cdir)]
    return base, models, str(bdir), paths


def _read_out(out):
    index = out / "model.safetensors.index.json"
    tensors = {}
    if index.exists():
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            tensors.update(load_file(out / shard))
    else:
        tensors.update(load_file(out / "model.safetensors"))
    return tensors


@pytest.mark.parametrize(
    "scope,threads,extra",
    [("global", 1, []), ("global", 2, []), ("tensor", 2, []), ("tensor", 2, ["--compat", "mergekit"]), ("global", 2, ["--weights", "1", "0.5", "2"])],
)
def test_streamed_cli_equals_in_memory(tmp_path, inputs, scope, threads, extra):
    base, models, bdir, paths = inputs
    out = tmp_path / "out"
    rc = main(
        ["merge", "ties", "--base", bdir, "--models", *paths, "--density", "0.2", "--lam", "0.8", "--scope", scope,
         "--out", str(out), "--threads", str(threads), "--shard-size", "3KB", *extra]
    )
    assert rc == 0
    got = _read_out(out)
    kwargs = {}
    if "--compat" in extra:
        kwargs["compat"] = "mergekit"
    if "--weights" in extra:
        kwargs["weights"] = [1.0, 0.5, 2.0]
    ref = ties_merge(base, models, density=0.2, lam=0.8, scope=scope, **kwargs)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k], ref[k]), k
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == len(base)
    assert (out / "config.json").read_text() == json.dumps({"model_type": "llama"})
    assert (out / "tokenizer.json").exists()
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == "ties" and record["parameters"]["density"] == 0.2
    assert record["parameters"]["scope"] == scope and record["trainkit_version"]
    a_file = record["inputs"]["models"][0]["files"][0]
    assert a_file["sha256"] == hashlib.sha256(open(paths[0], "rb").read()).hexdigest()
    assert len(record["inputs"]["base"]["files"]) == 2


def test_other_methods_stream(tmp_path, inputs):
    base, models, bdir, paths = inputs
    for method in [m for m in METHODS if m != "ties"]:  # ties has its own test above
        out = tmp_path / method
        assert main(["merge", method, "--base", bdir, "--models", *paths, "--out", str(out), "--threads", "2"]) == 0
        ref = merge(method, base, models)
        got = _read_out(out)
        for k in ref:
            assert torch.equal(got[k], ref[k]), (method, k)


def test_cli_errors_are_clear(tmp_path, inputs, capsys):
    base, models, bdir, paths = inputs
    rc = main(["merge", "ties", "--base", bdir, "--models", *paths, "--density", "0", "--out", str(tmp_path / "o")])
    assert rc == 2 and "density must be in (0, 1]" in capsys.readouterr().err
    bad = {k: v for k, v in models[0].items() if k != "lm_head.weight"}
    save_file(bad, tmp_path / "bad.safetensors")
    rc = main(["merge", "ties", "--base", bdir, "--models", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing 1 tensor(s) of the base: ['lm_head.weight']" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    rc = main(["merge", "ties", "--base", bdir, "--models", *paths, "--out", str(tmp_path / "full")])
    assert rc == 2 and "not empty" in capsys.readouterr().err


def test_entry_point_registers_merge():
    r = subprocess.run([sys.executable, "-m", "trainkit", "merge", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--vocab-mismatch" in r.stdout and "--compat" in r.stdout
    assert "powers of 1000" in r.stdout and "powers of 1024" in r.stdout  # what 2GB means
    for name in METHODS:
        assert name in r.stdout


def test_cli_module_uses_methods_without_importing_torch():
    code = ("import sys, trainkit.merge.cli, trainkit.merge as m; "
            "assert 'METHODS' in dir(m); print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_shard_size_units_and_bad_sizes(tmp_path, inputs, capsys):
    from trainkit.merge.cli import _size

    assert _size("2GB") == 2 * 10**9 and _size("2GiB") == 2 * 2**30 and _size("3KB") == 3000
    base, models, bdir, paths = inputs
    with pytest.raises(SystemExit) as info:
        main(["merge", "ties", "--base", bdir, "--models", *paths, "--out", str(tmp_path / "o"), "--shard-size", "2G"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "ambiguous" in err and "Traceback" not in err


def test_progress_bar_draws_on_request(tmp_path, inputs, capsys):
    base, models, bdir, paths = inputs
    assert main(["merge", "ties", "--base", bdir, "--models", *paths, "--out", str(tmp_path / "o"),
                 "--progress", "on"]) == 0
    err = capsys.readouterr().err
    assert "threshold 1" in err and "merge" in err and "100%" in err
    assert main(["merge", "ties", "--base", bdir, "--models", *paths, "--out", str(tmp_path / "o2"),
                 "--progress", "off"]) == 0
    assert capsys.readouterr().err == ""


def test_failed_merge_leaves_no_partial_output(tmp_path, inputs, capsys):
    base, models, bdir, paths = inputs
    bad = dict(models[0])
    bad["model.norm.weight"] = bad["model.norm.weight"].clone()
    bad["model.norm.weight"][3] = float("nan")
    save_file(bad, tmp_path / "nan.safetensors")
    out = tmp_path / "out"
    rc = main(["merge", "ties", "--base", bdir, "--models", str(tmp_path / "nan.safetensors"),
               paths[1], "--scope", "tensor", "--out", str(out)])
    assert rc == 2 and "non-finite" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_overwrite_replaces_the_whole_output(tmp_path, inputs):
    base, models, bdir, paths = inputs
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(["merge", "ties", "--base", bdir, "--models", *paths, "--out", str(out),
                 "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "merge.json").exists()
    ref = ties_merge(base, models)
    got = _read_out(out)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
