"""DTensor state in the Checkpointer: FSDP2 and FSDP x TP saved lazily while training
continues, loaded with ``into=`` on other world sizes and mesh shapes (real gloo ranks),
then read back outside torch.distributed, by the CLI and with a corrupt piece."""

from __future__ import annotations

import json
import logging
import os
import subprocess

import pytest
import torch

from distributed import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

VOCAB, DIM, OUT = 50, 64, 6      # 50 rows over 4 ranks: 13, 13, 13, 11; 6 over 4: rank 3 holds none
BATCH, SEQ = 8, 4
CHUNK = 4096                     # several chunks per rank: spans cross chunk files


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.norm = torch.nn.LayerNorm(DIM)
        self.out = torch.nn.Linear(DIM, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.emb(x)))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
            torch.randint(0, OUT, (BATCH, SEQ), generator=g))


def _build(seed: int, *, tp: int = 1):
    """FSDP2 over all ranks (tp=1), or FSDP x TP on a (world/tp, tp) mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = Net()
    world = dist.get_world_size()
    if tp == 1:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
        dp_mesh, dp_rank, dp_size = mesh, dist.get_rank(), world
    else:
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"out": ColwiseParallel(output_layouts=Replicate())})
        dp_mesh = mesh["dp"]
        dp_rank, dp_size = mesh.get_coordinate()[0], world // tp
    fully_shard(model.emb, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, (dp_rank, dp_size)


def _train(model, opt, dp, step: int) -> float:
    import torch.distributed as dist

    x, y = _batch(step)
    rank, size = dp
    per = BATCH // size
    x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    out = loss.detach().clone()
    dist.all_reduce(out)
    return out.item() / dist.get_world_size()


def _full(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    m, o = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    # a copy: CPU tensors (Adam's step counts) come back as the live objects
    return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, {"model": m, "optim": o})


def _assert_same(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _ckpt(root: str, **kw):
    from trainkit.checkpoint import Checkpointer

    return Checkpointer(os.path.join(root, "p"), local_dir=os.path.join(root, "l"),
                        memory_dir=os.path.join(root, "m"), keep_in_memory=1, timeout=60,
                        chunk_bytes=CHUNK, **kw)


def _resume(root: str, step: int, seed: int, tp: int = 1, **kw):
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt, dp = _build(seed, tp=tp)
    m_sd, o_sd = get_state_dict(model, opt)
    with _ckpt(root) as ck:
        state = ck.load(step, into={"model": m_sd, "optim": o_sd, "step": 0}, **kw)
        tier = ck.loaded_from
    assert state["step"] == step
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return model, opt, dp, tier


def _four(rank: int, world: int, root: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import Replicate, distribute_tensor

    from trainkit.checkpoint.snapshot import storage_key

    # 1. FSDP2 on 4 ranks; a lazy save at step 2 while steps 3 and 4 go on
    model, opt, dp = _build(0)
    with _ckpt(root) as ck:
        ck.attach(opt)
        for step in (1, 2):
            _train(model, opt, dp, step)
        model_sd, optim_sd = get_state_dict(model, opt)
        assert storage_key(model_sd["emb.weight"]._local_tensor) in ck._owned_storages()
        ref = _full(model, opt)
        handle = ck.save(2, {"model": model_sd, "optim": optim_sd, "step": 2})
        losses = [_train(model, opt, dp, s) for s in (3, 4)]
        handle.result(timeout=60)
    if rank == 0:
        torch.save({"ref": ref, "losses": losses}, os.path.join(root, "ref2.pt"))
    dist.barrier()

    # 2. the same 4 ranks: bit-equal state from the memory tier, the same losses
    model, opt, dp, tier = _resume(root, 2, seed=1)
    full = _full(model, opt)
    if rank == 0:
        _assert_same(ref, full)
    assert tier == "memory", tier
    assert [_train(model, opt, dp, s) for s in (3, 4)] == losses

    # 3. FSDP -> FSDP x TP on a (2, 2) mesh, then a save from that mesh
    model, opt, dp, _ = _resume(root, 2, seed=2, tp=2)
    full = _full(model, opt)
    if rank == 0:
        _assert_same(ref["model"], full["model"])
        _assert_same(ref["optim"]["state"], full["optim"]["state"])
    assert abs(_train(model, opt, dp, 3) - losses[0]) < 1e-5 * abs(losses[0])
    m_sd, o_sd = get_state_dict(model, opt)
    placements = {k: [str(p) for p in v.placements] for k, v in m_sd.items()}
    ref10 = _full(model, opt)
    with _ckpt(root) as ck:
        ck.save(10, {"model": m_sd, "optim": o_sd, "step": 10}).result(timeout=60)
    if rank == 0:
        torch.save(ref10, os.path.join(root, "ref10.pt"))

    # 4. Shard -> Replicate, the model only: strict=False reports the rest
    ref = torch.load(os.path.join(root, "ref2.pt"), weights_only=False)["ref"]
    with _ckpt(root) as ck:         # and without a target: each DTensor whole
        whole = ck.load(2)
    _assert_same(ref["model"], whole["model"])
    mesh = model_sd["emb.weight"].device_mesh
    target = {"model": {k: distribute_tensor(torch.zeros(v.shape), mesh, [Replicate()])
                        for k, v in model_sd.items()}}
    with _ckpt(root) as ck:
        state = ck.load(2, into=target, strict=False)
        report = ck.load_report
    for k, v in state["model"].items():
        assert v is target["model"][k]
        assert torch.equal(v.to_local(), ref["model"][k]), k
    assert set(report.unexpected) == {"optim", "step"} and not report.missing
    return {"placements": placements}


def _two(rank: int, world: int, root: str) -> None:
    import torch.distributed as dist

    from trainkit.checkpoint import StateMismatchError

    saved = torch.load(os.path.join(root, "ref2.pt"), weights_only=False)
    # 4 -> 2 ranks: bit-equal state, the loss curve continues (float32 reduction order)
    model, opt, dp, _ = _resume(root, 2, seed=3)
    full = _full(model, opt)
    if rank == 0:
        _assert_same(saved["ref"], full)
    for s, want in zip((3, 4), saved["losses"]):
        got = _train(model, opt, dp, s)
        assert abs(got - want) < 1e-5 * abs(want), (s, got, want)
    # FSDP x TP on (2, 2) -> FSDP on 2 ranks
    model, opt, _, _ = _resume(root, 10, seed=4)
    full = _full(model, opt)
    if rank == 0:
        _assert_same(torch.load(os.path.join(root, "ref10.pt"), weights_only=False), full)
    # a target with a key the step lacks: a clear error listing it, nothing loaded
    model, opt, _ = _build(5)
    from torch.distributed.checkpoint.state_dict import get_state_dict

    m_sd, _ = get_state_dict(model, opt)
    before = m_sd["norm.weight"].to_local().clone()
    with _ckpt(root) as ck:
        with pytest.raises(StateMismatchError, match=r"missing from the checkpoint: model.extra"):
            ck.load(2, into={"model": {**m_sd, "extra": torch.zeros(2)}})
    assert torch.equal(m_sd["norm.weight"].to_local(), before)
    dist.barrier()


_capsys = None


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``trainkit ARGS`` in this process (torch is imported already: no 5 s start-up)."""
    from trainkit.cli import main

    try:
        rc = main(list(args))
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    out = _capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


def _ckpt_cli(*args: str) -> subprocess.CompletedProcess:
    return _cli("ckpt", *args)


def test_fsdp2_and_tp_save_reshard_and_read_back(tmp_path, caplog, capsys):
    global _capsys
    _capsys = capsys
    root = str(tmp_path)
    out = run_ranks(_four, 4, root, timeout=150)
    # FSDP over TP's Shard(0) is a strided shard: its pieces are still boxes
    assert out[0]["placements"]["out.weight"][0].startswith("_S(0"), out[0]
    run_ranks(_two, 2, root, timeout=120)
    _read_back(tmp_path, caplog)


def _read_back(tmp_path, caplog) -> None:
    """The steps of the runs above, in this process: whole tensors, CLI, a corrupt piece."""
    from trainkit.checkpoint import Checkpointer, CorruptCheckpointError
    from trainkit.checkpoint.tensors import StepTensorReader

    root = str(tmp_path)
    ref = torch.load(os.path.join(root, "ref2.pt"), weights_only=False)["ref"]
    p, local = os.path.join(root, "p"), os.path.join(root, "l")

    # outside torch.distributed: DTensor values come back whole
    state = Checkpointer(p).load(2)
    _assert_same(ref, {"model": state["model"], "optim": state["optim"]})
    assert state["step"] == 2
    ref10 = torch.load(os.path.join(root, "ref10.pt"), weights_only=False)
    _assert_same(ref10["model"], Checkpointer(p).load(10)["model"])

    # a few rows of a piece that spans two chunk files: one checksum segment is read
    from trainkit.checkpoint.reader import read_commit_record
    from trainkit.checkpoint.reshard import PieceReaders, fill_region
    from trainkit.checkpoint.tiers import open_tier

    tier = open_tier(p)
    readers = PieceReaders(tier, 10, read_commit_record(tier, 10))
    rows = torch.empty(2, DIM)
    pieces = readers.record["dtensor"]["model/emb.weight"]["pieces"]
    fill_region(rows, ((2, 0), (2, DIM)), pieces, readers, "model/emb.weight")
    assert torch.equal(rows, ref10["model"]["emb.weight"][2:4])
    assert readers.bytes_read == CHUNK < 25 * DIM * 4, readers.bytes_read   # of rank 0's 25 rows

    # the CLI: pieces per rank, every piece verified, full tensors exported and merged
    info = _ckpt_cli("info", p, "2", "--json")
    assert info.returncode == 0, info.stderr
    rows = {r["name"]: r for r in json.loads(info.stdout)}
    emb = rows["model/emb.weight"]
    assert emb["shape"] == [VOCAB, DIM] and emb["placements"] == ["S(0)"]
    assert [(q["rank"], q["offsets"], q["shape"]) for q in emb["pieces"]] == [
        (0, [0, 0], [13, DIM]), (1, [13, 0], [13, DIM]), (2, [26, 0], [13, DIM]),
        (3, [39, 0], [11, DIM])]
    assert [q["rank"] for q in rows["model/out.weight"]["pieces"]] == [0, 1, 2]
    text = _ckpt_cli("info", p, "10")
    assert "on mesh (2, 2) ('dp', 'tp')" in text.stdout and "rank 3 [" in text.stdout, text.stdout
    assert _ckpt_cli("verify", p, "10").returncode == 0
    exported = _ckpt_cli("export", p, "2", "--to", str(tmp_path / "hf"), "--prefix", "model.")
    assert exported.returncode == 0, exported.stderr
    from safetensors.torch import load_file

    _assert_same(ref["model"], load_file(str(tmp_path / "hf" / "model.safetensors")))
    merged = StepTensorReader(p, 10, "model.")
    _assert_same(ref10["model"], {k: merged.get(k) for k in merged.keys()})
    # `trainkit merge` over two DTensor steps (4-rank FSDP and 2x2 FSDP x TP) equals the
    # in-memory merge of the full tensors gathered at save()
    from trainkit.merge import merge

    out = tmp_path / "merged"
    done = _cli("merge", "ties", "--base", f"trainkit:{p}@2#model.", "--models",
                f"trainkit:{p}@10#model.", "--out", str(out), "--threads", "2")
    assert done.returncode == 0, done.stderr
    want = merge("ties", ref["model"], [ref10["model"]])
    _assert_same(want, load_file(str(out / "model.safetensors")))

    # one corrupt piece on the local tier: a clear error there, the persistent copy loads
    chunk = os.path.join(local, "step_0000000002", "rank_00001", "data", "c", "0")
    with open(chunk, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptCheckpointError) as err:
        Checkpointer(local).load(2)
    msg = str(err.value)
    assert "rank 1" in msg and "model/emb.weight" in msg and "piece at offsets [13, 0]" in msg, msg
    caplog.set_level(logging.WARNING)
    ck = Checkpointer(p, local_dir=local)
    state = ck.load(2)
    assert ck.loaded_from == "persistent"
    _assert_same(ref["model"], state["model"])
    assert "falling back to the persistent tier" in caplog.text
    # the same with into= (4 saved ranks into one process's whole tensors): the bad
    # piece is named, and the persistent tier fills the target
    caplog.clear()
    target = {"model": {k: torch.zeros_like(v) for k, v in ref["model"].items()}}
    ck = Checkpointer(p, local_dir=local)
    got = ck.load(2, into=target, strict=False)
    assert ck.loaded_from == "persistent"
    assert got["model"]["emb.weight"] is target["model"]["emb.weight"]
    _assert_same(ref["model"], got["model"])
    assert "piece at offsets [13, 0]" in caplog.text and "rank 1" in caplog.text, caplog.text
    verify = _ckpt_cli("verify", local, "2")
    assert verify.returncode == 1 and "rank 1" in verify.stdout


def test_sharded_tensor_is_refused_naming_dcp(tmp_path):
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from trainkit.checkpoint import Checkpointer

    # a real ShardedTensor instance (built without a process group; only its type matters)
    t = torch.Tensor._make_subclass(ShardedTensor, torch.empty(0))
    with Checkpointer(tmp_path / "c") as ck, pytest.raises(
            TypeError, match=r"ShardedTensor \(FSDP1 SHARDED_STATE_DICT\) at state\['w'\].*ZarrWriter"):
        ck.save(1, {"w": t})


def test_piece_table_checks():
    from trainkit.checkpoint.format.dtensor_meta import check_pieces, global_dtensors, overlap

    assert overlap(((0, 0), (4, 4)), ((2, 3), (4, 4))) == ((2, 3), (2, 1))
    assert overlap(((0,), (2,)), ((2,), (2,))) is None
    assert overlap(((), ()), ((), ())) == ((), ())
    mesh = {"shape": [2], "dims": None}

    def manifest(rank, piece):
        return {"rank": rank, "dtensor": {"w": {"shape": [4, 2], "dtype": "float32", "mesh": mesh,
                                                "placements": ["S(0)"], "piece": piece}}}

    table = global_dtensors([manifest(1, [1, 0, [2, 0], [2, 2]]), manifest(0, [0, 0, [0, 0], [2, 2]])])
    assert [p[0] for p in table["w"]["pieces"]] == [0, 1] and check_pieces("w", table["w"]) == []
    twice = global_dtensors([manifest(2, [2, 0, [0, 0], [2, 2]]), manifest(0, [0, 0, [0, 0], [2, 2]]),
                             manifest(1, [1, 0, [2, 0], [2, 2]])])
    assert [p[0] for p in twice["w"]["pieces"]] == [0, 1]      # a replica's copy: listed once
    from trainkit.checkpoint.dtensor import _outside_dims_zero

    # the dp sub-meshes of a (2, 2) mesh: the one at tp coordinate 0 writes
    assert _outside_dims_zero((2, 2), (0, 1, 2, 3), (0, 2), (1, 0))
    assert not _outside_dims_zero((2, 2), (0, 1, 2, 3), (1, 3), (0, 1))
    gap = global_dtensors([manifest(0, [0, 0, [0, 0], [2, 2]]), manifest(1, None)])
    assert "cover 4 of 8" in check_pieces("w", gap["w"])[0]
    bad = global_dtensors([manifest(0, [0, 0, [0, 0], [3, 2]]), manifest(1, [1, 0, [2, 0], [3, 2]])])
    assert any("outside" in p for p in check_pieces("w", bad["w"]))


def _killed(rank: int, world: int, root: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from trainkit.checkpoint import CheckpointError, Checkpointer

    model, opt, dp = _build(0)
    ck = Checkpointer(os.path.join(root, "p"), timeout=5, chunk_bytes=CHUNK)
    ck.attach(opt)
    _train(model, opt, dp, 1)
    m_sd, o_sd = get_state_dict(model, opt)
    ref = _full(model, opt)
    ck.save(1, {"model": m_sd, "optim": o_sd}).result(timeout=60)
    if rank == 0:
        torch.save(ref, os.path.join(root, "ref1.pt"))
    _train(model, opt, dp, 2)
    m_sd, o_sd = get_state_dict(model, opt)
    handle = ck.save(2, {"model": m_sd, "optim": o_sd})
    if rank == 1:               # SIGKILL while its shard of step 2 is being written
        os.kill(os.getpid(), 9)
    try:
        handle.result(timeout=60)
    except CheckpointError:
        pass
    try:
        ck.close(persist_last=False)
    except CheckpointError:
        pass


def test_kill_9_during_fsdp2_save_leaves_the_previous_step_intact(tmp_path):
    from trainkit.checkpoint import Checkpointer, verify_step

    run_ranks(_killed, 2, str(tmp_path), timeout=90, expect_dead=[1])
    p = str(tmp_path / "p")
    ck = Checkpointer(p)
    assert 1 in ck.steps()
    state = ck.load(1)
    _assert_same(torch.load(tmp_path / "ref1.pt", weights_only=False),
                 {"model": state["model"], "optim": state["optim"]})
    for step in ck.steps():       # step 2 too, if rank 1 was done before it died
        assert verify_step(p, step) == [], step
