"""Restore: which step, from which tier, at which world size.

``Checkpointer.load()`` is collective under torch.distributed, because ranks that resume
from different steps diverge silently. The protocol, through the coordination store:

1. each rank lists the steps it can load completely (its files present, by size) on
   any tier, with the tiers fastest first;
2. the ranks exchange the lists and take the newest step every rank can load;
3. each rank loads that step from its fastest tier, verifying every checksum, falling
   back tier by tier (each fallback logged with its reason);
4. the ranks exchange success; if any rank failed on every tier, all of them move on
   to the next older common step. So ranks never resume from different steps.

World size: a step saved by N ranks loads on M ranks. Each rank's fast path, M == N,
reads its own shard. Otherwise :func:`load_global` rebuilds one view of the state from
all N shards:

- a value identical on every saving rank (a replicated tensor by its blob digest, a
  plain value by equality) loads as itself, read once;
- a tensor split with ``save(..., sharded={name: dim})`` is reassembled along ``dim``
  and cut for the new world size as ``torch.tensor_split`` would (only the pieces that
  overlap the new rank's range are read);
- anything else differs per rank and loads as :class:`PerRank`, ``{saved rank: value}``,
  so the caller decides how to map it (e.g. RNG states, data positions).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainkit.checkpoint.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    PickleRefusedError,
    StateMismatchError,
)
from trainkit.checkpoint.format import codec
from trainkit.checkpoint.reader import (
    committed_steps,
    load_blobs,
    load_shard,
    rank_files_present,
    read_commit_record,
    read_rank_index,
    tensor_from_blob,
)
from trainkit.checkpoint.reshard import PieceReaders, full_tensor, load_own_full
from trainkit.checkpoint.tiers import Tier

__all__ = ["PerRank", "Candidate", "loadable_steps", "load_agreed", "load_global", "load_rank",
           "split_range"]

log = logging.getLogger(__name__)


class PerRank(dict):
    """A value that differed between the ranks that saved it: ``{saved rank: value}``.

    Returned by a load at another world size (or in one process) for per-rank entries,
    such as RNG states or data-loader positions, so the caller maps them explicitly."""

    def __repr__(self) -> str:
        return f"PerRank({dict.__repr__(self)})"


@dataclass(frozen=True)
class Candidate:
    """A tier that holds a complete copy of a step for this rank."""

    tier: Tier
    record: dict


def loadable_steps(tiers: Sequence[Tier], rank: int, world: int) -> dict[int, list[Candidate]]:
    """Steps this rank can load completely, each with its tiers fastest first."""
    out: dict[int, list[Candidate]] = {}
    for tier in tiers:
        try:
            steps = committed_steps(tier)
        except OSError as exc:
            log.warning("restore: cannot list the %s tier (%s): %s", tier.name, tier.url, exc)
            continue
        for step in steps:
            try:
                record = read_commit_record(tier, step)
            except (CheckpointError, OSError) as exc:
                log.warning("restore: step %d on the %s tier is unreadable: %s", step,
                            tier.name, exc)
                continue
            ranks = [rank] if record["world_size"] == world else range(record["world_size"])
            missing = next((m for m in (rank_files_present(tier, step, r, record) for r in ranks)
                            if m is not None), None)
            if missing is not None:
                log.info("restore: step %d is not complete on the %s tier for rank %d: %s",
                         step, tier.name, rank, missing)
                continue
            out.setdefault(step, []).append(Candidate(tier, record))
    return out


# ``load(step, into=target)``'s reader of one step from one tier: (tier, step, record) -> state
Loader = Callable[[Tier, int, dict], Any]


def _load_from(cand: Candidate, step: int, rank: int, world: int, threads: int,
               allow_pickle: bool, loader: Loader | None = None) -> Any:
    if loader is not None:
        return loader(cand.tier, step, cand.record)
    if cand.record["world_size"] == world and cand.record.get("dtensor"):
        return load_own_full(cand.tier, step, cand.record, rank, threads=threads)
    if cand.record["world_size"] == world:
        return load_shard(cand.tier, step, rank, threads=threads, record=cand.record,
                          allow_pickle=allow_pickle)
    return load_global(cand.tier, step, cand.record, rank=rank, world=world, threads=threads,
                       allow_pickle=allow_pickle)


# A rank's failure flag that means "pickled values refused": every rank then raises
# PickleRefusedError instead of falling back (an older step is no answer to consent).
_REFUSED = "pickle refused: "
# Likewise a target that does not match the step: every copy of the step has its keys.
_MISMATCH = "state mismatch: "
_FINAL = ((_REFUSED, PickleRefusedError), (_MISMATCH, StateMismatchError))


def _flag(problem: BaseException | None) -> str:
    if problem is None:
        return ""
    for prefix, cls in _FINAL:
        if isinstance(problem, cls):
            return f"{prefix}{problem}"
    return str(problem)


def _raise_if_refused(flags: list[str], problem: BaseException | None) -> None:
    if isinstance(problem, (PickleRefusedError, StateMismatchError)):
        raise problem
    for prefix, cls in _FINAL:
        refused = [f for f in flags if f.startswith(prefix)]
        if refused:
            raise cls(refused[0][len(prefix):])


def _try_step(cands: list[Candidate], step: int, rank: int, world: int,
              threads: int, allow_pickle: bool = False, loader: Loader | None = None
              ) -> tuple[Any, BaseException | None, str | None]:
    """Load ``step`` from the fastest tier that works: (value, None, tier), or (None, the
    last failure, None) with every failure logged. A pickle refusal ends the search at
    once."""
    last: BaseException | None = None
    for i, cand in enumerate(cands):
        try:
            value = _load_from(cand, step, rank, world, threads, allow_pickle, loader)
            if i:
                log.warning("restore: step %d loaded from the %s tier after falling back",
                            step, cand.tier.name)
            return value, None, cand.tier.name
        except (PickleRefusedError, StateMismatchError) as exc:
            return None, exc, None
        except (CheckpointError, OSError) as exc:
            nxt = cands[i + 1].tier.name if i + 1 < len(cands) else None
            log.warning("restore: step %d on the %s tier failed: %s; %s", step,
                        cand.tier.name, exc,
                        f"falling back to the {nxt} tier" if nxt else "no other tier has it")
            last = exc
    return None, last or CheckpointNotFoundError(f"step {step}: no tier holds it"), None


def _committed_anywhere(tiers: Sequence[Tier], step: int) -> list[Candidate]:
    out = []
    for tier in tiers:
        try:
            out.append(Candidate(tier, read_commit_record(tier, step)))
        except (CheckpointError, OSError):
            continue
    return out


def load_agreed(tiers: Sequence[Tier], allgather: Callable[[str, str], list[str]], key: str, *,
                rank: int, world: int, step: int | None, threads: int,
                allow_pickle: bool = False, before: int | None = None,
                loader: Loader | None = None) -> tuple[int, Any, str]:
    """The collective load (module docstring): (step, state, tier loaded from), every rank.

    With an explicit ``step`` there is nothing to agree on: every rank loads it from its
    fastest working tier, and a rank that cannot raises its own precise error (the
    others name it). ``before``: agree only on steps older than it (a step that keeps
    failing after its restore is left behind)."""
    if step is not None:
        cands = _committed_anywhere(tiers, step)
        if not cands:
            read_commit_record(tiers[-1], step)       # raises the detailed "not committed"
        value, problem, tier = _try_step(cands, step, rank, world, threads, allow_pickle,
                                         loader)
        flags = allgather(f"{key}/explicit", _flag(problem))
        _raise_if_refused(flags, problem)
        if problem is not None:
            raise problem
        failed = {r: f for r, f in enumerate(flags) if f}
        if failed:
            raise CheckpointError(f"step {step} could not be loaded by ranks {sorted(failed)}: "
                                  + "; ".join(f"rank {r}: {f}" for r, f in failed.items()))
        assert tier is not None
        return step, value, tier
    mine = loadable_steps(tiers, rank, world)
    if before is not None:
        mine = {s: v for s, v in mine.items() if s < before}
    lists = [json.loads(v) for v in allgather(f"{key}/steps", json.dumps(sorted(mine)))]
    order = sorted(set(lists[0]).intersection(*map(set, lists[1:])), reverse=True)
    if not order:
        every = sorted(set().union(*map(set, lists)))
        where = ", ".join(f"{t.name} {t.url}" for t in tiers)
        if not every:
            raise CheckpointNotFoundError(f"no committed checkpoint in {where}; committed "
                                          f"steps: none")
        raise CheckpointNotFoundError(
            f"no checkpoint step that every rank can load (tiers: {where}); steps some rank "
            f"can load: {every}")
    last: BaseException | None = None
    for attempt, s in enumerate(order):
        value, problem, tier = _try_step(mine[s], s, rank, world, threads, allow_pickle,
                                         loader)
        flags = allgather(f"{key}/try{attempt}", _flag(problem))
        _raise_if_refused(flags, problem)
        failed = {r: f for r, f in enumerate(flags) if f}
        if not failed:
            assert tier is not None
            return s, value, tier
        last = problem or last
        nxt = order[attempt + 1] if attempt + 1 < len(order) else None
        log.warning("restore: step %d failed on ranks %s (%s); %s", s, sorted(failed),
                    "; ".join(f"rank {r}: {f}" for r, f in failed.items()),
                    f"falling back to step {nxt}" if nxt is not None else "no older step left")
    raise CheckpointError(f"no checkpoint step could be loaded by every rank; tried {order}; "
                          f"last failure here: {last}") from last


def load_rank(tiers: Sequence[Tier], step: int, rank: int, *, threads: int = 4,
              allow_pickle: bool = False) -> tuple[Any, str]:
    """One saved rank's shard of ``step`` as it was written (not collective), from the
    fastest tier that has it intact; returns it with the tier's name."""
    problems = []
    for tier in tiers:
        try:
            record = read_commit_record(tier, step)
            return load_shard(tier, step, rank, threads=threads, record=record,
                              allow_pickle=allow_pickle), tier.name
        except PickleRefusedError:
            raise
        except (CheckpointError, OSError) as exc:
            problems.append(f"{tier.name}: {exc}")
            log.warning("restore: step %d, rank %d from the %s tier failed: %s", step, rank,
                        tier.name, exc)
    raise CheckpointNotFoundError(f"step {step}, rank {rank} cannot be loaded from any tier: "
                                  + "; ".join(problems))


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """The [start, end) of piece ``index`` when ``total`` is cut like torch.tensor_split."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class _Ref:
    rank: int
    index: int


def _equal(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable values differ
        return False


def load_global(tier: Tier, step: int, record: dict, *, rank: int, world: int,
                threads: int = 4, allow_pickle: bool = False,
                select: Callable[[Any], Any] | None = None) -> Any:
    """The state of ``step`` (saved by N ranks) as seen by ``rank`` of ``world`` ranks.

    ``select(tree)`` prunes each saved rank's decoded tree (the same way on every rank)
    before anything is read: only the blobs it keeps are loaded."""
    nsaved = record["world_size"]
    indexes = [read_rank_index(tier, step, r, record) for r in range(nsaved)]
    replicated = set(record.get("replicated", []))
    sharded = record.get("sharded", {})

    def pickled(r: int, i: int) -> Any:
        """A DCP-pickled value of saved rank ``r``: refused, or read and unpickled now."""
        entry = indexes[r]["tensors"][i]
        if not allow_pickle:
            raise PickleRefusedError(
                f"step {step}, rank {r}: {entry['name']!r} is a pickled value (a non-tensor "
                f"item saved through torch.distributed.checkpoint); loading it runs code "
                f"from the checkpoint, so pass allow_pickle=True if you trust {tier.url}")
        blob = load_blobs(tier, step, r, record, indexes[r], threads=1,
                          only={entry["blob"]})[entry["blob"]]
        raw = tensor_from_blob(entry, blob).numpy().tobytes()
        return torch.load(io.BytesIO(raw), weights_only=False)

    trees = [codec.decode(ix["tree"], lambda i, r=r: _Ref(r, i),
                          lambda i, r=r: pickled(r, i))
             for r, ix in enumerate(indexes)]
    if select is not None:
        trees = [select(t) for t in trees]

    need: list[set[int]] = [set() for _ in range(nsaved)]     # blobs to read, per rank

    def reshard_ranges(name: str) -> list[tuple[int, int, int]]:
        info = sharded[name]
        total = info["shape"][info["dim"]]
        lo, hi = split_range(total, world, rank)
        pieces = []
        for r, off in enumerate(info["offsets"]):
            size = (info["offsets"][r + 1] if r + 1 < nsaved else total) - off
            a, b = max(lo, off), min(hi, off + size)
            if a < b:
                pieces.append((r, a - off, b - a))
        return pieces

    def merge(values: list[Any]) -> Any:
        first = values[0]
        if all(isinstance(v, _Ref) for v in values):
            entry = indexes[0]["tensors"][first.index]
            name = entry["name"]
            if "dtensor" in entry:          # whole, from the pieces it overlaps
                return ("dtensor", name)
            # the record keys split tensors by their index name ("model/emb.weight")
            key = name if name in sharded else name.replace("/", ".")
            if key in sharded:
                pieces = reshard_ranges(key)
                for r, _, _ in pieces:
                    need[r].add(indexes[r]["tensors"][values[r].index]["blob"])
                return ("shard", key, [(values[r], a, n) for r, a, n in pieces], entry)
            same = all(v.index == first.index for v in values)
            if same and entry["blob"] in replicated:
                need[0].add(entry["blob"])
                return ("tensor", first)
            for v in values:
                need[v.rank].add(indexes[v.rank]["tensors"][v.index]["blob"])
            return ("per_rank", values)
        if isinstance(first, dict) and all(isinstance(v, dict) and v.keys() == first.keys()
                                           for v in values):
            return ("dict", type(first), {k: merge([v[k] for v in values]) for k in first})
        if isinstance(first, (list, tuple)) and all(
                type(v) is type(first) and len(v) == len(first) for v in values):
            return ("seq", type(first), [merge([v[i] for v in values]) for i in range(len(first))])
        if not any(_contains_ref(v) for v in values) and all(_equal(first, v) for v in values):
            return ("value", first)
        for v in values:
            _collect_refs(v, lambda ref: need[ref.rank].add(
                indexes[ref.rank]["tensors"][ref.index]["blob"]))
        return ("per_rank_tree", values)

    shape = merge(trees)
    piece_readers = PieceReaders(tier, step, record, indexes=dict(enumerate(indexes)))
    storages = {r: load_blobs(tier, step, r, record, indexes[r], threads=threads, only=need[r])
                for r in range(nsaved) if need[r]}

    def tensor(ref: _Ref) -> torch.Tensor:
        entry = indexes[ref.rank]["tensors"][ref.index]
        return tensor_from_blob(entry, storages[ref.rank][entry["blob"]])

    def build(node: tuple) -> Any:
        kind = node[0]
        if kind == "tensor":
            return tensor(node[1])
        if kind == "dtensor":
            return full_tensor(node[1], piece_readers)
        if kind == "shard":
            _, key, pieces, entry = node
            dim = sharded[key]["dim"]
            parts = [tensor(ref).narrow(dim, a, n) for ref, a, n in pieces]
            if not parts:           # more ranks than rows: this rank's piece is empty
                empty = list(sharded[key]["shape"])
                empty[dim] = 0
                return torch.empty(empty, dtype=getattr(torch, entry["dtype"]))
            return torch.cat(parts, dim) if len(parts) > 1 else parts[0].clone()
        if kind == "per_rank":
            return PerRank({ref.rank: tensor(ref) for ref in node[1]})
        if kind == "dict":
            return node[1]((k, build(v)) for k, v in node[2].items())
        if kind == "seq":
            items = [build(v) for v in node[2]]
            return node[1](items) if node[1] in (list, tuple) else node[1](*items)
        if kind == "value":
            return node[1]
        if kind == "per_rank_tree":
            return PerRank({r: _replace_refs(v, tensor) for r, v in enumerate(node[1])})
        raise AssertionError(kind)

    return build(shape)


def _contains_ref(v: Any) -> bool:
    found = []
    _collect_refs(v, found.append)
    return bool(found)


def _collect_refs(v: Any, fn: Callable[[_Ref], None]) -> None:
    if isinstance(v, _Ref):
        fn(v)
    elif isinstance(v, dict):
        for x in v.values():
            _collect_refs(x, fn)
    elif isinstance(v, (list, tuple, set, frozenset)):
        for x in v:
            _collect_refs(x, fn)


def _replace_refs(v: Any, tensor: Callable[[_Ref], torch.Tensor]) -> Any:
    if isinstance(v, _Ref):
        return tensor(v)
    if isinstance(v, dict):
        return type(v)((k, _replace_refs(x, tensor)) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        items = [_replace_refs(x, tensor) for x in v]
        return items if isinstance(v, list) else type(v)(items)
    return v
