"""Storage tiers (memory, node-local, persistent) and the flow of steps between them.

The seam is :class:`~trainkit.checkpoint.tiers.base.Tier` with its ``TIERS`` registry;
``local`` and ``fsspec`` implement it. ``flow`` (copying committed steps down the
tiers), ``flush`` (one rank's copy), ``retention`` (what to keep) and ``keeper`` (the
/dev/shm janitor process) are imported by their users, not here, so reading a tier
stays light.
"""

from __future__ import annotations

from trainkit.checkpoint.tiers.base import TIERS, Tier, is_url, open_tier
from trainkit.checkpoint.tiers.fsspec import FsspecTier
from trainkit.checkpoint.tiers.local import LocalTier

__all__ = ["Tier", "TIERS", "open_tier", "is_url", "LocalTier", "FsspecTier"]
