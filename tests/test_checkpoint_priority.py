"""The checkpoint's background threads run at a lower priority (Linux, per thread), the
data thread (whose lazy copy optimizer.step() may wait for) and the caller do not."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

from trainkit.checkpoint import Checkpointer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="per-thread nice values are Linux-only")


def _nice_by_thread() -> dict[str, int]:
    return {t.name.rsplit("_", 1)[0]: os.getpriority(os.PRIO_PROCESS, t.native_id)
            for t in threading.enumerate() if t.name.startswith("trainkit-ckpt")}


@pytest.mark.parametrize("nice", [10, 3, 0])
def test_background_threads_are_niced(tmp_path, nice):
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with Checkpointer(tmp_path / "ck", local_dir=tmp_path / "local", timeout=30,
                      background_nice=nice) as ck:
        ck.save(1, {"w": torch.randn(1000)}).result(timeout=60)
        ck.wait()
        got = _nice_by_thread()
    want = min(19, mine + nice)
    assert got["trainkit-ckpt-io"] == want and got["trainkit-ckpt-commit"] == want, got
    assert got["trainkit-ckpt-data"] == mine, got
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
