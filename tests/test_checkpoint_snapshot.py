"""Snapshot semantics: a checkpoint holds the values at save() time, eager and lazy."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from trainkit.checkpoint import Checkpointer

pytestmark = pytest.mark.timeout(120)


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.BatchNorm1d(64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    return model, opt


def _train_step(model, opt):
    loss = model(torch.randn(32, 16)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _assert_equal_state(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _assert_equal_state(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_eager_save_ignores_later_in_place_changes(tmp_path):
    model, opt = _model_and_opt()
    _train_step(model, opt)
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    expected = copy.deepcopy(state)
    with Checkpointer(tmp_path / "ck") as ck:
        handle = ck.save(1, state)
        with torch.no_grad():                      # clobber everything in place at once
            for p in model.parameters():
                p.mul_(-3).add_(1)
            for st in opt.state.values():
                st["exp_avg"].fill_(7)
            model[1].running_mean.fill_(9)
        assert handle.result(timeout=60) == 1
        _assert_equal_state(ck.load(1), expected)


def test_lazy_save_waits_in_step_pre_hook(tmp_path):
    model, opt = _model_and_opt()
    _train_step(model, opt)
    with Checkpointer(tmp_path / "ck") as ck:
        ck.attach(opt)
        state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 1}
        expected = copy.deepcopy(state)
        gate = threading.Event()
        ck._data.submit(gate.wait)                 # hold the background copy back
        handle = ck.save(1, state)
        snap = ck._lazy
        assert snap is not None and not snap.done  # optimizer-owned tensors not copied yet
        # The forward changes BatchNorm running stats in place: they were copied in save().
        # The step pre-hook copies the optimizer's tensors before step() changes them.
        _train_step(model, opt)
        assert snap.done and ck._lazy is None
        _train_step(model, opt)
        gate.set()
        assert handle.result(timeout=60) == 1
        loaded = ck.load()
        _assert_equal_state(loaded, expected)
        assert not torch.equal(loaded["model"]["0.weight"], model.state_dict()["0.weight"])
        assert not torch.equal(loaded["model"]["1.running_mean"], model[1].running_mean)


def test_lazy_resume_reproduces_training_exactly(tmp_path):
    """Save lazily in a loop; restoring any step and replaying gives identical weights."""
    model, opt = _model_and_opt()
    torch.manual_seed(1)
    with Checkpointer(tmp_path / "ck") as ck:
        ck.attach(opt)
        for step in range(1, 7):
            _train_step(model, opt)
            if step % 2 == 0:
                ck.save(step, {"model": model.state_dict(), "optim": opt.state_dict(),
                               "rng": torch.get_rng_state()})
        ck.wait()
        final = copy.deepcopy(model.state_dict())
        assert ck.steps() == [2, 4, 6] and ck.latest() == 6
        state = ck.load(4)
    model2, opt2 = _model_and_opt()
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optim"])
    torch.set_rng_state(state["rng"])
    for _ in range(2):
        _train_step(model2, opt2)
    _assert_equal_state(model2.state_dict(), final)


def test_backpressure_reuses_one_host_buffer(tmp_path):
    params = [torch.nn.Parameter(torch.randn(512, 512)) for _ in range(4)]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    with Checkpointer(tmp_path / "ck", chunk_bytes=1 << 20) as ck:
        ck.attach(opt)
        ptrs = set()
        for step in range(3):
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
            ck.save(step, {"p": params, "optim": opt.state_dict()})
            ptrs.add(ck._pool._buf.data_ptr())
        ck.wait()
        assert len(ptrs) == 1                      # allocated once, reused
        assert ck._pool.capacity < 2 * sum(p.numel() * 4 for p in params) * 1.2
        assert ck.steps() == [0, 1, 2]
