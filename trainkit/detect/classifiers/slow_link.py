"""``slow_link``: collectives on one link take persistently longer than they should."""

from __future__ import annotations

import collections
import itertools
import math
import statistics
import time
from typing import Any

from trainkit.detect.classifiers.base import make_finding
from trainkit.detect.knobs import ClassifierConfig
from trainkit.detect.linkprobe import probe_pairs, slowest_pair
from trainkit.detect.timeline import Coll, Timeline, p2p_pair
from trainkit.rundir import Finding

__all__ = ["SlowLinkClassifier"]


def _finite(x: float) -> float | None:
    return round(x, 6) if math.isfinite(x) else None


def _slow_evidence(key: tuple, members: list[int], window: list,
                   durations: list[float]) -> dict[str, Any]:
    """What a slow-link finding rests on: learned normal, limit, recent durations."""
    return {"op": key[1], "bytes": key[2], "group_ranks": members,
            "normal_duration_s": _finite(window[-1][4]), "slow_limit_s": _finite(window[-1][5]),
            "recent_duration_s": {"median": round(statistics.median(durations), 6),
                                  "max": round(max(durations), 6)},
            "slow_in_window": sum(1 for s, *_ in window if s), "window": len(window)}


class SlowLinkClassifier:
    """Time after the last arrival is elevated while arrivals are on time.

    Each kind of collective (group, op, bytes) learns its normal post-arrival
    duration online (median and MAD of its first samples, then of its normal
    samples). A kind that is slow in most of the recent window is slow.
    Localisation: a point-to-point kind names its link directly; for group
    collectives the ranks common to every slow group and absent from every
    normal group are the suspects (a pair if exactly two remain).
    """

    name = "slow_link"
    classes = ("slow_link",)

    def __init__(self, cfg: ClassifierConfig):
        self.cfg = cfg
        self.baseline: dict[tuple, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=200))
        self.recent: dict[tuple, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=cfg.window))
        self.durations: dict[tuple, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=cfg.window))
        self.kinds: dict[tuple, set[tuple]] = collections.defaultdict(set)
        self.slow_keys: dict[tuple, dict[str, Any]] = {}
        self.reported: set[tuple] = set()
        self.reported_excess: dict[tuple, float] = {}
        self.pending: list[Finding] = []
        self.parked: dict[int, dict[str, Any]] = {}     # findings waiting for a probe
        self.dismissed: list[dict[str, Any]] = []       # slowdowns the probe cleared
        self.cooldown: dict[tuple, float] = {}          # key -> no new probe before this time
        self._probe_ids = itertools.count(1)

    @property
    def waiting(self) -> bool:
        """A slow group collective the timings cannot localise waits for link probes."""
        return bool(self.parked)

    def observe(self, coll: Coll, tl: Timeline) -> None:
        if tl.fatal_time is not None or coll.failed:
            return
        pair = p2p_pair(coll.group)
        last_arrival = max(coll.issue.values())
        if pair is not None:
            duration = coll.done.get(pair[1], last_arrival) - last_arrival
        else:
            duration = statistics.median(coll.done[r] - last_arrival for r in coll.done)
        duration = max(0.0, duration)
        key = (coll.group, coll.op, coll.nbytes)
        members = tl.group_ranks(coll.group)
        kind = (pair is not None, coll.op, coll.nbytes, len(members))
        self.kinds[kind].add(key)
        self.durations[key].append(duration)
        step = coll.step()
        if step is not None and step < self.cfg.warmup_steps:
            return
        # Temporal test: against this collective's own learned normal duration.
        base = self.baseline[key]
        slow_temporal, med, limit = False, float("nan"), float("nan")
        if len(base) >= self.cfg.baseline_samples:
            med = statistics.median(base)
            mad = statistics.median(abs(d - med) for d in base) * 1.4826
            limit = max(med * self.cfg.slow_ratio, med + 5 * mad, med + self.cfg.min_slow_s)
            slow_temporal = duration > limit
        # Cross-sectional test: against the same kind of collective on other links/groups,
        # which works even when the fault predates the end of the learning phase.
        slow_cross = False
        peers = [statistics.median(self.durations[k]) for k in self.kinds[kind]
                 if k != key and len(self.durations[k]) >= 3]
        if len(peers) >= 2:
            ref = statistics.median(peers)
            cross_limit = max(ref * self.cfg.slow_ratio * 2, ref + self.cfg.min_slow_s)
            slow_cross = duration > cross_limit
            if not slow_temporal and math.isnan(med):
                med, limit = ref, cross_limit
        # Once this collective's own normal is learned it is the judge (its noise is in the
        # MAD); the cross-sectional test only covers the time before that.
        slow = slow_temporal if len(base) >= self.cfg.baseline_samples else slow_cross
        if not slow:
            base.append(duration)
        window = self.recent[key]
        window.append((slow, duration, coll.seq, step, med, limit))
        if len(window) == self.cfg.window:
            n_slow = sum(1 for s, *_ in window if s)
            if n_slow >= self.cfg.persist_fraction * self.cfg.window:
                self.slow_keys[key] = {"window": list(window), "members": tl.group_ranks(coll.group)}
                self._localise(tl, key)

    def _localise(self, tl: Timeline, key: tuple) -> None:
        group = key[0]
        pair = p2p_pair(group)
        info = self.slow_keys[key]
        if pair is not None:
            ranks, link, confidence = sorted(pair), (min(pair), max(pair)), 0.9
        else:
            ranks, link, confidence = self._suspects(tl, info)
        if tuple(ranks) in self.reported or time.time() < self.cooldown.get(key, 0.0):
            return
        window = info["window"]
        durations = [d for _, d, *_ in window]
        normal = window[-1][4] if math.isfinite(window[-1][4]) else 0.0
        excess = statistics.median(durations) - normal
        for other, other_excess in self.reported_excess.items():
            # A slow link delays its endpoints, which then slows links next to it a little:
            # a much smaller slowdown sharing a rank with a reported link is that echo.
            if set(other) & set(ranks) and excess < 0.5 * other_excess:
                return
        self.reported.add(tuple(ranks))
        self.reported_excess[tuple(ranks)] = excess
        if pair is None and link is None and len(ranks) > 2:
            self._park(tl, key, ranks, window, durations)
            return
        evidence = _slow_evidence(key, info["members"], window, durations)
        evidence["localisation"] = ("point-to-point pair" if pair is not None else
                                    "slow point-to-point link inside the group" if link else
                                    "ranks shared by the slow groups and absent from normal ones")
        self.pending.append(make_finding(tl, time.time(), "slow_link", ranks, link=link, step=window[-1][3],
                                     group=group, seq=window[-1][2], evidence=evidence,
                                     confidence=confidence))

    def _park(self, tl: Timeline, key: tuple, ranks: list[int], window: list,
              durations: list[float]) -> None:
        """Timings alone cannot name the link: ask the suspects for a ping-pong probe."""
        probe_id = next(self._probe_ids)
        pairs = probe_pairs(ranks)
        tl.probe_requests.append({"id": probe_id, "ranks": ranks, "pairs": [list(p) for p in pairs]})
        self.parked[probe_id] = {"key": key, "ranks": ranks, "window": window, "pairs": pairs,
                                 "durations": durations, "asked": time.time()}

    def _unpark(self, tl: Timeline, probe_id: int, now: float) -> Finding | None:
        entry = self.parked[probe_id]
        rtt = tl.probe_results.get(probe_id, {})
        if len(rtt) < len(entry["pairs"]) and now - entry["asked"] < self.cfg.probe_wait_s:
            return None
        del self.parked[probe_id]
        key, window, durations = entry["key"], entry["window"], entry["durations"]
        pair = slowest_pair(rtt)
        if pair is None and len(rtt) == len(entry["pairs"]):
            # Every pair answered and none stands out: the links are fine, so the slowdown
            # is machine-wide (CPU contention, a slower phase of the job), not a slow link.
            self.dismissed.append({"key": list(key), "probe_rtt_s": rtt, "time": now})
            ranks = tuple(entry["ranks"])
            self.reported.discard(ranks)          # a later, real slow link may still be found
            self.reported_excess.pop(ranks, None)
            self.recent[key].clear()
            self.cooldown[key] = now + self.cfg.probe_cooldown_s
            return None
        ranks, link = (list(pair), pair) if pair else (entry["ranks"], None)
        evidence = _slow_evidence(key, entry["ranks"], window, durations)
        evidence["probe_rtt_s"] = {k: round(v, 6) for k, v in sorted(rtt.items())}
        evidence["localisation"] = ("targeted point-to-point probe among the suspects" if pair
                                    else "probe unanswered; the group's ranks are suspects")
        return make_finding(tl, now, "slow_link", ranks, link=link, step=window[-1][3], group=key[0],
                        seq=window[-1][2], evidence=evidence, confidence=0.85 if pair else 0.5)

    def _suspects(self, tl: Timeline, info: dict[str, Any]) -> tuple[list[int], tuple | None, float]:
        """Localise a slow group collective from what the slow and normal traffic share."""
        members = set(info["members"])
        slow_pairs = [p2p_pair(k[0]) for k in self.slow_keys if p2p_pair(k[0]) is not None]
        for pair in slow_pairs:   # a slow point-to-point link inside the group explains it
            if pair is not None and set(pair) <= members:
                return sorted(pair), (min(pair), max(pair)), 0.85
        slow_groups = {k[0] for k in self.slow_keys if p2p_pair(k[0]) is None}
        normal_groups = {k[0] for k in self.baseline if k[0] not in slow_groups
                         and p2p_pair(k[0]) is None and len(self.recent[k]) == self.cfg.window}
        suspects = set(members)
        for g in slow_groups:
            suspects &= set(tl.group_ranks(g))
        for g in normal_groups:
            suspects -= set(tl.group_ranks(g))
        if not suspects:
            suspects = set(members)
        ranks = sorted(suspects)
        link = (ranks[0], ranks[1]) if len(ranks) == 2 else None
        return ranks, link, (0.85 if link else 0.5)

    def check(self, tl: Timeline, now: float) -> list[Finding]:
        out, self.pending = self.pending, []
        for probe_id in list(self.parked):
            finding = self._unpark(tl, probe_id, now)
            if finding is not None:
                out.append(finding)
        return out
