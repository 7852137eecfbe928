"""Tampered checkpoints: every reader ends in a clear error or a correct load, and no
commit record is ever deleted (issue #16).

One real checkpoint (steps 1 and 2) is built once; each case copies it, mutates step 2
one way (resealing the checksums where the case is not about corruption, so the
validation, not the checksum, must catch it) and runs ``Checkpointer.load()``, ``ckpt
verify``/``info``/``ls``/``export`` in process and a ``trainkit:DIR@2`` merge input.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from trainkit.checkpoint import Checkpointer
from trainkit.checkpoint.errors import CheckpointError, CorruptCheckpointError
from trainkit.checkpoint.format.layout import crc32
from trainkit.cli import main
from trainkit.merge.files import open_input

STEP2 = "step_0000000002"
RANK = f"{STEP2}/rank_00000"


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(40, 40, generator=g), "b": torch.randn(40, generator=g)},
            "optim": {"step": step, "betas": (0.9, 0.99), "dtype": torch.bfloat16},
            "note": "x"}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tamper") / "ck"
    with Checkpointer(root, chunk_bytes=4096) as ck:
        for step in (1, 2):
            ck.save(step, _state(step)).result(timeout=60)
    return root


# -- mutations --------------------------------------------------------------------------

def _load_json(path: Path) -> dict:
    return json.loads(path.read_bytes())


def _record(ck: Path) -> dict:
    return _load_json(ck / STEP2 / "zarr.json")


def _write_record(ck: Path, doc: dict) -> None:
    (ck / STEP2 / "zarr.json").write_text(json.dumps(doc))


def _edit_index(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """Change rank 0's index of step 2, then reseal: its size and CRC in the record."""
    def mutate(ck: Path) -> None:
        path = ck / RANK / "zarr.json"
        doc = _load_json(path)
        edit(doc["attributes"]["trainkit"])
        _reseal_index(ck, json.dumps(doc).encode())
    return mutate


def _reseal_index(ck: Path, raw: bytes) -> None:
    (ck / RANK / "zarr.json").write_bytes(raw)
    rec = _record(ck)
    rec["attributes"]["trainkit"]["files"]["rank_00000/zarr.json"] = [len(raw), crc32(raw)]
    _write_record(ck, rec)


def _edit_record(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(ck: Path) -> None:
        rec = _record(ck)
        edit(rec["attributes"]["trainkit"])
        _write_record(ck, rec)
    return mutate


def _set(path: tuple, value) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        node = doc
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return edit


def _tensor(name: str) -> Callable[[dict], int]:
    return lambda ix: next(i for i, t in enumerate(ix["tensors"]) if t["name"] == name)


def _edit_tensor(field: str, value) -> Callable[[Path], None]:
    return _edit_index(lambda ix: ix["tensors"][_tensor("model/w")(ix)].__setitem__(field, value))


def _deep(n: int) -> dict:
    node: dict = {"leaf": 1}
    for _ in range(n):
        node = {"k": node}
    return node


def _deep_raw(n: int) -> str:
    return '{"k":' * n + "1" + "}" * n


def _tree_value(value) -> Callable[[Path], None]:
    return _edit_index(lambda ix: ix["tree"].__setitem__("note", value))


def _deep_index(ck: Path) -> None:
    doc = _load_json(ck / RANK / "zarr.json")
    raw = json.dumps(doc).replace('"note": "x"', f'"note": {_deep_raw(5000)}', 1)
    assert raw != json.dumps(doc)
    _reseal_index(ck, raw.encode())


def _deep_record(ck: Path) -> None:
    raw = (ck / STEP2 / "zarr.json").read_text()
    (ck / STEP2 / "zarr.json").write_text(raw[:-1] + f', "deep": {_deep_raw(200_000)}}}')


def _chunk(ck: Path, c: int = 0) -> Path:
    return ck / RANK / "data" / "c" / str(c)


def _bit_flip(ck: Path) -> None:
    data = bytearray(_chunk(ck).read_bytes())
    data[10] ^= 1
    _chunk(ck).write_bytes(bytes(data))


def _symlink_chunk(ck: Path) -> None:
    """The same bytes, through a link: checksums would pass; the link must not be read."""
    outside = ck.parent / f"{ck.name}-outside-chunk"
    shutil.copy(_chunk(ck), outside)
    _chunk(ck).unlink()
    _chunk(ck).symlink_to(outside)


def _symlink_step(ck: Path) -> None:
    """Step 2 replaced by a link to a copy elsewhere: not a step of this directory."""
    outside = ck.parent / f"{ck.name}-outside-step"
    shutil.copytree(ck / STEP2, outside)
    shutil.rmtree(ck / STEP2)
    (ck / STEP2).symlink_to(outside, target_is_directory=True)


def _traversal(ck: Path) -> None:
    """The array path points outside the checkpoint, at a planted copy of the data."""
    outside = ck.parent / f"{ck.name}-outside" / "data"
    shutil.copytree(ck / RANK / "data", outside)
    _edit_index(_set(("arrays", "rank", "path"), os.path.relpath(outside, ck / STEP2)))(ck)
    rec = _record(ck)
    files = rec["attributes"]["trainkit"]["files"]
    for rel in list(files):
        if rel.startswith("rank_00000/data/"):
            files[os.path.relpath(outside, ck / STEP2) + rel[len("rank_00000/data"):]] = files[rel]
    _write_record(ck, rec)


CASES: dict[str, Callable[[Path], None]] = {
    "path-traversal": _traversal,
    "absolute-path": _edit_index(_set(("arrays", "rank", "path"), "/etc")),
    "huge-nchunks": _edit_index(_set(("arrays", "rank", "nchunks"), 2**40)),
    "chunk-bytes-mismatch": _edit_index(lambda ix: ix["arrays"]["rank"].__setitem__(
        "chunk_bytes", ix["arrays"]["rank"]["chunk_bytes"] * 2)),
    "huge-world-size": _edit_record(_set(("world_size",), 2**62)),
    "world-size-not-ranks": _edit_record(_set(("world_size",), 2)),
    "record-path-traversal": _edit_record(lambda r: r["files"].__setitem__("../../x", [1, 0])),
    "record-not-json": lambda ck: (ck / STEP2 / "zarr.json").write_bytes(b"\xff{not json"),
    "bad-dtype": _edit_tensor("dtype", "load"),
    "object-dtype": _edit_tensor("dtype", "object"),
    "shape-too-big": _edit_tensor("shape", [10**6, 10**6]),
    "shape-negative": _edit_tensor("shape", [-1, 40]),
    "shape-not-ints": _edit_tensor("shape", ["a", 40]),
    "offset-out-of-range": _edit_tensor("offset", 10**9),
    "offset-misaligned": _edit_tensor("offset", 3),
    "stride-out-of-range": _edit_tensor("stride", [10**9, 1]),
    "stride-wrong-length": _edit_tensor("stride", [1]),
    "blob-index-out-of-range": _edit_tensor("blob", 10**6),
    "blob-outside-array": _edit_index(lambda ix: ix["blobs"][0].__setitem__("offset", 2**50)),
    "blob-checksums-missing": _edit_index(lambda ix: ix["blobs"][0].__setitem__("crc32", [])),
    "index-wrong-rank": _edit_index(_set(("rank",), 7)),
    "index-not-json": lambda ck: _reseal_index(ck, b"[1, 2"),
    "dtype-tag-load": _tree_value({"$dtype": "load"}),
    "dtype-tag-os": _tree_value({"$dtype": "os"}),
    "tensor-ref-negative": _tree_value({"$tensor": -1}),
    "tensor-ref-huge": _tree_value({"$tensor": 10**9}),
    "ndarray-object": _tree_value({"$ndarray": {"dtype": "|O", "shape": [1], "data": "AAAA"}}),
    "device-garbage": _tree_value({"$device": "nonsense:zz"}),
    "int-tag-garbage": _tree_value({"$int": [1]}),
    "deep-index": _deep_index,
    "deep-record": _deep_record,
    "bit-flip": _bit_flip,
    "missing-chunk": lambda ck: _chunk(ck).unlink(),
    "truncated-chunk": lambda ck: _chunk(ck).write_bytes(_chunk(ck).read_bytes()[:100]),
    "symlinked-chunk": _symlink_chunk,
    "symlinked-step": _symlink_step,
}


# -- the readers ------------------------------------------------------------------------

def _cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line(rc: int, err: str, *, codes=(1, 2)) -> None:
    assert rc in codes, err
    assert "Traceback" not in err and err.count("\n") <= 1, err


def _commit_records(ck: Path) -> dict[str, bytes]:
    """Every commit record of step 2, wherever it is now (in place or set aside)."""
    out = {}
    for d in ck.parent.iterdir():
        for cand in (d / STEP2 / "zarr.json", *(d.glob(f"{STEP2}.corrupt*/zarr.json"))):
            if cand.is_file() and not cand.parent.is_symlink():
                out[str(cand.relative_to(ck.parent))] = cand.read_bytes()
    if (ck / STEP2).is_symlink():
        out["link"] = (ck / STEP2 / "zarr.json").read_bytes()
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_tampered_step_is_refused_cleanly(case, pristine, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(pristine, ck, symlinks=True)
    CASES[case](ck)
    records = _commit_records(ck)
    before = next(iter(records.values()))
    d = str(ck)

    rc, out, err = _cli(capsys, "ckpt", "verify", d, "2")
    _one_line(rc, err)
    rc, out, err = _cli(capsys, "ckpt", "info", d, "2")      # metadata only: may be fine
    _one_line(rc, err, codes=(0, 1, 2))
    rc, out, err = _cli(capsys, "ckpt", "ls", d)
    _one_line(rc, err, codes=(0, 2))
    rc, out, err = _cli(capsys, "ckpt", "export", d, "2", "--to", str(tmp_path / "x.safetensors"))
    _one_line(rc, err, codes=(2,))                            # bad input: exit 2
    with pytest.raises((CheckpointError, OSError, ValueError)) as info:
        reader = open_input(f"trainkit:{d}@2")
        for name in reader.keys():
            reader.get(name)
    assert "Traceback" not in str(info.value) and str(info.value)
    assert not (tmp_path / "x.safetensors").exists()

    with Checkpointer(ck) as c:     # falls back to step 1, loaded correctly
        state = c.load()
        assert c.loaded_step == 1
        assert c.latest() == 1
    want = _state(1)
    assert torch.equal(state["model"]["w"], want["model"]["w"])
    assert state["optim"] == want["optim"]
    after = _commit_records(ck)
    assert before in after.values(), f"step 2's commit record was deleted: {after}"


def test_explicit_loads_of_a_tampered_step_raise_checkpoint_errors(pristine, tmp_path):
    for case in ("huge-nchunks", "dtype-tag-load", "deep-index", "stride-out-of-range"):
        ck = tmp_path / case
        shutil.copytree(pristine, ck)
        CASES[case](ck)
        with Checkpointer(ck) as c, pytest.raises(CorruptCheckpointError):
            c.load(2)
        assert (ck / STEP2 / "zarr.json").is_file()     # an explicit load never sets aside


def test_set_aside_step_can_be_saved_again_and_restored(pristine, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(pristine, ck)
    _bit_flip(ck)
    record = (ck / STEP2 / "zarr.json").read_bytes()
    with Checkpointer(ck) as c:
        assert c.load()["optim"]["step"] == 1
        c.save(2, _state(20)).result(timeout=60)
    aside = ck / f"{STEP2}.corrupt"
    assert (aside / "zarr.json").read_bytes() == record            # kept whole, unchanged
    with Checkpointer(ck) as c:
        assert c.load()["optim"]["step"] == 20
    rc, out, _ = _cli(capsys, "ckpt", "gc", str(ck), "--keep", "5")
    assert rc == 0 and f"{STEP2}.corrupt" in out and aside.is_dir()     # kept without --force
    rc, out, _ = _cli(capsys, "ckpt", "gc", str(ck), "--keep", "5", "--force")
    assert rc == 0 and not aside.exists()


def test_own_newer_steps_after_a_resume_are_uncommitted(tmp_path):
    """The one case a load may uncommit: a step this job saved after its resume point."""
    with Checkpointer(tmp_path / "ck", chunk_bytes=4096) as c:
        for step in (1, 2):
            c.save(step, _state(step)).result(timeout=60)
        _bit_flip(tmp_path / "ck")
        assert c.load()["optim"]["step"] == 1 and c.steps() == [1]
    assert not list(tmp_path.glob("ck/*.corrupt*"))


def test_gc_skips_files_links_and_young_leftovers(pristine, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(pristine, ck)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    shutil.rmtree(ck / "step_0000000001")
    (ck / "step_0000000000").write_text("a file named like a step")
    (ck / "step_0000000001").symlink_to(victim, target_is_directory=True)   # a link, likewise
    (ck / "step_3").mkdir()                                    # not a canonical name
    os.utime(ck / "step_3", (0, 0))
    rc, out, err = _cli(capsys, "ckpt", "gc", str(ck), "--keep", "1", "--json")
    assert rc == 0, err
    done = json.loads(out)
    assert done["delete"] == [] and done["leftovers"] == [] and done["kept"] == [2]
    assert (victim / "keep").exists() and (ck / "step_3").is_dir()
    assert (ck / "step_0000000000").is_file() and (ck / "step_0000000001").is_symlink()
    for p in ("step_0000000000", "step_0000000001"):
        (ck / p).unlink()
    (ck / "step_0000000000").mkdir()                           # a young leftover of a save
    rc, out, _ = _cli(capsys, "ckpt", "gc", str(ck), "--keep", "1", "--json")
    assert json.loads(out)["young_kept"] == [0] and (ck / "step_0000000000").is_dir()
    os.utime(ck / "step_0000000000", (0, 0))                   # long dead
    rc, out, _ = _cli(capsys, "ckpt", "gc", str(ck), "--keep", "1", "--json")
    assert json.loads(out)["leftovers"] == [0] and not (ck / "step_0000000000").exists()
    rc, out, _ = _cli(capsys, "ckpt", "gc", str(ck), "--keep", "1")
    assert rc == 0 and "deleted uncommitted leftovers none" in out


def test_set_aside_on_a_tier_without_rename_keeps_the_record():
    pytest.importorskip("fsspec")
    import uuid

    from trainkit.checkpoint.reader import committed_steps
    from trainkit.checkpoint.tiers import TIERS
    from trainkit.checkpoint.tiers.retention import set_aside

    tier = TIERS["fsspec"](f"memory://tamper-{uuid.uuid4().hex[:8]}")
    tier.prepare(4, "rank_00000")
    tier.write("step_0000000004/rank_00000/data/c/0", memoryview(b"abc"))
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {"trainkit": {"kind": "step"}}}
    tier.publish(4, doc)
    where = set_aside(tier, 4)
    assert where.endswith("step_0000000004/zarr.json.corrupt") and committed_steps(tier) == []
    assert json.loads(tier.read("step_0000000004/zarr.json.corrupt")) == doc
    assert tier.read("step_0000000004/rank_00000/data/c/0") == b"abc"


def test_gc_reports_only_what_it_removed(pristine, tmp_path, capsys, monkeypatch):
    from trainkit.checkpoint.tiers import LocalTier

    ck = tmp_path / "ck"
    shutil.copytree(pristine, ck)

    def refuse(self, step):
        raise PermissionError(13, "Permission denied", self.path(f"step_{step:010d}"))

    monkeypatch.setattr(LocalTier, "remove", refuse)
    rc, out, err = _cli(capsys, "ckpt", "gc", str(ck), "--keep", "1")
    assert rc == 1 and "deleted committed steps none" in out, out
    assert "could not remove step 1" in err and "Permission denied" in err


@pytest.mark.parametrize("case", ["entry-out-of-range", "rank-out-of-range", "dtype-load",
                                  "size-negative"])
def test_tampered_dcp_metadata_is_refused_cleanly(case, tmp_path, capsys):
    import warnings

    import torch.distributed.checkpoint as dcp

    from trainkit.checkpoint.interop.dcp import ZarrWriter

    ck = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"w": torch.arange(6.0)}}, storage_writer=ZarrWriter(ck, step=0))
    meta = ck / "step_0000000000" / "dcp_metadata.json"
    doc = _load_json(meta)
    if case == "entry-out-of-range":
        doc["storage_data"][0][3] = 99
    elif case == "rank-out-of-range":
        doc["storage_data"][0][2] = 5
    elif case == "dtype-load":
        doc["state_dict_metadata"]["model.w"]["tensor"]["properties"]["dtype"] = "load"
    else:
        doc["state_dict_metadata"]["model.w"]["tensor"]["size"] = [-6]
    raw = json.dumps(doc).encode()
    meta.write_bytes(raw)
    record_path = ck / "step_0000000000" / "zarr.json"
    rec = _load_json(record_path)
    rec["attributes"]["trainkit"]["files"]["dcp_metadata.json"] = [len(raw), crc32(raw)]
    record_path.write_text(json.dumps(rec))
    rc, _, err = _cli(capsys, "ckpt", "export", str(ck), "0", "--to", str(tmp_path / "x.st"))
    _one_line(rc, err)
    with pytest.raises((CheckpointError, ValueError)):
        reader = open_input(f"trainkit:{ck}@0#model.")
        for name in reader.keys():
            reader.get(name)
