"""The restart-loop guard: pure rules by hand, and a real loop under `trainkit run`."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from trainkit.run.loops import GenerationRecord, check_loop, generation_records


def _rec(gen, restored, last, bad=None):
    first = None if last is None else (restored or 0) + 1
    return GenerationRecord(gen=gen, restored=restored, first_step=first, last_step=last,
                            bad_step=bad)


def test_same_step_failing_right_after_its_restore_is_suspect():
    # gen 0 ran from scratch and crashed at step 6; gen 1 restored 4 and failed at 5
    assert check_loop([_rec(0, None, 6), _rec(1, 4, 5, bad=5)]) is None
    s = check_loop([_rec(0, None, 6), _rec(1, 4, 5, bad=5), _rec(2, 4, 5, bad=5)])
    assert s is not None and s.step == 4 and s.restore_before == 4 and s.fail_step == 5
    assert "bad step reported at step 5" in s.reason and "generation 1" in s.reason
    # the same failing step right after the restore, the first time: suspect at once
    s = check_loop([_rec(0, None, 12), _rec(1, 10, 12)])
    assert s is not None and s.step == 10
    # the older step fails fast too: it becomes the next suspect
    s = check_loop([_rec(1, 10, 12), _rec(2, 10, 12), _rec(3, 8, 10)])
    assert s is not None and s.step == 8


def test_failures_far_from_the_restore_are_not_a_loop():
    assert check_loop([_rec(0, None, 30), _rec(1, 20, 29)]) is None      # 9 steps later
    assert check_loop([_rec(0, None, 6), _rec(1, 4, 5), ]) is None       # different step
    assert check_loop([_rec(0, 2, 4), _rec(1, 6, 8)]) is None            # different restores
    assert check_loop([GenerationRecord(gen=0), GenerationRecord(gen=1)]) is None  # no reports


def test_records_from_reports():
    reports = [{"gen": 1, "kind": "ckpt_restore", "step": 4},
               {"gen": 1, "kind": "step", "step": 5}, {"gen": 1, "kind": "step", "step": 6},
               {"gen": 1, "kind": "bad_step", "step": 6, "reason": "loss is nan"},
               {"gen": 0, "kind": "step", "step": 1}, {"gen": 0, "kind": "other"}]
    recs = generation_records(reports)
    assert recs[1] == GenerationRecord(gen=1, restored=4, first_step=5, last_step=6,
                                       bad_step=6, bad_reason="loss is nan")
    assert recs[0].start_step == 0 and recs[0].fail_step == 1


# gen 0 saves a poisoned step 4 and then crashes at step 5; every resume from step 4
# reports a NaN at step 5 and exits with BAD_STEP_EXIT; a resume from step 2 is healthy
POISON = textwrap.dedent("""
    import os, sys, time, torch, torch.distributed as dist
    from trainkit.checkpoint import Checkpointer, CheckpointNotFoundError
    from trainkit.run.report import BAD_STEP_EXIT, report_bad_step, report_step
    dist.init_process_group("gloo")
    gen = int(os.environ["TRAINKIT_GENERATION"])
    ckpt = Checkpointer(os.environ["CKPT_DIR"], timeout=30)
    w, start = torch.zeros(4), 1
    try:
        state = ckpt.load()
        w, start = state["w"], state["step"] + 1
    except CheckpointNotFoundError:
        pass
    for step in range(start, 11):
        report_step(step)
        t = w.clone(); dist.all_reduce(t); w = w + 1
        if not torch.isfinite(t).all():
            report_bad_step(step, "loss is nan")
            sys.exit(BAD_STEP_EXIT)
        if step % 2 == 0:
            poison = gen == 0 and step == 4
            ckpt.save(step, {"w": torch.full((4,), float("nan")) if poison else w,
                             "step": step})
            ckpt.wait()
        if gen == 0 and step == 5 and dist.get_rank() == 0:
            os.kill(os.getpid(), 9)
        time.sleep(0.02)
    ckpt.close()
    dist.destroy_process_group()
    os._exit(0)
""")


@pytest.mark.timeout(240)
def test_a_fault_after_every_restore_of_a_step_ends_in_an_older_restore(tmp_path: Path):
    from test_run_e2e import _trainkit_run
    from trainkit.rundir import read_jsonl

    proc, events = _trainkit_run(tmp_path, ["--no-detect", "--max-restarts", "3"], POISON,
                                 env={"CKPT_DIR": str(tmp_path / "ckpt")})
    assert proc.returncode == 0, proc.stdout[-5000:]
    suspect = [e for e in events if e["event"] == "suspect_step"]
    assert len(suspect) == 1 and suspect[0]["step"] == 4 and suspect[0]["restore_before"] == 4
    assert "bad step reported at step 5 (loss is nan)" in suspect[0]["reason"]
    faults = [e["fault"] for e in events if e["event"] == "decision"]
    assert faults == ["crash", "bad_step"]          # step 5 failed again right after restore
    restores = {r["gen"]: r["step"] for r in read_jsonl(tmp_path / "run" / "reports.jsonl")
                if r["kind"] == "ckpt_restore"}
    assert restores == {1: 4, 2: 2}                  # the loop left behind: step 2 restored
    assert events[-1]["event"] == "done"
    gens = [e["gen"] for e in events if e["event"] == "generation_start"]
    # Generation 2 may run on the warm pool or cold: either way the restore bound reached
    # its workers (restores[2] == 2 above; a pool gets it through its go file).
    assert gens == [0, 1, 2]


class _LoopingAgents:
    """In-memory agents: every generation resumes from step 4 and reports a bad step 5
    (exit code BAD_STEP_EXIT), unless its plan says restore before 4 (then it finishes)."""

    def __new__(cls, run_dir: Path):
        import torch.distributed as dist

        from trainkit.run.control import Control
        from trainkit.rundir import BAD_STEP_EXIT

        class Agents(Control):
            def get(self, key):
                value = super().get(key)
                if value is None and "/exit/" in key:
                    gen = int(key.split("/")[2])
                    plan = super().get(f"tk/gen/{gen}/plan")
                    healthy = plan.get("restore_before") == 4
                    rows = [{"kind": "ckpt_restore", "step": 2 if healthy else 4}]
                    rows += [{"kind": "step", "step": s} for s in range(3 if healthy else 5, 6)]
                    if not healthy:
                        rows.append({"kind": "bad_step", "step": 5, "reason": "loss is nan"})
                    with open(run_dir / "reports.jsonl", "a") as f:
                        f.writelines(json.dumps({"time": time.time(), "gen": gen, **r}) + "\n"
                                     for r in rows)
                    value = ({"rc": 0, "exitcodes": [0], "time": time.time()} if healthy else
                             {"rc": 1, "exitcodes": [BAD_STEP_EXIT], "time": time.time()})
                    super().put(key, value)
                return value

        control = Agents(dist.HashStore())
        control.register("node0", {"host": "h"})
        return control


@pytest.mark.timeout(60)
@pytest.mark.parametrize("max_restarts", [1, 3])
def test_the_coordinator_restores_older_or_stops_with_the_cause(tmp_path: Path, capsys,
                                                                max_restarts: int):
    from trainkit.run.coordinator import Coordinator, CoordinatorConfig
    from trainkit.run.events import EventLog, read_events
    from trainkit.run.policy import PolicyConfig

    control = _LoopingAgents(tmp_path)
    cfg = CoordinatorConfig(run_dir=tmp_path, max_nodes=1, warm_start=False, stop_timeout=2,
                            exit_grace=0.05, policy=PolicyConfig(max_restarts=max_restarts))
    rc = Coordinator(control, cfg, EventLog(tmp_path, echo=False)).run()
    events = read_events(tmp_path)
    suspect = [e for e in events if e["event"] == "suspect_step"]
    assert [e["step"] for e in suspect] == [4] and suspect[0]["gen"] == 1
    if max_restarts == 1:                 # gen 0 and gen 1 failed: out of restarts
        assert rc == 1 and events[-1]["event"] == "give_up"
        assert "suspected cause: a bad step reported at step 5 (loss is nan)" in \
            capsys.readouterr().err
    else:                                 # gen 2 restores before step 4 and finishes
        assert rc == 0 and events[-1]["event"] == "done"
        assert control.get("tk/gen/2/plan")["restore_before"] == 4
        assert control.get("tk/gen/1/plan")["restore_before"] is None
    assert all(e["fault"] == "bad_step" and e["culprits"] == []
               for e in events if e["event"] == "decision")


def test_a_reported_bad_step_is_not_a_crash_when_the_exit_code_is_lost():
    # A worker that sys.exit()s with its process group alive can abort in C++ teardown
    # (SIGABRT): its BAD_STEP_EXIT is lost, but its bad_step report is not.
    from trainkit.run.coordinator import Coordinator

    failed = {"vm": {"rc": 1, "exitcodes": [-6, -6], "time": 1.0}}
    fault = Coordinator._exit_fault(failed, "step 5 (loss is nan)")
    assert fault.kind == "bad_step" and "step 5 (loss is nan)" in fault.reason
    assert fault.nodes == ()
    assert Coordinator._exit_fault(failed).kind == "crash"       # no report: a crash
