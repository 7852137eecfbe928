"""Checkpoints on a real S3-compatible server (moto, started by the fixture on loopback).

Covers save/restore through ``s3://`` in one process and on 2 gloo ranks, the CLI on
URLs, corruption caught by verify and load, and interrupted uploads cut by a TCP proxy:
retried when the cut is brief, reported failed when it lasts, and never committed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import fsspec
import pytest
import torch

from distributed import run_ranks, subprocess_env
from s3server import moto_server, s3_bucket  # noqa: F401 - pytest fixtures
from trainkit.checkpoint import (
    Checkpointer,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
)
from trainkit.checkpoint.tiers.fsspec import FsspecTier, ObjectStoreError
from trainkit.cli import main

pytestmark = pytest.mark.timeout(120)

CHUNK = 64 << 10


def _state(step: int, rank: int = 0) -> dict:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return {"model": {"w": torch.randn(256, 256, generator=g),         # 256 KiB: 4 chunks
                      "b16": torch.randn(100, generator=g).bfloat16()},
            "step": step, "rank": rank, "data": {"epoch": 1, "offset": 17 * step}}


def _same(a: dict, b: dict) -> bool:
    return (torch.equal(a["model"]["w"], b["model"]["w"])
            and torch.equal(a["model"]["b16"], b["model"]["b16"])
            and a["step"] == b["step"] and a["rank"] == b["rank"] and a["data"] == b["data"])


def _big_state(step: int) -> dict:
    """1 MiB of tensors: 16 chunks of 64 KiB, enough that a cut lands mid-step."""
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(512, 512, generator=g), "step": step}


def _cli(capsys, monkeypatch, bucket, *args: str) -> tuple[int, str]:
    """``trainkit ckpt ARGS`` in this process, configured only by the AWS environment."""
    for k, v in bucket.server.env().items():
        monkeypatch.setenv(k, v)
    try:
        rc = main(["ckpt", *args])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 2
        if isinstance(exc.code, str):
            print(exc.code)
    out = capsys.readouterr()
    return rc, out.out + out.err


def _s3fs(bucket):
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **bucket.storage_options)


# -- save and restore -------------------------------------------------------------------
def test_save_and_restore_single_process(s3_bucket):
    url = s3_bucket.url()
    model = torch.nn.Linear(64, 32)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    with Checkpointer(url, storage_options=s3_bucket.storage_options, chunk_bytes=CHUNK) as ck:
        ck.attach(opt)                                   # lazy copies work on s3 too
        h1 = ck.save(1, _state(1))
        h2 = ck.save(2, {**_state(2), "optim": opt.state_dict(), "net": model.state_dict()})
        assert (h1.result(timeout=60), h2.result(timeout=60)) == (1, 2)
        assert ck.steps() == [1, 2] and ck.latest() == 2
    with Checkpointer(url, storage_options=s3_bucket.storage_options) as ck:  # a fresh process
        assert _same(ck.load(1), _state(1))
        out = ck.load()
        assert _same(out, _state(2))
        fresh = torch.optim.Adam(model.parameters())
        fresh.load_state_dict(out["optim"])
        assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"],
                           opt.state_dict()["state"][0]["exp_avg"])
        with pytest.raises(CheckpointNotFoundError, match="committed steps: \\[1, 2\\]"):
            ck.load(3)
    keys = _s3fs(s3_bucket).find(f"{s3_bucket.name}/run1/step_0000000002")
    assert f"{s3_bucket.name}/run1/step_0000000002/zarr.json" in keys
    assert any("/rank_00000/data/c/" in k for k in keys)


def test_storage_options_on_a_local_path_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="storage_options apply to URLs"):
        Checkpointer(tmp_path / "ck", storage_options={"key": "x"})


def _two_ranks(rank: int, world: int, url: str, options: dict) -> dict:
    import torch.distributed as dist

    with Checkpointer(url, storage_options=options, chunk_bytes=CHUNK, timeout=30) as ck:
        handles = [ck.save(step, _state(step, rank)) for step in (10, 20)]
        assert [h.result(timeout=60) for h in handles] == [10, 20]
        dist.barrier()
        assert ck.steps() == [10, 20]
        assert all(_same(ck.load(step), _state(step, rank)) for step in (10, 20))
    return {"rank": rank}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_gloo_ranks_save_and_restore(s3_bucket):
    url = s3_bucket.url()
    assert run_ranks(_two_ranks, 2, url, s3_bucket.storage_options, timeout=150) == {
        0: {"rank": 0}, 1: {"rank": 1}}
    with Checkpointer(url, storage_options=s3_bucket.storage_options) as ck:
        assert ck.steps() == [10, 20]
        assert _same(ck.load(20, rank=1), _state(20, 1))   # any shard from one process


# -- the CLI ----------------------------------------------------------------------------
@pytest.fixture
def saved(s3_bucket):
    with Checkpointer(s3_bucket.url(), storage_options=s3_bucket.storage_options,
                      chunk_bytes=CHUNK) as ck:
        for step in (5, 10):
            ck.save(step, _state(step)).result(timeout=60)
    return s3_bucket


def test_cli_ls_info_verify_on_s3(saved, capsys, monkeypatch):
    url = saved.url()
    rc, out = _cli(capsys, monkeypatch, saved, "ls", url, "--json")
    assert rc == 0, out
    rows = json.loads(out)
    assert [(r["step"], r["committed"], r["world_size"]) for r in rows] == [(5, True, 1),
                                                                          (10, True, 1)]
    assert all(r["bytes"] > 256 << 10 for r in rows)
    rc, out = _cli(capsys, monkeypatch, saved, "info", url, "10")
    assert rc == 0 and "model/w" in out and "(256, 256)" in out and "bfloat16" in out, out
    rc, out = _cli(capsys, monkeypatch, saved, "verify", url)
    assert rc == 0 and "step 5: ok" in out and "step 10: ok" in out, out


@pytest.mark.slow
def test_cli_subprocess_reads_endpoint_from_environment(saved):
    """The console entry point on s3://, with only AWS_* variables for the endpoint."""
    proc = subprocess.run([sys.executable, "-m", "trainkit", "ckpt", "verify", saved.url(), "10"],
                          env=subprocess_env(**saved.server.env()), capture_output=True,
                          text=True, timeout=90)
    assert proc.returncode == 0 and "step 10: ok" in proc.stdout, proc.stdout + proc.stderr


def test_cli_unreachable_endpoint_is_one_clear_line(saved, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")     # discard port: refused
    capsys.readouterr()
    rc = main(["ckpt", "ls", saved.url()])
    err = capsys.readouterr().err
    assert rc == 2, err                   # bad input: one line naming the URL, exit 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert saved.url() in err and "cannot read" in err, err


# -- corruption -------------------------------------------------------------------------
def test_corrupted_and_missing_objects_are_caught(saved, capsys, monkeypatch):
    fs = _s3fs(saved)
    chunk = f"{saved.name}/run1/step_0000000010/rank_00000/data/c/1"
    raw = bytearray(fs.cat_file(chunk))
    raw[1000] ^= 0xFF                                    # same size, one byte flipped
    fs.pipe_file(chunk, bytes(raw))
    rc, out = _cli(capsys, monkeypatch, saved, "verify", saved.url())
    assert rc == 1, out
    assert "step 5: ok" in out and "step 10: CORRUPT" in out
    assert "s3://" in out and "data/c/1 fails its checksum" in out
    with Checkpointer(saved.url(), storage_options=saved.storage_options) as ck:
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch.*model/w"):
            ck.load(10)
        assert _same(ck.load(5), _state(5))             # the older step is untouched
    fs.rm_file(f"{saved.name}/run1/step_0000000005/rank_00000/data/c/0")
    rc, out = _cli(capsys, monkeypatch, saved, "verify", saved.url(), "5")
    assert rc == 1 and "data/c/0 is missing" in out, out
    with Checkpointer(saved.url(), storage_options=saved.storage_options) as ck:
        with pytest.raises(CorruptCheckpointError, match="missing"):
            ck.load(5)


# -- interrupted uploads ----------------------------------------------------------------
def test_a_brief_cut_is_retried_and_the_step_commits(s3_bucket):
    with s3_bucket.proxy() as proxy:
        options = s3_bucket.server.storage_options(proxy.endpoint)
        with Checkpointer(s3_bucket.url(), storage_options=options, chunk_bytes=CHUNK) as ck:
            ck.save(1, _big_state(1)).result(timeout=60)
            proxy.cut_after(600 << 10)                   # in the middle of step 2's chunks
            assert ck.save(2, _big_state(2)).result(timeout=60) == 2
            assert proxy.cuts == 1
            assert ck.steps() == [1, 2]
    with Checkpointer(s3_bucket.url(), storage_options=s3_bucket.storage_options) as ck:
        assert torch.equal(ck.load(2)["w"], _big_state(2)["w"])
        from trainkit.checkpoint import verify_step

        assert verify_step(ck._tier, 2) == []


def test_a_lasting_cut_fails_the_step_and_never_commits_it(s3_bucket, capsys, monkeypatch):
    url = s3_bucket.url()
    with s3_bucket.proxy() as proxy:
        options = s3_bucket.server.storage_options(proxy.endpoint)
        ck = Checkpointer(url, storage_options=options, chunk_bytes=CHUNK)
        ck._tier.backoff_s = 0.05                        # keep the test fast; 4 attempts still
        ck.save(1, _big_state(1)).result(timeout=60)
        proxy.cut_after(700 << 10, stay_down=True)       # ~60% of step 2, then down for good
        handle = ck.save(2, _big_state(2))
        with pytest.raises(CheckpointWriteError) as info:
            handle.result(timeout=90)
        assert f"{url}/step_0000000002/rank_00000/data/c/" in str(info.value)
        assert "after 4 attempts" in str(info.value)
        assert proxy.cuts == 1 and proxy.refused > 0
        proxy.heal()
        assert ck.steps() == [1]                         # never reported committed
        with pytest.raises(CheckpointNotFoundError, match="never committed"):
            ck.load(2)
        assert torch.equal(ck.load()["w"], _big_state(1)["w"])
        with pytest.raises(CheckpointWriteError, match="an earlier checkpoint failed"):
            ck.save(3, _big_state(3))                    # the loop learns it, once
        ck.close()
    fs = _s3fs(s3_bucket)
    uploaded = fs.find(f"{s3_bucket.name}/run1/step_0000000002")
    assert any("/data/c/" in k for k in uploaded), uploaded     # it was half uploaded...
    assert not any(k.endswith("step_0000000002/zarr.json") for k in uploaded)   # ...not committed
    rc, out = _cli(capsys, monkeypatch, s3_bucket, "ls", url, "--json")
    assert rc == 0, out
    assert {r["step"]: r["committed"] for r in json.loads(out)} == {1: True, 2: False}, out
    rc, out = _cli(capsys, monkeypatch, s3_bucket, "ls", url)
    step2 = [line for line in out.splitlines() if line.split()[:1] == ["2"]]
    assert len(step2) == 1 and "UNCOMMITTED" in step2[0], out
    with Checkpointer(url, storage_options=s3_bucket.storage_options, chunk_bytes=CHUNK) as ck:
        ck.save(2, _big_state(2)).result(timeout=60)     # a new attempt clears the leftovers
        assert ck.steps() == [1, 2]
        assert torch.equal(ck.load(2)["w"], _big_state(2)["w"])


def test_tier_write_names_the_object_after_its_retries(s3_bucket):
    with s3_bucket.proxy() as proxy:
        tier = FsspecTier(s3_bucket.url("direct"), backoff_s=0.01, attempts=3,
                          storage_options=s3_bucket.server.storage_options(proxy.endpoint))
        tier.write("step_0000000001/rank_00000/data/c/0", memoryview(b"ok"))
        proxy.cut_after(100, stay_down=True)
        with pytest.raises(ObjectStoreError) as info:
            tier.write("step_0000000001/rank_00000/data/c/1", memoryview(bytes(4096)))
        err = info.value
        assert isinstance(err, OSError)
        assert err.filename == f"{s3_bucket.url('direct')}/step_0000000001/rank_00000/data/c/1"
        assert "after 3 attempts" in str(err)


def test_memory_url_round_trip():
    """fsspec's in-process memory:// filesystem goes through the same tier."""
    with Checkpointer("memory://tk-test-run", chunk_bytes=CHUNK) as ck:
        ck.save(1, _state(1)).result(timeout=60)
        assert ck.steps() == [1] and _same(ck.load(), _state(1))
    fsspec.filesystem("memory").rm("/tk-test-run", recursive=True)


def test_an_interrupted_remove_leaves_the_step_uncommitted(monkeypatch):
    """remove() deletes the manifest before the data: dying in between (a GC killed
    mid-delete) leaves an uncommitted step, never a committed step with missing data."""
    from trainkit.checkpoint.reader import committed_steps

    tier = FsspecTier("memory://tk-test-remove", attempts=1)
    tier.prepare(4, "rank_00000")
    tier.write("step_0000000004/rank_00000/data/c/0", memoryview(b"data"))
    tier.publish(4, {"step": 4})
    assert committed_steps(tier) == [4]

    def crash(*args, **kwargs):
        raise ConnectionResetError("killed mid-delete")

    monkeypatch.setattr(tier._fs, "rm", crash)           # the bulk delete of the data dies
    with pytest.raises(ObjectStoreError, match="delete failed after 1 attempts"):
        tier.remove(4)
    assert committed_steps(tier) == [] and tier.step_dirs() == [4]
    assert tier.read("step_0000000004/rank_00000/data/c/0") == b"data"
    monkeypatch.undo()
    tier.remove(4)
    assert tier.step_dirs() == []


def test_s3_options_from_the_standard_environment():
    from trainkit.checkpoint.tiers.fsspec import s3_defaults

    env = {"AWS_ENDPOINT_URL": "http://generic:9000", "AWS_ENDPOINT_URL_S3": "http://s3:9000"}
    opts = s3_defaults(None, env)
    assert opts["endpoint_url"] == "http://s3:9000"             # the service-specific one wins
    assert opts["use_listings_cache"] is False                  # other processes' commits show
    assert opts["config_kwargs"]["retries"] == {"max_attempts": 1}   # the tier retries
    assert s3_defaults(None, {"AWS_ENDPOINT_URL": "http://g:1"})["endpoint_url"] == "http://g:1"
    mine = s3_defaults({"endpoint_url": "http://mine:1", "config_kwargs": {
        "retries": {"max_attempts": 3}, "connect_timeout": 5}}, env)
    assert mine["endpoint_url"] == "http://mine:1"               # explicit options win
    assert mine["config_kwargs"] == {"retries": {"max_attempts": 3}, "connect_timeout": 5}
    assert "endpoint_url" not in s3_defaults(None, {})


def test_s3_as_the_persistent_tier_below_memory_and_local(s3_bucket, tmp_path):
    """The tier flow copies steps down to S3, garbage-collects there, and a node whose
    memory and local tiers are gone restores from S3 with no manual step."""
    import shutil

    from trainkit.checkpoint.reader import committed_steps

    url = s3_bucket.url()

    def open_ck() -> Checkpointer:
        return Checkpointer(url, storage_options=s3_bucket.storage_options,
                            local_dir=tmp_path / "l", memory_dir=tmp_path / "m",
                            keep_in_memory=1, keep_local=1, keep_persistent=2,
                            chunk_bytes=CHUNK)

    with open_ck() as ck:
        for step in (1, 2, 3):
            ck.save(step, _state(step)).result(timeout=60)
            ck.wait()                                    # the copy to S3 has finished
            assert "persistent" in ck.tiers(step)
    remote = FsspecTier(url, storage_options=s3_bucket.storage_options)
    assert committed_steps(remote) == [2, 3]              # retention on S3: step 1 collected
    assert remote.step_dirs() == [2, 3]                   # ...with every object of it
    shutil.rmtree(tmp_path / "l")
    shutil.rmtree(tmp_path / "m")
    with open_ck() as ck:
        assert ck.tiers(3) == ["persistent"]
        assert _same(ck.load(), _state(3))
        assert ck.loaded_step == 3 and ck.loaded_from == "persistent"
