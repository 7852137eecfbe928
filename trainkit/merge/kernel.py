"""Per-tensor arithmetic of the merge family: task vectors, trim, vote, combine.

Pure functions of tensors. The streaming engine and the in-memory API call the
same functions, which is why a streamed merge equals ``ties_merge`` bit for bit.
All arithmetic is in float32 (float64 when an input is float64), whatever the
storage dtype; the result is cast back to the base dtype by the caller.

Summations over models run in model order with plain adds, so every result is
reproducible and independent of thread scheduling.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainkit.merge.methods import MergeConfig

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
]


DEFER = 2
"""``majority`` value asking :func:`combine` to defer a tensor whose values would
depend on the global majority sign, which is known only after a full pass."""


@dataclass(frozen=True, slots=True)
class Keep:
    """How one task vector is trimmed inside one tensor.

    ``threshold=None`` keeps everything. Otherwise entries with ``|tv| > threshold``
    are kept, plus those equal to it: all of them (``quota=None``, the authors'
    rule) or only the first ``quota`` in flat order (mergekit's exact-k rule).
    """

    threshold: float | None = None
    quota: int | None = None


@dataclass(slots=True)
class TensorResult:
    """The merged values of one tensor (``None`` when deferred) and its vote tally.

    ``sign_balance`` is (#entries elected +) - (#entries elected -); the global
    majority sign that breaks exact-zero sums is the sign of its total.
    ``ambiguous`` says the tensor has an exact-zero sum over nonzero entries,
    i.e. its values depend on that majority.
    """

    values: torch.Tensor | None
    sign_balance: float
    ambiguous: bool


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def task_vectors(
    base: torch.Tensor, models: list[torch.Tensor], cfg: MergeConfig, dtype: torch.dtype
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Return (base in the compute dtype, [w_i * (m_i - base)]).

    In mergekit-compat mode weights are applied after the trim (as mergekit does),
    so they are not folded in here.
    """
    b = base.to(dtype)
    tvs = []
    for i, m in enumerate(models):
        tv = torch.sub(m, b) if m.dtype == dtype else torch.sub(m.to(dtype), b)
        w = cfg.weight(i)
        if w != 1.0 and cfg.compat is None:
            tv.mul_(w)
        tvs.append(tv)
    return b, tvs


def magnitude_rank(d: int, cfg: MergeConfig) -> tuple[int, bool]:
    """The 1-based rank (k-th smallest |tv|) of the trim threshold among ``d`` entries.

    Returns (rank, exact_k). rank 0 means keep everything. The authors keep
    ``|tv| >= kth smallest`` with k = d - int(d * density); mergekit keeps exactly
    max(1, int(density * d)) largest, i.e. the threshold is the k-th largest.
    """
    if cfg.density >= 1.0 or d == 0:
        return 0, False
    if cfg.compat == "mergekit":
        keep = max(1, int(cfg.density * d))
        return d - keep + 1, True
    return d - int(d * cfg.density), False


def tensor_thresholds(tvs: list[torch.Tensor], cfg: MergeConfig) -> list[Keep]:
    """Per-tensor trim thresholds (``scope="tensor"``), exact via ``kthvalue``."""
    keeps = []
    for tv in tvs:
        rank, exact_k = magnitude_rank(tv.numel(), cfg)
        if rank == 0:
            keeps.append(Keep())
            continue
        a = tv.abs().reshape(-1)
        thr = a.kthvalue(rank).values.item()
        quota = None
        if exact_k:
            keep = tv.numel() - rank + 1
            quota = keep - int((a > thr).sum())
        keeps.append(Keep(thr, quota))
    return keeps


def _prev_float(x: float, dtype: torch.dtype) -> float:
    t = torch.tensor(x, dtype=dtype)
    return torch.nextafter(t, torch.tensor(float("-inf"), dtype=dtype)).item()


def apply_trim(tv: torch.Tensor, keep: Keep) -> torch.Tensor:
    """Zero the entries of ``tv`` that the trim drops."""
    if keep.threshold is None:
        return tv
    thr = keep.threshold
    if keep.quota is None:
        if thr <= 0.0:
            return tv
        # hardshrink zeroes |x| <= lambd; with lambd the float just below thr
        # this keeps exactly |x| >= thr, in one fused pass.
        return F.hardshrink(tv, _prev_float(thr, tv.dtype))
    a = tv.abs()
    mask = a > thr
    if keep.quota > 0:
        ties = (a == thr).reshape(-1).nonzero().reshape(-1)[: keep.quota]
        mask.reshape(-1)[ties] = True
    return tv * mask


def random_keep(tv: torch.Tensor, density: float, seed: int, model: int, name: str) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale by 1/density.

    The generator is seeded from (seed, model index, tensor name), so the mask is
    the same whichever thread or pass computes it.
    """
    if density >= 1.0:
        return tv
    g = torch.Generator().manual_seed((seed * 1_000_003 + model * 7919 + zlib.crc32(name.encode())) % 2**63)
    mask = torch.rand(tv.shape, generator=g, dtype=tv.dtype) < density
    return torch.where(mask, tv / density, torch.zeros((), dtype=tv.dtype))


def combine(
    base: torch.Tensor, kept: list[torch.Tensor], cfg: MergeConfig, majority: int | None
) -> TensorResult:
    """Combine trimmed task vectors into ``base + lam * combined``.

    ``majority`` breaks exact-zero vote sums in the authors' rule: +1 or -1 (or 0,
    which the authors' code treats like -1); ``None`` means "this tensor's own
    majority" (tensor scope) and ``"defer"`` is spelled as majority=2: return no
    values if they would depend on a majority not known yet.
    """
    method = cfg.method
    acc = kept[0].clone()
    for k in kept[1:]:
        acc += k
    if not method.elect:
        if method.combine == "mean":
            acc /= sum(cfg.weight(i) for i in range(len(kept)))
        return TensorResult(base + cfg.lam * acc, 0.0, False)
    if cfg.compat == "mergekit":
        return _combine_mergekit(base, kept, acc, cfg)
    return _combine_disjoint(base, kept, acc, cfg, majority)


def _agreeing(kept: list[torch.Tensor], e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of |entries| whose sign is e, and their count, in model order."""
    sel = torch.zeros_like(e)
    cnt = torch.zeros_like(e)
    for k in kept:
        p = k * e
        cnt += p > 0
        sel += p.clamp_min_(0)
    return sel, cnt


def _combine_disjoint(
    base: torch.Tensor, kept: list[torch.Tensor], s: torch.Tensor, cfg: MergeConfig, majority: int | None
) -> TensorResult:
    one = torch.ones((), dtype=s.dtype)
    e = torch.where(s >= 0, one, -one)  # elect +1 on zero sums first; fixed below if needed
    sel, cnt = _agreeing(kept, e)
    ambiguous = bool(((s == 0) & (cnt > 0)).any())
    balance = float(torch.sign(s).sum(dtype=torch.float64)) if (majority == DEFER or ambiguous) else 0.0
    if ambiguous:
        if majority == DEFER:
            return TensorResult(None, balance, True)
        m = (1 if balance > 0 else -1) if majority is None else majority
        if m <= 0:
            e = torch.where(s > 0, one, -one)
            sel, cnt = _agreeing(kept, e)
    mean = e * sel / cnt.clamp_min_(1)
    return TensorResult(base + cfg.lam * mean, balance, ambiguous)


def _combine_mergekit(base: torch.Tensor, kept: list[torch.Tensor], s: torch.Tensor, cfg: MergeConfig) -> TensorResult:
    """mergekit 0.1.5 ties: weights before the vote, zero sum -> +1, weighted divisor."""
    ws = [cfg.weight(i) for i in range(len(kept))]
    wd = [k * w if w != 1.0 else k for k, w in zip(kept, ws)]
    if any(w != 1.0 for w in ws):
        s = wd[0].clone()
        for x in wd[1:]:
            s += x
    one = torch.ones((), dtype=s.dtype)
    e = torch.where(s >= 0, one, -one)
    mixed = torch.zeros_like(s)
    divisor = torch.zeros_like(s)
    for x, w in zip(wd, ws):
        agree = (x * e) > 0
        mixed += x * agree
        divisor += agree * torch.tensor(w, dtype=s.dtype)
    divisor[divisor == 0] = 1
    mixed /= divisor
    if cfg.lam != 1.0:
        mixed *= cfg.lam
    return TensorResult(base + mixed, 0.0, False)
