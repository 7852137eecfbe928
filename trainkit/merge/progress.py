"""A dependency-free progress bar for long merges (stderr, redrawn in place)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Counts bytes of input processed in one pass; silent unless ``enabled``."""

    def __init__(self, label: str, total_bytes: int, *, enabled: bool, stream: TextIO | None = None):
        self.label, self.total, self.enabled = label, max(total_bytes, 1), enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._last = 0.0

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.2 or self.done >= self.total):
            self._last = now
            frac = min(self.done / self.total, 1.0)
            rate = self.done / max(now - self.start, 1e-9) / 1e9
            bar = "#" * int(frac * 30)
            self.stream.write(f"\r{self.label:<14} [{bar:<30}] {frac * 100:5.1f}% {rate:6.2f} GB/s")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
