"""`trainkit run --metrics-port`: Prometheus metrics scraped over HTTP from a live job."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import pytest

from test_run_e2e import _train_job

pytestmark = pytest.mark.timeout(240)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_scraped_during_a_run(tmp_path: Path):
    parser = pytest.importorskip("prometheus_client.parser",
                                 reason="prometheus-client (the `metrics` extra) not installed")
    port = _free_port()
    scraped: list[dict] = []

    def scrape(run_dir: Path, progress: Path) -> None:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:    # until a checkpoint is committed mid-run
            if progress.exists() and len(progress.read_text().splitlines()) >= 8:
                break
            time.sleep(0.2)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        values = {}
        for family in parser.text_string_to_metric_families(text.decode()):
            for sample in family.samples:
                key = sample.name + ("{%s}" % ",".join(f"{k}={v}" for k, v in
                                                       sorted(sample.labels.items()))
                                     if sample.labels else "")
                values[key] = sample.value
        scraped.append(values)

    proc, events, steps = _train_job(
        tmp_path, ["--local-nodes", "2", "--hang-timeout", "5", "--metrics-port", str(port)],
        ["--steps", "24", "--ckpt-every", "3", "--step-delay", "0.1"], env={}, during=scrape)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert events[-1]["event"] == "done"
    m = scraped[0]
    for name in ("trainkit_goodput_ratio", "trainkit_restarts_total", "trainkit_step",
                 "trainkit_excluded_nodes", "trainkit_last_checkpoint_step"):
        assert name in m, sorted(m)
    assert m["trainkit_step"] >= 7 and m["trainkit_last_checkpoint_step"] >= 3
    assert 0 < m["trainkit_goodput_ratio"] < 1
    assert m["trainkit_restarts_total"] == 0 and m["trainkit_excluded_nodes"] == 0
    assert m["trainkit_findings_total{class=hang_noncomm}"] == 0
    assert any(e["event"] == "metrics" and str(port) in e["url"] for e in events)


def test_metrics_without_prometheus_client_is_one_line(tmp_path: Path):
    import subprocess
    import sys

    from distributed import subprocess_env

    script = tmp_path / "job.py"
    script.write_text("pass\n")
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "from trainkit.cli import main\n"
            f"sys.exit(main(['run', '--run-dir', {str(tmp_path / 'run')!r}, '--metrics-port', "
            f"'9', '--', {str(script)!r}]))")
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "trainkit[metrics]" in out.stderr


def test_snapshot_of_a_hand_built_run(tmp_path: Path):
    import json

    from test_run_goodput import crash_run
    from trainkit.run.metrics import RunCollector

    events, reports = crash_run()
    events.insert(2, {"time": 111.0, "event": "finding", "gen": 0,
                      "finding": {"class": "crash"}})
    events.insert(4, {"time": 112.1, "event": "exclude", "gen": 0, "exclude": ["node1"]})
    reports.append({"time": 116.0, "kind": "ckpt_commit", "gen": 0, "step": 2,
                    "tier": "persistent"})     # an old copy landing late: not the newest
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (tmp_path / "reports.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reports))
    s = RunCollector(tmp_path).snapshot()
    assert s["restarts"] == 1 and s["step"] == 12 and s["excluded"] == 1
    assert s["findings"]["crash"] == 1 and s["findings"]["straggler"] == 0
    assert s["last_checkpoint"] == 4 and s["generation"] == 1
    assert s["goodput"] == pytest.approx(10.8 / 25.0)
