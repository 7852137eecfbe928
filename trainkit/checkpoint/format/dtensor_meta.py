"""DTensor placements and global offsets in the format: what a DTensor step records.

A DTensor (FSDP2, tensor parallelism) is stored as each rank's local tensor, a *piece*
of the global tensor: a box at ``offsets`` with the local shape. Three places hold it:

* the rank's tensor entry gets ``"dtensor"``: the global shape, this rank's offsets,
  the mesh (shape, dim names, the ranks in it), this rank's mesh coordinate and the
  placements (``"S(0)"`` shard dim 0, ``"R"`` replicate, ``"SS(0,2)"`` a strided shard
  with split factor 2), and ``held``;
* a piece replicated along a mesh dimension is written once: only the coordinate-0
  replica along every replicated dim holds it (``held: true``); the others store an
  empty placeholder, as replicated state is stored once elsewhere;
* the commit record's ``"dtensor"`` table names, per tensor, the held pieces as
  ``[rank, entry, offsets, shape]``, so a reader plans which ranks' byte ranges it
  needs from the record alone, before reading any rank index.

Everything here is pure (JSON in, JSON out), so the planner and ``ckpt verify`` test it
without torch.distributed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["encode_placement", "is_replicate", "piece_of", "global_dtensors", "check_pieces",
           "Box", "overlap", "volume"]

# (offsets, sizes) of a box in a tensor's global index space
Box = tuple[tuple[int, ...], tuple[int, ...]]


def encode_placement(kind: str, dim: int | None = None, split_factor: int | None = None) -> str:
    """``"R"``, ``"S(d)"`` or ``"SS(d,f)"`` (the placement names DTensor prints, short)."""
    if kind == "replicate":
        return "R"
    if kind == "shard":
        return f"S({dim})"
    if kind == "strided":
        return f"SS({dim},{split_factor})"
    raise ValueError(f"unknown placement kind {kind!r}")


def is_replicate(placement: str) -> bool:
    return placement == "R"


def piece_of(rank: int, entry: int, meta: dict) -> dict:
    """A rank's report of one DTensor for the commit (its manifest's ``dtensor`` map)."""
    return {"shape": list(meta["shape"]), "dtype": meta["dtype"], "mesh": meta["mesh"],
            "placements": list(meta["placements"]),
            "piece": ([rank, entry, list(meta["offsets"]), list(meta["local_shape"])]
                      if meta["held"] and math.prod(meta["local_shape"]) else None)}


def global_dtensors(manifests: Sequence[dict]) -> dict[str, dict]:
    """The commit record's ``dtensor`` table from every rank's manifest: for each DTensor
    its global shape, dtype, mesh, placements and held pieces. Raises ``ValueError`` when
    the ranks disagree on a DTensor's global shape or dtype (a broken state dict)."""
    out: dict[str, dict] = {}
    for m in manifests:
        for name, info in m.get("dtensor", {}).items():
            got = out.get(name)
            if got is None:
                got = out[name] = {k: info[k] for k in ("shape", "dtype", "mesh", "placements")}
                got["pieces"] = []
            elif got["shape"] != info["shape"] or got["dtype"] != info["dtype"]:
                raise ValueError(f"DTensor {name!r} has global shape {got['shape']} "
                                 f"({got['dtype']}) on one rank but {info['shape']} "
                                 f"({info['dtype']}) on rank {m['rank']}")
            if info["piece"] is not None:
                got["pieces"].append(info["piece"])
    for info in out.values():     # replicas that wrote the same piece: the lowest rank's
        info["pieces"].sort(key=lambda p: (p[2], p[3], p[0]))
        info["pieces"] = [p for i, p in enumerate(info["pieces"])
                          if not i or (p[2], p[3]) != tuple(info["pieces"][i - 1][2:4])]
    return out


def volume(sizes: Sequence[int]) -> int:
    return math.prod(sizes)


def overlap(a: Box, b: Box) -> Box | None:
    """The intersection of two boxes, or None when it is empty."""
    lo = tuple(max(x, y) for x, y in zip(a[0], b[0]))
    hi = tuple(min(x + n, y + m) for x, n, y, m in zip(a[0], a[1], b[0], b[1]))
    if any(h <= low for low, h in zip(lo, hi)):
        return None
    return lo, tuple(h - low for low, h in zip(lo, hi))


def check_pieces(name: str, info: dict) -> list[str]:
    """Problems with one DTensor's piece table: pieces outside the global shape, pieces
    that overlap, or pieces that leave part of the tensor uncovered."""
    shape = tuple(info["shape"])
    problems = []
    boxes: list[tuple[int, Box]] = []
    for rank, _, offsets, sizes in info["pieces"]:
        box = (tuple(offsets), tuple(sizes))
        if len(offsets) != len(shape) or any(
                o < 0 or o + n > s for o, n, s in zip(offsets, sizes, shape)):
            problems.append(f"DTensor {name!r}: the piece on rank {rank} at {list(offsets)} "
                            f"of shape {list(sizes)} lies outside the global shape {list(shape)}")
            continue
        for other, obox in boxes:
            if overlap(box, obox) is not None:
                problems.append(f"DTensor {name!r}: the pieces on ranks {other} and {rank} "
                                f"overlap")
        boxes.append((rank, box))
    covered = sum(volume(b[1]) for _, b in boxes)
    if not problems and covered != volume(shape):
        problems.append(f"DTensor {name!r}: its pieces cover {covered} of {volume(shape)} "
                        f"elements of the global shape {list(shape)}")
    return problems
