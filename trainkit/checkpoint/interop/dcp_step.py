"""A step written through DCP, at the step level: its DCP metadata file, its state tree,
where a DCP item's key path goes, the commit, and reassembling a tensor from its chunks.

Shared by the two DCP writers (:class:`~trainkit.checkpoint.interop.dcp.ZarrWriter`
inside ``dcp.save``, and :mod:`~trainkit.checkpoint.interop.dcp_import` converting a DCP
directory) and the readers (``ZarrReader``, :mod:`~trainkit.checkpoint.tensors`), so
both sides agree on one definition of a DCP step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata

from trainkit.checkpoint.errors import CheckpointError, CorruptCheckpointError
from trainkit.checkpoint.format import codec
from trainkit.checkpoint.format.dcp_metadata import decode_metadata
from trainkit.checkpoint.format.layout import crc32, step_dirname
from trainkit.checkpoint.format.validate import parse_json, safe_relpath
from trainkit.checkpoint.tiers import Tier
from trainkit.checkpoint.writer import commit_record, write_json_file

__all__ = ["DCP_METADATA_FILE", "next_free_step", "commit_dcp_step", "state_tree",
           "dcp_key_path", "read_step_metadata", "assemble_tensor", "dcp_version"]

DCP_METADATA_FILE = "dcp_metadata.json"


def next_free_step(tier: Tier) -> int:
    """The step after the newest step directory (committed or not): never reuses one."""
    steps = tier.step_dirs()
    return steps[-1] + 1 if steps else 0


def _set_path(root: dict, path: tuple, value: Any) -> None:
    """Place ``value`` at ``path`` (str keys make dicts, int keys lists), as DCP's own
    unflattening does, so the tree has the shape of the state the user saved."""
    cur: Any = root
    for key, nxt in zip(path, path[1:]):
        empty: Any = {} if isinstance(nxt, str) else []
        if isinstance(cur, list):
            cur.extend([None] * (key + 1 - len(cur)))
            if cur[key] is None:
                cur[key] = empty
        else:
            cur.setdefault(key, empty)
        cur = cur[key]
    key = path[-1]
    if isinstance(cur, list):
        cur.extend([None] * (key + 1 - len(cur)))
    cur[key] = value


def state_tree(leaves: list[tuple[tuple, bool]]) -> Any:
    """The encoded state tree (:mod:`~trainkit.checkpoint.format.codec` form) of a rank whose
    table entry ``i`` sits at key path ``leaves[i][0]`` (``leaves[i][1]``: pickled)."""
    root: dict = {}
    for i, (path, pickled) in enumerate(leaves):
        _set_path(root, path, codec.TableRef(i, pickled=pickled))
    return codec.encode(root, _no_tensor)


def _no_tensor(path: tuple, tensor: torch.Tensor) -> int:
    raise AssertionError(f"a tree of table references holds a tensor at {path}")


def dcp_key_path(fqn: str, mappings: dict) -> tuple[tuple, str]:
    """The key path of a DCP item (from the planner's flattening map) and its index name."""
    path = tuple(mappings.get(fqn, (fqn,)))
    return path, "/".join(map(str, path))


def commit_dcp_step(tier: Tier, step: int, manifests: list[dict], metadata_doc: dict) -> None:
    """Write the JSON form of DCP's metadata into the step, then publish the commit record
    (listing that file with its checksum): the record is the last write."""
    size, crc = write_json_file(tier, f"{step_dirname(step)}/{DCP_METADATA_FILE}", metadata_doc)
    doc = commit_record(step, len(manifests), manifests, tier=tier.name)
    record = doc["attributes"]["trainkit"]
    record["files"][DCP_METADATA_FILE] = [size, crc]
    record["dcp"] = {"metadata": DCP_METADATA_FILE, "version": metadata_doc.get("version")}
    tier.publish(step, doc)


def dcp_version() -> str | None:
    try:
        from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
    except ImportError:  # pragma: no cover - older torch
        return None
    return CURRENT_DCP_VERSION


def read_step_metadata(tier: Tier, step: int, record: dict, *, allow_pickle: bool = False,
                       planner_data: bool = True) -> Metadata:
    """The DCP ``Metadata`` of a committed step written through DCP, checksum-verified
    (``planner_data=False`` skips the planner's data, which only DCP's planner needs)."""
    info = record.get("dcp")
    if not info:
        raise CheckpointError(f"step {step} in {tier.url} was saved by trainkit's "
                              f"Checkpointer, not through DCP; load it with "
                              f"Checkpointer(path).load({step})")
    rel = info.get("metadata") if isinstance(info, dict) else None
    where = f"step {step}: {tier.url}/{step_dirname(step)}/{rel}"
    if rel not in record["files"]:
        raise CorruptCheckpointError(f"{where}: the DCP metadata file is not in the commit "
                                     f"record")
    raw = tier.read(f"{step_dirname(step)}/{safe_relpath(rel, where)}")
    size, crc = record["files"][rel]
    if len(raw) != size or crc32(raw) != crc:
        raise CorruptCheckpointError(f"{where} fails its checksum (DCP metadata)")
    doc = parse_json(raw, where)
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{where} is not DCP metadata")
    if not planner_data:
        doc["planner_data"] = None
    try:
        return decode_metadata(doc, allow_pickle=allow_pickle)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{where}: malformed DCP metadata: "
                                     f"{type(exc).__name__}: {exc}"[:400]) from None


def assemble_tensor(shape: tuple[int, ...], dtype: torch.dtype,
                    pieces: list[tuple[Sequence[int], Callable[[], torch.Tensor]]]
                    ) -> torch.Tensor:
    """A global tensor from its saved chunks (``(offsets, fetch)``), one chunk in memory
    at a time besides the result; a single whole chunk is returned as it is."""
    if len(pieces) == 1 and not any(pieces[0][0]):
        whole = pieces[0][1]()
        if tuple(whole.shape) == tuple(shape):
            return whole
    out = torch.empty(shape, dtype=dtype)
    for offsets, fetch in pieces:
        part = fetch()
        view = out
        for dim, (off, n) in enumerate(zip(offsets, part.shape)):
            view = view.narrow(dim, off, n)
        view.copy_(part)
    return out
