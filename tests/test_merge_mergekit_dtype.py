"""`--compat mergekit`: mergekit's dtype / out_dtype, its seeded draw order, linear's lambda.

mergekit itself is not needed: results are compared with the independent
references of ``tests/merge_reference.py`` (written from mergekit 0.1.5's
formulas) or with values computed here. ``benchmarks/mergekit_compat.py`` checks
the same against a real mergekit.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_reference import ref_mergekit_dare_linear, ref_mergekit_ties
from trainkit.cli import main
from trainkit.merge import merge
from trainkit.merge.mergekit_ops import DrawStream
from trainkit.merge.plan import MergeInputError

SHAPES = {"model.embed_tokens.weight": (48, 16), "model.layers.0.mlp.up_proj.weight": (40, 16),
          "model.layers.1.self_attn.q_proj.weight": (16, 16), "model.layers.10.norm.weight": (16,),
          "lm_head.weight": (48, 16)}


def _base(dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}


def _ft(base, seed) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + 0.03 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}


def _equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, (k, got[k].dtype, want[k].dtype)
        assert torch.equal(got[k], want[k]), (k, int((got[k] != want[k]).sum()))


def _differing(a: dict, b: dict) -> int:
    return sum(int((a[k].float() != b[k].float()).sum()) for k in a)


def _write_dirs(tmp_path, base, models):
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    paths = []
    for i, m in enumerate(models):
        save_file(m, tmp_path / f"ft{i}.safetensors")
        paths.append(str(tmp_path / f"ft{i}.safetensors"))
    return str(tmp_path / "base"), paths


# --- dtype / out_dtype --------------------------------------------------------------------------


def test_compat_bf16_runs_mergekits_ops_in_bf16_not_fp32_then_cast():
    base = _base(torch.bfloat16)
    models = [_ft(base, 1), _ft(base, 2), _ft(base, 3)]
    weights = [1.0, 0.7, 1.3]
    got = merge("ties", base, models, density=0.4, weights=weights, compat="mergekit")
    _equal(got, ref_mergekit_ties(base, models, 0.4, weights=weights, dtype=torch.bfloat16))
    # the float32-then-cast arithmetic (mergekit with dtype: float32, then a cast) differs somewhere,
    # so this test would fail if bf16 inputs were computed in float32
    fp32_cast = merge("ties", base, models, density=0.4, weights=weights, compat="mergekit", dtype="float32",
                      out_dtype="bfloat16")
    want32 = ref_mergekit_ties(base, models, 0.4, weights=weights)
    _equal(fp32_cast, {k: v.to(torch.bfloat16) for k, v in want32.items()})
    assert _differing(got, fp32_cast) > 0


def test_dtype_casts_the_inputs_and_sets_the_output_dtype():
    base = _base(torch.float32)
    models = [_ft(base, 1), _ft(base, 2)]
    # dtype: bfloat16 on float32 files: inputs cast to bf16, arithmetic and output in bf16
    got = merge("ties", base, models, density=0.5, compat="mergekit", dtype="bfloat16")
    cast = {k: v.to(torch.bfloat16) for k, v in base.items()}
    want = ref_mergekit_ties(cast, [{k: v.to(torch.bfloat16) for k, v in m.items()} for m in models], 0.5,
                             dtype=torch.bfloat16)
    _equal(got, want)
    # out_dtype alone: float32 arithmetic, cast at the end
    out16 = merge("ties", base, models, density=0.5, compat="mergekit", out_dtype="float16")
    _equal(out16, {k: v.to(torch.float16) for k, v in ref_mergekit_ties(base, models, 0.5).items()})
    # dtype: float64: the sum of (base + mixed) is done in float64 and written as float64
    f64 = merge("task_arithmetic", base, models, compat="mergekit", dtype="float64", lam=0.7)
    hand = {k: base[k].double() + ((models[0][k].double() - base[k].double())
                                   + (models[1][k].double() - base[k].double())) * 0.7 for k in base}
    _equal(f64, hand)


def test_task_arithmetic_bf16_matches_hand_computed_mergekit_ops():
    base = _base(torch.bfloat16)
    models = [_ft(base, 4), _ft(base, 5)]
    got = merge("task_arithmetic", base, models, weights=[0.5, 0.3], lam=0.9, compat="mergekit")
    for k, b in base.items():
        deltas = torch.stack([m[k] - b for m in models])  # bf16 subtraction, as mergekit
        w = torch.tensor([0.5, 0.3], dtype=torch.bfloat16).reshape(-1, *([1] * b.dim()))
        mixed = (deltas * w).sum(dim=0)  # one rounding of the float sum, in bf16
        mixed *= 0.9
        assert torch.equal(got[k], b + mixed), k


def test_dtype_needs_compat_and_a_known_name():
    base = _base()
    with pytest.raises(ValueError, match="dtype is mergekit's parameter"):
        merge("ties", base, [_ft(base, 1)], dtype="bfloat16")
    with pytest.raises(ValueError, match="out_dtype must be one of"):
        merge("ties", base, [_ft(base, 1)], compat="mergekit", out_dtype="int8")


def test_cli_writes_mergekits_out_dtype_in_the_files(tmp_path, capsys):
    base = _base(torch.float32)
    models = [_ft(base, 1), _ft(base, 2)]
    bdir, paths = _write_dirs(tmp_path, base, models)
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))
    out = tmp_path / "out"
    assert main(["merge", "ties", "--base", bdir, "--models", *paths, "--compat", "mergekit",
                 "--density", "0.5", "--dtype", "bfloat16", "--out", str(out), "--threads", "2"]) == 0
    want = merge("ties", base, models, density=0.5, compat="mergekit", dtype="bfloat16")
    _equal(load_file(out / "model.safetensors"), want)
    assert json.loads((out / "merge.json").read_text())["parameters"]["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"  # as mergekit writes it
    rc = main(["merge", "ties", "--base", bdir, "--models", *paths, "--dtype", "bfloat16",
               "--out", str(tmp_path / "o2")])
    assert rc == 2 and "needs compat='mergekit'" in capsys.readouterr().err and not (tmp_path / "o2").exists()


# --- one seeded stream, tensors in name order -----------------------------------------------------


def test_dare_linear_draws_one_stream_in_name_order_whatever_the_threads():
    base = _base()
    models = [_ft(base, 1), _ft(base, 2), _ft(base, 3)]
    want = ref_mergekit_dare_linear(base, models, 0.5, seed=7)
    for threads in (1, 2, 4):
        _equal(merge("dare_linear", base, models, density=0.5, seed=7, compat="mergekit", threads=threads), want)
    # the inputs' key order does not matter: mergekit runs tensors in sorted name order
    shuffled = [{k: m[k] for k in reversed(list(m))} for m in (base, *models)]
    got = merge("dare_linear", shuffled[0], shuffled[1:], density=0.5, seed=7, compat="mergekit", threads=3)
    assert all(torch.equal(got[k], want[k]) for k in want)
    other = merge("dare_linear", base, models, density=0.5, seed=8, compat="mergekit")
    assert _differing(other, want) > 0


@pytest.mark.parametrize("method", ["dare_ties", "della", "della_linear"])
def test_random_presets_are_the_same_for_every_thread_count(method):
    base = _base(torch.bfloat16)
    models = [_ft(base, 1), _ft(base, 2)]
    one = merge(method, base, models, density=0.5, seed=3, compat="mergekit", threads=1)
    for threads in (2, 5):
        _equal(merge(method, base, models, density=0.5, seed=3, compat="mergekit", threads=threads), one)


def test_a_failing_tensor_does_not_block_the_draws_of_the_others():
    base = _base()
    models = [_ft(base, 1), _ft(base, 2)]
    models[1]["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
    result: list[BaseException] = []

    def run() -> None:
        try:
            merge("dare_linear", base, models, density=0.5, compat="mergekit", threads=3)
        except BaseException as exc:  # noqa: BLE001 -- the test inspects it
            result.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the merge hung waiting for a failed tensor's turn"
    assert len(result) == 1 and isinstance(result[0], MergeInputError)
    assert "non-finite" in str(result[0])


def test_draw_stream_turns_follow_sorted_names():
    stream = DrawStream(0, ["b", "a", "c"])
    assert stream.order == ["a", "b", "c"]
    seen: list[str] = []

    def take(name: str) -> None:
        with stream.turn(name):
            seen.append(name)

    threads = [threading.Thread(target=take, args=(n,)) for n in ("c", "b", "a")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == ["a", "b", "c"]


# --- linear's lambda; sweep -----------------------------------------------------------------------


def test_linear_ignores_lambda_with_a_one_line_note(tmp_path, capsys):
    base = _base()
    models = [_ft(base, 1), _ft(base, 2)]
    bdir, paths = _write_dirs(tmp_path, base, models)
    out = tmp_path / "out"
    assert main(["merge", "linear", "--base", bdir, "--models", bdir, *paths, "--weights", "1", "2", "0.5",
                 "--lam", "0.5", "--compat", "mergekit", "--out", str(out), "--threads", "1"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert len(notes) == 1 and "lambda=0.5 is ignored" in notes[0]
    want = merge("linear", base, [base, *models], weights=[1, 2, 0.5], compat="mergekit")
    _equal(load_file(out / "model.safetensors"), want)
    for k in base:  # sum(w_i m_i) / sum(w_i), in float32
        hand = (base[k] * 1.0 + models[0][k] * 2.0 + models[1][k] * 0.5) / 3.5
        assert torch.allclose(want[k], hand, rtol=0, atol=1e-6), k


def test_sweep_over_linear_with_lam_is_refused(tmp_path, capsys):
    base = _base()
    bdir, paths = _write_dirs(tmp_path, base, [_ft(base, 1), _ft(base, 2)])
    out = tmp_path / "sweep"
    rc = main(["merge", "sweep", "linear", "--base", bdir, "--models", *paths, "--density", "1.0",
               "--lam", "0.8", "1.0", "--eval", "json:dumps", "--out", str(out), "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "linear has no lambda" in err[0] and "drop --lam" in err[0]
    assert not out.exists() or not any(out.iterdir())
