"""Reading JSON-lines files that another process may be appending to.

``events.jsonl``, ``diagnosis.jsonl``, progress logs: each is appended one line at a
time, so a reader can meet a torn last line (a writer killed mid-write). Such lines
are skipped rather than failing the reader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete JSON line of ``path`` (none if it does not exist), oldest first."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
