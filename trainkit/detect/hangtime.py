"""``--hang-timeout auto``: a hang timeout learned from the job's own durations.

Why: a fixed timeout has to cover the slowest legitimate wait of any job, so it is tens
of seconds, and a job whose step takes 0.3 s waits all of that out on every hang (both
trainkit's old 30 s default and NVRx's ``ft_launcher`` 10 s). The longest a healthy
collective waits, from the first rank's arrival to its completion, is bounded by the
step time plus the skew between ranks, both of which the aggregator already observes.

The learned timeout is ``multiple x p99`` of the recent step durations and collective
durations (first arrival to last completion), with a floor of ``floor_s`` (a few
seconds, for scheduling hiccups of a loaded machine) and, until enough has been seen
(start-up, compilation, the first checkpoint), the fixed fallback. Start-up samples
(the first warm-up steps and collectives) are not learned from. A fixed number given by
the user is used as is.

Limits: a job whose ranks legitimately wait on one another much longer than usual (an
evaluation on rank 0 while the others wait in a barrier, every few thousand steps)
must give a fixed ``--hang-timeout`` above that wait.

Who calls what: the hang classifier, on the aggregator's one thread, feeds
:meth:`observe_step` and :meth:`observe_collective` and reads :meth:`value` only for a
collective that has waited longer than the floor.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

__all__ = ["HangTimeout", "parse_hang_timeout"]


def parse_hang_timeout(text: str | float) -> float | None:
    """``"auto"`` -> None (learned); a number > 0 -> seconds; else ValueError."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"hang timeout must be 'auto' or seconds > 0, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"hang timeout must be 'auto' or seconds > 0, got {text!r}")
    return value


def _p99(values: collections.deque) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


@dataclass
class HangTimeout:
    """The effective hang timeout of one job (module docstring)."""

    fixed: float | None = None
    """A user's fixed timeout; None learns."""
    fallback_s: float = 30.0
    """Used until enough has been learned."""
    floor_s: float = 2.0
    multiple: float = 4.0
    warmup_steps: int = 3
    warmup_collectives: int = 30
    min_steps: int = 5
    min_collectives: int = 20
    window: int = 512
    _steps: collections.deque = field(default_factory=collections.deque, repr=False)
    _colls: collections.deque = field(default_factory=collections.deque, repr=False)
    _seen_steps: int = 0
    _seen_colls: int = 0

    def __post_init__(self) -> None:
        self._steps = collections.deque(maxlen=self.window)
        self._colls = collections.deque(maxlen=self.window)

    @property
    def auto(self) -> bool:
        return self.fixed is None

    def restart(self) -> None:
        """A new attempt: its start-up is warm-up again (the fallback applies until it is
        over); what was learned is kept."""
        self._seen_steps = self._seen_colls = 0

    def observe_step(self, seconds: float) -> None:
        self._seen_steps += 1
        if self._seen_steps > self.warmup_steps and seconds >= 0:
            self._steps.append(seconds)

    def observe_collective(self, seconds: float) -> None:
        self._seen_colls += 1
        if self._seen_colls > self.warmup_collectives and seconds >= 0:
            self._colls.append(seconds)

    @property
    def learned(self) -> bool:
        """Enough samples, and this attempt is past its own start-up: with step markers,
        its warm-up steps (a restore after a restart stalls ranks in collectives long
        before the first step); without, its warm-up collectives."""
        if len(self._steps) >= self.min_steps:
            return self._seen_steps > self.warmup_steps
        return (self._seen_steps == 0 and len(self._colls) >= self.min_collectives
                and self._seen_colls > self.warmup_collectives)

    def value(self) -> float:
        """Seconds a collective may wait before it is a hang."""
        if self.fixed is not None:
            return self.fixed
        if not self.learned:
            return max(self.fallback_s, self.floor_s)
        typical = max(_p99(self._steps) if len(self._steps) >= self.min_steps else 0.0,
                      _p99(self._colls) if len(self._colls) >= self.min_collectives else 0.0)
        return max(self.floor_s, self.multiple * typical)
