"""Exact k-th smallest |task vector| from a sample bracket and one chunked counting pass.

Why: the trim threshold is an order statistic, and exact selection over whole
tensors (``kthvalue``, or the two radix histogram passes of
:mod:`trainkit.merge.threshold`) costs several full-tensor passes with
tensor-sized temporaries. Here:

1. A deterministic pseudo-random sample of |tv| is gathered by index (so a
   column- or row-structured tensor is not sampled on a lattice); two sample
   order statistics ``lo <= hi``, a few standard deviations either side of the
   wanted quantile, bracket the k-th value with near certainty.
2. One pass over the tensor, in cache-sized chunks, counts the entries
   ``>= lo`` and collects those in ``[lo, hi]`` (a few percent of them).
3. If ``below = d - count(>= lo)`` satisfies ``below < k <= below + #candidates``
   the k-th value is the ``(k - below)``-th smallest candidate: exact by
   construction, whatever the sample was. Otherwise the bracket missed and the
   caller falls back to radix selection (also exact), so the sample only ever
   affects speed, never the result.

The same pass checks that every task vector entry is finite (max |tv|).
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field

import torch

from trainkit.merge import fused
from trainkit.merge.fused import base_chunk, chunk_spans, scratch, task_vector_chunk
from trainkit.merge.kernel import Keep, magnitude_rank
from trainkit.merge.methods import MergeConfig
from trainkit.merge.threshold import RadixSelect

__all__ = ["Tally", "GlobalSelection", "tensor_keeps", "tally", "bracket", "sample_abs"]

TENSOR_SAMPLE = 16384
"""Sample size per tensor in tensor scope: the bracket then holds ~4% of the entries."""
GLOBAL_SAMPLE = 1 << 16
"""Sample size over all tensors in global scope."""
Z = 4.5
"""Half-width of the bracket in standard deviations of the sample quantile's rank."""
SMALL = 4 * TENSOR_SAMPLE
"""Tensors up to this size get their threshold by ``kthvalue`` over all of |tv|."""


@functools.lru_cache(maxsize=256)
def sample_indices(d: int, s: int) -> torch.Tensor:
    """``s`` sorted positions in ``[0, d)``, the same for every model and every run
    (cached: many tensors share a shape; callers only read it)."""
    g = torch.Generator().manual_seed(0x5EED ^ d)
    return torch.randint(0, d, (s,), generator=g).sort().values


def sample_abs(b_flat: torch.Tensor, m_flat: torch.Tensor, w: float, dtype: torch.dtype,
               idx: torch.Tensor) -> torch.Tensor:
    """|w * (m - b)| at positions ``idx``."""
    b = b_flat.index_select(0, idx).to(dtype)  # index_select: far faster than take on the CPU
    tv = torch.sub(m_flat.index_select(0, idx), b)
    if w != 1.0:
        tv.mul_(w)
    return tv.abs_()


def bracket(sample: torch.Tensor, k: int, d: int) -> tuple[float, float]:
    """Sample order statistics around rank ``k`` (1-based) of ``d``: (lo, hi)."""
    s = sample.numel()
    q = k / d
    j = q * s - 0.5
    half = Z * math.sqrt(s * max(q * (1 - q), 1.0 / s)) + 2
    lo_i, hi_i = math.floor(j - half), math.ceil(j + half)
    lo = float(sample.kthvalue(lo_i + 1).values) if lo_i >= 0 else 0.0  # two selections: cheaper than a sort
    hi = float(sample.kthvalue(hi_i + 1).values) if hi_i < s else math.inf
    return lo, hi


@dataclass
class Tally:
    """What one counting pass saw for one task vector: entries >= lo, the candidates
    in [lo, hi] (one tensor per chunk), and whether all entries were finite."""

    n_ge: int = 0
    cands: list[torch.Tensor] = field(default_factory=list)
    finite: bool = True

    def resolve(self, k: int, d: int) -> float | None:
        """The exact k-th smallest value, or None when the bracket missed it."""
        below = d - self.n_ge
        r = k - below
        n_c = sum(c.numel() for c in self.cands)
        if r < 1 or r > n_c:
            return None
        c = torch.cat(self.cands) if len(self.cands) != 1 else self.cands[0]
        return float(c.kthvalue(r).values)


def tally(base: torch.Tensor, models: list[torch.Tensor], ws: list[float],
          brackets: list[tuple[float, float] | None], dtype: torch.dtype,
          *, chunk: int | None = None) -> list[Tally]:
    """One chunked pass over a tensor: per model, count and collect within its bracket
    (``None``: only the finiteness check)."""
    chunk = chunk or fused.CHUNK
    n = len(models)
    b_flat = base.reshape(-1)
    m_flat = [m.reshape(-1) for m in models]
    buf = scratch(dtype, 2, chunk)
    masks = scratch(torch.bool, 2, chunk)
    out = [Tally() for _ in range(n)]
    maxes: list[list[torch.Tensor]] = [[] for _ in range(n)]
    for lo, hi in chunk_spans(b_flat.numel(), chunk):
        L = hi - lo
        a, bsb = buf[0, :L], buf[1, :L]
        m_ge, m_le = masks[0, :L], masks[1, :L]
        b = base_chunk(b_flat[lo:hi], dtype, bsb)
        for i in range(n):
            task_vector_chunk(b, m_flat[i][lo:hi], ws[i], a).abs_()
            maxes[i].append(a.max())
            br = brackets[i]
            if br is None:
                continue
            torch.ge(a, br[0], out=m_ge)
            out[i].n_ge += int(torch.count_nonzero(m_ge))
            torch.le(a, br[1], out=m_le)
            m_ge.logical_and_(m_le)
            out[i].cands.append(torch.masked_select(a, m_ge))
    for i in range(n):
        if maxes[i]:
            out[i].finite = bool(torch.isfinite(torch.stack(maxes[i]).max()))
    return out


def _radix_threshold(b: torch.Tensor, m: torch.Tensor, w: float, dtype: torch.dtype, rank: int) -> float:
    tv = torch.sub(m, b.to(dtype))
    if w != 1.0:
        tv.mul_(w)
    a = tv.abs_()
    sel = RadixSelect([rank], dtype)
    while not sel.done:
        sel.add(0, sel.histogram(a, 0))
        sel.advance()
    thr = sel.threshold(0)
    assert thr is not None
    return thr


def tensor_keeps(base: torch.Tensor, models: list[torch.Tensor], cfg: MergeConfig, dtype: torch.dtype,
                 *, chunk: int | None = None) -> tuple[list[Keep], list[int]]:
    """Per-tensor thresholds of the authors' rule (``tensor_thresholds`` without
    ``--compat``) and the indices of models whose task vector is not finite."""
    n = len(models)
    d = base.numel()
    ws = [cfg.weight(i) for i in range(n)]
    ranks = [magnitude_rank(d, cfg, i) for i in range(n)]
    b_flat = base.reshape(-1)
    m_flat = [m.reshape(-1) for m in models]
    if d <= SMALL:
        keeps, bad = [], []
        bf = b_flat.to(dtype)
        for i in range(n):
            tv = torch.sub(m_flat[i], bf)
            if ws[i] != 1.0:
                tv.mul_(ws[i])
            a = tv.abs_()
            if d and not bool(torch.isfinite(a.max())):
                bad.append(i)
            keeps.append(Keep(float(a.kthvalue(ranks[i]).values)) if ranks[i] else Keep())
        return keeps, bad
    idx = sample_indices(d, min(TENSOR_SAMPLE, d))
    brackets: list[tuple[float, float] | None] = []
    for i in range(n):
        if ranks[i] == 0:
            brackets.append(None)
            continue
        brackets.append(bracket(sample_abs(b_flat, m_flat[i], ws[i], dtype, idx), ranks[i], d))
    tallies = tally(base, models, ws, brackets, dtype, chunk=chunk)
    bad = [i for i, t in enumerate(tallies) if not t.finite]
    if bad:
        return [Keep() for _ in range(n)], bad
    keeps = []
    for i in range(n):
        if ranks[i] == 0:
            keeps.append(Keep())
            continue
        thr = tallies[i].resolve(ranks[i], d)
        if thr is None:  # the bracket missed (a very unlikely sample): exact radix selection
            thr = _radix_threshold(b_flat, m_flat[i], ws[i], dtype, ranks[i])
        keeps.append(Keep(thr))
    return keeps, bad


class GlobalSelection:
    """Global-scope thresholds (one per model, over all merged tensors) in two passes.

    Call order: ``sample(b, ms)`` for every tensor (any thread), then ``close_samples()``,
    then ``count(b, ms)`` for every tensor (any thread), then ``thresholds()``, which is
    ``None`` when some bracket missed (then use :class:`RadixSelect`).
    """

    def __init__(self, ranks: list[int], total: int, cfg: MergeConfig, dtype: torch.dtype):
        self.ranks, self.total, self.dtype = ranks, total, dtype
        self.ws = [cfg.weight(i) for i in range(len(ranks))]
        self._samples: list[list[torch.Tensor]] = [[] for _ in ranks]
        self._tallies = [Tally() for _ in ranks]
        self._brackets: list[tuple[float, float] | None] = []
        self._lock = threading.Lock()

    def sample(self, base: torch.Tensor, models: list[torch.Tensor]) -> None:
        d = base.numel()
        if d == 0:
            return
        s = min(d, max(1, round(GLOBAL_SAMPLE * d / max(1, self.total))))
        idx = sample_indices(d, s)
        b_flat = base.reshape(-1)
        got = [sample_abs(b_flat, m.reshape(-1), self.ws[i], self.dtype, idx) if self.ranks[i] else None
               for i, m in enumerate(models)]
        with self._lock:
            for i, x in enumerate(got):
                if x is not None:
                    self._samples[i].append(x)

    def close_samples(self) -> None:
        self._brackets = []
        for i, rank in enumerate(self.ranks):
            if rank == 0 or not self._samples[i]:
                self._brackets.append(None)
                continue
            self._brackets.append(bracket(torch.cat(self._samples[i]), rank, self.total))
        self._samples = [[] for _ in self.ranks]

    def count(self, base: torch.Tensor, models: list[torch.Tensor]) -> list[int]:
        """Count and collect one tensor; returns the indices of models with non-finite entries."""
        got = tally(base, models, self.ws, self._brackets, self.dtype)
        with self._lock:
            for acc, t in zip(self._tallies, got):
                acc.n_ge += t.n_ge
                acc.cands.extend(t.cands)
        return [i for i, t in enumerate(got) if not t.finite]

    def thresholds(self) -> list[float | None] | None:
        out: list[float | None] = []
        for i, rank in enumerate(self.ranks):
            if rank == 0:
                out.append(None)
                continue
            thr = self._tallies[i].resolve(rank, self.total)
            if thr is None:
                return None
            out.append(thr)
        return out
