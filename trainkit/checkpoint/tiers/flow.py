"""The multi-level flow: which tiers a checkpointer has, and moving steps down them.

After SCR/VeloC and DataStates-LLM: ``save()`` writes each rank's shard to the fastest
tier only (host memory in ``/dev/shm`` when ``keep_in_memory`` > 0, else node-local
disk, else persistent), so the host buffer is free again as soon as that copy is in.
Once the step is committed there, a flusher thread copies it down to the slower tiers
(node-local disk, then every ``persist_every``-th save to persistent storage), each copy
verified chunk by chunk and committed on its tier only when every rank's copy is
durable there. Then retention runs (:mod:`~trainkit.checkpoint.tiers.retention`).

Who deletes: the persistent tier is shared, so rank 0 garbage-collects it; a node-local
tier is garbage-collected by the lowest rank that uses the same directory on the same
host (found once, through the store, when the checkpointer starts).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor

from trainkit import rundir
from trainkit.checkpoint.coord import Coordinator
from trainkit.checkpoint.errors import CheckpointError, CheckpointWriteError
from trainkit.checkpoint.reader import committed_steps
from trainkit.checkpoint.tiers import TIERS, Tier, open_tier
from trainkit.checkpoint.tiers.flush import copy_rank, record_for
from trainkit.checkpoint.tiers.keeper import (
    drop_lease,
    ensure_keeper,
    memory_dir_for,
    secure_memory_dir,
    take_lease,
)
from trainkit.checkpoint.tiers.retention import apply_gc, plan_gc, set_aside, tier_state

__all__ = ["TierConfig", "TierFlow"]

log = logging.getLogger(__name__)


class TierConfig:
    """The user's tier and retention settings, validated."""

    def __init__(self, *, local_dir: str | os.PathLike | None, keep_in_memory: int,
                 keep_local: int | None, keep_persistent: int | None, persist_every: int,
                 keep_every: int | None, memory_dir: str | os.PathLike | None,
                 keeper_ttl: float) -> None:
        def count(name: str, value: int | None, low: int, allow_none: bool) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}"
                                 f"{' or None' if allow_none else ''}, got {value!r}")

        count("keep_in_memory", keep_in_memory, 0, False)
        count("keep_local", keep_local, 1, True)
        count("keep_persistent", keep_persistent, 1, True)
        count("persist_every", persist_every, 1, False)
        count("keep_every", keep_every, 1, True)
        self.local_dir = None if local_dir is None else os.path.abspath(os.fspath(local_dir))
        self.keep_in_memory = keep_in_memory
        self.keep = {"memory": keep_in_memory, "local": keep_local,
                     "persistent": keep_persistent}
        self.persist_every = persist_every
        self.keep_every = keep_every
        self.memory_dir = None if memory_dir is None else os.fspath(memory_dir)
        self.keeper_ttl = float(keeper_ttl)


class TierFlow:
    """The tiers of one Checkpointer, fastest first, and the flusher that fills them."""

    def __init__(self, persistent_url: str, config: TierConfig, coord: Coordinator, io: Executor,
                 *, storage_options: dict | None = None) -> None:
        self.config = config
        self._coord = coord
        self._io = io
        self.persistent = open_tier(persistent_url, name="persistent", shared=True,
                                    **({"storage_options": storage_options}
                                       if storage_options else {}))
        self.tiers: list[Tier] = []
        self._lease: str | None = None
        if config.keep_in_memory > 0:
            mem_dir = config.memory_dir
            if mem_dir is None:
                mem_dir, owned = memory_dir_for(persistent_url)
                secure_memory_dir(mem_dir)      # before anything is written into it
                if not owned:
                    ensure_keeper(mem_dir, ttl=config.keeper_ttl)
                self._lease = take_lease(mem_dir)
            self.tiers.append(TIERS["memory"](mem_dir, name="memory", shared=False))
        if config.local_dir is not None:
            self.tiers.append(TIERS["local"](config.local_dir, name="local", shared=False))
        self.tiers.append(self.persistent)
        self.first = self.tiers[0]
        self._gc_tiers = self._elect_collectors()
        self._flusher = ThreadPoolExecutor(1, thread_name_prefix="trainkit-ckpt-flush")
        self._pending: list[Future] = []
        self._errors: list[BaseException] = []
        self._unseen_errors: list[BaseException] = []
        self._inflight: set[int] = set()
        self._persisted: set[int] = set()
        self._saved: set[int] = set()       # committed by this job since its last resume
        self._last: tuple[int, int, dict, bool] | None = None
        self._lock = threading.Lock()

    def _elect_collectors(self) -> list[Tier]:
        """The tiers this rank garbage-collects (see the module docstring)."""
        me = {t.name: f"{socket.gethostname()}|{getattr(t, 'root', t.url)}"
              for t in self.tiers if not t.shared}
        everyone = [json.loads(v) for v in self._coord.allgather("tiers", json.dumps(me))]
        mine = []
        for t in self.tiers:
            if t.shared:
                if self._coord.rank == 0:
                    mine.append(t)
                continue
            leader = min(r for r, other in enumerate(everyone) if other.get(t.name) == me[t.name])
            if leader == self._coord.rank:
                mine.append(t)
        return mine

    # -- queries ------------------------------------------------------------------------
    def tiers_of(self, step: int) -> list[str]:
        """The tiers (fastest first) on which ``step`` is committed, as this rank sees."""
        out = []
        for t in self.tiers:
            try:
                if step in committed_steps(t):
                    out.append(t.name)
            except OSError:
                continue
        return out

    def committed(self) -> list[int]:
        """Steps committed on any tier, oldest first."""
        steps: set[int] = set()
        for t in self.tiers:
            try:
                steps.update(committed_steps(t))
            except OSError as exc:
                log.warning("cannot list the %s tier (%s): %s", t.name, t.url, exc)
        return sorted(steps)

    # -- the flow -----------------------------------------------------------------------
    def publish_first(self, step: int, doc: dict, *, finalizer: bool) -> None:
        """Publish a first-tier commit record: rank 0 (``finalizer``) for a shared tier,
        every rank for a node-local one (each node keeps its own record)."""
        if finalizer or not self.first.shared:
            self.first.publish(step, doc)

    def after_commit(self, step: int, seq: int, doc: dict, *, dedupe: bool) -> None:
        """Queue the copies of a step just committed on the first tier."""
        self._saved.add(step)
        if len(self.tiers) == 1:
            self._persisted.add(step)
        targets = self.tiers[1:]
        if self.persistent in targets and seq % self.config.persist_every != 0:
            targets = [t for t in targets if t is not self.persistent]
        with self._lock:
            self._inflight.add(step)
            self._last = (step, seq, doc, dedupe)
        self._submit(step, seq, doc, targets, dedupe)

    def _submit(self, step: int, seq: int, doc: dict, targets: list[Tier], dedupe: bool) -> None:
        fut = self._flusher.submit(self._flush, step, seq, doc, targets, dedupe)
        with self._lock:
            self._pending.append(fut)

    def _flush(self, step: int, seq: int, doc: dict, targets: list[Tier], dedupe: bool) -> None:
        record = doc["attributes"]["trainkit"]
        try:
            for dst in targets:
                self._copy(step, seq, record, dst, dedupe)
                if dst is self.persistent:
                    self._persisted.add(step)
        except BaseException as exc:  # noqa: BLE001 - reported by wait()/close()
            log.error("checkpoint step %d: %s", step, exc)
            with self._lock:
                self._errors.append(exc)
                self._unseen_errors.append(exc)
        finally:
            with self._lock:
                self._inflight.discard(step)
                protect = frozenset(self._inflight)
            self._gc_later(protect)

    def _copy(self, step: int, seq: int, record: dict, dst: Tier, dedupe: bool) -> None:
        tag = f"{dst.name}/{seq}"
        manifest, error = None, None
        self._coord.begin(tag)
        try:
            manifest = copy_rank(self.first, dst, step, self._coord.rank, record, self._io,
                                 dedupe=dedupe and dst.shared)
        except (CheckpointError, OSError) as exc:
            error = exc

        def finalize(manifests: list[dict]) -> dict:
            new = {"zarr_format": 3, "node_type": "group",
                   "attributes": {"trainkit": record_for(record, manifests, dst.name)}}
            dst.publish(step, new)
            return new

        new_doc = self._coord.commit(tag, step, manifest, None if error is None else str(error),
                                     finalize)
        if not dst.shared and self._coord.rank != 0:
            dst.publish(step, new_doc)
        log.debug("step %d committed on the %s tier", step, dst.name)
        if self._coord.rank == 0:     # trainkit run's goodput: each tier's latency
            rundir.report("ckpt_commit", step=step, tier=dst.name)

    def _gc_later(self, protect: frozenset[int]) -> None:
        for tier in self._gc_tiers:
            keep = self.config.keep[tier.name]
            try:
                committed, uncommitted = tier_state(tier)
                plan = plan_gc(tier.name, committed, uncommitted, keep=keep,
                               keep_every=self.config.keep_every if tier is self.persistent
                               else None, protect=protect)
                apply_gc(tier, plan)
            except OSError as exc:
                log.warning("gc on the %s tier (%s) failed: %s; will retry after the next "
                            "save", tier.name, tier.url, exc)

    def abandon_newer(self, step: int) -> list[tuple[str, int]]:
        """After a resume from ``step``: steps newer than it, committed on tiers this rank
        collects, could not be loaded by some rank, so the job saves those steps again.

        No commit record is deleted because a load failed: the copy may be repairable,
        or only this tier's copy damaged. A newer step this checkpointer itself saved
        after its last resume (a timeline the job has just left) is uncommitted; any
        other is set aside whole (``step_N.corrupt`` on a POSIX tier; on an object store
        its record is kept as ``zarr.json.corrupt``), logged, for ``ckpt gc --force`` or
        a person to decide on. Returns the (tier, step) pairs moved out of the way."""
        gone = []
        for tier in self._gc_tiers:
            try:
                newer = [s for s in committed_steps(tier) if s > step]
            except OSError:
                continue
            for s in newer:
                if s in self._saved:
                    log.warning("step %d on the %s tier (%s), saved by this job, is newer than "
                                "step %d, which every rank could load; uncommitting it: the "
                                "job resumes from step %d", s, tier.name, tier.url, step, step)
                    tier.unpublish(s)
                else:
                    try:
                        where = set_aside(tier, s)
                    except OSError as exc:
                        log.error("step %d on the %s tier (%s) could not be loaded by every "
                                  "rank and could not be set aside (%s); left as it is",
                                  s, tier.name, tier.url, exc)
                        continue
                    log.warning("step %d on the %s tier could not be loaded by every rank; the"
                                " job resumes from step %d. Set aside, not deleted: %s (check "
                                "it with `trainkit ckpt verify`; rename it back to use it, or "
                                "delete it)", s, tier.name, step, where)
                gone.append((tier.name, s))
        self._saved.clear()     # the job's timeline restarts at the resume point
        return gone

    # -- draining -----------------------------------------------------------------------
    def wait(self, *, raise_errors: bool = True) -> None:
        """Block until every queued copy is done; raise the first unseen copy failure."""
        while True:
            with self._lock:
                pending = [f for f in self._pending if not f.done()]
                self._pending = pending
            if not pending:
                break
            for f in pending:
                f.exception()
        with self._lock:
            unseen, self._unseen_errors = self._unseen_errors, []
        if unseen and raise_errors:
            err = unseen[0]
            if isinstance(err, CheckpointError):
                raise err
            raise CheckpointWriteError(f"copying a checkpoint to a slower tier failed: {err}") \
                from err

    def persist_last(self) -> None:
        """At close: the newest committed step must reach the persistent tier even if
        ``persist_every`` skipped it, or the end of a job would be lost with the node."""
        self.wait(raise_errors=False)
        last = self._last
        if last is None or last[0] in self._persisted or len(self.tiers) == 1:
            return
        step, seq, doc, dedupe = last
        with self._lock:
            self._inflight.add(step)
        self._submit(step, seq, doc, [self.persistent], dedupe)
        self.wait(raise_errors=False)

    def close(self) -> None:
        self._flusher.shutdown(wait=True)
        if self._lease is not None:
            drop_lease(self._lease)
            self._lease = None
