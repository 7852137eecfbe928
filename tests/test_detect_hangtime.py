"""``--hang-timeout auto``: the timeout learned from the job's own durations (pure unit tests)."""

from __future__ import annotations

import pytest

from trainkit.detect.classifiers.hang import HangClassifier
from trainkit.detect.hangtime import HangTimeout, parse_hang_timeout
from trainkit.detect.knobs import ClassifierConfig
from trainkit.detect.timeline import RankInfo, Timeline


def test_parse_accepts_auto_and_positive_seconds():
    assert parse_hang_timeout("auto") is None and parse_hang_timeout(" AUTO ") is None
    assert parse_hang_timeout("7.5") == 7.5 and parse_hang_timeout(3) == 3.0
    for bad in ("0", "-1", "nan", "inf", "soon", None):
        with pytest.raises(ValueError, match="'auto' or seconds"):
            parse_hang_timeout(bad)


def test_fallback_until_learned_then_multiple_of_p99_with_floor():
    t = HangTimeout(fallback_s=30.0, floor_s=2.0, multiple=5.0, warmup_steps=3, min_steps=5)
    assert t.value() == 30.0
    for s in (9.0, 9.0, 9.0):               # start-up steps: not learned from
        t.observe_step(s)
    for _ in range(4):
        t.observe_step(0.3)
    assert not t.learned and t.value() == 30.0
    t.observe_step(0.3)
    assert t.learned and t.value() == 2.0   # 5 x 0.3 = 1.5 s, below the floor
    for _ in range(200):
        t.observe_step(0.8)
    assert t.value() == pytest.approx(4.0)  # 5 x p99 = 5 x 0.8


def test_p99_ignores_a_rare_outlier_but_not_a_regular_one():
    t = HangTimeout(floor_s=0.1, multiple=5.0, warmup_steps=0, min_steps=5)
    for i in range(500):
        t.observe_step(3.0 if i == 250 else 0.2)       # one checkpoint pause in 500 steps
    assert t.value() == pytest.approx(1.0)
    t = HangTimeout(floor_s=0.1, multiple=5.0, warmup_steps=0, min_steps=5)
    for i in range(500):
        t.observe_step(3.0 if i % 20 == 0 else 0.2)    # a pause every 20 steps: 5% of them
    assert t.value() == pytest.approx(15.0)


def test_collectives_count_and_restart_keeps_what_was_learned():
    t = HangTimeout(floor_s=1.0, multiple=4.0, warmup_collectives=2, min_collectives=3)
    for s in (5.0, 5.0, 0.5, 0.5, 0.5):
        t.observe_collective(s)
    assert t.value() == pytest.approx(2.0)
    t.restart()
    t.observe_collective(50.0)               # the new attempt's start-up: warm-up again
    assert t.value() == 30.0
    for s in (50.0, 0.5):
        t.observe_collective(s)
    assert t.value() == pytest.approx(2.0)   # what was learned before, not the start-up


def test_fixed_timeout_is_used_as_is():
    t = HangTimeout(fixed=7.0, floor_s=2.0)
    for _ in range(100):
        t.observe_step(0.1)
    assert not t.auto and t.value() == 7.0


def _timeline(step_s: float, steps: int) -> Timeline:
    tl = Timeline(0)
    for rank in (0, 1):
        info = tl.ranks[rank] = RankInfo(rank=rank, host=f"h{rank}")
        info.steps.extend((s, 1000.0 + s * step_s) for s in range(steps))
    tl.groups["0"] = [0, 1]
    tl.world = 2
    return tl


def test_classifier_declares_a_hang_after_the_learned_timeout_not_the_fixed_one():
    cfg = ClassifierConfig(hang_timeout=30.0, hang_timeout_auto=True, hang_floor_s=2.0)
    clf = HangClassifier(cfg)
    tl = _timeline(0.3, 20)
    now = 1000.0 + 20 * 0.3
    clf.check(tl, now)
    assert clf.timeout.learned and clf.timeout.value() == 2.0
    tl.on_issue(0, "0", 0, "allreduce", 16, "float32", now, 20)   # rank 1 never arrives
    assert clf.check(tl, now + 1.9) == [] and not clf.waiting
    clf.check(tl, now + 2.1)
    assert clf.waiting                       # suspected: waits for rank 1's stack
    found = clf.check(tl, now + 2.1 + cfg.stack_wait_s)
    assert [f.cls for f in found] == ["hang_noncomm"] and found[0].ranks == (1,)
    assert found[0].evidence["hang_timeout_s"] == 2.0 and found[0].evidence["hang_timeout_auto"]


def test_after_a_restart_the_fallback_holds_until_the_new_attempt_is_past_warmup():
    t = HangTimeout(fallback_s=30.0, floor_s=2.0, multiple=4.0, warmup_steps=3, min_steps=5)
    for _ in range(20):
        t.observe_step(0.3)
    assert t.value() == 2.0
    t.restart()
    assert t.value() == 30.0            # the restore and first steps of the new attempt
    for _ in range(4):
        t.observe_step(0.3)
    assert t.value() == 2.0
