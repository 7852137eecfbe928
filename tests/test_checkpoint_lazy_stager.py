"""LazyStager: ``dcp.async_save(..., async_stager=LazyStager(optimizer))`` while training runs.

What must hold: a step loads the values it had when ``async_save`` was called (not the
values training wrote afterwards), ``optimizer.step()`` waits for copies it would
clobber, host buffers are reused across saves but never while a save may still read
them; for FSDP2 (DTensor) and DDP (plain tensor) state, with DCP plan caching on.
"""

from __future__ import annotations

import gc
import threading
import time
import uuid
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner

from distributed import run_ranks
from trainkit.checkpoint import LazyStager, ZarrReader, ZarrWriter
from trainkit.checkpoint.reader import verify_step
from trainkit.checkpoint.snapshot import Snapshot

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]


def _adam_model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.BatchNorm1d(64),
                                torch.nn.Linear(64, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=0.05)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(8, 16)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def test_stage_copies_lazily_and_step_waits(monkeypatch):
    model, opt = _adam_model()
    _step(model, opt)
    gate = threading.Event()
    real_copy = Snapshot._copy

    def gated(self, b):                    # hold back the lazy (optimizer-owned) copies
        if b in self._lazy_set:
            gate.wait(30)
        real_copy(self, b)

    monkeypatch.setattr(Snapshot, "_copy", gated)
    stager = LazyStager(opt)
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "note": [1, 2]}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    future = stager.stage(state)
    assert stager.stats["lazy_bytes"] > 0 and stager.stats["eager_bytes"] > 0
    assert not future.done()               # eager part copied, lazy part still pending
    with torch.no_grad():                   # the next forward changes BatchNorm stats:
        model[1].running_mean.add_(5)       # already copied inside stage()
    model(torch.randn(8, 16)).pow(2).mean().backward()
    stepper = threading.Thread(target=opt.step)
    stepper.start()
    time.sleep(0.3)
    assert stepper.is_alive()               # optimizer.step() waits for the lazy copy
    assert torch.equal(model[0].weight, before["0.weight"])
    gate.set()
    stepper.join(30)
    assert not stepper.is_alive() and stager.stats["hook_wait_s"] > 0
    staged = future.result(30)
    assert not torch.equal(model[0].weight, before["0.weight"])     # the step ran after
    for k, v in before.items():
        assert torch.equal(staged["model"][k], v), k
    assert staged["note"] == [1, 2] and staged["note"] is not state["note"]
    stager.close()
    assert opt._optimizer_step_pre_hooks == {}


def test_buffers_reused_but_never_while_a_save_holds_them():
    model, opt = _adam_model()
    _step(model, opt)
    stager = LazyStager(opt)
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    first = stager.stage(state).result(30)       # still referenced: an upload in flight
    second = stager.stage(state).result(30)
    assert stager.stats["buffer_allocations"] == 2
    ptr = second["model"]["0.weight"].untyped_storage().data_ptr()
    assert ptr != first["model"]["0.weight"].untyped_storage().data_ptr()
    before = first["model"]["0.weight"].clone()
    _step(model, opt)
    del second
    third = stager.stage(state).result(30)       # the second buffer is free again
    assert stager.stats["buffer_reuses"] == 1 and stager.stats["buffer_allocations"] == 2
    assert third["model"]["0.weight"].untyped_storage().data_ptr() == ptr
    assert torch.equal(first["model"]["0.weight"], before)         # never overwritten
    assert torch.equal(third["model"]["0.weight"], model[0].weight)
    stager.close()


def test_async_save_single_process_round_trip(tmp_path):
    model, opt = _adam_model()
    _step(model, opt)
    stager = LazyStager(opt)
    for step in range(2):
        state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        response = dcp.async_save(state, storage_writer=ZarrWriter(tmp_path, step=step),
                                  async_stager=stager)
        _step(model, opt)
        response.upload_completion.result(60)
        target = {"model": {k: torch.zeros_like(v) for k, v in expected.items()}, "step": -1}
        dcp.load(target, storage_reader=ZarrReader(tmp_path, step=step, allow_pickle=True))  # our own step: DCP pickles non-tensor values
        assert target["step"] == step
        for k, v in expected.items():
            assert torch.equal(target["model"][k], v), (step, k)
        assert verify_step(tmp_path, step) == []
    assert stager.stats["buffer_reuses"] == 1
    stager.close()


# ---------------------------------------------------------------- FSDP2 and DDP on gloo

class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(64, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.proj = torch.nn.Linear(32, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(self.emb(x)))


def _build(kind: str, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model: torch.nn.Module = _Tiny()
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in (model.emb, model.norm, model.proj):
            fully_shard(layer)
        fully_shard(model)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randint(0, 64, (4, 6), generator=g)).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()


def _full(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    full = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    return _clone(full)      # some values (AdamW's step) are the live tensors themselves


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def _differences(a, b, where: str) -> list[str]:
    if isinstance(a, torch.Tensor):
        if isinstance(b, torch.Tensor) and torch.equal(a, b):
            return []
        return [f"{where}={a.tolist()}!={b.tolist()}" if a.ndim == 0 else where]
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [where]
        return [p for k in a for p in _differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list):
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in _differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


def _save_while_training(rank: int, world_size: int, root: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    warnings.filterwarnings("ignore")
    ckpt_pg = dist.new_group(backend="gloo")        # DCP's collectives, off the training PG
    planner_cls = type(f"Caching_{uuid.uuid4().hex[:8]}", (DefaultSavePlanner,), {})
    out: dict = {"problems": []}
    for kind in ("fsdp2", "ddp"):
        path = f"{root}/{kind}"
        model, opt = _build(kind, 0)
        _train(model, opt, 2, seed=1)
        stager = LazyStager(opt)
        saved = []
        ptrs = set()
        for i in range(2):                          # the second save reuses the cached plan
            expected = _full(model, opt)
            model_sd, optim_sd = get_state_dict(model, opt)
            response = dcp.async_save({"model": model_sd, "optim": optim_sd},
                                      storage_writer=ZarrWriter(path),   # coordinator picks
                                      planner=planner_cls(enable_plan_caching=True),
                                      async_stager=stager, process_group=ckpt_pg)
            _train(model, opt, 2, seed=10 + i)     # training continues during the upload
            response.upload_completion.result(60)
            # the buffer is reused only once nothing holds the previous staged state: drop
            # the response (and DCP's cycles around it) so reuse does not depend on GC timing
            del response
            gc.collect()
            saved.append(expected)
            local = next(iter(stager._slots)).pool._buf                 # noqa: SLF001
            ptrs.add(local.data_ptr())
        stager.close()
        final = _full(model, opt)
        for step, expected in enumerate(saved):
            fresh, fresh_opt = _build(kind, 5)
            _train(fresh, fresh_opt, 1, seed=99)            # optimizer state exists
            m_sd, o_sd = get_state_dict(fresh, fresh_opt)
            target = {"model": m_sd, "optim": o_sd}
            dcp.load(target, storage_reader=ZarrReader(path, step=step, allow_pickle=True))  # our own step
            set_state_dict(fresh, fresh_opt, model_state_dict=target["model"],
                           optim_state_dict=target["optim"])
            got = _full(fresh, fresh_opt)
            out["problems"] += [f"{kind} step {step}: {p}" for p in
                                _differences(expected[0], got[0], "model")
                                + _differences(expected[1], got[1], "optim")]
            if not _differences(final[0], got[0], "model"):
                out["problems"].append(f"{kind} step {step}: holds the final values")
        out[kind] = {"buffers": len(ptrs), "reuses": stager.stats["buffer_reuses"],
                     "lazy": stager.stats["lazy_bytes"], "eager": stager.stats["eager_bytes"]}
    return out


@pytest.mark.timeout(180)
def test_async_save_fsdp2_and_ddp_while_training(tmp_path):
    out = run_ranks(_save_while_training, 2, str(tmp_path), timeout=170)
    for rank, result in out.items():
        assert result["problems"] == [], (rank, result["problems"])
        for kind in ("fsdp2", "ddp"):
            stats = result[kind]
            assert stats["buffers"] == 1 and stats["reuses"] == 1, (rank, kind, stats)
            assert stats["lazy"] > 0, (rank, kind, stats)
    for kind in ("fsdp2", "ddp"):
        for step in range(2):
            assert verify_step(tmp_path / kind, step) == [], (kind, step)
