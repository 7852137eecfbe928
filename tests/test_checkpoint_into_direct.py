"""load(into=) reads verified segments straight into the target's storage where a piece
maps to one contiguous run, and falls back to read-then-copy where it does not.

One process, one real step on disk (small chunks, so a piece spans several checksum
segments and starts and ends inside one); :func:`fill_region` is driven with the boxes
a resharding load asks for: whole tensors and row ranges (direct), column cuts, strided
targets (fallback). Every case checks
the values bit for bit and which path ran; corruption inside the range, and inside the
part of an edge segment outside it, is detected and names the tensor, piece and rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainkit.checkpoint import Checkpointer
from trainkit.checkpoint.errors import CorruptCheckpointError
from trainkit.checkpoint.reader import as_tier, chunk_location, read_commit_record
from trainkit.checkpoint.reshard import PieceReaders, fill_region

CHUNK = 4096        # 1 KiB-aligned chunks: a 64 x 48 float32 tensor spans 3 of them


def _state() -> dict:
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(64, 48, generator=g), "v": torch.randn(33, 7, generator=g),
            "h": torch.randn(16, 16, generator=g).to(torch.bfloat16)}


@pytest.fixture()
def step(tmp_path: Path) -> Path:
    root = tmp_path / "ck"
    with Checkpointer(root, chunk_bytes=CHUNK, timeout=30) as ck:
        ck.save(1, _state()).result(timeout=60)
    return root


class _Spy(PieceReaders):
    """Counts which read path fill_region took."""

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.direct = self.copied = 0

    def read_exact(self, *a, **k) -> None:
        self.direct += 1
        return super().read_exact(*a, **k)

    def span(self, *a, **k):
        self.copied += 1
        return super().span(*a, **k)


def _readers(root: Path) -> _Spy:
    tier = as_tier(str(root))
    return _Spy(tier, 1, read_commit_record(tier, 1))


def _piece(readers: PieceReaders, name: str) -> tuple:
    table = readers.index(0)["tensors"]
    i = next(i for i, t in enumerate(table) if t["name"] == name)
    return (0, i, [0] * len(table[i]["shape"]), table[i]["shape"])


def test_whole_tensor_and_row_ranges_are_read_into_place(step):
    want = _state()
    for name, lo, hi in (("w", 0, 64), ("w", 5, 37), ("w", 21, 22), ("v", 0, 33),
                         ("v", 10, 33), ("h", 3, 9)):
        r = _readers(step)
        t = want[name]
        dst = torch.full((hi - lo, *t.shape[1:]), float("nan"), dtype=t.dtype)
        fill_region(dst, ((lo, 0), tuple(dst.shape)), [_piece(r, name)], r, name)
        assert torch.equal(dst.view(torch.uint8), t[lo:hi].contiguous().view(torch.uint8)), \
            (name, lo, hi)
        assert (r.direct, r.copied) == (1, 0), (name, lo, hi)


def test_direct_read_lands_in_a_view_of_a_larger_buffer(step):
    """FSDP2's local shards are views into one flat buffer: the bytes around the target
    must stay untouched."""
    want = _state()["w"]
    r = _readers(step)
    flat = torch.full((64 * 48 + 40,), -7.0)
    dst = flat[17:17 + 20 * 48].view(20, 48)
    fill_region(dst, ((30, 0), (20, 48)), [_piece(r, "w")], r, "w")
    assert torch.equal(dst, want[30:50])
    assert (flat[:17] == -7).all() and (flat[17 + 20 * 48:] == -7).all()
    assert r.direct == 1


@pytest.mark.parametrize("case", ["column cut", "strided target", "uneven column cut"])
def test_non_contiguous_cases_fall_back_and_stay_exact(step, case):
    want = _state()
    r = _readers(step)
    if case == "column cut":            # Shard(1): each saved row contributes a short run
        dst = torch.empty(64, 20)
        fill_region(dst, ((0, 8), (64, 20)), [_piece(r, "w")], r, "w")
        expect = want["w"][:, 8:28]
    elif case == "strided target":      # rows fit the source, but the target is transposed
        dst = torch.empty(48, 64).t()
        fill_region(dst, ((0, 0), (64, 48)), [_piece(r, "w")], r, "w")
        expect = want["w"]
    else:
        dst = torch.empty(33, 3)
        fill_region(dst, ((0, 4), (33, 3)), [_piece(r, "v")], r, "v")
        expect = want["v"][:, 4:]
    assert torch.equal(dst, expect), case
    assert r.direct == 0 and r.copied == 1, case


def test_pieces_from_two_saved_ranks_mix_paths(step):
    """A target box covered by two pieces (two saved shards of one tensor): rows land
    directly from each."""
    want = _state()["w"]
    r = _readers(step)
    _, i, _, _ = _piece(r, "w")
    # the one saved tensor presented as two saved pieces: rows 0-39 and 40-63
    entry = r.index(0)["tensors"][i]
    top = dict(entry, shape=[40, 48])
    bottom = dict(entry, shape=[24, 48], offset=entry["offset"] + 40 * 48 * 4)
    r.index(0)["tensors"].extend([top, bottom])
    n = len(r.index(0)["tensors"])
    dst = torch.empty(30, 48)
    fill_region(dst, ((25, 0), (30, 48)), [(0, n - 2, [0, 0], [40, 48]),
                                            (0, n - 1, [40, 0], [24, 48])], r, "w")
    assert torch.equal(dst, want[25:55])
    assert r.direct == 2


def _chunk_of(readers: PieceReaders, name: str, byte: int) -> tuple[str, int, int]:
    """(array, chunk, byte in the chunk) of tensor ``name``'s tensor-relative ``byte``."""
    index = readers.index(0)
    entry = next(t for t in index["tensors"] if t["name"] == name)
    blob = index["blobs"][entry["blob"]]
    array = blob.get("array", "rank")
    cb = index["arrays"][array]["chunk_bytes"]
    at = blob["offset"] + entry["offset"] + byte
    return array, at // cb, at % cb


def _flip(root: Path, readers: PieceReaders, name: str, byte: int) -> None:
    """Flip one byte of tensor ``name``'s data at tensor-relative byte ``byte``."""
    array, c, at = _chunk_of(readers, name, byte)
    path = root / "step_0000000001" / chunk_location(readers.index(0), array, c)
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["inside the rows read", "same segment, outside the rows"])
def test_corruption_is_detected_and_named_on_the_direct_path(step, where):
    r = _readers(step)
    row = 48 * 4                  # rows 20-29 of w are read: bytes 3840-5759 of it
    byte = 25 * row if where == "inside the rows read" else 20 * row - 1
    if where != "inside the rows read":   # only the segment's CRC covers this byte
        assert _chunk_of(r, "w", byte)[1] == _chunk_of(r, "w", 20 * row)[1]
    _flip(step, r, "w", byte)
    r = _readers(step)
    dst = torch.empty(10, 48)
    with pytest.raises(CorruptCheckpointError) as err:
        fill_region(dst, ((20, 0), (10, 48)), [_piece(r, "w")], r, "w")
    msg = str(err.value)
    assert "checksum mismatch" in msg and "'w'" in msg and "saved by rank 0" in msg, msg
    assert "offsets [0, 0]" in msg, msg
    assert r.direct == 1


def test_corruption_is_detected_on_the_fallback_path(step):
    r = _readers(step)
    _flip(step, r, "w", 30 * 48 * 4 + 12)
    r = _readers(step)
    dst = torch.empty(64, 4)
    with pytest.raises(CorruptCheckpointError, match=r"checksum mismatch in tensor 'w'"):
        fill_region(dst, ((0, 1), (64, 4)), [_piece(r, "w")], r, "w")
    assert r.copied == 1 and r.direct == 0


def test_load_into_plain_target_is_bit_equal(step):
    """The public path: Checkpointer.load(into=) over plain tensors reads them directly."""
    target = {k: torch.zeros_like(v) for k, v in _state().items()}
    with Checkpointer(step, timeout=30) as ck:
        ck.load(1, into=target)
    for k, v in _state().items():
        assert torch.equal(target[k].view(torch.uint8), v.view(torch.uint8)), k
