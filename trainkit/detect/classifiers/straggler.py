"""``straggler``: one rank persistently arrives last because of its own work."""

from __future__ import annotations

import collections
import math
import statistics
import time
from typing import Any

from trainkit.detect.classifiers.base import make_finding
from trainkit.detect.knobs import ClassifierConfig
from trainkit.detect.timeline import Coll, Timeline, p2p_pair
from trainkit.rundir import Finding

__all__ = ["StragglerClassifier"]


def _binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class StragglerClassifier:
    """One rank persistently arrives last and the others wait for it.

    Per step (or per collective without step markers) it notes which rank
    arrived last and by how much. A rank is a straggler when it is last in a
    share of the recent window that chance (1/group size) explains with
    p < ``p_value`` and its median lateness exceeds a threshold learned from
    the job: a fraction of the step period, and several times the lateness of
    the other ranks when they happen to be last.
    """

    name = "straggler"
    classes = ("straggler",)

    def __init__(self, cfg: ClassifierConfig):
        self.cfg = cfg
        self.units: dict[str, dict[str, Any]] = {}
        self.history: dict[str, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=400))
        self.seen_units: dict[str, int] = collections.defaultdict(int)
        self.reported: set[int] = set()
        self.pending: list[Finding] = []

    waiting = False   # a straggler is judged from timings alone

    def observe(self, coll: Coll, tl: Timeline) -> None:
        members = tl.group_ranks(coll.group)
        if p2p_pair(coll.group) is not None or len(members) < 2 or tl.fatal_time is not None:
            return
        arrivals = sorted((t, r) for r, t in coll.issue.items())
        median = statistics.median(t for t, _ in arrivals)
        step = coll.step()
        unit_key = step if step is not None else ("c", coll.seq)
        cur = self.units.get(coll.group)
        if cur is None or cur["key"] != unit_key:
            if cur is not None:
                self._finalize(coll.group, cur, tl)
            cur = self.units[coll.group] = {"key": unit_key, "start": arrivals[0][0],
                                            "gap": collections.Counter(),
                                            "excess": collections.Counter(),
                                            "offsets": collections.defaultdict(list),
                                            "step": step, "seq": coll.seq}
        last_t, last_r = arrivals[-1]
        gap = last_t - arrivals[-2][0]
        if gap > cur["gap"][last_r]:
            cur["gap"][last_r] = gap
            others = [b for r, b in coll.busy.items() if r != last_r]
            cur["excess"][last_r] = (coll.busy.get(last_r, 0.0) - statistics.median(others)
                                     if others else 0.0)
        for t, r in arrivals:
            cur["offsets"][r].append(t - median)

    def _finalize(self, group: str, unit: dict[str, Any], tl: Timeline) -> None:
        self.seen_units[group] += 1
        warm = (self.cfg.warmup_steps if unit["step"] is not None else 10 * self.cfg.warmup_steps)
        if (unit["step"] is not None and unit["step"] < warm) or self.seen_units[group] <= warm:
            return
        last_rank, gap = max(unit["gap"].items(), key=lambda kv: kv[1])
        offsets = {r: statistics.fmean(v) for r, v in unit["offsets"].items()}
        hist = self.history[group]
        hist.append({"last": last_rank, "gap": gap, "excess": unit["excess"][last_rank],
                     "start": unit["start"], "step": unit["step"],
                     "seq": unit["seq"], "offsets": offsets})
        self._evaluate(group, tl)

    def _evaluate(self, group: str, tl: Timeline) -> None:
        cfg, hist = self.cfg, self.history[group]
        w = cfg.window
        if len(hist) < w:
            return
        window = list(hist)[-w:]
        members = tl.group_ranks(group)
        counts = collections.Counter(u["last"] for u in window)
        rank, k = counts.most_common(1)[0]
        if rank in self.reported or k < cfg.persist_fraction * w:
            return
        p = _binom_sf(k, w, 1.0 / len(members))
        if p >= cfg.p_value:
            return
        gaps = [u["gap"] for u in window if u["last"] == rank]
        starts = [u["start"] for u in window]
        period = statistics.median(b - a for a, b in zip(starts, starts[1:])) if w > 1 else 0.0
        others = [u["gap"] for u in hist if u["last"] != rank]
        jitter = statistics.median(others) if others else 0.0
        threshold = max(cfg.min_gap_s, cfg.gap_period_fraction * period, 3.0 * jitter)
        med = statistics.median(gaps)
        if med <= threshold:
            return
        # Non-communication slowness: the rank's own work before arriving (time since its
        # previous completion) must be longer than the others'. A rank that arrives late
        # because it waited on a slow link has normal busy time.
        excess = statistics.median(u["excess"] for u in window if u["last"] == rank)
        if excess <= 0.5 * med:
            return
        self.reported.add(rank)
        lateness = {str(r): {"median_s": round(statistics.median(u["offsets"].get(r, 0.0)
                                                                 for u in window), 6),
                             "p90_s": round(_quantile([u["offsets"].get(r, 0.0) for u in window],
                                                      0.9), 6)}
                    for r in members}
        evidence = {"last_in": k, "window": w, "p_value": p, "chance": 1.0 / len(members),
                    "lateness_as_last_s": {"median": round(med, 6), "p10": round(_quantile(gaps, .1), 6),
                                           "p90": round(_quantile(gaps, .9), 6), "max": round(max(gaps), 6)},
                    "threshold_s": round(threshold, 6), "step_period_s": round(period, 6),
                    "own_work_excess_median_s": round(excess, 6),
                    "others_lateness_when_last_median_s": round(jitter, 6),
                    "arrival_offset_vs_median": lateness}
        last = window[-1]
        confidence = min(0.99, (k / w) * (1 - p))
        self.pending.append(make_finding(tl, time.time(), "straggler", [rank],
                                     link=None, step=last["step"], group=group, seq=last["seq"],
                                     evidence=evidence, confidence=confidence))

    def check(self, tl: Timeline, now: float) -> list[Finding]:
        out, self.pending = self.pending, []
        return out
