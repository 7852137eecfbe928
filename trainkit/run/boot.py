"""The workers' bootstrap under ``trainkit run``: monitor, optionally wait warm, run the script.

    torchrun ... -m trainkit.run.boot train.py [args]

Every worker of every generation starts here rather than in the user's script, so a
script that never imports trainkit is still monitored (:mod:`trainkit.detect.auto`
patches ``init_process_group`` and hooks optimizer steps before the script runs). In a
pre-started ("warm") generation (``TRAINKIT_WARM_GO`` set, see :mod:`trainkit.run.warm`)
it first imports what a training script needs, waits for go and takes the generation's
membership from the go file. ``TRAINKIT_AUTO_MONITOR=0``
(``trainkit run --no-monitor``) skips the patching. The script then runs as
``__main__``, exactly as ``python train.py`` would run it.

Why a module of its own: ``python -m trainkit.run.warm`` printed runpy's
``RuntimeWarning: 'trainkit.run.warm' found in sys.modules`` in every worker, because
the package imported the module before runpy executed it. Nothing imports this module.
"""

from __future__ import annotations

import os
import runpy
import sys

from trainkit import rundir

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m trainkit.run.boot SCRIPT [ARGS]", file=sys.stderr)
        return 2
    script = argv[0]
    go = os.environ.get(rundir.WARM_GO_ENV)
    if go:
        from trainkit.run.warm import join_generation, wait_for_go, warm_imports

        warm_imports()
        if not wait_for_go(go, os.environ.get("LOCAL_RANK", "0")):
            return 1
        join_generation(go)
    if os.environ.get(rundir.AUTO_MONITOR_ENV, "1") not in ("0", "false", "off"):
        from trainkit.detect import auto

        auto.install()
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
