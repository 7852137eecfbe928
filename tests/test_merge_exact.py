"""Exactness of trainkit.merge against the independent reference in merge_reference.py."""

from __future__ import annotations

import pytest
import torch
from merge_reference import ref_mergekit_ties, ref_ties

from trainkit.merge import merge, ties_merge


def _model(seed, dtype=torch.float32, shapes=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"embed.weight": (40, 8), "layers.0.w": (16, 16), "layers.0.b": (16,), "norm": (8,)}
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}


def _finetunes(base, n=3, scale=0.05, seed=100):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        out.append({k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()})
    return out


def _assert_equal(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), (k, (a[k].float() - b[k].float()).abs().max())


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("density", [0.1, 0.2, 0.5, 1.0])
def test_matches_reference_float32(scope, density):
    base = _model(0)
    models = _finetunes(base)
    _assert_equal(ties_merge(base, models, density=density, lam=1.0, scope=scope), ref_ties(base, models, density, 1.0, scope))


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_matches_reference_low_and_high_precision(scope, dtype):
    base = _model(1, dtype)
    models = _finetunes(base, n=4)
    got = ties_merge(base, models, density=0.3, lam=0.7, scope=scope)
    _assert_equal(got, ref_ties(base, models, 0.3, 0.7, scope))
    assert all(v.dtype == dtype for v in got.values())


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_ties_at_threshold_are_kept(scope):
    # Magnitudes drawn from 4 values: the threshold is tied by many entries.
    base = {"a": torch.zeros(64), "b": torch.zeros(8, 8)}
    g = torch.Generator().manual_seed(3)
    models = []
    for _ in range(3):
        m = {}
        for k, v in base.items():
            mag = torch.randint(1, 5, v.shape, generator=g).float() * 0.25
            sign = torch.where(torch.rand(v.shape, generator=g) < 0.5, -1.0, 1.0)
            m[k] = mag * sign
        models.append(m)
    got = ties_merge(base, models, density=0.2, scope=scope)
    _assert_equal(got, ref_ties(base, models, 0.2, 1.0, scope))
    # with ties kept, more than int(d*density)+1 entries survive the trim
    tv = torch.cat([models[0][k].reshape(-1) for k in base]) if scope == "global" else models[0]["a"]
    thr = tv.abs().kthvalue(tv.numel() - int(tv.numel() * 0.2)).values
    assert int((tv.abs() >= thr).sum()) > int(tv.numel() * 0.2) + 1


@pytest.mark.parametrize("majority", [1, -1])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_zero_sum_takes_majority_sign(majority, scope):
    # Entries of "z" cancel exactly (+x, -x): their sign is the vector's majority.
    n = 32
    base = {"z": torch.zeros(n), "w": torch.zeros(n)}
    x = torch.arange(1, n + 1, dtype=torch.float32)
    a = {"z": x.clone(), "w": majority * x.clone()}
    b = {"z": -x.clone(), "w": majority * x.clone()}
    if scope == "tensor":
        a["z"][:3] = 100.0 * majority  # the tensor's own majority decides
        b["z"][:3] = 100.0 * majority
    got = ties_merge(base, [a, b], density=1.0, scope=scope)
    ref = ref_ties(base, [a, b], 1.0, 1.0, scope)
    _assert_equal(got, ref)
    # the cancelling entries take only the majority side's values
    expect = x[5] if majority > 0 else -x[5]
    assert got["z"][5].item() == expect.item()


def test_zero_majority_follows_authors_code():
    # +x/-x everywhere: sign sum and majority are 0; the authors' code then keeps negatives.
    base = {"z": torch.zeros(8)}
    x = torch.arange(1, 9, dtype=torch.float32)
    got = ties_merge(base, [{"z": x}, {"z": -x}], density=1.0)
    assert torch.equal(got["z"], -x)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_all_zero_task_vector(scope):
    base = _model(2)
    models = _finetunes(base, n=2) + [{k: v.clone() for k, v in base.items()}]
    got = ties_merge(base, models, density=0.2, scope=scope)
    _assert_equal(got, ref_ties(base, models, 0.2, 1.0, scope))
    only = ties_merge(base, [models[2]], density=0.2, scope=scope)
    _assert_equal(only, base)


def test_weights_scale_task_vectors():
    base = _model(4)
    models = _finetunes(base)
    w = [0.5, 1.0, 2.0]
    _assert_equal(ties_merge(base, models, density=0.3, weights=w), ref_ties(base, models, 0.3, 1.0, "global", w))


@pytest.mark.parametrize("weights", [None, [1.0, 0.5, 2.0]])
@pytest.mark.parametrize("density", [0.2, 1.0])
def test_mergekit_compat_matches_mergekit_formulas(weights, density):
    base = _model(5)
    models = _finetunes(base)
    got = ties_merge(base, models, density=density, scope="tensor", weights=weights, compat="mergekit")
    _assert_equal(got, ref_mergekit_ties(base, models, density, 1.0, weights))


def test_mergekit_compat_exact_k_with_ties():
    base = {"a": torch.zeros(40)}
    models = [{"a": torch.tensor([1.0, -1.0, 0.5, 0.5] * 10)}, {"a": torch.linspace(-1, 1, 40)}]
    got = ties_merge(base, models, density=0.3, scope="tensor", compat="mergekit")
    _assert_equal(got, ref_mergekit_ties(base, models, 0.3))
    # exact-k: exactly int(d*density) entries per model survive, ties at the cut included
    g = ties_merge(base, models[:1], density=0.3, compat="mergekit")
    assert int((g["a"] != 0).sum()) == int(0.3 * 40)


def test_compat_implies_tensor_scope_and_refuses_global():
    base = {"a": torch.zeros(10), "b": torch.zeros(10)}
    m = {"a": torch.ones(10), "b": torch.linspace(0.1, 1, 10)}
    implied = ties_merge(base, [m], density=0.25, compat="mergekit")
    _assert_equal(implied, ties_merge(base, [m], density=0.25, scope="tensor", compat="mergekit"))
    assert int((implied["a"] != 0).sum()) == 2 and int((implied["b"] != 0).sum()) == 2  # per tensor
    with pytest.raises(ValueError, match="compat='mergekit' is tensor scope"):
        ties_merge(base, [m], density=0.25, scope="global", compat="mergekit")


def test_presets():
    base = _model(6)
    models = _finetunes(base)
    avg = merge("average", base, models)
    for k in base:
        torch.testing.assert_close(avg[k], sum(m[k] for m in models) / 3, rtol=0, atol=1e-6)
    ta = merge("task_arithmetic", base, models, lam=0.4)
    for k in base:
        torch.testing.assert_close(ta[k], base[k] + 0.4 * sum(m[k] - base[k] for m in models), rtol=0, atol=1e-6)
    # DARE with density 1 trims nothing: identical to TIES with density 1
    _assert_equal(merge("dare_ties", base, models, density=1.0), ties_merge(base, models, density=1.0))
    d1 = merge("dare_ties", base, models, density=0.3, seed=1)
    _assert_equal(d1, merge("dare_ties", base, models, density=0.3, seed=1))
    assert not torch.equal(d1["layers.0.w"], merge("dare_ties", base, models, density=0.3, seed=2)["layers.0.w"])


def test_inputs_not_modified_and_threads_deterministic():
    base = _model(7)
    models = _finetunes(base)
    copies = [{k: v.clone() for k, v in m.items()} for m in [base, *models]]
    one = ties_merge(base, models, density=0.2)
    two = ties_merge(base, models, density=0.2, threads=3)
    _assert_equal(one, two)
    for orig, copy in zip([base, *models], copies):
        _assert_equal(orig, copy)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_scalar_and_empty_tensors(scope):
    base = {"s": torch.tensor(1.0), "e": torch.zeros(0, 4), "w": torch.randn(5, 3, generator=torch.Generator().manual_seed(9))}
    models = [{k: v + 0.1 for k, v in base.items()}, {k: v - 0.05 for k, v in base.items()}]
    _assert_equal(ties_merge(base, models, density=0.5, scope=scope), ref_ties(base, models, 0.5, 1.0, scope))
