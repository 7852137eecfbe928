"""Starting the anomaly-detection aggregator for a ``trainkit run`` job.

The aggregator is its own process (so a dead or hung rank 0 cannot blind it), owned by
the coordinator. Workers find it through ``TRAINKIT_AGGREGATOR=host:port``, which the
agents set; ``CollectiveMonitor`` then reports to it instead of starting its own.

Starting it makes the job's secret (``TRAINKIT_AGG_SECRET``, unless the user set it) in
this process's environment, which the local agents and their workers inherit. Agents on
other hosts read it from the control store (key ``tk/agg_secret``) unless they have the
variable themselves; see the README on what the unauthenticated store means.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from trainkit.rundir import AGG_SECRET_ENV


@dataclass(frozen=True, slots=True)
class AggregatorHandle:
    address: str
    pid: int
    secret: str = dataclasses.field(default="", repr=False)

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # a zombie child of ours counts as gone
            return os.waitpid(self.pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:
            return True

    def stop(self, grace: float = 5.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if not self.alive():
                    return
                time.sleep(0.05)


def start_aggregator(run_dir: Path, *, host: str, hang_timeout: float | str,
                     timeout: float = 30.0) -> AggregatorHandle | None:
    """Start the aggregator; None if ``trainkit.detect`` is not installed."""
    try:
        from trainkit.detect.monitor import start_aggregator as spawn
    except ImportError:
        return None
    agg_host, port, pid = spawn(run_dir, hang_timeout=hang_timeout, host=host,
                                standalone=False, timeout=timeout)
    return AggregatorHandle(address=f"{agg_host}:{port}", pid=pid,
                            secret=os.environ.get(AGG_SECRET_ENV, ""))
