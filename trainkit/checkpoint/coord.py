"""How ranks agree that a step is committed, without collectives.

Why not collectives: the commit runs in a background thread, and a collective on the
training group from there races the training loop's own collectives; a gloo side group
hangs for its 30-minute default timeout when a peer dies. Ranks therefore coordinate
through a key-value store with explicit deadlines: torch's TCPStore (a dedicated client
connection to the job's store, so background traffic never shares a socket with the
training loop).

Protocol for save number ``seq`` (every rank numbers its saves the same way):

1. each rank, once its shard is durable, sets ``s<seq>/m/<rank>`` to its manifest
   (step, files with sizes and checksums) or to an error;
2. rank 0 gathers all manifests, writes the commit record (the caller's ``finalize``),
   then sets ``s<seq>/result`` to ``ok`` or to the reason for failing;
3. the other ranks wait for ``s<seq>/result``.

Every rank bumps ``hb/<rank>`` about once a second from a heartbeat thread. A rank whose
heartbeat stops for ``timeout`` seconds is declared dead and the step fails on every
survivor with a message naming it; a rank that never starts the step within
``timeout`` fails it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol

from trainkit.checkpoint.errors import CommitError

__all__ = ["Coordinator", "LocalCoordinator", "StoreCoordinator", "make_coordinator"]

_POLL_S = 0.02          # the longest sleep between two polls of the store
_POLL_FIRST_S = 0.0005  # the first: most waits end within a few milliseconds


def _backoff() -> Callable[[], None]:
    """A sleeper that waits 0.5 ms, then twice as long each call, up to ``_POLL_S``.

    Why not a fixed sleep: the answer a rank waits for (a peer's manifest, the commit
    result, an allgather value) usually arrives within a few milliseconds; a fixed 20 ms
    sleep added up to 20 ms to every commit and every load's agreement, while a long wait
    (a peer still writing) costs no more store traffic than before once the sleep has
    grown."""
    delay = [_POLL_FIRST_S]

    def sleep() -> None:
        time.sleep(delay[0])
        delay[0] = min(_POLL_S, delay[0] * 2)
    return sleep


class Coordinator(Protocol):
    """Commit agreement between the ranks of one Checkpointer.

    Called from the engine's commit thread, once per save and in save order on every
    rank: ``begin(seq)`` when the rank starts writing, then ``commit(seq, step, manifest,
    error, finalize)``; and from the flusher, once per copy of a step to a lower tier,
    with a ``seq`` tagged by the tier (``"local/3"``). ``finalize(manifests)`` runs on
    rank 0 only, with every rank's manifest, writes the commit record and returns it;
    ``commit`` returns that record on every rank (node-local tiers need a copy of it on
    every node), and raises :class:`CommitError` on every rank when any rank fails, dies
    or times out. ``allgather`` exchanges one string per rank (load's agreement).
    """

    rank: int
    world_size: int

    def begin(self, seq: int) -> None: ...

    def commit(self, seq: int | str, step: int, manifest: dict | None, error: str | None,
               finalize: Callable[[list[dict]], dict]) -> dict: ...

    def allgather(self, key: str, value: str) -> list[str]: ...

    def close(self) -> None: ...


class LocalCoordinator:
    """A single process: nothing to agree on."""

    rank = 0
    world_size = 1

    def begin(self, seq: int) -> None:
        pass

    def commit(self, seq: int | str, step: int, manifest: dict | None, error: str | None,
               finalize: Callable[[list[dict]], dict]) -> dict:
        if error is not None:
            raise CommitError(f"step {step} not committed: {error}")
        assert manifest is not None
        return finalize([manifest])

    def allgather(self, key: str, value: str) -> list[str]:
        return [value]

    def close(self) -> None:
        pass


class StoreCoordinator:
    """Coordination through a torch.distributed Store (see the module docstring)."""

    def __init__(self, store: Any, rank: int, world_size: int, *, timeout: float) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self._store = store
        self._lock = threading.Lock()    # one client, used by the commit and heartbeat threads
        self._stop = threading.Event()
        self._hb_error: BaseException | None = None
        self._hb = threading.Thread(target=self._heartbeat, name="trainkit-ckpt-heartbeat",
                                    daemon=True)
        self._hb.start()

    # -- store access -----------------------------------------------------------------
    def _op(self, fn: Callable[[], Any], what: str) -> Any:
        try:
            with self._lock:
                return fn()
        except CommitError:
            raise
        except Exception as exc:  # noqa: BLE001 - any store failure ends the step
            raise CommitError(f"lost contact with the coordination store while {what} "
                              f"(did rank 0 or the launcher die?): {exc}") from exc

    def _has(self, key: str) -> bool:
        return bool(self._op(lambda: self._store.check([key]), f"checking {key}"))

    def _get(self, key: str) -> str:
        return self._op(lambda: self._store.get(key), f"reading {key}").decode()

    def _set(self, key: str, value: str) -> None:
        self._op(lambda: self._store.set(key, value), f"writing {key}")

    def _beat_count(self, rank: int) -> int:
        return int(self._op(lambda: self._store.add(f"hb/{rank}", 0), "reading heartbeats"))

    def _heartbeat(self) -> None:
        interval = max(0.05, min(1.0, self.timeout / 5))
        while not self._stop.wait(interval):
            try:
                with self._lock:
                    self._store.add(f"hb/{self.rank}", 1)
            except Exception as exc:  # noqa: BLE001 - reported by the next commit
                self._hb_error = exc
                return

    # -- protocol ---------------------------------------------------------------------
    def begin(self, seq: int | str) -> None:
        self._set(f"s{seq}/begin/{self.rank}", "1")

    def _wait_for(self, seq: int | str | None, step: int, key: str, ranks: list[int],
                  why: str) -> None:
        """Wait until ``key`` exists, failing if any rank in ``ranks`` looks dead (or, for
        a save ``seq``, never started it)."""
        what = f"step {step} not committed" if seq is not None else "ranks could not agree"
        start = time.monotonic()
        seen = {r: (self._beat_count(r), start) for r in ranks}
        pause = _backoff()
        while not self._has(key):
            if self._hb_error is not None:
                raise CommitError(f"{what}: heartbeat to the coordination store failed: "
                                  f"{self._hb_error}")
            now = time.monotonic()
            for r in ranks:
                count = self._beat_count(r)
                if count != seen[r][0]:
                    seen[r] = (count, now)
                elif now - seen[r][1] > self.timeout:
                    raise CommitError(
                        f"{what}: rank {r} stopped responding (no heartbeat "
                        f"for {self.timeout:.0f}s while {why}); did it die? The previous "
                        f"committed checkpoint is intact")
                if (seq is not None and now - start > self.timeout and r != self.rank
                        and not self._has(f"s{seq}/begin/{r}")):
                    raise CommitError(
                        f"step {step} not committed: rank {r} did not start saving it within "
                        f"{self.timeout:.0f}s (do all ranks call save() for every step?)")
            pause()

    def commit(self, seq: int | str, step: int, manifest: dict | None, error: str | None,
               finalize: Callable[[list[dict]], dict]) -> dict:
        mine = {"step": step, "rank": self.rank, "error": error, "manifest": manifest}
        self._set(f"s{seq}/m/{self.rank}", json.dumps(mine))
        if self.rank != 0:
            self._wait_for(seq, step, f"s{seq}/result", [0],
                           "rank 0 gathers the shards and commits")
            result = self._get(f"s{seq}/result")
            if result != "ok":
                raise CommitError(result)
            return json.loads(self._get(f"s{seq}/record"))
        try:
            manifests = []
            for r in range(self.world_size):
                self._wait_for(seq, step, f"s{seq}/m/{r}", [r], f"writing its shard of step {step}")
                doc = json.loads(self._get(f"s{seq}/m/{r}"))
                if doc["step"] != step:
                    raise CommitError(f"ranks disagree: rank 0 saves step {step} while rank {r} "
                                      f"saves step {doc['step']} (call save() with the same step "
                                      f"on every rank)")
                if doc["error"] is not None:
                    raise CommitError(f"step {step} not committed: rank {r} failed: "
                                      f"{doc['error']}")
                manifests.append(doc["manifest"])
            record = finalize(manifests)
            self._set(f"s{seq}/record", json.dumps(record, separators=(",", ":")))
        except BaseException as exc:
            reason = str(exc) if isinstance(exc, CommitError) else (
                f"step {step} not committed: rank 0 could not write the commit record: {exc}")
            try:
                self._set(f"s{seq}/result", reason)
            except CommitError:
                pass
            if isinstance(exc, CommitError):
                raise
            raise CommitError(reason) from exc
        self._set(f"s{seq}/result", "ok")
        return record

    def allgather(self, key: str, value: str) -> list[str]:
        """Every rank's ``value`` for ``key`` (a key used once per Checkpointer)."""
        self._set(f"ag/{key}/{self.rank}", value)
        out = []
        for r in range(self.world_size):
            k = f"ag/{key}/{r}"
            self._wait_for(None, -1, k, [r], f"exchanging {key}")
            out.append(self._get(k))
        return out

    def close(self) -> None:
        """Rank 0 often hosts the store (``init_process_group`` with ``MASTER_ADDR``):
        it waits, up to the timeout, until every live rank has closed too, so a rank
        still reading an answer (a commit result, load's exchange) never finds the store
        gone. A rank whose heartbeat stopped is not waited for."""
        try:
            self._set(f"closed/{self.rank}", "1")
            if self.rank == 0:
                self._wait_closed()
        except CommitError:
            pass
        finally:
            self._stop.set()
            self._hb.join(timeout=5)

    def _wait_closed(self) -> None:
        start = time.monotonic()
        pending = set(range(1, self.world_size))
        seen = {r: (self._beat_count(r), start) for r in pending}
        pause = _backoff()
        while pending and time.monotonic() - start < min(self.timeout, 30.0):
            now = time.monotonic()
            for r in list(pending):
                if self._has(f"closed/{r}"):
                    pending.discard(r)
                    continue
                count = self._beat_count(r)
                if count != seen[r][0]:
                    seen[r] = (count, now)
                elif now - seen[r][1] > min(self.timeout, 5.0):
                    pending.discard(r)          # dead: nothing to wait for
            if pending:
                pause()


_instances: dict[str, int] = {}
_instances_lock = threading.Lock()


def _dedicated_client(store: Any, timeout: float) -> Any:
    """A separate connection to the job's TCPStore, or the store itself."""
    import torch.distributed as dist

    inner = store
    while isinstance(inner, dist.PrefixStore):
        inner = inner.underlying_store
    if isinstance(inner, dist.TCPStore):
        try:
            return dist.TCPStore(inner.host, inner.port, is_master=False,
                                 timeout=timedelta(seconds=max(timeout, 30.0)),
                                 wait_for_workers=False)
        except Exception:  # noqa: BLE001 - fall back to sharing the job's client
            return store
    return store


def make_coordinator(path: str, *, timeout: float) -> Coordinator:
    """A coordinator for the current process: local, or store-based under torch.distributed.

    All ranks must construct their Checkpointers for ``path`` in the same order; rank 0
    publishes a fresh id so keys never collide with an earlier instance or launch.

    The id's key holds no restart count: ``TORCHELASTIC_RESTART_COUNT`` differs between
    nodes once an elastic agent restarts for a membership change (which does not count
    as a retry) on one node and for a failure on another (seen with NVRx's
    ``ft_launcher`` after a crash: rank 1 waited on attempt 1's key, rank 0 published
    attempt 0's, and both timed out). It is not needed either: torch's env rendezvous
    already prefixes a shared agent store per attempt, and otherwise every round has a
    fresh store.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return LocalCoordinator()
    from torch.distributed.distributed_c10d import _get_default_store

    rank, world = dist.get_rank(), dist.get_world_size()
    base = _get_default_store()
    where = path if "://" in path else os.path.abspath(path)   # a URL is the same on every node
    digest = hashlib.sha1(where.encode()).hexdigest()[:16]
    with _instances_lock:
        n = _instances.get(digest, 0)
        _instances[digest] = n + 1
    id_key = f"trainkit/ckpt/{digest}/{n}"
    if rank == 0:
        base.set(id_key, uuid.uuid4().hex)
    nonce = base.get(id_key).decode()
    client = _dedicated_client(base, timeout)
    return StoreCoordinator(dist.PrefixStore(f"trainkit/ckpt/{nonce}/", client), rank, world,
                            timeout=timeout)
