"""``trainkit ckpt``: look at and verify checkpoint directories.

    trainkit ckpt ls DIR [--local-dir D] [--memory-dir D] [--json]
                                           steps, tiers, ranks, sizes, commit times
    trainkit ckpt info DIR STEP            the tensor table: rank, or replicated
    trainkit ckpt verify DIR [STEP]        every checksum; exit 1 with a report on a mismatch
    trainkit ckpt gc DIR --keep N [--keep-every K] [--min-age S] [--force] [--dry-run]
                                           apply a retention policy to one tier
    trainkit ckpt export DIR STEP --to out.safetensors   the model part as safetensors
    trainkit ckpt import-dcp SRC DST [--step N]          a DCP checkpoint into a step

DIR may be a local path or a URL (``s3://...``, via fsspec).

Handlers import the engine lazily, so ``trainkit --help`` stays fast. Every handler
runs under :func:`_quiet_pipe`: output closed early (``trainkit ckpt info ... | head``)
ends the command quietly instead of with a ``BrokenPipeError`` traceback, and a bad
checkpoint (trainkit's errors, ``OSError``, the parse errors of bad files) ends it with
one line naming the file and the problem and exit status 2 (``--debug``: the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from trainkit._units import SIZE_HELP, Progress, format_bytes, parse_size

__all__ = ["register"]


def _add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", action="store_true",
                        help="show a progress bar even when stderr is not a terminal (it is "
                             "shown on a terminal anyway)")


def _error_code(exc: Exception) -> int:
    """Exit status for a checkpoint error: 2 when the input is bad (a damaged or malformed
    checkpoint, the CLI's rule for bad input), 1 for anything else (a step that is not
    committed, an output that exists)."""
    from trainkit.checkpoint.errors import CorruptCheckpointError

    return 2 if isinstance(exc, CorruptCheckpointError) else 1


def _quiet_pipe(handler: Callable[[argparse.Namespace], int]
                ) -> Callable[[argparse.Namespace], int]:
    """Run ``handler``; if the reader of stdout went away, point stdout at devnull (so
    the interpreter's final flush cannot raise again) and exit quietly, as ``cat`` does."""

    def run(args: argparse.Namespace) -> int:
        try:
            rc = handler(args)
            sys.stdout.flush()
            return rc
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return 1                  # as Python's docs advise for EPIPE
        except Exception as exc:  # noqa: BLE001 - sorted below: bad input or a bug
            if getattr(args, "debug", False) or not isinstance(exc, _bad_input()):
                raise
            print(f"trainkit ckpt {getattr(args, 'ckpt_command', '')}: "
                  f"{_one_line(exc, getattr(args, 'dir', None))}", file=sys.stderr)
            return 2

    run.__name__ = handler.__name__
    return run


def _bad_input() -> tuple[type[BaseException], ...]:
    """What bad files raise: trainkit's own errors, OSError and parse errors. Any other
    exception of a handler is a programming error and keeps its traceback. (Imported
    late: the errors module's package pulls in torch.)"""
    from trainkit.checkpoint.errors import CheckpointError

    return (CheckpointError, OSError, ValueError, TypeError, KeyError, IndexError,
            RecursionError, MemoryError)


def _one_line(exc: BaseException, where: str | None) -> str:
    """One line naming the file and the problem, for an error out of a bad checkpoint."""
    from trainkit.checkpoint.errors import CheckpointError
    from trainkit.errors import TrainkitError

    if isinstance(exc, (CheckpointError, TrainkitError)):
        text = str(exc)
    elif isinstance(exc, OSError) and exc.filename:
        text = f"{exc.filename}: {exc.strerror or exc}"
    else:
        text = f"{where or 'the checkpoint'}: malformed ({type(exc).__name__}: {exc})"
    return " ".join(text.split())[:1000]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("ckpt", help="inspect and verify checkpoints",
                              description="Inspect and verify trainkit checkpoint directories.")
    sub = p.add_subparsers(dest="ckpt_command", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])

    ls = sub.add_parser("ls", help="list steps: tiers, committed or not, ranks, sizes, "
                                   "commit times")
    ls.add_argument("dir", help="checkpoint directory or URL (the persistent tier)")
    ls.add_argument("--local-dir", help="also list this node-local tier")
    ls.add_argument("--memory-dir", help="also list this memory tier (a /dev/shm directory)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_quiet_pipe(_ls))

    gc = sub.add_parser("gc", help="apply a retention policy to one tier; --dry-run",
                        description="Delete committed steps beyond the newest --keep (never "
                                    "those divisible by --keep-every), commit record first so an "
                                    "interrupted gc leaves no committed-but-broken step, and "
                                    "remove the leftovers of interrupted saves older than the "
                                    "newest committed step and unchanged for --min-age seconds. "
                                    "Only real step_NNNNNNNNNN directories are touched; links are "
                                    "never followed. Reports what was actually removed.")
    gc.add_argument("dir", help="checkpoint directory or URL (any one tier)")
    gc.add_argument("--keep", type=int, required=True, help="newest committed steps to keep")
    gc.add_argument("--keep-every", type=int, default=None,
                    help="never delete steps divisible by this")
    gc.add_argument("--dry-run", action="store_true", help="say what would go; delete nothing")
    gc.add_argument("--min-age", type=float, default=300.0,
                    help="leave uncommitted step directories changed within this many "
                         "seconds alone: a live job may be writing them (default "
                         "%(default)s, the Checkpointer's default timeout; pass your job's)")
    gc.add_argument("--force", action="store_true",
                    help="also remove young (or, on an object store, undated) uncommitted "
                         "leftovers and the steps load() set aside (step_N.corrupt)")
    gc.add_argument("--json", action="store_true", help="machine-readable output")
    gc.set_defaults(func=_quiet_pipe(_gc))

    info = sub.add_parser("info", help="the tensor table of a committed step")
    info.add_argument("dir")
    info.add_argument("step", type=int)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_quiet_pipe(_info))

    verify = sub.add_parser("verify", help="check every checksum; exit 1 on any mismatch")
    verify.add_argument("dir")
    verify.add_argument("step", type=int, nargs="?", help="one step (default: every committed)")
    _add_progress(verify)
    verify.set_defaults(func=_quiet_pipe(_verify))

    export = sub.add_parser(
        "export", help="export the model part of a step as safetensors (HF layout)",
        description="Export the tensors under a key prefix of a committed step as "
                    "safetensors: one file, or shards plus an index json, so Hugging Face "
                    "tooling and `trainkit merge` can read it. Written atomically.")
    export.add_argument("dir", help="checkpoint directory or URL")
    export.add_argument("step", type=int)
    export.add_argument("--to", required=True,
                        help="output: NAME.safetensors, or a directory for the HF layout "
                             "(model.safetensors / model-0000i-of-0000N.safetensors + index)")
    export.add_argument("--prefix", default="model.",
                        help="export tensors whose dotted key path starts with this, with it "
                             "stripped (default: %(default)s; '' exports every tensor)")
    export.add_argument("--max-shard-size", default="2GiB",
                        help=f"largest shard before splitting: {SIZE_HELP} (e.g. 500MB, "
                             f"2GiB; default %(default)s)")
    export.add_argument("--overwrite", action="store_true", help="replace existing output files")
    export.add_argument("--hf-config", default=None, metavar="DIR",
                        help="copy config.json, generation_config.json and tokenizer files from this "
                             "Hugging Face directory, so from_pretrained loads the export")
    _add_progress(export)
    export.set_defaults(func=_quiet_pipe(_export))

    imp = sub.add_parser(
        "import-dcp", help="convert a torch.distributed.checkpoint directory into a step",
        description="Convert a DCP checkpoint written by FileSystemWriter into one committed "
                    "step of a trainkit checkpoint directory, tensor by tensor (bounded "
                    "memory). The result loads with Checkpointer.load and with dcp.load "
                    "through ZarrReader. DCP's .metadata is a pickle: import only "
                    "checkpoints you trust.")
    imp.add_argument("src", help="DCP checkpoint directory (holds .metadata and *.distcp)")
    imp.add_argument("dst", help="trainkit checkpoint directory or URL")
    imp.add_argument("--step", type=int, default=None,
                     help="step number to write (default: after the newest step in DST)")
    _add_progress(imp)
    imp.set_defaults(func=_quiet_pipe(_import_dcp))

    from trainkit.checkpoint.advise_cli import add_advise_parser, advise_command

    add_advise_parser(sub).set_defaults(func=_quiet_pipe(advise_command))


def _require_dir(path: str) -> None:
    """A local directory must exist; a URL (s3://...) must be listable (endpoint and
    credentials from the standard AWS environment). Otherwise an :class:`InputError`
    naming the path: the handler wrapper prints it as one line and exits 2, as for
    any other bad input, with no traceback."""
    from trainkit.checkpoint.tiers import is_url
    from trainkit.errors import InputError

    if is_url(path):
        from trainkit.checkpoint import reader

        try:
            reader.as_tier(path).step_dirs()
        except ImportError as exc:
            raise InputError(f"{path}: cannot open: URL support is not available "
                             f"({exc})") from None
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read: {exc}") from None
        return
    if not os.path.isdir(path):
        missing = "" if os.path.exists(path) else " (it does not exist)"
        raise InputError(f"{path}: is not a directory{missing}")


def _ls(args: argparse.Namespace) -> int:
    from trainkit.checkpoint import catalog

    _require_dir(args.dir)
    rows = []
    for where, name in ((args.memory_dir, "memory"), (args.local_dir, "local"),
                        (args.dir, "persistent")):
        if where is not None:
            if name != "persistent":
                _require_dir(where)
            rows += catalog.step_rows(where, name)
    rows.sort(key=lambda r: (r["step"], ("memory", "local", "persistent").index(r["tier"])))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"{args.dir}: no checkpoints")
        return 0
    print(f"{'step':>10}  {'tier':<10} {'state':<11} {'ranks':>5} {'size':>10} {'tensors':>8}  "
          f"committed at")
    for r in rows:
        if r["committed"]:
            print(f"{r['step']:>10}  {r['tier']:<10} {'committed':<11} {r['world_size']:>5} "
                  f"{format_bytes(r['bytes']):>10} {r['tensors']:>8}  {r['committed_at']}")
        else:
            print(f"{r['step']:>10}  {r['tier']:<10} {'UNCOMMITTED':<11} {'-':>5} {'-':>10} "
                  f"{'-':>8}  {r.get('error', 'interrupted or failed save; ignored by load()')}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    from trainkit.checkpoint import reader
    from trainkit.checkpoint.tiers.local import remove_tree
    from trainkit.checkpoint.tiers.retention import (
        GcPlan,
        apply_gc,
        plan_gc,
        set_aside_dirs,
        tier_state,
        young_leftovers,
    )

    _require_dir(args.dir)
    tier = reader.as_tier(args.dir)
    try:
        committed, uncommitted = tier_state(tier)
        plan = plan_gc(tier.name, committed, uncommitted, keep=args.keep,
                       keep_every=args.keep_every)
    except ValueError as exc:
        print(f"trainkit ckpt gc: {exc}", file=sys.stderr)
        return 2
    young = () if args.force else young_leftovers(tier, plan.leftovers, args.min_age)
    plan = GcPlan(plan.tier, plan.delete, tuple(s for s in plan.leftovers if s not in young),
                  plan.kept)
    aside = set_aside_dirs(tier)
    removed_aside: list[str] = []
    failed: list[tuple[str, str]] = []
    if args.dry_run:
        deleted, leftovers = plan.delete, plan.leftovers
        removed_aside = aside if args.force else []
    else:
        result = apply_gc(tier, plan)
        deleted, leftovers = result.deleted, result.leftovers
        failed = [(f"step {s}", why) for s, why in result.failed]
        for name in aside if args.force else []:
            try:
                remove_tree(os.path.join(tier.root, name))        # set_aside_dirs: POSIX
                removed_aside.append(name)
            except OSError as exc:
                failed.append((name, str(exc)))
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "delete": list(deleted),
                          "leftovers": list(leftovers), "kept": list(plan.kept),
                          "young_kept": list(young), "set_aside_removed": removed_aside,
                          "set_aside_kept": [a for a in aside if a not in removed_aside],
                          "failed": [list(f) for f in failed]}))
        return 1 if failed else 0
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{args.dir}: {verb} committed steps {list(deleted) or 'none'}; "
          f"{verb} uncommitted leftovers {list(leftovers) or 'none'}; "
          f"kept {list(plan.kept) or 'none'}")
    if young:
        print(f"  left alone: uncommitted steps {list(young)}, changed within {args.min_age:g} s "
              f"or of unknown age (a live job may be writing them; --force removes them)")
    if removed_aside:
        print(f"  {verb} steps set aside by load(): {', '.join(removed_aside)}")
    elif aside:
        print(f"  kept steps set aside by load() (verify them; --force removes them): "
              f"{', '.join(aside)}")
    for what, why in failed:
        print(f"trainkit ckpt gc: could not remove {what}: {why}", file=sys.stderr)
    return 1 if failed else 0


def _info(args: argparse.Namespace) -> int:
    from trainkit.checkpoint import catalog
    from trainkit.checkpoint.errors import CheckpointError

    _require_dir(args.dir)
    try:
        table = catalog.tensor_table(args.dir, args.step)
    except CheckpointError as exc:
        print(f"trainkit ckpt info: {exc}", file=sys.stderr)
        return _error_code(exc)
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    width = max([len(t["name"]) for t in table] + [4])
    print(f"{'rank':>10}  {'name':<{width}}  {'dtype':<14} {'shape':<20} {'bytes':>10}")
    for t in table:
        note = (f"  piece of {tuple(t['global_shape'])} split on dim {t['split_dim']}"
                if "global_shape" in t else _pieces_note(t) if "pieces" in t else "")
        print(f"{t['rank']:>10}  {t['name']:<{width}}  {t['dtype']:<14} "
              f"{str(tuple(t['shape'])):<20} {format_bytes(t['bytes']):>10}{note}")
    return 0


def _pieces_note(row: dict, limit: int = 8) -> str:
    """``  [S(0)] on mesh (4,): rank 0 [0:13, 0:64]; rank 1 [13:26, 0:64]; ...``"""
    dims = f" {tuple(row['mesh_dims'])}" if row.get("mesh_dims") else ""
    pieces = ["rank {} [{}]".format(p["rank"], ", ".join(
        f"{o}:{o + n}" for o, n in zip(p["offsets"], p["shape"]))) for p in row["pieces"]]
    more = f"; ... {len(pieces) - limit} more" if len(pieces) > limit else ""
    return (f"  {'/'.join(row['placements'])} on mesh {tuple(row['mesh'])}{dims}: "
            f"{'; '.join(pieces[:limit])}{more}")


def _verify(args: argparse.Namespace) -> int:
    from trainkit.checkpoint import catalog, reader
    from trainkit.checkpoint.errors import CheckpointError

    _require_dir(args.dir)
    why = catalog.dcp_directory(args.dir)
    if why is not None:
        print(f"trainkit ckpt verify: {why}", file=sys.stderr)
        return 1
    steps = [args.step] if args.step is not None else reader.committed_steps(args.dir)
    if not steps:
        print(f"{args.dir}: no committed checkpoint to verify")
        return 0
    bad = 0
    for step in steps:
        try:
            record = reader.read_commit_record(args.dir, step)
            total = sum(size for rel, (size, _) in record["files"].items() if "/c/" in rel)
        except CheckpointError:
            total = 0                          # verify_step reports why
        with Progress(total, f"verify step {step}", force=args.progress) as bar:
            problems = reader.verify_step(args.dir, step, on_bytes=bar.update)
        if problems:
            bad += 1
            print(f"step {step}: CORRUPT")
            for p in problems:
                print(f"  - {p}")
        else:
            print(f"step {step}: ok")
    if bad:
        print(f"{bad} of {len(steps)} step(s) failed verification")
        return 1
    return 0


def _export(args: argparse.Namespace) -> int:
    from trainkit.checkpoint.errors import CheckpointError
    from trainkit.checkpoint.interop.export import export_safetensors

    _require_dir(args.dir)
    try:
        max_shard = parse_size(args.max_shard_size)
    except ValueError as exc:
        print(f"trainkit ckpt export: bad size for --max-shard-size: {exc}", file=sys.stderr)
        return 2
    try:
        with Progress(0, f"export step {args.step}", force=args.progress) as bar:
            files = export_safetensors(args.dir, args.step, args.to, prefix=args.prefix,
                                       max_shard_bytes=max_shard, overwrite=args.overwrite,
                                       on_bytes=bar.update,
                                       on_total=lambda n: setattr(bar, "total", n),
                                       hf_config=args.hf_config)
    except CheckpointError as exc:
        print(f"trainkit ckpt export: {exc}", file=sys.stderr)
        return _error_code(exc)
    except OSError as exc:
        name = str(exc.filename) if exc.filename is not None else None
        if name is not None and not name.startswith(str(args.to)):
            # a read of the checkpoint failed (a link where a step should be, say): bad input
            where = name if os.path.isabs(name) else f"{args.dir}/{name}"
            print(f"trainkit ckpt export: cannot read {where}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
        print(f"trainkit ckpt export: cannot write {name or args.to}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    for f in files:
        print(f)
    if args.hf_config is None:
        print("trainkit ckpt export: note: no config.json written; from_pretrained will need a config "
              "(pass --hf-config DIR with the model's Hugging Face files)", file=sys.stderr)
    return 0


def _import_dcp(args: argparse.Namespace) -> int:
    from trainkit.checkpoint.interop.dcp_import import (
        dcp_total_bytes,
        import_dcp,
        read_dcp_metadata,
    )
    from trainkit.checkpoint.errors import CheckpointError
    from trainkit.checkpoint.tiers import is_url

    if is_url(args.dst):
        _require_dir(args.dst)
    elif os.path.exists(args.dst) and not os.path.isdir(args.dst):
        print(f"trainkit ckpt import-dcp: {args.dst} exists and is not a directory",
              file=sys.stderr)
        return 1
    if args.step is not None and args.step < 0:
        print(f"trainkit ckpt import-dcp: --step must be >= 0, got {args.step}", file=sys.stderr)
        return 2
    try:
        md = read_dcp_metadata(args.src)
        with Progress(dcp_total_bytes(md), f"import {args.src}", force=args.progress) as bar:
            step = import_dcp(args.src, args.dst, step=args.step, on_bytes=bar.update,
                              metadata=md)
    except CheckpointError as exc:
        print(f"trainkit ckpt import-dcp: {exc}", file=sys.stderr)
        return _error_code(exc)
    except OSError as exc:
        print(f"trainkit ckpt import-dcp: {exc.filename or args.dst}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    print(f"imported {args.src} as step {step} of {args.dst}")
    return 0
