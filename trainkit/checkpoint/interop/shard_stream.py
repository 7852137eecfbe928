"""Streaming a rank's shard in and out, one tensor at a time, in the engine's format.

The engine (:mod:`~trainkit.checkpoint.writer`) snapshots a whole shard into one host
buffer, because it must return to training at once. Converting or serving a checkpoint
has the opposite constraint: memory must stay bounded whatever the model size. So here
a shard is written chunk by chunk: each item's bytes are fetched only when the chunk
that holds them is being filled, and at most ``2 + io_threads`` chunk buffers exist at
a time. The result is byte-for-byte the same layout (packed array, per-blob CRCs, rank
index, manifest for the commit record), so everything that reads trainkit checkpoints
reads these too.

Reading is the mirror image: :class:`ShardBlobReader` reads single blobs (only the
byte ranges they cover) and checks each piece against the CRC taken at write time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from trainkit.checkpoint.errors import CheckpointWriteError, CorruptCheckpointError
from trainkit.checkpoint.format.layout import (
    DEFAULT_CHUNK_BYTES,
    TensorSpec,
    _contiguous_stride,
    chunk_relpath,
    chunk_segments,
    crc32,
    plan_shard,
    rank_array,
    rank_dirname,
    step_dirname,
)
from trainkit.checkpoint.reader import read_rank_index, tensor_from_blob
from trainkit.checkpoint.tiers import Tier
from trainkit.checkpoint.writer import _write_chunk, finish_shard

__all__ = ["StreamItem", "write_stream_shard", "ShardBlobReader", "tensor_bytes"]


@dataclass(frozen=True)
class StreamItem:
    """One value of a streamed shard: its geometry up front, its bytes on demand.

    ``fetch()`` is called once, when the first chunk holding the item is filled, and
    must return a tensor of exactly ``dtype`` and ``shape`` (any device, any strides),
    or, for ``pickled`` items, the raw bytes (``shape`` is then ``(len(bytes),)``).
    ``extra`` adds fields to the item's entry in the rank index.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    fetch: Callable[[], torch.Tensor | bytes]
    pickled: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def tensor_bytes(value: torch.Tensor | bytes, item: StreamItem) -> memoryview:
    """The item's bytes in C order, as a flat byte view (copied off the device if needed)."""
    if item.pickled:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"{item.name}: a pickled item must fetch bytes, got "
                            f"{type(value).__name__}")
        view = memoryview(value).cast("B")
        if len(view) != item.nbytes:
            raise ValueError(f"{item.name}: planned {item.nbytes} bytes, fetched {len(view)}")
        return view
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{item.name}: expected a tensor, got {type(value).__name__}")
    if value.dtype != item.dtype or tuple(value.shape) != item.shape:
        raise ValueError(f"{item.name}: planned {item.dtype} {list(item.shape)}, fetched "
                         f"{value.dtype} {list(value.shape)}")
    t = value.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()) if flat.numel() else memoryview(b"")


def write_stream_shard(tier: Tier, step: int, rank: int, world_size: int,
                       items: Sequence[StreamItem], tree: object, *,
                       chunk_bytes: int = DEFAULT_CHUNK_BYTES, io_threads: int = 2,
                       on_bytes: Callable[[int], None] | None = None) -> tuple[dict, list[dict]]:
    """Write ``items`` as rank ``rank``'s group of ``step`` on ``tier``, durably.

    Returns the rank's manifest (for :func:`~trainkit.checkpoint.writer.commit_record`)
    and its tensor table (entry ``i`` describes ``items[i]``). ``tree`` is the rank's
    encoded state tree (:mod:`~trainkit.checkpoint.format.codec`), referring to items by index.
    ``on_bytes(n)`` reports progress as item bytes are handed to the writers.
    """
    specs = [TensorSpec(it.name, it.dtype, it.shape, _contiguous_stride(it.shape), None, 0, 0,
                        it.nbytes) for it in items]
    plan = plan_shard(specs, chunk_bytes=chunk_bytes)
    array = rank_array(rank)
    step_dir = step_dirname(step)
    segments = chunk_segments([(b.offset, b.nbytes) for b in plan.blobs], plan.chunk_bytes,
                              plan.nchunks)
    pending: deque[Future] = deque()
    done: list[tuple[str, int, int, list[int]]] = []
    cb = plan.chunk_bytes
    try:
        tier.prepare(step, rank_dirname(rank))
        with ThreadPoolExecutor(max(1, io_threads),
                                thread_name_prefix="trainkit-ckpt-stream") as pool:
            chunk, buf = 0, bytearray(cb) if plan.nchunks else bytearray()

            def flush() -> None:
                nonlocal chunk, buf
                pending.append(pool.submit(_write_chunk, tier, f"{step_dir}/{array}", chunk,
                                           memoryview(buf), segments[chunk], False))
                while len(pending) > io_threads + 1:      # bounded memory: wait for the oldest
                    done.append(pending.popleft().result())
                chunk += 1
                buf = bytearray(cb) if chunk < plan.nchunks else bytearray()

            for item, blob in zip(items, plan.blobs):
                if blob.nbytes == 0:
                    continue
                while blob.offset >= (chunk + 1) * cb:    # chunks that are padding to the end
                    flush()
                data = tensor_bytes(item.fetch(), item)
                pos = 0
                while pos < len(data):
                    start = blob.offset + pos - chunk * cb
                    n = min(len(data) - pos, cb - start)
                    buf[start:start + n] = data[pos:pos + n]
                    pos += n
                    if start + n == cb:
                        flush()
                del data
                if on_bytes is not None:
                    on_bytes(blob.nbytes)
            while chunk < plan.nchunks:
                flush()
            while pending:
                done.append(pending.popleft().result())
        manifest, tensors = finish_shard(
            tier, step, rank, world_size, plan, done, specs, tree,
            entry_extra=[{"pickled": True, **it.extra} if it.pickled else it.extra
                         for it in items])
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        raise CheckpointWriteError(
            f"step {step}, rank {rank}: could not write{where} on the {tier.name} tier "
            f"({tier.url}): {exc.strerror or exc} (errno {exc.errno})") from exc
    finally:
        for f in pending:
            f.cancel()
    return manifest, tensors


class ShardBlobReader:
    """Reads single blobs of one rank's group, verified, touching only their bytes.

    Each piece of a blob (its part in one chunk file) is read with one positioned read
    straight into the result and checked against the CRC the writer recorded, so a
    reader that needs a few tensors of a large shard reads just those. Chunk files are
    checked against the commit record's sizes once each (a missing or truncated chunk
    would otherwise read as zeros or fail obscurely).
    """

    def __init__(self, tier: Tier, step: int, rank: int, record: dict) -> None:
        self.tier, self.step, self.rank, self.record = tier, step, rank, record
        self.index = read_rank_index(tier, step, rank, record)
        self._checked: set[str] = set()

    def _in_range(self, i: object, table: str) -> int:
        """``i`` as an index of the rank's ``table``: the DCP metadata that names it is a
        file too, so an entry out of range is corruption, not an IndexError."""
        n = len(self.index[table])
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise CorruptCheckpointError(f"step {self.step}, rank {self.rank}: the step's DCP "
                                         f"metadata names {table} entry {i!r:.20} of {n}")
        return i

    def _where(self, rel: str) -> str:
        return f"{self.tier.url}/{step_dirname(self.step)}/{rel}"

    def _check_size(self, rel: str) -> None:
        if rel in self._checked:
            return
        expected = self.record["files"].get(rel)
        actual = self.tier.size(f"{step_dirname(self.step)}/{rel}")
        if expected is None:
            raise CorruptCheckpointError(f"step {self.step}, rank {self.rank}: {rel} is not in "
                                         f"the commit record")
        if actual != expected[0]:
            state = "is missing" if actual is None else f"has {actual} bytes"
            raise CorruptCheckpointError(f"step {self.step}, rank {self.rank}: "
                                         f"{self._where(rel)} {state}, the commit record says "
                                         f"{expected[0]}")
        self._checked.add(rel)

    def blob(self, i: int) -> torch.Tensor:
        """Blob ``i`` as a fresh uint8 tensor, checksum-verified."""
        b = self.index["blobs"][self._in_range(i, "blobs")]
        info = self.index["arrays"][b.get("array", "rank")]
        cb = info["chunk_bytes"]
        out = torch.empty(b["nbytes"], dtype=torch.uint8)
        view = memoryview(out.numpy()) if b["nbytes"] else memoryview(b"")
        off, end = b["offset"], b["offset"] + b["nbytes"]
        for k, c in enumerate(range(off // cb, (end - 1) // cb + 1) if b["nbytes"] else ()):
            start, stop = max(off, c * cb), min(end, (c + 1) * cb)
            rel = chunk_relpath(info["path"], c)
            self._check_size(rel)
            piece = view[start - off:stop - off]
            try:
                self.tier.read_into(f"{step_dirname(self.step)}/{rel}", [piece], start - c * cb)
            except (EOFError, OSError) as exc:     # OSError: ELOOP for a planted link too
                raise CorruptCheckpointError(f"step {self.step}, rank {self.rank}: "
                                             f"{self._where(rel)}: {exc}") from exc
            if crc32(piece) != b["crc32"][k]:
                names = [t["name"] for t in self.index["tensors"] if t["blob"] == i][:3]
                raise CorruptCheckpointError(
                    f"step {self.step}, rank {self.rank}: checksum mismatch in {names} stored "
                    f"in {self._where(rel)}: the data was altered after it was written")
        return out

    def tensor(self, entry: int) -> torch.Tensor:
        """Tensor-table entry ``entry`` (a view of its freshly read blob)."""
        t = self.index["tensors"][self._in_range(entry, "tensors")]
        return tensor_from_blob(t, self.blob(t["blob"]))

    def raw(self, entry: int) -> bytes:
        """The bytes of a pickled entry, never unpickled here."""
        return self.tensor(entry).numpy().tobytes()
