"""``torch.distributed.checkpoint`` storage in trainkit's format: ZarrWriter / ZarrReader.

DCP users keep their loop and get trainkit's layout, checksums and CLI::

    import torch.distributed.checkpoint as dcp
    from trainkit.checkpoint import ZarrWriter, ZarrReader

    dcp.save(state, storage_writer=ZarrWriter("runs/exp1/ckpt", step=100))
    dcp.load(state, storage_reader=ZarrReader("runs/exp1/ckpt", step=100))

``path`` is a trainkit checkpoint directory (or URL) holding many steps; ``step`` picks
the step group. ``ZarrWriter(path)`` without ``step`` takes the step after the newest
step directory present (0 in an empty directory), chosen once by the coordinator rank
and sent to every rank inside the global plan; ``ZarrReader(path)`` without ``step``
reads the newest committed step. Steps are never overwritten.

Call order (DCP's, per save): every rank ``set_up_storage_writer`` ->
``prepare_local_plan``; the coordinator ``prepare_global_plan`` (chooses the step, gives
each rank its number); every rank ``write_data`` (streams its items into its own rank
group, fsyncs it, and reports its manifest in its first ``WriteResult``); the coordinator
``finish`` (writes the rank groups of ranks that had nothing to write, the JSON form of
DCP's ``Metadata``, then publishes the commit record, last and atomically). A save that
fails anywhere leaves the step uncommitted, which every reader ignores.

Non-tensor values are serialised by DCP itself with ``torch.save``; they are stored as
opaque blobs marked ``pickled``. ``ZarrReader`` and trainkit's own ``Checkpointer.load``
both refuse them (``PickleRefusedError`` naming the key) unless ``allow_pickle=True``:
then ``ZarrReader`` hands them back to DCP's planner, which unpickles them as it does
for its own format. Pass it only for checkpoints you trust.
"""

from __future__ import annotations

import io
import os
import uuid
from collections import deque
from concurrent.futures import Future as ConcurrentFuture
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from trainkit.checkpoint.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    PickleRefusedError,
)
from trainkit.checkpoint.format.dcp_metadata import Location, encode_metadata
from trainkit.checkpoint.format.layout import COMMIT_FILE, DEFAULT_CHUNK_BYTES, step_dirname
from trainkit.checkpoint.interop.dcp_step import (
    commit_dcp_step,
    dcp_key_path,
    dcp_version,
    next_free_step,
    read_step_metadata,
    state_tree,
)
from trainkit.checkpoint.interop.shard_stream import ShardBlobReader, StreamItem, write_stream_shard
from trainkit.checkpoint.reader import committed_steps, read_commit_record
from trainkit.checkpoint.tiers import Tier, open_tier

__all__ = ["ZarrWriter", "ZarrReader"]



@dataclass(frozen=True)
class _RankPlan:
    """What the coordinator tells each rank in ``SavePlan.storage_data``."""

    step: int
    rank: int
    world_size: int


@dataclass(frozen=True)
class _Stored:
    """``WriteResult.storage_data``: where the item went; the rank's first result also
    carries the rank's manifest to the coordinator (DCP gathers results for ``finish``)."""

    rank: int
    entry: int
    manifest: dict | None = None
    step: int | None = None


class ZarrWriter(StorageWriter):
    """DCP ``StorageWriter`` that writes a trainkit step group (see the module docstring).

    Args:
        path: trainkit checkpoint directory or URL (``checkpoint_id=`` overrides it).
        step: the step to write; None: the step after the newest one present.
        chunk_bytes: target chunk file size; memory per rank stays near a few chunks.
        io_threads: threads checksumming and writing chunks.
    """

    def __init__(self, path: str | os.PathLike, step: int | None = None, *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, io_threads: int = 2) -> None:
        super().__init__()
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise TypeError(f"step must be a non-negative int or None, got {step!r}")
        self.path = os.fspath(path)
        self.step = step
        self.chunk_bytes = int(chunk_bytes)
        self.io_threads = int(io_threads)
        self.last_step: int | None = None   # the step the last save wrote (every rank)
        self._save_id = uuid.uuid4().hex
        self._rank = 0
        self._plan_step: int | None = None
        self._own_step: int | None = None   # this rank's view of the step, per save

    @property
    def checkpoint_id(self) -> str:
        return self.path

    def _tier(self) -> Tier:
        return open_tier(self.path)

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self._save_id = uuid.uuid4().hex
        self._plan_step = None
        self._own_step = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        """Any path or URL; a directory holding DCP's own ``.metadata`` is not ours."""
        if not isinstance(checkpoint_id, (str, os.PathLike)):
            return False
        return not os.path.exists(os.path.join(os.fspath(checkpoint_id), ".metadata"))

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path, save_id=self._save_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._rank = int(kwargs.get("rank") or 0)
        self._plan_step = None
        # This rank's own view of the step of this save. Every rank runs this before the
        # first collective of the save, so no rank has written anything of it yet and
        # all ranks of a shared directory see the same step directories. It is used
        # when DCP's plan caching hands back a finished plan of an earlier save.
        self._own_step = self.step if self.step is not None else next_free_step(self._tier())
        if kwargs.get("use_collectives", True) is False:
            raise CheckpointError("ZarrWriter needs dcp.save(..., use_collectives=True): one "
                                  "commit record covers every rank's shard")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Coordinator: choose the step (refusing a committed one) and number the ranks."""
        tier = self._tier()
        step = self.step if self.step is not None else next_free_step(tier)
        if tier.size(f"{step_dirname(step)}/{COMMIT_FILE}") is not None:
            raise CheckpointError(f"step {step} is already committed in {tier.url}; "
                                  f"checkpoints are never overwritten (pass another step=)")
        self._plan_step = step
        return [replace(p, storage_data=_RankPlan(step, i, len(plans)))
                for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Every rank: stream this rank's items into its rank group, durably."""
        sd = plan.storage_data
        if not isinstance(sd, _RankPlan):
            raise CheckpointError("ZarrWriter got a plan without its step assignment: the "
                                  "plan did not come through ZarrWriter.prepare_global_plan")
        tier = self._tier()
        step = self._current_step(tier, sd)
        self.last_step = step
        results: list[WriteResult] = []
        if plan.items:
            mappings = plan.planner_data if isinstance(plan.planner_data, dict) else {}
            items, tree = _stream_items(plan.items, planner, mappings)
            manifest, _ = write_stream_shard(tier, step, sd.rank, sd.world_size, items, tree,
                                             chunk_bytes=self.chunk_bytes,
                                             io_threads=self.io_threads)
            for i, (wi, item) in enumerate(zip(plan.items, items)):
                results.append(WriteResult(
                    index=wi.index, size_in_bytes=item.nbytes,
                    storage_data=_Stored(sd.rank, i, manifest if i == 0 else None, step)))
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _current_step(self, tier: Tier, sd: _RankPlan) -> int:
        """The step this save writes, never a committed one.

        The plan names the step the coordinator chose, except when DCP's plan caching
        (``enable_plan_caching``) reuses the finished plan of an earlier save: that plan
        still names the earlier step, which is committed by now. The write then goes to
        the step this rank saw at ``set_up_storage_writer``; ``finish`` checks that every
        rank wrote the step the coordinator chose before committing anything.
        """
        step = self._plan_step if self._plan_step is not None else sd.step
        if tier.size(f"{step_dirname(step)}/{COMMIT_FILE}") is not None:
            step = self._own_step if self._own_step is not None else step
        if tier.size(f"{step_dirname(step)}/{COMMIT_FILE}") is not None:
            raise CheckpointError(f"refusing to write into committed step {step} of "
                                  f"{tier.url}: checkpoints are never overwritten")
        return step

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator: fill in empty ranks, store DCP's metadata as JSON, commit."""
        tier = self._tier()
        step = self._plan_step if self._plan_step is not None else self.last_step
        if step is None:
            raise CheckpointError("ZarrWriter.finish before prepare_global_plan")
        manifests: list[dict] = []
        locations: dict[MetadataIndex, Location] = {}
        for rank, rank_results in enumerate(results):
            manifest = next((r.storage_data.manifest for r in rank_results
                             if r.storage_data.manifest is not None), None)
            if manifest is None:     # nothing to write on that rank: an empty group
                manifest, _ = write_stream_shard(tier, step, rank, len(results), [], {})
            manifests.append(manifest)
            for r in rank_results:
                wrote = getattr(r.storage_data, "step", None)
                if wrote is not None and wrote != step:
                    raise CheckpointError(
                        f"rank {rank} wrote step {wrote} of {tier.url} while the save is step "
                        f"{step}; nothing was committed (pass ZarrWriter(step=...) explicitly "
                        f"if the ranks see different directories)")
                locations[r.index] = (r.storage_data.rank, r.storage_data.entry)
        metadata.version = dcp_version()
        metadata.storage_meta = self.storage_meta()
        commit_dcp_step(tier, step, manifests, encode_metadata(metadata, locations))
        self.last_step = step


def _stream_items(write_items: list[WriteItem], planner: SavePlanner,
                  mappings: dict) -> tuple[list[StreamItem], Any]:
    """The rank's items in plan order and its state tree. Non-tensor items are resolved
    (``torch.save``-d by the planner) now, since their size is only known then; tensors
    are resolved lazily, one at a time, while their chunks are filled."""
    items: list[StreamItem] = []
    leaves: list[tuple[tuple, bool]] = []
    for wi in write_items:
        fqn = wi.index.fqn
        path, name = dcp_key_path(fqn, mappings)
        if wi.type == WriteItemType.BYTE_IO:
            raw = planner.resolve_data(wi).getvalue()
            items.append(StreamItem(name, torch.uint8, (len(raw),), lambda raw=raw: raw,
                                    pickled=True, extra={"fqn": fqn}))
        else:
            td = wi.tensor_data
            extra: dict = {"fqn": fqn}
            if wi.type == WriteItemType.SHARD or list(td.chunk.sizes) != list(td.size):
                extra.update(offsets=list(td.chunk.offsets), global_shape=list(td.size))
            items.append(StreamItem(name, td.properties.dtype, tuple(td.chunk.sizes),
                                    lambda wi=wi: planner.resolve_data(wi), extra=extra))
        leaves.append((path, wi.type == WriteItemType.BYTE_IO))
    return items, state_tree(leaves)


class ZarrReader(StorageReader):
    """DCP ``StorageReader`` for steps written by :class:`ZarrWriter` (or imported with
    ``trainkit ckpt import-dcp``): every byte is checked against its CRC as it is read,
    and only the blobs a rank's load plan needs are read.

    Args:
        path: trainkit checkpoint directory or URL (``checkpoint_id=`` overrides it).
        step: the step to read; None: the newest committed step when the load starts.
        allow_pickle: hand pickled non-tensor items (and DCP's pickled planner data)
            to DCP, which unpickles them, as it does for its own format: unpickling runs
            code from the checkpoint, so only for checkpoints you trust. False (the
            default) refuses them with ``PickleRefusedError``, naming the key.
        read_threads: threads reading and checking blobs ahead of the copies.
    """

    def __init__(self, path: str | os.PathLike, step: int | None = None, *,
                 allow_pickle: bool = False, read_threads: int = 4) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.step = step
        self.allow_pickle = allow_pickle
        self.read_threads = max(1, int(read_threads))
        self._load_id = uuid.uuid4().hex
        self._read_step: int | None = None
        self._record: dict | None = None
        self._locations: dict[MetadataIndex, Location] = {}

    @property
    def checkpoint_id(self) -> str:
        return self.path

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self._load_id = uuid.uuid4().hex
        self._read_step = None
        self._record = None
        self._locations = {}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError("trainkit steps have one global DCP metadata, not per rank")
        tier = open_tier(self.path)
        step = self.step
        if step is None:
            steps = committed_steps(tier)
            if not steps:
                raise CheckpointNotFoundError(f"no committed checkpoint in {tier.url}")
            step = steps[-1]
        record = read_commit_record(tier, step)
        md = read_step_metadata(tier, step, record, allow_pickle=self.allow_pickle)
        if md.storage_meta is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self._load_id
        self._read_step, self._record = step, record
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        if not isinstance(metadata.storage_data, dict):
            raise CheckpointError("ZarrReader got DCP metadata without trainkit locations")
        self._locations = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return replace(plan, storage_data=self._read_step)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Coordinator: every rank must be reading the same step (``step=None`` resolves
        on each rank; a save committing in between would otherwise split them)."""
        steps = {p.storage_data for p in plans}
        if len(steps) > 1:
            raise CheckpointError(f"ranks resolved different steps to load: {sorted(steps)}; "
                                  f"pass ZarrReader(path, step=N)")
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read the planned items, verified, into the planner's tensors. Blobs are read in
        storage order by ``read_threads`` threads (positioned reads and CRCs release the
        GIL), at most ``2 * read_threads`` ahead of the copies, so memory stays bounded."""
        if self._record is None or self._read_step is None:
            raise CheckpointError("ZarrReader.read_data before read_metadata")
        tier = open_tier(self.path)
        order = sorted(plan.items, key=lambda r: self._locations[r.storage_index])
        if not self.allow_pickle:
            for req in order:
                if req.type == LoadItemType.BYTE_IO:
                    raise PickleRefusedError(
                        f"{req.dest_index.fqn!r} is a pickled value (torch.save by DCP); "
                        f"loading it runs code from the checkpoint; use "
                        f"ZarrReader(..., allow_pickle=True) if you trust {tier.url}")
        locs = list(dict.fromkeys(self._locations[r.storage_index] for r in order))
        readers = {rank: ShardBlobReader(tier, self._read_step, rank, self._record)
                   for rank in sorted({rank for rank, _ in locs})}
        ahead: deque[tuple[Location, ConcurrentFuture]] = deque()
        with ThreadPoolExecutor(self.read_threads,
                                thread_name_prefix="trainkit-dcp-read") as pool:
            todo = iter(locs)

            def refill() -> None:
                while len(ahead) < 2 * self.read_threads:
                    loc = next(todo, None)
                    if loc is None:
                        return
                    ahead.append((loc, pool.submit(readers[loc[0]].tensor, loc[1])))

            current: tuple[Location, torch.Tensor] | None = None
            try:
                for req in order:
                    loc = self._locations[req.storage_index]
                    if current is None or current[0] != loc:
                        refill()
                        got, fut = ahead.popleft()
                        assert got == loc
                        current = (loc, fut.result())
                    if req.type == LoadItemType.BYTE_IO:
                        planner.load_bytes(req, io.BytesIO(current[1].numpy().tobytes()))
                        continue
                    src = current[1]
                    for dim, (off, length) in enumerate(zip(req.storage_offsets, req.lengths)):
                        src = src.narrow(dim, off, length)
                    target = planner.resolve_tensor(req).detach()
                    if target.size() != src.size():
                        raise CheckpointError(f"{req.dest_index.fqn}: the checkpoint holds "
                                              f"{list(src.size())} for this read, the target "
                                              f"is {list(target.size())}")
                    target.copy_(src)
                    planner.commit_tensor(req, target)
            finally:
                for _, fut in ahead:
                    fut.cancel()
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut
