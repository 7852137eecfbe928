"""trainkit.io: readers for every input kind and the sharded safetensors writer."""

from __future__ import annotations

import json
import importlib.util

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainkit.io import ShardedWriter, TensorMeta, parse_input_spec, plan_shards
from trainkit.merge.files import open_input as open_reader


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(32, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g),
        "model.norm.weight": torch.randn(8, generator=g).to(torch.float16),
        "model.step": torch.tensor([3], dtype=torch.int64),
    }


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_single_safetensors_file_and_hf_dir(tmp_path):
    t = _tensors()
    save_file(t, tmp_path / "model.safetensors")
    for spec in (tmp_path / "model.safetensors", tmp_path):
        r = open_reader(spec)
        assert r.meta("model.embed_tokens.weight") == TensorMeta((32, 8), torch.bfloat16)
        _same({k: r.get(k) for k in r.keys()}, t)


def test_writer_shards_index_and_dtypes(tmp_path):
    t = _tensors()
    plan = plan_shards({k: TensorMeta(tuple(v.shape), v.dtype) for k, v in t.items()}, max_shard_bytes=600)
    assert len(plan.shard_names) > 1
    assert plan.shard_names[0] == f"model-00001-of-{len(plan.shard_names):05d}.safetensors"
    with ShardedWriter(tmp_path, plan) as w:
        for k in reversed(list(t)):  # any order
            w.write(k, t[k])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(t)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in t.values())
    # the independent safetensors library reads every shard
    loaded = {}
    for shard in plan.shard_names:
        loaded.update(load_file(tmp_path / shard))
    _same(loaded, t)
    r = open_reader(tmp_path)
    _same({k: r.get(k) for k in r.keys()}, t)


def test_writer_refuses_incomplete_output(tmp_path):
    t = _tensors()
    plan = plan_shards({k: TensorMeta(tuple(v.shape), v.dtype) for k, v in t.items()})
    w = ShardedWriter(tmp_path, plan)
    w.write("model.norm.weight", t["model.norm.weight"])
    with pytest.raises(RuntimeError, match="tensors never written"):
        w.close()


def test_torch_file_weights_only_mmap(tmp_path):
    t = _tensors()
    torch.save({"state_dict": {"model": {k[len("model.") :]: v for k, v in t.items()}}}, tmp_path / "x.pt")
    r = open_reader(tmp_path / "x.pt")
    _same({k: r.get(k) for k in r.keys()}, t)  # nested dicts flatten to dotted names
    torch.save(t, tmp_path / "pytorch_model.bin")
    r2 = open_reader(tmp_path)
    _same({k: r2.get(k) for k in r2.keys()}, t)


def test_unknown_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        open_reader(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        open_reader(tmp_path / "d")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown input kind"):
        open_reader(tmp_path / "w.npz")


def test_checkpoint_spec_parsing():
    s = parse_input_spec("trainkit:runs/ck@120#model.")
    assert s.checkpoint and s.step == 120 and s.prefix == "model." and str(s.path) == "runs/ck"
    s = parse_input_spec("trainkit:runs/ck")
    assert s.checkpoint and s.step is None and s.prefix == "model."
    assert not parse_input_spec("runs/ck").checkpoint


@pytest.mark.skipif(
    importlib.util.find_spec("trainkit.checkpoint") is None,
    reason="trainkit.checkpoint (issue 3's engine) is not in this build",
)
def test_trainkit_checkpoint_reader(tmp_path):
    from trainkit.checkpoint import Checkpointer

    model = {"w": torch.randn(4, 4), "b": torch.randn(4)}
    ck = Checkpointer(str(tmp_path / "ck"))
    try:
        ck.save(7, {"model": model, "optim": {"lr": torch.tensor(0.1)}})
        wait = getattr(ck, "wait", None)
        if wait is not None:
            wait()
    finally:
        close = getattr(ck, "close", None)
        if close is not None:
            close()
    r = open_reader(f"trainkit:{tmp_path / 'ck'}@7#model.")
    assert sorted(r.keys()) == ["b", "w"]
    _same({k: r.get(k) for k in r.keys()}, model)
