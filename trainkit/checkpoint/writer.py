"""Writing one rank's shard and the commit record, to any tier.

Runs in the engine's background threads. Chunks are written as soon as the snapshot
has filled them, by a small pool of I/O threads (``os.pwrite`` and ``os.fsync``
release the GIL), while the thread that drives this module keeps copying lazy blobs and
then checksums every blob. Only once every chunk and both metadata documents are fsynced,
and the directories holding them too, does the rank report its manifest for the commit.
"""

from __future__ import annotations

import hashlib
import json
import queue
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from trainkit.checkpoint.errors import CheckpointWriteError
from trainkit.checkpoint.format.dtensor_meta import global_dtensors, piece_of
from trainkit.checkpoint.format.layout import (
    FORMAT_VERSION,
    NUMPY_DTYPE,
    Segment,
    ShardPlan,
    TensorSpec,
    array_metadata,
    chunk_digest,
    chunk_relpath,
    chunk_segments,
    crc32,
    group_metadata,
    rank_array,
    rank_dirname,
    step_dirname,
)
from trainkit.checkpoint.snapshot import Snapshot
from trainkit.checkpoint.tiers import Tier
from trainkit.checkpoint.tiers.local import DIRECT_ALIGN

__all__ = ["ShardJob", "write_shard", "finish_shard", "commit_record", "index_doc", "manifest_of",
           "write_array_and_index", "replicated_blobs", "tensor_table"]


@dataclass(frozen=True, kw_only=True)
class ShardJob:
    """Everything the background threads need for one rank's part of one save."""

    tier: Tier
    step: int
    seq: int
    rank: int
    world_size: int
    plan: ShardPlan
    specs: tuple[TensorSpec, ...]
    tree: object
    snapshot: Snapshot
    direct_io: bool = True
    sharded: tuple[tuple[int, int], ...] = ()     # (tensor index, dim) of split tensors
    replicated: bool = True                       # dedupe identical chunks when persisting
    dtensors: tuple[tuple[int, dict], ...] = ()   # (tensor index, DTensor metadata)


def tensor_table(specs: tuple[TensorSpec, ...], plan: ShardPlan,
                 sharded: dict[int, int]) -> list[dict]:
    """The index's tensor entries (geometry and blob placement)."""
    tensors = []
    for i, (spec, place) in enumerate(zip(specs, plan.placements)):
        entry = {
            "name": spec.name,
            "dtype": str(spec.dtype).removeprefix("torch."),
            "numpy_dtype": NUMPY_DTYPE.get(spec.dtype, f"|V{spec.dtype.itemsize}"),
            "shape": list(spec.shape),
            "stride": list(place.stride),
            "blob": place.blob,
            "offset": place.offset,
            "nbytes": spec.nbytes,
        }
        if i in sharded:
            entry["shard_dim"] = sharded[i]
        tensors.append(entry)
    return tensors


def index_doc(job_step: int, rank: int, world_size: int, tensors: list[dict], blobs: list[dict],
              arrays: dict[str, dict], tree: object) -> dict:
    """The rank group's metadata: the tensor table, blob checksums, arrays and tree."""
    return group_metadata({"trainkit": {
        "format": FORMAT_VERSION, "kind": "rank", "step": job_step, "rank": rank,
        "world_size": world_size, "arrays": arrays,
        "checksum": "crc32 of each blob's piece in each chunk of its array, in order",
        "tensors": tensors, "blobs": blobs, "tree": tree,
        "note": "a tensor's bytes live in its blob's array ('arrays'), at blob offset + "
                "tensor offset; reinterpret them with numpy_dtype (torch dtype in 'dtype'), "
                "shape and stride (in elements)",
    }})


def blob_digest(members: list[tuple], nbytes: int, crcs: list[int]) -> str:
    """What must match for two ranks' blobs to count as one replicated blob: the
    geometry of the tensors in it (``members``), its length and its checksums."""
    raw = json.dumps([members, nbytes, crcs], separators=(",", ":")).encode()
    return hashlib.sha1(raw).hexdigest()[:16]


def _write_chunk(tier: Tier, array: str, c: int, data: memoryview, segments: list[Segment],
                 direct: bool) -> tuple[str, int, int, list[int]]:
    """Checksum each segment (one pass, GIL released), then write the chunk durably."""
    rel = chunk_relpath(array, c)
    base = segments[0][1]
    crcs = [crc32(data[start - base:end - base]) for _, start, end in segments]
    tier.write(rel, data, direct=direct)
    return rel, len(data), chunk_digest(crcs), crcs


def write_json_file(tier: Tier, rel: str, doc: dict) -> tuple[int, int]:
    """Write a JSON document to the tier; returns (size, crc32) for the inventory."""
    data = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    tier.write(rel, memoryview(data))
    return len(data), crc32(data)


def manifest_of(rank: int, files: dict, nbytes: int, tensors: list[dict], blobs: list[dict],
                step_rel: str = "") -> dict:
    """A rank's report for the commit: its files, and what the dedupe and the resharding
    need to know about its blobs and split tensors."""
    members: list[list[tuple]] = [[] for _ in blobs]     # one pass: 2,000 blobs is common
    for t in tensors:
        members[t["blob"]].append((t["name"], t["dtype"], t["shape"], t["stride"], t["offset"]))
    digests = [blob_digest(members[i], b["nbytes"], b["crc32"]) for i, b in enumerate(blobs)]
    sharded = {t["name"]: [t["shard_dim"], t["shape"]] for t in tensors if "shard_dim" in t}
    dtensor = {t["name"]: piece_of(rank, i, t["dtensor"])
               for i, t in enumerate(tensors) if "dtensor" in t}
    return {"rank": rank, "files": files, "nbytes": nbytes, "ntensors": len(tensors),
            "blobs": digests, "sharded": sharded, "dtensor": dtensor}


def write_shard(job: ShardJob, io_pool: Executor) -> dict:
    """Write the shard of ``job`` durably to its tier; returns the rank's manifest."""
    plan, snap, tier = job.plan, job.snapshot, job.tier
    pending: list[Future] = []
    array = rank_array(job.rank)
    step_dir = step_dirname(job.step)
    try:
        tier.prepare(job.step, rank_dirname(job.rank))
        segments = chunk_segments([(b.offset, b.nbytes) for b in plan.blobs], plan.chunk_bytes,
                                  plan.nchunks)
        direct = (job.direct_io and snap.buffer.device.type == "cpu"
                  and snap.buffer.data_ptr() % DIRECT_ALIGN == 0
                  and plan.chunk_bytes % DIRECT_ALIGN == 0)
        while len(pending) < plan.nchunks:
            took = snap.work(limit=1)
            try:
                c = snap.ready_chunks.get_nowait() if took else snap.ready_chunks.get(timeout=0.05)
            except queue.Empty:
                if snap.error is not None:
                    raise snap.error
                continue
            fut = io_pool.submit(_write_chunk, tier, f"{step_dir}/{array}", c,
                                 snap.chunk_view(c), segments[c], direct)
            fut.add_done_callback(lambda _f, c=c: snap.chunk_written(c))   # frees a wave slot
            pending.append(fut)
        snap.wait()
        manifest, _ = finish_shard(tier, job.step, job.rank, job.world_size, plan,
                                   [f.result() for f in pending], job.specs, job.tree,
                                   sharded=dict(job.sharded), entry_extra=_dtensor_extra(job))
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        raise CheckpointWriteError(
            f"step {job.step}, rank {job.rank}: could not write{where} on the {tier.name} tier "
            f"({tier.url}): {exc.strerror or exc} (errno {exc.errno}); older checkpoints are "
            f"intact") from exc
    finally:
        # The host buffer is released after this returns: no I/O thread may still use it.
        for f in pending:
            f.cancel()
        for f in pending:
            if not f.cancelled():
                f.exception()
    return manifest


def _dtensor_extra(job: ShardJob) -> list[dict] | None:
    if not job.dtensors:
        return None
    meta = dict(job.dtensors)
    return [{"dtensor": meta[i]} if i in meta else {} for i in range(len(job.specs))]


def finish_shard(tier: Tier, step: int, rank: int, world_size: int, plan: ShardPlan,
                 chunks: list[tuple[str, int, int, list[int]]], specs: Sequence[TensorSpec],
                 tree: object, *, sharded: dict[int, int] | None = None,
                 entry_extra: Sequence[dict] | None = None) -> tuple[dict, list[dict]]:
    """The tail every shard writer shares, once its chunks are durable: the rank index
    (tensor table, per-blob CRCs, arrays, tree) and the array metadata are written, the
    rank's directory is synced, and the rank's manifest for the commit is returned with
    its tensor table.

    ``chunks`` are the results of ``_write_chunk`` (step-relative paths); ``sharded``
    maps split tensors to their dimension; ``entry_extra[i]`` adds fields to tensor
    entry ``i``. Used by :func:`write_shard` (the engine) and by
    :func:`~trainkit.checkpoint.interop.shard_stream.write_stream_shard` (DCP, import).
    """
    array = rank_array(rank)
    step_dir = step_dirname(step)
    files: dict[str, list[int]] = {}
    chunk_crcs: dict[str, list[int]] = {}
    for rel, size, digest, crcs in chunks:
        rel = rel[len(step_dir) + 1:]
        files[rel] = [size, digest]
        chunk_crcs[rel] = crcs
    segments = chunk_segments([(b.offset, b.nbytes) for b in plan.blobs], plan.chunk_bytes,
                              plan.nchunks)
    blob_crcs: list[list[int]] = [[] for _ in plan.blobs]
    for c in range(plan.nchunks):
        for (b, _, _), crc in zip(segments[c], chunk_crcs[chunk_relpath(array, c)]):
            if b is not None:
                blob_crcs[b].append(crc)
    tensors = tensor_table(tuple(specs), plan, sharded or {})
    for entry, extra in zip(tensors, entry_extra or ()):
        entry.update(extra)
    blobs = [{"array": "rank", "offset": b.offset, "nbytes": b.nbytes, "crc32": c}
             for b, c in zip(plan.blobs, blob_crcs)]
    arrays = {"rank": {"path": array, "chunk_bytes": plan.chunk_bytes,
                       "nchunks": plan.nchunks, "nbytes": plan.nbytes}}
    files.update(write_array_and_index(
        tier, step, rank, {array: (plan.array_bytes, plan.chunk_bytes)},
        index_doc(step, rank, world_size, tensors, blobs, arrays, tree)))
    tier.sync(step, rank_dirname(rank))
    return manifest_of(rank, files, plan.nbytes, tensors, blobs), tensors


def write_array_and_index(tier: Tier, step: int, rank: int, arrays: dict[str, tuple[int, int]],
                          index: dict) -> dict[str, list[int]]:
    """Write each array's zarr.json (``{path: (array bytes, chunk bytes)}``), then the
    rank's index, and return their inventory entries."""
    files: dict[str, list[int]] = {}
    step_dir = step_dirname(step)
    for path, (array_bytes, chunk_bytes) in arrays.items():
        rel = f"{path}/zarr.json"
        files[rel] = list(write_json_file(tier, f"{step_dir}/{rel}",
                                          array_metadata(array_bytes, chunk_bytes)))
    rel = f"{rank_dirname(rank)}/zarr.json"
    files[rel] = list(write_json_file(tier, f"{step_dir}/{rel}", index))
    return files


def commit_record(step: int, world_size: int, manifests: list[dict], *, tier: str,
                  replicated: list[int] | None = None) -> dict:
    """The step group's metadata: the commit record of ``step`` on one tier.

    ``files`` inventories every file of every rank with its size and checksum;
    ``replicated`` lists the blob indexes identical on every rank (the persistent tier
    stores them once); ``sharded`` gives each split tensor's global shape and each rank's
    offset along the split dimension.
    """
    files: dict[str, list[int]] = {}
    for m in manifests:
        files.update(m["files"])
    record = {"trainkit": {
        "format": FORMAT_VERSION, "kind": "step", "step": step, "world_size": world_size,
        "tier": tier,
        "committed_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "torch_version": torch.__version__,
        "checksum": {"zarr.json": "crc32 of the file",
                     "chunks": "crc32 of the little-endian crc32s of the chunk's segments "
                               "(blob pieces and padding, in order; see the rank index)"},
        "ranks": [{"rank": m["rank"], "nbytes": m["nbytes"], "ntensors": m["ntensors"]}
                  for m in manifests],
        "replicated": replicated if replicated is not None else replicated_blobs(manifests),
        "sharded": global_shards(manifests),
        "files": files,
    }}
    try:
        dtensors = global_dtensors(manifests)
    except ValueError as exc:
        raise CheckpointWriteError(f"step {step}: {exc}") from None
    if dtensors:
        record["trainkit"]["dtensor"] = dtensors
    return group_metadata(record)


def replicated_blobs(manifests: list[dict]) -> list[int]:
    """Blob indexes whose digest is the same on every rank (none with one rank)."""
    if len(manifests) < 2:
        return []
    first = manifests[0]["blobs"]
    return [i for i, d in enumerate(first)
            if all(i < len(m["blobs"]) and m["blobs"][i] == d for m in manifests[1:])]


def global_shards(manifests: list[dict]) -> dict[str, dict]:
    """For each split tensor: its dimension, global shape and every rank's offset."""
    out: dict[str, dict] = {}
    for name, (dim, _) in manifests[0].get("sharded", {}).items():
        offsets, total, shape = [], 0, None
        for m in manifests:
            got = m.get("sharded", {}).get(name)
            if got is None or got[0] != dim:
                raise CheckpointWriteError(f"tensor {name!r} is split along dim {dim} on rank "
                                           f"{manifests[0]['rank']} but not the same way on "
                                           f"rank {m['rank']}")
            local = got[1]
            if shape is not None and (len(local) != len(shape) or any(
                    a != b for k, (a, b) in enumerate(zip(local, shape)) if k != dim)):
                raise CheckpointWriteError(f"tensor {name!r}: rank {m['rank']} holds a piece of "
                                           f"shape {local}, which does not fit {shape} along "
                                           f"dim {dim}")
            shape = list(local)
            offsets.append(total)
            total += local[dim]
        assert shape is not None
        shape[dim] = total
        out[name] = {"dim": dim, "shape": shape, "offsets": offsets}
    return out
