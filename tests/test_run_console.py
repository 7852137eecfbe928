"""The console of `trainkit run`: event lines and the live status line (no processes)."""

from __future__ import annotations

import io
import json
import time

from trainkit import rundir
from trainkit.run.console import Console, format_status
from trainkit.run.events import EventLog


def test_status_line_names_generation_members_step_rate_checkpoint_and_restarts():
    events = [{"event": "generation_start", "gen": 0, "members": ["node0", "node1", "node2"]},
              {"event": "decision", "action": "exclude_and_restart", "restarts": 1},
              {"event": "generation_start", "gen": 1, "members": ["node0", "node1"]}]
    status = {"step": {"step": 23, "time": 1.0, "gen": 1},
              "checkpoint": {"step": 20, "tier": "memory"}}
    assert format_status(events, status, 3.14) == (
        "gen 1 | 2 nodes (node0, node1) | step 23 | 3.1 steps/s | ckpt 20 (memory) | restarts 1")
    # a step record of the previous generation is not shown as this one's
    assert "step -" in format_status(events, {"step": {"step": 40, "gen": 0}}, None)
    assert format_status([], {}, None).startswith("gen - | 0 nodes | step - | - steps/s | "
                                                  "ckpt none")


def test_events_print_one_line_each_above_the_live_status_line(tmp_path):
    out = io.StringIO()
    console = Console(tmp_path, stream=out, live=True)
    events = EventLog(tmp_path, echo=console.line)
    events.log("generation_start", gen=0, members=["node0"], reason="launching")
    rundir.write_status(tmp_path, "step", {"step": 5, "time": time.time(), "gen": 0})
    rundir.write_status(tmp_path, "checkpoint", {"step": 4, "tier": "local"})
    console._shown = console.status_text()
    events.log("finding", gen=0, reason="straggler ranks=[1]")
    console.close()
    text = out.getvalue()
    assert "[trainkit run] [gen 0] generation_start: launching\n" in text
    # the status line is cleared before an event line and drawn again after it
    assert ("\r\x1b[K[trainkit run] [gen 0] finding: straggler ranks=[1]\n"
            "gen 0 | 1 node (node0) | step 5 | - steps/s | ckpt 4 (local) | restarts 0") in text
    assert text.endswith("\r\x1b[K")
    assert json.loads((tmp_path / "status" / "step.json").read_text())["step"] == 5
