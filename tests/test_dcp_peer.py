"""PyTorch's own DCP test scenarios, run against trainkit's ZarrWriter / ZarrReader.

Why: ``FileSystemWriter``/``FileSystemReader`` are the reference storage of
``torch.distributed.checkpoint``; PyTorch's test suite (``test/distributed/checkpoint``:
``test_file_system_checkpoint_cpu``, ``test_dtensor_resharding``, ``test_fsdp_dsd``,
``test_save_load_api``, ``test_planner``'s plan caching) defines what a storage layer
must survive. The scenarios below are re-written here for gloo on CPU, and every one
runs on both backends: ``fs`` (PyTorch's own writer, the control that shows a scenario
is meaningful) and ``zarr`` (trainkit's). A difference between the two is a trainkit bug.

Covered: plain and nested state, partial and strict loads, DTensor 1-D/2-D placement and
mesh changes with uneven shards, FSDP2 through ``get_state_dict``/``set_state_dict``,
``async_save`` in thread and process mode, and save plan caching (a committed step is
never written again: every earlier step is verified after each save).
"""

from __future__ import annotations

import io
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    FileSystemReader,
    FileSystemWriter,
)

from distributed import run_ranks
from trainkit.checkpoint import ZarrReader, ZarrWriter
from trainkit.checkpoint.reader import committed_steps, verify_step

BACKENDS = ("zarr", "fs")
# DCP wraps a rank's failure in CheckpointException, a BaseException; alone it raises
_DCP_ERRORS = (CheckpointException, RuntimeError, ValueError)


def _writer(kind: str, root: str | Path, step: int | None) -> Any:
    """One step's writer; ``step=None`` lets ZarrWriter's coordinator choose the step."""
    if kind == "zarr":
        return ZarrWriter(root, step=step)
    return FileSystemWriter(str(Path(root) / f"fs_{step}"))


def _reader(kind: str, root: str | Path, step: int) -> Any:
    if kind == "zarr":
        return ZarrReader(root, step=step, allow_pickle=True)
    return FileSystemReader(str(Path(root) / f"fs_{step}"))


def _fresh_caching_planner() -> DefaultSavePlanner:
    """A planner with plan caching on and a cache of its own.

    DCP keys its class-level plan cache by the planner's class name, so a new subclass
    per test keeps one test's cached plans out of another's.
    """
    cls = type(f"CachingPlanner_{uuid.uuid4().hex[:8]}", (DefaultSavePlanner,), {})
    return cls(enable_plan_caching=True)


def _nested_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "weight": torch.randn(8, 4, generator=g),
        "nested": {"list": [torch.randn(3, generator=g), {"deep": torch.arange(5) + seed}],
                   "count": 7 + seed, "name": f"run-{seed}"},
        "blob": io.BytesIO(b"opaque bytes " + bytes([seed])),
        "half": torch.randn(2, 2, generator=g).to(torch.bfloat16),
    }


def _zeros_like_tree(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return torch.zeros_like(obj)
    if isinstance(obj, dict):
        return {k: _zeros_like_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_zeros_like_tree(v) for v in obj]
    if isinstance(obj, io.BytesIO):
        return io.BytesIO()
    return None


def _same(a: Any, b: Any, where: str = "state") -> list[str]:
    """Paths at which two state trees differ (empty: equal)."""
    if isinstance(a, torch.Tensor):
        ok = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if ok else [where]
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [where]
        return [p for k in a for p in _same(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            return [where]
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in _same(x, y, f"{where}[{i}]")]
    if isinstance(a, io.BytesIO):
        b.seek(0)
        return [] if isinstance(b, io.BytesIO) and a.getvalue() == b.read() else [where]
    return [] if a == b else [where]


def _failure_text(exc: BaseException) -> str:
    """The message of a DCP error, including the per-rank failures it wraps."""
    failures = getattr(exc, "failures", None) or {}
    return " ".join([str(exc)] + [repr(f) for f in failures.values()])


# ----------------------------------------------------------------- single process (no PG)

@pytest.mark.parametrize("kind", BACKENDS)
def test_plain_and_nested_state_round_trip(tmp_path, kind):
    state = _nested_state(1)
    dcp.save(state, storage_writer=_writer(kind, tmp_path, 3))
    target = _zeros_like_tree(state)
    dcp.load(target, storage_reader=_reader(kind, tmp_path, 3))
    assert _same(state, target) == []
    if kind == "zarr":
        assert verify_step(tmp_path, 3) == []


@pytest.mark.parametrize("kind", BACKENDS)
def test_partial_and_strict_loads(tmp_path, kind):
    state = {"a": torch.arange(6.0), "b": torch.ones(2, 3), "c": {"d": torch.full((4,), 2.0)}}
    dcp.save(state, storage_writer=_writer(kind, tmp_path, 0))
    # a subset of the saved keys: loads what is asked for
    subset = {"c": {"d": torch.zeros(4)}}
    dcp.load(subset, storage_reader=_reader(kind, tmp_path, 0))
    assert torch.equal(subset["c"]["d"], state["c"]["d"])
    # a key the checkpoint lacks: strict by default ...
    extra = {"a": torch.zeros(6), "missing": torch.zeros(2)}
    with pytest.raises(_DCP_ERRORS) as refused:
        dcp.load(extra, storage_reader=_reader(kind, tmp_path, 0))
    assert "Missing key in checkpoint state_dict: missing" in _failure_text(refused.value)
    # ... and partial on request: what matches is loaded, the rest left untouched
    extra = {"a": torch.zeros(6), "missing": torch.full((2,), -1.0)}
    dcp.load(extra, storage_reader=_reader(kind, tmp_path, 0),
             planner=DefaultLoadPlanner(allow_partial_load=True))
    assert torch.equal(extra["a"], state["a"]) and extra["missing"].tolist() == [-1.0, -1.0]
    # a shape that does not match is refused by both
    wrong = {"b": torch.zeros(3, 2)}
    with pytest.raises(_DCP_ERRORS):
        dcp.load(wrong, storage_reader=_reader(kind, tmp_path, 0))


def _caching_loop(kind: str, root: str | Path, *, same_writer: bool, saves: int,
                  rank: int = 0) -> list[str]:
    """Saves with plan caching on; after each, every earlier step is checked.

    Returns the problems found (empty: none). ZarrWriter chooses each step itself
    (``step=None``), which is what a cached plan used to send back to the old step.
    """
    planner = _fresh_caching_planner()
    problems: list[str] = []
    saved: dict[int, dict] = {}
    shared = _writer(kind, root, None) if (kind == "zarr" and same_writer) else None
    for i in range(saves):
        state = {"w": torch.full((64, 8), float(i)), "b": torch.arange(8.0) * i,
                 f"rank{rank}": torch.full((3,), float(rank))}   # DCP dedups same-key values
        writer = shared if shared is not None else _writer(kind, root, None if kind == "zarr" else i)
        dcp.save(state, storage_writer=writer, planner=planner)
        step = writer.last_step if kind == "zarr" else i
        if step in saved:
            problems.append(f"save {i} reused step {step}")
        saved[step] = {k: v.clone() for k, v in state.items()}
        for old, values in saved.items():
            if kind == "zarr":
                bad = verify_step(root, old)
                if bad:
                    problems.append(f"after save {i}: step {old} fails verify: {bad}")
                    continue
            target = {k: torch.zeros_like(v) for k, v in values.items()}
            dcp.load(target, storage_reader=_reader(kind, root, old))
            if _same(values, target):
                problems.append(f"after save {i}: step {old} holds other values")
    if kind == "zarr" and sorted(saved) != committed_steps(root):
        problems.append(f"committed {committed_steps(root)}, saved {sorted(saved)}")
    return problems


@pytest.mark.parametrize("same_writer", [True, False], ids=["one-writer", "writer-per-save"])
@pytest.mark.parametrize("kind", BACKENDS)
def test_plan_caching_never_touches_a_committed_step(tmp_path, kind, same_writer):
    assert _caching_loop(kind, tmp_path, same_writer=same_writer, saves=4) == []


@pytest.mark.parametrize("kind", BACKENDS)
def test_async_save_thread(tmp_path, kind):
    state = _nested_state(2)
    dcp.async_save(state, storage_writer=_writer(kind, tmp_path, 5)).result(timeout=60)
    target = _zeros_like_tree(state)
    dcp.load(target, storage_reader=_reader(kind, tmp_path, 5))
    assert _same(state, target) == []


# ----------------------------------------------------------------- DTensor on 4 gloo ranks

def _placements() -> tuple[list, list]:
    from torch.distributed.tensor import Replicate, Shard

    one_d = [[Shard(0)], [Replicate()], [Shard(1)]]
    two_d = [[Replicate(), Replicate()], [Replicate(), Shard(0)], [Shard(0), Replicate()],
             [Shard(0), Shard(0)], [Shard(0), Shard(1)]]
    return one_d, two_d


def _dtensor_scenarios(rank: int, world_size: int, root: str) -> list[str]:
    """Every (saved layout -> loaded layout) pair of PyTorch's resharding tests, plus
    uneven shards (7 rows over 4 ranks) and a world-size-1 mesh change, on both backends."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    one_d, two_d = _placements()
    mesh_1d = init_device_mesh("cpu", (world_size,))
    mesh_2d = init_device_mesh("cpu", (2, world_size // 2))
    layouts = [(mesh_1d, p) for p in one_d] + [(mesh_2d, p) for p in two_d]
    problems: list[str] = []
    step = 0
    for kind in BACKENDS:
        for shape in ((8, 4), (7, 3)):
            full = torch.arange(shape[0] * shape[1], dtype=torch.float32).view(shape)
            for i, (mesh_a, place_a) in enumerate(layouts):
                saved = distribute_tensor(full, mesh_a, place_a)
                step += 1
                dcp.save({"t": saved, "extra": {"n": torch.tensor(step)}},
                         storage_writer=_writer(kind, root, step))
                for j, (mesh_b, place_b) in enumerate(layouts):
                    if j == i:
                        continue
                    target = distribute_tensor(torch.zeros(shape), mesh_b, place_b)
                    dcp.load({"t": target}, storage_reader=_reader(kind, root, step))
                    whole = target.redistribute(mesh_b, [Replicate()] * mesh_b.ndim).to_local()
                    if not torch.equal(whole, full):
                        problems.append(f"{kind} {shape}: {place_a} on {mesh_a.shape} -> "
                                        f"{place_b} on {mesh_b.shape}")
                # and back into a plain tensor (an unsharded reader: every rank the whole)
                plain = {"t": torch.zeros(shape)}
                dcp.load(plain, storage_reader=_reader(kind, root, step))
                if not torch.equal(plain["t"], full):
                    problems.append(f"{kind} {shape}: {place_a} -> plain tensor")
    return problems


@pytest.mark.timeout(300)
def test_dtensor_resharding_1d_2d_on_both_backends(tmp_path):
    out = run_ranks(_dtensor_scenarios, 4, str(tmp_path), timeout=270)
    assert all(out[r] == [] for r in range(4)), out[0][:10]
    for step in committed_steps(tmp_path):
        assert verify_step(tmp_path, step) == [], step


# ----------------------------------------------------------------- FSDP2 + async on 2 ranks

class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(32, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.proj = torch.nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(self.emb(x)))


def _fsdp2_model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = _Tiny()
    for layer in (model.emb, model.norm, model.proj):
        fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randint(0, 32, (4, 5), generator=g)
        loss = model(x).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def _full(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))


def _fsdp2_scenarios(rank: int, world_size: int, root: str) -> list[str]:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    problems: list[str] = []
    for kind in BACKENDS:
        model, opt = _fsdp2_model(0)
        _train(model, opt, 2)
        ref_model, ref_optim = _full(model, opt)
        model_sd, optim_sd = get_state_dict(model, opt)
        for mode, step in (("sync", 10), ("thread", 11), ("process", 12)):
            state = {"model": model_sd, "optim": optim_sd}
            writer = _writer(kind, root, step)
            if mode == "sync":
                dcp.save(state, storage_writer=writer)
            else:
                kind_enum = (AsyncCheckpointerType.THREAD if mode == "thread"
                             else AsyncCheckpointerType.PROCESS)
                dcp.async_save(state, storage_writer=writer,
                               async_checkpointer_type=kind_enum).result(timeout=120)
            fresh, fresh_opt = _fsdp2_model(1)       # other values, same structure
            m_sd, o_sd = get_state_dict(fresh, fresh_opt)
            target = {"model": m_sd, "optim": o_sd}
            dcp.load(target, storage_reader=_reader(kind, root, step))
            set_state_dict(fresh, fresh_opt, model_state_dict=target["model"],
                           optim_state_dict=target["optim"])
            got_model, got_optim = _full(fresh, fresh_opt)
            for what, a, b in (("model", ref_model, got_model), ("optim", ref_optim, got_optim)):
                bad = _same(a, b, what)
                if bad:
                    problems.append(f"{kind} {mode}: {bad[:5]}")
        # the caching loop with a coordinator-chosen step, across ranks
        if kind == "zarr":
            problems += _caching_loop(kind, Path(root) / "cached", same_writer=False, saves=3,
                                      rank=rank)
    return problems


@pytest.mark.timeout(300)
def test_fsdp2_and_async_save_on_both_backends(tmp_path):
    out = run_ranks(_fsdp2_scenarios, 2, str(tmp_path), timeout=270, daemon=False)
    assert out[0] == [] and out[1] == [], out
    for step in (10, 11, 12):
        assert verify_step(tmp_path, step) == [], step
