"""The Checkpointer: ``save()`` that costs the training loop almost nothing.

After DataStates-LLM (HPDC'24): a checkpoint is a snapshot of tensors that, for the
optimizer's parameters and state, need not be taken before ``save()`` returns, only
before the next ``optimizer.step()`` changes them. The pipeline per save:

1. ``save()`` (training thread): encode the non-tensor values, plan the shard, take
   the host buffer (waiting for the previous save to finish writing: backpressure),
   copy every tensor the optimizer does not own (they may change in the next forward).
2. data thread: copy the optimizer-owned blobs, hand each completed chunk to the I/O
   threads, checksum the blobs, write the metadata, fsync; release the buffer.
3. commit thread: agree with the other ranks (:mod:`~trainkit.checkpoint.coord`);
   rank 0 writes the commit record; resolve the handle.

The optimizer's step pre-hook waits for (and helps with) step 2's copy, and only if it
is still running. Thread-safety: call ``save``/``attach``/``wait``/``load``/``close``
from one thread (the training loop); ``SaveHandle.result`` from any thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from trainkit import rundir
from trainkit.checkpoint import reader
from trainkit.checkpoint.coord import Coordinator, make_coordinator
from trainkit.checkpoint._priority import DEFAULT_BACKGROUND_NICE, lower_thread_priority
from trainkit.checkpoint.dtensor import local_of
from trainkit.checkpoint.errors import CheckpointError, CheckpointWriteError, CommitError
from trainkit.checkpoint.format.layout import COMMIT_FILE, DEFAULT_CHUNK_BYTES, step_dirname
from trainkit.checkpoint.into import LoadReport, load_into
from trainkit.checkpoint.restore import load_agreed, load_rank
from trainkit.checkpoint.snapshot import HostBufferPool, Snapshot, plan_save, storage_key
from trainkit.checkpoint.tiers import is_url
from trainkit.checkpoint.tiers.flow import TierConfig, TierFlow
from trainkit.checkpoint.writer import ShardJob, commit_record, write_shard

__all__ = ["Checkpointer", "SaveHandle"]

log = logging.getLogger(__name__)


class SaveHandle:
    """The future of one ``save()``: ``result()`` blocks until the step is committed on
    every rank and returns the step, or raises why it was not."""

    def __init__(self, step: int, future: Future, owner: Checkpointer) -> None:
        self.step = step
        self._future = future
        self._owner = owner

    def result(self, timeout: float | None = None) -> int:
        try:
            return self._future.result(timeout)
        except CheckpointError:
            self._owner._mark_seen(self._future)
            raise

    def done(self) -> bool:
        return self._future.done()

    def __repr__(self) -> str:
        state = "pending" if not self._future.done() else (
            "failed" if self._future.exception() else "committed")
        return f"SaveHandle(step={self.step}, {state})"


class Checkpointer:
    """Lazy asynchronous checkpoints of nested state in a directory of zarr v3 groups.

    Example::

        ckpt = Checkpointer("runs/exp1/ckpt")
        ckpt.attach(optimizer)
        if ckpt.latest() is not None:
            state = ckpt.load()
        ...
        ckpt.save(step, {"model": model.state_dict(), "optim": optimizer.state_dict(),
                         "rng": torch.get_rng_state()})

    Rank-aware when torch.distributed is initialised: every rank writes its own shard,
    and every rank must call ``save()`` with the same steps, in the same order.

    Args:
        path: the persistent tier: a directory shared by all ranks, or an fsspec URL
            (``s3://bucket/run1``).
        local_dir: the node-local tier (optional): a directory on this node's disk.
        keep_in_memory: newest snapshots kept in host memory (``/dev/shm``, owned by the
            ``trainkit run`` agent or a keeper process, so a restarted worker finds them);
            0 disables the memory tier.
        keep_local, keep_persistent: retention per tier (None: keep all).
        persist_every: copy every n-th committed save to the persistent tier (and always
            the last one, at ``close()``).
        keep_every: never garbage-collect persistent steps divisible by this.
        memory_dir: where the memory tier lives (default: chosen per checkpoint under
            ``/dev/shm``, or under ``$TRAINKIT_MEMORY_DIR`` when a launcher owns it).
        keeper_ttl: seconds the standalone keeper keeps the memory tier after the last
            worker using it is gone.
        timeout: seconds a rank may stay silent (or not start a save) before the step
            fails on the survivors.
        chunk_bytes: target size of a data chunk file.
        io_threads: threads writing chunks (and reading them in ``load()``).
        direct_io: write chunks with O_DIRECT where the filesystem allows it (no page-cache
            copy: the CPU stays with training); buffered writes otherwise.
        storage_options: for a URL path (``s3://bucket/run1``): options of its fsspec
            filesystem (``endpoint_url``, ``key``, ``secret``, ...); without them the
            standard AWS environment variables apply. See
            :mod:`~trainkit.checkpoint.tiers.fsspec`.
        host_budget_bytes: most host memory the snapshot may hold (None: the whole state,
            reused across saves). A larger state goes out in waves of
            ``host_budget_bytes // chunk_bytes`` chunks (at least one): a wave is copied,
            written to the fastest tier, and its buffer takes the next wave. Peak extra
            host memory stays at or below the budget plus one chunk, at the price of a
            longer ``save()`` (eager part) and ``optimizer.step()`` stall (lazy part):
            they wait for writes, not only copies. ``stats["host_buffer_peak_bytes"]``.
        background_nice: added to the nice value of the threads that checksum and write
            chunks and commit (Linux; 0 leaves them alone), so on busy cores they yield to
            training instead of slowing it; the copy ``optimizer.step()`` may wait for
            keeps its priority. See :mod:`~trainkit.checkpoint._priority`.
    """

    def __init__(self, path: str | os.PathLike, *, local_dir: str | os.PathLike | None = None,
                 keep_in_memory: int = 0, keep_local: int | None = 2,
                 keep_persistent: int | None = None, persist_every: int = 1,
                 keep_every: int | None = None, memory_dir: str | os.PathLike | None = None,
                 keeper_ttl: float = 300.0, timeout: float = 300.0,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, io_threads: int = 4,
                 direct_io: bool = True, storage_options: dict | None = None,
                 host_budget_bytes: int | None = None,
                 background_nice: int = DEFAULT_BACKGROUND_NICE) -> None:
        if host_budget_bytes is not None and (isinstance(host_budget_bytes, bool) or not
                                              isinstance(host_budget_bytes, int)
                                              or host_budget_bytes <= 0):
            raise ValueError(f"host_budget_bytes must be a positive int, got "
                             f"{host_budget_bytes!r}")
        self.host_budget_bytes = host_budget_bytes
        path = os.fspath(path)
        self.path = path if is_url(path) else os.path.abspath(path)
        config = TierConfig(local_dir=local_dir, keep_in_memory=keep_in_memory,
                            keep_local=keep_local, keep_persistent=keep_persistent,
                            persist_every=persist_every, keep_every=keep_every,
                            memory_dir=memory_dir, keeper_ttl=keeper_ttl)
        self.timeout = float(timeout)
        self.chunk_bytes = int(chunk_bytes)
        self._io_threads = int(io_threads)
        self._direct_io = bool(direct_io)
        self._coord: Coordinator = make_coordinator(self.path, timeout=self.timeout)
        self.rank = self._coord.rank
        self.world_size = self._coord.world_size
        self._pool = HostBufferPool(pin=torch.cuda.is_available())
        self._data = ThreadPoolExecutor(1, thread_name_prefix="trainkit-ckpt-data")
        nice = (lower_thread_priority, (int(background_nice),))
        self._commit = ThreadPoolExecutor(1, thread_name_prefix="trainkit-ckpt-commit",
                                          initializer=nice[0], initargs=nice[1])
        self._io = ThreadPoolExecutor(self._io_threads, thread_name_prefix="trainkit-ckpt-io",
                                      initializer=nice[0], initargs=nice[1])
        self._flow = TierFlow(self.path, config, self._coord, self._io,
                              storage_options=storage_options)
        self._tier = self._flow.first
        self._loads = 0
        self.loaded_step: int | None = None
        self.loaded_from: str | None = None     # the tier the last load() read
        self.load_report: LoadReport | None = None   # what load(into=, strict=False) skipped
        self._optimizers: list[torch.optim.Optimizer] = []
        self._hooks: list[Any] = []
        self._lazy: Snapshot | None = None
        self._seq = 0
        self._futures: list[Future] = []
        # failed saves: raised again by the next save() (then cleared), and by close() if
        # nobody has seen them through result(), wait() or save()
        self._failed: dict[Future, BaseException] = {}
        self._unseen: set[Future] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.stats = {"hook_wait_s": 0.0, "save_s": 0.0}

    # -- lazy mode ----------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Lazy mode: tensors ``optimizer`` owns are copied after ``save()`` returns, and
        its ``step()`` waits (in a pre-hook) until they are. Only ``optimizer.step()`` may
        modify its parameters and state between ``save()`` and the next step."""
        if any(o is optimizer for o in self._optimizers):
            return
        self._optimizers.append(optimizer)
        self._hooks.append(optimizer.register_step_pre_hook(self._before_step))

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        snap = self._lazy
        if snap is None:
            return
        t0 = time.perf_counter()
        snap.wait()
        waited = time.perf_counter() - t0
        self.stats["hook_wait_s"] += waited
        if self.rank == 0 and waited > 1e-3:
            rundir.report("ckpt_stall", stall_s=round(waited, 6))
        if self._lazy is snap:
            self._lazy = None

    def _owned_storages(self) -> set[tuple[str, int]]:
        owned: set[tuple[str, int]] = set()
        for opt in self._optimizers:
            for group in opt.param_groups:
                owned.update(storage_key(local_of(p)) for p in group["params"])
            for st in opt.state.values():     # FSDP2: DTensors, owned through their locals
                owned.update(storage_key(local_of(v)) for v in st.values()
                             if isinstance(v, torch.Tensor))
        return owned

    # -- saving -------------------------------------------------------------------------
    def save(self, step: int, state: Any, *, replicated: bool | None = None,
             sharded: dict[str, int] | None = None) -> SaveHandle:
        """Snapshot ``state`` as checkpoint ``step`` and write it in the background.

        ``replicated`` (default True): the persistent copy stores data that is identical
        on every rank once, spread over the ranks (found by checksum, so per-rank values
        such as RNG states stay per rank); False stores every rank's full copy.
        ``sharded={"model.emb.weight": 0}``: tensors split across ranks along a dimension
        (key paths joined with ``.`` or ``/``); stored with their global shape, so they
        load resharded onto any world size.

        The handle resolves once the step is committed on the fastest tier; copies to the
        slower tiers follow in the background (``wait()`` waits for them too).
        Raises ``TypeError`` (naming the key path) for a value that cannot be stored,
        and re-raises (once) the failure of an earlier save, with the same exception type.
        """
        t0 = time.perf_counter()
        if self._closed:
            raise CheckpointError("save() on a closed Checkpointer")
        self._raise_failed()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise TypeError(f"step must be a non-negative int, got {step!r}")
        if self._is_committed(step):
            raise CheckpointError(f"step {step} is already committed in {self.path}; "
                                  f"checkpoints are never overwritten")
        dtensors: dict[int, dict] = {}
        tree, tensors, specs, split, plan = plan_save(state, chunk_bytes=self.chunk_bytes,
                                                      sharded=sharded, dtensors=dtensors)
        owned = self._owned_storages() if self._optimizers else set()
        lazy = [i for i, b in enumerate(plan.blobs)
                if owned and storage_key(tensors[b.tensors[0]]) in owned and b.nbytes]
        if self._lazy is not None:        # the previous lazy copy must not outlive its save
            self._lazy.wait()
            self._lazy = None
        slots = None
        if self.host_budget_bytes is not None and plan.array_bytes > self.host_budget_bytes:
            slots = max(1, self.host_budget_bytes // plan.chunk_bytes)      # waves
        buffer = self._pool.acquire(plan.array_bytes if slots is None
                                    else slots * plan.chunk_bytes)
        try:
            snap = Snapshot(plan, buffer, tensors, lazy, slots=slots)
        except BaseException:
            self._pool.release()
            raise
        self.stats["waves"] = 1 if slots is None else -(-plan.nchunks // slots)
        self.stats["host_buffer_bytes"] = self._pool.capacity
        self.stats["host_buffer_peak_bytes"] = self._pool.peak_bytes
        job = ShardJob(tier=self._tier, step=step, seq=self._seq, rank=self.rank,
                       world_size=self.world_size, plan=plan, specs=tuple(specs), tree=tree,
                       snapshot=snap, direct_io=self._direct_io, sharded=tuple(split.items()),
                       replicated=replicated is not False, dtensors=tuple(dtensors.items()))
        self._seq += 1
        future: Future = Future()
        with self._lock:
            self._futures.append(future)
        self._data.submit(self._run_data, job, future)   # starts writing chunks as they fill
        snap.wait_eager()          # copy what the next forward may change, with the writer
        if not snap.done:
            self._lazy = snap
        stall = time.perf_counter() - t0
        self.stats["save_s"] += stall
        if self.rank == 0:
            rundir.report("ckpt_save", step=step, stall_s=round(stall, 6))
        return SaveHandle(step, future, self)

    def _is_committed(self, step: int) -> bool:
        for tier in {id(t): t for t in (self._tier, self._flow.persistent)}.values():
            try:
                if tier.size(f"{step_dirname(step)}/{COMMIT_FILE}") is not None:
                    return True
            except OSError:          # unreadable: the write will fail with a clear error
                continue
        return False

    def _run_data(self, job: ShardJob, future: Future) -> None:
        manifest, error = None, None
        try:
            self._coord.begin(job.seq)
            manifest = write_shard(job, self._io)
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the handle
            error = exc
            job.snapshot.cancel()
        finally:
            self._pool.release()
        self._commit.submit(self._run_commit, job, future, manifest, error)

    def _run_commit(self, job: ShardJob, future: Future, manifest: dict | None,
                    error: BaseException | None) -> None:
        def finalize(manifests: list[dict]) -> dict:
            doc = commit_record(job.step, self.world_size, manifests, tier=self._tier.name)
            self._flow.publish_first(job.step, doc, finalizer=True)
            return doc

        doc = None
        try:
            doc = self._coord.commit(job.seq, job.step, manifest,
                                     None if error is None else str(error), finalize)
            if self.rank != 0:
                self._flow.publish_first(job.step, doc, finalizer=False)
        except BaseException as exc:  # noqa: BLE001
            if error is None and manifest is not None and reader.record_lists(
                    self._tier, job.step, manifest["files"]):
                log.warning("step %d: %s; but its commit record is on disk and lists this "
                            "rank's files, so it is committed", job.step, exc)
            elif error is None:
                error = exc if isinstance(exc, CheckpointError) else CommitError(
                    f"step {job.step} not committed: {exc}")
        if error is not None and not isinstance(error, CheckpointError):
            wrapped = CheckpointWriteError(f"step {job.step}, rank {self.rank}: {error}")
            wrapped.__cause__ = error
            error = wrapped
        if error is None:
            if doc is not None:      # queued first, so wait() after result() sees it
                self._flow.after_commit(job.step, job.seq, doc, dedupe=job.replicated)
            future.set_result(job.step)
            if self.rank == 0:
                rundir.report("ckpt_commit", step=job.step, tier=self._tier.name)
            self._report_commit(job.step)
            return
        log.error("checkpoint step %d failed: %s", job.step, error)
        with self._lock:
            self._failed[future] = error
            self._unseen.add(future)
        future.set_exception(error)

    def _report_commit(self, step: int) -> None:
        """Rank 0 under ``trainkit run``: the newest committed step for the live status
        line (``run_dir/status/checkpoint.json``); never fails a save."""
        run_dir = os.environ.get(rundir.RUN_DIR_ENV)
        if self.rank != 0 or not run_dir:
            return
        try:
            rundir.write_status(run_dir, "checkpoint", {"step": step, "tier": self._tier.name,
                                                       "time": time.time()})
        except OSError:
            pass

    def _mark_seen(self, future: Future) -> None:
        with self._lock:
            self._unseen.discard(future)

    def _raise_failed(self) -> None:
        """save(): re-raise a failure of an earlier save, once, so a loop that never
        looks at its handles still learns that checkpoints are failing."""
        with self._lock:
            if not self._failed:
                return
            error = next(iter(self._failed.values()))
            self._failed.clear()
            self._unseen.clear()
        cls = type(error) if isinstance(error, CheckpointError) else CheckpointError
        raise cls(f"an earlier checkpoint failed: {error}") from error

    # -- waiting, reading ---------------------------------------------------------------
    def wait(self) -> None:
        """Block until every pending save is committed; raise the first failure."""
        with self._lock:
            futures = list(self._futures)
        first: BaseException | None = None
        for f in futures:
            exc = f.exception()
            if exc is not None and first is None:
                first = exc
        with self._lock:
            self._futures = [f for f in self._futures if not f.done()]
            self._unseen.difference_update(futures)
        if first is not None:
            raise first
        self._flow.wait()

    def steps(self) -> list[int]:
        """Steps committed on any tier (as this rank sees them), oldest first."""
        return self._flow.committed()

    def latest(self) -> int | None:
        """The newest step committed on any tier, or None; under ``trainkit run``'s
        ``TRAINKIT_RESTORE_BEFORE=S`` (a restart loop at step S) the newest before S."""
        before = rundir.restore_before()
        steps = [s for s in self.steps() if before is None or s < before]
        return steps[-1] if steps else None

    def tiers(self, step: int) -> list[str]:
        """Where ``step`` lives: the tiers it is committed on, fastest first
        (``"memory"``, ``"local"``, ``"persistent"``)."""
        return self._flow.tiers_of(step)

    def load(self, step: int | None = None, *, rank: int | None = None,
             allow_pickle: bool = False, into: Any = None, strict: bool = True) -> Any:
        """Load a step as CPU tensors, verifying checksums: collective under
        torch.distributed.

        Default: the newest step that every rank can load completely from some tier,
        agreed through the store, read from the fastest tier that holds it, falling back
        tier by tier and then step by step on a missing or corrupt copy (each fallback
        logged). Steps newer than the one loaded, which some rank could not load, are
        set aside (with a warning; ``step_N.corrupt``, never deleted), so the resumed
        job can save them again; only steps this checkpointer saved since its last
        resume are simply uncommitted. A step
        saved by another number of ranks loads too: replicated values as themselves, split tensors resharded, per-rank values as
        :class:`~trainkit.checkpoint.restore.PerRank`. ``rank=`` instead reads one saved
        rank's shard as it was written (not collective). ``loaded_step`` and
        ``loaded_from`` say which step was loaded, from which tier. Call ``wait()``
        first to include saves still in flight.

        ``TRAINKIT_RESTORE_BEFORE=S`` (set by ``trainkit run`` when restores of step S
        keep failing) limits the default resume to steps older than S.

        Non-tensor values that DCP pickled (steps written through ``ZarrWriter``) are
        refused with ``PickleRefusedError`` naming the key unless ``allow_pickle=True``
        (unpickling runs code from the checkpoint); a refusal is not a reason to fall
        back to another tier or step.

        ``into=target`` (FSDP2 / tensor parallelism: ``get_state_dict(model, optimizer)``)
        fills every tensor and DTensor of ``target`` in place, resharded from whatever
        layout the step was saved with, reading only the byte ranges this rank's pieces
        need (:mod:`~trainkit.checkpoint.into`); non-tensor values come back as saved.
        Keys missing on either side, or another shape or dtype, raise
        :class:`~trainkit.checkpoint.errors.StateMismatchError` listing them;
        ``strict=False`` loads what matches and leaves the rest in ``load_report``.
        Without ``into``, a DTensor comes back whole, as a plain tensor.
        """
        t0 = time.perf_counter()
        if into is not None and rank is not None:
            raise ValueError("load(): into= and rank= exclude each other")
        if into is not None and self._lazy is not None:   # the snapshot reads the target
            self._lazy.wait()
            self._lazy = None
        loader = None if into is None else self._into_loader(into, strict)
        if rank is not None:
            if step is None:
                step = self.latest()
                if step is None:
                    raise reader.CheckpointNotFoundError(
                        f"no committed checkpoint in {self.path}; committed steps: none")
            value, tier = load_rank(self._flow.tiers, step, rank, threads=self._io_threads,
                                    allow_pickle=allow_pickle)
        else:
            key = f"load{self._loads}"
            self._loads += 1
            resume = step is None
            try:
                step, value, tier = load_agreed(self._flow.tiers, self._coord.allgather, key,
                                                rank=self.rank, world=self.world_size,
                                                step=step, threads=self._io_threads,
                                                allow_pickle=allow_pickle, loader=loader,
                                                before=rundir.restore_before() if resume
                                                else None)
            except reader.CheckpointNotFoundError:
                if resume:  # nothing every rank can load: a fresh start, consistently
                    self._flow.abandon_newer(-1)
                    self._coord.allgather(f"{key}/abandoned", "1")
                raise
            if resume:      # newer steps some rank lacks: a timeline the job has left
                self._flow.abandon_newer(step)
                self._coord.allgather(f"{key}/abandoned", "1")
        self.loaded_step = step
        self.loaded_from = tier
        if self.rank == 0 and rank is None:
            rundir.report("ckpt_restore", step=step, tier=tier,
                          seconds=round(time.perf_counter() - t0, 6))
        return value

    def _into_loader(self, into: Any, strict: bool) -> Any:
        def loader(tier: Any, step: int, record: dict) -> Any:
            value, self.load_report = load_into(tier, step, record, into, rank=self.rank,
                                                world=self.world_size, strict=strict,
                                                threads=self._io_threads)
            return value
        return loader

    # -- shutdown -----------------------------------------------------------------------
    def close(self, *, persist_last: bool = True) -> None:
        """Drain pending saves and copies, make sure the newest committed step reaches the
        persistent tier (``persist_last``; collective: every rank must close), stop the
        threads, detach the optimizers. Raises a failure of a pending save or copy that
        nobody has seen yet."""
        if self._closed:
            return
        try:
            with self._lock:
                futures = list(self._futures)
            for f in futures:
                f.exception()           # drain; failures already seen are not raised again
            with self._lock:
                unseen = [self._failed[f] for f in self._unseen if f in self._failed]
                self._unseen.clear()
            if persist_last:
                self._flow.persist_last()
            if unseen:
                raise CheckpointError(f"a checkpoint failed: {unseen[0]}") from unseen[0]
            self._flow.wait()
        finally:
            self._closed = True
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            self._optimizers.clear()
            self._data.shutdown(wait=True)
            self._commit.shutdown(wait=True)
            self._flow.close()
            self._io.shutdown(wait=True)
            self._coord.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:     # a failing rank must not wait for its peers to persist
            self.close(persist_last=False)
        except CheckpointError as err:  # do not mask the exception already propagating
            log.error("checkpoint failure while closing after an error: %s", err)
