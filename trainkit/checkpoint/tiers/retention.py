"""Retention and garbage collection, per tier, crash-safe.

The rules (issue #3):

- a tier keeps its newest ``keep`` committed steps (``None``: all of them), so a step is
  deleted from a tier only once a newer step is committed *on that tier*;
- steps divisible by ``keep_every`` are never deleted from the persistent tier (the
  faster tiers are caches with bounded room);
- steps still being copied down (``protect``) are not deleted from any tier;
- deletion removes the commit record first (durably), then the data. A GC killed at
  any moment therefore leaves either a committed, complete step or an uncommitted
  directory, never a committed-but-broken one. Uncommitted directories older than the
  newest committed step are leftovers of interrupted saves or GCs and are removed too.

``plan_gc`` is pure (what to delete, and why); ``apply_gc`` does it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from trainkit.checkpoint.format.layout import COMMIT_FILE, parse_step_dirname, step_dirname
from trainkit.checkpoint.tiers import Tier
from trainkit.checkpoint.tiers.local import SET_ASIDE_SUFFIX

__all__ = ["GcPlan", "GcResult", "plan_gc", "apply_gc", "tier_state", "set_aside",
           "newest_write", "young_leftovers", "set_aside_dirs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GcPlan:
    """What a GC pass deletes from one tier."""

    tier: str
    delete: tuple[int, ...]          # committed steps beyond retention
    leftovers: tuple[int, ...]       # uncommitted step directories older than the newest commit
    kept: tuple[int, ...]            # committed steps that stay


def plan_gc(tier: str, committed: list[int], uncommitted: list[int], *, keep: int | None,
            keep_every: int | None = None, protect: frozenset[int] = frozenset()) -> GcPlan:
    """Decide what to delete from a tier (pure)."""
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    committed = sorted(committed)
    newest = committed[-1] if committed else None
    keep_set = set(committed if keep is None else committed[-keep:])
    keep_set |= set(protect)
    if keep_every:
        keep_set |= {s for s in committed if s % keep_every == 0}
    delete = tuple(s for s in committed if s not in keep_set)
    leftovers = tuple(s for s in sorted(uncommitted)
                      if newest is not None and s < newest and s not in protect)
    return GcPlan(tier, delete, leftovers, tuple(s for s in committed if s in keep_set))


def tier_state(tier: Tier) -> tuple[list[int], list[int]]:
    """(committed, uncommitted) step directories on a tier."""
    committed, uncommitted = [], []
    for s in tier.step_dirs():
        (committed if tier.size(f"{step_dirname(s)}/{COMMIT_FILE}") is not None
         else uncommitted).append(s)
    return committed, uncommitted


@dataclass(frozen=True)
class GcResult:
    """What a GC pass actually removed (a step that could not be removed is in
    ``failed`` with the reason, never reported as deleted)."""

    deleted: tuple[int, ...]
    leftovers: tuple[int, ...]
    failed: tuple[tuple[int, str], ...]


def apply_gc(tier: Tier, plan: GcPlan) -> GcResult:
    """Delete what ``plan`` says: the record first (the step stops being committed), then
    the data. An OSError on one step is logged and recorded in the result; the others
    still go (the tier flow simply tries again after the next save)."""
    deleted, leftovers, failed = [], [], []
    for step, committed in [(s, True) for s in plan.delete] + [(s, False)
                                                               for s in plan.leftovers]:
        try:
            if committed:
                tier.unpublish(step)
            tier.remove(step)
        except OSError as exc:
            log.warning("gc: could not remove step %d from the %s tier (%s): %s", step,
                        tier.name, tier.url, exc)
            failed.append((step, str(exc)))
            continue
        (deleted if committed else leftovers).append(step)
        log.info("gc: %s step %d from the %s tier (%s)", "deleted" if committed else
                 "removed the uncommitted leftovers of", step, tier.name, tier.url)
    return GcResult(tuple(deleted), tuple(leftovers), tuple(failed))


def newest_write(tier: Tier, step: int) -> float | None:
    """When anything in a step directory last changed (the newest mtime below it, links
    not followed), or None where the tier cannot say (not a POSIX directory)."""
    root = getattr(tier, "root", None)
    if root is None:
        return None
    top = os.path.join(root, step_dirname(step))
    try:
        newest = os.lstat(top).st_mtime
    except FileNotFoundError:
        return None
    for here, dirs, files in os.walk(top, followlinks=False):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(here, name)).st_mtime)
            except FileNotFoundError:
                continue
    return newest


def young_leftovers(tier: Tier, steps: tuple[int, ...], min_age: float,
                    now: float | None = None) -> tuple[int, ...]:
    """The uncommitted ``steps`` that may still be being written by a live job: changed
    within ``min_age`` seconds, or of unknown age."""
    now = time.time() if now is None else now
    out = []
    for s in steps:
        t = newest_write(tier, s)
        if t is None or now - t < min_age:
            out.append(s)
    return tuple(out)


def set_aside_dirs(tier: Tier) -> list[str]:
    """Step directories ``load()`` set aside (``step_N.corrupt...``) on a POSIX tier."""
    root = getattr(tier, "root", None)
    if root is None:
        return []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith("step_") and SET_ASIDE_SUFFIX in n
                  and parse_step_dirname(n.split(".", 1)[0]) is not None)


def set_aside(tier: Tier, step: int) -> str:
    """Take a committed step out of use without destroying anything; returns where it
    went. A tier that can rename (``set_aside``: POSIX) moves the whole step directory
    to ``step_N.corrupt``; any other keeps the commit record as ``zarr.json.corrupt``
    next to the data, then uncommits the step (a later save of the same step replaces
    that data)."""
    own = getattr(tier, "set_aside", None)
    if own is not None:
        return own(step)
    rel = f"{step_dirname(step)}/{COMMIT_FILE}"
    tier.write(f"{rel}.corrupt", memoryview(tier.read(rel)))
    tier.unpublish(step)
    return f"{tier.url}/{rel}.corrupt"
