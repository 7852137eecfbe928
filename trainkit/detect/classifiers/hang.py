"""``hang_noncomm`` / ``hang_comm``: a collective that never completes."""

from __future__ import annotations

from typing import Any

from trainkit.detect.classifiers.base import make_finding
from trainkit.detect.hangtime import HangTimeout
from trainkit.detect.knobs import ClassifierConfig
from trainkit.detect.peerprobe import localise
from trainkit.detect.timeline import Coll, Timeline, p2p_pair
from trainkit.rundir import Finding

__all__ = ["HangClassifier"]


class HangClassifier:
    """Hangs: some ranks wait in collective #k while others never issued it
    (``hang_noncomm``), or every rank issued #k and none completed (``hang_comm``)."""

    name = "hang"
    classes = ("hang_noncomm", "hang_comm")

    def __init__(self, cfg: ClassifierConfig):
        self.cfg = cfg
        self._suspects: dict[tuple[str, int], dict[str, Any]] = {}
        self.reported: set[tuple[str, int]] = set()
        self.timeout = HangTimeout(fixed=None if cfg.hang_timeout_auto else cfg.hang_timeout,
                                   fallback_s=cfg.hang_timeout, floor_s=cfg.hang_floor_s,
                                   multiple=cfg.hang_multiple, warmup_steps=cfg.warmup_steps)
        self._step_seen: dict[int, float] = {}     # rank -> time of the last step learned

    @property
    def cfg(self) -> ClassifierConfig:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: ClassifierConfig) -> None:
        """The aggregator replaces the config when the ranks announce their timeout."""
        self._cfg = cfg
        if getattr(self, "timeout", None) is not None:
            self.timeout.fixed = None if cfg.hang_timeout_auto else cfg.hang_timeout

    def carry_over(self, previous: HangClassifier) -> None:
        """A new attempt of the same job: keep what was learned of its durations."""
        self.timeout = previous.timeout
        self.timeout.restart()

    def _learn_steps(self, tl: Timeline) -> None:
        for rank, info in tl.ranks.items():
            last = self._step_seen.get(rank)
            new = []
            for _, t in reversed(info.steps):      # newest first, up to what was learned
                if last is not None and t <= last:
                    break
                new.append(t)
            for t in reversed(new):
                if last is not None:
                    self.timeout.observe_step(t - last)
                last = t
            if last is not None:
                self._step_seen[rank] = last

    @property
    def waiting(self) -> bool:
        """A suspected hang waits for the culprits' stacks and peer-probe answers."""
        return bool(self._suspects)

    def observe(self, coll: Coll, tl: Timeline) -> None:
        if self.timeout.auto and coll.issue and coll.done and p2p_pair(coll.group) is None:
            self.timeout.observe_collective(max(coll.done.values()) - min(coll.issue.values()))

    def check(self, tl: Timeline, now: float) -> list[Finding]:
        out: list[Finding] = []
        if self.timeout.auto:
            self._learn_steps(tl)
        floor = min(self.cfg.hang_floor_s, self.cfg.hang_timeout) if self.timeout.auto \
            else self.cfg.hang_timeout
        if tl.fatal_time is None:
            for coll in tl.oldest_incomplete():
                key = (coll.group, coll.seq)
                if key in self.reported or key in self._suspects or not coll.issue:
                    continue
                if p2p_pair(coll.group) is not None:
                    # Point-to-point completion is only seen at wait(): count from when a
                    # rank started waiting, not from an early irecv posted long before.
                    if not coll.waiting:
                        continue
                    first = min(coll.waiting.values())
                else:
                    first = min(coll.issue.values())
                if now - first <= floor or now - first <= self.timeout.value():
                    continue
                self._suspect(tl, coll, now, first)
        for key, entry in list(self._suspects.items()):
            culprits = entry["stack_from"]
            have = all(tl.ranks.get(r) is not None and (tl.ranks[r].stack_time or 0) >= entry["asked"]
                       for r in culprits)
            if entry.get("probe_id") is not None:
                answers = tl.peer_probe_results.get(entry["probe_id"], {})
                have = have and all(r in answers for r in entry["probed"])
            if have or now - entry["asked"] >= self.cfg.stack_wait_s or tl.fatal_time is not None:
                del self._suspects[key]
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
            # A rank that said goodbye has returned from every collective it issued: a
            # completion stamp it lacks was still on its way (the backend's callback runs
            # after the waiter wakes, and can miss the channel's last flush at close).
            not_done = [r for r in members if r not in coll.done and not _said_bye(tl, r)]
            if not not_done:
                return
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
        self._suspects[(coll.group, coll.seq)] = entry

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
            "hang_timeout_s": round(self.timeout.value(), 3),
            "hang_timeout_auto": self.timeout.auto,
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
        return make_finding(tl, now, cls, culprits, link=link, step=coll.step(), group=coll.group,
                        seq=coll.seq, evidence=evidence, confidence=confidence)


def _said_bye(tl: Timeline, rank: int) -> bool:
    info = tl.ranks.get(rank)
    return info is not None and info.bye
