"""``trainkit diagnose``: missing/empty run dirs, text output, the timeline plot."""

from __future__ import annotations

import json

from trainkit.cli import main


def _write_run(run_dir):
    finding = {"time": 1700000000.5, "class": "hang_noncomm", "ranks": [1], "hosts": ["h0"],
               "ids": [{"rank": 1, "host": "h0", "local_rank": 1, "attempt": 0}], "link": None,
               "step": 8, "group": "0", "seq": 13,
               "evidence": {"never_arrived": [1], "stacks": {"1": "File \"train.py\", line 9"}},
               "confidence": 0.95}
    (run_dir / "diagnosis.jsonl").write_text(json.dumps(finding) + "\n")
    colls = [{"group": "0", "seq": s, "op": "allreduce", "bytes": 64, "step": s,
              "issue": {"0": 1699999990.0 + s, "1": 1699999990.1 + s},
              "done": {"0": 1699999990.2 + s, "1": 1699999990.2 + s}} for s in range(5)]
    colls.append({"group": "0", "seq": 5, "op": "allreduce", "bytes": 64, "step": 5,
                  "issue": {"0": 1699999996.0}, "done": {}})
    (run_dir / "timeline.jsonl").write_text(json.dumps(
        {"finding": 0, "class": "hang_noncomm", "time": 1700000000.5, "ranks": [1],
         "colls": colls, "steps": {}}) + "\n")


def test_missing_run_dir_says_so(tmp_path, capsys):
    assert main(["diagnose", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_empty_run_dir_says_so(tmp_path, capsys):
    assert main(["diagnose", str(tmp_path)]) == 0
    assert "no findings" in capsys.readouterr().out


def test_findings_printed_for_a_person(tmp_path, capsys):
    _write_run(tmp_path)
    assert main(["diagnose", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 finding(s)" in out and "hang_noncomm" in out
    assert "rank 1 on h0" in out and "seq 13" in out and "train.py" in out


def test_json_output_round_trips(tmp_path, capsys):
    _write_run(tmp_path)
    assert main(["diagnose", str(tmp_path), "--json"]) == 0
    line = capsys.readouterr().out.strip()
    assert json.loads(line)["class"] == "hang_noncomm"


def test_plot_renders_png(tmp_path, capsys):
    _write_run(tmp_path)
    out = tmp_path / "t.png"
    assert main(["diagnose", str(tmp_path), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_corrupt_findings_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "diagnosis.jsonl").write_text("{not json\n")
    assert main(["diagnose", str(tmp_path)]) == 2
    assert "diagnosis.jsonl:1: not a JSON line" in capsys.readouterr().err
