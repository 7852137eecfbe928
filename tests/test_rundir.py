"""The run-dir ground floor: the Finding contract, and one tolerant JSON-lines reading."""

from __future__ import annotations

import json

import pytest

from trainkit.detect.report import load_findings
from trainkit.rundir import (DIAGNOSIS_FILE, FINDING_FIELDS, Finding, FindingTail, JsonlTail,
                             local_identity, read_findings, read_jsonl)

LINE = {"time": 100.0, "class": "hang_noncomm", "ranks": [1, 3], "hosts": ["h0", "h1"],
        "ids": [{"rank": 1, "host": "h0", "local_rank": 1, "attempt": 2},
                {"rank": 3, "host": "h1", "local_rank": 1, "attempt": 2}],
        "link": None, "step": 7, "group": "0", "seq": 13, "evidence": {"op": "allreduce"},
        "confidence": 0.95}


def test_finding_round_trips_with_the_contract_fields():
    f = Finding.from_json(LINE)
    assert f.cls == "hang_noncomm" and f.ranks == (1, 3) and f.step == 7
    assert tuple(f.to_json()) == FINDING_FIELDS
    assert f.to_json() == LINE
    assert Finding.from_json(json.loads(json.dumps(f.to_json()))) == f


def test_finding_keeps_unknown_fields_and_fills_missing_ones():
    f = Finding.from_json({"time": 1, "class": "crash", "newer_field": {"x": 1}})
    assert f.ranks == () and f.link is None and f.evidence == {}
    assert f.extra == {"newer_field": {"x": 1}}
    assert f.to_json()["newer_field"] == {"x": 1}


@pytest.mark.parametrize("field, value, words", [
    ("ranks", "1", "'ranks'"), ("ranks", [1, "2"], "'ranks'"), ("time", "soon", "'time'"),
    ("class", 3, "'class'"), ("hosts", [1], "'hosts'"), ("ids", [3], "'ids'"),
    ("link", [1], "two ranks"), ("step", 1.5, "'step'"), ("evidence", [], "'evidence'"),
    ("confidence", "high", "'confidence'"), ("ranks", [True], "'ranks'"),
])
def test_finding_of_the_wrong_type_is_a_clear_value_error(field, value, words):
    with pytest.raises(ValueError, match=words):
        Finding.from_json({**LINE, field: value})


def test_finding_without_time_or_class_or_not_an_object_is_a_value_error():
    with pytest.raises(ValueError, match="'class'"):
        Finding.from_json({"time": 1.0})
    with pytest.raises(ValueError, match="JSON object"):
        Finding.from_json([1, 2])


def test_named_hosts_is_the_one_host_field():
    f = Finding.from_json({**LINE, "ranks": [0, 1, 2], "hosts": ["h1", "h1", "?"]})
    assert f.named_hosts == ("h1",)
    # A hand-written line with identities only: hosts come from ids.
    only_ids = {k: v for k, v in LINE.items() if k != "hosts"}
    assert Finding.from_json(only_ids).named_hosts == ("h0", "h1")
    assert Finding.from_json(LINE).attempts == {2}


def test_every_reader_skips_a_torn_last_line(tmp_path):
    """The aggregator killed mid-write: `trainkit diagnose`, the whole-file reader and
    `trainkit run`'s tail all see the same two findings, and none raises."""
    path = tmp_path / DIAGNOSIS_FILE
    tail, findings_tail = JsonlTail(path), FindingTail(tmp_path)   # before the file exists
    second = {**LINE, "time": 101.0}
    path.write_text(json.dumps(LINE) + "\n" + json.dumps(second) + "\n" + '{"time": 102, "cl')
    assert read_jsonl(path) == [LINE, second]
    assert load_findings(tmp_path) == [LINE, second]
    assert [f.time for f in read_findings(tmp_path)] == [100.0, 101.0]
    assert tail.poll() == [LINE, second]
    assert [f.time for f in findings_tail.poll()] == [100.0, 101.0]
    with open(path, "a") as fh:          # the writer finishes its line: the tails get it
        fh.write('ass": "crash"}\n')
    assert [r["time"] for r in tail.poll()] == [102]
    assert [f.cls for f in findings_tail.poll()] == ["crash"]
    assert tail.poll() == []


def test_tail_starts_at_the_end_and_skips_complete_garbage(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"old": 1}\n')
    tail = JsonlTail(path)
    with open(path, "a") as fh:
        fh.write('not json\n{"new": 2}\n')
    assert tail.poll() == [{"new": 2}]
    assert read_jsonl(path) == [{"old": 1}, {"new": 2}]
    assert JsonlTail(path, from_start=True).poll() == [{"old": 1}, {"new": 2}]


def test_finding_tail_skips_lines_that_are_not_findings(tmp_path):
    tail = FindingTail(tmp_path)
    (tmp_path / DIAGNOSIS_FILE).write_text('[1]\n{"time": "x", "class": "crash"}\n'
                                           + json.dumps(LINE) + "\n")
    assert [f.cls for f in tail.poll()] == ["hang_noncomm"]


def test_read_jsonl_of_a_missing_file_is_empty(tmp_path):
    assert read_jsonl(tmp_path / "none.jsonl") == []
    assert JsonlTail(tmp_path / "none.jsonl").poll() == []


def test_local_identity_prefers_trainkit_run_variables(monkeypatch):
    monkeypatch.setenv("TRAINKIT_HOSTNAME", "node7")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("TRAINKIT_GENERATION", "4")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TRAINKIT_NODE_INDEX", "2")
    monkeypatch.setenv("GROUP_RANK", "0")
    assert local_identity() == ("node7", 3, 4, 2)
    for name in ("TRAINKIT_GENERATION", "TRAINKIT_NODE_INDEX", "GROUP_RANK"):
        monkeypatch.delenv(name)
    assert local_identity() == ("node7", 3, 1, None)
