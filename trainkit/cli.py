"""The ``trainkit`` command line: a thin layer over the subpackages.

Each subcommand lives next to the code it drives, in ``trainkit/<pkg>/cli.py``,
which exposes ``register(subparsers)``. This module only wires them together,
so ``trainkit --help`` stays fast (no torch import) and each capability owns its
own options. The registry below is explicit: no registration by import side
effect.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from trainkit import __version__

# subcommand -> (module providing ``register(subparsers)``, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "ckpt": ("trainkit.checkpoint.cli", "inspect, verify, export and garbage-collect checkpoints"),
    "merge": ("trainkit.merge.cli", "merge fine-tuned models (TIES and friends), streamed"),
    "plan": ("trainkit.traffic.cli", "plan collective traffic on a leaf-spine fabric"),
    "diagnose": ("trainkit.detect.cli", "show anomaly-detection findings of a run"),
    "run": ("trainkit.run.cli", "torchrun wrapper that detects, isolates, restarts and resumes"),
}


def _unavailable(name: str, reason: str):
    def handler(args: argparse.Namespace) -> int:
        print(f"trainkit {name}: not available in this build ({reason})", file=sys.stderr)
        return 2

    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainkit",
        description="Keeps large PyTorch training jobs alive and fast.",
    )
    parser.add_argument("--version", action="version", version=f"trainkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module_name.startswith(exc.name):
                raise
            sub = subparsers.add_parser(name, help=f"{help_text} (not available yet)")
            sub.set_defaults(func=_unavailable(name, f"{module_name} is missing"))
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
