"""Goodput accounting on hand-built run directories (pure computation, no processes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from trainkit.cli import main
from trainkit.run.goodput import BADPUT, compute, compute_run, write_goodput


def _ev(t: float, event: str, **kw) -> dict:
    return {"time": t, "event": event, **kw}


def _rep(t: float, kind: str, gen: int, **kw) -> dict:
    return {"time": t, "kind": kind, "gen": gen, "rank": 0, **kw}


def crash_run() -> tuple[list[dict], list[dict]]:
    """Start at 100; gen 0 steps 1..8 at 103..110 (1 s each), a save of step 4 stalls
    0.2 s; the crash is decided at 111.5; gen 1 starts at 113, restores step 4 in 1 s
    (done at 115), steps 5..12 at 115.5..122.5; done at 125."""
    events = [_ev(100, "start"), _ev(101, "generation_start", gen=0),
              _ev(112, "decision", gen=0, action="restart", decided=111.5),
              _ev(113, "generation_start", gen=1), _ev(125, "done", gen=1)]
    reports = [_rep(102 + s, "step", 0, step=s) for s in range(1, 9)]
    reports += [_rep(106.1, "ckpt_save", 0, step=4, stall_s=0.2),
                _rep(106.3, "ckpt_commit", 0, step=4, tier="memory"),
                _rep(115, "ckpt_restore", 1, step=4, tier="memory", seconds=1.0)]
    reports += [_rep(115.5 + (s - 5), "step", 1, step=s) for s in range(5, 13)]
    return events, reports


def test_crash_run_breakdown_adds_up_and_names_each_part():
    events, reports = crash_run()
    g = compute(events, reports)
    assert g.wall_s == pytest.approx(25.0)
    assert g.badput_s == pytest.approx({"startup": 3.0, "checkpoint": 1.2, "detection": 1.5,
                                        "restart": 3.0, "recompute": 3.0, "shutdown": 2.5})
    assert g.checkpoint_detail == pytest.approx({"save": 0.2, "restore": 1.0})
    assert g.productive_s == pytest.approx(3.8 + 7.0)
    assert g.productive_s + sum(g.badput_s.values()) == pytest.approx(g.wall_s)
    assert g.goodput == pytest.approx(10.8 / 25.0)
    assert g.measured["detection_s"] == pytest.approx([1.5])
    assert g.measured["restart_s"] == pytest.approx([3.0])    # 111.5 -> 115.5, less restore
    assert g.measured["step_s"] == pytest.approx(1.0)
    assert g.generations[1]["restored_step"] == 4
    # the timeline is a partition of the run, in order, without gaps
    segs = g.segments
    assert segs[0][0] == 100 and segs[-1][1] == 125
    assert all(math.isclose(a[1], b[0]) for a, b in zip(segs, segs[1:]))


def test_give_up_and_a_live_run():
    events, reports = crash_run()
    give_up = events[:3] + [_ev(112.5, "give_up", restarts=0)]
    g = compute(give_up, [r for r in reports if r["gen"] == 0])
    assert g.complete and g.badput_s["recompute"] == 0.0      # nothing restored: nothing lost
    assert g.badput_s["shutdown"] == pytest.approx(1.0)       # decision to the end
    assert g.productive_s + sum(g.badput_s.values()) == pytest.approx(g.wall_s)
    live = compute(events[:2], [r for r in reports if r["gen"] == 0], now=111.0)
    assert not live.complete and live.wall_s == pytest.approx(11.0)
    assert live.badput_s["detection"] == 0.0 and live.productive_s == pytest.approx(7.8)


def test_without_step_reports_a_generation_counts_as_productive():
    g = compute([_ev(0, "start"), _ev(1, "generation_start", gen=0), _ev(9, "done", gen=0)])
    assert g.productive_s == pytest.approx(8.0) and g.badput_s["startup"] == pytest.approx(1.0)
    assert g.step_reports == 0


def test_write_goodput_before_the_final_event_and_the_cli(tmp_path: Path, capsys):
    events, reports = crash_run()
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events[:-1]))
    (tmp_path / "reports.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reports))
    g = write_goodput(tmp_path, final={"event": "done", "gen": 1})
    data = json.loads((tmp_path / "goodput.json").read_text())
    assert set(BADPUT) <= set(data["badput_s"]) and data["complete"]
    assert data["productive_s"] + sum(data["badput_s"].values()) == pytest.approx(
        data["wall_s"], rel=0.05)
    assert data["goodput"] == pytest.approx(data["productive_s"] / data["wall_s"], abs=1e-4)
    assert g.badput_s["shutdown"] > 0
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert main(["goodput", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "goodput 0.432" in out and "wasted progress" in out
    assert "checkpoint save/restore (save 0.20, restore 1.00)" in out
    assert main(["goodput", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["goodput"] == pytest.approx(0.432)
    pytest.importorskip("matplotlib")
    assert main(["goodput", str(tmp_path), "--plot", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_not_a_run_dir_is_one_line_exit_2(tmp_path: Path, capsys):
    assert main(["goodput", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a trainkit run directory" in err
    assert compute_run(tmp_path).wall_s == 0.0
