"""Split and rewrite the torchrun part of ``trainkit run ... -- [torchrun options] script``.

trainkit runs the real torchrun once per *generation* (one rendezvous of the current
members). It therefore owns the options that change between generations and passes
everything else through untouched. torch's own argument parser validates the user's
options, so a typo fails here with torchrun's message instead of at the first restart.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainkit.errors import TrainkitError

# torchrun options trainkit sets itself for every generation.
_OWNED = {"--nnodes", "--rdzv-id", "--rdzv-backend", "--rdzv-conf", "--standalone",
          "--node-rank", "--master-addr", "--master-port"}
# Options that only take a value (everything else in _OWNED with a value too, except flags).
_FLAGS = {"--standalone"}


class RunArgumentError(TrainkitError, ValueError):
    """Bad arguments to ``trainkit run``; the message says which and why."""


def _canonical(opt: str) -> str:
    return opt.split("=", 1)[0].replace("_", "-")


@dataclass(frozen=True, kw_only=True, slots=True)
class TorchrunArgs:
    """The user's torchrun invocation, decomposed.

    ``passthrough`` holds the options trainkit does not own, in their original order.
    ``script`` and ``script_args`` are the training script and its arguments.
    """

    passthrough: tuple[str, ...]
    script: str
    script_args: tuple[str, ...]
    nproc_per_node: int
    min_nodes: int
    max_nodes: int
    rdzv_endpoint: str | None
    rdzv_id: str
    rdzv_conf: str


def parse_torchrun_args(argv: list[str]) -> TorchrunArgs:
    """Validate ``argv`` with torchrun's parser and split it.

    Raises RunArgumentError for a missing script, a torchrun ``--max-restarts`` (trainkit
    owns restarts), a non-integer ``--nproc-per-node`` or a bad ``--nnodes`` range.
    """
    if not argv:
        raise RunArgumentError("no training script given: use `trainkit run [options] -- "
                               "[torchrun options] train.py [args]`")
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.exit_on_error = False
    try:
        ns = parser.parse_args(argv)
    except (SystemExit, Exception) as exc:  # argparse reports on stderr and exits
        raise RunArgumentError(f"torchrun does not accept these options: {' '.join(argv)} "
                               f"({exc})") from None
    n_script = 1 + len(ns.training_script_args)
    options, tail = argv[:len(argv) - n_script], argv[len(argv) - n_script:]
    passthrough: list[str] = []
    i = 0
    while i < len(options):
        opt = options[i]
        name = _canonical(opt) if opt.startswith("--") else opt
        takes_value = name.startswith("--") and "=" not in opt and name not in _FLAGS
        if name == "--max-restarts":
            raise RunArgumentError("--max-restarts belongs to trainkit (before `--`): trainkit "
                                   "counts whole-job restarts itself and runs each torchrun "
                                   "generation with --max-restarts=0")
        if name in _OWNED:
            i += 2 if takes_value else 1
            continue
        if name == "--rdzv-endpoint":
            i += 2 if takes_value else 1
            continue
        passthrough.append(opt)
        if takes_value and i + 1 < len(options) and not options[i + 1].startswith("-"):
            passthrough.append(options[i + 1])
            i += 1
        i += 1
    try:
        nproc = int(ns.nproc_per_node)
    except ValueError:
        raise RunArgumentError(f"--nproc-per-node must be an integer for trainkit run, got "
                               f"{ns.nproc_per_node!r}") from None
    min_nodes, max_nodes = _parse_nnodes(ns.nnodes)
    return TorchrunArgs(passthrough=tuple(passthrough), script=tail[0],
                        script_args=tuple(tail[1:]), nproc_per_node=nproc,
                        min_nodes=min_nodes, max_nodes=max_nodes,
                        rdzv_endpoint=ns.rdzv_endpoint or None,
                        rdzv_id=ns.rdzv_id if ns.rdzv_id != "none" else "trainkit",
                        rdzv_conf=ns.rdzv_conf or "")


def _parse_nnodes(value: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in str(value).split(":")]
    except ValueError:
        raise RunArgumentError(f"--nnodes must be N or MIN:MAX, got {value!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise RunArgumentError(f"--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX, got {value!r}")
    return parts[0], parts[1]


def warm_start_supported(args: TorchrunArgs) -> bool:
    """Workers start in ``-m trainkit.run.boot`` (zero-code monitoring, warm start): only
    for a plain Python script (not ``--module`` or ``--no-python`` launches)."""
    flags = {_canonical(o) for o in args.passthrough if o.startswith("-")}
    return args.script.endswith(".py") and not flags & {"-m", "--module", "--no-python"}


def generation_command(python: str, args: TorchrunArgs, *, nnodes: int, endpoint: str,
                       rdzv_id: str, rdzv_conf: str, warm: bool = False) -> list[str]:
    """The torchrun command line for one generation of ``nnodes`` members.

    The rendezvous store is hosted by the trainkit coordinator, so every agent joins as a
    client (``is_host=false``); the member count is fixed per generation, so the
    rendezvous closes as soon as everybody joined instead of waiting for ``last_call``.
    It runs torchrun through :mod:`trainkit.run.torchrun_main`, which binds the workers'
    bootstrap store to the node's address instead of every interface. ``warm`` is
    accepted for callers of the older signature: whether workers wait warm is told by
    their environment (``TRAINKIT_WARM_GO``), not by the command line.
    """
    conf = ",".join(filter(None, [args.rdzv_conf, rdzv_conf, "is_host=false"]))
    entry = ["-m", "trainkit.run.boot", args.script] if warm_start_supported(args) \
        else [args.script]
    return [python, "-m", "trainkit.run.torchrun_main", f"--nnodes={nnodes}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}",
            f"--rdzv-conf={conf}", "--max-restarts=0", *args.passthrough,
            *entry, *args.script_args]
