"""`trainkit run` on a plain DDP script that never imports trainkit (zero-code monitoring).

Real torchrun generations on gloo, two local nodes of one rank each (rank 1 is node1).
The workers' bootstrap wraps the default group at init_process_group and counts
optimizer steps, so TRAINKIT_FAULT's step= works and every fault is named. The console
shows trainkit's events only: no traceback, even from the agents trainkit stops.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from test_run_e2e import _launch

pytestmark = pytest.mark.timeout(150)

PLAIN = textwrap.dedent("""
    import os, time, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(16, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(int(os.environ["STEPS"])):
        loss = model(torch.randn(8, 16)).sum()
        opt.zero_grad(); loss.backward(); opt.step()
        time.sleep(0.08)
    open(os.path.join(os.environ["TRAINKIT_RUN_DIR"], "finished.gen{}.rank{}.w{}".format(
        os.environ["TRAINKIT_GENERATION"], dist.get_rank(), dist.get_world_size())), "w").close()
    dist.destroy_process_group()
""")


def _plain_run(tmp_path: Path, fault: str, *, steps: int, extra: tuple[str, ...] = ()):
    script = tmp_path / "plain.py"
    script.write_text(PLAIN)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainkit", "run", "--run-dir", str(run_dir),
           "--local-nodes", "2", *extra, "--", "--nnodes=1:2", "--nproc-per-node=1",
           "--monitor-interval=0.1", str(script)]
    proc, events = _launch(cmd, run_dir, env={"TRAINKIT_FAULT": fault, "STEPS": str(steps)},
                           timeout=140)
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-5000:]
    assert len(proc.stdout.splitlines()) <= 24, proc.stdout     # one screen
    findings = [e["finding"] for e in events if e["event"] == "finding"]
    decisions = [e for e in events if e["event"] == "decision"]
    finished = sorted(p.name for p in run_dir.glob("finished.*"))
    return findings, decisions, finished, run_dir


def test_plain_script_straggler_on_rank1_is_named_and_excluded(tmp_path):
    findings, decisions, finished, _ = _plain_run(tmp_path, "rank=1,step=4,kind=slow:4",
                                                  steps=36)
    assert findings[0]["class"] == "straggler" and findings[0]["hosts"] == ["node1"], findings
    assert decisions[0]["action"] == "exclude_and_restart" and decisions[0]["exclude"] == ["node1"]
    assert finished == ["finished.gen1.rank0.w1"]          # node0 alone finished the job


def test_plain_script_crash_is_named_and_restarted(tmp_path):
    findings, decisions, finished, run_dir = _plain_run(tmp_path, "rank=1,step=5,kind=crash",
                                                        steps=12)
    assert decisions and decisions[0]["fault"] == "crash"
    assert decisions[0]["culprits"] == ["node1"] and decisions[0]["action"] == "restart"
    assert finished == ["finished.gen1.rank0.w2", "finished.gen1.rank1.w2"]
    logs = sorted(p.relative_to(run_dir).as_posix() for p in (run_dir / "logs").rglob("*.log"))
    assert "logs/gen0/node1.log" in logs and "logs/gen1/node0.log" in logs, logs


def test_plain_script_hang_is_named_within_the_learned_timeout(tmp_path):
    findings, decisions, finished, _ = _plain_run(tmp_path, "rank=1,step=12,kind=hang",
                                                  steps=20)
    hang = findings[0]
    assert hang["class"] == "hang_noncomm" and hang["hosts"] == ["node1"], findings
    assert hang["evidence"]["hang_timeout_auto"] is True
    assert hang["evidence"]["hang_timeout_s"] < 10     # learned, not the 30 s fallback
    assert decisions[0]["action"] == "restart" and decisions[0]["culprits"] == ["node1"]
    assert finished == ["finished.gen1.rank0.w2", "finished.gen1.rank1.w2"]
