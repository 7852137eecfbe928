"""The ``trainkit`` command line: a thin layer over the subpackages.

Each subcommand lives next to the code it drives, in ``trainkit/<pkg>/cli.py``,
which exposes ``register(subparsers)``. This module only wires them together.
The registry below is explicit (no registration by import side effect), and it
is lazy: ``trainkit --help`` imports no subcommand, and ``trainkit merge ...``
imports only the merge CLI. So a missing optional dependency (scipy for
``plan``, say) costs nothing until its subcommand is used, and then it is one
line naming the extra to install, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from trainkit import __version__

__all__ = ["SUBCOMMANDS", "EXTRAS", "build_parser", "main"]

# subcommand -> (module providing ``register(subparsers)``, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "ckpt": ("trainkit.checkpoint.cli", "inspect, verify, export and garbage-collect checkpoints"),
    "merge": ("trainkit.merge.cli", "merge fine-tuned models (TIES and friends), streamed"),
    "plan": ("trainkit.traffic.cli", "plan collective traffic on a leaf-spine fabric"),
    "diagnose": ("trainkit.detect.cli", "show anomaly-detection findings of a run"),
    "run": ("trainkit.run.cli", "torchrun wrapper that detects, isolates, restarts and resumes"),
}

# optional dependency (top-level module) -> the extra of pyproject.toml that installs it
EXTRAS: dict[str, str] = {"scipy": "traffic", "highspy": "traffic", "matplotlib": "plot", "s3fs": "s3", "yaml": "merge"}


class _Unavailable(Exception):
    """A subcommand cannot run here; the message is the one line to print."""


def _dependency_error(command: str, exc: ImportError) -> _Unavailable | None:
    """The one-line report for an import that failed on a third-party module, else None."""
    top = (exc.name or "").split(".")[0]
    if not top or top == "trainkit":
        return None
    extra = EXTRAS.get(top)
    how = f"pip install 'trainkit[{extra}]'" if extra else f"pip install {top}"
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return _Unavailable(f"trainkit {command}: needs {top!r}, which cannot be imported ({detail}); "
                        f"install it with: {how}")


def _register(subparsers: argparse._SubParsersAction, name: str) -> None:
    module_name, _ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name and module_name.startswith(exc.name):
            raise _Unavailable(f"trainkit {name}: not available in this build ({module_name} is missing)") from None
        report = _dependency_error(name, exc)
        if report is None:
            raise
        raise report from None
    module.register(subparsers)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The root parser; only ``command``'s own options are loaded (its module imported).

    Every other subcommand appears with its one-line help, which is all that
    ``trainkit --help`` shows.
    """
    parser = argparse.ArgumentParser(
        prog="trainkit",
        description="Keeps large PyTorch training jobs alive and fast.",
    )
    parser.add_argument("--version", action="version", version=f"trainkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        if name == command:
            _register(subparsers, name)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in SUBCOMMANDS else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv)
        func = getattr(args, "func", None)
        if func is None:
            parser.print_help()
            return 0
        try:
            return int(func(args) or 0)
        except ImportError as exc:  # a handler's lazy import of an optional dependency
            report = _dependency_error(command or "", exc)
            if report is None:
                raise
            raise report from None
    except _Unavailable as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
