"""DCP interoperability: ``dcp.save``/``dcp.load`` through ZarrWriter/ZarrReader.

The result must be an ordinary trainkit step (verify, ls/info, Checkpointer.load), with
DCP's non-tensor items stored as pickled blobs that trainkit refuses by default.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from distributed import run_ranks
from trainkit.checkpoint import (
    Checkpointer,
    CheckpointError,
    PickleRefusedError,
    ZarrReader,
    ZarrWriter,
    committed_steps,
    verify_step,
)
from trainkit.checkpoint.format.dcp_metadata import decode_metadata, encode_metadata
from trainkit.checkpoint.interop.export import export_safetensors
from trainkit.checkpoint.reader import PickledBytes, load_shard, read_commit_record
from trainkit.cli import main

pytestmark = [pytest.mark.timeout(150),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(64, 96, generator=g)
    return {
        "model": {"w": torch.randn(300, 200, generator=g),
                  "wt": base.t(),                                  # a non-contiguous view
                  "emb": torch.randn(1000, 70, generator=g).to(torch.bfloat16),
                  "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
                  "mask": torch.rand(17, generator=g) > 0.5},
        "optim": {"state": {"0": {"exp_avg": torch.randn(300, 200, generator=g)}},
                  "lr": 0.01},
        "layers": [torch.randn(5, generator=g), torch.randn(6, generator=g)],
        "step": 42,
        "note": "hello",
    }


def _zeros_like(state: dict) -> dict:
    def z(v):
        if isinstance(v, torch.Tensor):
            return torch.zeros_like(v.contiguous())
        if isinstance(v, dict):
            return {k: z(x) for k, x in v.items()}
        if isinstance(v, list):
            return [z(x) for x in v]
        return None
    return z(state)


def _assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), (path, set(a), set(b))
        for k in a:
            _assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def test_round_trip_single_process(tmp_path):
    state = _state()
    writer = ZarrWriter(tmp_path, step=7, chunk_bytes=64 << 10)
    dcp.save(state, storage_writer=writer)
    assert writer.last_step == 7 and committed_steps(tmp_path) == [7]
    assert verify_step(tmp_path, 7) == []

    target = _zeros_like(state)
    dcp.load(target, storage_reader=ZarrReader(tmp_path, step=7, allow_pickle=True))
    _assert_same(state, target)

    # trainkit's own reader: tensors as saved, non-tensor values refused without consent
    with Checkpointer(tmp_path) as ck:
        with pytest.raises(PickleRefusedError, match="'optim/lr' is a pickled value.*allow_pickle=True"):
            ck.load(7)
        _assert_same(state, ck.load(7, allow_pickle=True))
    opaque = load_shard(tmp_path, 7, 0, pickled_as_bytes=True)
    assert isinstance(opaque["step"], PickledBytes) and len(opaque["step"]) > 0
    assert torch.equal(opaque["model"]["w"], state["model"]["w"])


def test_step_choice_and_no_overwrite(tmp_path):
    for expect in (0, 1):
        w = ZarrWriter(tmp_path)
        dcp.save({"x": torch.full((3,), float(expect))}, storage_writer=w)
        assert w.last_step == expect
    assert committed_steps(tmp_path) == [0, 1]
    (tmp_path / "step_0000000002").mkdir()        # an interrupted save: its number is skipped
    w = ZarrWriter(tmp_path)
    dcp.save({"x": torch.zeros(3)}, storage_writer=w)
    assert w.last_step == 3
    with pytest.raises(dcp.CheckpointException, match="already committed"):
        dcp.save({"x": torch.zeros(3)}, storage_writer=ZarrWriter(tmp_path, step=1))
    target = {"x": torch.empty(3)}
    dcp.load(target, storage_reader=ZarrReader(tmp_path, step=1, allow_pickle=True))   # untouched
    assert torch.equal(target["x"], torch.ones(3))
    dcp.load(target, storage_reader=ZarrReader(tmp_path, allow_pickle=True))           # newest committed
    assert torch.equal(target["x"], torch.zeros(3))
    with pytest.raises(TypeError, match="step"):
        ZarrWriter(tmp_path, step=-1)


def test_reader_refusals_and_corruption(tmp_path):
    state = _state()
    dcp.save(state, storage_writer=ZarrWriter(tmp_path, step=0, chunk_bytes=64 << 10))
    with pytest.raises(dcp.CheckpointException, match="pickled value"):
        dcp.load(_zeros_like(state), storage_reader=ZarrReader(tmp_path, allow_pickle=False))
    tensors_only = {"model": {"w": torch.zeros(300, 200)}}
    dcp.load(tensors_only, storage_reader=ZarrReader(tmp_path, allow_pickle=False))
    assert torch.equal(tensors_only["model"]["w"], state["model"]["w"])

    with Checkpointer(tmp_path / "native") as ck:
        ck.save(1, {"w": torch.ones(2)}).result(timeout=60)
    with pytest.raises(dcp.CheckpointException, match="not through DCP"):
        dcp.load({"w": torch.zeros(2)}, storage_reader=ZarrReader(tmp_path / "native"))

    chunk = tmp_path / "step_0000000000" / "rank_00000" / "data" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(dcp.CheckpointException, match="checksum mismatch"):
        dcp.load(_zeros_like(state), storage_reader=ZarrReader(tmp_path, allow_pickle=True))
    assert any("fails its checksum" in p for p in verify_step(tmp_path, 0))
    meta = tmp_path / "step_0000000000" / "dcp_metadata.json"
    meta.write_text(meta.read_text().replace('"step"', '"stop"'))
    assert any("dcp_metadata.json fails its checksum (step metadata)" in p
               for p in verify_step(tmp_path, 0))
    with pytest.raises(dcp.CheckpointException, match="fails its checksum"):
        dcp.load(_zeros_like(state), storage_reader=ZarrReader(tmp_path, allow_pickle=True))


def test_metadata_json_round_trip(tmp_path):
    dcp.save(_state(), storage_writer=ZarrWriter(tmp_path, step=0))
    md = ZarrReader(tmp_path).read_metadata()
    again = decode_metadata(encode_metadata(md, md.storage_data))
    assert again.state_dict_metadata == md.state_dict_metadata
    assert again.planner_data == md.planner_data
    assert again.planner_data["optim.state.0.exp_avg"] == ("optim", "state", "0", "exp_avg")
    assert again.storage_data == md.storage_data
    record = read_commit_record(tmp_path, 0)
    assert record["dcp"]["metadata"] in record["files"]


def _cli(capsys, *args: str) -> tuple[int, str]:
    try:
        rc = main(["ckpt", *args])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 2
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_cli_on_dcp_step(tmp_path, capsys):
    dcp.save(_state(), storage_writer=ZarrWriter(tmp_path, step=3, chunk_bytes=64 << 10))
    rc, out = _cli(capsys, "ls", str(tmp_path))
    assert rc == 0 and any(line.split()[0] == "3" and "committed" in line.split()
                           for line in out.splitlines() if line.strip())
    rc, out = _cli(capsys, "info", str(tmp_path), "3")
    assert rc == 0 and "model/emb" in out and "bfloat16" in out and "pickled" in out
    rc, out = _cli(capsys, "verify", str(tmp_path))
    assert rc == 0 and "step 3: ok" in out


# -- two real ranks on gloo --------------------------------------------------------------

def _two_rank_save_load(rank: int, world_size: int, path: str) -> dict:
    torch.manual_seed(0)
    shared = {"w": torch.randn(256, 128), "b": torch.randn(128)}     # replicated: deduped
    state = {"model": shared, "local": {f"r{rank}": torch.full((10,), float(rank))},
             "step": 100 + rank}
    w = ZarrWriter(path, chunk_bytes=64 << 10)
    dcp.save(state, storage_writer=w)
    dcp.save({"only": torch.arange(4.0)}, storage_writer=ZarrWriter(path, step=50))
    target = {"model": {"w": torch.zeros(256, 128), "b": torch.zeros(128)},
              "local": {f"r{rank}": torch.zeros(10)}, "step": None}
    dcp.load(target, storage_reader=ZarrReader(path, step=w.last_step, allow_pickle=True))
    ok = (torch.equal(target["model"]["w"], shared["w"])
          and torch.equal(target["local"][f"r{rank}"], state["local"][f"r{rank}"]))
    other = {"only": torch.zeros(4)}
    dcp.load(other, storage_reader=ZarrReader(path, step=50, allow_pickle=True))
    return {"step": w.last_step, "ok": ok, "loaded_step": target["step"],
            "only": other["only"].tolist()}


@pytest.mark.timeout(180)
def test_two_ranks_gloo(tmp_path):
    out = run_ranks(_two_rank_save_load, 2, str(tmp_path), timeout=150)
    assert [out[r]["step"] for r in (0, 1)] == [0, 0]
    assert all(out[r]["ok"] for r in (0, 1)), out
    # DCP dedups the non-tensor "step" to one writer (the coordinator's value wins)
    assert {out[0]["loaded_step"], out[1]["loaded_step"]} <= {100, 101}
    assert out[0]["only"] == out[1]["only"] == [0.0, 1.0, 2.0, 3.0]
    assert committed_steps(tmp_path) == [0, 50]
    for step in (0, 50):
        assert verify_step(tmp_path, step) == [], step
        assert read_commit_record(tmp_path, step)["world_size"] == 2
    # every rank wrote its own group; each tensor lives on exactly one rank (dedup)
    shards = [load_shard(tmp_path, 0, r, allow_pickle=True) for r in (0, 1)]
    assert shards[0]["local"]["r0"].tolist() == [0.0] * 10
    assert shards[1]["local"]["r1"].tolist() == [1.0] * 10
    assert sum("w" in s.get("model", {}) for s in shards) == 1
    # the world-size-agnostic restore (2 saved ranks, 1 loading) refuses pickles too
    with Checkpointer(tmp_path) as ck:
        with pytest.raises(PickleRefusedError, match="'step' is a pickled value"):
            ck.load(0)
        assert ck.load(0, allow_pickle=True) is not None
    # export merges the ranks' trees: DCP put each tensor on one rank only
    files = export_safetensors(tmp_path, 0, tmp_path / "out" / "model.safetensors")
    assert set(load_file(files[0])) == {"w", "b"}
    # step 50: one replicated item, so one rank had nothing to write: an empty group
    sizes = [sum(1 for _ in load_shard(tmp_path, 50, r)) for r in (0, 1)]
    assert sorted(sizes) == [0, 1]


def test_writer_rejects_plan_without_step(tmp_path):
    from torch.distributed.checkpoint.planner import SavePlan
    with pytest.raises(CheckpointError, match="step assignment"):
        ZarrWriter(tmp_path).write_data(SavePlan([]), None)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ZarrWriter.validate_checkpoint_id(str(tmp_path))


def test_async_save(tmp_path):
    """dcp.async_save stages the state, then runs the same writer in the background."""
    state = {"model": {"w": torch.randn(100, 100)}, "step": 3}
    dcp.async_save(state, storage_writer=ZarrWriter(tmp_path, step=4)).result(timeout=60)
    assert verify_step(tmp_path, 4) == []
    target = {"model": {"w": torch.zeros(100, 100)}, "step": None}
    dcp.load(target, storage_reader=ZarrReader(tmp_path, step=4, allow_pickle=True))
    assert torch.equal(target["model"]["w"], state["model"]["w"]) and target["step"] == 3


def test_custom_planner_data_is_pickled_only_with_consent():
    from decimal import Decimal

    from torch.distributed.checkpoint.metadata import Metadata

    md = Metadata(state_dict_metadata={}, planner_data={"scale": Decimal("1.5")})
    doc = encode_metadata(md, {})
    assert set(doc["planner_data"]) == {"$pickle"}
    with pytest.raises(PickleRefusedError, match="planner data"):
        decode_metadata(doc)
    assert decode_metadata(doc, allow_pickle=True).planner_data == {"scale": Decimal("1.5")}


def test_reader_refuses_ranks_on_different_steps(tmp_path):
    from torch.distributed.checkpoint.planner import LoadPlan

    plans = [LoadPlan([], storage_data=3), LoadPlan([], storage_data=4)]
    with pytest.raises(CheckpointError, match=r"different steps to load: \[3, 4\]"):
        ZarrReader(tmp_path).prepare_global_plan(plans)
    assert ZarrReader(tmp_path).prepare_global_plan(plans[:1]) == plans[:1]
