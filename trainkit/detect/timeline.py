"""The aggregator's per-rank timelines: what every rank issued and completed, matched.

Collectives are matched across ranks by (group, sequence number): every rank
issues the collectives of one group in the same order, so the k-th allreduce
on group "0" is the same operation everywhere. Point-to-point traffic is
matched per directed pair, as pseudo-groups named ``"<group>:p2p:<src>-<dst>"``.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

from trainkit.rundir import Finding

__all__ = ["Coll", "RankInfo", "Timeline", "p2p_pair"]

_MAX_PENDING_PER_GROUP = 20000
_RECENT = 600


@dataclass
class RankInfo:
    """What the aggregator knows about one rank (of the current attempt)."""

    rank: int
    host: str = "?"
    local_rank: int | None = None
    attempt: int = 0
    node: int | None = None
    pid: int | None = None
    connected: bool = True
    last_seen: float = field(default_factory=time.time)
    bye: bool = False
    lost_at: float | None = None
    exit_error: str | None = None
    comm_error: bool = False
    exit_code: int | None = None
    step: int | None = None
    steps: collections.deque = field(default_factory=lambda: collections.deque(maxlen=256))
    last_seq: dict[str, int] = field(default_factory=dict)
    stack: str | None = None
    stack_time: float | None = None
    peer_probe: tuple[str, int] | None = None
    """(host, port) of the rank's peer-probe echo server (:mod:`peerprobe`), if any."""

    def identity(self) -> dict[str, Any]:
        return {"rank": self.rank, "host": self.host, "local_rank": self.local_rank,
                "attempt": self.attempt}


@dataclass
class Coll:
    """One collective (or point-to-point transfer) as seen from every rank."""

    group: str
    seq: int
    op: str = "?"
    nbytes: int = 0
    dtype: str = ""
    issue: dict[int, float] = field(default_factory=dict)
    done: dict[int, float] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)
    steps: dict[int, int | None] = field(default_factory=dict)
    waiting: dict[int, float] = field(default_factory=dict)
    """Point-to-point only: when each rank began to wait (completion is known at wait)."""
    busy: dict[int, float] = field(default_factory=dict)
    """Per rank: time from its previous completion to this arrival (its own work)."""

    def step(self) -> int | None:
        values = [s for s in self.steps.values() if s is not None]
        return max(set(values), key=values.count) if values else None

    def summary(self) -> dict[str, Any]:
        return {"group": self.group, "seq": self.seq, "op": self.op, "bytes": self.nbytes,
                "step": self.step(), "issue": {str(r): t for r, t in self.issue.items()},
                "done": {str(r): t for r, t in self.done.items()}}


def p2p_pair(group: str) -> tuple[int, int] | None:
    """(src, dst) of a point-to-point pseudo-group name, else None."""
    _, sep, pair = group.rpartition(":p2p:")
    if not sep:
        return None
    src, _, dst = pair.partition("-")
    return int(src), int(dst)


class Timeline:
    """Per-rank state and per-collective arrivals/completions of one attempt."""

    def __init__(self, attempt: int = 0, local_host: str | None = None):
        self.attempt = attempt
        self.local_host = local_host                 # the aggregator's host: pids checkable
        self.world: int | None = None
        self.ranks: dict[int, RankInfo] = {}
        self.groups: dict[str, list[int]] = {}
        self.pending: dict[str, dict[int, Coll]] = collections.defaultdict(dict)
        self.completed: list[Coll] = []              # drained by the aggregator each tick
        self.recent: collections.deque = collections.deque(maxlen=_RECENT)
        self.fatal_time: float | None = None         # first crash/hang finding
        self.stack_requests: list[int] = []          # drained by the aggregator
        self.findings: list[Finding] = []
        self.last_done: dict[int, float] = {}        # per rank, latest completion seen
        self.probe_requests: list[dict[str, Any]] = []   # drained by the aggregator
        self.probe_results: dict[int, dict[str, float]] = {}
        self.peer_probe_requests: list[dict[str, Any]] = []   # drained by the aggregator
        self.peer_probe_results: dict[int, dict[int, dict[int, dict]]] = {}
        """probe id -> prober rank -> peer rank -> {"ok", "rtt_s", "error"}."""
        self._peer_probe_ids = 0

    # -- membership ------------------------------------------------------------------
    def group_ranks(self, group: str) -> list[int]:
        pair = p2p_pair(group)
        if pair is not None:
            return sorted(set(pair))
        if group in self.groups:
            return self.groups[group]
        return list(range(self.world or len(self.ranks)))

    def alive(self, rank: int) -> bool:
        info = self.ranks.get(rank)
        return info is not None and info.lost_at is None and not info.bye

    def request_stack(self, rank: int) -> None:
        if rank not in self.stack_requests:
            self.stack_requests.append(rank)

    def request_peer_probe(self, ranks: list[int]) -> int | None:
        """Ask ``ranks`` to probe each other over the side channel; None if they cannot."""
        peers = {r: self.ranks[r].peer_probe for r in ranks
                 if r in self.ranks and self.ranks[r].peer_probe is not None}
        if len(peers) < 2:
            return None
        self._peer_probe_ids += 1
        self.peer_probe_requests.append({"id": self._peer_probe_ids, "ranks": sorted(peers),
                                         "peers": peers})
        return self._peer_probe_ids

    # -- ingest ------------------------------------------------------------------------
    def on_issue(self, rank: int, group: str, seq: int, op: str, nbytes: int, dtype: str,
                 t: float, step: int | None) -> None:
        if ":p2p:" in group:
            op = "p2p"    # sender says send, receiver recv: one transfer
        colls = self.pending[group]
        coll = colls.get(seq)
        if coll is None:
            coll = colls[seq] = Coll(group, seq, op, nbytes, dtype)
            if len(colls) > _MAX_PENDING_PER_GROUP:
                colls.pop(next(iter(colls)))
        coll.issue[rank] = t
        coll.steps[rank] = step
        coll.busy[rank] = max(0.0, t - self.last_done.get(rank, t))
        info = self.ranks.get(rank)
        if info is not None:
            info.last_seq[group] = max(seq, info.last_seq.get(group, -1))
        self._maybe_complete(coll)

    def on_wait(self, rank: int, group: str, seq: int, t: float) -> None:
        coll = self.pending[group].get(seq)
        if coll is not None:
            coll.waiting[rank] = t

    def on_done(self, rank: int, group: str, seq: int, t: float, ok: bool) -> None:
        coll = self.pending[group].get(seq)
        if coll is None:
            return
        coll.done[rank] = t
        self.last_done[rank] = max(t, self.last_done.get(rank, t))
        if not ok:
            coll.failed.add(rank)
        self._maybe_complete(coll)

    def _maybe_complete(self, coll: Coll) -> None:
        members = self.group_ranks(coll.group)
        if all(r in coll.done and r in coll.issue for r in members):
            self.pending[coll.group].pop(coll.seq, None)
            self.completed.append(coll)
            self.recent.append(coll)

    def oldest_incomplete(self) -> list[Coll]:
        """Per group, the lowest-numbered collective that has arrivals but is not complete."""
        out = []
        for colls in self.pending.values():
            if colls:
                out.append(colls[min(colls)])
        return out

    def window(self, around: float, span: float = 30.0) -> list[dict[str, Any]]:
        """Collectives (complete and pending) near time ``around``, for the timeline plot."""
        items = list(self.recent) + [c for colls in self.pending.values() for c in colls.values()]
        out = []
        for c in items:
            first = min(c.issue.values(), default=None)
            if first is not None and around - span <= first <= around + 1:
                out.append(c.summary())
        return out[-_RECENT:]
