"""The merge-method contract, checked for every entry of ``METHODS``.

Iterates over the registry itself, so a new preset is tested by adding it there.
The reference below is written from the fields of :class:`MergeMethod` (trim,
elect, combine) on whole flattened vectors, with none of the kernel's code; a
preset with a trim or combine it does not know fails here until it is taught.
"""

from __future__ import annotations

import pytest
import torch

from trainkit.merge import METHODS, MergeMethod, make_config, merge

SHAPES = {"embed.weight": (24, 8), "layers.0.w": (12, 12), "layers.0.b": (12,), "norm": (8,)}


def _model(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}


def _finetune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}


def _sum(vectors: list[torch.Tensor]) -> torch.Tensor:
    acc = vectors[0].clone()
    for v in vectors[1:]:
        acc = acc + v
    return acc


def reference(spec: MergeMethod, base, models, *, density: float, lam: float, scope: str, weights) -> dict:
    """base + lam * combine(trim(w_i (m_i - base))), straight from the definitions."""
    keys = list(base)
    groups = [keys] if scope == "global" else [[k] for k in keys]
    out = {}
    for group in groups:
        b = torch.cat([base[k].float().reshape(-1) for k in group])
        if spec.combine == "linear":  # mergekit's linear: a weighted mean of the models themselves
            acc = torch.zeros_like(b)
            for m, w in zip(models, weights):
                acc.addcmul_(torch.cat([m[k].reshape(-1) for k in group]), torch.tensor(w))
            pieces = (acc / torch.tensor(weights).sum()).split([base[k].numel() for k in group])
            out.update({k: v.reshape(base[k].shape).to(base[k].dtype) for k, v in zip(group, pieces)})
            continue
        tvs = [(torch.cat([m[k].float().reshape(-1) for k in group]) - b) * w for m, w in zip(models, weights)]
        if spec.trim == "magnitude":
            k = b.numel() - int(b.numel() * density)
            if density < 1.0 and k > 0:
                tvs = [tv * (tv.abs() >= tv.abs().kthvalue(k).values) for tv in tvs]
        elif spec.trim in ("random", "della"):
            assert density == 1.0, "the reference has no random trim: compare at density 1"
        elif spec.trim == "outliers":  # drop the 1% largest |tv|, keep the next int(density * d)
            if density < 1.0:
                d = b.numel()
                kept = []
                for tv in tvs:
                    order = torch.sort(tv.abs(), descending=False).indices
                    lo = max(0, d - int(density * d) - int(0.01 * d))
                    keep = torch.zeros(d, dtype=torch.bool)
                    keep[order[lo: lo + int(density * d)]] = True
                    kept.append(tv * keep)
                tvs = kept
        elif spec.trim != "none":
            raise NotImplementedError(f"reference: trim {spec.trim!r}")
        s = _sum(tvs)
        if spec.elect:
            assert spec.combine == "disjoint_mean", spec
            sign = torch.sign(s)
            sign[sign == 0] = torch.sign(sign.sum())
            agree = [torch.where(sign > 0, tv > 0, tv < 0) for tv in tvs]
            merged = _sum([tv * a for tv, a in zip(tvs, agree)]) / _sum([a.float() for a in agree]).clamp(min=1)
        elif spec.combine == "sum":
            merged = s
        elif spec.combine == "mean":
            merged = s / sum(weights)
        else:
            raise NotImplementedError(f"reference: combine {spec.combine!r} without a vote")
        result = b + lam * merged
        pieces = result.split([base[k].numel() for k in group])
        out.update({k: v.reshape(base[k].shape).to(base[k].dtype) for k, v in zip(group, pieces)})
    return out


def _assert_equal(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), (k, (got[k].float() - want[k].float()).abs().max())


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("name", list(METHODS))
def test_method_equals_the_reference(name, scope):
    spec = METHODS[name]
    base = _model(0)
    models = [_finetune(base, 1), _finetune(base, 2)]
    if spec.per_tensor and scope == "global":  # a rank-based trim within each tensor: no global form
        with pytest.raises(ValueError, match="tensor scope only"):
            merge(name, base, models, scope=scope)
        return
    density = 1.0 if spec.trim in ("random", "della") else 0.5
    for weights, lam in (([1.0, 1.0], 1.0), ([1.0, 0.5], 0.7)):
        got = merge(name, base, models, density=density, lam=lam, scope=scope, weights=weights)
        _assert_equal(got, reference(spec, base, models, density=density, lam=lam, scope=scope, weights=weights))


@pytest.mark.parametrize("name", list(METHODS))
def test_models_equal_to_the_base_give_the_base(name):
    base = _model(3, torch.bfloat16)
    for scope in ("tensor",) if METHODS[name].per_tensor else ("global", "tensor"):
        got = merge(name, base, [dict(base), {k: v.clone() for k, v in base.items()}], scope=scope, lam=0.8)
        _assert_equal(got, base)


@pytest.mark.parametrize("name", list(METHODS))
def test_output_keeps_keys_shapes_dtypes_and_inputs(name):
    base = _model(4, torch.bfloat16)
    models = [_finetune(base, 5), _finetune(base, 6)]
    before = [{k: v.clone() for k, v in m.items()} for m in (base, *models)]
    got = merge(name, base, models)
    assert list(got) == list(base)
    for k, v in base.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
    for m, copy in zip((base, *models), before):  # inputs are never modified
        _assert_equal(m, copy)


@pytest.mark.parametrize("name", list(METHODS))
def test_method_is_deterministic(name):
    base = _model(7)
    models = [_finetune(base, 8), _finetune(base, 9)]
    one = merge(name, base, models, seed=3)  # default density: the random trim is on for dare presets
    _assert_equal(merge(name, base, models, seed=3, threads=3), one)


@pytest.mark.parametrize("name", list(METHODS))
def test_unknown_or_invalid_options_are_rejected(name):
    base = _model(10)
    models = [_finetune(base, 11)]
    with pytest.raises(TypeError, match="no_such_option"):
        merge(name, base, models, no_such_option=1)
    with pytest.raises(TypeError, match="no_such_option"):
        make_config(name, 1, no_such_option=1)
    with pytest.raises(ValueError, match="density must be in"):
        merge(name, base, models, density=0.0)
    with pytest.raises(ValueError, match="2 weights given for 1 models"):
        merge(name, base, models, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="scope must be"):
        merge(name, base, models, scope="layer")


def test_every_preset_is_named_by_its_key_and_has_a_valid_default_density():
    for name, spec in METHODS.items():
        assert spec.name == name
        assert 0.0 < spec.default_density <= 1.0
        assert make_config(name, 2).method is spec
