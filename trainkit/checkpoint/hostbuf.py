"""The host memory a checkpoint holds: one reusable, page-aligned buffer, and a process-wide
count of what such buffers take.

Why apart from the snapshot: the buffer outlives every single save (it is reused, so a
checkpoint every step does not allocate every step), and the host budget
(``Checkpointer(host_budget_bytes=)``) is a promise about these bytes. The count is what
the tests and the benchmark hold that promise to: a buffer counts until its memory is
really freed, when no view of it is left.
"""

from __future__ import annotations

import threading
import weakref

import torch

__all__ = ["ALIGN", "HostMemory", "HOST_MEMORY", "HostBufferPool"]

ALIGN = 4096          # page alignment, so a buffer can be written with O_DIRECT


class HostMemory:
    """Bytes of host buffers allocated by the snapshot code and not yet freed, now and at
    the high-water mark (process-wide). A buffer counts until its memory is really freed,
    i.e. until no view of it is left."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current = 0
        self.peak = 0

    def track(self, raw: torch.Tensor) -> None:
        n = raw.numel() * raw.element_size()
        with self._lock:
            self.current += n
            self.peak = max(self.peak, self.current)
        weakref.finalize(raw, self._freed, n)

    def _freed(self, n: int) -> None:
        with self._lock:
            self.current -= n

    def reset_peak(self) -> int:
        """Start a new high-water measurement at the current level; returns it."""
        with self._lock:
            self.peak = self.current
            return self.current


HOST_MEMORY = HostMemory()


class HostBufferPool:
    """One reusable host buffer; ``acquire`` blocks while the previous save holds it."""

    def __init__(self, *, pin: bool) -> None:
        self._pin = pin
        self._buf: torch.Tensor | None = None
        self._free = threading.Condition()
        self._busy = False
        self.allocations = 0          # buffers allocated (a reuse allocates none)
        self.peak_bytes = 0           # the largest buffer held

    def acquire(self, nbytes: int, timeout: float | None = None) -> torch.Tensor:
        with self._free:
            if not self._free.wait_for(lambda: not self._busy, timeout=timeout):
                raise TimeoutError("the previous checkpoint still holds the host buffer")
            self._busy = True
        if self._buf is None or self._buf.numel() < nbytes or self._buf.numel() > 2 * nbytes + (64 << 20):
            self._buf = None  # free the old one first: never hold two
            raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=self._pin)
            HOST_MEMORY.track(raw)
            self.allocations += 1
            self.peak_bytes = max(self.peak_bytes, raw.numel())
            start = -raw.data_ptr() % ALIGN      # page-aligned, for O_DIRECT writes
            self._buf = raw[start:start + nbytes]
        return self._buf[:nbytes]

    def release(self) -> None:
        with self._free:
            self._busy = False
            self._free.notify_all()

    @property
    def capacity(self) -> int:
        return 0 if self._buf is None else self._buf.numel()
