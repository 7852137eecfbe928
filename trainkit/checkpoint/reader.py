"""Reading committed steps back: discovery, verification and reconstruction.

Loading trusts nothing it has not checked. The commit record's inventory gives every
file's size and checksum: a deleted chunk (which zarr would silently read as zeros) or
a truncated file is caught before any byte is used, and every blob (the bytes of one
storage, shared by the tensors in it) is checked against the checksum taken when it
was snapshotted. Chunks are read with ``os.preadv`` straight into each blob's own
tensor, from several threads (the call releases the GIL), so restore runs near the
disk's speed and the returned tensors do not pin one giant buffer.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from trainkit.checkpoint.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    PickleRefusedError,
)
from trainkit.checkpoint.format import codec
from trainkit.checkpoint.format.dtensor_meta import check_pieces
from trainkit.checkpoint.format.layout import (
    COMMIT_FILE,
    chunk_digest,
    chunk_relpath,
    chunk_segments,
    crc32,
    rank_array,
    rank_dirname,
    step_dirname,
)
from trainkit.checkpoint.format.validate import (
    dtype_of,
    parse_json,
    validate_index,
    validate_record,
)
from trainkit.checkpoint.tiers import Tier, open_tier

__all__ = ["committed_steps", "read_commit_record", "read_rank_index", "load_shard",
           "load_blobs", "rank_files_present", "chunk_location", "rank_files", "verify_step",
           "as_tier", "record_lists", "COMMIT_FILE", "PickledBytes"]


def as_tier(where: Tier | str | os.PathLike) -> Tier:
    """A tier for a path or URL given by a user; tiers pass through."""
    if isinstance(where, (str, os.PathLike)):
        return open_tier(os.fspath(where))
    return where


def _rel(step: int, rel: str) -> str:
    return f"{step_dirname(step)}/{rel}"


def committed_steps(where: Tier | str) -> list[int]:
    """Steps whose commit record exists on the tier, oldest first."""
    tier = as_tier(where)
    return [s for s in tier.step_dirs() if tier.size(_rel(s, COMMIT_FILE)) is not None]


def read_commit_record(where: Tier | str, step: int) -> dict:
    """The commit record of ``step``; a clear error if the step is missing or uncommitted."""
    tier = as_tier(where)
    rel = _rel(step, COMMIT_FILE)
    try:
        raw = tier.read(rel)
    except FileNotFoundError:
        committed = committed_steps(tier)
        detail = ("it exists but was never committed (a save was interrupted or failed)"
                  if step in tier.step_dirs() else "it does not exist")
        raise CheckpointNotFoundError(
            f"step {step} is not a committed checkpoint in {tier.url}: {detail}; committed "
            f"steps: {committed if committed else 'none'}") from None
    where = f"step {step}: commit record {tier.url}/{rel}"
    doc = parse_json(raw, where)
    attrs = doc.get("attributes", {}) if isinstance(doc, dict) else None
    record = attrs.get("trainkit") if isinstance(attrs, dict) else None
    if not isinstance(record, dict) or record.get("kind") != "step":
        raise CorruptCheckpointError(f"step {step}: {tier.url}/{rel} is not a trainkit commit "
                                     f"record")
    return validate_record(record, where)


def record_lists(where: Tier | str, step: int, files: dict[str, list[int]]) -> bool:
    """Whether ``step``'s commit record exists and lists ``files`` (a rank's manifest)
    as they are. Rank 0 may die, taking the coordination store with it, right after
    committing: the record on the tier is then the ground truth."""
    try:
        record = read_commit_record(where, step)
    except CheckpointError:
        return False
    return all(record.get("files", {}).get(rel) == v for rel, v in files.items())


def _check_file(tier: Tier, step: int, rank: int, rel: str, size: int, what: str) -> str:
    where = f"{tier.url}/{_rel(step, rel)}"
    actual = tier.size(_rel(step, rel))
    if actual is None:
        raise CorruptCheckpointError(f"step {step}, rank {rank}: file {where} is missing "
                                     f"({what}) on the {tier.name} tier")
    if actual != size:
        raise CorruptCheckpointError(f"step {step}, rank {rank}: file {where} has {actual} bytes, "
                                     f"the commit record says {size} ({what}); it was truncated "
                                     f"or overwritten")
    return where


def read_rank_index(where: Tier | str, step: int, rank: int, record: dict) -> dict:
    """The rank's index (tensor table, blobs, arrays and the tree), checksum-verified."""
    tier = as_tier(where)
    rel = f"{rank_dirname(rank)}/zarr.json"
    files = record["files"]
    if rel not in files:
        raise CheckpointNotFoundError(f"step {step} has no rank {rank}: it was saved by "
                                      f"{record['world_size']} ranks")
    size, crc = files[rel]
    path = _check_file(tier, step, rank, rel, size, "the rank's index")
    raw = tier.read(_rel(step, rel))
    if crc32(raw) != crc:
        raise CorruptCheckpointError(f"step {step}, rank {rank}: checksum mismatch in {path} "
                                     f"(the rank's index)")
    where = f"step {step}, rank {rank}: index {path}"
    doc = parse_json(raw, where)
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    index = attrs.get("trainkit") if isinstance(attrs, dict) else None
    return validate_index(index, record, rank, where)


def rank_arrays(index: dict) -> dict[str, dict]:
    """The arrays a rank's blobs live in: ``{"rank": {...}, "replicated": {...}}``."""
    return index["arrays"]


def chunk_location(index: dict, array: str, c: int) -> str:
    """Where chunk ``c`` of a rank's array lives, relative to the step directory. In a
    deduplicated copy, a chunk identical on every rank is stored once, in the array of
    the rank that wrote it (``arrays[..]["shared"]`` maps chunk to that rank)."""
    info = index["arrays"][array]
    owner = info.get("shared", {}).get(str(c))
    return chunk_relpath(info["path"] if owner is None else rank_array(owner), c)


def rank_files(index: dict) -> list[str]:
    """Every file a rank's load reads, relative to the step directory."""
    out = [f"{rank_dirname(index['rank'])}/zarr.json"]
    for array, info in rank_arrays(index).items():
        out.append(f"{info['path']}/zarr.json")
        out += [chunk_location(index, array, c) for c in range(info["nchunks"])]
    return out


def rank_files_present(where: Tier | str, step: int, rank: int, record: dict) -> str | None:
    """Cheap completeness check (sizes only) of what loading ``rank`` reads from this tier.
    Returns None when all is there, or what is missing."""
    tier = as_tier(where)
    try:
        index = read_rank_index(tier, step, rank, record)
        for rel in rank_files(index):
            if rel not in record["files"]:
                return f"{rel} is not in the commit record"
            _check_file(tier, step, rank, rel, record["files"][rel][0], "data")
    except (CheckpointNotFoundError, CorruptCheckpointError, OSError) as exc:
        return str(exc)
    return None


def _blob_names(index: dict, blob: int, limit: int = 3) -> str:
    names = [t["name"] for t in index["tensors"] if t["blob"] == blob]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def array_segments(index: dict, array: str) -> tuple[list[int], list[list]]:
    """The blobs in ``array`` (indexes, by offset) and each chunk's segments, with the
    blob index in place of the position inside the array's blob list."""
    info = rank_arrays(index)[array]
    members = sorted((i for i, b in enumerate(index["blobs"]) if b.get("array", "rank") == array),
                     key=lambda i: index["blobs"][i]["offset"])
    segs = chunk_segments([(index["blobs"][i]["offset"], index["blobs"][i]["nbytes"])
                           for i in members], info["chunk_bytes"], info["nchunks"])
    return members, [[(None if b is None else members[b], a, e) for b, a, e in chunk]
                     for chunk in segs]


def load_blobs(tier: Tier, step: int, rank: int, record: dict, index: dict, *,
               threads: int = 4, only: set[int] | None = None) -> list[torch.Tensor]:
    """Read and verify the blobs of a rank (``only`` those, if given): one uint8 tensor
    per blob (empty for blobs not asked for). Chunks holding none of them are not read."""
    files = record["files"]
    blobs = index["blobs"]
    wanted = set(range(len(blobs))) if only is None else only
    storages = [torch.empty(b["nbytes"] if i in wanted else 0, dtype=torch.uint8)
                for i, b in enumerate(blobs)]
    views = [memoryview(s.numpy()) if s.numel() else memoryview(b"") for s in storages]
    work: list[tuple[str, int, list, list[int]]] = []
    for array, info in rank_arrays(index).items():
        _check_file(tier, step, rank, f"{info['path']}/zarr.json",
                    files[f"{info['path']}/zarr.json"][0], "array metadata")
        _, segments = array_segments(index, array)
        counters: dict[int, int] = {}
        for c in range(info["nchunks"]):
            rel = chunk_location(index, array, c)
            if rel not in files:
                raise CorruptCheckpointError(f"step {step}, rank {rank}: chunk {rel} is not in "
                                             f"the commit record")
            _check_file(tier, step, rank, rel, files[rel][0],
                        f"chunk {c}, holding tensors {_chunk_tensors(index, segments[c])}")
            which = []
            for b, _, _ in segments[c]:
                if b is None or b not in wanted:
                    which.append(-1)
                    if b is not None:
                        counters[b] = counters.get(b, 0) + 1
                else:
                    which.append(counters.get(b, 0))
                    counters[b] = counters.get(b, 0) + 1
            if any(k >= 0 for k in which):
                work.append((rel, c, segments[c], which))

    def read_chunk(item: tuple[str, int, list, list[int]]) -> None:
        rel, _, segs, which = item
        bufs: list[memoryview] = []
        for (b, start, end), k in zip(segs, which):
            if k < 0:
                bufs.append(memoryview(bytearray(end - start)))
            else:
                off = start - blobs[b]["offset"]
                bufs.append(views[b][off:off + end - start])
        try:
            tier.read_into(_rel(step, rel), bufs)
        except EOFError as exc:
            raise CorruptCheckpointError(f"step {step}, rank {rank}: {exc}") from exc
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(f"step {step}, rank {rank}: {tier.url}/{_rel(step, rel)}"
                                         f" vanished while it was read") from exc
        except OSError as exc:      # e.g. ELOOP: a chunk replaced by a symbolic link
            raise CorruptCheckpointError(f"step {step}, rank {rank}: cannot read "
                                         f"{tier.url}/{_rel(step, rel)}: "
                                         f"{exc.strerror or exc}") from exc
        for (b, _, _), buf, k in zip(segs, bufs, which):
            if k >= 0 and crc32(buf) != blobs[b]["crc32"][k]:
                raise CorruptCheckpointError(
                    f"step {step}, rank {rank}: checksum mismatch in tensor "
                    f"{_blob_names(index, b)} stored in {tier.url}/{_rel(step, rel)}: the data "
                    f"was altered after it was written")

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="trainkit-ckpt-read") as pool:
        list(pool.map(read_chunk, work))
    return storages


def tensor_from_blob(entry: dict, storage: torch.Tensor) -> torch.Tensor:
    """The tensor an index entry describes, as a view of its blob's bytes."""
    dtype = dtype_of(entry["dtype"], f"tensor {entry.get('name')!r}")
    return torch.empty(0, dtype=dtype).set_(storage.untyped_storage(),
                                            entry["offset"] // dtype.itemsize,
                                            entry["shape"], entry["stride"])


class PickledBytes(bytes):
    """The raw ``torch.save`` bytes of a pickled value, returned unpickled by
    ``load_shard(..., pickled_as_bytes=True)``: tools that only move or skip values
    (export, copies) never need to run the pickle."""


def load_shard(where: Tier | str, step: int, rank: int, *, threads: int = 4,
               record: dict | None = None, allow_pickle: bool = False,
               pickled_as_bytes: bool = False) -> Any:
    """Verify and load one rank's shard of a committed step as CPU tensors.

    Steps written through DCP (:class:`~trainkit.checkpoint.interop.dcp.ZarrWriter`) may hold
    non-tensor values that DCP serialised with ``torch.save`` (pickle). They are refused
    with :class:`PickleRefusedError` naming the key unless ``allow_pickle=True``
    (unpickle them: only for checkpoints you trust) or ``pickled_as_bytes=True`` (return
    them as :class:`PickledBytes`, never unpickled).
    """
    tier = as_tier(where)
    if record is None:
        record = read_commit_record(tier, step)
    index = read_rank_index(tier, step, rank, record)
    storages = load_blobs(tier, step, rank, record, index, threads=threads)
    tensors = index["tensors"]

    def pickled(i: int) -> Any:
        raw = tensor_from_blob(tensors[i], storages[tensors[i]["blob"]]).numpy().tobytes()
        if pickled_as_bytes:
            return PickledBytes(raw)
        if not allow_pickle:
            raise PickleRefusedError(
                f"step {step}, rank {rank}: {tensors[i]['name']!r} is a pickled value (a "
                f"non-tensor item saved through torch.distributed.checkpoint); loading it "
                f"runs code from the checkpoint, so pass allow_pickle=True if you trust "
                f"{tier.url}")
        return torch.load(io.BytesIO(raw), weights_only=False)

    return codec.decode(index["tree"],
                        lambda i: tensor_from_blob(tensors[i], storages[tensors[i]["blob"]]),
                        pickled)


def _chunk_tensors(index: dict, segments: list) -> str:
    hit = sorted({b for b, _, _ in segments if b is not None})
    names = [_blob_names(index, i, limit=1) for i in hit[:3]]
    return ", ".join(names) + (f" and {len(hit) - 3} more blobs" if len(hit) > 3 else "")


def verify_step(where: Tier | str, step: int, *,
                on_bytes: Callable[[int], None] | None = None) -> list[str]:
    """Check every file of ``step`` on every rank against the commit record and every blob
    against its checksum. Returns the problems found (empty: the step is intact).

    ``on_bytes(n)`` is called as each chunk file is checked, with its size in the commit
    record (a progress bar's total: the sizes of the record's ``.../c/N`` files)."""
    tier = as_tier(where)
    problems: list[str] = []
    try:
        record = read_commit_record(tier, step)
    except (CheckpointNotFoundError, CorruptCheckpointError) as exc:
        return [str(exc)]
    checked: set[str] = set()
    for name, info in record.get("dtensor", {}).items():   # the pieces tile each DTensor
        problems += [f"step {step}: {p}" for p in check_pieces(name, info)]
    for rel, expected in record["files"].items():
        if "/" not in rel:         # step-level files, e.g. the DCP metadata of ZarrWriter
            problems += [p.replace(", rank 0:", ":", 1) for p in _verify_file(
                tier, step, 0, rel, expected, crc32, "step metadata")]
    for rank in range(record["world_size"]):
        try:
            index = read_rank_index(tier, step, rank, record)
            codec.decode(index["tree"], lambda i: None, lambda i: None)   # values well-formed
        except (CheckpointNotFoundError, CorruptCheckpointError) as exc:
            problems.append(str(exc) if not isinstance(exc, codec.MalformedValueError) else
                            f"step {step}, rank {rank}: the index's state tree: {exc}")
            continue
        for array, info in rank_arrays(index).items():
            rel = f"{info['path']}/zarr.json"
            if rel in checked:
                continue
            checked.add(rel)
            problems += _verify_file(tier, step, rank, rel, record["files"].get(rel), crc32,
                                     "array metadata")
            _, segments = array_segments(index, array)
            for c in range(info["nchunks"]):
                rel = chunk_location(index, array, c)
                if rel in checked:
                    continue
                checked.add(rel)
                problems += _verify_file(
                    tier, step, rank, rel, record["files"].get(rel),
                    lambda data, c=c: chunk_digest(
                        [crc32(data[a - c * info["chunk_bytes"]:e - c * info["chunk_bytes"]])
                         for _, a, e in segments[c]]),
                    f"tensors {_chunk_tensors(index, segments[c])}")
                if on_bytes is not None:
                    on_bytes(record["files"].get(rel, [0])[0])
    return problems


def _verify_file(tier: Tier, step: int, rank: int, rel: str, expected: list[int] | None,
                 checksum: Any, what: str) -> list[str]:
    where = f"{tier.url}/{_rel(step, rel)}"
    if expected is None:
        return [f"step {step}, rank {rank}: {where} is not in the commit record"]
    try:
        data = memoryview(tier.read(_rel(step, rel)))
    except FileNotFoundError:
        return [f"step {step}, rank {rank}: {where} is missing ({what})"]
    if len(data) != expected[0]:
        return [f"step {step}, rank {rank}: {where} has {len(data)} bytes, the commit record "
                f"says {expected[0]} ({what})"]
    if checksum(data) != expected[1]:
        return [f"step {step}, rank {rank}: {where} fails its checksum ({what})"]
    return []
