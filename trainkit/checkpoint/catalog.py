"""What a checkpoint directory holds, as plain rows: the read side of ``trainkit ckpt``.

The CLI only formats; the logic that walks tiers, commit records and rank indexes lives
here, next to :mod:`~trainkit.checkpoint.reader`, so it is tested and reused without
argparse (``ls``'s rows, ``info``'s tensor table, and the explanation given when a
directory is not a trainkit checkpoint at all).
"""

from __future__ import annotations

import math
import os

from trainkit.checkpoint import reader
from trainkit.checkpoint.errors import CheckpointNotFoundError, CorruptCheckpointError
from trainkit.checkpoint.tiers import Tier

__all__ = ["step_rows", "tensor_table", "dtensor_row", "not_a_checkpoint", "dcp_directory"]

DCP_MARKER = ".metadata"      # what torch.distributed.checkpoint's FileSystemWriter writes


def dcp_directory(where: Tier | str) -> str | None:
    """A pointer to ``import-dcp`` when ``where`` is a plain DCP directory (it has DCP's
    ``.metadata`` and no step directories), else None."""
    tier = reader.as_tier(where)
    if tier.step_dirs() or tier.size(DCP_MARKER) is None:
        return None
    return (f"{tier.url} is a torch.distributed.checkpoint directory, not a trainkit "
            f"checkpoint; convert it with `trainkit ckpt import-dcp {tier.url} DST`")


def not_a_checkpoint(where: Tier | str) -> str | None:
    """Why ``where`` holds no trainkit checkpoint at all (None when it holds step
    directories)."""
    tier = reader.as_tier(where)
    if tier.step_dirs():
        return None
    return dcp_directory(tier) or f"{tier.url} holds no trainkit checkpoint (no step_* directories)"


def step_rows(where: Tier | str, tier_name: str) -> list[dict]:
    """One row per step directory of a tier: committed or not, ranks, bytes, tensors."""
    tier = reader.as_tier(where)
    rows = []
    for step in tier.step_dirs():
        try:
            record = reader.read_commit_record(tier, step)
        except CheckpointNotFoundError:
            rows.append({"step": step, "tier": tier_name, "committed": False})
            continue
        except CorruptCheckpointError as exc:
            rows.append({"step": step, "tier": tier_name, "committed": False, "error": str(exc)})
            continue
        rows.append({"step": step, "tier": tier_name, "committed": True,
                     "world_size": record["world_size"],
                     "bytes": sum(size for size, _ in record["files"].values()),
                     "tensors": sum(r.get("ntensors", 0) for r in record["ranks"]),
                     "replicated_blobs": len(record.get("replicated", [])),
                     "committed_at": str(record.get("committed_at", "?"))})
    return rows


def tensor_table(where: Tier | str | os.PathLike, step: int) -> list[dict]:
    """The tensor table of a committed step: one row per tensor, replicated tensors once
    (``rank: "replicated"``), split tensors with their global shape and dimension.

    Raises :class:`~trainkit.checkpoint.errors.CheckpointError` for a missing or
    corrupt step; on a directory that is no checkpoint, the message says what it is.
    """
    tier = reader.as_tier(where)
    try:
        record = reader.read_commit_record(tier, step)
    except CheckpointNotFoundError as exc:
        why = not_a_checkpoint(tier)
        raise CheckpointNotFoundError(why or str(exc)) from None
    replicated = set(record.get("replicated", []))
    sharded = record.get("sharded", {})
    dtensors = record.get("dtensor", {})
    table = []
    for rank in range(record["world_size"]):
        index = reader.read_rank_index(tier, step, rank, record)
        for t in index["tensors"]:
            if t["name"] in dtensors:
                if not rank:              # listed once, whole, with its pieces
                    table.append(dtensor_row(t["name"], dtensors[t["name"]]))
                continue
            shared = t["blob"] in replicated
            if shared and rank:
                continue                  # listed once, as replicated
            row = {"rank": "replicated" if shared else rank, "name": t["name"],
                   "dtype": "pickled" if t.get("pickled") else t["dtype"],
                   "shape": t["shape"], "bytes": t["nbytes"]}
            split = sharded.get(t["name"], sharded.get(t["name"].replace("/", ".")))
            if split is not None:
                row["global_shape"] = split["shape"]
                row["split_dim"] = split["dim"]
            table.append(row)
    return table


def dtensor_row(name: str, info: dict) -> dict:
    """A DTensor of a step as one row: its global shape and bytes, mesh, placements, and
    which rank holds which piece (offsets and shape); replicas that did not write are
    not listed (their piece is the one at the same offsets)."""
    import torch

    itemsize = getattr(torch, info["dtype"]).itemsize
    return {"rank": "dtensor", "name": name, "dtype": info["dtype"], "shape": info["shape"],
            "bytes": itemsize * math.prod(info["shape"]), "mesh": info["mesh"]["shape"],
            "mesh_dims": info["mesh"].get("dims"), "placements": info["placements"],
            "pieces": [{"rank": r, "offsets": o, "shape": n} for r, _, o, n in info["pieces"]]}
