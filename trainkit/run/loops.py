"""The restart-loop guard: a step that fails again right after its restore is suspect.

Why: restarting is the right answer to a node that crashed, and the wrong one to a job
that fails deterministically after resuming (a corrupt or poisoned checkpoint, a NaN the
restored state produces, a bad batch right after it). Restoring the same step again
only repeats the failure until ``--max-restarts`` runs out. So, after each failed
generation, the coordinator asks :func:`check_loop` over what the workers reported
(``reports.jsonl``: the step each generation restored, the steps it reached, a
``bad_step`` a script reported through :func:`trainkit.run.report.report_bad_step`):

- a generation *failed fast* when it failed within ``within_steps`` steps of the step it
  restored (or of a fresh start);
- the step it restored, S, is *suspect* when the generation failed fast and the failed
  generation before it either failed at the same step or also failed fast after
  restoring S (or a newer step: the guard walking down from a suspect).

A suspect S makes the next generation resume from an older committed step: the
coordinator puts ``TRAINKIT_RESTORE_BEFORE=S`` in the workers' environment, which
``Checkpointer.load()`` (and ``latest()``) honours; steps S and newer are uncommitted on
that resume and saved again. If the older step fails fast too, it becomes the next
suspect, and so on; ``--max-restarts`` still bounds the whole loop, and the give-up
summary names the suspected cause. Pure functions over reports: unit-tested by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["GenerationRecord", "LoopConfig", "Suspect", "check_loop", "generation_records"]


@dataclass(frozen=True, kw_only=True, slots=True)
class LoopConfig:
    within_steps: int = 3     # a failure this close after a restore is a "fast" failure


@dataclass(frozen=True, kw_only=True, slots=True)
class GenerationRecord:
    """What one generation's workers reported; ``restored`` None: a fresh start."""

    gen: int
    restored: int | None = None
    first_step: int | None = None
    last_step: int | None = None
    bad_step: int | None = None
    bad_reason: str = ""

    @property
    def start_step(self) -> int | None:
        """The step training resumed after: the restored one, else the one before the
        first reported step."""
        if self.restored is not None:
            return self.restored
        return None if self.first_step is None else self.first_step - 1

    @property
    def fail_step(self) -> int | None:
        return self.bad_step if self.bad_step is not None else self.last_step


@dataclass(frozen=True, kw_only=True, slots=True)
class Suspect:
    step: int                 # the restored step that keeps failing
    fail_step: int | None
    restore_before: int
    reason: str


def generation_records(reports: Iterable[Mapping[str, Any]]) -> dict[int, GenerationRecord]:
    """Per generation: its restore, first and last step, first bad step reported."""
    acc: dict[int, dict[str, Any]] = {}
    for r in reports:
        gen, step = r.get("gen"), r.get("step")
        if not isinstance(gen, int) or not isinstance(step, int):
            continue
        a = acc.setdefault(gen, {})
        kind = r.get("kind")
        if kind == "ckpt_restore" and "restored" not in a:
            a["restored"] = step
        elif kind == "step":
            a["first_step"] = min(a.get("first_step", step), step)
            a["last_step"] = max(a.get("last_step", step), step)
        elif kind == "bad_step" and "bad_step" not in a:
            a["bad_step"], a["bad_reason"] = step, str(r.get("reason") or "")
    return {g: GenerationRecord(gen=g, **a) for g, a in acc.items()}


def _fast(rec: GenerationRecord, cfg: LoopConfig) -> bool:
    start, fail = rec.start_step, rec.fail_step
    return start is not None and fail is not None and fail - start <= cfg.within_steps


def check_loop(failed: Sequence[GenerationRecord], cfg: LoopConfig = LoopConfig()
               ) -> Suspect | None:
    """The suspect step, when the newest failed generation (the last of ``failed``, in
    generation order) repeats the failure of the one before it (module docstring)."""
    if len(failed) < 2:
        return None
    prev, last = failed[-2], failed[-1]
    if not _fast(last, cfg) or last.start_step is None:
        return None
    same_step = prev.fail_step is not None and prev.fail_step == last.fail_step
    # failing fast after the same restore again, or after the older one the guard chose
    same_restore = (_fast(prev, cfg) and prev.start_step is not None
                    and last.start_step <= prev.start_step)
    if not (same_step or same_restore):
        return None
    s = last.start_step
    what = (f"a bad step reported at step {last.bad_step}"
            + (f" ({last.bad_reason})" if last.bad_reason else "")
            if last.bad_step is not None else f"a failure at step {last.fail_step}")
    origin = f"step {s}" if last.restored is not None else "a fresh start"
    reason = (f"{what}, {last.fail_step - s} step(s) after resuming from {origin}, as in "
              f"generation {prev.gen} (failed at step {prev.fail_step}): the job, not a node, "
              f"fails there; suspect: the state of step {s} or the data right after it")
    return Suspect(step=s, fail_step=last.fail_step, restore_before=s, reason=reason)
