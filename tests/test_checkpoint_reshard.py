"""Replicated state deduplicated on the persistent tier, restore at another world size,
split tensors resharded, and ranks agreeing on one step (real gloo ranks)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from distributed import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROWS = 10          # the split tensor's global rows: 3, 3, 2, 2 over 4 ranks


def _model() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"w1": torch.randn(256, 256, generator=g), "w2": torch.randn(256, 256, generator=g),
            "b": torch.randn(256, generator=g)}


def _emb() -> torch.Tensor:
    return torch.arange(ROWS * 4, dtype=torch.float32).reshape(ROWS, 4)


def _state(rank: int, world: int, step: int) -> dict:
    lo = [0, 3, 6, 8, 10]
    return {"model": _model(), "optim": {"step": step, "lr": 0.1},
            "rng": torch.Generator().manual_seed(100 + rank).get_state(),
            "pos": rank * 1000 + step,
            "emb": _emb()[lo[rank]:lo[rank + 1]].clone()}


def _save_4(rank: int, world: int, root: str) -> dict:
    from trainkit.checkpoint import Checkpointer

    node = rank // 2
    with Checkpointer(os.path.join(root, "p"), local_dir=os.path.join(root, f"local{node}"),
                      chunk_bytes=32 << 10, timeout=30) as ck:
        for step in (1, 2):
            ck.save(step, _state(rank, world, step), sharded={"emb": 0}).result(timeout=60)
        ck.wait()
        tiers = ck.tiers(2)
        # same world size: each rank reads its own shard from its node's local tier
        state = ck.load()
        assert ck.loaded_step == 2 and state["pos"] == rank * 1000 + 2
        assert torch.equal(state["emb"], _state(rank, world, 2)["emb"])
    return {"tiers": tiers}


def _load_2(rank: int, world: int, root: str) -> dict:
    from trainkit.checkpoint import Checkpointer, PerRank

    with Checkpointer(os.path.join(root, "p"), timeout=30) as ck:
        state = ck.load()
        assert ck.loaded_step == 2
    for k, v in _model().items():
        assert torch.equal(state["model"][k], v), k
    assert state["optim"] == {"step": 2, "lr": 0.1}
    assert isinstance(state["pos"], PerRank) and state["pos"] == {
        r: r * 1000 + 2 for r in range(4)}
    assert isinstance(state["rng"], PerRank) and sorted(state["rng"]) == [0, 1, 2, 3]
    for r in range(4):
        assert torch.equal(state["rng"][r], torch.Generator().manual_seed(100 + r).get_state())
    assert torch.equal(state["emb"], torch.tensor_split(_emb(), world)[rank])
    return {"emb_rows": state["emb"].shape[0]}


def test_4_ranks_save_dedupe_and_load_on_2_and_1(tmp_path, capsys):
    root = str(tmp_path)
    results = run_ranks(_save_4, 4, root, timeout=150)
    assert all(r["tiers"] == ["local", "persistent"] for r in results.values()), results

    # dedupe: the model's chunks are stored once on the persistent tier, spread over ranks
    def rank_bytes(base: str, rank: int) -> int:
        d = os.path.join(base, "step_0000000002", f"rank_{rank:05d}", "data", "c")
        return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))

    local = [rank_bytes(os.path.join(root, f"local{r // 2}"), r) for r in range(4)]
    persistent = [rank_bytes(os.path.join(root, "p"), r) for r in range(4)]
    assert len(set(local)) == 1                           # node-local copies are complete
    assert sum(persistent) < 0.4 * sum(local), (persistent, local)
    assert max(persistent) < 2 * min(persistent), persistent      # spread evenly
    assert all(p < 0.4 * local[0] for p in persistent), (persistent, local)

    from trainkit.checkpoint import verify_step

    assert verify_step(os.path.join(root, "p"), 2) == []
    from trainkit.cli import main

    assert main(["ckpt", "info", os.path.join(root, "p"), "2", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["rank"] for r in table if r["name"].startswith("model")} == {
        "model/w1": "replicated", "model/w2": "replicated", "model/b": "replicated"}
    emb = [r for r in table if r["name"] == "emb"]
    assert [r["rank"] for r in emb] == [0, 1, 2, 3] and emb[0]["global_shape"] == [ROWS, 4]
    # the node-local tiers vanish (new machines): the persistent copy serves any world size
    for node in (0, 1):
        shutil.rmtree(os.path.join(root, f"local{node}"))
    rows = run_ranks(_load_2, 2, root, timeout=150)
    assert sorted(r["emb_rows"] for r in rows.values()) == [5, 5]

    from trainkit.checkpoint import Checkpointer, PerRank

    with Checkpointer(os.path.join(root, "p")) as ck:       # one process: the full picture
        state = ck.load()
    assert torch.equal(state["emb"], _emb())
    assert torch.equal(state["model"]["w2"], _model()["w2"])
    assert isinstance(state["pos"], PerRank) and len(state["pos"]) == 4
    # one saved rank, exactly as written
    with Checkpointer(os.path.join(root, "p")) as ck:
        r3 = ck.load(2, rank=3)
    assert r3["pos"] == 3002 and torch.equal(r3["emb"], _emb()[8:10])


def _disagree(rank: int, world: int, root: str) -> dict:
    import torch.distributed as dist

    from trainkit.checkpoint import Checkpointer

    local = os.path.join(root, f"local{rank}")
    ck = Checkpointer(os.path.join(root, "p"), local_dir=local, persist_every=100, timeout=30)
    for step in (1, 2):
        ck.save(step, {"x": torch.full((8,), float(step)), "rank": rank}).result(timeout=60)
    ck.wait()
    ck.close(persist_last=False)            # step 2 only on the node-local tiers
    dist.barrier()
    if rank == 1:
        shutil.rmtree(os.path.join(local, "step_0000000002"))   # this node lost step 2
    dist.barrier()
    with Checkpointer(os.path.join(root, "p"), local_dir=local, timeout=30) as ck:
        seen = ck.latest()
        state = ck.load()
        agreed = ck.loaded_step
    assert state["rank"] == rank and torch.equal(state["x"], torch.full((8,), float(agreed)))
    return {"seen": seen, "agreed": agreed}


def test_ranks_that_see_different_newest_steps_agree(tmp_path):
    results = run_ranks(_disagree, 2, str(tmp_path), timeout=150)
    assert results[0]["seen"] == 2 and results[1]["seen"] == 1
    assert results[0]["agreed"] == results[1]["agreed"] == 1


def _bad_shard(rank: int, world: int, root: str) -> str:
    import torch.distributed as dist

    from trainkit.checkpoint import Checkpointer

    with Checkpointer(os.path.join(root, "p"), timeout=30) as ck:
        with pytest.raises(KeyError, match="nope"):
            ck.save(1, {"w": torch.zeros(4)}, sharded={"nope": 0})
        with pytest.raises(ValueError, match="1 dimensions"):
            ck.save(1, {"w": torch.zeros(4)}, sharded={"w": 1})
        # pieces that do not fit together: a clear failure, nothing committed
        handle = ck.save(1, {"w": torch.zeros(2, 3 + rank)}, sharded={"w": 0})
        with pytest.raises(Exception, match="does not fit"):
            handle.result(timeout=60)
        dist.barrier()           # rank 0 hosts the store: stay until rank 1 has its answer
        return "ok"


def test_bad_sharded_arguments_are_named(tmp_path):
    assert run_ranks(_bad_shard, 2, str(tmp_path), timeout=120) == {0: "ok", 1: "ok"}
