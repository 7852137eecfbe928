"""No silent blind spots: a DDP model or a group the monitor does not see is named.

Real gloo ranks; the monitor starts after DDP was built on the raw default group and
after a group was created, so both escape it. Each blind spot warns once per rank and is
noted once in diagnosis.jsonl, where ``trainkit diagnose`` shows it.
"""

from __future__ import annotations

import os
import warnings

import pytest

from distributed import run_ranks
from trainkit.detect.drill import stop_aggregator
from trainkit.rundir import read_jsonl

pytestmark = pytest.mark.timeout(90)


def _late_monitor(rank, world, run_dir):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainkit.detect import CollectiveMonitor

    model = DDP(torch.nn.Linear(4, 4))       # built on the raw default group
    group = dist.new_group([0, 1])           # created before the monitor
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = CollectiveMonitor(run_dir=run_dir, hang_timeout=10).start()
        model(torch.randn(2, 4)).sum().backward()
        t = torch.ones(1)
        for _ in range(3):
            dist.all_reduce(t, group=group)   # a collective on the unseen group, 3 times
        dist.all_reduce(t)                    # the monitored default group: no warning
        mon.close()
    return [str(w.message) for w in caught if "trainkit.detect" in str(w.message)]


def test_ddp_built_before_monitor_and_unseen_group_are_named(tmp_path):
    try:
        out = run_ranks(_late_monitor, 2, str(tmp_path), timeout=80)
    finally:
        stop_aggregator(tmp_path)
    for rank, messages in out.items():
        ddp = [m for m in messages if "DistributedDataParallel(Linear)" in m]
        unseen = [m for m in messages if "all_reduce" in m]
        assert len(ddp) == 1 and "the default group (WORLD)" in ddp[0], messages
        assert "build DDP/FSDP after CollectiveMonitor.start()" in ddp[0]
        assert len(unseen) == 1 and "ranks [0, 1]" in unseen[0], messages
        assert len(messages) == 2, messages
    notes = [r for r in read_jsonl(tmp_path / "diagnosis.jsonl") if r["class"] == "coverage"]
    assert sorted(n["evidence"]["blind_spot"] for n in notes) == ["collective", "module"], notes
    module = next(n for n in notes if n["evidence"]["blind_spot"] == "module")
    assert module["evidence"]["subject"] == "DistributedDataParallel(Linear)"
    from trainkit.detect.report import format_findings, load_findings

    text = format_findings(tmp_path, load_findings(tmp_path))
    assert "coverage" in text and "DistributedDataParallel(Linear)" in text
