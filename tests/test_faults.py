"""trainkit.faults: the TRAINKIT_FAULT contract format and the once-per-run markers."""

from __future__ import annotations

import json
import time

import pytest

from trainkit.faults import FaultInjector, FaultSpec, FaultSpecError, parse_faults


def test_parse_contract_examples():
    (f,) = parse_faults("rank=2,step=50,kind=hang")
    assert (f.rank, f.step, f.kind) == (2, 50, "hang")
    kinds = parse_faults("rank=0,step=1,kind=hang_comm;rank=1,step=2,kind=crash;"
                         "rank=2,step=3,kind=slow:3.0;rank=3,step=4,kind=delay_peer:1:200")
    assert [k.kind for k in kinds] == ["hang_comm", "crash", "slow", "delay_peer"]
    assert kinds[2].factor == 3.0
    assert (kinds[3].peer, kinds[3].delay_ms) == (1, 200.0)


def test_parse_host_and_node_targets_and_whitespace():
    a, b = parse_faults(" host=node-3.example , step=10, kind=crash ; node=1,step=0,kind=hang ;")
    assert a.host == "node-3.example" and a.rank is None
    assert b.node == 1 and b.step == 0
    assert a.matches(rank=7, host="node-3.example", node=None)
    assert not a.matches(rank=7, host="other", node=None)
    assert b.matches(rank=5, host="x", node=1) and not b.matches(rank=5, host="x", node=0)


def test_empty_means_no_faults():
    assert parse_faults(None) == () and parse_faults("") == () and parse_faults("  ") == ()


@pytest.mark.parametrize("text, words", [
    ("rank=2,step=50", "missing kind"),
    ("rank=2,kind=hang", "missing step"),
    ("step=5,kind=hang", "exactly one of"),
    ("rank=1,host=a,step=5,kind=hang", "exactly one of"),
    ("rank=x,step=5,kind=hang", "not an integer"),
    ("rank=-1,step=5,kind=hang", ">= 0"),
    ("rank=1,step=5,kind=explode", "unknown kind"),
    ("rank=1,step=5,kind=slow", "slow needs one factor"),
    ("rank=1,step=5,kind=slow:fast", "not a number"),
    ("rank=1,step=5,kind=slow:0.5", "> 1"),
    ("rank=1,step=5,kind=delay_peer:1", "delay_peer needs"),
    ("rank=1,step=5,kind=delay_peer:1:abc", "not a number"),
    ("rank=1,step=5,kind=delay_peer:1:200", "to itself"),
    ("rank=1,step=5,kind=hang:3", "takes no parameters"),
    ("rank=1,step=5,kind=hang,color=red", "unknown key"),
    ("rank=1,step=5,step=6,kind=hang", "given twice"),
    ("rank=1,step,kind=hang", "expected key=value"),
])
def test_malformed_values_are_clear_errors(text, words):
    with pytest.raises(FaultSpecError) as info:
        parse_faults(text)
    assert words in str(info.value)
    assert "TRAINKIT_FAULT" in str(info.value)


def test_injector_targets_only_matching_rank(tmp_path):
    faults = parse_faults("rank=1,step=3,kind=slow:2.0")
    assert not FaultInjector(faults, rank=0, run_dir=tmp_path).active
    assert FaultInjector(faults, rank=1, run_dir=tmp_path).active


def test_slow_stretches_steps_and_leaves_marker(tmp_path):
    inj = FaultInjector(parse_faults("rank=0,step=2,kind=slow:3.0"), rank=0, run_dir=tmp_path,
                        attempt=0)
    durations = []
    for step in range(5):
        t0 = time.perf_counter()
        inj.on_step(step)
        inj.before_issue("allreduce", None)
        time.sleep(0.02)                       # the step's own work
        durations.append(time.perf_counter() - t0)
    assert max(durations[:2]) < 0.035
    # From step 3 on (the step after the fault armed) every step is ~3x longer.
    assert all(d > 0.05 for d in durations[3:]), durations
    markers = list((tmp_path / "faults").glob("*.json"))
    assert len(markers) == 1
    record = json.loads(markers[0].read_text())
    assert record["rank"] == 0 and record["kind"] == "slow" and record["step"] == 2


def test_each_fault_fires_once_per_run(tmp_path):
    spec = parse_faults("rank=0,step=1,kind=delay_peer:3:1")
    first = FaultInjector(spec, rank=0, run_dir=tmp_path, attempt=0)
    first.on_step(1)
    first.before_issue("send", 3)
    assert first._delays == {3: 0.001}
    # A restarted job inheriting the same environment: the marker stops a second firing.
    again = FaultInjector(spec, rank=0, run_dir=tmp_path, attempt=1)
    assert again.already_fired(spec[0])
    again.on_step(1)
    again.before_issue("send", 3)
    assert again._delays == {}


def test_host_fault_fires_on_every_rank_of_the_host_in_the_same_attempt(tmp_path):
    spec = parse_faults("host=h1,step=0,kind=slow:2.0")
    a = FaultInjector(spec, rank=0, run_dir=tmp_path, host="h1", attempt=0)
    b = FaultInjector(spec, rank=1, run_dir=tmp_path, host="h1", attempt=0)
    a.on_step(0)
    a.before_issue("allreduce", None)
    assert not b.already_fired(spec[0])       # same attempt, other rank: still due
    c = FaultInjector(spec, rank=1, run_dir=tmp_path, host="h1", attempt=1)
    assert c.already_fired(spec[0])           # a later attempt: fired already


def test_from_env_malformed_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("TRAINKIT_FAULT", "rank=1,step=oops,kind=hang")
    with pytest.raises(FaultSpecError, match="step='oops' is not an integer"):
        FaultInjector.from_env(rank=0, run_dir=tmp_path)


def test_fault_id_is_canonical():
    (f,) = parse_faults("kind=delay_peer:2:50.0, step=7, rank=1")
    assert f.fault_id == "rank=1,step=7,kind=delay_peer:2:50"
    assert parse_faults(f.fault_id)[0] == f
    assert isinstance(f, FaultSpec)


def test_separators_only_is_refused():
    for text in (";;;", " ; ", ";"):
        with pytest.raises(FaultSpecError, match="names no fault"):
            parse_faults(text)
