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
    chunk_relpath,
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
    by_chunk: list[list[tuple[int, int, int]]] = [[] for _ in range(nchunks)]
    for i, b in enumerate(blobs):
        pos, end = b["offset"], b["offset"] + b["nbytes"]
        while pos < end:
            c = pos // chunk
            stop = min(end, (c + 1) * chunk)
            by_chunk[c].append((i, pos - b["offset"], stop - pos))
            pos = stop

    def read_chunk(c: int) -> None:
        base = c * chunk
        segments = sorted(by_chunk[c], key=lambda s: blobs[s[0]]["offset"] + s[1])
        bufs: list[memoryview] = []
        cursor = base
        for i, off, n in segments:
            start = blobs[i]["offset"] + off
            if start > cursor:
                bufs.append(memoryview(bytearray(start - cursor)))
            bufs.append(views[i][off:off + n])
            cursor = start + n
        fd = os.open(paths[c], os.O_RDONLY)
        try:
            preadv_exact(fd, bufs, 0, paths[c])
        except EOFError as exc:
            raise CorruptCheckpointError(f"step {step}, rank {rank}: {exc}") from exc
        finally:
            os.close(fd)

    def check_blob(i: int) -> None:
        if crc32(views[i]) != blobs[i]["crc32"]:
            first = blobs[i]["offset"] // chunk
            last = (blobs[i]["offset"] + max(blobs[i]["nbytes"], 1) - 1) // chunk
            files_ = ", ".join(paths[first:last + 1])
            raise CorruptCheckpointError(
                f"step {step}, rank {rank}: checksum mismatch in tensor {_blob_names(index, i)} "
                f"stored in {files_}: the data was altered after it was written")

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="trainkit-ckpt-read") as pool:
        list(pool.map(read_chunk, range(nchunks)))
        list(pool.map(check_blob, range(len(blobs))))

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
    for rel, (size, crc) in sorted(record["files"].items()):
        path = os.path.join(step_dir, rel)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            problems.append(f"step {step}: {path} is missing")
            continue
        if len(data) != size:
            problems.append(f"step {step}: {path} has {len(data)} bytes, expected {size}")
        elif crc32(data) != crc:
            problems.append(f"step {step}: {path} fails its checksum")
    if problems:
        return problems
    for rank in range(record["world_size"]):
        try:
            load_shard(root, step, rank)
        except CorruptCheckpointError as exc:
            problems.append(str(exc))
    return problems

