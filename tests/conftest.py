"""Shared fixtures. Tests put the repo on sys.path through pytest's rootdir."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
