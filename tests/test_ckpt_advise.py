"""`trainkit ckpt advise`: Young/Daly's interval, the clamp, and the waste it predicts."""

from __future__ import annotations

import math

import pytest

from trainkit.checkpoint.advise import advise, waste


def test_young_interval_minimises_waste_and_uses_job_mtbf():
    a = advise(stall_s=2.0, persist_s=5.0, restore_s=30.0, detect_s=10.0,
               node_mtbf_s=1000 * 3600.0, nodes=100)
    mtbf = 1000 * 3600.0 / 100
    assert a.job_mtbf_s == pytest.approx(mtbf)
    assert a.interval_s == pytest.approx(math.sqrt(2 * 2.0 * mtbf))
    kw = dict(stall_s=2.0, commit_s=5.0, detect_s=10.0, restore_s=30.0, job_mtbf_s=mtbf)
    best = waste(a.interval_s, **kw)
    assert best == pytest.approx(a.fraction_lost)
    for factor in (0.5, 0.9, 1.1, 2.0):  # any other interval loses more
        assert waste(a.interval_s * factor, **kw) > best
    assert a.loss_per_failure_s == pytest.approx(a.interval_s / 2 + 5 + 10 + 30)
    assert not a.clamped
    assert a.daly_interval_s < a.interval_s  # Daly subtracts the checkpoint cost


def test_interval_never_shorter_than_persist_latency():
    a = advise(stall_s=0.01, persist_s=120.0, restore_s=1.0, detect_s=1.0,
               node_mtbf_s=3600.0, nodes=64)
    assert a.clamped and a.interval_s == 120.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(stall_s=-1.0), "stall"),
    (dict(node_mtbf_s=0.0), "MTBF"),
    (dict(nodes=0), "node count"),
    (dict(restore_s=float("nan")), "restore"),
])
def test_bad_input_is_named(kwargs, message):
    base = dict(stall_s=1.0, persist_s=1.0, restore_s=1.0, detect_s=1.0, node_mtbf_s=3600.0,
                nodes=8)
    with pytest.raises(ValueError, match=message):
        advise(**{**base, **kwargs})


def test_cli_prints_interval_and_rejects_bad_values(capsys):
    import json

    from trainkit.cli import main

    assert main(["ckpt", "advise", "--stall", "2", "--persist", "5", "--restore", "30",
                 "--detect", "10", "--node-mtbf-hours", "1000", "--nodes", "100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["interval_s"] == pytest.approx(math.sqrt(2 * 2.0 * 36000.0))
    assert main(["ckpt", "advise", "--stall", "2", "--persist", "5", "--restore", "30",
                 "--detect", "10", "--node-mtbf-hours", "1000", "--nodes", "0"]) == 2
    assert "node count" in capsys.readouterr().err
