"""What a person sees of a ``trainkit run`` job: trainkit's events and one live status line.

Why: the console of a passing drill was 437 lines, with tracebacks of torchrun agents
that trainkit itself stopped. Now torchrun's and the workers' output goes to
``run_dir/logs/gen<G>/<node>.log`` (``--tee`` also streams it), and the console shows
trainkit's own events, one line each, plus, on a terminal, a status line redrawn in
place::

    gen 1 | 2 nodes (node0, node1) | step 23 | 3.1 steps/s | ckpt 20 (memory) | restarts 1

The status line is read from the run directory (``events.jsonl`` and the records rank 0
writes under ``status/``), so it needs nothing from the workers but files.

Thread safety: :meth:`Console.line` may be called from any thread (the coordinator, the
local agent); a lock keeps an event line from being torn by a status redraw.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from trainkit import rundir

__all__ = ["Console", "format_status"]

_PERIOD_S = 0.5


def format_status(events: list[dict[str, Any]], status: dict[str, dict[str, Any]],
                  rate: float | None) -> str:
    """The status line from the run's events so far and rank 0's status records."""
    gen, members, restarts = None, [], 0
    for e in events:
        if e.get("event") == "generation_start":
            gen, members = e.get("gen"), list(e.get("members") or [])
        elif e.get("event") == "decision" and e.get("action") != "continue":
            restarts = int(e.get("restarts") or restarts)
    parts = [f"gen {gen if gen is not None else '-'}",
             f"{len(members)} node{'s' if len(members) != 1 else ''}"
             + (f" ({', '.join(members)})" if members and len(members) <= 4 else "")]
    step = status.get("step")
    parts.append(f"step {step['step']}" if step and step.get("gen") == gen else "step -")
    parts.append(f"{rate:.1f} steps/s" if rate is not None else "- steps/s")
    ckpt = status.get("checkpoint")
    parts.append(f"ckpt {ckpt['step']} ({ckpt.get('tier', '?')})" if ckpt else "ckpt none")
    parts.append(f"restarts {restarts}")
    return " | ".join(parts)


class Console:
    """Event lines to ``stream``; on a terminal also the live status line."""

    def __init__(self, run_dir: Path, *, stream: IO[str] | None = None,
                 live: bool | None = None) -> None:
        self.run_dir = run_dir
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self._lock = threading.Lock()
        self._shown = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._events = rundir.JsonlTail(run_dir / rundir.EVENTS_FILE, from_start=True)
        self._seen: list[dict[str, Any]] = []
        self._last_step: tuple[int, float] | None = None
        self._rate: float | None = None

    def line(self, text: str) -> None:
        """Print one line above the status line."""
        with self._lock:
            if self._shown:
                self.stream.write("\r\x1b[K")
            self.stream.write(text + "\n")
            if self._shown:
                self.stream.write(self._shown)
            self.stream.flush()

    def start(self) -> Console:
        if self.live and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="trainkit-console",
                                            daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            if self._shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._shown = ""

    def _loop(self) -> None:
        while not self._stop.wait(_PERIOD_S):
            try:
                text = self.status_text()
            except Exception:  # noqa: BLE001 - a status line never stops the job
                continue
            with self._lock:
                self._shown = text
                self.stream.write("\r\x1b[K" + text)
                self.stream.flush()

    def status_text(self) -> str:
        self._seen.extend(self._events.poll())
        status = rundir.read_status(self.run_dir)
        step = status.get("step")
        if step and "time" in step:
            now = (int(step["step"]), float(step["time"]))
            if self._last_step and now[1] > self._last_step[1] and now[0] > self._last_step[0]:
                self._rate = (now[0] - self._last_step[0]) / (now[1] - self._last_step[1])
                self._last_step = now
            elif self._last_step is None or now[0] < self._last_step[0]:
                self._last_step, self._rate = now, None
            if time.time() - now[1] > 10:
                self._rate = 0.0
        return format_status(self._seen, status, self._rate)
