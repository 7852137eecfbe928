"""One classifier per fault class, each reading the same :class:`Timeline`.

Who calls what: the aggregator calls ``observe(coll, tl)`` for every
collective that completed on all its ranks, then ``check(tl, now)`` on every
tick (a few times a second); ``check`` returns new findings. Classifiers keep
their own learned state; nothing here does I/O except through the timeline's
stack-request list.

Thresholds for slowness are learned online from the job's periodic behaviour:
each step repeats the same collectives, so a rank's normal lateness and a
collective's normal duration are estimated from the job itself, and only
statistically significant departures that persist over a window of steps are
reported. Start-up (warm-up steps), one-off pauses (checkpoints) and uneven
first steps do not persist, so they raise nothing.
"""

from __future__ import annotations

import collections
import itertools
import math
import statistics
import time
from typing import Any, Protocol

from trainkit.detect.knobs import ClassifierConfig
from trainkit.detect.linkprobe import probe_pairs, slowest_pair
from trainkit.detect.peerprobe import localise
from trainkit.detect.timeline import Coll, Finding, Timeline, p2p_pair

__all__ = ["Classifier", "CLASSIFIERS", "make_classifiers"]


class Classifier(Protocol):
    """The seam: one per fault class."""

    name: str

    def observe(self, coll: Coll, tl: Timeline) -> None: ...

    def check(self, tl: Timeline, now: float) -> list[Finding]: ...


def _finding(tl: Timeline, now: float, cls: str, ranks: list[int], *, link: tuple[int, int] | None,
             step: int | None, group: str | None, seq: int | None, evidence: dict[str, Any],
             confidence: float) -> Finding:
    infos = [tl.ranks.get(r) for r in ranks]
    hosts = tuple(i.host if i else "?" for i in infos)
    ids = tuple(i.identity() if i else {"rank": r, "host": "?", "local_rank": None,
                                        "attempt": tl.attempt} for r, i in zip(ranks, infos))
    return Finding(now, cls, tuple(ranks), hosts, ids, link, step, group, seq, evidence, confidence)


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


def _process_gone(pid: int | None) -> bool | None:
    """True/False on this host, None when it cannot be told (another host, no pid)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state in ("Z", "X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        return None


class CrashClassifier:
    """Process gone or heartbeat lost: names the first rank(s) to drop.

    When one rank dies, its peers fail in their next collective and are torn
    down too; only the first wave of drops without a preceding communication
    error is named.
    """

    name = "crash"

    def __init__(self, cfg: ClassifierConfig):
        self.cfg = cfg
        self.reported: set[int] = set()

    def observe(self, coll: Coll, tl: Timeline) -> None:
        return None

    def check(self, tl: Timeline, now: float) -> list[Finding]:
        if tl.fatal_time is not None:
            return []
        culprits: dict[int, dict[str, Any]] = {}
        lost = [i for i in tl.ranks.values() if i.lost_at is not None and not i.bye]
        if lost:
            first = min(i.lost_at for i in lost)
            if now - first < max(self.cfg.crash_wave_s, 0.3):
                return []   # let the first wave's comm-error reports arrive
            for info in lost:
                if info.lost_at <= first + self.cfg.crash_wave_s and not info.comm_error:
                    culprits[info.rank] = {"reason": "connection lost without goodbye",
                                           "lost_at": info.lost_at}
        for info in tl.ranks.values():
            if info.exit_error and not info.comm_error and info.rank not in culprits:
                culprits[info.rank] = {"reason": "unhandled exception", "error": info.exit_error}
            silent = now - info.last_seen
            if (info.connected and info.lost_at is None and not info.bye
                    and silent > self.cfg.heartbeat_timeout):
                culprits[info.rank] = {"reason": "heartbeat lost", "silent_s": round(silent, 3)}
        culprits = {r: v for r, v in culprits.items() if r not in self.reported}
        if not culprits:
            return []
        ranks = sorted(culprits)
        for r in ranks:
            info = tl.ranks[r]
            gone = _process_gone(info.pid) if info.host == tl.local_host else None
            culprits[r].update({"exit_code": info.exit_code, "process_gone": gone,
                                "last_step": info.step, "last_seen": info.last_seen})
            if info.exit_code is None:
                culprits[r]["exit_code_note"] = ("unknown: only the parent agent sees exit codes; "
                                                 "pass them with an 'exit' message")
        self.reported.update(ranks)
        tl.fatal_time = now
        steps = [tl.ranks[r].step for r in ranks if tl.ranks[r].step is not None]
        return [_finding(tl, now, "crash", ranks, link=None, step=max(steps) if steps else None,
                         group=None, seq=None, evidence={"per_rank": {str(r): culprits[r]
                                                                      for r in ranks}},
                         confidence=0.95 if all(v["reason"] != "heartbeat lost"
                                                for v in culprits.values()) else 0.8)]


class HangClassifier:
    """Hangs: some ranks wait in collective #k while others never issued it
    (``hang_noncomm``), or every rank issued #k and none completed (``hang_comm``)."""

    name = "hang"

    def __init__(self, cfg: ClassifierConfig):
        self.cfg = cfg
        self.waiting: dict[tuple[str, int], dict[str, Any]] = {}
        self.reported: set[tuple[str, int]] = set()

    def observe(self, coll: Coll, tl: Timeline) -> None:
        return None

    def check(self, tl: Timeline, now: float) -> list[Finding]:
        out: list[Finding] = []
        if tl.fatal_time is None:
            for coll in tl.oldest_incomplete():
                key = (coll.group, coll.seq)
                if key in self.reported or key in self.waiting or not coll.issue:
                    continue
                if p2p_pair(coll.group) is not None:
                    # Point-to-point completion is only seen at wait(): count from when a
                    # rank started waiting, not from an early irecv posted long before.
                    if not coll.waiting:
                        continue
                    first = min(coll.waiting.values())
                else:
                    first = min(coll.issue.values())
                if now - first <= self.cfg.hang_timeout:
                    continue
                self._suspect(tl, coll, now, first)
        for key, entry in list(self.waiting.items()):
            culprits = entry["stack_from"]
            have = all(tl.ranks.get(r) is not None and (tl.ranks[r].stack_time or 0) >= entry["asked"]
                       for r in culprits)
            if entry.get("probe_id") is not None:
                answers = tl.peer_probe_results.get(entry["probe_id"], {})
                have = have and all(r in answers for r in entry["probed"])
            if have or now - entry["asked"] >= self.cfg.stack_wait_s or tl.fatal_time is not None:
                del self.waiting[key]
                if tl.fatal_time is not None and tl.fatal_time < entry["asked"]:
                    continue
                out.append(self._emit(tl, entry, now))
        return out

    def _suspect(self, tl: Timeline, coll: Coll, now: float, first: float) -> None:
        members = tl.group_ranks(coll.group)
        missing = [r for r in members if r not in coll.issue]
        if missing and all(not tl.alive(r) for r in missing):
            return   # dead ranks: the crash classifier explains it
        if missing:
            cls, culprits = "hang_noncomm", [r for r in missing if tl.alive(r)] or missing
            stack_from = culprits
        else:
            not_done = [r for r in members if r not in coll.done]
            cls = "hang_comm"
            partial = 0 < len(not_done) < len(members)
            culprits = not_done if partial else members
            stack_from = members
        for r in stack_from:
            tl.request_stack(r)
        entry = {"coll": coll, "cls": cls, "culprits": culprits, "stack_from": stack_from,
                 "asked": now, "first": first}
        if cls == "hang_comm" and p2p_pair(coll.group) is None:
            # Everyone is waiting: the timings say nothing per peer, so ask the network.
            probe_id = tl.request_peer_probe(members)
            if probe_id is not None:
                entry["probe_id"] = probe_id
                entry["probed"] = tl.peer_probe_requests[-1]["ranks"]
        self.waiting[(coll.group, coll.seq)] = entry

    def _emit(self, tl: Timeline, entry: dict[str, Any], now: float) -> Finding:
        coll: Coll = entry["coll"]
        cls, culprits = entry["cls"], entry["culprits"]
        members = tl.group_ranks(coll.group)
        self.reported.add((coll.group, coll.seq))
        tl.fatal_time = tl.fatal_time or now
        pair = p2p_pair(coll.group)
        evidence: dict[str, Any] = {
            "op": coll.op, "bytes": coll.nbytes, "group_ranks": members,
            "waiting_since_s": round(now - entry["first"], 3),
            "hang_timeout_s": self.cfg.hang_timeout,
            "arrived": sorted(coll.issue), "completed": sorted(coll.done),
            "last_seq_issued": {str(r): tl.ranks[r].last_seq.get(coll.group)
                                for r in members if r in tl.ranks},
            "last_step": {str(r): tl.ranks[r].step for r in members if r in tl.ranks},
            "stacks": {str(r): tl.ranks[r].stack for r in entry["stack_from"]
                       if r in tl.ranks and tl.ranks[r].stack},
        }
        link = (min(pair), max(pair)) if pair is not None else None
        if cls == "hang_noncomm":
            evidence["never_arrived"] = culprits
            confidence = 0.95
        if cls == "hang_comm":
            evidence["localised"] = (pair is not None or len(culprits) < len(members))
            evidence["note"] = ("point-to-point transfer: the pair is the link" if pair is not None
                                else "per-peer evidence: only these ranks did not complete"
                                if evidence["localised"] else
                                "every rank issued the collective and none completed; "
                                "the collective's timings give no per-peer evidence")
            confidence = 0.9 if evidence["localised"] else 0.6
            if entry.get("probe_id") is not None:
                probe = localise(tl.peer_probe_results.get(entry["probe_id"], {}), members)
                evidence["peer_probe"] = probe
                evidence["note"] += "; peer probes: " + probe["summary"]
                if probe["localised"]:
                    culprits = probe["ranks"]
                    link = tuple(probe["link"]) if probe["link"] else link
                    evidence["localised"] = True
                    confidence = 0.85 if probe["link"] or len(culprits) == 1 else 0.7
        return _finding(tl, now, cls, culprits, link=link, step=coll.step(), group=coll.group,
                        seq=coll.seq, evidence=evidence, confidence=confidence)


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

    def __init__(self, cfg: ClassifierConfig):
        self.cfg = cfg
        self.units: dict[str, dict[str, Any]] = {}
        self.history: dict[str, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=400))
        self.seen_units: dict[str, int] = collections.defaultdict(int)
        self.reported: set[int] = set()
        self.pending: list[Finding] = []

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
        self.pending.append(_finding(tl, time.time(), "straggler", [rank],
                                     link=None, step=last["step"], group=group, seq=last["seq"],
                                     evidence=evidence, confidence=confidence))

    def check(self, tl: Timeline, now: float) -> list[Finding]:
        out, self.pending = self.pending, []
        return out


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
        self.pending.append(_finding(tl, time.time(), "slow_link", ranks, link=link, step=window[-1][3],
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
        return _finding(tl, now, "slow_link", ranks, link=link, step=window[-1][3], group=key[0],
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


# Explicit registry: class name -> constructor. The aggregator runs all of them.
CLASSIFIERS: dict[str, type] = {
    "crash": CrashClassifier,
    "hang": HangClassifier,
    "straggler": StragglerClassifier,
    "slow_link": SlowLinkClassifier,
}


def make_classifiers(cfg: ClassifierConfig) -> list[Classifier]:
    return [factory(cfg) for factory in CLASSIFIERS.values()]
