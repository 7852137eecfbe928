"""Tied input/output embeddings in merges (``tie_word_embeddings`` in the base's config.json).

A tied model holds one matrix for the embedding and the LM head. ``save_pretrained``
writes it once (under the embedding's name), other writers store ``lm_head.weight``
too, so the inputs of one merge may disagree on whether the head is present. When
the base's config says the weights are tied, the head is the embedding on every
input: ``lm_head.weight`` is left out of every reader, merged once as the
embedding, and the output stores it once, as ``save_pretrained`` does (the copied
config.json re-ties it on load).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainkit.io.readers import TensorMeta, TensorReader

__all__ = ["TIED_HEAD", "tied_in_config", "WithoutKeys", "untie_inputs"]

TIED_HEAD = "lm_head.weight"


def tied_in_config(directory: Path) -> bool:
    """``tie_word_embeddings`` of ``directory/config.json`` (False when absent or unreadable)."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("tie_word_embeddings") is True


class WithoutKeys:
    """A :class:`TensorReader` view that hides some tensor names (reads nothing itself)."""

    def __init__(self, inner: TensorReader, hidden: set[str]):
        self.inner, self.hidden = inner, set(hidden)
        self.description = inner.description

    def keys(self) -> list[str]:
        return [k for k in self.inner.keys() if k not in self.hidden]

    def meta(self, name: str) -> TensorMeta:
        return self.inner.meta(name)

    def get(self, name: str) -> torch.Tensor:
        return self.inner.get(name)

    def files(self) -> list[Path]:
        return self.inner.files()

    def prefetch(self, name: str) -> None:
        fn = getattr(self.inner, "prefetch", None)
        if fn is not None:
            fn(name)


def untie_inputs(base_dir: Path | None, readers: list[TensorReader]) -> tuple[list[TensorReader], bool]:
    """Hide ``lm_head.weight`` on every reader when the base's config ties it; (readers, tied)."""
    if base_dir is None or not tied_in_config(base_dir):
        return readers, False
    return [WithoutKeys(r, {TIED_HEAD}) if TIED_HEAD in r.keys() else r for r in readers], True
