"""The on-disk format: dtypes, views, shared storage, typed values, plain-zarr readability."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import zarr

from trainkit.checkpoint import Checkpointer
from trainkit.checkpoint.format.codec import decode, encode
from trainkit.checkpoint.format.layout import TensorSpec, plan_shard

pytestmark = pytest.mark.timeout(120)

FLOAT8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                       "float8_e5m2fnuz") if hasattr(torch, n)]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
          *FLOAT8]


def _sample(dtype: torch.dtype, shape=(5, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype, generator=g)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g,
                         dtype=torch.int64).to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (float8/NaN safe)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    def raw(t: torch.Tensor) -> bytes:
        return bytes(t.reshape(-1).contiguous().view(torch.uint8).numpy())
    return raw(a) == raw(b)


def roundtrip(tmp_path, state, **kw):
    with Checkpointer(tmp_path / "ck", **kw) as ck:
        ck.save(3, state).result(timeout=60)
        return ck.load()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_roundtrips_bitwise(tmp_path, dtype):
    t = _sample(dtype)
    out = roundtrip(tmp_path, {"x": t, "scalar": _sample(dtype, ())})
    assert _same(out["x"], t)
    assert _same(out["scalar"], _sample(dtype, ()))
    assert out["x"].dtype == dtype


def test_views_and_non_contiguous_tensors(tmp_path):
    base = torch.arange(240, dtype=torch.float32).reshape(12, 20)
    big = torch.arange(100_000, dtype=torch.int64)
    state = {
        "t": base.t(),                      # transposed view
        "slice": base[2:5, 3:17:2],         # strided window
        "expand": torch.tensor([1.0, 2.0]).expand(3, 2),   # zero stride
        "sparse_view": big[::5000],         # small view of a big buffer: stored densely
        "conj": torch.randn(3, 3, dtype=torch.complex64).conj(),  # lazy conjugate bit
        "empty": torch.empty(0, 4),
        "zero_dim": torch.tensor(3.5),
    }
    out = roundtrip(tmp_path, state)
    for k, v in state.items():
        assert out[k].shape == v.shape, k
        assert torch.equal(out[k], v.resolve_conj()), k
    assert out["t"].stride() == base.t().stride()


def test_shared_storage_is_stored_once(tmp_path):
    w = torch.randn(256, 64)
    state = {"emb": w, "head": w, "view": w[10:20], "other": torch.randn(256, 64)}
    out = roundtrip(tmp_path, state)
    assert torch.equal(out["emb"], w) and torch.equal(out["head"], w)
    assert torch.equal(out["view"], w[10:20])
    # tied tensors load sharing one storage again
    assert out["emb"].untyped_storage().data_ptr() == out["head"].untyped_storage().data_ptr()
    step_dir = tmp_path / "ck" / "step_0000000003"
    record = json.loads((step_dir / "zarr.json").read_text())["attributes"]["trainkit"]
    data_bytes = sum(size for rel, (size, _) in record["files"].items() if "/c/" in rel)
    assert data_bytes < 2 * w.numel() * 4 + 8192      # two tensors' worth, not four


def test_nested_values_keep_their_types(tmp_path):
    rng = np.random.default_rng(1234)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), betas=(0.8, 0.95))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {
        "big": 2**128 + 7, "neg": -(2**70), "f": 0.1, "inf": float("inf"), "s": "é",
        "b": b"\x00\xff", "t": (1, (2, "x")), "none": None, "flag": True,
        "int_keys": {0: "a", 7: [1, 2], (1, 2): "tuple key", None: 1}, "dollar": {"$tensor": 3},
        "sets": {1, 2}, "np_legacy": np.random.RandomState(3).get_state(),
        "pcg": rng.bit_generator.state, "arr": np.arange(6, dtype=np.float16).reshape(2, 3),
        "np_scalar": np.float32(1.5), "dtype": torch.bfloat16, "size": torch.Size([2, 3]),
        "optim": opt.state_dict(), "rng": torch.get_rng_state(),
    }
    out = roundtrip(tmp_path, state)
    assert out["big"] == 2**128 + 7 and out["neg"] == -(2**70)
    assert out["t"] == (1, (2, "x")) and isinstance(out["t"][1], tuple)
    assert out["int_keys"] == state["int_keys"] and out["dollar"] == {"$tensor": 3}
    assert out["b"] == b"\x00\xff" and out["sets"] == {1, 2} and out["inf"] == float("inf")
    legacy = out["np_legacy"]
    assert legacy[0] == "MT19937" and np.array_equal(legacy[1], state["np_legacy"][1])
    restored = np.random.RandomState()
    restored.set_state(legacy)
    assert restored.randint(0, 10**9) == np.random.RandomState(3).randint(0, 10**9)
    gen = np.random.default_rng()
    gen.bit_generator.state = out["pcg"]
    assert gen.integers(0, 10**9) == rng.integers(0, 10**9)
    assert out["arr"].dtype == np.float16 and np.array_equal(out["arr"], state["arr"])
    assert out["np_scalar"] == np.float32(1.5) and out["np_scalar"].dtype == np.float32
    assert out["dtype"] is torch.bfloat16 and out["size"] == torch.Size([2, 3])
    assert out["optim"]["param_groups"][0]["betas"] == (0.8, 0.95)
    assert set(out["optim"]["state"]) == {0, 1}
    opt2 = torch.optim.AdamW(model.parameters())
    opt2.load_state_dict(out["optim"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(out["rng"], state["rng"])


def test_unstorable_value_names_its_key_path(tmp_path):
    with Checkpointer(tmp_path / "ck") as ck:
        with pytest.raises(TypeError, match=r"state\['optim'\]\['state'\]\[0\]\['fn'\]"):
            ck.save(1, {"optim": {"state": {0: {"fn": lambda x: x}}}})
        with pytest.raises(TypeError, match=r"state\['arr'\].*object"):
            ck.save(1, {"arr": np.array([object()])})
        with pytest.raises(TypeError, match="sparse|Sparse|layout"):
            ck.save(1, {"sp": torch.eye(3).to_sparse()})
        assert ck.latest() is None
        ck.save(1, {"ok": 1}).result(timeout=30)   # nothing half-done blocks the next save
        assert ck.latest() == 1


def test_plain_zarr_reads_a_step(tmp_path):
    t = torch.randn(1000, 300)
    b16 = torch.randn(77).to(torch.bfloat16)
    with Checkpointer(tmp_path / "ck", chunk_bytes=256 << 10) as ck:
        ck.save(5, {"w": t, "h": b16, "meta": {"lr": 0.1}}).result(timeout=60)
    g = zarr.open_group(str(tmp_path / "ck" / "step_0000000005"), mode="r")
    assert g.attrs["trainkit"]["step"] == 5
    rank = g["rank_00000"]
    index = rank.attrs["trainkit"]
    arr = rank["data"]
    assert arr.dtype == np.uint8 and arr.metadata.codecs[0].__class__.__name__ == "BytesCodec"
    assert len(arr.metadata.codecs) == 1           # no compressor
    assert arr.nchunks > 1
    raw = arr[:]
    for entry in index["tensors"]:
        blob = index["blobs"][entry["blob"]]
        start = blob["offset"] + entry["offset"]
        data = raw[start:start + entry["nbytes"]].view(np.dtype(entry["numpy_dtype"]))
        ref = {"w": t, "h": b16}[entry["name"]]
        assert np.array_equal(data.reshape(entry["shape"]),
                              ref.view(torch.int16).numpy().view(np.uint16) if ref.dtype == torch.bfloat16 else ref.numpy())
    # zarr reads back exactly the bytes the engine wrote into each chunk file
    chunk_dir = tmp_path / "ck" / "step_0000000005" / "rank_00000" / "data" / "c"
    on_disk = b"".join((chunk_dir / str(i)).read_bytes() for i in range(arr.nchunks))
    assert on_disk == raw.tobytes()


def test_codec_roundtrip_without_tensors():
    value = {"a": [1, 2.5, None, True, "s"], 3: (b"x", {4, 5}), "$x": 1, "n": 2**64}
    tensors: list[torch.Tensor] = []
    enc = encode(value, lambda p, t: tensors.append(t) or len(tensors) - 1)
    assert json.loads(json.dumps(enc)) == enc          # pure JSON
    assert decode(json.loads(json.dumps(enc)), tensors.__getitem__) == value


def _spec(name, key, start, end, nbytes, shape=(1,)):
    return TensorSpec(name, torch.float32, shape, (1,), key, start, end, nbytes)


def test_plan_groups_shared_storage_and_pads_little():
    specs = [_spec("a", ("cpu", 1), 0, 4000, 4000), _spec("b", ("cpu", 1), 400, 800, 400),
             _spec("c", ("cpu", 2), 0, 10_000_000, 10_000_000),
             _spec("d", ("cpu", 3), 0, 8_000_000, 40)]      # sparse view: dense copy
    plan = plan_shard(specs, chunk_bytes=4 << 20)
    assert len(plan.blobs) == 3
    assert plan.placements[0].blob == plan.placements[1].blob
    assert plan.placements[1].offset == 400
    assert plan.blobs[2].dense_tensor == 3 and plan.blobs[2].nbytes == 40
    assert plan.nchunks == 3 and plan.array_bytes - plan.nbytes < 3 * 4096
    assert all(b.offset % 64 == 0 for b in plan.blobs)
