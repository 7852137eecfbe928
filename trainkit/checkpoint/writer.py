"""Writing one rank's shard and the commit record.

Runs in the engine's background threads. Chunks are written as soon as the snapshot
has filled them, by a small pool of I/O threads (``os.pwrite`` and ``os.fsync``
release the GIL), while the thread that drives this module keeps copying lazy blobs and
then checksums every blob. Only once every chunk and both metadata documents are fsynced,
and the directories holding them too, does the rank report its manifest for the commit.
"""

from __future__ import annotations

import os
import queue
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from trainkit.checkpoint.errors import CheckpointWriteError
from trainkit.checkpoint.layout import (
    DATA_ARRAY,
    FORMAT_VERSION,
    NUMPY_DTYPE,
    Segment,
    ShardPlan,
    TensorSpec,
    array_metadata,
    chunk_digest,
    chunk_relpath,
    chunk_segments,
    group_metadata,
    parse_step_dirname,
    rank_dirname,
    step_dirname,
)
from trainkit.checkpoint.snapshot import Snapshot
from trainkit.checkpoint.storage import (
    DIRECT_ALIGN,
    crc32,
    fsync_dir,
    remove_tree,
    write_file,
    write_json,
    write_json_atomic,
)

__all__ = ["ShardJob", "write_shard", "write_commit_record"]


@dataclass(frozen=True)
class ShardJob:
    """Everything the background threads need for one rank's part of one save."""

    root: str
    step: int
    seq: int
    rank: int
    world_size: int
    plan: ShardPlan
    specs: tuple[TensorSpec, ...]
    tree: object
    snapshot: Snapshot
    direct_io: bool = True


def _index_doc(job: ShardJob, blob_crcs: list[list[int]]) -> dict:
    plan = job.plan
    tensors = []
    for spec, place in zip(job.specs, plan.placements):
        tensors.append({
            "name": spec.name,
            "dtype": str(spec.dtype).removeprefix("torch."),
            "numpy_dtype": NUMPY_DTYPE.get(spec.dtype, f"|V{spec.dtype.itemsize}"),
            "shape": list(spec.shape),
            "stride": list(place.stride),
            "blob": place.blob,
            "offset": place.offset,
            "nbytes": spec.nbytes,
        })
    blobs = [{"offset": b.offset, "nbytes": b.nbytes, "crc32": c}
             for b, c in zip(plan.blobs, blob_crcs)]
    return group_metadata({"trainkit": {
        "format": FORMAT_VERSION, "kind": "rank", "step": job.step, "rank": job.rank,
        "world_size": job.world_size, "array": DATA_ARRAY, "chunk_bytes": plan.chunk_bytes,
        "nchunks": plan.nchunks, "nbytes": plan.nbytes,
        "checksum": "crc32 of each blob's piece in each chunk, in order",
        "tensors": tensors, "blobs": blobs, "tree": job.tree,
        "note": "tensor bytes live in the 'data' array at blob offset + tensor offset; "
                "reinterpret them with numpy_dtype (torch dtype in 'dtype'), shape and "
                "stride (in elements)",
    }})


def _write_chunk(step_dir: str, rank: int, c: int, array: memoryview, segments: list[Segment],
                 direct: bool) -> tuple[str, int, int, list[int]]:
    """Checksum each segment (one pass, GIL released), then write and fsync the chunk."""
    rel = chunk_relpath(rank, c)
    crcs = [crc32(array[start:end]) for _, start, end in segments]
    data = array[segments[0][1]:segments[-1][2]]
    write_file(os.path.join(step_dir, rel), data, fsync=True, direct=direct)
    return rel, len(data), chunk_digest(crcs), crcs


def _prepare_dirs(job: ShardJob) -> str:
    step_dir = os.path.join(job.root, step_dirname(job.step))
    rank_dir = os.path.join(step_dir, rank_dirname(job.rank))
    os.makedirs(step_dir, exist_ok=True)
    remove_tree(rank_dir)  # leftovers of an interrupted attempt at this step
    if job.rank == 0:      # rank dirs of an earlier attempt with more ranks
        for name in os.listdir(step_dir):
            if name.startswith("rank_") and name[5:].isdigit() and int(name[5:]) >= job.world_size:
                remove_tree(os.path.join(step_dir, name))
    os.makedirs(os.path.join(rank_dir, DATA_ARRAY, "c"))
    return step_dir


def write_shard(job: ShardJob, io_pool: Executor) -> dict:
    """Write the shard of ``job`` durably; returns the rank's manifest for the commit."""
    plan, snap = job.plan, job.snapshot
    pending: list[Future] = []
    files: dict[str, list[int]] = {}
    try:
        step_dir = _prepare_dirs(job)
        flat = snap.buffer.numpy()
        view = memoryview(flat) if flat.size else memoryview(b"")
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
            pending.append(io_pool.submit(_write_chunk, step_dir, job.rank, c, view,
                                          segments[c], direct))
        snap.wait()
        results = {}
        for f in pending:
            rel, size, digest, crcs = f.result()
            files[rel] = [size, digest]
            results[rel] = crcs
        blob_crcs: list[list[int]] = [[] for _ in plan.blobs]
        for c in range(plan.nchunks):
            for (b, _, _), crc in zip(segments[c], results[chunk_relpath(job.rank, c)]):
                if b is not None:
                    blob_crcs[b].append(crc)
        rank_dir = os.path.join(step_dir, rank_dirname(job.rank))
        arr_dir = os.path.join(rank_dir, DATA_ARRAY)
        size, crc = write_json(os.path.join(arr_dir, "zarr.json"),
                               array_metadata(plan.array_bytes, plan.chunk_bytes))
        files[f"{rank_dirname(job.rank)}/{DATA_ARRAY}/zarr.json"] = [size, crc]
        size, crc = write_json(os.path.join(rank_dir, "zarr.json"), _index_doc(job, blob_crcs))
        files[f"{rank_dirname(job.rank)}/zarr.json"] = [size, crc]
        for d in (os.path.join(arr_dir, "c"), arr_dir, rank_dir, step_dir, job.root):
            fsync_dir(d)
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        raise CheckpointWriteError(
            f"step {job.step}, rank {job.rank}: could not write{where}: {exc.strerror or exc} "
            f"(errno {exc.errno}); older checkpoints are intact") from exc
    finally:
        # The host buffer is released after this returns: no I/O thread may still use it.
        for f in pending:
            f.cancel()
        for f in pending:
            if not f.cancelled():
                f.exception()
    return {"rank": job.rank, "files": files, "nbytes": plan.nbytes,
            "ntensors": len(job.specs)}


def write_commit_record(root: str, step: int, world_size: int, manifests: list[dict]) -> None:
    """Rank 0: the step becomes visible when this file lands (atomic rename + dir fsync)."""
    files: dict[str, list[int]] = {}
    for m in manifests:
        files.update(m["files"])
    record = {"trainkit": {
        "format": FORMAT_VERSION, "kind": "step", "step": step, "world_size": world_size,
        "committed_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "torch_version": torch.__version__,
        "checksum": {"zarr.json": "crc32 of the file",
                     "chunks": "crc32 of the little-endian crc32s of the chunk's segments "
                               "(blob pieces and padding, in order; see the rank index)"},
        "ranks": [{"rank": m["rank"], "nbytes": m["nbytes"], "ntensors": m["ntensors"]}
                  for m in manifests],
        "files": files,
    }}
    step_dir = os.path.join(root, step_dirname(step))
    assert parse_step_dirname(step_dirname(step)) == step
    write_json_atomic(os.path.join(step_dir, "zarr.json"), group_metadata(record))
