"""examples/train.py under real torchrun: an interrupted-and-resumed run reproduces the
uninterrupted run's losses exactly, step for step."""

from __future__ import annotations

import re

import pytest

from distributed import REPO_ROOT, run_torchrun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TRAIN = REPO_ROOT / "examples" / "train.py"


def _losses(path) -> list[tuple[int, str]]:
    return [(int(s), v) for s, v in (line.split() for line in path.read_text().splitlines())]


def test_interrupted_run_resumes_to_identical_losses(tmp_path):
    common = ["--steps", "40", "--ckpt-every", "10", "--hidden", "64"]
    ref = run_torchrun(TRAIN, 2, *common, "--ckpt-dir", str(tmp_path / "a"),
                       "--loss-log", str(tmp_path / "a.txt"), timeout=120)
    assert ref.returncode == 0, ref.stdout[-3000:]
    run = [*common, "--ckpt-dir", str(tmp_path / "b"), "--loss-log", str(tmp_path / "b.txt")]
    crashed = run_torchrun(TRAIN, 2, *run, "--stop-after", "25", timeout=120)
    assert crashed.returncode != 0                  # the simulated crash
    resumed = run_torchrun(TRAIN, 2, *run, timeout=120)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    # The crash may come before step 20's save committed (it runs in the background):
    # then the run resumes from step 10, which is just as correct.
    match = re.search(r"resumed from step (\d+)", resumed.stdout)
    assert match and int(match.group(1)) in (10, 20), resumed.stdout[-3000:]
    resumed_from = int(match.group(1))
    reference = dict(_losses(tmp_path / "a.txt"))
    rows = _losses(tmp_path / "b.txt")
    assert len(reference) == 40
    assert {s for s, _ in rows} == set(reference)
    assert len(rows) == 40 + 25 - resumed_from     # steps after the checkpoint ran twice
    assert [(s, v) for s, v in rows if reference[s] != v] == []
