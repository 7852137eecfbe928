"""Merge methods: one parameterised task-vector algorithm, named presets in a registry.

Every method maps ``(base, [models])`` to ``base + lam * combine(trim(w_i * (m_i - base)))``.
The presets differ only in how they trim and combine:

=================  =============  ==========  =====================================
preset             trim           sign vote   combine
=================  =============  ==========  =====================================
``average``        none           no          weighted mean (sum / sum of weights)
``task_arithmetic`` none          no          sum
``ties``           magnitude      yes         disjoint mean over agreeing entries
``dare_ties``      random (DARE)  yes         disjoint mean over agreeing entries
``linear``         none           no          sum(w_i m_i) / sum(w_i) of the models
                                              themselves (mergekit's ``linear``)
``dare_linear``    random (DARE)  no          sum
``breadcrumbs``    outliers       no          sum
``breadcrumbs_ties`` outliers     yes         disjoint mean over agreeing entries
``della``          della          yes         disjoint mean over agreeing entries
``della_linear``   della          no          sum
=================  =============  ==========  =====================================

Trims: ``magnitude`` keeps the largest ``density``; ``random`` keeps each entry
with probability ``density``; ``outliers`` (Model Breadcrumbs) drops the
largest ``gamma`` fraction and keeps the next ``density``; ``della`` (DELLA's
MagPrune) keeps each entry with a probability from ``density - epsilon`` (the
smallest of its row) to ``density + epsilon`` (the largest).

The registry is a plain dict (no registration by import side effect), so the
set of methods is visible in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["MergeMethod", "MergeConfig", "METHODS", "make_config", "Trim", "Combine", "Scope", "Compat",
           "MERGEKIT_DTYPES"]

Trim = Literal["none", "magnitude", "random", "outliers", "della"]
Combine = Literal["sum", "mean", "disjoint_mean", "linear"]
Scope = Literal["global", "tensor"]
Compat = Literal["mergekit"] | None
MERGEKIT_DTYPES = ("float32", "bfloat16", "float16", "float64")
"""The names mergekit's ``dtype`` and ``out_dtype`` take."""


@dataclass(frozen=True, slots=True)
class MergeMethod:
    """One point in the family: how task vectors are trimmed, voted and combined.

    A method is data, not code: the engine reads these fields, so every method
    runs the same streamed, exact path. Who uses it, in which order (one process;
    tensors in worker threads):

    1. :func:`make_config` (called by :func:`~trainkit.merge.merge`,
       :func:`~trainkit.merge.ties_merge` and ``trainkit merge``) looks the name
       up in :data:`METHODS` and freezes it with the options into a
       :class:`MergeConfig`; ``default_density`` fills a missing density.
    2. :func:`~trainkit.merge.plan_merge` checks the inputs' headers (no data read).
    3. :func:`~trainkit.merge.run_merge`, when ``trim == "magnitude"`` and the
       scope is global: threshold passes over all tensors (radix-selection
       histograms of each task vector's ``|w_i (m_i - base)|``).
    4. The merge pass, per tensor, from any worker thread, in this order:
       ``kernel.task_vectors`` -> the trim (``kernel.apply_trim`` for
       ``"magnitude"``, ``kernel.random_keep`` for ``"random"``, nothing for
       ``"none"``) -> ``kernel.combine`` (sign election when ``elect``, then
       ``combine``) -> the sink gets ``base + lam * combined`` in the base dtype.
    5. With ``elect`` in global scope, tensors whose exact-zero vote sums depend
       on the global majority sign are merged again once it is known.

    Under ``compat="mergekit"`` step 4 is :func:`~trainkit.merge.mergekit_ops.merge_tensor`
    (or ``linear_tensor``) instead: mergekit 0.1.5's ops in mergekit's dtype, random
    masks from one seeded generator with tensors in name order.

    A new preset that reuses these trims and combines is one entry in
    :data:`METHODS`; a new ``trim`` or ``combine`` value also needs its branch in
    ``kernel`` and in the reference of ``tests/test_method_registry.py``, which
    tests every entry of :data:`METHODS`.
    """

    name: str
    trim: Trim
    elect: bool
    combine: Combine
    default_density: float = 1.0
    mergekit_normalize: bool = True
    """mergekit's default of ``normalize`` for this method (divide by the summed weights)."""
    per_tensor: bool = False
    """The trim is defined per tensor (rank-based: ``outliers``, ``della``), so the scope is ``"tensor"``."""


METHODS: dict[str, MergeMethod] = {
    "average": MergeMethod("average", trim="none", elect=False, combine="mean"),
    "task_arithmetic": MergeMethod("task_arithmetic", trim="none", elect=False, combine="sum",
                                   mergekit_normalize=False),
    "ties": MergeMethod("ties", trim="magnitude", elect=True, combine="disjoint_mean", default_density=0.2),
    "dare_ties": MergeMethod("dare_ties", trim="random", elect=True, combine="disjoint_mean", default_density=0.2,
                             mergekit_normalize=False),
    "linear": MergeMethod("linear", trim="none", elect=False, combine="linear"),
    "dare_linear": MergeMethod("dare_linear", trim="random", elect=False, combine="sum", default_density=0.2,
                               mergekit_normalize=False),
    "breadcrumbs": MergeMethod("breadcrumbs", trim="outliers", elect=False, combine="sum", default_density=0.9,
                               mergekit_normalize=False, per_tensor=True),
    "breadcrumbs_ties": MergeMethod("breadcrumbs_ties", trim="outliers", elect=True, combine="disjoint_mean",
                                    default_density=0.9, mergekit_normalize=False, per_tensor=True),
    "della": MergeMethod("della", trim="della", elect=True, combine="disjoint_mean", default_density=0.5,
                         per_tensor=True),
    "della_linear": MergeMethod("della_linear", trim="della", elect=False, combine="sum", default_density=0.5,
                                mergekit_normalize=False, per_tensor=True),
}


@dataclass(frozen=True, slots=True)
class MergeConfig:
    """Everything that determines a merge's output. Made by :func:`make_config`.

    Attributes:
        method: the preset.
        density: fraction of each task vector kept by the trim, in (0, 1].
        lam: scale of the combined task vector added to the base.
        scope: ``"global"`` = one trim threshold per task vector over all merged
            parameters (the authors' code); ``"tensor"`` = one per tensor (mergekit, PEFT).
        weights: per-model weights (None = all 1).
        compat: ``"mergekit"`` reproduces mergekit 0.1.5's arithmetic (every preset but ``average``).
        seed: seed of the random trims (``dare_*``, ``della*``); under compat, mergekit's ``--random-seed``.
        vocab_mismatch: ``"error"`` or ``"shared"`` (merge only the rows all models share
            on embedding-like tensors; extra base rows are kept, extra model rows dropped).
        densities: per-model densities (mergekit's ``models[].parameters.density``);
            None = ``density`` for every model.
        normalize: under compat, mergekit's ``normalize`` (divide the mixed delta by the
            summed weights); None = the method's mergekit default.
        gamma: the ``outliers`` trim's fraction of largest entries dropped (mergekit's default 0.01).
        epsilon: the ``della`` trim's half-width of keep probabilities (mergekit's default 0.15).
        dtype: under compat, mergekit's ``dtype``: inputs are cast to it and the arithmetic
            runs in it (None = the inputs' promoted dtype). See :mod:`trainkit.merge.mergekit_ops`.
        out_dtype: under compat, mergekit's ``out_dtype``: the output's dtype (None = the
            dtype the arithmetic ran in).
    """

    method: MergeMethod
    density: float
    lam: float
    scope: Scope
    weights: tuple[float, ...] | None
    compat: Compat
    seed: int
    vocab_mismatch: Literal["error", "shared"]
    densities: tuple[float, ...] | None = None
    normalize: bool | None = None
    gamma: float = 0.01
    epsilon: float = 0.15
    dtype: str | None = None
    out_dtype: str | None = None

    def weight(self, i: int) -> float:
        return 1.0 if self.weights is None else self.weights[i]

    def density_of(self, i: int) -> float:
        return self.density if self.densities is None else self.densities[i]

    @property
    def normalizes(self) -> bool:
        """Whether mergekit's arithmetic divides by the summed weights (compat)."""
        return self.method.mergekit_normalize if self.normalize is None else self.normalize

    def for_model(self, i: int) -> "MergeConfig":
        """This config restricted to model ``i`` (its weight and density), for one-at-a-time passes."""
        w = None if self.weights is None else (self.weights[i],)
        d = None if self.densities is None else (self.densities[i],)
        return MergeConfig(self.method, self.density, self.lam, self.scope, w, self.compat, self.seed,
                           self.vocab_mismatch, d, self.normalize, self.gamma, self.epsilon, self.dtype,
                           self.out_dtype)

    def to_json(self) -> dict:
        return {
            "method": self.method.name,
            "density": self.density,
            "lam": self.lam,
            "scope": self.scope,
            "weights": list(self.weights) if self.weights is not None else None,
            "compat": self.compat,
            "seed": self.seed,
            "vocab_mismatch": self.vocab_mismatch,
            "densities": list(self.densities) if self.densities is not None else None,
            "normalize": self.normalize,
            "gamma": self.gamma,
            "epsilon": self.epsilon,
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
        }

    def notes(self) -> list[str]:
        """One-line notes for the user about options that have no effect (the CLI prints them)."""
        if self.method.combine == "linear" and self.lam != 1.0:
            return [f"lambda={self.lam:g} is ignored: linear has no lambda (mergekit's linear ignores it too)"]
        return []


def make_config(
    method: str,
    n_models: int,
    *,
    density: float | None = None,
    lam: float = 1.0,
    scope: str | None = None,
    weights: list[float] | tuple[float, ...] | None = None,
    compat: str | None = None,
    seed: int = 0,
    vocab_mismatch: str = "error",
    densities: list[float] | tuple[float, ...] | None = None,
    normalize: bool | None = None,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    dtype: str | None = None,
    out_dtype: str | None = None,
) -> MergeConfig:
    """Validate merge parameters and freeze them; every problem is reported at once.

    ``scope=None`` means ``"tensor"`` under ``compat="mergekit"`` (mergekit trims
    per tensor) and ``"global"`` otherwise; ``compat="mergekit"`` with an explicit
    ``scope="global"`` is refused, since no mergekit run could produce it.
    """
    problems: list[str] = []
    spec = METHODS.get(method)
    if spec is None:
        raise ValueError(f"unknown merge method {method!r}; known: {sorted(METHODS)}")
    if n_models < 1:
        problems.append("the model list is empty: give at least one fine-tuned model")
    if density is None:
        density = spec.default_density
    if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        problems.append(f"density must be in (0, 1], got {density!r}")
    if not (isinstance(lam, (int, float)) and math.isfinite(lam)):
        problems.append(f"lam must be a finite number, got {lam!r}")
    if scope is None:  # mergekit has one threshold per tensor, so its compat implies tensor scope
        scope = "tensor" if compat == "mergekit" or spec.per_tensor else "global"
    elif compat == "mergekit" and scope == "global":
        problems.append("compat='mergekit' is tensor scope (mergekit trims each tensor on its own); "
                        "drop scope='global' / --scope global")
    elif spec.per_tensor and scope == "global":
        problems.append(f"{spec.name}'s trim ranks entries within each tensor: it is tensor scope only; "
                        "drop scope='global' / --scope global")
    if scope not in ("global", "tensor"):
        problems.append(f"scope must be 'global' or 'tensor', got {scope!r}")
    if compat not in (None, "mergekit"):
        problems.append(f"compat must be None or 'mergekit', got {compat!r}")
    if compat == "mergekit" and spec.name in ("average",):
        problems.append(f"compat='mergekit' has no {spec.name!r} (mergekit's is 'linear')")
    if normalize is not None and compat != "mergekit":
        problems.append("normalize is mergekit's parameter: it needs compat='mergekit'")
    for key, value in (("dtype", dtype), ("out_dtype", out_dtype)):
        if value is None:
            continue
        if value not in MERGEKIT_DTYPES:
            problems.append(f"{key} must be one of {', '.join(MERGEKIT_DTYPES)}, got {value!r}")
        elif compat != "mergekit":
            problems.append(f"{key} is mergekit's parameter: it needs compat='mergekit'")
    if densities is not None:
        densities = tuple(densities)
        if len(densities) != n_models:
            problems.append(f"{len(densities)} densities given for {n_models} models")
        bad = [d for d in densities if not (isinstance(d, (int, float)) and 0.0 < d <= 1.0)]
        if bad:
            problems.append(f"densities must be in (0, 1], got {bad}")
        densities = tuple(float(d) for d in densities)
    if vocab_mismatch not in ("error", "shared"):
        problems.append(f"vocab_mismatch must be 'error' or 'shared', got {vocab_mismatch!r}")
    if weights is not None:
        weights = tuple(float(w) for w in weights)
        if len(weights) != n_models:
            problems.append(f"{len(weights)} weights given for {n_models} models")
        if not all(math.isfinite(w) for w in weights):
            problems.append(f"weights must be finite, got {list(weights)}")
        if spec.combine == "mean" and len(weights) == n_models and sum(weights) == 0:
            problems.append("weights of 'average' sum to zero")
    if not (isinstance(gamma, (int, float)) and 0.0 <= gamma < 1.0):
        problems.append(f"gamma must be in [0, 1), got {gamma!r}")
    if spec.trim == "della" and isinstance(epsilon, (int, float)):
        for d in densities or (density,):
            if isinstance(d, (int, float)) and d < 1.0 and not (0.0 < d - epsilon and d + epsilon < 1.0):
                problems.append(f"epsilon={epsilon} needs density +/- epsilon in (0, 1), got density {d}")
    elif not isinstance(epsilon, (int, float)):
        problems.append(f"epsilon must be a number, got {epsilon!r}")
    if problems:
        raise ValueError("invalid merge parameters:\n  - " + "\n  - ".join(problems))
    return MergeConfig(spec, float(density), float(lam), scope, weights, compat, int(seed), vocab_mismatch,  # type: ignore[arg-type]
                       densities, normalize, float(gamma), float(epsilon), dtype, out_dtype)
