"""The ranks-to-aggregator protocol's field checks: every value a rank sends is typed here.

Why a module of its own: the aggregator listens on a socket, so each message is input from
a process that may be buggy or hostile (issue 16). Whatever does not follow the protocol
raises :class:`BadMessage`, which the aggregator turns into a dropped connection and a log
line, never a crash. Keeping the checks apart from the socket loop keeps the loop readable
and lets a new message kind reuse the same few validators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from trainkit.detect.timeline import RankInfo, Timeline

__all__ = ["MAX_RANK", "MAX_ATTEMPT", "BadMessage", "Hello", "as_int", "as_float", "as_list",
           "as_dict", "parse_hello", "apply_batch"]

MAX_RANK = 1 << 24
MAX_ATTEMPT = 1 << 31


class BadMessage(ValueError):
    """A message from a connection that does not follow the protocol."""


def as_int(value: Any, lo: int = -(1 << 62), hi: int = 1 << 62) -> int:
    """An integer of the protocol (a JSON int, not a bool) within [lo, hi)."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value < hi:
        raise BadMessage(f"expected an integer in [{lo}, {hi}), got {str(value)[:40]!r}")
    return value


def as_float(value: Any) -> float:
    """A finite number of the protocol."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadMessage(f"expected a finite number, got {str(value)[:40]!r}")
    return float(value)


def as_list(value: Any) -> list:
    if not isinstance(value, list):
        raise BadMessage(f"expected a list, got {type(value).__name__}")
    return value


def as_dict(value: Any) -> dict:
    if not isinstance(value, dict):
        raise BadMessage(f"expected an object, got {type(value).__name__}")
    return value


@dataclass(frozen=True, slots=True)
class Hello:
    """A rank's checked ``hello`` (the secret is checked by the aggregator before this)."""

    attempt: int
    rank: int
    world: int | None
    local_rank: int | None
    pid: int | None
    node: str | None
    host: str
    auto: bool                  # the rank asked for the learned hang timeout
    timeout: float | None       # the rank's fixed hang timeout, if it gave one


def parse_hello(msg: dict[str, Any]) -> Hello:
    """Check and type every field of a ``hello``; strings are capped at 256 characters."""
    def optional_int(key: str, lo: int, hi: int) -> int | None:
        return as_int(msg[key], lo, hi) if msg.get(key) is not None else None

    auto = msg.get("hang_timeout") == "auto"
    timeout = as_float(msg["hang_timeout"]) if msg.get("hang_timeout") and not auto else None
    if timeout is not None and not timeout > 0:
        raise BadMessage(f"hang_timeout {timeout} is not > 0")
    return Hello(attempt=as_int(msg.get("attempt", 0), 0, MAX_ATTEMPT),
                 rank=as_int(msg["rank"], 0, MAX_RANK),
                 world=optional_int("world", 1, MAX_RANK + 1),
                 local_rank=optional_int("local_rank", 0, MAX_RANK),
                 pid=optional_int("pid", 1, 1 << 31),
                 node=str(msg["node"])[:256] if msg.get("node") is not None else None,
                 host=str(msg.get("host", "?"))[:256], auto=auto, timeout=timeout)


def apply_batch(tl: Timeline, info: RankInfo, offset: float, events: list) -> None:
    """Feed one batch of a rank's events into the timeline, clock offset applied.

    Tags: ``i`` issued (group, seq, op, bytes, dtype, time, step, peer), ``d`` done
    (group, seq, time, ok), ``w`` waited (group, seq, time), ``s`` step (step, time). An
    event of the wrong length or type raises (``ValueError``/``BadMessage``) part-way:
    the aggregator drops that connection, and what came before stays recorded.
    """
    rank = info.rank
    for ev in events:
        tag = as_list(ev)[0]
        if tag == "i":
            _, group, seq, op, nbytes, dtype, t, step, _peer = ev
            tl.on_issue(rank, str(group), as_int(seq), str(op), as_int(nbytes), str(dtype),
                        as_float(t) + offset, None if step is None else as_int(step))
        elif tag == "d":
            _, group, seq, t, ok = ev
            tl.on_done(rank, str(group), as_int(seq), as_float(t) + offset, bool(ok))
        elif tag == "w":
            _, group, seq, t = ev
            tl.on_wait(rank, str(group), as_int(seq), as_float(t) + offset)
        elif tag == "s":
            _, step, t = ev
            info.step = as_int(step)
            info.steps.append((info.step, as_float(t) + offset))
