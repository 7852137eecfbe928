"""`trainkit run` argument handling: torchrun options split, owned options, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distributed import subprocess_env
from trainkit.run.torchrun_args import RunArgumentError, generation_command, parse_torchrun_args


def test_split_keeps_user_options_and_takes_over_rendezvous():
    a = parse_torchrun_args(["--nnodes=2:3", "--nproc-per-node", "2", "--rdzv-endpoint",
                             "h:29500", "--monitor-interval", "0.1", "train.py", "--steps", "5"])
    assert (a.min_nodes, a.max_nodes, a.nproc_per_node) == (2, 3, 2)
    assert a.rdzv_endpoint == "h:29500"
    assert a.script == "train.py" and a.script_args == ("--steps", "5")
    assert a.passthrough == ("--nproc-per-node", "2", "--monitor-interval", "0.1")
    cmd = generation_command("py", a, nnodes=2, endpoint="h:29500", rdzv_id="job-g1",
                             rdzv_conf="last_call_timeout=1")
    assert "--nnodes=2" in cmd and "--max-restarts=0" in cmd and "--rdzv-id=job-g1" in cmd
    assert any(c.startswith("--rdzv-conf=") and "is_host=false" in c for c in cmd)
    assert cmd[-3:] == ["train.py", "--steps", "5"]


@pytest.mark.parametrize("argv, message", [
    ([], "no training script"),
    (["--max-restarts=3", "t.py"], "--max-restarts belongs to trainkit"),
    (["--nnodes=3:2", "t.py"], "1 <= MIN <= MAX"),
    (["--nnodes=x", "t.py"], "N or MIN:MAX"),
    (["--nproc-per-node=auto", "t.py"], "must be an integer"),
])
def test_bad_torchrun_options_get_clear_errors(argv, message):
    with pytest.raises(RunArgumentError, match=message):
        parse_torchrun_args(argv)


@pytest.mark.parametrize("args, message", [
    (["--local-nodes", "0", "--", "--nproc-per-node=1", "{script}"], "--local-nodes must be >= 1"),
    (["--max-restarts", "-1", "--", "--nproc-per-node=1", "{script}"], "--max-restarts must be"),
    (["--", "--nproc-per-node=1", "missing_script.py"], "training script not found"),
    (["--", "--max_restarts", "2", "{script}"], "--max-restarts belongs to trainkit"),
    ([], "no training script"),
])
def test_cli_rejects_bad_arguments(tmp_path, args, message):
    script = tmp_path / "train.py"
    script.write_text("print('never runs')\n")
    argv = [a.replace("{script}", str(script)) for a in args]
    proc = subprocess.run([sys.executable, "-m", "trainkit", "run", "--run-dir",
                           str(tmp_path / "run"), *argv], env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "run" / "events.jsonl").exists()
