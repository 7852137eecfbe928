"""The ``trainkit`` command line: a thin layer over the subpackages.

Each subcommand lives next to the code it drives, in ``trainkit/<pkg>/cli.py``,
which exposes ``register(subparsers)``. This module only wires them together.
The registry below is explicit (no registration by import side effect), and it
is lazy: ``trainkit --help`` imports no subcommand, and ``trainkit merge ...``
imports only the merge CLI. So a missing optional dependency (scipy for
``plan``, say) costs nothing until its subcommand is used, and then it is one
line naming the extra to install, exit status 2.

Bad input never looks like a crash: a :class:`trainkit.errors.TrainkitError` (raised
where a file or value is parsed, naming it) or an ``OSError`` (a path that cannot be
read or written) from any subcommand is printed as one line, exit status 2. Anything
else is a bug and keeps its traceback. ``--debug``, before or after the subcommand,
shows the traceback of the one-line errors too.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from trainkit import __version__
from trainkit.errors import TrainkitError

__all__ = ["SUBCOMMANDS", "EXTRAS", "build_parser", "main"]

# subcommand -> (module providing ``register(subparsers)``, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "ckpt": ("trainkit.checkpoint.cli", "inspect, verify, export and garbage-collect checkpoints"),
    "merge": ("trainkit.merge.cli", "merge fine-tuned models (TIES and friends), streamed"),
    "plan": ("trainkit.traffic.cli", "plan collective traffic on a leaf-spine fabric"),
    "diagnose": ("trainkit.detect.cli", "show anomaly-detection findings of a run"),
    "run": ("trainkit.run.cli", "torchrun wrapper that detects, isolates, restarts and resumes"),
    "goodput": ("trainkit.run.goodput_cli", "where a run's time went: productive, checkpoint, restart"),
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
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also accepted after the subcommand)")
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


def _take_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Remove ``--debug`` from the options before a ``--`` (what follows belongs to torchrun
    and the training script)."""
    end = argv.index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:end] if a != "--debug"]
    return head + argv[end:], len(head) != end


def _one_line(command: str | None, exc: BaseException) -> str:
    """The report of a bad-input error: the message names the file and the problem."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    text = " | ".join(line.strip() for line in text.splitlines() if line.strip())
    return f"trainkit{' ' + command if command else ''}: error: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    argv, debug = _take_debug(list(sys.argv[1:] if argv is None else argv))
    command = _command_of(argv)
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv)
        args.debug = debug          # subcommands that report errors themselves re-raise on it
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
    except (TrainkitError, OSError) as exc:
        if debug or isinstance(exc, BrokenPipeError):
            raise
        print(_one_line(command, exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
