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


# -- the tiered model ---------------------------------------------------------------------

def _tiered(**kw):
    from trainkit.checkpoint.advise import TierCost, advise_tiers

    base = dict(tiers=[TierCost(name="memory", commit_s=0.05, restore_s=0.3),
                       TierCost(name="persistent", commit_s=20.0, restore_s=60.0)],
                stall_s=0.02, detect_s=3.0, restart_s=5.0, node_mtbf_s=50000 * 3600.0,
                nodes=1024)
    return advise_tiers(**{**base, **kw})


def test_tiers_restore_each_fault_class_from_the_fastest_tier_that_survives_it():
    from trainkit.checkpoint.advise import TierCost, advise_tiers

    a = _tiered()
    assert a.restored_from == {"process": "memory", "reboot": "persistent", "node": "persistent"}
    assert a.survives["memory"] == ["process"]
    assert a.survives["persistent"] == ["process", "reboot", "node"]
    assert sum(a.terms.values()) == pytest.approx(1 - a.goodput)
    assert a.limiting == max(a.terms, key=a.terms.get)
    # the interval chosen is the optimum: fixing it elsewhere loses goodput
    tau = a.intervals_s["memory"]
    for factor in (0.3, 3.0):
        assert _tiered(interval_s=tau * factor).goodput < a.goodput
    # the persistent tier cannot take copies faster than its commit latency
    assert a.intervals_s["persistent"] >= 20.0
    # without the memory tier, every crash restores from the slow persistent tier
    slow = advise_tiers(tiers=[TierCost(name="persistent", commit_s=20.0, restore_s=60.0)],
                        stall_s=0.02, detect_s=3.0, restart_s=5.0,
                        node_mtbf_s=50000 * 3600.0, nodes=1024)
    assert slow.goodput < a.goodput and slow.restored_from["process"] == "persistent"


def test_tiers_bad_input_is_named():
    from trainkit.checkpoint.advise import TierCost

    with pytest.raises(ValueError, match="no tier survives reboot faults"):
        _tiered(tiers=[TierCost(name="memory", commit_s=0.1, restore_s=0.1)])
    with pytest.raises(ValueError, match="unknown tier 'disk'"):
        _tiered(tiers=[TierCost(name="disk", commit_s=0.1, restore_s=0.1)])
    with pytest.raises(ValueError, match="restart time"):
        _tiered(restart_s=-1.0)


def test_advise_from_run_reads_goodput_json(tmp_path, capsys):
    import json

    from trainkit.cli import main

    doc = {"wall_s": 30.0, "productive_s": 20.0, "goodput": 0.667,
           "badput_s": {"startup": 4.0, "shutdown": 1.0},
           "measured": {"step_s": 0.1, "ckpt_stall_s": 0.01, "ckpt_interval_steps": 3,
                        "commit_s": {"memory": 0.05, "persistent": 0.5},
                        "restores": [{"tier": "memory", "seconds": 0.2, "step": 6}],
                        "detection_s": [1.0], "restart_s": [2.0]}}
    (tmp_path / "goodput.json").write_text(json.dumps(doc))
    args = ["ckpt", "advise", "--from-run", str(tmp_path), "--nodes", "512",
            "--node-mtbf-hours", "20000"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "limited by:" in out and "memory" in out and "persistent" in out
    assert "restore time of persistent not measured" in out and "measured 0.800" in out
    assert main([*args, "--json", "--tier", "persistent:0.5:30"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["restores_s"] == {"memory": 0.2, "persistent": 30.0}
    assert 0 < data["from_run"]["check"]["modelled"] < 1
    assert main(["ckpt", "advise", "--from-run", str(tmp_path / "none"), "--nodes", "8",
                 "--node-mtbf-hours", "100"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "goodput.json: not found" in err
    assert main(["ckpt", "advise", "--tier", "memory:x", "--nodes", "8",
                 "--node-mtbf-hours", "100"]) == 2
    assert "NAME:COMMIT_S:RESTORE_S" in capsys.readouterr().err
    assert main(["ckpt", "advise", "--nodes", "8", "--node-mtbf-hours", "100"]) == 2
    assert "--stall, --persist, --restore, --detect required" in capsys.readouterr().err
