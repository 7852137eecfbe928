"""``Checkpointer(host_budget_bytes=N)``: a snapshot larger than N goes out in waves.

What must hold: the step loads the values at ``save()`` time; ``optimizer.step()`` still
waits for the lazy copies it would clobber; the snapshot's host buffer stays within the
budget plus one chunk, measured both by the snapshot's own accounting and by the
process's resident memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from distributed import subprocess_env
from trainkit.checkpoint import Checkpointer
from trainkit.checkpoint import writer as writer_mod
from trainkit.checkpoint.snapshot import HOST_MEMORY

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(2048, 512, generator=g)               # 4 MiB storage
    return {
        "w": torch.randn(1024, 1024, generator=g),          # 4 MiB, spans several chunks
        "strided": big[:, :200],                             # stored densely, across chunks
        "t": torch.randn(300, 700, generator=g).t(),         # a transposed view
        "small": [torch.arange(10), torch.tensor(2.5)],
        "half": torch.randn(512, 512, generator=g).to(torch.bfloat16),
        "meta": {"step": 3},
    }


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return set(a) == set(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_waves_within_budget_load_the_saved_values(tmp_path):
    state = _state()
    expected = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    chunk, budget = 512 << 10, 2 * MiB
    HOST_MEMORY.reset_peak()
    base = HOST_MEMORY.current
    with Checkpointer(tmp_path / "ck", chunk_bytes=chunk, host_budget_bytes=budget) as ck:
        ck.save(1, state).result(60)
        with torch.no_grad():
            state["w"].fill_(7)            # after save(): must not reach the step
        ck.save(2, state).result(60)       # the same buffer takes the second save
        assert ck.stats["waves"] >= 3
        assert ck.stats["host_buffer_peak_bytes"] <= budget + chunk
        assert ck._pool.allocations == 1
        got = ck.load(1)
        assert _equal(got["w"], expected["w"]) and _equal(got["strided"], expected["strided"])
        assert _equal(got["t"], expected["t"]) and _equal(got["small"], expected["small"])
        assert _equal(got["half"], expected["half"]) and got["meta"] == {"step": 3}
        assert torch.equal(ck.load(2)["w"], torch.full((1024, 1024), 7.0))
    assert HOST_MEMORY.peak - base <= budget + chunk
    with Checkpointer(tmp_path / "ck") as ck:          # readable without a budget
        assert _equal(ck.load(1)["strided"], expected["strided"])


def test_lazy_mode_with_a_budget_still_blocks_the_step(tmp_path, monkeypatch):
    real = writer_mod._write_chunk

    def slow(*args, **kwargs):                 # slow storage: writes lag far behind copies
        time.sleep(0.02)
        return real(*args, **kwargs)

    monkeypatch.setattr(writer_mod, "_write_chunk", slow)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(256, 1024)) for _ in range(4)]   # 4 MiB
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    buffers = torch.randn(64, 1024)             # not owned by the optimizer: eager
    with Checkpointer(tmp_path / "ck", chunk_bytes=256 << 10, host_budget_bytes=MiB) as ck:
        ck.attach(opt)
        state = {"p": params, "optim": opt.state_dict(), "buf": buffers}
        before = [p.detach().clone() for p in params]
        momentum = [opt.state[p]["momentum_buffer"].clone() for p in params]
        buf_before = buffers.clone()
        handle = ck.save(5, state)
        buffers.add_(1)                         # the next forward: copied inside save()
        opt.step()                              # must wait for the lazy waves
        assert ck.stats["hook_wait_s"] > 0.05 and ck.stats["waves"] >= 8
        assert ck.stats["host_buffer_peak_bytes"] <= MiB + (256 << 10)
        handle.result(60)
        got = ck.load(5)
    assert not torch.equal(params[0], before[0])
    assert all(torch.equal(a, b) for a, b in zip(got["p"], before))
    assert all(torch.equal(got["optim"]["state"][i]["momentum_buffer"], m)
               for i, m in enumerate(momentum))
    assert torch.equal(got["buf"], buf_before)


_RSS_SCRIPT = r"""
import json, sys, threading, time
import psutil, torch
from trainkit.checkpoint import Checkpointer
path, budget, chunk = sys.argv[1], int(sys.argv[2]) or None, int(sys.argv[3])
state = {f"w{i}": torch.randn(1024, 1024 * 3) for i in range(8)}        # 96 MiB
proc = psutil.Process()
with Checkpointer(path, chunk_bytes=chunk, host_budget_bytes=budget) as ck:
    ck.save(0, {"w": torch.ones(4)}).result(60)     # threads and imports warmed up
    base = proc.memory_info().rss
    peak, stop = [base], threading.Event()
    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)
    t = threading.Thread(target=sample); t.start()
    ck.save(1, state).result(120)
    stop.set(); t.join()
    print(json.dumps({"rss_extra": peak[0] - base,
                      "buffer_peak": ck.stats["host_buffer_peak_bytes"]}))
"""


def _rss_extra(path, budget: int, chunk: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), str(budget), str(chunk)],
                         env=subprocess_env(), capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_resident_memory_stays_near_the_budget(tmp_path):
    chunk, budget = MiB, 8 * MiB
    got = _rss_extra(tmp_path / "budget", budget, chunk)
    # the buffer itself, plus allocator and thread-stack noise; the state is 96 MiB
    assert got["buffer_peak"] <= budget + chunk
    assert got["rss_extra"] <= budget + chunk + 16 * MiB, got
