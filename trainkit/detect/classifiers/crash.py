"""``crash``: a rank's process is gone or its heartbeat lost."""

from __future__ import annotations

from typing import Any

from trainkit.detect.classifiers.base import make_finding
from trainkit.detect.knobs import ClassifierConfig
from trainkit.detect.timeline import Coll, Timeline
from trainkit.rundir import Finding

__all__ = ["CrashClassifier"]


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
    classes = ("crash",)

    def __init__(self, cfg: ClassifierConfig):
        self.cfg = cfg
        self.reported: set[int] = set()

    waiting = False   # a crash is reported as soon as the first wave has dropped

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
        return [make_finding(tl, now, "crash", ranks, link=None, step=max(steps) if steps else None,
                         group=None, seq=None, evidence={"per_rank": {str(r): culprits[r]
                                                                      for r in ranks}},
                         confidence=0.95 if all(v["reason"] != "heartbeat lost"
                                                for v in culprits.values()) else 0.8)]
