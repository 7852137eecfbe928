"""``run_dir/events.jsonl``: every decision of ``trainkit run`` with its reason.

One JSON object per line: ``time`` (unix seconds), ``event`` (what happened), ``gen``
(the generation it concerns) and event-specific fields. ``trainkit diagnose`` shows these
next to the detector's findings, and the drill builds its recovery timeline from them.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainkit.rundir import EVENTS_FILE, read_jsonl

__all__ = ["EVENTS_FILE", "EventLog", "read_events"]


class EventLog:
    """Append-only, line-buffered, thread-safe; each line is flushed and fsynced."""

    def __init__(self, run_dir: str | os.PathLike, *,
                 echo: bool | Callable[[str], None] = True) -> None:
        self.path = Path(run_dir) / EVENTS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._echo = echo

    def log(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"time": time.time(), "event": event, **fields}
        line = json.dumps(record, default=str)
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._echo:
            reason = f": {fields['reason']}" if "reason" in fields else ""
            gen = f" [gen {fields['gen']}]" if "gen" in fields else ""
            text = f"[trainkit run]{gen} {event}{reason}"
            if callable(self._echo):
                self._echo(text)            # the console: above its live status line
            else:
                print(text, file=sys.stderr, flush=True)
        return record


def read_events(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All events of a run, oldest first; a torn last line (crash mid-write) is skipped."""
    return read_jsonl(Path(run_dir) / EVENTS_FILE)
