"""DTensors in the Checkpointer: what ``save()`` stores of one, and where ``load()`` puts it.

FSDP2 (``fully_shard``) and tensor parallelism hand the Checkpointer DTensors. Each rank
stores its local tensor, the piece of the global tensor it holds, with the metadata of
:mod:`~trainkit.checkpoint.format.dtensor_meta` (global shape, offsets, mesh,
placements). Why the local tensor and nothing gathered: it is what the optimizer owns
(FSDP2's sharded parameters and their Adam moments are views of per-rank buffers), so
the lazy snapshot copies it after ``save()`` returns, exactly like a plain parameter, and
no collective runs inside ``save()``.

Offsets come from ``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``,
the function DCP's planner uses, so uneven shards, 2-D meshes and FSDP2's strided
shards over TP (``_StridedShard``) give the same boxes DCP would write. They are cached
per (mesh, placements, global shape): the layout does not change between saves, and
recomputing it for every DTensor was most of ``save()``'s CPU on the training thread.

ShardedTensor (FSDP1's ``SHARDED_STATE_DICT``) is refused with a pointer to DCP and
:class:`~trainkit.checkpoint.interop.dcp.ZarrWriter`, which store it in this format.
"""

from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from trainkit.checkpoint.format import codec
from trainkit.checkpoint.format.dtensor_meta import Box, encode_placement

__all__ = ["is_dtensor", "local_of", "describe_dtensor", "target_region", "check_not_sharded_tensor"]


def is_dtensor(t: Any) -> bool:
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not isinstance(t, torch.Tensor):
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor that owns a DTensor's bytes (itself for any other tensor): what the
    optimizer's step changes, so what the lazy snapshot tracks."""
    return t._local_tensor if is_dtensor(t) else t  # type: ignore[attr-defined]


def check_not_sharded_tensor(path: codec.KeyPath, t: torch.Tensor) -> None:
    """Refuse FSDP1's ShardedTensor, naming the way that stores it."""
    if type(t).__name__ != "ShardedTensor":
        return
    raise TypeError(
        f"cannot store a ShardedTensor (FSDP1 SHARDED_STATE_DICT) at "
        f"{codec.format_key_path(path)}: save it through torch.distributed.checkpoint with "
        f"trainkit's ZarrWriter (dcp.save(state, storage_writer=ZarrWriter(path, step=N))), "
        f"which keeps this format and its checksums; or move to FSDP2 (fully_shard), whose "
        f"DTensors Checkpointer.save stores directly")


def _placements(t: Any) -> tuple[str | None, ...]:
    """The encoded placements of ``t``; None for a Partial one, which cannot be stored."""
    from torch.distributed.tensor.placement_types import _StridedShard

    out: list[str | None] = []
    for p in t.placements:
        if isinstance(p, _StridedShard):
            out.append(encode_placement("strided", p.dim, int(p.split_factor)))
        elif p.is_shard():
            out.append(encode_placement("shard", p.dim))
        elif p.is_replicate():
            out.append(encode_placement("replicate"))
        else:
            out.append(None)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where this rank's piece of a DTensor sits: everything ``save()`` and ``load(into=)``
    need that depends only on (mesh, placements, global shape), not on the values."""

    placements: tuple[str | None, ...]     # encoded (format.dtensor_meta); None: Partial
    local_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    coord: tuple[int, ...] | None          # None: this rank is not in the mesh
    held: bool                             # whether this rank's copy is the one written
    mesh_shape: tuple[int, ...]
    mesh_dims: tuple[str, ...] | None


# mesh -> {(placements, global shape): layout}. Why a cache: torch's
# compute_local_shape_and_global_offset and the placement checks cost ~50 us per DTensor
# in Python, and FSDP2 hands save() hundreds of DTensors with the same few layouts on
# every step (most of save()'s CPU on the training thread before). Weak on the mesh so
# a job that rebuilds its meshes does not keep the old ones alive.
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LAYOUTS_LOCK = threading.Lock()
_MAX_PER_MESH = 4096


def _layout(t: Any) -> _Layout:
    mesh, key = t.device_mesh, (tuple(t.placements), tuple(t.shape))
    per_mesh = _LAYOUTS.get(mesh)
    if per_mesh is not None:
        hit = per_mesh.get(key)
        if hit is not None:
            return hit
    layout = _compute_layout(t)
    with _LAYOUTS_LOCK:
        per_mesh = _LAYOUTS.setdefault(mesh, {})
        if len(per_mesh) >= _MAX_PER_MESH:
            per_mesh.clear()
        per_mesh[key] = layout
    return layout


def _compute_layout(t: Any) -> _Layout:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = _placements(t)
    mesh = t.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:          # this rank is not in the mesh: it holds nothing
        local_shape, offsets, held = (0,) * t.ndim, (0,) * t.ndim, False
    else:
        local_shape, offsets = compute_local_shape_and_global_offset(t.shape, mesh, t.placements)
        held = (all(c == 0 for c, p in zip(coord, placements) if p == "R")
                and _first_replica_group(mesh))
    return _Layout(placements, tuple(int(n) for n in local_shape),
                   tuple(int(o) for o in offsets),
                   None if coord is None else tuple(int(c) for c in coord), held,
                   tuple(int(n) for n in mesh.shape),
                   tuple(mesh.mesh_dim_names) if mesh.mesh_dim_names else None)


def describe_dtensor(path: codec.KeyPath, t: Any) -> tuple[torch.Tensor, dict]:
    """The tensor this rank stores for DTensor ``t`` (its local piece, or an empty
    placeholder when another replica writes it) and its entry's ``dtensor`` metadata."""
    lay = _layout(t)
    if None in lay.placements:
        bad = t.placements[lay.placements.index(None)]
        raise TypeError(f"cannot store the DTensor at {codec.format_key_path(path)}: its "
                        f"placement {bad} holds unreduced partial values; redistribute it "
                        f"to Shard or Replicate first")
    local = t._local_tensor
    if lay.coord is not None and tuple(local.shape) != lay.local_shape:
        raise TypeError(f"cannot store the DTensor at {codec.format_key_path(path)}: its "
                        f"local tensor has shape {tuple(local.shape)}, but its placements "
                        f"{list(lay.placements)} on mesh {lay.mesh_shape} give "
                        f"{lay.local_shape}")
    meta = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "offsets": list(lay.offsets), "local_shape": list(lay.local_shape),
            "mesh": {"shape": list(lay.mesh_shape),
                     "dims": None if lay.mesh_dims is None else list(lay.mesh_dims)},
            "coord": None if lay.coord is None else list(lay.coord),
            "placements": list(lay.placements), "held": lay.held}
    return (local if lay.held else local.new_empty((0,))), meta


def _first_replica_group(mesh: Any) -> bool:
    """Whether this rank's copy of a sub-mesh DTensor is the one written.

    FSDP on the ``dp`` dim of a ``dp x tp`` mesh gives DTensors on a 1-D sub-mesh: the
    sub-meshes at the other ``tp`` coordinates hold the same pieces, a replication the
    DTensor's own placements do not show. Only the sub-mesh at coordinate 0 along the
    root mesh's other dims writes."""
    root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh
    if root is mesh or root.get_coordinate() is None:
        return True
    return _outside_dims_zero(tuple(root.mesh.shape), tuple(root.mesh.flatten().tolist()),
                              tuple(sorted(mesh.mesh.flatten().tolist())),
                              tuple(root.get_coordinate()))


@functools.lru_cache(maxsize=256)
def _outside_dims_zero(shape: tuple[int, ...], ranks: tuple[int, ...], sub: tuple[int, ...],
                       coord: tuple[int, ...]) -> bool:
    where = {r: i for i, r in enumerate(ranks)}
    coords = []
    for r in sub:
        i, c = where[r], []
        for n in reversed(shape):
            c.append(i % n)
            i //= n
        coords.append(tuple(reversed(c)))
    fixed = [d for d in range(len(shape)) if len({c[d] for c in coords}) == 1]
    return all(coord[d] == 0 for d in fixed)


def target_region(t: torch.Tensor) -> tuple[torch.Tensor, Box]:
    """Where a load writes for target ``t``: the tensor to fill and its box in global
    coordinates (a DTensor's local piece, or a plain tensor whole)."""
    if not is_dtensor(t):
        return t, ((0,) * t.ndim, tuple(t.shape))
    local = t._local_tensor  # type: ignore[attr-defined]
    lay = _layout(t)
    if lay.coord is None:
        return local, ((0,) * t.ndim, (0,) * t.ndim)
    if tuple(local.shape) != lay.local_shape:
        raise ValueError(f"the target DTensor's local tensor has shape {tuple(local.shape)}, "
                         f"its placements give {lay.local_shape}")
    return local, (lay.offsets, lay.local_shape)
