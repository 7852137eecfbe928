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
shards over TP (``_StridedShard``) give the same boxes DCP would write.

ShardedTensor (FSDP1's ``SHARDED_STATE_DICT``) is refused with a pointer to DCP and
:class:`~trainkit.checkpoint.interop.dcp.ZarrWriter`, which store it in this format.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from trainkit.checkpoint.format import codec
from trainkit.checkpoint.format.dtensor_meta import Box, encode_placement

__all__ = ["is_dtensor", "local_of", "describe_dtensor", "target_region", "check_not_sharded_tensor"]


def is_dtensor(t: Any) -> bool:
    if not isinstance(t, torch.Tensor) or type(t) in (torch.Tensor, torch.nn.Parameter):
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


def _placements(path: codec.KeyPath, t: Any) -> list[str]:
    from torch.distributed.tensor.placement_types import _StridedShard

    out = []
    for p in t.placements:
        if isinstance(p, _StridedShard):
            out.append(encode_placement("strided", p.dim, int(p.split_factor)))
        elif p.is_shard():
            out.append(encode_placement("shard", p.dim))
        elif p.is_replicate():
            out.append(encode_placement("replicate"))
        else:
            raise TypeError(f"cannot store the DTensor at {codec.format_key_path(path)}: its "
                            f"placement {p} holds unreduced partial values; redistribute it "
                            f"to Shard or Replicate first")
    return out


def describe_dtensor(path: codec.KeyPath, t: Any) -> tuple[torch.Tensor, dict]:
    """The tensor this rank stores for DTensor ``t`` (its local piece, or an empty
    placeholder when another replica writes it) and its entry's ``dtensor`` metadata."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = _placements(path, t)
    mesh = t.device_mesh
    coord = mesh.get_coordinate()
    local = t._local_tensor
    if coord is None:          # this rank is not in the mesh: it holds nothing
        local_shape, offsets = (0,) * t.ndim, (0,) * t.ndim
        held = False
    else:
        local_shape, offsets = compute_local_shape_and_global_offset(t.shape, mesh, t.placements)
        held = (all(c == 0 for c, p in zip(coord, placements) if p == "R")
                and _first_replica_group(mesh))
        if tuple(local.shape) != tuple(local_shape):
            raise TypeError(f"cannot store the DTensor at {codec.format_key_path(path)}: its "
                            f"local tensor has shape {tuple(local.shape)}, but its placements "
                            f"{placements} on mesh {tuple(mesh.shape)} give {tuple(local_shape)}")
    meta = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "offsets": [int(o) for o in offsets], "local_shape": [int(n) for n in local_shape],
            "mesh": {"shape": list(mesh.shape),
                     "dims": list(mesh.mesh_dim_names) if mesh.mesh_dim_names else None},
            "coord": None if coord is None else [int(c) for c in coord],
            "placements": placements, "held": held}
    return (local if held else local.new_empty((0,))), meta


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
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = t._local_tensor  # type: ignore[attr-defined]
    if t.device_mesh.get_coordinate() is None:  # type: ignore[attr-defined]
        return local, ((0,) * t.ndim, (0,) * t.ndim)
    shape, offsets = compute_local_shape_and_global_offset(
        t.shape, t.device_mesh, t.placements)  # type: ignore[attr-defined]
    if tuple(local.shape) != tuple(shape):
        raise ValueError(f"the target DTensor's local tensor has shape {tuple(local.shape)}, "
                         f"its placements give {tuple(shape)}")
    return local, (tuple(int(o) for o in offsets), tuple(int(n) for n in shape))
