"""Copying a committed step down to a slower tier: memory → local → persistent.

Each rank copies its own files, verifying every chunk against the source tier's commit
record on the way (a copy never launders a corrupted byte into a fresh checksum), and
reports a manifest; the tier's commit record is published once every rank's copy is
durable there, exactly as for the first write.

Deduplication, on the shared (persistent) tier only: under data parallelism every rank's
packed array holds the same bytes, except the chunks with per-rank values. A chunk whose
size and checksum are the same on every rank is stored once, in the array of rank
``chunk % world_size``, so each rank writes about 1/N of the replicated bytes and the
work is spread evenly (DCP's dedupe does the same). Each rank's index maps such chunks
to their owner (``arrays.rank.shared``). Node-local tiers keep every rank's full copy,
because a node must restore from them without any other node.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from concurrent.futures import Executor

from trainkit.checkpoint.errors import CheckpointWriteError, CorruptCheckpointError
from trainkit.checkpoint.format.layout import (
    chunk_digest,
    chunk_relpath,
    crc32,
    rank_array,
    rank_dirname,
    step_dirname,
)
from trainkit.checkpoint.reader import array_segments, read_rank_index
from trainkit.checkpoint.tiers import Tier
from trainkit.checkpoint.writer import write_json_file

__all__ = ["shared_chunks", "copy_rank", "record_for"]


def shared_chunks(record: dict) -> dict[int, int]:
    """Chunks identical on every rank of a committed step, mapped to the rank that stores
    them (``chunk % world_size``). Empty for a single rank."""
    world = record["world_size"]
    if world < 2:
        return {}
    files = record["files"]
    out: dict[int, int] = {}
    c = 0
    while True:
        entries = [files.get(chunk_relpath(rank_array(r), c)) for r in range(world)]
        if any(e is None for e in entries):
            break
        if all(e == entries[0] for e in entries[1:]):
            out[c] = c % world
        c += 1
    return out


def _verified_chunk(src: Tier, step_dir: str, rel: str, expected: list[int],
                    segments: list, chunk_bytes: int, c: int) -> memoryview:
    data = memoryview(src.read(f"{step_dir}/{rel}"))
    if len(data) != expected[0]:
        raise CorruptCheckpointError(f"{src.url}/{step_dir}/{rel} has {len(data)} bytes, the "
                                     f"commit record says {expected[0]}")
    base = c * chunk_bytes
    digest = chunk_digest([crc32(data[a - base:e - base]) for _, a, e in segments])
    if digest != expected[1]:
        raise CorruptCheckpointError(f"{src.url}/{step_dir}/{rel} fails its checksum on the "
                                     f"{src.name} tier; not copied to a slower tier")
    return data


def copy_rank(src: Tier, dst: Tier, step: int, rank: int, record: dict, io: Executor, *,
              dedupe: bool) -> dict:
    """Copy ``rank``'s part of committed ``step`` from ``src`` to ``dst``; returns the
    rank's manifest for the commit on ``dst``."""
    step_dir = step_dirname(step)
    index = read_rank_index(src, step, rank, record)
    files: dict[str, list[int]] = {}
    shared = shared_chunks(record) if dedupe else {}
    try:
        dst.prepare(step, rank_dirname(rank))
        pending = []
        for array, info in index["arrays"].items():
            _, segments = array_segments(index, array)
            owners = {int(k): v for k, v in info.get("shared", {}).items()}
            for c in range(info["nchunks"]):
                src_rel = chunk_relpath(rank_array(owners.get(c, rank)), c)
                owner = shared.get(c, rank)
                dst_rel = chunk_relpath(info["path"], c) if owner == rank else None
                if dst_rel is None:
                    continue                      # another rank stores this shared chunk
                expected = record["files"][src_rel]
                pending.append(io.submit(_copy_chunk, src, dst, step_dir, src_rel, dst_rel,
                                         expected, segments[c], info["chunk_bytes"], c))
                files[dst_rel] = list(expected)
            if shared:
                info["shared"] = {str(c): o for c, o in shared.items() if o != rank}
        for f in pending:
            f.result()
        for array, info in index["arrays"].items():
            rel = f"{info['path']}/zarr.json"
            raw = src.read(f"{step_dir}/{rel}")
            dst.write(f"{step_dir}/{rel}", memoryview(raw))
            files[rel] = [len(raw), crc32(raw)]
        rel = f"{rank_dirname(rank)}/zarr.json"
        files[rel] = list(write_json_file(dst, f"{step_dir}/{rel}",
                                          {"zarr_format": 3, "node_type": "group",
                                           "attributes": {"trainkit": index}}))
        dst.sync(step, rank_dirname(rank))
    except OSError as exc:
        raise CheckpointWriteError(
            f"step {step}, rank {rank}: copying to the {dst.name} tier ({dst.url}) failed: "
            f"{exc}; the step stays committed on the {src.name} tier") from exc
    mine = next(m for m in record["ranks"] if m["rank"] == rank)
    return {"rank": rank, "files": files, "nbytes": mine["nbytes"],
            "ntensors": mine["ntensors"], "blobs": [], "sharded": {}}


def _copy_chunk(src: Tier, dst: Tier, step_dir: str, src_rel: str, dst_rel: str,
                expected: list[int], segments: list, chunk_bytes: int, c: int) -> None:
    data = _verified_chunk(src, step_dir, src_rel, expected, segments, chunk_bytes, c)
    dst.write(f"{step_dir}/{dst_rel}", data)


def record_for(record: dict, manifests: list[dict], tier: str) -> dict:
    """The commit record of a copy: the source's, with the copy's file inventory."""
    files: dict[str, list[int]] = {}
    for m in manifests:
        files.update(m["files"])
    out = json.loads(json.dumps(record))
    out["tier"] = tier
    out["files"] = files
    out["first_committed_at"] = record.get("first_committed_at", record["committed_at"])
    out["committed_at"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    return out
