"""Resharding on read: the byte ranges of saved pieces that a target region needs.

A saved tensor is a set of *pieces* (boxes of its global index space, each in one saved
rank's blob): a DTensor's held local tensors, or one piece for a plain tensor. A load
target is one box too: a DTensor's local piece on this rank (``Shard``: a slice;
``Replicate``: the whole tensor), or a plain tensor whole. For every saved piece that
overlaps the target box, :func:`fill_region` reads only the bytes that span the overlap,
widened to whole checksum segments (a blob's part in one chunk file, the unit the
writer checksummed), verifies each segment's CRC and puts the overlap into place. Where
the overlap is one contiguous run of bytes both in the saved blob and in the target
(FSDP2 row shards, plain tensors whole) the bytes are read straight into the target's
storage; anything else (a column cut, a strided or non-CPU target) is read into a
temporary and copied.

Why segments, not exact bytes: a CRC can only be checked over the bytes it was taken
over. A segment is at most one chunk (~16 MiB), so a rank that needs a few rows of a
large shard reads about that many bytes, not the shard.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from trainkit.checkpoint.errors import CorruptCheckpointError, PickleRefusedError
from trainkit.checkpoint.format import codec
from trainkit.checkpoint.format.dtensor_meta import Box, overlap, volume
from trainkit.checkpoint.format.layout import crc32, step_dirname
from trainkit.checkpoint.reader import chunk_location, load_blobs, read_rank_index, tensor_from_blob
from trainkit.checkpoint.tiers import Tier

__all__ = ["Piece", "PieceReaders", "fill_region", "full_tensor", "load_own_full"]

# (saved rank, entry in that rank's tensor table, global offsets, shape)
Piece = tuple[int, int, Sequence[int], Sequence[int]]


class PieceReaders:
    """Per saved rank: its index (read on first use, checksum-verified) and verified reads
    of byte spans of its blobs. Thread-safe; one per load of one step from one tier."""

    def __init__(self, tier: Tier, step: int, record: dict, *,
                 indexes: dict[int, dict] | None = None) -> None:
        self.tier, self.step, self.record = tier, step, record
        self._indexes: dict[int, dict] = dict(indexes or {})
        self._lock = threading.Lock()
        self.bytes_read = 0

    def index(self, rank: int) -> dict:
        with self._lock:
            if rank not in self._indexes:
                self._indexes[rank] = read_rank_index(self.tier, self.step, rank, self.record)
            return self._indexes[rank]

    def _rel(self, rel: str) -> str:
        return f"{step_dirname(self.step)}/{rel}"

    def span(self, rank: int, blob: int, start: int, end: int, what: str) -> tuple[torch.Tensor, int]:
        """Bytes ``[start, end)`` of a blob (blob-relative), widened to whole segments:
        ``(uint8 tensor, blob-relative offset of its first byte)``. ``what`` names the
        piece in a checksum error."""
        index = self.index(rank)
        b = index["blobs"][blob]
        cb = index["arrays"][b.get("array", "rank")]["chunk_bytes"]
        off, nbytes = b["offset"], b["nbytes"]
        lo = max(off, (off + start) // cb * cb)
        hi = min(off + nbytes, ((off + end - 1) // cb + 1) * cb)
        out = torch.empty(hi - lo, dtype=torch.uint8)
        view = memoryview(out.numpy())
        self._read_segments(rank, blob, start, end, what,
                            lambda s0, s1: [view[s0 - lo:s1 - lo]])
        return out, lo - off

    def read_exact(self, rank: int, blob: int, start: int, end: int, dst: memoryview,
                   what: str) -> None:
        """Bytes ``[start, end)`` of a blob straight into ``dst`` (``end - start`` bytes,
        e.g. a target tensor's storage), every segment they touch verified.

        Why: a load that lands in one contiguous region of the target need not read into
        a temporary and copy it over; only the parts of the first and last segments
        outside ``[start, end)`` (needed for their CRCs) go to small scratch buffers.
        On a checksum error ``dst`` may hold some of the bad bytes; the caller's
        fallback to another tier rewrites it."""
        off = self.index(rank)["blobs"][blob]["offset"]
        a, e = off + start, off + end

        def place(s0: int, s1: int) -> list[memoryview]:
            views = []
            if s0 < a:
                views.append(memoryview(bytearray(a - s0)))
            views.append(dst[max(s0, a) - a:min(s1, e) - a])
            if s1 > e:
                views.append(memoryview(bytearray(s1 - e)))
            return views
        self._read_segments(rank, blob, start, end, what, place)

    def _read_segments(self, rank: int, blob: int, start: int, end: int, what: str,
                       place: Any) -> None:
        """Read and verify every segment of a blob that ``[start, end)`` touches;
        ``place(s0, s1)`` gives the buffers (in order) that segment ``[s0, s1)`` of the
        packed array is read into."""
        index = self.index(rank)
        b = index["blobs"][blob]
        array = b.get("array", "rank")
        cb = index["arrays"][array]["chunk_bytes"]
        off, nbytes = b["offset"], b["nbytes"]
        first, c0, c1 = off // cb, (off + start) // cb, (off + end - 1) // cb
        for c in range(c0, c1 + 1):
            s0, s1 = max(off, c * cb), min(off + nbytes, (c + 1) * cb)
            rel = chunk_location(index, array, c)
            expected = self.record["files"].get(rel)
            actual = self.tier.size(self._rel(rel))
            where = f"{self.tier.url}/{self._rel(rel)}"
            if expected is None or actual != expected[0]:
                state = ("is not in the commit record" if expected is None else "is missing"
                         if actual is None else f"has {actual} bytes, the commit record says "
                         f"{expected[0]}")
                raise CorruptCheckpointError(f"step {self.step}, rank {rank}: {where} "
                                             f"({what}) {state}")
            views = place(s0, s1)
            try:
                self.tier.read_into(self._rel(rel), views, s0 - c * cb)
            except (EOFError, FileNotFoundError) as exc:
                raise CorruptCheckpointError(f"step {self.step}, rank {rank}: {where}: "
                                             f"{exc}") from exc
            crc = 0
            for v in views:
                crc = crc32(v, crc)
            if crc != b["crc32"][c - first]:
                raise CorruptCheckpointError(
                    f"step {self.step}, rank {rank}: checksum mismatch in {what} stored in "
                    f"{where} on the {self.tier.name} tier: the data was altered after it "
                    f"was written")
            self.bytes_read += s1 - s0


def _describe(name: str, piece: Piece) -> str:
    rank, _, offsets, shape = piece
    return f"tensor {name!r} (piece at offsets {list(offsets)}, shape {list(shape)}, saved by rank {rank})"


def _dense(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether elements of ``shape`` laid out with ``stride`` are one gap-free run in
    row-major order (sizes of 1 may have any stride)."""
    expected = 1
    for n, st in zip(reversed(shape), reversed(stride)):
        if n != 1 and st != expected:
            return False
        expected *= n
    return True


def _bytes_of(t: torch.Tensor) -> memoryview | None:
    """A writable byte view of ``t``'s elements when they are one contiguous run of CPU
    memory that holds the values as they are (no conjugate or negative bit); else None."""
    if (t.device.type != "cpu" or not t.is_contiguous() or t.is_conj() or t.is_neg()
            or t.numel() == 0 or type(t) not in (torch.Tensor, torch.nn.Parameter)):
        return None
    isz = t.element_size()
    raw = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage(), t.storage_offset() * isz,
                                                 (t.numel() * isz,), (1,))
    return memoryview(raw.numpy())


def fill_region(dst: torch.Tensor, box: Box, pieces: Sequence[Piece], readers: PieceReaders,
                name: str) -> None:
    """Fill ``dst`` (the target box ``box`` of tensor ``name``) from the saved pieces
    that overlap it. Raises :class:`CorruptCheckpointError` on a bad checksum, or when
    the pieces do not cover the box."""
    covered = 0
    for piece in pieces:
        rank, entry_i, offsets, shape = piece
        ov = overlap(box, (tuple(offsets), tuple(shape)))
        if ov is None:
            continue
        entry = readers.index(rank)["tensors"][entry_i]
        dtype = getattr(torch, entry["dtype"])
        isz = dtype.itemsize
        rel = [o - p for o, p in zip(ov[0], offsets)]
        stride = entry["stride"]
        first = sum(r * s for r, s in zip(rel, stride))
        last = sum((r + n - 1) * s for r, n, s in zip(rel, ov[1], stride))
        a, e = entry["offset"] + first * isz, entry["offset"] + (last + 1) * isz
        where = tuple(slice(o - b0, o - b0 + n) for o, b0, n in zip(ov[0], box[0], ov[1]))
        what = _describe(name, piece)
        with torch.no_grad():
            region = dst[where]
        direct = _bytes_of(region) if _dense(ov[1], stride) and region.dtype == dtype else None
        if direct is not None:       # one contiguous run on both sides: read into place
            readers.read_exact(rank, entry["blob"], a, e, direct, what)
        else:
            raw, base = readers.span(rank, entry["blob"], a, e, what)
            sub = raw[a - base:e - base]
            if sub.storage_offset() % isz:
                sub = sub.clone()
            src = torch.empty(0, dtype=dtype).set_(sub.untyped_storage(),
                                                    sub.storage_offset() // isz, ov[1], stride)
            with torch.no_grad():
                region.copy_(src)
        covered += volume(ov[1])
    if covered != volume(box[1]):
        raise CorruptCheckpointError(
            f"step {readers.step}: the saved pieces of tensor {name!r} cover {covered} of the "
            f"{volume(box[1])} elements this rank needs (at offsets {list(box[0])}, shape "
            f"{list(box[1])})")


def full_tensor(name: str, readers: PieceReaders) -> torch.Tensor:
    """A saved DTensor ``name`` whole, as a plain CPU tensor."""
    info = readers.record["dtensor"][name]
    out = torch.empty(info["shape"], dtype=getattr(torch, info["dtype"]))
    fill_region(out, ((0,) * out.ndim, tuple(out.shape)), info["pieces"], readers, name)
    return out


def load_own_full(tier: Tier, step: int, record: dict, rank: int, *, threads: int = 4) -> Any:
    """A rank's own state of a DTensor step (same world size, no target): its plain
    tensors and values as written, each DTensor whole."""
    readers = PieceReaders(tier, step, record)
    index = readers.index(rank)
    table = index["tensors"]
    plain = {t["blob"] for t in table if "dtensor" not in t}
    storages = load_blobs(tier, step, rank, record, index, threads=threads, only=plain)

    def tensor(i: int) -> torch.Tensor:
        entry = table[i]
        if "dtensor" in entry:
            return full_tensor(entry["name"], readers)
        return tensor_from_blob(entry, storages[entry["blob"]])

    def pickled(i: int) -> Any:
        raise PickleRefusedError(f"step {step}, rank {rank}: {table[i]['name']!r} is a pickled "
                                 f"value, which a Checkpointer step never holds")

    return codec.decode(index["tree"], tensor, pickled)
