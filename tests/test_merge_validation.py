"""Bad merge input gets a clear error that lists every problem."""

from __future__ import annotations

import pytest
import torch

from trainkit.merge import MergeInputError, merge, ties_merge


def _base():
    return {"embed_tokens.weight": torch.randn(10, 4), "layer.w": torch.randn(4, 4), "layer.b": torch.randn(4)}


def _ft(base, **changes):
    m = {k: v + 0.01 for k, v in base.items()}
    for k, v in changes.items():
        if v is None:
            m.pop(k.replace("__", "."))
        else:
            m[k.replace("__", ".")] = v
    return m


def test_empty_model_list():
    with pytest.raises(ValueError, match="model list is empty"):
        ties_merge(_base(), [])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_unit_interval(density):
    base = _base()
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        ties_merge(base, [_ft(base)], density=density)


def test_missing_and_extra_keys_listed():
    base = _base()
    a = _ft(base, layer__b=None)
    b = _ft(base)
    b["head.w"] = torch.zeros(2)
    with pytest.raises(MergeInputError) as e:
        ties_merge(base, [a, b])
    msg = str(e.value)
    assert "missing 1 tensor(s) of the base: ['layer.b']" in msg
    assert "not in the base: ['head.w']" in msg
    assert len(e.value.problems) == 2


def test_shape_and_dtype_mismatch_listed_together():
    base = _base()
    a = _ft(base, layer__w=torch.zeros(4, 5))
    b = _ft(base, layer__b=torch.zeros(4, dtype=torch.float16))
    with pytest.raises(MergeInputError) as e:
        ties_merge(base, [a, b])
    msg = str(e.value)
    assert "layer.w: shape [4, 5] in model 0, [4, 4] in the base" in msg
    assert "layer.b: dtype torch.float16 in model 1, torch.float32 in the base" in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_non_finite_values(bad, scope):
    base = _base()
    a = _ft(base)
    a["layer.w"] = a["layer.w"].clone()
    a["layer.w"][1, 2] = bad
    with pytest.raises(MergeInputError, match=r"layer.w: non-finite values \(inf/nan\) in model 0"):
        ties_merge(base, [a, _ft(base)], scope=scope)
    with pytest.raises(MergeInputError, match="non-finite"):
        merge("task_arithmetic", base, [a])


def test_vocab_mismatch_error_then_shared_rows():
    base = _base()
    a = _ft(base)
    a["embed_tokens.weight"] = torch.cat([a["embed_tokens.weight"], torch.ones(3, 4)])  # 13 rows
    b = _ft(base)
    with pytest.raises(MergeInputError, match="vocabulary-size mismatch, 13 rows in model 0, 10 in the base"):
        ties_merge(base, [a, b])
    out = ties_merge(base, [a, b], density=1.0, vocab_mismatch="shared")
    assert out["embed_tokens.weight"].shape == (10, 4)
    trimmed = {**a, "embed_tokens.weight": a["embed_tokens.weight"][:10]}
    ref = ties_merge(base, [trimmed, b], density=1.0)
    assert torch.equal(out["embed_tokens.weight"], ref["embed_tokens.weight"])
    # a base with more rows keeps its extra rows untouched
    big = {**base, "embed_tokens.weight": torch.randn(12, 4)}
    out2 = ties_merge(big, [a, b], density=1.0, vocab_mismatch="shared")
    assert out2["embed_tokens.weight"].shape == (12, 4)
    assert torch.equal(out2["embed_tokens.weight"][10:], big["embed_tokens.weight"][10:])


def test_non_embedding_row_mismatch_is_always_an_error():
    base = _base()
    a = _ft(base, layer__w=torch.zeros(5, 4))
    with pytest.raises(MergeInputError, match="layer.w: shape"):
        ties_merge(base, [a], vocab_mismatch="shared")


def test_bad_parameters():
    base = _base()
    with pytest.raises(ValueError, match="unknown merge method"):
        merge("nope", base, [_ft(base)])
    with pytest.raises(ValueError, match="2 weights given for 1 models"):
        ties_merge(base, [_ft(base)], weights=[1, 2])
    with pytest.raises(ValueError, match="scope must be"):
        ties_merge(base, [_ft(base)], scope="layer")
    with pytest.raises(ValueError, match="compat='mergekit' has no 'average'"):
        merge("average", base, [_ft(base)], compat="mergekit")


def test_integer_tensors_copied_from_base():
    base = {**_base(), "pos_ids": torch.arange(6)}
    m = {**_ft(_base()), "pos_ids": torch.arange(6)}
    out = ties_merge(base, [m])
    assert torch.equal(out["pos_ids"], base["pos_ids"]) and out["pos_ids"].dtype == torch.int64
