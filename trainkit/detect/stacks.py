"""Python stacks of a rank on demand, for hang findings (``stack_req`` from the aggregator).

Called from the channel's reader thread when the aggregator asks, while the training
thread may be blocked inside a collective.
"""

from __future__ import annotations

import faulthandler
import os
import tempfile
import threading
import time

__all__ = ["StackDumper"]


class StackDumper:
    """Python stacks of every thread on demand, even while the training thread is blocked.

    faulthandler's C signal handler writes the stacks without needing the GIL;
    if the signal cannot be registered, ``faulthandler.dump_traceback`` from the
    requesting thread is the fallback.
    """

    def __init__(self, signum: int):
        self.signum = signum
        self._file = tempfile.TemporaryFile(mode="w+b", prefix="trainkit-stacks-")
        self._lock = threading.Lock()
        try:
            faulthandler.register(signum, file=self._file, all_threads=True, chain=False)
            self._registered = True
        except (RuntimeError, ValueError, OSError):
            self._registered = False

    def dump(self, timeout: float = 1.0) -> str:
        with self._lock:
            self._file.seek(0, os.SEEK_END)
            start = self._file.tell()
            if self._registered:
                os.kill(os.getpid(), self.signum)
                deadline = time.monotonic() + timeout
                size = start
                while time.monotonic() < deadline:
                    time.sleep(0.05)
                    self._file.seek(0, os.SEEK_END)
                    new = self._file.tell()
                    if new > start and new == size:
                        break
                    size = new
            else:
                faulthandler.dump_traceback(self._file, all_threads=True)
            self._file.seek(start)
            return self._file.read().decode(errors="replace")

    def close(self) -> None:
        if self._registered:
            try:
                faulthandler.unregister(self.signum)
            except (RuntimeError, ValueError):
                pass
        self._file.close()
