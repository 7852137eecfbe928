"""Size caps of traffic-planning inputs, in one place.

Why caps: a planning input is a small file, but ``hosts_per_leaf = 1000000000`` or
``hosts = "0-999999999"`` asks for arrays of billions of entries, which used to end in a
``MemoryError`` traceback. Real leaf-spine fabrics are far below these numbers (the
largest training clusters have ~10^5 NICs), so a value above a cap is a typo, and is
reported naming the field and the limit.
"""

from __future__ import annotations

from trainkit.traffic.errors import TrafficError

__all__ = ["LIMITS", "check_limit"]

LIMITS: dict[str, int] = {
    "leaves": 4096,
    "spines": 4096,
    "hosts_per_leaf": 4096,
    "nics_per_host": 64,
    "links_per_spine": 64,
    "nics": 1 << 18,          # NICs of a fabric, and hosts listed by one job
    "channels": 1024,
}


def check_limit(field: str, value: int, kind: str, error: type[TrafficError] = TrafficError) -> None:
    """Raise ``error(field, ...)`` when ``value`` exceeds ``LIMITS[kind]``."""
    limit = LIMITS[kind]
    if value > limit:
        raise error(field, f"{value} is above the limit of {limit} {kind.replace('_', ' ')}")
