"""In-memory merge API: dicts of tensors in, dict out.

Runs the same engine as the streamed CLI over in-memory readers, so
``ties_merge(...)`` and ``trainkit merge ties ...`` give identical bits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from trainkit.io.readers import DictReader
from trainkit.merge.engine import DictSink, run_merge
from trainkit.merge.methods import make_config

__all__ = ["merge", "ties_merge"]


def merge(
    method: str,
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    *,
    density: float | None = None,
    lam: float = 1.0,
    scope: str | None = None,
    weights: Sequence[float] | None = None,
    compat: str | None = None,
    seed: int = 0,
    vocab_mismatch: str = "error",
    threads: int = 1,
    densities: Sequence[float] | None = None,
    normalize: bool | None = None,
    dtype: str | None = None,
    out_dtype: str | None = None,
) -> dict[str, torch.Tensor]:
    """Merge fine-tuned state dicts into ``base`` with a method of ``METHODS``.

    ``densities`` (one per model) and ``normalize`` (with ``compat="mergekit"``)
    are mergekit's per-model ``density`` and ``normalize`` parameters; ``dtype`` and
    ``out_dtype`` (with ``compat="mergekit"``) are mergekit's: inputs cast to ``dtype``,
    arithmetic in it, output in ``out_dtype`` (default ``dtype``).

    Inputs are never modified; the output has the base's keys, shapes and dtypes
    (under compat, floating tensors take mergekit's ``out_dtype`` / ``dtype`` when set).
    Options are keyword-only and validated by :func:`make_config` (all problems
    reported at once, as ``ValueError``); an unknown keyword is a ``TypeError``.
    """
    cfg = make_config(
        method,
        len(models),
        density=density,
        lam=lam,
        scope=scope,
        weights=weights,
        compat=compat,
        seed=seed,
        vocab_mismatch=vocab_mismatch,
        densities=densities,
        normalize=normalize,
        dtype=dtype,
        out_dtype=out_dtype,
    )
    base_r = DictReader(base, "base")
    model_rs = [DictReader(m, f"model {i}") for i, m in enumerate(models)]
    sink = DictSink()
    run_merge(base_r, model_rs, cfg, sink, threads=threads)
    return {k: sink.tensors[k] for k in base_r.keys()}


def ties_merge(
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    *,
    density: float = 0.2,
    lam: float = 1.0,
    scope: str | None = None,
    weights: Sequence[float] | None = None,
    compat: str | None = None,
    vocab_mismatch: str = "error",
    threads: int = 1,
) -> dict[str, torch.Tensor]:
    """TIES-Merging (Yadav et al., 2023), exactly as the authors' released code.

    ``tv_i = w_i * (m_i - base)`` in float32 (or wider); each ``tv_i`` keeps
    ``|tv_i| >= t_i`` with ``t_i`` its k-th smallest magnitude, k = d - int(d * density),
    over all parameters (``scope="global"``, the default) or per tensor (``scope="tensor"``,
    the default and the only scope with ``compat="mergekit"``);
    the sign of the sum of trimmed values is elected (exact-zero sums take the
    majority sign of the vector, or of the tensor in tensor scope); agreeing
    entries are averaged; the result ``base + lam * mean`` is cast to the base dtype.
    ``compat="mergekit"`` reproduces mergekit 0.1.5's ties instead. Every option is
    keyword-only, so an unknown one is a ``TypeError`` rather than a silent shift.

    Example::

        merged = ties_merge(base, [ft_a, ft_b, ft_c], density=0.2, lam=1.0)
    """
    return merge("ties", base, models, density=density, lam=lam, scope=scope, weights=weights, compat=compat,
                 vocab_mismatch=vocab_mismatch, threads=threads)
