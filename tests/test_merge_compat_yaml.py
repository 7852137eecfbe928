"""mergekit users' entry points: --compat scope, YAML configs (`trainkit merge --config`), --device."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainkit.cli import main
from trainkit.merge import merge


def _model(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed_tokens.weight": (32, 8), "layers.0.q.weight": (8, 8), "layers.0.up.weight": (16, 8),
              "norm.weight": (8,)}
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}


@pytest.fixture()
def files(tmp_path):
    base = _model(0)
    models = [{k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) for k, v in base.items()}
              for i in (1, 2, 3)]
    bdir = tmp_path / "base"
    bdir.mkdir()
    save_file(base, bdir / "model.safetensors")
    (bdir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    paths = []
    for i, m in enumerate(models):
        p = tmp_path / f"ft{i}"
        p.mkdir()
        save_file(m, p / "model.safetensors")
        paths.append(str(p))
    return base, models, str(bdir), paths


def _read(out) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def test_compat_cli_implies_tensor_scope_and_refuses_global(tmp_path, files, capsys):
    base, models, bdir, paths = files
    out = tmp_path / "o"
    assert main(["merge", "ties", "--base", bdir, "--models", *paths, "--compat", "mergekit", "--out", str(out)]) == 0
    assert "tensor scope" in capsys.readouterr().out
    ref = merge("ties", base, models, scope="tensor", compat="mergekit")
    got = _read(out)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert json.loads((out / "merge.json").read_text())["parameters"]["scope"] == "tensor"
    bad = tmp_path / "g"
    rc = main(["merge", "ties", "--base", bdir, "--models", *paths, "--compat", "mergekit", "--scope", "global",
               "--out", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "compat='mergekit' is tensor scope" in err and not bad.exists()
