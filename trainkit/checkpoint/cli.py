"""``trainkit ckpt``: look at and verify checkpoint directories.

    trainkit ckpt ls DIR [--local-dir D] [--memory-dir D] [--json]
                                           steps, tiers, ranks, sizes, commit times
    trainkit ckpt info DIR STEP            the tensor table: rank, or replicated
    trainkit ckpt verify DIR [STEP]        every checksum; exit 1 with a report on a mismatch
    trainkit ckpt gc DIR --keep N [--keep-every K] [--dry-run]
                                           apply a retention policy to one tier
    trainkit ckpt export DIR STEP --to out.safetensors   the model part as safetensors
    trainkit ckpt import-dcp SRC DST [--step N]          a DCP checkpoint into a step

DIR may be a local path or a URL (``s3://...``, via fsspec).

Handlers import the engine lazily, so ``trainkit --help`` stays fast. Every handler
runs under :func:`_quiet_pipe`: output closed early (``trainkit ckpt info ... | head``)
ends the command quietly instead of with a ``BrokenPipeError`` traceback.
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

    run.__name__ = handler.__name__
    return run


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
                                    "newest committed step.")
    gc.add_argument("dir", help="checkpoint directory or URL (any one tier)")
    gc.add_argument("--keep", type=int, required=True, help="newest committed steps to keep")
    gc.add_argument("--keep-every", type=int, default=None,
                    help="never delete steps divisible by this")
    gc.add_argument("--dry-run", action="store_true", help="say what would go; delete nothing")
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

    advise = sub.add_parser(
        "advise", help="the checkpoint interval that maximises goodput (Young/Daly)",
        description="Given the measured checkpoint stall, persist latency, restore time, "
                    "detection latency and a per-node MTBF with the node count, print the "
                    "checkpoint interval that maximises goodput and the expected fraction of "
                    "time lost. Job MTBF = node MTBF / nodes; the interval is never shorter "
                    "than the persist latency; loss per failure = interval/2 + commit "
                    "latency + detection + restore.")
    advise.add_argument("--stall", type=float, required=True,
                        help="training time lost per checkpoint, seconds")
    advise.add_argument("--persist", type=float, required=True,
                        help="persist latency (save call to durable), seconds")
    advise.add_argument("--restore", type=float, required=True, help="restore time, seconds")
    advise.add_argument("--detect", type=float, required=True,
                        help="failure detection latency, seconds")
    advise.add_argument("--node-mtbf-hours", type=float, required=True,
                        help="mean time between failures of one node, hours")
    advise.add_argument("--nodes", type=int, required=True, help="number of nodes in the job")
    advise.add_argument("--commit", type=float, default=None,
                        help="commit latency, seconds (default: the persist latency)")
    advise.add_argument("--json", action="store_true", help="machine-readable output")
    advise.set_defaults(func=_quiet_pipe(_advise))


def _advise(args: argparse.Namespace) -> int:
    from trainkit.checkpoint.advise import advise, format_advice

    try:
        a = advise(stall_s=args.stall, persist_s=args.persist, restore_s=args.restore,
                   detect_s=args.detect, node_mtbf_s=args.node_mtbf_hours * 3600.0,
                   nodes=args.nodes, commit_s=args.commit)
    except ValueError as exc:
        print(f"trainkit ckpt advise: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(a.to_dict(), indent=1))
    else:
        print(format_advice(a))
    return 0


def _require_dir(path: str) -> None:
    """A local directory must exist; a URL (s3://...) must be listable (endpoint and
    credentials from the standard AWS environment), else one clear line, no traceback."""
    from trainkit.checkpoint.tiers import is_url

    if is_url(path):
        from trainkit.checkpoint import reader

        try:
            reader.as_tier(path).step_dirs()
        except ImportError as exc:
            raise SystemExit(f"trainkit ckpt: cannot open {path}: URL support is not "
                             f"available ({exc})") from None
        except (OSError, ValueError) as exc:
            raise SystemExit(f"trainkit ckpt: cannot read {path}: {exc}") from None
        return
    if not os.path.isdir(path):
        raise SystemExit(f"trainkit ckpt: {path} is not a directory")


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
    from trainkit.checkpoint.tiers.retention import apply_gc, plan_gc, tier_state

    _require_dir(args.dir)
    tier = reader.as_tier(args.dir)
    try:
        committed, uncommitted = tier_state(tier)
        plan = plan_gc(tier.name, committed, uncommitted, keep=args.keep,
                       keep_every=args.keep_every)
    except ValueError as exc:
        print(f"trainkit ckpt gc: {exc}", file=sys.stderr)
        return 2
    if not args.dry_run:
        apply_gc(tier, plan)
    verb = "would delete" if args.dry_run else "deleted"
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "delete": list(plan.delete),
                          "leftovers": list(plan.leftovers), "kept": list(plan.kept)}))
        return 0
    print(f"{args.dir}: {verb} committed steps {list(plan.delete) or 'none'}; "
          f"{verb} uncommitted leftovers {list(plan.leftovers) or 'none'}; "
          f"kept {list(plan.kept) or 'none'}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from trainkit.checkpoint import catalog
    from trainkit.checkpoint.errors import CheckpointError

    _require_dir(args.dir)
    try:
        table = catalog.tensor_table(args.dir, args.step)
    except CheckpointError as exc:
        print(f"trainkit ckpt info: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    width = max([len(t["name"]) for t in table] + [4])
    print(f"{'rank':>10}  {'name':<{width}}  {'dtype':<14} {'shape':<20} {'bytes':>10}")
    for t in table:
        note = (f"  piece of {tuple(t['global_shape'])} split on dim {t['split_dim']}"
                if "global_shape" in t else "")
        print(f"{t['rank']:>10}  {t['name']:<{width}}  {t['dtype']:<14} "
              f"{str(tuple(t['shape'])):<20} {format_bytes(t['bytes']):>10}{note}")
    return 0


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
        return 1
    except OSError as exc:
        print(f"trainkit ckpt export: cannot write {exc.filename or args.to}: "
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
        return 1
    except OSError as exc:
        print(f"trainkit ckpt import-dcp: {exc.filename or args.dst}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    print(f"imported {args.src} as step {step} of {args.dst}")
    return 0
