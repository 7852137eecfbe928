"""trainkit: keeps large PyTorch training jobs alive and fast.

Capabilities, one subpackage each:

- ``trainkit.checkpoint``: lazy asynchronous multi-level checkpointing (zarr v3).
- ``trainkit.detect``: collective-communication anomaly detection.
- ``trainkit.traffic``: flow-split traffic planning with a flow-level simulator.
- ``trainkit.merge``: exact, streamed TIES model merging.

Subpackages are imported on demand so ``import trainkit`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "Checkpointer"]


def __getattr__(name: str) -> Any:
    if name == "Checkpointer":
        return importlib.import_module("trainkit.checkpoint").Checkpointer
    raise AttributeError(f"module 'trainkit' has no attribute {name!r}")
