"""The read face (``trainkit.checkpoint.tensors``): the prefix is applied before any
byte is fetched, so ``trainkit merge trainkit:DIR@STEP#model.`` never reads the
optimizer state, at one or several saved ranks and for DCP steps."""

from __future__ import annotations

import os

import pytest
import torch

from trainkit.checkpoint import Checkpointer
from trainkit.checkpoint.tensors import StepTensorReader, prune, step_tensors
from trainkit.checkpoint.tiers import LocalTier
from trainkit.merge.files import open_input

pytestmark = pytest.mark.timeout(120)

CHUNK = 64 << 10


def _model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"embed.weight": torch.randn(64, 32, generator=g),
            "head.bias": torch.randn(32, generator=g)}


def _state() -> dict:
    big = {i: {"exp_avg": torch.randn(256, 256), "exp_avg_sq": torch.randn(256, 256)}
           for i in range(4)}                              # ~2 MiB of optimizer state
    return {"model": _model(), "optim": {"state": big, "param_groups": [{"lr": 0.1}]},
            "step": 3}


@pytest.fixture
def ckpt(tmp_path):
    with Checkpointer(tmp_path / "ck", chunk_bytes=CHUNK) as ck:
        ck.save(3, _state()).result(timeout=60)
    return tmp_path / "ck"


@pytest.fixture
def bytes_read(monkeypatch):
    """Counts every byte the local tier reads (chunk reads and whole-file reads)."""
    count = {"n": 0}
    read_into, read = LocalTier.read_into, LocalTier.read

    def counting_read_into(self, rel, buffers, offset=0):
        count["n"] += sum(len(b) for b in buffers)
        return read_into(self, rel, buffers, offset)

    def counting_read(self, rel):
        data = read(self, rel)
        count["n"] += len(data)
        return data

    monkeypatch.setattr(LocalTier, "read_into", counting_read_into)
    monkeypatch.setattr(LocalTier, "read", counting_read)
    return count


def test_prune_keeps_only_the_prefix():
    tree = {"model": {"a": 1, "b": {"c": 2}}, "optim": {"state": {0: 3}}, "modelx": 4}
    assert prune(tree, "model.") == {"model": {"a": 1, "b": {"c": 2}}}
    assert prune(tree, "model.b.") == {"model": {"b": {"c": 2}}}
    assert prune(tree, "mod") == {"model": tree["model"], "modelx": 4}
    assert prune(tree, "") is tree


def test_merge_input_reads_no_optimizer_bytes(ckpt, bytes_read):
    model_bytes = sum(t.numel() * t.element_size() for t in _model().values())
    reader = open_input(f"trainkit:{ckpt}@3#model.")
    got = {k: reader.get(k) for k in reader.keys()}
    assert set(got) == set(_model())
    for k, t in _model().items():
        assert torch.equal(got[k], t)
    # the model, plus at most the chunk it shares with the optimizer, plus small metadata
    assert bytes_read["n"] < model_bytes + CHUNK + (64 << 10), bytes_read["n"]
    assert reader.files() == [ckpt / "step_0000000003" / "zarr.json"]


def test_corrupt_optimizer_chunks_do_not_matter(ckpt):
    """Flip a byte in every chunk holding only optimizer state: the model still reads
    (and verifies its own checksums), the full load fails."""
    chunks = sorted((ckpt / "step_0000000003" / "rank_00000" / "data" / "c").iterdir(),
                    key=lambda p: int(p.name))
    for chunk in chunks[1:]:                              # the model sits in chunk 0
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
    reader = open_input(f"trainkit:{ckpt}@3#model.")
    assert torch.equal(reader.get("embed.weight"), _model()["embed.weight"])
    with pytest.raises(Exception, match="checksum"):
        Checkpointer(ckpt).load(3)


def _save_2(rank: int, world: int, root: str) -> None:
    from trainkit.checkpoint import Checkpointer

    state = _state()
    state["model"]["embed.weight"] = state["model"]["embed.weight"].chunk(world)[rank].clone()
    state["optim"]["state"][0]["exp_avg"] += rank              # differs per rank
    with Checkpointer(os.path.join(root, "ck"), chunk_bytes=CHUNK, timeout=30) as ck:
        ck.save(3, state, sharded={"model.embed.weight": 0}).result(timeout=60)


def test_several_saved_ranks_read_only_the_prefix(tmp_path, bytes_read):
    """A step saved by two ranks reads in one process (the split tensor whole), through
    load_global with the prefix applied first: no optimizer blob is read."""
    from distributed import run_ranks

    run_ranks(_save_2, 2, str(tmp_path))
    bytes_read["n"] = 0
    reader = open_input(f"trainkit:{tmp_path / 'ck'}@3#model.")
    assert torch.equal(reader.get("embed.weight"), _model()["embed.weight"])
    assert torch.equal(reader.get("head.bias"), _model()["head.bias"])
    model_bytes = sum(t.numel() * t.element_size() for t in _model().values())
    assert bytes_read["n"] < model_bytes + 2 * CHUNK + (64 << 10), bytes_read["n"]


def test_unknown_prefix_lists_the_top_level_keys(ckpt):
    with pytest.raises(ValueError, match=r"'model'.*'optim'|'optim'.*'model'"):
        StepTensorReader(ckpt, 3, prefix="net.")
    source = step_tensors(str(ckpt), 3, prefix="optim.state.0.")
    assert sorted(source) == ["optim.state.0.exp_avg", "optim.state.0.exp_avg_sq"]


def test_newest_step_by_default(ckpt):
    assert StepTensorReader(os.fspath(ckpt)).step == 3
