"""Exact streaming k-th smallest |value| by radix selection over float bit patterns.

For non-negative IEEE floats the bit pattern, read as an integer, orders the
same way as the value. So the k-th smallest |tv| can be found digit by digit:
a histogram of the top digit over all tensors (one pass) tells which bucket
holds the k-th element and its rank inside it; the next pass histograms the next
digit among elements of that bucket only, and so on. float32 (31 magnitude
bits) takes two passes of 15 + 16 bits, float64 four. Memory is one histogram
per task vector; the result is exact, unlike a quantile sketch.

Usage: ``sel = RadixSelect(ranks, dtype)``; for each pass, for each tensor,
``h = sel.histogram(abs_values_of_model_i, i)`` (from any thread) and
``sel.add(i, h)``; then ``sel.advance()``. After ``sel.done``,
``sel.threshold(i)`` is the value and ``sel.count_greater(i)`` the number above it.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["RadixSelect"]

_LAYOUT = {
    torch.float32: (torch.int32, (15, 16)),
    torch.float64: (torch.int64, (15, 16, 16, 16)),
}


class RadixSelect:
    """Finds, for each of several streams, the value of a given rank (1-based)."""

    def __init__(self, ranks: list[int], dtype: torch.dtype):
        if dtype not in _LAYOUT:
            raise TypeError(f"radix selection supports float32/float64, not {dtype}")
        self.dtype = dtype
        self.int_dtype, self.digits = _LAYOUT[dtype]
        self.total_bits = sum(self.digits)
        self.ranks = list(ranks)
        self.pass_index = 0
        self._prefix = [0] * len(ranks)
        self._rank_left = list(ranks)
        self._below = [0] * len(ranks)
        self._equal = [0] * len(ranks)
        self._hist = [torch.zeros(1 << self.digits[0], dtype=torch.int64) for _ in ranks]
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self.pass_index >= len(self.digits)

    def _shift(self, p: int) -> int:
        return self.total_bits - sum(self.digits[: p + 1])

    def histogram(self, abs_values: torch.Tensor, stream: int) -> torch.Tensor:
        """Histogram of this pass's digit for the elements still in play (thread-safe)."""
        keys = abs_values.reshape(-1).view(self.int_dtype)
        p = self.pass_index
        shift = self._shift(p)
        width = self.digits[p]
        if p > 0:
            keys = keys[(keys >> self._shift(p - 1)) == self._prefix[stream]]
        digit = keys >> shift
        if p > 0:
            digit = digit & ((1 << width) - 1)
        return torch.bincount(digit, minlength=1 << width)

    def add(self, stream: int, hist: torch.Tensor) -> None:
        with self._lock:
            self._hist[stream] += hist.cpu()  # histograms made on a GPU are summed on the CPU

    def advance(self) -> None:
        """Close this pass: choose each stream's bucket, narrow its prefix."""
        width = self.digits[self.pass_index]
        for i, hist in enumerate(self._hist):
            if self.ranks[i] <= 0:
                continue
            cum = torch.cumsum(hist, 0)
            total = int(cum[-1])
            if self._rank_left[i] > total:
                raise ValueError(f"rank {self.ranks[i]} exceeds the {total} elements seen in stream {i}")
            b = int(torch.searchsorted(cum, torch.tensor(self._rank_left[i]), right=False))
            before = int(cum[b - 1]) if b > 0 else 0
            self._rank_left[i] -= before
            self._below[i] += before
            self._equal[i] = int(hist[b])
            self._prefix[i] = (self._prefix[i] << width) | b
        self.pass_index += 1
        if not self.done:
            self._hist = [torch.zeros(1 << self.digits[self.pass_index], dtype=torch.int64) for _ in self.ranks]

    def threshold(self, stream: int) -> float | None:
        """The exact value of the requested rank (None when the rank is 0)."""
        if self.ranks[stream] <= 0:
            return None
        assert self.done, "threshold() before all passes ran"
        return torch.tensor(self._prefix[stream], dtype=self.int_dtype).view(self.dtype).item()

    def count_greater(self, stream: int, total: int) -> int:
        """How many of ``total`` elements are strictly above the threshold."""
        return total - self._below[stream] - self._equal[stream]

    def count_equal(self, stream: int) -> int:
        return self._equal[stream]
