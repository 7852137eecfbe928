"""The classifier seam: one object per fault class, all reading the same timeline.

The aggregator (its own process, single-threaded: nothing here needs a lock) owns one
instance of each entry of :data:`trainkit.detect.classifiers.CLASSIFIERS` per restart
attempt, and calls, in this order:

1) ``factory(cfg)`` once per attempt (a higher attempt gets fresh instances);
2) ``observe(coll, tl)`` for every collective that completed on all its ranks, oldest
   first, on every tick (about ten a second), for every classifier in registry order;
3) ``check(tl, now)`` on the same tick, after every ``observe``; it returns the new
   findings, which the aggregator appends to ``diagnosis.jsonl`` as they come;
4) ``waiting`` whenever the aggregator considers exiting (standalone mode): a classifier
   that holds a finding back for evidence (stacks, probe answers) keeps it alive.

``cfg`` may be replaced between ticks (when the ranks report their hang timeout).
Classifiers keep their own learned state; they do no I/O: they ask for evidence
through the timeline's request lists (stacks, link probes, peer probes), which the
aggregator drains and sends to the ranks after ``check``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from trainkit.detect.knobs import ClassifierConfig
from trainkit.detect.timeline import Coll, Timeline
from trainkit.rundir import Finding

__all__ = ["Classifier", "make_finding"]


@runtime_checkable
class Classifier(Protocol):
    """One fault class (or a family: ``hang`` emits ``hang_noncomm`` and ``hang_comm``)."""

    name: str
    """Its key in ``CLASSIFIERS``."""
    classes: tuple[str, ...]
    """The finding classes (``Finding.cls``) it can emit."""
    cfg: ClassifierConfig

    @property
    def waiting(self) -> bool:
        """True while a finding is held back, waiting for evidence from the ranks."""
        ...

    def observe(self, coll: Coll, tl: Timeline) -> None:
        """Learn from one collective that completed on every rank of its group."""
        ...

    def check(self, tl: Timeline, now: float) -> list[Finding]:
        """The findings that are due at ``now`` (seconds since the epoch)."""
        ...


def make_finding(tl: Timeline, now: float, cls: str, ranks: list[int], *,
                 link: tuple[int, int] | None, step: int | None, group: str | None,
                 seq: int | None, evidence: dict[str, Any], confidence: float) -> Finding:
    """A finding naming ``ranks``, with their hosts and identities from the timeline."""
    infos = [tl.ranks.get(r) for r in ranks]
    hosts = tuple(i.host if i else "?" for i in infos)
    ids = tuple(i.identity() if i else {"rank": r, "host": "?", "local_rank": None,
                                        "attempt": tl.attempt} for r, i in zip(ranks, infos))
    return Finding(time=now, cls=cls, ranks=tuple(ranks), hosts=hosts, ids=ids, link=link,
                   step=step, group=group, seq=seq, evidence=evidence, confidence=confidence)
