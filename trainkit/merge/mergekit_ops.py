"""mergekit 0.1.5's per-tensor arithmetic, op for op, for ``compat="mergekit"``.

Why a separate module: bit-identity with mergekit depends on the exact torch
ops and their order (``torch.stack`` + ``sum(dim=0)`` rounds once per element in
bfloat16, a sequence of in-place adds rounds at every add), on the dtype every
op runs in, and, for the random presets, on the order in which masks are drawn
from the generator. The default path (:mod:`trainkit.merge.kernel`) is free to
fuse and reorder; this one is not. It follows
``mergekit/merge_methods/generalized_task_arithmetic.py`` (``merge_group``),
``mergekit/sparsify.py`` and ``mergekit/merge_methods/linear.py``.

dtypes, as in mergekit: every input is cast to ``dtype`` (mergekit's ``dtype``;
when absent, the promoted dtype of the inputs), the arithmetic runs in that dtype
(``linear`` alone computes in float32/float64 and casts back), and the result is
cast to ``out_dtype`` when given.

Random draws, as in ``mergekit-yaml --random-seed S``: mergekit seeds torch's
global generator once (``transformers.set_seed``) and runs tensors in name order
(its scheduler sorts by tensor name), models in config order, drawing each mask
with ``torch.bernoulli``. :class:`DrawStream` is that one generator, seeded once;
tensors take their turn in name order, so the masks are the same whatever the
number of worker threads. Masks are drawn on the CPU, as mergekit does on a CPU
run; on CUDA the rest of the arithmetic runs on the GPU.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from trainkit.merge.methods import MergeConfig
from trainkit.merge.threshold import RadixSelect

__all__ = [
    "DTYPES",
    "DrawStream",
    "compute_dtype",
    "draws_masks",
    "merge_tensor",
    "linear_tensor",
    "output_dtype",
    "planned_dtype",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
"""mergekit's ``dtype`` / ``out_dtype`` names."""


def compute_dtype(cfg: MergeConfig, dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The dtype mergekit's arithmetic runs in: ``dtype``, else the inputs' promoted dtype."""
    if cfg.dtype is not None:
        return DTYPES[cfg.dtype]
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def output_dtype(cfg: MergeConfig, computed: torch.dtype) -> torch.dtype:
    """mergekit writes ``out_dtype`` when given, else the dtype the merge produced."""
    return DTYPES[cfg.out_dtype] if cfg.out_dtype is not None else computed


def planned_dtype(cfg: MergeConfig, stored: torch.dtype) -> torch.dtype:
    """The dtype a merged tensor stored as ``stored`` (in every input) is written in.

    The default path writes the base's dtype; compat writes mergekit's, which differs
    when ``dtype`` or ``out_dtype`` is set. Non-float tensors are copied as they are.
    """
    if cfg.compat != "mergekit" or not stored.is_floating_point:
        return stored
    return output_dtype(cfg, compute_dtype(cfg, [stored]))


def draws_masks(cfg: MergeConfig, n_models: int) -> bool:
    """Whether the merge draws random masks (then tensors must run in name order)."""
    return cfg.method.trim in ("random", "della") and any(cfg.density_of(i) < 1.0 for i in range(n_models))


class DrawStream:
    """One generator seeded once; each tensor draws its masks in its turn, in name order.

    Who calls what: the engine makes one per merge with every merged tensor's
    name; each worker thread calls :meth:`turn` exactly once per tensor (also
    when it draws nothing or fails), which blocks until every tensor before it
    in name order has had its turn. The engine must start tensors in name order,
    so the tensor whose turn it is is always running.
    """

    def __init__(self, seed: int, names: Sequence[str]):
        self.generator = torch.Generator().manual_seed(seed)
        self._index = {name: i for i, name in enumerate(sorted(names))}
        self._next = 0
        self._aborted = False
        self._cv = threading.Condition()

    @property
    def order(self) -> list[str]:
        return sorted(self._index, key=self._index.__getitem__)

    def abort(self) -> None:
        """Release every waiting tensor (a tensor failed, so its turn never ends): they raise."""
        with self._cv:
            self._aborted = True
            self._cv.notify_all()

    @contextmanager
    def turn(self, name: str) -> Iterator[torch.Generator]:
        i = self._index[name]
        with self._cv:
            self._cv.wait_for(lambda: self._next == i or self._aborted)
            if self._aborted:
                raise RuntimeError(f"{name}: merge aborted by an earlier tensor's error")
        try:
            yield self.generator
        finally:
            with self._cv:
                self._next = i + 1
                self._cv.notify_all()


def _rescaled_masked(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    """mergekit's ``rescaled_masked_tensor`` with the L1 norm (``rescale: true``) or none."""
    masked = tensor * mask
    if not rescale:
        return masked
    before_scale = tensor.abs().sum()
    after_scale = masked.abs().sum()
    if before_scale < eps or after_scale < eps:
        return masked
    return masked * (before_scale / after_scale)


def _sort_input(tensor: torch.Tensor) -> torch.Tensor:
    """|tensor| flattened, in float32 on the CPU (mergekit sorts ``w.float()`` there)."""
    w = tensor.abs().reshape(-1)
    return w.float() if w.device.type == "cpu" else w


def _magnitude_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's ``magnitude`` mask (``density < 1``): 1 on exactly ``max(1, int(density * n))`` largest |x|.

    mergekit takes the first k of ``torch.argsort(w, descending=True)``. When the
    k-th largest value has no ties beyond the cut, that set is ``w >= threshold``,
    which exact radix selection finds without the sort; otherwise the same argsort
    breaks the ties as mergekit's does. (density <= 0 gives zeros, as mergekit's.)
    """
    n = tensor.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * n))
    w = _sort_input(tensor)
    if w.dtype in (torch.float32, torch.float64):
        sel = RadixSelect([n - k + 1], w.dtype)
        while not sel.done:
            sel.add(0, sel.histogram(w, 0))
            sel.advance()
        if sel.count_greater(0, n) + sel.count_equal(0) == k:  # no tie straddles the cut
            return (w >= sel.threshold(0)).to(tensor.dtype).reshape_as(tensor)
    mask = torch.zeros(n, dtype=tensor.dtype, device=tensor.device)
    mask[torch.argsort(w, descending=True)[:k]] = 1
    return mask.reshape_as(tensor)


def _outliers_mask(tensor: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's ``magnitude_outliers`` mask (Model Breadcrumbs, ``density < 1``): drop the
    gamma largest |x|, keep the next ``int(density * n)``."""
    num_elems = tensor.numel()
    target_n = int(density * num_elems)
    n_top = int(gamma * num_elems)
    n_bot = max(0, num_elems - target_n - n_top)
    indices = torch.sort(_sort_input(tensor), descending=False).indices
    mask = torch.zeros(num_elems, dtype=tensor.dtype, device=tensor.device)
    mask[indices[n_bot: n_bot + target_n]] = 1
    return mask.reshape_as(tensor)


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """mergekit's random trims run in bfloat16 as is, other dtypes in float32 on the CPU."""
    return tensor.dtype if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16 else torch.float32


def _bernoulli_probs(tensor: torch.Tensor, density: float) -> torch.Tensor:
    return torch.full(tensor.shape, density, dtype=_work_dtype(tensor))


def _della_probs(tensor: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune keep probabilities, rising with |x|'s rank in each row (mergekit's ops)."""
    work_dtype = _work_dtype(tensor)
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    sorted_indices = torch.argsort(rows.abs(), dim=1, descending=False)
    ranks = sorted_indices.argsort(dim=1).to(work_dtype) + 1
    min_ranks = ranks.min(dim=1, keepdim=True).values
    max_ranks = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - min_ranks) / (max_ranks - min_ranks)).clamp(0, 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).cpu()


def _apply_mask(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """The second half of mergekit's ``bernoulli`` / ``della_magprune``: mask, rescale, cast back."""
    work_dtype = _work_dtype(tensor)
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 and mask.dim() != tensor.dim() else tensor
    res = _rescaled_masked(rows.to(work_dtype), mask.to(work_dtype).to(tensor.device), rescale)
    return res.to(tensor.dtype).reshape(tensor.shape)


def merge_tensor(
    base: torch.Tensor,
    models: list[torch.Tensor],
    cfg: MergeConfig,
    *,
    name: str = "",
    stream: DrawStream | None = None,
) -> torch.Tensor:
    """mergekit 0.1.5's ``GeneralizedTaskArithmeticMerge.merge_group`` for one tensor.

    ``base`` and ``models`` are already in the compute dtype (:func:`compute_dtype`).
    Returns ``base + lambda * mix(weights * sparsify(m_i - base))`` in that dtype.
    ``stream`` is required when :func:`draws_masks`; the masks are drawn in
    ``stream.turn(name)``, the rest runs outside it.
    """
    method = cfg.method
    rescale = method.trim in ("random", "della")  # mergekit's default_rescale (the only one supported)
    # mergekit forms each delta, sparsifies it and copies it into one (n, *shape) stack;
    # here each delta is formed in its row and the deterministic trims mask it in place
    # (x * mask in place gives the same values as mergekit's x * mask).
    deltas = base.new_empty((len(models), *base.shape))
    for i, m in enumerate(models):
        torch.sub(m, base, out=deltas[i])
    if method.trim in ("random", "della"):
        probs: list[torch.Tensor | None] = []
        for i in range(len(models)):
            density = cfg.density_of(i)
            if density >= 1:
                probs.append(None)
            elif method.trim == "random":
                probs.append(_bernoulli_probs(deltas[i], density))
            else:
                probs.append(_della_probs(deltas[i], density, cfg.epsilon))
        if stream is None:
            if any(p is not None for p in probs):
                raise ValueError("merge_tensor: a random trim needs a DrawStream")
        else:
            with stream.turn(name) as g:
                masks = [None if p is None else torch.bernoulli(p, generator=g) for p in probs]
            del probs
            for i, mask in enumerate(masks):
                if mask is not None:
                    deltas[i] = _apply_mask(deltas[i], mask, rescale)
    elif method.trim in ("magnitude", "outliers"):
        for i in range(len(models)):
            density = cfg.density_of(i)
            if density < 1:
                keep = (_magnitude_mask(deltas[i], density) if method.trim == "magnitude"
                        else _outliers_mask(deltas[i], density, cfg.gamma))
                deltas[i].mul_(keep)
    weights = torch.tensor([cfg.weight(i) for i in range(len(models))], dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > weights.dim():
        weights.unsqueeze_(-1)
    deltas.mul_(weights)
    if method.elect:
        sign = deltas.sign()
        majority_sign = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
        mask = sign == majority_sign
        del sign
        divisor = (weights * mask).sum(dim=0)
        mixed_delta = deltas.mul_(mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed_delta = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    del deltas
    if cfg.normalizes:
        mixed_delta /= divisor
    if cfg.lam != 1:
        mixed_delta *= cfg.lam
    return (base + mixed_delta).to(base.dtype)


def linear_tensor(models: list[torch.Tensor], cfg: MergeConfig) -> torch.Tensor:
    """mergekit 0.1.5's ``linear``: sum(w_i m_i) / sum(w_i) in float32 (float64 for float64
    inputs), cast back to the inputs' dtype. ``lambda`` has no effect, as in mergekit."""
    first = models[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weight = torch.tensor([[cfg.weight(i) for i in range(len(models))]], dtype=dtype, device=first.device)
    shape = (1,) * first.dim()
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, coefficient in zip(models, weight.unbind(1)):
        result.addcmul_(tensor, coefficient.reshape(shape))
    if cfg.normalizes:
        result.div_(weight.sum(dim=1).reshape(shape))
    return result.to(first.dtype)
