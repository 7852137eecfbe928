"""``trainkit merge sweep METHOD``: pick density and lambda on validation data, as the TIES paper did.

Every grid point is merged to disk and scored by the user's eval function
(``pkg.module:function``: path of the merged model -> score, higher is better).
Only two outputs ever exist at once -- the best so far and the candidate being
scored -- in a staging directory beside ``OUT``; the best is moved into ``OUT``
at the end with one rename, so an interrupted sweep leaves ``OUT`` untouched.
``OUT/sweep.json`` records every point's score and the choice.

Everything that can be checked is checked before the first merge: the eval
spec imports and is callable, and every grid point is a valid configuration.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["EvalError", "SweepError", "load_eval", "sweep", "register_sweep", "format_table", "plot_heatmap"]


class SweepError(ValueError):
    """Bad sweep input (eval spec, grid, output directory): reported in one line, exit 2."""


class EvalError(RuntimeError):
    """The user's eval function raised or returned a non-number: one line, exit 1."""


def load_eval(spec: str) -> Callable[[str], float]:
    """Resolve ``pkg.module:function`` to a callable, the current directory importable (as ``python -m``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SweepError(f"--eval {spec!r}: expected pkg.module:function")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module's own error at import time
        raise SweepError(f"--eval {spec!r}: cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise SweepError(f"--eval {spec!r}: {module_name} has no attribute {attr!r}")
    if not callable(fn):
        raise SweepError(f"--eval {spec!r}: {attr} is a {type(fn).__name__}, not callable")
    return fn  # type: ignore[return-value]


def _score(fn: Callable[[str], float], path: Path, point: dict) -> float:
    try:
        value = fn(str(path))
    except Exception as exc:
        raise EvalError(f"the eval function failed at density={point['density']}, lam={point['lam']}: "
                           f"{type(exc).__name__}: {exc}") from exc
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise EvalError(f"the eval function returned {value!r} at density={point['density']}, "
                           f"lam={point['lam']}; it must return a number (higher is better)") from None
    if not math.isfinite(score):
        raise EvalError(f"the eval function returned {score} at density={point['density']}, lam={point['lam']}")
    return score


def sweep(
    method: str,
    base: str | Path,
    models: Sequence[str | Path],
    out: str | Path,
    *,
    densities: Sequence[float],
    lams: Sequence[float],
    eval_fn: Callable[[str], float],
    eval_spec: str | None = None,
    overwrite: bool = False,
    threads: int = 1,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
    command: str | None = None,
    **options,
) -> dict:
    """Merge and score every (density, lam) point; the best model and ``sweep.json`` end up in ``out``.

    ``options`` go to :func:`~trainkit.merge.methods.make_config` (scope, weights, compat, seed,
    vocab_mismatch). Ties in score keep the earlier point. Returns the ``sweep.json`` record.
    """
    from trainkit.merge.files import _publish, merge_files
    from trainkit.merge.methods import METHODS, make_config

    final = Path(out)
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not overwrite:
        raise SweepError(f"output directory {final} is not empty (use --overwrite)")
    if not densities or not lams:
        raise SweepError("the grid is empty: give at least one --density and one --lam")
    spec = METHODS.get(method)
    if spec is not None and spec.combine == "linear" and any(float(lam) != 1.0 for lam in lams):
        raise SweepError(f"{method} has no lambda (mergekit's linear ignores it too), so every --lam point "
                         "would be the same merge: drop --lam")
    grid = [(float(d), float(lam)) for d in densities for lam in lams]
    configs = []
    for d, lam in grid:  # every point validated before the first merge
        try:
            configs.append(make_config(method, len(models), density=d, lam=lam, **options))
        except ValueError as exc:
            raise SweepError(f"density={d}, lam={lam}: {exc}") from None
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.sweep-", dir=final.parent))
    best_dir, points, best = stage / "best", [], None
    try:
        for (d, lam), cfg in zip(grid, configs):
            point = {"density": d, "lam": lam}
            cand = stage / "candidate"
            t0 = time.perf_counter()
            merge_files(base, list(models), cand, cfg, threads=threads, device=device, command=command)
            t1 = time.perf_counter()
            point["score"] = _score(eval_fn, cand, point)
            point["merge_seconds"] = round(t1 - t0, 3)
            point["eval_seconds"] = round(time.perf_counter() - t1, 3)
            points.append(point)
            if best is None or point["score"] > best["score"]:
                best = point
                shutil.rmtree(best_dir, ignore_errors=True)
                os.replace(cand, best_dir)
            else:
                shutil.rmtree(cand)
            if log is not None:
                log(f"density={d:g} lam={lam:g} score={point['score']:.6g}")
        assert best is not None
        record = {
            "method": method,
            "base": str(base),
            "models": [str(m) for m in models],
            "eval": eval_spec,
            "grid": {"density": [float(d) for d in densities], "lam": [float(x) for x in lams]},
            "points": points,
            "best": {"density": best["density"], "lam": best["lam"], "score": best["score"]},
            "options": {k: v for k, v in options.items()},
            "command": command,
        }
        (best_dir / "sweep.json").write_text(json.dumps(record, indent=2))
        _publish(best_dir, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return record


def format_table(record: dict) -> str:
    """Scores as a density x lam table; the best cell is starred."""
    lams, dens = record["grid"]["lam"], record["grid"]["density"]
    score = {(p["density"], p["lam"]): p["score"] for p in record["points"]}
    best = (record["best"]["density"], record["best"]["lam"])
    head = "density \\ lam" + "".join(f"{lam:>14g}" for lam in lams)
    rows = [head]
    for d in dens:
        cells = "".join(f"{score[(d, lam)]:>13.6g}{'*' if (d, lam) == best else ' '}" for lam in lams)
        rows.append(f"{d:<13g}{cells}")
    return "\n".join(rows)


def plot_heatmap(record: dict, path: str | Path) -> None:
    """A density x lam heatmap of the scores (needs matplotlib: the ``plot`` extra)."""
    import matplotlib  # ImportError names the extra in the CLI

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams, dens = record["grid"]["lam"], record["grid"]["density"]
    score = {(p["density"], p["lam"]): p["score"] for p in record["points"]}
    grid = [[score[(d, lam)] for lam in lams] for d in dens]
    fig, ax = plt.subplots(figsize=(1.2 * len(lams) + 2.5, 0.8 * len(dens) + 1.8))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(lams)), [f"{x:g}" for x in lams])
    ax.set_yticks(range(len(dens)), [f"{x:g}" for x in dens])
    ax.set_xlabel("lam")
    ax.set_ylabel("density")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.4g}", ha="center", va="center", color="w", fontsize=8)
    ax.set_title(f"{record['method']} sweep (best density={record['best']['density']:g}, "
                 f"lam={record['best']['lam']:g})")
    fig.colorbar(im, ax=ax, label="score (higher is better)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def register_sweep(parser: argparse.ArgumentParser, methods: Sequence[str]) -> None:
    """Arguments of ``trainkit merge sweep`` (contract names: --base --models --density --lam --eval --out --plot)."""
    parser.add_argument("method", choices=list(methods), help="merge method (preset)")
    parser.add_argument("--base", required=True, help="the base (pre-trained) model")
    parser.add_argument("--models", nargs="+", required=True, help="fine-tuned models")
    parser.add_argument("--density", type=float, nargs="+", required=True, help="densities to try")
    parser.add_argument("--lam", type=float, nargs="+", default=[1.0], help="lambdas to try (default 1.0)")
    parser.add_argument("--eval", required=True, metavar="PKG.MODULE:FUNCTION",
                        help="score function: path of a merged model -> number, higher is better")
    parser.add_argument("--out", required=True, help="output directory: the best model and sweep.json")
    parser.add_argument("--plot", default=None, metavar="FILE", help="write a density x lam heatmap (matplotlib)")
    parser.add_argument("--scope", choices=("global", "tensor"), default=None, help="as trainkit merge")
    parser.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per model")
    parser.add_argument("--compat", choices=("mergekit",), default=None, help="as trainkit merge")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random trims")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="as trainkit merge")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="tensors merged in parallel")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.set_defaults(func=run_sweep_cli)


def run_sweep_cli(args: argparse.Namespace) -> int:
    from trainkit.merge.device import resolve_device
    from trainkit.merge.plan import MergeInputError

    def fail(msg: str, code: int = 2) -> int:
        print(f"trainkit merge sweep: error: {msg}", file=sys.stderr)
        return code

    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401  -- checked before the first merge
        except ImportError:
            return fail("--plot needs matplotlib: pip install 'trainkit[plot]'")
    try:
        eval_fn = load_eval(args.eval)
        device = resolve_device(args.device)
    except (SweepError, ValueError) as exc:
        return fail(str(exc))
    try:
        record = sweep(
            args.method, args.base, args.models, args.out,
            densities=args.density, lams=args.lam, eval_fn=eval_fn, eval_spec=args.eval,
            overwrite=args.overwrite, threads=max(1, args.threads), device=device,
            log=lambda line: print(line, file=sys.stderr, flush=True),
            command=shlex.join(["trainkit", *sys.argv[1:]]) if sys.argv else None,
            scope=args.scope, weights=args.weights, compat=args.compat, seed=args.seed,
        )
    except EvalError as exc:  # the user's eval function failed or returned a non-number
        return fail(str(exc), 1)
    except (SweepError, MergeInputError, ValueError, FileNotFoundError, RuntimeError, TypeError) as exc:
        return fail(str(exc))
    print(format_table(record))
    b = record["best"]
    print(f"best: density={b['density']:g} lam={b['lam']:g} score={b['score']:.6g} -> {args.out}")
    if args.plot is not None:
        plot_heatmap(record, args.plot)
        print(f"heatmap: {args.plot}")
    return 0
