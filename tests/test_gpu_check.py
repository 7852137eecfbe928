"""benchmarks/gpu_check.py --dry-run: the GPU check's code paths, on CPU, so it cannot rot.

The dry run drives the same functions the H200 run does (lazy Checkpointer save with the
memory tier and its restore, dcp.async_save with a DefaultStager, CollectiveMonitor on a
world-size-1 group, the ``trainkit merge`` CLI) at a few MiB, and must emit every figure
of the JSON schema. Without CUDA and without --dry-run it must refuse in one line.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import REPO_ROOT, subprocess_env

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"
MIB = 1 << 20


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT, env=subprocess_env(CUDA_VISIBLE_DEVICES=""))


def _positive(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def dry(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "gpu.json"
    proc = _run("--dry-run", "--out", str(out), "--work-dir", str(tmp / "work"), timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return json.loads(out.read_text())


def test_dry_run_header(dry: dict) -> None:
    assert dry["dry_run"] is True and dry["device"] == "cpu"
    assert dry["errors"] == {}
    assert dry["parts"] == ["monitor", "ckpt", "merge"]
    assert set(dry["part_s"]) == {"monitor", "ckpt", "merge"}
    assert all(_positive(v) for v in dry["part_s"].values())
    assert _positive(dry["elapsed_s"]) and dry["elapsed_s"] < 120
    assert dry["targets"] == {"lazy_loop_cost_pct_at_every_10_steps_max": 2.0,
                              "snapshot_vs_raw_d2h_min": 0.8, "merge_device_vs_cpu_speedup_min": 10.0}


def test_dry_run_monitor(dry: dict) -> None:
    mon = dry["monitor"]
    assert mon["backend"] == "gloo" and mon["world_size"] == 1
    assert mon["monitored"] is True and mon["aggregator_connected"] is True
    assert set(mon["ops"]) == {"all_reduce", "broadcast"}
    for op in mon["ops"].values():
        assert set(op) == {"4096", str(16 * MIB)}
        for fig in op.values():
            assert _positive(fig["unmonitored_us"]) and _positive(fig["monitored_us"])
            assert _finite(fig["overhead_us"])


def _check_saver(fig: dict, rounds: int) -> None:
    for key in ("first_save_s", "median_step_ms", "snapshot_to_host_s", "snapshot_gbps",
                "snapshot_vs_raw_d2h"):
        assert _positive(fig[key]), key
    assert _finite(fig["loop_cost_ms"]) and _finite(fig["loop_cost_pct_every_10"])
    assert len(fig["rounds"]) == rounds
    for r in fig["rounds"]:
        assert _positive(r["blocked_ms"]) and _positive(r["finish_after_steps_s"])
        assert len(r["next_steps_ms"]) == 3 and all(_positive(s) for s in r["next_steps_ms"])
        assert r["loop_cost_ms"] == pytest.approx(
            r["blocked_ms"] + sum(s - fig["median_step_ms"] for s in r["next_steps_ms"]))


def test_dry_run_checkpoint(dry: dict) -> None:
    ck = dry["ckpt"]
    assert ck["raw"]["pinned"] is False
    assert _positive(ck["raw"]["d2h_gbps"]) and _positive(ck["raw"]["h2d_gbps"])
    assert [e["target_bytes"] for e in ck["sizes"]] == [2 * MIB, 4 * MIB]
    for e in ck["sizes"]:
        assert "error" not in e and "skipped" not in e
        assert abs(e["state_bytes"] - e["target_bytes"]) < 0.1 * e["target_bytes"]
        assert _positive(e["tokens"])
        _check_saver(e["trainkit_lazy"], rounds=2)
        assert e["trainkit_lazy"]["pinned_bytes_added"] == 0      # nothing is pinned without CUDA
        _check_saver(e["dcp_async"], rounds=2)
        assert e["dcp_async"]["staging_options"] == [False, True, True, False]
        assert _finite(e["lazy_minus_dcp_loop_cost_ms"])
        rs = e["restore"]
        assert rs["tier"] == "memory"     # the lazy save really went to the memory tier
        assert rs["exact"] is True        # and restored every tensor bit for bit
        for key in ("load_host_s", "to_device_s", "restore_s", "restore_gbps", "restore_vs_raw_h2d"):
            assert _positive(rs[key]), key
        assert set(e["targets_met"]) == {"lazy_loop_cost_le_dcp", "lazy_loop_cost_pct_le_2",
                                         "snapshot_ge_0_8_raw_d2h"}
        assert all(isinstance(v, bool) for v in e["targets_met"].values())


def test_dry_run_merge(dry: dict) -> None:
    mg = dry["merge"]
    assert mg["model_bytes"] == 4 * MIB and mg["models"] == 4 and mg["dtype"] == "bfloat16"
    assert mg["input_bytes"] >= 5 * mg["model_bytes"]
    assert _positive(mg["raw_read_gbps"])
    assert set(mg["scopes"]) == {"tensor", "global"}
    for scope in mg["scopes"].values():
        cpu = scope["cpu"]
        assert _positive(cpu["seconds"]) and _positive(cpu["input_gbps"]) and _positive(cpu["vs_raw_read"])
        if mg["device_arm"] == "available":
            assert scope["device"]["vs_cpu_output"]["exact"] is True
            assert _positive(scope["device"]["speedup_vs_cpu"])
        else:
            assert mg["device_arm"] == "not available: --device missing"
            assert scope["device"] is None


def test_without_cuda_refuses_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = _run("--out", str(out), timeout=60)
    assert proc.returncode == 2
    assert (proc.stdout + proc.stderr).strip().splitlines() == ["gpu_check: no CUDA device; use --dry-run"]
    assert not out.exists()


def test_bad_part_is_a_usage_error(tmp_path: Path) -> None:
    proc = _run("--dry-run", "--parts", "ckpt,bogus", "--out", str(tmp_path / "g.json"), timeout=60)
    assert proc.returncode == 2
    assert "unknown part(s) ['bogus']" in proc.stderr and "Traceback" not in proc.stderr
