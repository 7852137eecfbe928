"""A tiny progress bar on stderr for long checkpoint operations (verify, export, import).

Why not tqdm: one more dependency for forty lines, and these bars only ever count bytes.
The bar draws only when stderr is a terminal, so logs and pipes stay clean, unless the
user forces it (``--progress``). Redraws are throttled (10 per second) so a loop over
many small files does not spend its time printing.

Example::

    with Progress(total_bytes, "verify step 100", force=args.progress) as bar:
        for f in files:
            check(f)
            bar.update(size_of(f))
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "format_bytes"]


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Counts bytes towards ``total`` and draws ``desc [####....] 42% 1.2/2.9 GiB 310 MiB/s``.

    Args:
        total: bytes expected (0 or None: unknown; the bar then shows only the count).
        desc: what is being done.
        force: draw even when ``stream`` is not a terminal.
        stream: where to draw (default ``sys.stderr``).

    ``update`` may be called from several threads; a late redraw is harmless.
    """

    WIDTH = 24

    def __init__(self, total: int | None, desc: str, *, force: bool = False,
                 stream: TextIO | None = None, interval: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total = int(total or 0)
        self.desc = desc
        self.done = 0
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(force or (isatty is not None and isatty()))
        # a forced bar on a pipe or log prints whole lines: once a second is plenty
        self._interval = interval if self._tty() else max(interval, 1.0)
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def update(self, n: int) -> None:
        self.done += int(n)
        now = time.monotonic()
        if self.enabled and now - self._last_draw >= self._interval:
            self._draw(now)

    def _draw(self, now: float) -> None:
        self._last_draw = now
        elapsed = max(now - self._start, 1e-9)
        rate = f"{format_bytes(self.done / elapsed)}/s"
        if self.total:
            frac = min(self.done / self.total, 1.0)
            filled = int(frac * self.WIDTH)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            line = (f"{self.desc} [{bar}] {frac * 100:3.0f}% {format_bytes(self.done)}"
                    f"/{format_bytes(self.total)} {rate}")
        else:
            line = f"{self.desc} {format_bytes(self.done)} {rate}"
        self.stream.write("\r" + line + "\033[K" if self._tty() else line + "\n")
        self.stream.flush()
        self._drawn = True

    def _tty(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty is not None and isatty())

    def close(self) -> None:
        """Draw the final state once, and end the line."""
        if not self.enabled:
            return
        self._draw(time.monotonic())
        if self._tty():
            self.stream.write("\n")
            self.stream.flush()
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
