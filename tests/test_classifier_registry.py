"""Contract test of the classifier seam: it iterates over ``CLASSIFIERS`` itself, so a
new entry is checked by default (the Protocol for every entry; a trigger must be added
to ``TRIGGERS`` below for the signature check)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from test_detect_classifiers import CFG, _run_steps, _timeline
from trainkit.detect.classifiers import CLASSIFIERS, Classifier, make_classifiers
from trainkit.detect.knobs import ClassifierConfig
from trainkit.detect.timeline import Timeline
from trainkit.rundir import FINDING_CLASSES, Finding
from trainkit.run.policy import FATAL, SLOW

NOW = 1000.0


def _alive(tl: Timeline) -> Timeline:
    for info in tl.ranks.values():
        info.last_seen = NOW
    return tl


def _crash(clf: Classifier, tl: Timeline) -> list[Finding]:
    info = tl.ranks[1]
    info.connected, info.lost_at = False, NOW - 1.0
    return clf.check(tl, NOW)


def _hang(clf: Classifier, tl: Timeline) -> list[Finding]:
    for r in (0, 2, 3):                  # rank 1 never issues collective #0
        tl.on_issue(r, "0", 0, "allreduce", 4096, "float32", NOW - 10.0, 5)
    assert clf.check(tl, NOW) == []      # suspected: waits for the stacks
    assert clf.waiting
    return clf.check(tl, NOW + CFG.stack_wait_s + 0.1)


def _straggler(clf: Classifier, tl: Timeline) -> list[Finding]:
    return _run_steps(tl, [clf], 40, late=lambda s, r: 0.03 if (r == 2 and s >= 10) else 0.0)


def _slow_link(clf: Classifier, tl: Timeline) -> list[Finding]:
    assert _run_steps(tl, [clf], 60, seed=5) == []
    assert _run_steps(tl, [clf], 30, dur=lambda s: 0.02, t0=2000.0, seed=6) == []
    assert clf.waiting                   # parked until the targeted probe answers
    (req,) = tl.probe_requests
    tl.probe_results[req["id"]] = {f"{a}-{b}": (0.09 if (a, b) == (1, 2) else 0.001)
                                   for a, b in req["pairs"]}
    return clf.check(tl, 3000.0)


# Registry name -> the smallest timeline that makes it speak, and the class it must emit.
TRIGGERS: dict[str, tuple[Callable[[Classifier, Timeline], list[Finding]], str]] = {
    "crash": (_crash, "crash"),
    "hang": (_hang, "hang_noncomm"),
    "straggler": (_straggler, "straggler"),
    "slow_link": (_slow_link, "slow_link"),
}


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_entry_satisfies_the_protocol(name):
    clf = CLASSIFIERS[name](ClassifierConfig())
    assert isinstance(clf, Classifier)
    assert clf.name == name
    assert clf.classes and set(clf.classes) <= set(FINDING_CLASSES)
    assert clf.waiting is False          # declared, and idle before anything happened
    clf.cfg = CFG                        # the aggregator swaps the config between ticks
    assert clf.cfg is CFG


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_entry_is_quiet_on_a_quiet_timeline(name):
    clf = CLASSIFIERS[name](CFG)
    empty = Timeline(0, "h")
    assert clf.check(empty, NOW) == []
    assert _run_steps(_alive(_timeline(4)), [clf], 40, t0=NOW) == []
    assert not clf.waiting


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_entry_emits_its_class_on_its_trigger(name):
    assert name in TRIGGERS, f"add a minimal trigger for classifier {name!r} to TRIGGERS"
    trigger, expected = TRIGGERS[name]
    clf = CLASSIFIERS[name](CFG)
    found = trigger(clf, _alive(_timeline(4)))
    assert [f.cls for f in found] == [expected]
    assert expected in clf.classes
    assert isinstance(found[0], Finding)
    assert Finding.from_json(found[0].to_json()) == found[0]
    assert not clf.waiting


def test_every_finding_class_has_one_classifier_and_a_policy_rule():
    owners = [c for f in make_classifiers(CFG) for c in f.classes]
    assert sorted(owners) == sorted(FINDING_CLASSES)
    assert FATAL | SLOW == set(FINDING_CLASSES)


def test_make_classifiers_gives_fresh_instances_in_registry_order():
    first, second = make_classifiers(CFG), make_classifiers(CFG)
    assert [c.name for c in first] == list(CLASSIFIERS)
    assert all(a is not b for a, b in zip(first, second))
