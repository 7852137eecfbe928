"""The Tier contract, run against every implementation.

It iterates over the ``TIERS`` registry itself (a new entry without a fixture in
``MAKERS`` fails). The writer, reader, flusher and garbage collector are written once against the Tier
Protocol, so every tier must behave the same: LocalTier on disk, LocalTier on /dev/shm
(the memory tier: no fsync), FsspecTier on ``memory://`` and FsspecTier on a real
S3-compatible server (moto, started by the fixture).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import uuid

import pytest

from s3server import moto_server, s3_bucket  # noqa: F401 - pytest fixtures
from trainkit.checkpoint.reader import committed_steps
from trainkit.checkpoint.format.layout import COMMIT_FILE
from trainkit.checkpoint.tiers import TIERS, LocalTier, Tier, open_tier

pytestmark = pytest.mark.timeout(60)

# How to make each entry of the TIERS registry for a test: registry name -> {case: a
# context manager factory (tmp_path, request) -> tier}. The test below iterates over the
# registry itself, so a new tier without an entry here fails instead of going untested.
@contextlib.contextmanager
def _local(tmp_path, request):
    yield TIERS["local"](str(tmp_path / "tier"), name="local", shared=False)


@contextlib.contextmanager
def _shm(tmp_path, request):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine")
    root = f"/dev/shm/trainkit-contract-{uuid.uuid4().hex[:12]}"
    try:
        yield TIERS["memory"](root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _fsspec_memory(tmp_path, request):
    import fsspec

    name = f"contract-{uuid.uuid4().hex[:12]}"
    try:
        yield TIERS["fsspec"](f"memory://{name}")
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists(f"/{name}"):
            fs.rm(f"/{name}", recursive=True)


@contextlib.contextmanager
def _s3(tmp_path, request):
    bucket = request.getfixturevalue("s3_bucket")      # moto, started by the fixture
    yield TIERS["fsspec"](bucket.url("tier"), storage_options=bucket.storage_options)


MAKERS = {
    "local": {"local": _local},
    "memory": {"shm": _shm},
    "fsspec": {"fsspec-memory": _fsspec_memory, "s3": _s3},
}

CASES = [(kind, case) for kind in TIERS for case in MAKERS.get(kind, {"<no fixture>": None})]


def test_every_registered_tier_has_a_fixture():
    missing = sorted(set(TIERS) - set(MAKERS))
    assert not missing, (f"TIERS entries {missing} have no fixture in MAKERS: add one so the "
                         f"contract runs against them")
    assert not set(MAKERS) - set(TIERS), "MAKERS names a tier that is not registered"


@pytest.fixture(params=CASES, ids=[f"{k}-{c}" for k, c in CASES])
def tier(request, tmp_path):
    kind, case = request.param
    maker = MAKERS.get(kind, {}).get(case)
    if maker is None:
        pytest.fail(f"TIERS[{kind!r}] has no fixture in MAKERS; add one")
    with maker(tmp_path, request) as t:
        yield t


def test_open_tier_picks_from_the_registry(tmp_path):
    assert isinstance(open_tier(str(tmp_path / "x")), LocalTier)
    assert type(open_tier("memory://contract-pick")).__name__ == "FsspecTier"
    with pytest.raises(ValueError, match="storage_options"):
        open_tier(str(tmp_path / "y"), storage_options={"key": "k"})


def _mv(data: bytes) -> memoryview:
    return memoryview(bytearray(data))


def _step_rel(step: int, rel: str) -> str:
    return f"step_{step:010d}/{rel}"


def test_is_a_tier(tier):
    assert isinstance(tier, Tier)
    assert tier.name and tier.url


def test_write_size_read_and_ranged_reads(tier):
    payload = bytes(range(256)) * 40                     # 10240 bytes
    rel = _step_rel(1, "rank_00000/data/c/0")
    tier.prepare(1, "rank_00000")
    tier.write(rel, _mv(payload))
    assert tier.size(rel) == len(payload)
    assert tier.read(rel) == payload
    a, b = bytearray(100), bytearray(4000)               # two buffers, one read, at an offset
    tier.read_into(rel, [memoryview(a), memoryview(b)], offset=1000)
    assert bytes(a) == payload[1000:1100] and bytes(b) == payload[1100:5100]
    tier.write(rel, _mv(b"shorter"))                     # overwrite replaces the object
    assert tier.size(rel) == 7 and tier.read(rel) == b"shorter"
    with pytest.raises(EOFError):
        tier.read_into(rel, [memoryview(bytearray(20))], offset=0)


def test_missing_objects(tier):
    rel = _step_rel(5, "rank_00000/zarr.json")
    assert tier.size(rel) is None
    assert tier.size("step_0000000005") is None          # a prefix or directory is no object
    with pytest.raises(FileNotFoundError):
        tier.read(rel)
    with pytest.raises(FileNotFoundError):
        tier.read_into(rel, [memoryview(bytearray(4))])
    assert tier.step_dirs() == []
    tier.unpublish(5)                                    # absent already: not an error
    tier.remove(5)


def test_step_dirs_lists_steps_only_sorted(tier):
    for step in (30, 2, 100):
        tier.prepare(step, "rank_00000")
        tier.write(_step_rel(step, "rank_00000/data/c/0"), _mv(b"x"))
    tier.write("notes.txt", _mv(b"not a step"))
    assert tier.step_dirs() == [2, 30, 100]
    assert committed_steps(tier) == []                   # nothing published yet


def test_publish_commits_and_unpublish_uncommits(tier):
    tier.prepare(7, "rank_00000")
    data = _step_rel(7, "rank_00000/data/c/0")
    tier.write(data, _mv(b"chunk"))
    doc = {"attributes": {"trainkit": {"kind": "step", "step": 7, "files": {"a": [1, 2]}}},
           "zarr_format": 3, "node_type": "group"}
    tier.publish(7, doc)
    assert json.loads(tier.read(_step_rel(7, COMMIT_FILE))) == doc
    assert committed_steps(tier) == [7]
    tier.unpublish(7)
    assert committed_steps(tier) == [] and tier.step_dirs() == [7]
    assert tier.read(data) == b"chunk"                   # uncommitting leaves the data
    tier.unpublish(7)


def test_remove_deletes_the_whole_step(tier):
    for step in (1, 2):
        tier.prepare(step, "rank_00000")
        tier.prepare(step, "rank_00001")
        for r in (0, 1):
            tier.write(_step_rel(step, f"rank_{r:05d}/data/c/0"), _mv(b"abc"))
            tier.write(_step_rel(step, f"rank_{r:05d}/data/zarr.json"), _mv(b"{}"))
        tier.publish(step, {"step": step})
    tier.remove(1)
    assert tier.step_dirs() == [2] and committed_steps(tier) == [2]
    assert tier.size(_step_rel(1, "rank_00001/data/c/0")) is None
    assert tier.read(_step_rel(2, "rank_00001/data/c/0")) == b"abc"


def test_prepare_clears_an_interrupted_attempt(tier):
    tier.prepare(3, "rank_00000")
    tier.prepare(3, "rank_00001")                        # writes go under prepared ranks
    stale = _step_rel(3, "rank_00000/data/c/9")
    other = _step_rel(3, "rank_00001/data/c/0")
    tier.write(stale, _mv(b"leftover"))
    tier.write(other, _mv(b"another rank"))
    tier.prepare(3, "rank_00000")
    assert tier.size(stale) is None
    assert tier.read(other) == b"another rank"           # only this rank's prefix


def test_record_is_visible_whole_or_not_at_all(tier):
    """A reader polling the commit record while it is published never sees a partial one."""
    tier.prepare(9, "rank_00000")
    big = "x" * (2 << 20)                                # a 2 MiB record: many TCP segments
    docs = [{"version": v, "pad": big} for v in range(3)]
    rel = _step_rel(9, COMMIT_FILE)
    seen: list[int] = []
    errors: list[str] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                raw = tier.read(rel)
            except FileNotFoundError:
                if seen:
                    errors.append("the record vanished after it had been published")
                continue
            try:
                doc = json.loads(raw)
            except ValueError:
                errors.append(f"a partial record of {len(raw)} bytes was visible")
                continue
            if doc["pad"] != big:
                errors.append("a record with the wrong content was visible")
            seen.append(doc["version"])

    t = threading.Thread(target=poll)
    t.start()
    try:
        for doc in docs:
            tier.publish(9, doc)
    finally:
        done.set()
        t.join(timeout=30)
    assert not errors, errors[:3]
    assert json.loads(tier.read(rel))["version"] == 2
    assert seen == sorted(seen)                          # versions never go backwards
