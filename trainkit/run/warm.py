"""The worker side of the warm pool (:mod:`trainkit.run.pool`).

Why: after a crash, both trainkit and a plain torchrun job spend seconds before the
first step of the restart, on starting torchrun, the rendezvous, and every worker's
Python importing torch, at the very moment the job is idle. The node agent therefore
starts a one-node torchrun ahead of time, while the current generation trains. Its
workers run this module: they import what a training script needs, say they are ready,
and wait. The go file the agent writes when a generation starts on the pool carries the
membership (node rank, member count, the generation's store), so the same warm workers
join an unchanged membership and one with a node excluded alike; the restart costs
about one ``init_process_group``.

    torchrun ... -m trainkit.run.boot train.py [args]    # with TRAINKIT_WARM_GO set

The entry is :mod:`trainkit.run.boot` (which also installs zero-code monitoring); this
module holds the warm part. Environment (set by the agent): ``TRAINKIT_WARM_GO``, a file path; the worker writes
``<path>.ready.<LOCAL_RANK>`` once warm and, when ``<path>`` appears, reads the
generation from it (:class:`~trainkit.run.pool.GoPlan`), sets the variables torchrun
would have set for that membership, and runs the script. A worker whose torchrun parent
disappears exits instead of waiting forever.
"""

from __future__ import annotations

import os
import sys
import time

__all__ = ["join_generation", "main", "wait_for_go", "warm_imports"]

_POLL_S = 0.005


def warm_imports() -> None:
    """What nearly every torch training script imports, done ahead of time. Measured on
    torch 2.13 CPU: ``DistributedDataParallel(...)`` imports ``torch._dynamo`` on first
    use, 2.8 s alone and 5-8 s with four ranks starting together on two cores; that
    import, not the collectives, dominated a restart."""
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401
    import torch.distributed  # noqa: F401
    import torch.nn.functional  # noqa: F401
    import torch.nn.parallel  # noqa: F401
    import torch.optim  # noqa: F401

    import trainkit.checkpoint.engine  # noqa: F401
    import trainkit.detect  # noqa: F401


def wait_for_go(go: str, local_rank: str) -> bool:
    """Announce readiness and wait for the go file; False if the parent went away."""
    parent = os.getppid()
    with open(f"{go}.ready.{local_rank}", "w"):
        pass
    while not os.path.exists(go):
        if os.getppid() != parent:
            return False
        time.sleep(_POLL_S)
    return True


def join_generation(go: str) -> None:
    """Take the generation's membership from the go file into this worker's environment."""
    import json

    from trainkit.run.pool import GoPlan, worker_env

    with open(go, encoding="utf-8") as f:
        plan = GoPlan.from_json(json.load(f))
    os.environ.update(worker_env(plan, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                                 local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def main(argv: list[str] | None = None) -> int:
    """Kept for ``-m trainkit.run.warm`` command lines: the bootstrap does the work."""
    from trainkit.run.boot import main as boot

    return boot(argv)


if __name__ == "__main__":
    sys.exit(main())
