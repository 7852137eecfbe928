"""The fused, chunked TIES (merge/fused.py + merge/sampleselect.py) against the plain kernel, bit for bit.

Bits, not values: outputs are compared as integers, so a -0.0 for a +0.0 fails.
The sample-bracket path normally starts at 65,536 entries; the tests shrink its
size limits and the chunk length so that small tensors cross many chunk edges and
take the sampled path.
"""

from __future__ import annotations

import pytest
import torch

from trainkit.merge import fused, merge, sampleselect, ties_merge
from trainkit.merge.kernel import DEFER, Keep, apply_trim, combine, task_vectors, tensor_thresholds
from trainkit.merge.methods import make_config
from trainkit.merge.plan import MergeInputError

_INT = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT[t.dtype])


def _assert_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    diff = (_bits(a) != _bits(b)).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} of {a.numel()} differ, first at {diff[0].tolist()}"


@pytest.fixture
def sampled(monkeypatch):
    """Route every tensor above 40 entries through sampling, with small samples."""
    monkeypatch.setattr(sampleselect, "SMALL", 40)
    monkeypatch.setattr(sampleselect, "TENSOR_SAMPLE", 32)
    monkeypatch.setattr(sampleselect, "GLOBAL_SAMPLE", 64)


def _inputs(shape, n, dtype, seed=0, base_zero=False, quantize=None):
    g = torch.Generator().manual_seed(seed)
    base = torch.zeros(shape) if base_zero else torch.randn(shape, generator=g) * 0.02
    if base_zero:  # signed zeros in the base: the sign of a zero result shows
        base[torch.rand(shape, generator=g) < 0.5] = -0.0
    models = []
    for _ in range(n):
        d = torch.randn(shape, generator=g) * 0.002
        if quantize:
            d = (d / quantize).round() * quantize  # few distinct magnitudes: exact ties and zero sums
        models.append((base + d).to(dtype))
    return base.to(dtype), models


def _same_result(rf, rp, dtype) -> None:
    """The fused result equals the plain one: values, vote tally, and the retry request."""
    assert (rf.ambiguous, rf.sign_balance, rf.retry_majority) == (rp.ambiguous, rp.sign_balance, rp.retry_majority)
    if rp.values is None:
        assert rf.values is None
        return
    _assert_bits(rf.values, rp.values.to(dtype))


def _plain(base, models, cfg, dtype, majority, keeps=None):
    b, tvs = task_vectors(base, models, cfg, dtype)
    keeps = keeps if keeps is not None else tensor_thresholds(tvs, cfg)
    tvs = [apply_trim(tv, k) for tv, k in zip(tvs, keeps)]
    return keeps, combine(b, tvs, cfg, majority)


def _fused(base, models, cfg, dtype, majority, chunk, keeps=None):
    if keeps is None:
        keeps, bad = sampleselect.tensor_keeps(base, models, cfg, dtype, chunk=chunk)
        assert bad == []
    return keeps, fused.fused_combine(base, models, keeps, cfg, majority, base.dtype, dtype, chunk=chunk)


SHAPES = [(1,), (7,), (3, 5), (64,), (257, 33), (1000,), (128, 64)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk", [64, 100, 4096])
@pytest.mark.parametrize("density", [1e-6, 0.2, 0.5, 0.999, 1.0])
def test_tensor_scope_bit_identical(sampled, shape, chunk, density):
    base, models = _inputs(shape, 3, torch.float32, seed=len(shape) + chunk)
    cfg = make_config("ties", 3, density=density, scope="tensor")
    kp, rp = _plain(base, models, cfg, torch.float32, None)
    kf, rf = _fused(base, models, cfg, torch.float32, None, chunk)
    assert kf == kp
    _same_result(rf, rp, base.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("base_zero", [False, True])
def test_storage_dtypes_and_signed_zeros(sampled, dtype, base_zero):
    base, models = _inputs((300, 7), 4, dtype, seed=5, base_zero=base_zero)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    cfg = make_config("ties", 4, density=0.3, lam=0.7, weights=[1.0, 0.5, 2.0, 1.0], scope="tensor")
    kp, rp = _plain(base, models, cfg, cdt, None)
    kf, rf = _fused(base, models, cfg, cdt, None, 128)
    assert kf == kp
    _same_result(rf, rp, dtype)


def test_all_zero_task_vectors_and_ties_at_threshold(sampled):
    base = torch.zeros(500)
    base[::3] = -0.0
    same = [base.clone() for _ in range(3)]  # every task vector is zero: threshold 0, keep all
    cfg = make_config("ties", 3, density=0.2, scope="tensor")
    _assert_bits(_fused(base, same, cfg, torch.float32, None, 64)[1].values,
                 _plain(base, same, cfg, torch.float32, None)[1].values)
    # four magnitudes only: the threshold is tied by a quarter of the entries
    g = torch.Generator().manual_seed(3)
    models = [torch.randint(1, 5, (500,), generator=g).float() * 0.25
              * torch.where(torch.rand(500, generator=g) < 0.5, -1.0, 1.0) for _ in range(3)]
    kp, rp = _plain(base, models, cfg, torch.float32, 1)
    kf, rf = _fused(base, models, cfg, torch.float32, 1, 64, keeps=None)
    assert kf == kp
    _assert_bits(rf.values, rp.values)


@pytest.mark.parametrize("majority", [DEFER, 1, -1, 0])
def test_zero_vote_sums_under_each_majority(sampled, majority):
    # quantized deltas: many exact cancellations (+x, -x) across models
    base, models = _inputs((40, 25), 2, torch.float32, seed=9, quantize=0.001)
    cfg = make_config("ties", 2, density=0.6, scope="global")
    keeps = [Keep(0.001), Keep(0.002)]
    _, rp = _plain(base, models, cfg, torch.float32, majority, keeps=keeps)
    _, rf = _fused(base, models, cfg, torch.float32, majority, 96, keeps=keeps)
    assert (rf.ambiguous, rf.sign_balance) == (rp.ambiguous, rp.sign_balance)
    if rp.values is None:
        assert rf.values is None and majority == DEFER
    else:
        _assert_bits(rf.values, rp.values)


@pytest.mark.parametrize("flip", [1.0, -1.0])
def test_own_majority_in_tensor_scope(sampled, flip):
    # exact cancellations, and a majority of +1 or (flipped deltas) -1
    base, models = _inputs((1000,), 2, torch.float32, seed=9, quantize=0.001)
    models = [base + flip * (m - base) for m in models]
    cfg = make_config("ties", 2, density=0.9, scope="tensor")
    keeps = [Keep(0.001), Keep(0.001)]
    _, rp = _plain(base, models, cfg, torch.float32, None, keeps=keeps)
    assert rp.ambiguous  # the case exists in these inputs
    _, rf = _fused(base, models, cfg, torch.float32, None, 96, keeps=keeps)
    _same_result(rf, rp, torch.float32)
    if rp.retry_majority is not None:
        _, rp = _plain(base, models, cfg, torch.float32, rp.retry_majority, keeps=keeps)
        _, rf = _fused(base, models, cfg, torch.float32, rf.retry_majority, 96, keeps=keeps)
        _same_result(rf, rp, torch.float32)


def _state(seed, dtype=torch.float32, quantize=None):
    shapes = {"embed": (300, 16), "w": (33, 17), "b": (33,), "one": (1,), "empty": (0, 4)}
    g = torch.Generator().manual_seed(seed)
    base = {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()}
    models = []
    for _ in range(3):
        m = {}
        for k, v in base.items():
            d = torch.randn(v.shape, generator=g) * 0.002
            if quantize:
                d = (d / quantize).round() * quantize
            m[k] = (v.float() + d).to(dtype)
        models.append(m)
    return base, models


def _merge_both(monkeypatch, fn):
    got = fn()
    with monkeypatch.context() as mp:
        mp.setattr(fused, "applies", lambda cfg, device: False)
        want = fn()
    assert list(got) == list(want)
    for k in got:
        _assert_bits(got[k], want[k])


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quantize", [None, 0.001])
def test_engine_fused_equals_plain(sampled, monkeypatch, scope, dtype, quantize):
    monkeypatch.setattr(fused, "CHUNK", 128)
    base, models = _state(1, dtype, quantize)
    _merge_both(monkeypatch, lambda: ties_merge(base, models, density=0.3, lam=0.9, scope=scope, threads=2))


def test_engine_per_model_density_and_weights(sampled, monkeypatch):
    monkeypatch.setattr(fused, "CHUNK", 100)
    base, models = _state(2)
    for scope in ("global", "tensor"):
        _merge_both(monkeypatch, lambda: merge("ties", base, models, densities=[0.1, 0.5, 1.0],
                                               weights=[1.0, 0.3, 1.7], lam=1.2, scope=scope))


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_bracket_miss_falls_back_to_radix(sampled, monkeypatch, scope):
    monkeypatch.setattr(fused, "CHUNK", 128)
    monkeypatch.setattr(sampleselect, "bracket", lambda srt, k, d: (0.0, 0.0))  # holds only zeros: always misses
    base, models = _state(3)
    _merge_both(monkeypatch, lambda: ties_merge(base, models, density=0.2, scope=scope))


@pytest.mark.parametrize("ties", [False, True])
def test_tally_resolve_is_the_kth_value(ties):
    g = torch.Generator().manual_seed(4)
    base = torch.zeros(5000)
    m = torch.randn(5000, generator=g)
    if ties:
        m = (m * 4).round() / 4
    a = m.abs()
    for k in (1, 17, 2500, 4999, 5000):
        br = sampleselect.bracket(sampleselect.sample_abs(base, m, 1.0, torch.float32,
                                                          sampleselect.sample_indices(5000, 200)), k, 5000)
        (t,) = sampleselect.tally(base, [m], [1.0], [br], torch.float32, chunk=333)
        assert t.resolve(k, 5000) == float(a.kthvalue(k).values)
    (t,) = sampleselect.tally(base, [m], [1.0], [(10.0, 11.0)], torch.float32, chunk=333)
    assert t.resolve(2500, 5000) is None  # a bracket that misses says so


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_non_finite_input_is_named(sampled, scope):
    base, models = _state(5)
    models[1]["embed"][7, 3] = float("inf")
    with pytest.raises(MergeInputError) as info:
        ties_merge(base, models, density=0.2, scope=scope)
    assert "embed: non-finite values (inf/nan) in model 1" in str(info.value)
