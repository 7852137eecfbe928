"""`trainkit merge sweep`: a 2 x 2 grid on a tiny causal LM picks the best point by the eval function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainkit.cli import main
from trainkit.merge import merge

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
V, D, T = 24, 8, 12


def _tokens(seed: int, n: int, shift: int) -> torch.Tensor:
    """Sequences from a noisy 'next = 3 * prev + shift mod V' chain: learnable structure."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, T, dtype=torch.long)
    x[:, 0] = torch.randint(0, V, (n,), generator=g)
    for t in range(1, T):
        noise = torch.randint(0, V, (n,), generator=g)
        keep = torch.rand(n, generator=g) < 0.8
        x[:, t] = torch.where(keep, (3 * x[:, t - 1] + shift) % V, noise)
    return x


def _finetune(me, base: dict, tokens: torch.Tensor, steps: int = 25) -> dict:
    w = {k: v.clone().requires_grad_(True) for k, v in base.items()}
    opt = torch.optim.SGD(list(w.values()), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        emb, hid, head = w[me.EMBED], w[me.HIDDEN], w[me.HEAD]
        logits = torch.tanh(emb[tokens[:, :-1]] @ hid.T) @ head.T
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in w.items()}


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import merge_eval as me

    g = torch.Generator().manual_seed(0)
    base = {me.EMBED: torch.randn(V, D, generator=g), me.HIDDEN: torch.randn(D, D, generator=g) / D ** 0.5,
            me.HEAD: torch.randn(V, D, generator=g) * 0.1}
    fts = [_finetune(me, base, _tokens(10 + i, 48, shift=i)) for i in range(2)]
    heldout = torch.cat([_tokens(100, 32, 0), _tokens(101, 32, 1)])
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    paths = []
    for i, ft in enumerate(fts):
        save_file(ft, tmp_path / f"ft{i}.safetensors")
        paths.append(str(tmp_path / f"ft{i}.safetensors"))
    save_file({"tokens": heldout}, tmp_path / "heldout.safetensors")
    monkeypatch.setenv(me.TOKENS_ENV, str(tmp_path / "heldout.safetensors"))
    return me, base, fts, heldout, str(tmp_path / "base"), paths


def _argv(base, models, out, eval_spec="merge_eval:evaluate", *extra):
    return ["merge", "sweep", "ties", "--base", base, "--models", *models, "--density", "0.1", "0.5",
            "--lam", "0.8", "1.5", "--eval", eval_spec, "--out", str(out), "--threads", "1", *extra]


def test_sweep_picks_the_best_point_by_the_eval_function(setup, tmp_path, capsys):
    me, base, fts, heldout, base_dir, models = setup
    out = tmp_path / "best"
    plot = tmp_path / "heat.png"
    extra = ["--plot", str(plot)] if _has_matplotlib() else []
    assert main(_argv(base_dir, models, out, "merge_eval:evaluate", *extra)) == 0

    expected = {}  # each point scored independently: the in-memory merge and the example's loss
    for d in (0.1, 0.5):
        for lam in (0.8, 1.5):
            merged = merge("ties", base, fts, density=d, lam=lam)
            expected[(d, lam)] = -me.loss_of(merged, heldout)
    assert len({round(v, 6) for v in expected.values()}) == 4, "the grid points must be distinguishable"
    best = max(expected, key=expected.get)

    record = json.loads((out / "sweep.json").read_text())
    assert record["method"] == "ties"
    assert record["grid"] == {"density": [0.1, 0.5], "lam": [0.8, 1.5]}
    assert record["eval"] == "merge_eval:evaluate"
    assert [(p["density"], p["lam"]) for p in record["points"]] == [(0.1, 0.8), (0.1, 1.5), (0.5, 0.8), (0.5, 1.5)]
    for p in record["points"]:
        assert p["score"] == pytest.approx(expected[(p["density"], p["lam"])], rel=1e-6, abs=1e-7)
    assert (record["best"]["density"], record["best"]["lam"]) == best
    assert record["best"]["score"] == pytest.approx(expected[best], rel=1e-6)

    # the best model is the one in OUT, bit for bit, with its merge.json
    got = load_file(out / "model.safetensors")
    want = merge("ties", base, fts, density=best[0], lam=best[1])
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((out / "merge.json").read_text())["parameters"]["density"] == best[0]
    assert me.evaluate(str(out)) == pytest.approx(expected[best], rel=1e-6)
    # nothing else kept: no staging or candidate directories beside OUT
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    table = capsys.readouterr().out
    assert "density \\ lam" in table and "*" in table and f"best: density={best[0]:g} lam={best[1]:g}" in table
    if extra:
        assert plot.stat().st_size > 0 and plot.read_bytes()[:4] == b"\x89PNG"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_tk14:evaluate", "cannot import no_such_module_tk14"),
        ("merge_eval", "expected pkg.module:function"),
        ("merge_eval:no_such_function", "has no attribute 'no_such_function'"),
        ("merge_eval:TOKENS_ENV", "is a str, not callable"),
    ],
)
def test_bad_eval_is_one_line_exit_2_before_any_merge(setup, tmp_path, capsys, spec, message):
    _, _, _, _, base_dir, models = setup
    out = tmp_path / "best"
    assert main(_argv(base_dir, models, out, spec)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_failing_eval_and_bad_grid_leave_nothing(setup, tmp_path, capsys):
    _, _, _, _, base_dir, models = setup
    (tmp_path / "evals_tk14.py").write_text("def boom(path):\n    raise ValueError('no data')\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        out = tmp_path / "best"
        assert main(_argv(base_dir, models, out, "evals_tk14:boom")) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].endswith("the eval function failed at density=0.1, lam=0.8: ValueError: no data")
        assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())
        # an invalid grid point is refused before any merge
        argv = _argv(base_dir, models, out)
        argv[argv.index("0.5")] = "1.5"
        assert main(argv) == 2
        assert "density=1.5" in capsys.readouterr().err
        assert not out.exists()
        # a non-empty OUT is refused without --overwrite
        out.mkdir()
        (out / "keep").write_text("x")
        assert main(_argv(base_dir, models, out)) == 2
        assert (out / "keep").read_text() == "x"
    finally:
        sys.path.remove(str(tmp_path))


def test_plot_without_matplotlib_names_the_extra(setup, tmp_path, capsys, monkeypatch):
    _, _, _, _, base_dir, models = setup
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "best"
    assert main(_argv(base_dir, models, out, "merge_eval:evaluate", "--plot", str(tmp_path / "h.png"))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trainkit[plot]" in err
    assert not out.exists()
