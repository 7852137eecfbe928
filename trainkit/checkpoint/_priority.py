"""Lower CPU priority for the checkpoint's background threads (Linux: per thread).

Why: after ``save()`` returns, chunk checksums and writes (the ``io`` threads) and the
commit run while training continues, and on a node whose cores are all busy with
training they take CPU from it. None of that work is on the training loop's path (the
lazy copy that ``optimizer.step()`` may wait for runs on the data thread, which keeps
its priority), so those threads yield to training: the checkpoint becomes durable a
little later instead of slowing the steps. On Linux ``setpriority(PRIO_PROCESS, tid)``
sets one thread's nice value; elsewhere it would name a process, so nothing is changed.
"""

from __future__ import annotations

import os
import sys
import threading

__all__ = ["DEFAULT_BACKGROUND_NICE", "lower_thread_priority"]

DEFAULT_BACKGROUND_NICE = 10


def lower_thread_priority(increment: int) -> None:
    """Raise the calling thread's nice value by ``increment`` (capped at 19); a thread
    pool ``initializer``. A no-op for ``increment <= 0``, off Linux, or where the
    system refuses."""
    if increment <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, now + increment))
    except OSError:
        pass
