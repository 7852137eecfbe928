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


def _yaml(tmp_path, text: str):
    p = tmp_path / "merge.yaml"
    p.write_text(text)
    return p


_CASES = {  # method -> (YAML parameters per model, the CLI equivalent's options)
    "ties": ("density: 0.4, weight: 1.0", ["--density", "0.4", "--lam", "0.9"]),
    "dare_ties": ("density: 0.5, weight: 0.7", ["--density", "0.5", "--weights", "0.7", "0.7", "0.7", "--lam", "0.9"]),
    "task_arithmetic": ("weight: 0.5", ["--weights", "0.5", "0.5", "0.5", "--lam", "0.9"]),
    "linear": ("weight: 2.0", ["--weights", "2", "2", "2", "2", "--lam", "0.9"]),
}


@pytest.mark.parametrize("method", list(_CASES))
def test_yaml_equals_the_cli_equivalent(tmp_path, files, method):
    base, models, bdir, paths = files
    per_model, cli = _CASES[method]
    listed = "".join(f"  - model: {p}\n    parameters: {{{per_model}}}\n" for p in paths)
    if method == "linear":  # mergekit's linear merges the base as one more input
        listed = f"  - model: {bdir}\n    parameters: {{{per_model}}}\n" + listed
    cfg = _yaml(tmp_path, f"merge_method: {method}\nbase_model: {bdir}\nmodels:\n{listed}"
                          "parameters: {lambda: 0.9, int8_mask: true}\ndtype: float32\ntokenizer_source: base\n")
    assert main(["merge", "--config", str(cfg), "--out", str(tmp_path / "y")]) == 0
    listed_paths = [bdir, *paths] if method == "linear" else paths
    assert main(["merge", method, "--base", bdir, "--models", *listed_paths, "--compat", "mergekit", *cli,
                 "--out", str(tmp_path / "c")]) == 0
    y, c = _read(tmp_path / "y"), _read(tmp_path / "c")
    assert set(y) == set(base) and all(torch.equal(y[k], c[k]) for k in c), method
    assert (tmp_path / "y" / "config.json").exists()  # tokenizer_source: base copies the base's side files


def test_yaml_per_model_density_and_base_in_models(tmp_path, files):
    base, models, bdir, paths = files
    cfg = _yaml(tmp_path, f"""
merge_method: ties
base_model: {bdir}
models:
  - model: {bdir}
  - model: {paths[0]}
    parameters: {{density: 0.3, weight: 1.0}}
  - model: {paths[1]}
    parameters: {{density: 0.6, weight: 0.5}}
parameters: {{normalize: false}}
""")
    assert main(["merge", "--config", str(cfg), "--out", str(tmp_path / "y")]) == 0
    ref = merge("ties", base, models[:2], densities=[0.3, 0.6], weights=[1.0, 0.5], compat="mergekit",
                normalize=False)
    got = _read(tmp_path / "y")
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert not all(torch.equal(ref[k], merge("ties", base, models[:2], density=0.3, weights=[1.0, 0.5],
                                            compat="mergekit")[k]) for k in ref)


@pytest.mark.parametrize("body,expect", [
    ("merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\nslices: []\n",
     "slices: not supported"),
    ("merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1, filter: mlp}}\n",
     "models[0].parameters.filter: not supported"),
    ("merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {a}/nope\n    parameters: {{weight: 1}}\n",
     "models[0].model: "),
    ("merge_method: ties\nbase_model: {b}\nmodels:\n  - parameters: {{weight: 1}}\n", "models[0].model: missing"),
    ("merge_method: ties\nbase_model: {b}\nmodels:\n  - model: meta-llama/Llama-3.2-1B\n"
     "    parameters: {{weight: 1}}\n", "Hugging Face Hub id"),
    ("merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {a}\n    parameters: {{weight: [0, 1]}}\n",
     "gradient"),
    ("merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {a}\n", "merge_method: 'slerp' is not supported"),
    ("merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {a}\n", "weight: missing"),
])
def test_bad_yaml_is_one_line_and_writes_nothing(tmp_path, files, capsys, body, expect):
    base, models, bdir, paths = files
    cfg = _yaml(tmp_path, body.format(b=bdir, a=paths[0]))
    out = tmp_path / "out"
    assert main(["merge", "--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err and str(cfg) in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_yaml_is_validated_before_any_tensor_is_read(tmp_path, files, monkeypatch):
    import trainkit.merge.files as merge_files_mod

    base, models, bdir, paths = files
    opened = []
    monkeypatch.setattr(merge_files_mod, "open_input", lambda spec: opened.append(spec))
    cfg = _yaml(tmp_path, f"merge_method: ties\nbase_model: {bdir}\nmodels:\n  - model: {paths[0]}\n"
                          f"    parameters: {{weight: 1}}\n  - model: org/model\n    parameters: {{weight: 1}}\n")
    assert main(["merge", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert opened == []


def test_device_cpu_auto_and_missing_cuda(tmp_path, files, capsys):
    base, models, bdir, paths = files
    outs = {}
    for dev in ("cpu", "auto"):
        outs[dev] = tmp_path / dev
        assert main(["merge", "ties", "--base", bdir, "--models", *paths, "--device", dev,
                     "--out", str(outs[dev])]) == 0
    a, b = _read(outs["cpu"]), _read(outs["auto"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the missing-CUDA error cannot be shown here")
    rc = main(["merge", "ties", "--base", bdir, "--models", *paths, "--device", "cuda", "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--device cuda: CUDA is not available" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "g").exists()
