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

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from trainkit.checkpoint import codec
from trainkit.checkpoint.errors import CheckpointNotFoundError, CorruptCheckpointError
from trainkit.checkpoint.layout import (
    chunk_digest,
    chunk_relpath,
    chunk_segments,
    parse_step_dirname,
    rank_dirname,
    step_dirname,
)
from trainkit.checkpoint.storage import crc32, preadv_exact, read_json

__all__ = ["committed_steps", "read_commit_record", "read_rank_index", "load_shard", "verify_step"]

COMMIT_FILE = "zarr.json"


def _all_step_dirs(root: str) -> list[int]:
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(s for s in map(parse_step_dirname, names) if s is not None)


def committed_steps(root: str) -> list[int]:
    """Steps whose commit record exists, oldest first."""
    return [s for s in _all_step_dirs(root)
            if os.path.isfile(os.path.join(root, step_dirname(s), COMMIT_FILE))]


def read_commit_record(root: str, step: int) -> dict:
    """The commit record of ``step``; a clear error if the step is missing or uncommitted."""
    path = os.path.join(root, step_dirname(step), COMMIT_FILE)
    try:
        doc, _ = read_json(path)
    except FileNotFoundError:
        committed = committed_steps(root)
        detail = ("it exists but was never committed (a save was interrupted or failed)"
                  if step in _all_step_dirs(root) else "it does not exist")
        raise CheckpointNotFoundError(
            f"step {step} is not a committed checkpoint in {root}: {detail}; committed steps: "
            f"{committed if committed else 'none'}") from None
    except ValueError as exc:
        raise CorruptCheckpointError(f"step {step}: commit record {path} is not valid JSON: "
                                     f"{exc}") from exc
    record = doc.get("attributes", {}).get("trainkit")
    if not isinstance(record, dict) or record.get("kind") != "step":
        raise CorruptCheckpointError(f"step {step}: {path} is not a trainkit commit record")
    return record


def _check_file(root: str, step: int, rank: int, rel: str, size: int, what: str) -> str:
    path = os.path.join(root, step_dirname(step), rel)
    try:
        actual = os.stat(path).st_size
    except FileNotFoundError:
        raise CorruptCheckpointError(f"step {step}, rank {rank}: file {path} is missing "
                                     f"({what})") from None
    if actual != size:
        raise CorruptCheckpointError(f"step {step}, rank {rank}: file {path} has {actual} bytes, "
                                     f"the commit record says {size} ({what}); it was truncated "
                                     f"or overwritten")
    return path


def read_rank_index(root: str, step: int, rank: int, record: dict) -> dict:
    """The rank's index (tensor table, blobs and the encoded tree), checksum-verified."""
    rel = f"{rank_dirname(rank)}/zarr.json"
    files = record["files"]
    if rel not in files:
        raise CheckpointNotFoundError(f"step {step} has no rank {rank}: it was saved by "
                                      f"{record['world_size']} ranks")
    size, crc = files[rel]
    path = _check_file(root, step, rank, rel, size, "the rank's index")
    doc, raw = read_json(path)
    if crc32(raw) != crc:
        raise CorruptCheckpointError(f"step {step}, rank {rank}: checksum mismatch in {path} "
                                     f"(the rank's index)")
    return doc["attributes"]["trainkit"]


def _blob_names(index: dict, blob: int, limit: int = 3) -> str:
    names = [t["name"] for t in index["tensors"] if t["blob"] == blob]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def load_shard(root: str, step: int, rank: int, *, threads: int = 4) -> Any:
    """Verify and load one rank's shard of a committed step as CPU tensors."""
    record = read_commit_record(root, step)
    index = read_rank_index(root, step, rank, record)
    chunk = index["chunk_bytes"]
    nchunks = index["nchunks"]
    blobs = index["blobs"]
    files = record["files"]
    for rel in (f"{rank_dirname(rank)}/data/zarr.json",):
        _check_file(root, step, rank, rel, files[rel][0], "array metadata")
    paths = []
    for c in range(nchunks):
        rel = chunk_relpath(rank, c)
        if rel not in files:
            raise CorruptCheckpointError(f"step {step}, rank {rank}: chunk {rel} is not in the "
                                         f"commit record")
        paths.append(_check_file(root, step, rank, rel, files[rel][0],
                                 f"chunk {c}, holding tensors {_chunk_tensors(index, c)}"))

    storages = [torch.empty(b["nbytes"], dtype=torch.uint8) for b in blobs]
    views = [memoryview(s.numpy()) if s.numel() else memoryview(b"") for s in storages]
    segments = chunk_segments([(b["offset"], b["nbytes"]) for b in blobs], chunk, nchunks)
    # which of its blob's checksums each segment is checked against
    seg_index: list[list[int]] = [[] for _ in range(nchunks)]
    counters = [0] * len(blobs)
    for c in range(nchunks):
        for b, _, _ in segments[c]:
            if b is None:
                seg_index[c].append(-1)
            else:
                seg_index[c].append(counters[b])
                counters[b] += 1

    def read_chunk(c: int) -> None:
        bufs: list[memoryview] = []
        for b, start, end in segments[c]:
            if b is None:
                bufs.append(memoryview(bytearray(end - start)))
            else:
                off = start - blobs[b]["offset"]
                bufs.append(views[b][off:off + end - start])
        fd = os.open(paths[c], os.O_RDONLY)
        try:
            preadv_exact(fd, bufs, 0, paths[c])
        except EOFError as exc:
            raise CorruptCheckpointError(f"step {step}, rank {rank}: {exc}") from exc
        finally:
            os.close(fd)
        for (b, _, _), buf, k in zip(segments[c], bufs, seg_index[c]):
            if b is not None and crc32(buf) != blobs[b]["crc32"][k]:
                raise CorruptCheckpointError(
                    f"step {step}, rank {rank}: checksum mismatch in tensor "
                    f"{_blob_names(index, b)} stored in {paths[c]}: the data was altered after "
                    f"it was written")

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="trainkit-ckpt-read") as pool:
        list(pool.map(read_chunk, range(nchunks)))

    tensors = index["tensors"]

    def tensor(i: int) -> torch.Tensor:
        t = tensors[i]
        dtype = getattr(torch, t["dtype"])
        storage = storages[t["blob"]].untyped_storage()
        return torch.empty(0, dtype=dtype).set_(storage, t["offset"] // dtype.itemsize,
                                                t["shape"], t["stride"])

    return codec.decode(index["tree"], tensor)


def _chunk_tensors(index: dict, c: int) -> str:
    chunk = index["chunk_bytes"]
    hit = [i for i, b in enumerate(index["blobs"])
           if b["nbytes"] and b["offset"] // chunk <= c <= (b["offset"] + b["nbytes"] - 1) // chunk]
    names = [_blob_names(index, i, limit=1) for i in hit[:3]]
    return ", ".join(names) + (f" and {len(hit) - 3} more blobs" if len(hit) > 3 else "")


def verify_step(root: str, step: int) -> list[str]:
    """Check every file of ``step`` on every rank against the commit record and every blob
    against its checksum. Returns the problems found (empty: the step is intact)."""
    problems: list[str] = []
    try:
        record = read_commit_record(root, step)
    except (CheckpointNotFoundError, CorruptCheckpointError) as exc:
        return [str(exc)]
    step_dir = os.path.join(root, step_dirname(step))
    for rank in range(record["world_size"]):
        try:
            index = read_rank_index(root, step, rank, record)
        except (CheckpointNotFoundError, CorruptCheckpointError) as exc:
            problems.append(str(exc))
            continue
        segments = chunk_segments([(b["offset"], b["nbytes"]) for b in index["blobs"]],
                                  index["chunk_bytes"], index["nchunks"])
        for c in range(index["nchunks"]):
            rel = chunk_relpath(rank, c)
            problems += _verify_file(step, rank, os.path.join(step_dir, rel),
                                     record["files"].get(rel),
                                     lambda data, c=c: chunk_digest(
                                         [crc32(data[a - c * index["chunk_bytes"]:
                                                     e - c * index["chunk_bytes"]])
                                          for _, a, e in segments[c]]),
                                     f"tensors {_chunk_tensors(index, c)}")
        rel = f"{rank_dirname(rank)}/data/zarr.json"
        problems += _verify_file(step, rank, os.path.join(step_dir, rel), record["files"].get(rel),
                                 crc32, "array metadata")
    return problems


def _verify_file(step: int, rank: int, path: str, expected: list[int] | None,
                 checksum: Any, what: str) -> list[str]:
    if expected is None:
        return [f"step {step}, rank {rank}: {path} is not in the commit record"]
    try:
        with open(path, "rb") as f:
            data = memoryview(f.read())
    except FileNotFoundError:
        return [f"step {step}, rank {rank}: {path} is missing ({what})"]
    if len(data) != expected[0]:
        return [f"step {step}, rank {rank}: {path} has {len(data)} bytes, the commit record "
                f"says {expected[0]} ({what})"]
    if checksum(data) != expected[1]:
        return [f"step {step}, rank {rank}: {path} fails its checksum ({what})"]
    return []
