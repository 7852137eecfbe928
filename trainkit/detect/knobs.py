"""Every tunable of ``trainkit.detect``, in one place.

The environment variables' names live in :mod:`trainkit.rundir` (the ground floor
shared with ``trainkit run``, which sets them for its workers); the ones detect reads
are re-exported here. A script that already uses ``CollectiveMonitor`` needs no other
change: the launcher starts the aggregator and tells the workers where it is.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from trainkit.rundir import (AGGREGATOR_ENV, DETECT_ENV, HANG_TIMEOUT_ENV, RUN_DIR_ENV,
                             STACK_SIGNAL_ENV)

__all__ = [
    "AGGREGATOR_ENV",
    "RUN_DIR_ENV",
    "HANG_TIMEOUT_ENV",
    "DETECT_ENV",
    "STACK_SIGNAL_ENV",
    "ClassifierConfig",
    "parse_address",
    "stack_signal",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class ClassifierConfig:
    """Thresholds of the aggregator's classifiers.

    Fixed numbers here are only floors and persistence windows; the actual
    thresholds for slowness are learned online from the job's own repeating
    collectives (see ``classifiers``).
    """

    hang_timeout: float = 30.0
    """A collective with an arrival this old and no completion is a hang (with
    ``hang_timeout_auto``: the fallback until a timeout has been learned)."""
    hang_timeout_auto: bool = False
    """Learn the hang timeout from the job's step and collective durations
    (:mod:`trainkit.detect.hangtime`): ``hang_multiple`` x p99, at least ``hang_floor_s``."""
    hang_floor_s: float = 2.0
    """Floor of a learned hang timeout, for scheduling hiccups on a loaded machine."""
    hang_multiple: float = 4.0
    """A learned hang timeout is this multiple of the p99 step or collective duration."""
    heartbeat_timeout: float = 10.0
    """A connected rank silent this long is treated as crashed."""
    crash_wave_s: float = 0.01
    """Ranks dropping within this window of the first drop are named together.

    Processes killed together (a process-group kill, an OOM sweep) lose their sockets
    within a millisecond or two. A launcher's teardown of the dead rank's siblings
    follows its own poll interval (torchrun: 0.1 s), so a wider window names innocent
    ranks; 50 ms did so in about 1 of 6 runs under torchrun."""
    stack_wait_s: float = 2.0
    """How long a hang finding waits for the culprits' stacks."""
    warmup_steps: int = 3
    """Steps (or 10x collectives without step markers) ignored for statistics."""
    window: int = 10
    """Persistence window, in steps (collectives without step markers)."""
    persist_fraction: float = 0.7
    """Fraction of the window a departure must hold for."""
    p_value: float = 1e-3
    """Binomial significance needed to call a rank persistently last."""
    min_gap_s: float = 0.005
    """Absolute floor on a straggler's lateness."""
    gap_period_fraction: float = 0.1
    """A straggler's median lateness must exceed this fraction of the step period."""
    slow_ratio: float = 1.5
    """A slow collective takes this many times its learned normal duration, at least."""
    min_slow_s: float = 0.005
    """Absolute floor on the excess duration of a slow collective."""
    baseline_samples: int = 20
    """Samples learned per collective kind before slowness is judged."""
    probe_wait_s: float = 15.0
    """How long a slow-link finding waits for the targeted probe's answers."""
    probe_cooldown_s: float = 30.0
    """After a probe finds every link healthy, no new probe for that collective this long."""
    peer_probe_timeout_s: float = 1.0
    """Per-peer timeout of the reachability probe a communication hang triggers.

    Kept below ``stack_wait_s``: the hang finding waits that long for stacks and
    probe answers together, so a probe that times out still reports in time."""


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` -> (host, port), with a clear error."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{AGGREGATOR_ENV}={text!r}: expected host:port")
    return host.strip("[]"), int(port)


def stack_signal() -> signal.Signals:
    name = os.environ.get(STACK_SIGNAL_ENV, "SIGUSR2")
    try:
        return signal.Signals[name] if not name.isdigit() else signal.Signals(int(name))
    except (KeyError, ValueError):
        raise ValueError(f"{STACK_SIGNAL_ENV}={name!r} is not a signal name") from None
