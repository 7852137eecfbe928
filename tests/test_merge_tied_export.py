"""HF-loadable exports and tied embeddings: `ckpt export --hf-config`, and merges of a tied
base with HF-saved (head-less) fine-tunes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainkit.checkpoint import Checkpointer
from trainkit.cli import main
from trainkit.merge import merge

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

VOCAB, HIDDEN = 96, 16
CONFIG = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": VOCAB, "n_embd": HIDDEN,
          "n_layer": 1, "n_head": 2, "n_positions": 32, "tie_word_embeddings": True}


def _gpt2ish(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    wte = torch.randn(VOCAB, HIDDEN, generator=g)
    return {"transformer.wte.weight": wte, "transformer.h.0.mlp.c_fc.weight": torch.randn(HIDDEN, 4 * HIDDEN, generator=g),
            "transformer.ln_f.weight": torch.randn(HIDDEN, generator=g), "lm_head.weight": wte}  # tied: one storage


def _hf_dir(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0}))
    (d / "tokenizer.json").write_text("{}")
    return d


def _checkpoint(tmp_path, state):
    path = tmp_path / "ck"
    with Checkpointer(path, chunk_bytes=64 << 10) as ck:
        ck.save(5, {"model": state, "step": 5}).result(60)
    return path


def test_export_writes_a_tied_head_once_and_copies_hf_files(tmp_path, capsys):
    state = _gpt2ish(0)
    ck = _checkpoint(tmp_path, state)
    hf = _hf_dir(tmp_path)
    out = tmp_path / "export"
    assert main(["ckpt", "export", str(ck), "5", "--to", str(out), "--hf-config", str(hf)]) == 0
    assert "from_pretrained will need a config" not in capsys.readouterr().err
    got = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in got and set(got) == set(state) - {"lm_head.weight"}  # as save_pretrained
    assert torch.equal(got["transformer.wte.weight"], state["transformer.wte.weight"])
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).read_text() == (hf / name).read_text()
    plain = tmp_path / "plain"
    assert main(["ckpt", "export", str(ck), "5", "--to", str(plain)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "from_pretrained will need a config" in err[0] and "--hf-config" in err[0]
    assert not (plain / "config.json").exists()


def test_export_config_tie_with_different_values_is_refused(tmp_path, capsys):
    state = _gpt2ish(1)
    state["lm_head.weight"] = state["lm_head.weight"].clone() + 1
    ck = _checkpoint(tmp_path, state)
    rc = main(["ckpt", "export", str(ck), "5", "--to", str(tmp_path / "o"), "--hf-config", str(_hf_dir(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 1 and "tie_word_embeddings" in err and "lm_head.weight differs" in err
    untied = dict(CONFIG, tie_word_embeddings=False)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(untied))
    assert main(["ckpt", "export", str(ck), "5", "--to", str(tmp_path / "o2"), "--hf-config",
                 str(tmp_path / "hf")]) == 0
    assert "lm_head.weight" in load_file(tmp_path / "o2" / "model.safetensors")


def test_merge_tied_export_with_headless_finetunes(tmp_path, capsys):
    base = _gpt2ish(2)
    ck = _checkpoint(tmp_path, base)
    exported = tmp_path / "base"
    assert main(["ckpt", "export", str(ck), "5", "--to", str(exported), "--hf-config", str(_hf_dir(tmp_path))]) == 0
    fts = []
    for i in range(2):
        ft = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(10 + i))
              for k, v in base.items() if k != "lm_head.weight"}
        d = tmp_path / f"ft{i}"
        d.mkdir()
        save_file(ft, d / "model.safetensors")  # what save_pretrained writes for a tied model
        fts.append(ft)
    with_head = dict(fts[1], **{"lm_head.weight": fts[1]["transformer.wte.weight"].clone()})
    torch.save(with_head, tmp_path / "ft1.pt")  # another writer keeps the head: the same tensor when tied
    out = tmp_path / "merged"
    assert main(["merge", "ties", "--base", str(exported), "--models", str(tmp_path / "ft0"), str(tmp_path / "ft1.pt"),
                 "--out", str(out)]) == 0
    got = load_file(out / "model.safetensors")
    headless = {k: v for k, v in base.items() if k != "lm_head.weight"}
    ref = merge("ties", headless, fts)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert json.loads((out / "merge.json").read_text())["output"]["tied_lm_head"] is True
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_tied_gpt2_export_from_pretrained_merge_end_to_end(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed in this environment")
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=2, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    ck = _checkpoint(tmp_path, dict(model.state_dict()))
    exported = tmp_path / "base"
    assert main(["ckpt", "export", str(ck), "5", "--to", str(exported), "--hf-config", str(hf)]) == 0
    loaded = transformers.GPT2LMHeadModel.from_pretrained(exported)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ft_dirs = []
    for i in range(2):
        ft = transformers.GPT2LMHeadModel.from_pretrained(hf)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        ft.save_pretrained(tmp_path / f"ft{i}")
        ft_dirs.append(str(tmp_path / f"ft{i}"))
    out = tmp_path / "merged"
    assert main(["merge", "ties", "--base", str(exported), "--models", *ft_dirs, "--out", str(out)]) == 0
    merged = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()
