"""``trainkit merge METHOD``: streamed merge of model files into a model directory.

Thin layer: parse, build a :class:`MergeConfig` with :func:`make_config`, call
:func:`merge_files`. The method choices are ``METHODS`` itself; importing this
module does not import torch (the handler imports the engine).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path

from trainkit._units import SIZE_HELP, parse_size
from trainkit.merge.methods import MERGEKIT_DTYPES, METHODS  # no torch: the merge package resolves names lazily
from trainkit.merge.sweep import register_sweep  # no torch at import either

__all__ = ["register"]


def _size(text: str) -> int:
    """argparse type for sizes: the one parser of :mod:`trainkit._units` (2GB = 2 x 10^9 bytes)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _MergeParser(argparse.ArgumentParser):
    """``trainkit merge sweep METHOD ...`` beside ``trainkit merge METHOD ...``: the optional
    positional METHOD leaves argparse no room for sub-subcommands, so the word ``sweep``
    first hands the rest of the line to the sweep parser."""

    sweep_parser: argparse.ArgumentParser

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if args and args[0] == "sweep":
            return self.sweep_parser.parse_known_args(list(args[1:]), namespace)
        return super().parse_known_args(args, namespace)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge fine-tuned models (TIES and friends), streamed",
        description=(
            "Merge fine-tuned variants of one base model, tensor by tensor with bounded memory. "
            "Inputs: a Hugging Face directory (model.safetensors or shards + index), a .safetensors "
            "file, a torch .pt/.bin file, or a trainkit checkpoint written trainkit:DIR@STEP#PREFIX "
            "(e.g. trainkit:runs/ckpt@1000#model.)."
        ),
        epilog="trainkit merge sweep METHOD --base B --models A B --density D.. --lam L.. --eval PKG.MOD:FN "
               "--out OUT: pick density and lam by your eval function (trainkit merge sweep --help)",
    )
    p.__class__ = _MergeParser
    p.sweep_parser = argparse.ArgumentParser(
        prog=f"{p.prog} sweep",
        description="Merge every (density, lam) grid point, score each with your eval function "
                    "(path of the merged model -> score, higher is better), keep only the best so far, "
                    "and write it with sweep.json to --out.",
    )
    register_sweep(p.sweep_parser, list(METHODS))
    p.add_argument("method", nargs="?", choices=list(METHODS), help="merge method (preset); omit with --config")
    p.add_argument("--config", default=None, metavar="CFG.yaml",
                   help="a mergekit YAML config (merge_method, base_model, models, parameters, dtype, "
                        "tokenizer_source: base), run with mergekit's arithmetic (--compat mergekit)")
    p.add_argument("--base", default=None, help="the base (pre-trained) model")
    p.add_argument("--models", nargs="+", default=None, help="fine-tuned models")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--density", type=float, default=None, help="fraction of each task vector kept (default 0.2 for ties)")
    p.add_argument("--lam", type=float, default=1.0, help="scale of the merged task vector (default 1.0)")
    p.add_argument("--scope", choices=("global", "tensor"), default=None,
                   help="trim threshold over all tensors or per tensor (default global; tensor with --compat mergekit)")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per model")
    p.add_argument("--compat", choices=("mergekit",), default=None,
                   help="reproduce mergekit 0.1.5 bit for bit (tensor scope; its dtypes and seeded draws)")
    p.add_argument(
        "--vocab-mismatch",
        choices=("error", "shared"),
        default="error",
        help="embedding row-count mismatch: error (default) or merge the shared rows",
    )
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random trims (dare_*, della*); with --compat mergekit, the same as "
                        "mergekit-yaml --random-seed")
    p.add_argument("--dtype", choices=MERGEKIT_DTYPES, default=None,
                   help="with --compat mergekit: mergekit's dtype (inputs cast to it, arithmetic in it)")
    p.add_argument("--out-dtype", choices=MERGEKIT_DTYPES, default=None,
                   help="with --compat mergekit: mergekit's out_dtype (the output's dtype; default --dtype)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="where the arithmetic runs: tensors stream to the GPU and back with cuda "
                        "(auto: cuda when available)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="tensors merged in parallel (default: all cores)")
    p.add_argument("--shard-size", type=_size, default="2GiB",
                   help=f"maximum output shard size (default 2GiB; {SIZE_HELP})")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto", help="progress bar on stderr")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from trainkit.merge.files import merge_files
    from trainkit.merge.plan import MergeInputError

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"trainkit merge: error: output {out} exists and is not a directory", file=sys.stderr)
        return 2
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"trainkit merge: error: output directory {out} is not empty (use --overwrite)", file=sys.stderr)
        return 2
    progress = sys.stderr.isatty() if args.progress == "auto" else args.progress == "on"
    try:
        from trainkit.merge.config import ConfigError, load_config
        from trainkit.merge.device import resolve_device

        device = resolve_device(args.device)
        base, models, label, cfg = _inputs(args, load_config)
    except (ValueError, ConfigError) as exc:
        print(f"trainkit merge: error: {exc}", file=sys.stderr)
        return 2
    for note in cfg.notes():
        print(f"trainkit merge: note: {note}", file=sys.stderr)
    try:
        t0 = time.perf_counter()
        record = merge_files(
            base,
            models,
            out,
            cfg,
            threads=max(1, args.threads),
            shard_bytes=args.shard_size,
            progress=progress,
            command=shlex.join(["trainkit", *sys.argv[1:]]) if sys.argv else None,
            device=device,
        )
    except (MergeInputError, ValueError, OSError, RuntimeError, TypeError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"trainkit merge: error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    print(
        f"merged {len(models)} model(s) with {label} ({cfg.scope} scope) into {out}: "
        f"{record['output']['tensors']} tensors, {len(record['output']['shards'])} shard(s), {elapsed:.2f}s"
    )
    return 0


def _inputs(args: argparse.Namespace, load_config) -> tuple[str, list[str], str, object]:
    """(base, models, label, MergeConfig) from a --config file or from the command line."""
    from trainkit.merge.methods import make_config

    if args.config is not None:
        given = [f"--{n}" for n in ("base", "models") if getattr(args, n) is not None]
        if args.method is not None or given:
            raise ValueError(f"--config gives the method and the models; drop {args.method or ' '.join(given)}")
        given = [f"--{n.replace('_', '-')}" for n in ("dtype", "out_dtype") if getattr(args, n) is not None]
        if given:
            raise ValueError(f"--config gives dtype and out_dtype (its dtype: / out_dtype: keys); "
                             f"drop {' '.join(given)}")
        spec = load_config(args.config)
        cfg = dataclasses.replace(spec.config, seed=args.seed)  # mergekit-yaml takes the seed on its command line
        return spec.base, list(spec.models), f"{cfg.method.name} from {args.config}", cfg
    missing = [n for n, v in (("METHOD", args.method), ("--base", args.base), ("--models", args.models)) if v is None]
    if missing:
        raise ValueError(f"give {', '.join(missing)} (or a mergekit YAML with --config)")
    cfg = make_config(
        args.method,
        len(args.models),
        density=args.density,
        lam=args.lam,
        scope=args.scope,
        weights=args.weights,
        compat=args.compat,
        seed=args.seed,
        vocab_mismatch=args.vocab_mismatch,
        dtype=args.dtype,
        out_dtype=args.out_dtype,
    )
    return args.base, list(args.models), args.method, cfg
