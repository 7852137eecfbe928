"""Per-tensor arithmetic of the merge family: task vectors, trim, vote, combine.

Pure functions of tensors. The streaming engine and the in-memory API call the
same functions, which is why a streamed merge equals ``ties_merge`` bit for bit.
All arithmetic is in float32 (float64 when an input is float64), whatever the
storage dtype; the result is cast back to the base dtype by the caller.

Summations over models run in model order with plain adds, so every result is
reproducible and independent of thread scheduling.

This is the authors' TIES and its relatives. ``compat="mergekit"`` does not come here:
:mod:`trainkit.merge.mergekit_ops` runs mergekit 0.1.5's own ops (its exact-k trim,
its mask draws, its weighting) so that the bits match, and this kernel refuses a
compat config instead of computing something close to it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainkit.merge.methods import MergeConfig
from trainkit.merge.threshold import RadixSelect

__all__ = [
    "DEFER",
    "Keep",
    "TensorResult",
    "compute_dtype",
    "task_vectors",
    "tensor_thresholds",
    "apply_trim",
    "combine",
    "magnitude_rank",
    "random_keep",
    "outlier_keep",
    "della_keep",
    "sparsify",
    "linear",
]


DEFER = 2
"""``majority`` value asking :func:`combine` to defer a tensor whose values would
depend on the global majority sign, which is known only after a full pass."""


@dataclass(frozen=True, slots=True)
class Keep:
    """How one task vector is trimmed inside one tensor.

    ``threshold=None`` keeps everything. Otherwise entries with ``|tv| >= threshold``
    are kept: every tie at the cut survives (the authors' rule).
    """

    threshold: float | None = None


@dataclass(slots=True)
class TensorResult:
    """The merged values of one tensor (``None`` when deferred) and its vote tally.

    ``sign_balance`` is (#entries elected +) - (#entries elected -); the global
    majority sign that breaks exact-zero sums is the sign of its total.
    ``ambiguous`` says the tensor has an exact-zero sum over nonzero entries,
    i.e. its values depend on that majority. ``retry_majority`` asks the caller
    to recompute the tensor with that majority (the in-place fast path guessed +1).
    """

    values: torch.Tensor | None
    sign_balance: float
    ambiguous: bool
    retry_majority: int | None = None


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _refuse_compat(cfg: MergeConfig) -> None:
    if cfg.compat is not None:
        raise ValueError(f"merge.kernel computes the authors' methods; compat={cfg.compat!r} "
                         f"merges run in trainkit.merge.mergekit_ops")


def task_vectors(
    base: torch.Tensor, models: list[torch.Tensor], cfg: MergeConfig, dtype: torch.dtype
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Return (base in the compute dtype, [w_i * (m_i - base)])."""
    _refuse_compat(cfg)
    b = base.to(dtype)
    tvs = []
    for i, m in enumerate(models):
        tv = torch.sub(m, b) if m.dtype == dtype else m.to(dtype).sub_(b)
        w = cfg.weight(i)
        if w != 1.0:
            tv.mul_(w)
        tvs.append(tv)
    return b, tvs


def magnitude_rank(d: int, cfg: MergeConfig, model: int = 0) -> int:
    """The 1-based rank (k-th smallest |tv|) of the trim threshold among ``d`` entries.

    0 means keep everything. The authors keep ``|tv| >= kth smallest`` with
    k = d - int(d * density).
    """
    _refuse_compat(cfg)
    density = cfg.density_of(model)
    if density >= 1.0 or d == 0:
        return 0
    return d - int(d * density)


def tensor_thresholds(tvs: list[torch.Tensor], cfg: MergeConfig) -> list[Keep]:
    """Per-tensor trim thresholds (``scope="tensor"``), exact by radix selection.

    Two histogram passes over the tensor's |tv| bit patterns: faster than
    ``kthvalue`` and without its copy and int64 index tensor.
    """
    keeps = []
    for i, tv in enumerate(tvs):
        d = tv.numel()
        rank = magnitude_rank(d, cfg, i)
        if rank == 0:
            keeps.append(Keep())
            continue
        a = tv.abs()
        sel = RadixSelect([rank], a.dtype)
        while not sel.done:
            sel.add(0, sel.histogram(a, 0))
            sel.advance()
        del a
        keeps.append(Keep(sel.threshold(0)))
    return keeps


def _prev_float(x: float, dtype: torch.dtype) -> float:
    t = torch.tensor(x, dtype=dtype)
    return torch.nextafter(t, torch.tensor(float("-inf"), dtype=dtype)).item()


def apply_trim(tv: torch.Tensor, keep: Keep) -> torch.Tensor:
    """Zero the entries of ``tv`` that the trim drops (may reuse ``tv``'s memory)."""
    if keep.threshold is None:
        return tv
    thr = keep.threshold
    if thr <= 0.0:
        return tv
    # hardshrink zeroes |x| <= lambd; with lambd the float just below thr
    # this keeps exactly |x| >= thr, in one fused pass.
    return F.hardshrink(tv, _prev_float(thr, tv.dtype))


def random_keep(tv: torch.Tensor, density: float, seed: int, model: int, name: str) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale by 1/density.

    The generator is seeded from (seed, model index, tensor name), so the mask is
    the same whichever thread or pass computes it.
    """
    if density >= 1.0:
        return tv
    g = _generator(seed, model, name)
    mask = (torch.rand(tv.shape, generator=g, dtype=tv.dtype) < density).to(tv.device)
    return torch.where(mask, tv / density, torch.zeros((), dtype=tv.dtype, device=tv.device))


def _generator(seed: int, model: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + model * 7919 + zlib.crc32(name.encode())) % 2**63)


def outlier_keep(tv: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` largest |tv| and the smallest, keep ``density``.

    The same ``torch.sort`` as mergekit 0.1.5's ``magnitude_outliers`` picks the
    entries, so ties at either cut fall the same way and the bits match.
    """
    if density >= 1.0:
        return tv
    n = tv.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = torch.sort(tv.abs().reshape(-1), descending=False).indices
    mask = torch.zeros(n, dtype=tv.dtype, device=tv.device)
    mask[order[n_bot: n_bot + target]] = 1
    return tv * mask.reshape(tv.shape)


def della_keep(tv: torch.Tensor, density: float, epsilon: float, seed: int, model: int,
               name: str) -> torch.Tensor:
    """DELLA's MagPrune: keep entry j of a row with probability from ``density - epsilon``
    (smallest |tv| of the row) rising linearly in rank to ``density + epsilon`` (largest).

    Kept entries are rescaled by 1/p (the paper). Rows are the first dimension (a 1-D
    tensor is one row). The mask is drawn on the CPU from a generator seeded by (seed, model,
    tensor name).
    """
    if density >= 1.0:
        return tv
    rows = tv.unsqueeze(0) if tv.dim() < 2 else tv
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, descending=False), dim=1).to(tv.dtype) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 2 * epsilon
    mask = torch.bernoulli(probs.cpu(), generator=_generator(seed, model, name)).to(tv.device)
    return (rows * mask / probs).reshape(tv.shape)


def sparsify(tv: torch.Tensor, cfg: MergeConfig, model: int, name: str) -> torch.Tensor:
    """The method's random or rank-based trim of one task vector (not ``magnitude``,
    whose thresholds the engine finds first; not ``none``)."""
    _refuse_compat(cfg)
    density = cfg.density_of(model)
    trim = cfg.method.trim
    if trim == "random":
        return random_keep(tv, density, cfg.seed, model, name)
    if trim == "outliers":
        return outlier_keep(tv, density, cfg.gamma)
    if trim == "della":
        return della_keep(tv, density, cfg.epsilon, cfg.seed, model, name)
    raise ValueError(f"sparsify: trim {trim!r} is not a per-tensor trim")


def linear(models: list[torch.Tensor], cfg: MergeConfig, dtype: torch.dtype) -> torch.Tensor:
    """mergekit's ``linear``: sum(w_i m_i) / sum(w_i) over the models themselves.

    The same ops as mergekit 0.1.5 (``addcmul_`` into a float32 zero tensor, one
    division), so the bits match; ``normalize=False`` skips the division.
    """
    dev = models[0].device
    ws = torch.tensor([cfg.weight(i) for i in range(len(models))], dtype=dtype, device=dev)
    shape = (1,) * models[0].dim()
    result = torch.zeros(models[0].shape, dtype=dtype, device=dev)
    for m, w in zip(models, ws.unbind(0)):
        result.addcmul_(m, w.reshape(shape))
    if cfg.normalize is not False:
        result.div_(ws.sum().reshape(shape))
    return result


def combine(
    base: torch.Tensor, kept: list[torch.Tensor], cfg: MergeConfig, majority: int | None
) -> TensorResult:
    """Combine trimmed task vectors into ``base + lam * combined``.

    Consumes ``kept`` (its tensors are reused in place). ``majority`` breaks
    exact-zero vote sums in the authors' rule: +1 or -1 (or 0, which the
    authors' code treats like -1); ``None`` means this tensor's own majority
    (tensor scope); :data:`DEFER` means: return no values if they would depend
    on a majority not known yet.
    """
    _refuse_compat(cfg)
    method = cfg.method
    acc = kept[0].clone()
    for k in kept[1:]:
        acc += k
    if not method.elect:
        if method.combine == "mean":
            acc /= sum(cfg.weight(i) for i in range(len(kept)))
        return TensorResult(base + cfg.lam * acc, 0.0, False)
    return _combine_disjoint(base, kept, acc, cfg, majority)


def _signs(s: torch.Tensor, zero_to: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn the vote sum ``s`` into elected signs in place; exact zeros get ``zero_to``."""
    zero = s == 0
    e = s.sign_()
    if zero_to > 0:
        e.add_(zero)
    else:
        e.sub_(zero.to(e.dtype))
    return e, zero


def _agree_in_place(kept: list[torch.Tensor], e: torch.Tensor):
    """Sum of |entries| whose sign is ``e`` and their count, in model order.

    Each ``kept`` tensor is overwritten: ``k * e`` is exact (a sign flip), and
    summing the agreeing magnitudes then multiplying by ``e`` gives bit for bit
    the sum of the agreeing signed values.
    """
    cnt = torch.zeros_like(e)
    sel: torch.Tensor | None = None
    for i, k in enumerate(kept):
        p = k.mul_(e)
        agree = p > 0
        cnt.add_(agree)
        p.clamp_min_(0)
        if sel is None:
            sel = p
        else:
            sel.add_(p)
        kept[i] = None  # type: ignore[call-overload]
    assert sel is not None
    return sel.mul_(e), cnt


def _combine_disjoint(
    base: torch.Tensor, kept: list[torch.Tensor], s: torch.Tensor, cfg: MergeConfig, majority: int | None
) -> TensorResult:
    guess = 1 if majority in (None, DEFER) else (1 if majority > 0 else -1)
    e, zero = _signs(s, guess)
    sel, cnt = _agree_in_place(kept, e)
    unknown = majority in (None, DEFER)
    ambiguous = unknown and bool((zero & (cnt > 0)).any())
    balance = 0.0
    if majority == DEFER or ambiguous:
        n_neg = int((e < 0).sum())
        n_pos = int((e > 0).sum()) - int(zero.sum())
        balance = float(n_pos - n_neg)
    if ambiguous:
        if majority == DEFER:
            return TensorResult(None, balance, True)
        if balance <= 0:  # the tensor's own majority is not +1: redo with it
            return TensorResult(None, balance, True, retry_majority=-1)
    mean = sel.div_(cnt.clamp_min_(1))
    if cfg.lam != 1.0:
        mean.mul_(cfg.lam)
    return TensorResult(mean.add_(base), balance, ambiguous)
