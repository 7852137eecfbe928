"""The merge plan: which tensors are merged, over which rows, validated up front.

Made by a pure function of the readers' headers (no tensor data is read), so
every structural problem of the inputs is reported at once, before any work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainkit.errors import InputError
from trainkit.io.readers import TensorReader
from trainkit.merge.kernel import compute_dtype
from trainkit.merge.methods import MergeConfig

__all__ = ["MergeInputError", "TensorTask", "MergePlan", "plan_merge", "EMBEDDING_MARKERS"]

EMBEDDING_MARKERS = ("embed", "lm_head", "wte", "word_embeddings", "shared.weight", "output.weight")
_MAX_LISTED = 40


class MergeInputError(InputError):
    """Bad merge inputs; ``problems`` lists every one found."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = self.problems[:_MAX_LISTED]
        more = len(self.problems) - len(shown)
        text = f"{len(self.problems)} problem(s) with the merge inputs:\n  - " + "\n  - ".join(shown)
        if more:
            text += f"\n  ... and {more} more"
        super().__init__(text)


@dataclass(frozen=True, slots=True)
class TensorTask:
    """One output tensor. ``rows`` is set when only the first ``rows`` rows are merged."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    merged: bool
    rows: int | None = None

    @property
    def merged_numel(self) -> int:
        if not self.merged:
            return 0
        n = self.rows if self.rows is not None else (self.shape[0] if self.shape else 1)
        for s in self.shape[1:]:
            n *= s
        return n


@dataclass(frozen=True, slots=True)
class MergePlan:
    """All tensors of the output, in the base's order, and the size of a task vector."""

    tasks: tuple[TensorTask, ...]
    total: int
    dtype: torch.dtype

    @property
    def largest_numel(self) -> int:
        return max((t.merged_numel for t in self.tasks), default=0)


def _is_embedding(name: str) -> bool:
    return any(marker in name for marker in EMBEDDING_MARKERS)


def plan_merge(base: TensorReader, models: list[TensorReader], cfg: MergeConfig) -> MergePlan:
    """Check that the models line up with the base and plan the output.

    Raises :class:`MergeInputError` listing missing/extra keys, dtype and shape
    mismatches, and vocabulary-size mismatches (unless ``vocab_mismatch="shared"``).
    """
    problems: list[str] = []
    if not models:
        raise MergeInputError(["the model list is empty: give at least one fine-tuned model"])
    base_keys = base.keys()
    base_set = set(base_keys)
    key_sets = [set(m.keys()) for m in models]
    for m, keys in zip(models, key_sets):
        missing = [k for k in base_keys if k not in keys]
        extra = sorted(keys - base_set)
        if missing:
            problems.append(f"{m.description}: missing {len(missing)} tensor(s) of the base: {missing[:8]}")
        if extra:
            problems.append(f"{m.description}: {len(extra)} tensor(s) not in the base: {extra[:8]}")
    tasks: list[TensorTask] = []
    for name in base_keys:
        bm = base.meta(name)
        merged = bm.dtype.is_floating_point
        rows: int | None = None
        for m, keys in zip(models, key_sets):
            if name not in keys:
                continue
            mm = m.meta(name)
            if mm.dtype != bm.dtype:
                problems.append(f"{name}: dtype {mm.dtype} in {m.description}, {bm.dtype} in the base")
            if mm.shape == bm.shape:
                continue
            same_tail = len(mm.shape) == len(bm.shape) >= 1 and mm.shape[1:] == bm.shape[1:]
            if same_tail and _is_embedding(name):
                if cfg.vocab_mismatch == "shared":
                    r = min(mm.shape[0], bm.shape[0])
                    rows = r if rows is None else min(rows, r)
                else:
                    problems.append(
                        f"{name}: vocabulary-size mismatch, {mm.shape[0]} rows in {m.description}, "
                        f"{bm.shape[0]} in the base (use vocab_mismatch='shared' / --vocab-mismatch shared "
                        "to merge the shared rows)"
                    )
            else:
                problems.append(f"{name}: shape {list(mm.shape)} in {m.description}, {list(bm.shape)} in the base")
        tasks.append(TensorTask(name, bm.shape, bm.dtype, merged, rows))
    if problems:
        raise MergeInputError(problems)
    dtype = compute_dtype(*(t.dtype for t in tasks if t.merged))
    total = sum(t.merged_numel for t in tasks)
    return MergePlan(tuple(tasks), total, dtype)
