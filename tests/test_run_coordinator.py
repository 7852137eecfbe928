"""The coordinator's generation loop against an in-memory store (one process, no torchrun):
the policy sees each finding once, and the strikes of findings it let pass are kept."""

from __future__ import annotations

import json
import time

import pytest
import torch.distributed as dist

from trainkit.rundir import DIAGNOSIS_FILE, Finding
from trainkit.run.control import Control
from trainkit.run.coordinator import Coordinator, CoordinatorConfig
from trainkit.run.events import EventLog, read_events
from trainkit.run.findings import fault_from_finding
from trainkit.run.policy import PolicyConfig

NODES = ("node0", "node1", "node2", "node3")


class _Agents(Control):
    """Agents that run each generation until told to stop; generation 1 finishes."""

    def get(self, key):
        value = super().get(key)
        if value is None and "/exit/" in key:
            gen = int(key.split("/")[2])
            if gen > 0:
                return {"rc": 0, "exitcodes": [0], "time": time.time()}
            if super().get("tk/gen/0/stop") is not None:
                return {"rc": -15, "exitcodes": [-15], "time": time.time(), "stopped": True}
        return value


def _finding(cls: str, hosts: list[str]) -> dict:
    ranks = list(range(len(hosts)))
    return Finding(time=time.time() + 60, cls=cls, ranks=tuple(ranks), hosts=tuple(hosts),
                   ids=tuple({"rank": r, "host": h, "local_rank": 0, "attempt": 0}
                             for r, h in zip(ranks, hosts)),
                   confidence=0.9).to_json()


@pytest.mark.timeout(60)
def test_strikes_of_continue_decisions_count_towards_exclusion(tmp_path):
    control = _Agents(dist.HashStore())
    for n in NODES:
        control.register(n, {"host": "h"})
    cfg = CoordinatorConfig(run_dir=tmp_path, max_nodes=4, warm_start=False, stop_timeout=5,
                            policy=PolicyConfig(min_nodes=3, exclude_after=3, max_restarts=3))
    coordinator = Coordinator(control, cfg, EventLog(tmp_path, echo=False))
    # Two stragglers on node1+node2: dropping both would leave 2 < 3 nodes, so the job
    # keeps going and each names node1 once. Then a crash on node1 is its third strike.
    lines = [_finding("straggler", ["node1", "node2"]), _finding("straggler", ["node1", "node2"]),
             _finding("crash", ["node1"])]
    (tmp_path / DIAGNOSIS_FILE).write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert coordinator.run() == 0
    decisions = [e for e in read_events(tmp_path) if e["event"] == "decision"]
    assert [d["action"] for d in decisions] == ["continue", "continue", "exclude_and_restart"]
    assert decisions[-1]["exclude"] == ["node1"] and "3 time" in decisions[-1]["reason"]
    plan = control.get("tk/gen/1/plan")
    assert plan["members"] == ["node0", "node2", "node3"]


def test_fault_from_finding_reads_the_named_hosts_once():
    line = _finding("hang_comm", ["node1", "node1", "node9", "?"])
    line["ids"][0]["host"] = "node3"      # ids are for people; hosts is the field read
    f = fault_from_finding(Finding.from_json(line), NODES)
    assert f.kind == "hang_comm" and f.nodes == ("node1",) and not f.hardware
    hardware = Finding.from_json({**line, "evidence": {"hardware": True}})
    assert fault_from_finding(hardware, NODES).hardware
