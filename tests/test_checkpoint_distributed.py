"""Multi-rank commits on gloo with real processes, and a rank killed during a save."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from distributed import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _rank_state(rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(rank * 1000 + step)
    return {"w": torch.randn(300, 200, generator=g), "b16": torch.randn(64, generator=g).bfloat16(),
            "rank": rank, "step": step, "tag": (rank, f"r{rank}")}


def _commit_ranks(rank: int, world: int, path: str) -> dict:
    import torch.distributed as dist

    from trainkit.checkpoint import Checkpointer

    with Checkpointer(path, chunk_bytes=64 << 10, timeout=30) as ck:
        handles = [ck.save(step, _rank_state(rank, step)) for step in (10, 20)]
        assert [h.result(timeout=60) for h in handles] == [10, 20]
        dist.barrier()
        assert ck.steps() == [10, 20] and ck.latest() == 20
        out = {step: ck.load(step) for step in (10, 20)}
    for step, state in out.items():
        ref = _rank_state(rank, step)
        assert torch.equal(state["w"], ref["w"]) and torch.equal(state["b16"], ref["b16"])
        assert state["rank"] == rank and state["tag"] == (rank, f"r{rank}")
    return {"rank": rank}


@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_commits_its_shard(tmp_path, world):
    path = str(tmp_path / "ck")
    run_ranks(_commit_ranks, world, path, timeout=150)
    import zarr

    g = zarr.open_group(os.path.join(path, "step_0000000020"), mode="r")
    record = g.attrs["trainkit"]
    assert record["world_size"] == world
    assert sorted(r["rank"] for r in record["ranks"]) == list(range(world))
    assert sorted(name for name, _ in g.groups()) == [f"rank_{r:05d}" for r in range(world)]
    from trainkit.checkpoint import Checkpointer

    with Checkpointer(path) as ck:                 # one process can read any rank's shard
        assert torch.equal(ck.load(20, rank=world - 1)["w"], _rank_state(world - 1, 20)["w"])


def _kill_during_save(rank: int, world: int, path: str, victim: int) -> dict:
    import torch.distributed as dist

    from trainkit.checkpoint import Checkpointer, CommitError, writer

    ck = Checkpointer(path, chunk_bytes=64 << 10, timeout=3)
    ck.save(1, _rank_state(rank, 1)).result(timeout=60)
    dist.barrier()                                 # everyone has seen step 1 committed
    if rank == victim:
        real = writer._write_chunk

        def die_midway(step_dir, r, c, *rest):
            if c == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(step_dir, r, c, *rest)

        writer._write_chunk = die_midway
    handle = ck.save(2, _rank_state(rank, 2))
    t0 = time.monotonic()
    with pytest.raises(CommitError) as info:
        handle.result(timeout=60)
    elapsed = time.monotonic() - t0
    if victim != 0:       # rank 0 hosts the store here: keep it up until every survivor is done
        store = dist.distributed_c10d._get_default_store()
        store.add("survivors_done", 1)
        while rank == 0 and store.add("survivors_done", 0) < world - 1:
            time.sleep(0.05)
    assert ck.latest() == 1 and ck.steps() == [1]
    # the previous checkpoint is intact (read this rank's shard: load() without rank= is
    # collective, and a peer is dead)
    state = ck.load(1, rank=rank)
    assert torch.equal(state["w"], _rank_state(rank, 1)["w"])
    with pytest.raises(CommitError):               # and again from the next save()
        ck.save(3, _rank_state(rank, 3))
    ck.close()
    return {"message": str(info.value), "elapsed": elapsed}


@pytest.mark.parametrize("victim", [1, 0])
def test_rank_killed_during_save(tmp_path, victim):
    path = str(tmp_path / "ck")
    results = run_ranks(_kill_during_save, 3, path, victim, timeout=120, expect_dead=(victim,))
    assert set(results) == {0, 1, 2} - {victim}
    for r, res in results.items():
        assert res["elapsed"] < 20, res
        if victim != 0:                            # rank 0 alive: it names the dead rank
            assert f"rank {victim}" in res["message"], res["message"]
        assert "step 2" in res["message"] or "lost contact" in res["message"], res["message"]


def _uneven_restart_counts(rank: int, world: int, path: str) -> dict:
    import torch.distributed as dist

    from trainkit.checkpoint import Checkpointer

    # An elastic agent that restarted for a membership change does not count a retry; the
    # one whose worker failed does: the ranks of one group see different restart counts.
    os.environ["TORCHELASTIC_RESTART_COUNT"] = str(rank)
    with Checkpointer(path, timeout=20) as ck:
        assert ck.save(1, {"rank": rank}).result(timeout=60) == 1
        dist.barrier()
        assert ck.latest() == 1
    return {"rank": rank}


def test_ranks_with_different_restart_counts_agree(tmp_path):
    run_ranks(_uneven_restart_counts, 2, str(tmp_path / "ck"), timeout=120)
