"""Fused, chunked TIES for the default rule: bit for bit the plain kernel, in cache.

The plain path in :mod:`trainkit.merge.kernel` runs each step (task vectors,
trim, vote, disjoint mean) over whole tensors, so every step streams
tensor-sized temporaries through memory, and each fresh temporary is page
faulted in. Here a tensor is cut into chunks of :data:`CHUNK` elements and all
steps run on one chunk while it is in cache, in preallocated per-thread scratch
reused across chunks and tensors, and the result is written straight into the
output tensor.

Bit identity with the plain kernel: every value is produced by the same float
operation on the same operands, in the same order (model order for the sums),
only on shorter spans. Two steps are rewritten with float ops that give the
same bits: the elected sign ``sign(s) + (s == 0)`` is ``sign(sign(s) + 0.5)``
(``- 0.5`` when zero sums go to -1), and the agreeing count adds
``sign(clamp_min(k * e, 0))`` (1 where ``k * e > 0``, a zero elsewhere) instead
of a bool mask. Both yield the exact same floats, without bool round trips.

An exact-zero vote sum over a nonzero entry (its sign then comes from a
majority) is detected with two counts per chunk: entries with a nonzero sum vs
entries with an agreeing model differ exactly there. The majority tally is the
sum of the vote signs. Such a tensor in tensor scope whose own majority is not
+1 is redone with -1, as the plain kernel does; in global scope it is deferred.

Thresholds come from :mod:`trainkit.merge.sampleselect` (exact).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from trainkit.merge.kernel import DEFER, Keep, TensorResult, _prev_float
from trainkit.merge.methods import MergeConfig

__all__ = ["CHUNK", "applies", "fused_combine", "chunk_spans", "serial_ops"]

CHUNK = 131072
"""Elements per chunk. A chunk's working set is ``(n_models + 5) * CHUNK`` floats
(4 MiB for 3 models: L3, not L2). Measured on 3 models, one thread: 16384 costs
1.5x the CPU time of 131072 (per-op dispatch dominates small chunks); 262144
gains nothing more."""


def applies(cfg: MergeConfig, device: str) -> bool:
    """Whether the fused path computes this merge: the default (authors') TIES rule
    with a magnitude trim, on the CPU. ``--compat mergekit`` and other trims keep
    the plain kernel, and on a GPU whole-tensor ops are already bandwidth-bound."""
    m = cfg.method
    return cfg.compat is None and m.trim == "magnitude" and m.elect and device == "cpu"


@contextmanager
def serial_ops(enabled: bool) -> Iterator[None]:
    """Run torch ops single-threaded for the duration (process-wide; restored after).

    The fused path parallelises over tensors (the engine's worker threads), and its
    chunk-sized ops gain nothing from intra-op threads; but a few ops (``masked_select``,
    ``kthvalue``, ``sort``) still open parallel regions at these sizes, and on a
    loaded machine each region waits for a descheduled helper thread, up to 40x slower.
    """
    if not enabled:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def chunk_spans(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + chunk)) for i in range(0, n, chunk)]


class _Scratch(threading.local):
    """Per-thread buffers, grown on demand and reused for every chunk of every tensor."""

    def __init__(self) -> None:
        self.bufs: dict[tuple[torch.dtype, int], torch.Tensor] = {}

    def get(self, dtype: torch.dtype, rows: int, chunk: int) -> torch.Tensor:
        key = (dtype, chunk)
        buf = self.bufs.get(key)
        if buf is None or buf.shape[0] < rows:
            buf = torch.empty((rows, chunk), dtype=dtype)
            self.bufs[key] = buf
        return buf


_SCRATCH = _Scratch()


def scratch(dtype: torch.dtype, rows: int, chunk: int) -> torch.Tensor:
    """``rows`` x ``chunk`` reusable buffer of the calling thread (contents undefined)."""
    return _SCRATCH.get(dtype, rows, chunk)


def task_vector_chunk(b: torch.Tensor, m: torch.Tensor, w: float, out: torch.Tensor) -> torch.Tensor:
    """``w * (m - b)`` into ``out`` (compute dtype): ``b`` is already in the compute dtype,
    so a low-precision ``m`` is widened exactly, as ``m.to(dtype).sub_(b)`` does."""
    torch.sub(m, b, out=out)
    if w != 1.0:
        out.mul_(w)
    return out


def base_chunk(base: torch.Tensor, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
    return base if base.dtype == dtype else out.copy_(base)


@dataclass(frozen=True, slots=True)
class _Trim:
    lambd: float | None  # hardshrink's lambd (the float below the threshold), None: keep all


def _trims(keeps: list[Keep], dtype: torch.dtype) -> list[_Trim]:
    out = []
    for k in keeps:
        thr = k.threshold
        out.append(_Trim(None if thr is None or thr <= 0.0 else _prev_float(thr, dtype)))
    return out


def fused_combine(
    base: torch.Tensor,
    models: list[torch.Tensor],
    keeps: list[Keep],
    cfg: MergeConfig,
    majority: int | None,
    out_dtype: torch.dtype,
    dtype: torch.dtype,
    *,
    chunk: int | None = None,
) -> TensorResult:
    """``base + lam * disjoint_mean(trim(w_i * (m_i - base)))`` chunk by chunk.

    Returns the same :class:`TensorResult` as ``combine`` after ``apply_trim`` on the
    plain path, with ``values`` already in ``out_dtype``; that includes
    ``retry_majority=-1`` when the tensor's own majority sign decides an exact-zero
    vote sum (``majority=None``) and is not +1, which the caller redoes with it.
    """
    chunk = chunk or CHUNK
    n = len(models)
    shape = base.shape
    b_flat = base.reshape(-1)
    m_flat = [m.reshape(-1) for m in models]
    d = b_flat.numel()
    out = torch.empty(d, dtype=out_dtype)
    trims = _trims(keeps, dtype)
    ws = [cfg.weight(i) for i in range(n)]
    unknown = majority in (None, DEFER)
    shift = 0.5 if (unknown or majority > 0) else -0.5  # zero vote sums: +1, or -1 (majority <= 0)
    lam = cfg.lam
    direct = out_dtype == dtype
    buf = scratch(dtype, n + 5, chunk)
    nonzero_sum = 0
    agreeing = 0
    balance = torch.zeros((), dtype=torch.float64)
    for lo, hi in chunk_spans(d, chunk):
        L = hi - lo
        kept = [buf[i, :L] for i in range(n)]
        acc, cnt, tmp, bsb, res = (buf[n + j, :L] for j in range(5))
        b = base_chunk(b_flat[lo:hi], dtype, bsb)
        for i in range(n):
            k = task_vector_chunk(b, m_flat[i][lo:hi], ws[i], kept[i])
            if trims[i].lambd is not None:
                torch.hardshrink(k, trims[i].lambd, out=k)
        if n == 1:
            acc.copy_(kept[0])
        else:
            torch.add(kept[0], kept[1], out=acc)
            for k in kept[2:]:
                acc.add_(k)
        e = acc.sign_()
        if unknown:  # the tally that fixes a zero sum's sign, if this tensor needs it
            balance += e.sum(dtype=torch.float64)
        if unknown:  # e is -1/0/+1: sum |e| counts the nonzero sums (exactly: < 2**24)
            nonzero_sum += int(torch.abs(e, out=tmp).sum())
        e.add_(shift).sign_()
        sel = kept[0]
        for i, k in enumerate(kept):
            p = k.mul_(e).clamp_min_(0)
            if i == 0:
                torch.sign(p, out=cnt)
            else:
                cnt.add_(torch.sign(p, out=tmp))
                sel.add_(p)
        sel.mul_(e)
        if unknown:
            agreeing += int(torch.sign(cnt, out=tmp).sum())
        mean = sel.div_(cnt.clamp_min_(1))
        if lam != 1.0:
            mean.mul_(lam)
        if direct:
            torch.add(mean, b, out=out[lo:hi])
        else:
            out[lo:hi].copy_(torch.add(mean, b, out=res))
    ambiguous = unknown and agreeing > nonzero_sum
    bal = float(balance) if (majority == DEFER or ambiguous) else 0.0
    if ambiguous:
        if majority == DEFER:
            return TensorResult(None, bal, True)
        if bal <= 0:  # the tensor's own majority is not +1: redo with it, as the plain kernel does
            return TensorResult(None, bal, True, retry_majority=-1)
    return TensorResult(out.reshape(shape), bal, ambiguous)
