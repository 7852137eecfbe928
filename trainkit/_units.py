"""Byte sizes in and out, and one progress bar: shared by every CLI.

Why one module: three parsers used to disagree on what "2GB" means. Here the decision
is made once, with each spelling's standard meaning:

* decimal SI units: ``KB``/``MB``/``GB``/``TB`` = 10^3/10^6/10^9/10^12 bytes;
* binary IEC units: ``KiB``/``MiB``/``GiB``/``TiB`` = 2^10/2^20/2^30/2^40 bytes;
* a bare number is a byte count (``B`` may follow).

``SIZE_HELP`` says so in one phrase, for ``--help`` texts.

The bar (``Progress``) is dependency-free: tqdm would be one more dependency for forty
lines, and these bars only ever count bytes. It draws only when its stream is a terminal,
so logs and pipes stay clean, unless forced; redraws are throttled.

Example::

    size = parse_size("2GiB")            # 2147483648
    with Progress(size, "verify step 100", force=args.progress) as bar:
        bar.update(4096)
"""

from __future__ import annotations

import re
import sys
import time
from typing import TextIO

__all__ = ["SIZE_HELP", "Progress", "format_bytes", "parse_size"]

SIZE_HELP = "bytes, or with a unit: KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024"

_UNITS = {"": 1, "b": 1,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# A bare K/M/G/T is refused: tools disagree on it (dd reads 2**10, SI reads 10**3).
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_size(value: str | int | float, *, allow_zero: bool = False) -> int:
    """``"500MB"`` -> 500_000_000; ``"2GiB"`` -> 2 * 1024**3; ``123`` -> 123.

    Raises ``ValueError`` with a message fit for one line of CLI output; callers add
    which option or field it was.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        m = _SIZE_RE.fullmatch(str(value))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"not a size: {value!r} (use e.g. 4096, 500MB or 2GiB; a bare "
                             f"K/M/G is ambiguous)")
        number, unit = float(m.group(1)), m.group(2).lower()
    size = int(number * _UNITS[unit])
    if size < 0 or (size == 0 and not allow_zero):
        raise ValueError(f"size must be positive, got {value!r}")
    return size


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB`` (binary units, as the bars and tables print)."""
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
        interval: least seconds between redraws (a forced bar on a pipe: 1 s at least).

    ``update`` may be called from several threads; a late redraw is harmless.
    """

    WIDTH = 24

    def __init__(self, total: int | None, desc: str, *, force: bool = False,
                 stream: TextIO | None = None, interval: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total = int(total or 0)
        self.desc = desc
        self.done = 0
        self.enabled = bool(force or self._tty())
        self._interval = interval if self._tty() else max(interval, 1.0)
        self._start = time.monotonic()
        self._last_draw = 0.0

    def update(self, n: int) -> None:
        self.done += int(n)
        now = time.monotonic()
        if self.enabled and now - self._last_draw >= self._interval:
            self._draw(now)

    def rate(self) -> float:
        """Bytes per second since the bar was made."""
        return self.done / max(time.monotonic() - self._start, 1e-9)

    def _draw(self, now: float) -> None:
        self._last_draw = now
        rate = f"{format_bytes(self.done / max(now - self._start, 1e-9))}/s"
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

    def _tty(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        try:
            return bool(isatty is not None and isatty())
        except ValueError:          # a closed stream
            return False

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
