"""``Checkpointer.load(step, into=target)``: fill a target state in place, resharding.

The target says where every byte goes: for FSDP2 / tensor-parallel jobs it is
``get_state_dict(model, optimizer)``, whose DTensors carry this rank's mesh and
placements. Whatever layout the step was saved with (another world size, a 1-D FSDP
mesh loaded onto FSDP x TP, ``Shard`` loaded as ``Replicate``, uneven shards), each
target tensor is one box of its global tensor, and :mod:`~trainkit.checkpoint.reshard`
reads the overlapping byte ranges of the saved pieces, verified, straight into it.

Order, so that a wrong target changes nothing: the saved trees (rank indexes, small)
are matched against the target first; keys missing on either side and tensors of
another shape or dtype are collected, and with ``strict=True`` raise
:class:`~trainkit.checkpoint.errors.StateMismatchError` listing them all before any
tensor is touched. With ``strict=False`` the rest loads and the :class:`LoadReport`
says what did not. Non-tensor values come back as saved (per saved rank as
:class:`~trainkit.checkpoint.restore.PerRank` when they differ and the world size
changed).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from trainkit.checkpoint.dtensor import target_region
from trainkit.checkpoint.errors import StateMismatchError
from trainkit.checkpoint.format import codec
from trainkit.checkpoint.reader import tensor_from_blob
from trainkit.checkpoint.reshard import Piece, PieceReaders, fill_region, full_tensor
from trainkit.checkpoint.restore import PerRank, _contains_ref, _equal, _Ref, _replace_refs, split_range
from trainkit.checkpoint.tiers import Tier

__all__ = ["LoadReport", "load_into"]

log = logging.getLogger(__name__)

_LIST_LIMIT = 20


@dataclass(frozen=True)
class LoadReport:
    """What ``load(step, into=target, strict=False)`` did not load, as dotted key paths:
    ``missing`` (in the target, not in the step: left as they were), ``unexpected`` (in
    the step, not in the target: not loaded) and ``mismatched`` (in both, but another
    kind, shape or dtype: left as they were, with the reason)."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = []
        for what, items in (("missing from the checkpoint", self.missing),
                            ("not in the target", self.unexpected),
                            ("mismatched", self.mismatched)):
            if items:
                more = f" and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
                parts.append(f"{len(items)} {what}: {', '.join(items[:_LIST_LIMIT])}{more}")
        return "; ".join(parts)


class _Later:
    """A value read only after the keys are checked (it may need tensor bytes)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn


def _dotted(path: tuple) -> str:
    return ".".join(map(str, path)) or "<root>"


def _kind(v: Any) -> str:
    if isinstance(v, _Ref):
        return "a tensor"
    if isinstance(v, Mapping):
        return "a dict"
    if isinstance(v, (list, tuple)):
        return f"a {type(v).__name__} of {len(v)}"
    return f"a {type(v).__name__}"


def load_into(tier: Tier, step: int, record: dict, target: Any, *, rank: int, world: int,
              strict: bool = True, threads: int = 4) -> tuple[Any, LoadReport]:
    """Fill ``target``'s tensors and DTensors in place from ``step`` on ``tier``; returns
    the target's tree (its own tensor objects, non-tensor values as saved) and what was
    not loaded. Collective only in that every rank calls it with its own target."""
    if record.get("dcp"):
        raise StateMismatchError(
            f"step {step} was written through torch.distributed.checkpoint (ZarrWriter); "
            f"load it with dcp.load(state, storage_reader=ZarrReader(...)), or without into=")
    saved = record["world_size"]
    readers = PieceReaders(tier, step, record)
    ranks = [rank] if saved == world else list(range(saved))

    def pickled(r: int, i: int) -> Any:
        raise StateMismatchError(f"step {step}, rank {r}: entry {i} is a pickled value, which a "
                                 f"Checkpointer step never holds")

    trees = {r: codec.decode(readers.index(r)["tree"], lambda i, r=r: _Ref(r, i),
                             lambda i, r=r: pickled(r, i)) for r in ranks}
    missing: list[str] = []
    unexpected: list[str] = []
    mismatched: list[str] = []
    tasks: list[tuple[torch.Tensor, tuple, list[Piece], str]] = []
    replicated = set(record.get("replicated", []))
    sharded = record.get("sharded", {})
    dtables = record.get("dtensor", {})

    def read_ref(ref: _Ref) -> torch.Tensor:
        entry = readers.index(ref.rank)["tensors"][ref.index]
        if "dtensor" in entry:
            return full_tensor(entry["name"], readers)
        nbytes = readers.index(ref.rank)["blobs"][entry["blob"]]["nbytes"]
        blob = (readers.span(ref.rank, entry["blob"], 0, nbytes, f"tensor {entry['name']!r}")[0]
                if nbytes else torch.empty(0, dtype=torch.uint8))
        return tensor_from_blob(entry, blob)

    def saved_tensor(refs: dict[int, _Ref]) -> tuple[str, list[Piece], list[int], str, Any] | str:
        """(name, pieces, global shape, dtype, split info) of a saved tensor, or why it
        cannot be placed into a target tensor."""
        ref = refs[rank if saved == world else 0]
        entry = readers.index(ref.rank)["tensors"][ref.index]
        name, shape, dtype = entry["name"], list(entry["shape"]), entry["dtype"]
        if "dtensor" in entry:
            info = dtables[name]
            return name, info["pieces"], info["shape"], info["dtype"], None
        whole = [(ref.rank, ref.index, [0] * len(shape), shape)]
        if saved == world:
            return name, whole, shape, dtype, None
        key = name if name in sharded else name.replace("/", ".")
        if key in sharded:
            info = sharded[key]
            pieces = []
            for r in range(saved):
                off = [0] * len(info["shape"])
                off[info["dim"]] = info["offsets"][r]
                pieces.append((r, refs[r].index, off,
                               readers.index(r)["tensors"][refs[r].index]["shape"]))
            return name, pieces, info["shape"], dtype, info
        if all(v.index == ref.index for v in refs.values()) and entry["blob"] in replicated:
            return name, whole, shape, dtype, None
        return (f"differs between the {saved} ranks that saved it and this job has {world}; "
                f"load() without into= returns it per saved rank")

    def on_tensor(path: tuple, t: torch.Tensor, nodes: dict[int, Any]) -> torch.Tensor:
        first = next(iter(nodes.values()))
        if not all(isinstance(v, _Ref) for v in nodes.values()):
            mismatched.append(f"{_dotted(path)} (a tensor in the target, {_kind(first)} in "
                              f"the checkpoint)")
            return t
        got = saved_tensor(nodes)
        if isinstance(got, str):
            mismatched.append(f"{_dotted(path)} ({got})")
            return t
        name, pieces, gshape, dtype, split = got
        tdtype = str(t.dtype).removeprefix("torch.")
        if tdtype != dtype:
            mismatched.append(f"{_dotted(path)} (dtype {tdtype} in the target, {dtype} in the "
                              f"checkpoint)")
            return t
        try:
            dst, box = target_region(t)
        except ValueError as exc:
            mismatched.append(f"{_dotted(path)} ({exc})")
            return t
        if list(t.shape) != list(gshape):
            cut = None
            if split is not None and dst is t:     # a split tensor's piece, cut for this world
                lo, hi = split_range(gshape[split["dim"]], world, rank)
                cut = list(gshape)
                cut[split["dim"]] = hi - lo
            if cut is None or list(t.shape) != cut:
                mismatched.append(f"{_dotted(path)} (shape {list(t.shape)} in the target, "
                                  f"{list(gshape)} in the checkpoint)")
                return t
            offsets = [0] * len(gshape)
            offsets[split["dim"]] = lo
            box = (tuple(offsets), tuple(cut))
        tasks.append((dst, box, pieces, name))
        return t

    def as_saved(nodes: dict[int, Any]) -> Any:
        if saved == world:
            return _Later(lambda: _replace_refs(nodes[rank], read_ref))
        first = nodes[0]
        if not _contains_ref(first) and all(_equal(first, v) for v in nodes.values()):
            return first
        return _Later(lambda: PerRank({r: _replace_refs(v, read_ref) for r, v in nodes.items()}))

    def walk(t: Any, nodes: dict[int, Any], path: tuple) -> Any:
        first = next(iter(nodes.values()))
        if isinstance(t, torch.Tensor):
            return on_tensor(path, t, nodes)
        if isinstance(t, Mapping):
            if not all(isinstance(v, Mapping) for v in nodes.values()):
                mismatched.append(f"{_dotted(path)} (a dict in the target, {_kind(first)} in "
                                  f"the checkpoint)")
                return t
            items = []
            for k, v in t.items():
                if all(k in n for n in nodes.values()):
                    items.append((k, walk(v, {r: n[k] for r, n in nodes.items()}, path + (k,))))
                else:
                    missing.append(_dotted(path + (k,)))
                    items.append((k, v))
            unexpected.extend(_dotted(path + (k,)) for k in first if k not in t)
            try:
                return type(t)(items)
            except TypeError:
                return dict(items)
        if isinstance(t, (list, tuple)):
            if not all(isinstance(v, (list, tuple)) and len(v) == len(t) for v in nodes.values()):
                mismatched.append(f"{_dotted(path)} ({_kind(t)} in the target, {_kind(first)} "
                                  f"in the checkpoint)")
                return t
            items = [walk(v, {r: n[i] for r, n in nodes.items()}, path + (i,))
                     for i, v in enumerate(t)]
            return items if type(t) is list else tuple(items) if type(t) is tuple else type(t)(*items)
        return as_saved(nodes)

    result = walk(target, trees, ())
    report = LoadReport(tuple(missing), tuple(unexpected), tuple(mismatched))
    if report and strict:
        raise StateMismatchError(f"step {step} does not match the load target: "
                                 f"{report.describe()}; pass strict=False to load what matches")
    if report:
        log.warning("load(into=): step %d: %s", step, report.describe())
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="trainkit-ckpt-fill") as pool:
        for f in [pool.submit(fill_region, dst, box, pieces, readers, name)
                  for dst, box, pieces, name in tasks]:
            f.result()
    return _resolve(result), report


def _resolve(node: Any) -> Any:
    if isinstance(node, _Later):
        return node.fn()
    if isinstance(node, torch.Tensor):
        return node
    if isinstance(node, Mapping):
        try:
            return type(node)((k, _resolve(v)) for k, v in node.items())
        except TypeError:
            return {k: _resolve(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v) for v in node]
    if isinstance(node, tuple) and type(node) is tuple:
        return tuple(_resolve(v) for v in node)
    return node
