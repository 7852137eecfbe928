"""Targeted point-to-point probe among suspects, to localise a slow link inside one group.

When a group collective (say DDP's allreduce over all ranks) becomes slow and
nothing else tells which link is at fault, the aggregator asks the suspects to
ping-pong a small tensor pair by pair over a gloo group trainkit owns (never
monitored, never injected). The pair with a clearly longer round trip is the
slow link.

Rank side (:class:`LinkProbe`), who calls what: ``CollectiveMonitor.start()``
creates it on every rank (``dist.new_group`` is collective); the channel thread
hands it ``{"t": "probe", "id", "pairs", "nbytes", "reps"}`` requests; it runs
them one at a time on its own thread, every rank walking the same pair list in
the same order (deadlock-free: the earliest unfinished pair always has both of
its ranks ready), and the first rank of each pair reports
``{"t": "probe_result", "id", "rtt": {"a-b": seconds}}``.

Aggregator side: :func:`probe_pairs` picks the pairs, :func:`slowest_pair`
reads the answer.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["LinkProbe", "probe_pairs", "slowest_pair"]

_MAX_ALL_PAIRS = 8


def probe_pairs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """All pairs among up to 8 suspects; ring neighbours beyond that."""
    ranks = sorted(set(ranks))
    if len(ranks) <= _MAX_ALL_PAIRS:
        return list(itertools.combinations(ranks, 2))
    return [(ranks[i], ranks[(i + 1) % len(ranks)]) for i in range(len(ranks))]


def slowest_pair(rtt: dict[str, float], *, ratio: float = 2.0) -> tuple[int, int] | None:
    """The pair whose round trip exceeds ``ratio`` x the median of the others, if one does."""
    if len(rtt) < 2:
        return None
    items = sorted(rtt.items(), key=lambda kv: kv[1], reverse=True)
    (worst, t_worst), rest = items[0], [t for _, t in items[1:]]
    if t_worst > ratio * statistics.median(rest) and t_worst - statistics.median(rest) > 0.002:
        a, b = (int(x) for x in worst.split("-"))
        return (min(a, b), max(a, b))
    return None


class LinkProbe:
    """Rank-side ping-pong runner on a private gloo group."""

    def __init__(self, group: Any, rank: int, send: Callable[[dict[str, Any]], None]):
        self.group = group
        self.rank = rank
        self.send = send
        self._lock = threading.Lock()

    @classmethod
    def create(cls, rank: int, send: Callable[[dict[str, Any]], None]) -> LinkProbe:
        """Collective: every rank must call it, in the same order as its other new_group calls."""
        import torch.distributed as dist

        return cls(dist.new_group(backend="gloo"), rank, send)

    def handle(self, message: dict[str, Any]) -> None:
        pairs = [tuple(p) for p in message["pairs"]]
        nbytes, reps = int(message.get("nbytes", 65536)), int(message.get("reps", 3))
        with self._lock:
            rtt = self.run(pairs, nbytes, reps)
        self.send({"t": "probe_result", "id": message["id"], "rtt": rtt})

    def run(self, pairs: Sequence[tuple[int, int]], nbytes: int, reps: int) -> dict[str, float]:
        import torch
        import torch.distributed as dist

        buf = torch.zeros(max(1, nbytes // 4))
        out: dict[str, float] = {}
        for a, b in pairs:
            if self.rank not in (a, b):
                continue
            peer = b if self.rank == a else a
            times = []
            for _ in range(reps + 1):          # the first round trip warms the connection
                t0 = time.perf_counter()
                if self.rank == a:
                    dist.send(buf, peer, group=self.group)
                    dist.recv(buf, peer, group=self.group)
                else:
                    dist.recv(buf, peer, group=self.group)
                    dist.send(buf, peer, group=self.group)
                times.append(time.perf_counter() - t0)
            if self.rank == a:
                out[f"{a}-{b}"] = statistics.median(times[1:])
        return out
