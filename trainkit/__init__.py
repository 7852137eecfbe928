"""trainkit: keeps large PyTorch training jobs alive and fast.

Capabilities, one subpackage each:

- ``trainkit.checkpoint``: lazy asynchronous multi-level checkpointing (zarr v3).
- ``trainkit.detect``: collective-communication anomaly detection.
- ``trainkit.traffic``: flow-split traffic planning with a flow-level simulator.
- ``trainkit.merge``: exact, streamed TIES model merging.
- ``trainkit.run``: the ``trainkit run`` torchrun wrapper (detect, isolate, restart, resume).

The ``trainkit`` command (:mod:`trainkit.cli`) is a thin layer over these.

Subpackages are imported on demand so ``import trainkit`` stays cheap.
"""

from __future__ import annotations

from trainkit._lazy import lazy_getattr

__version__ = "0.1.0"

__all__ = ["__version__", "Checkpointer"]


__getattr__ = lazy_getattr(__name__, {"Checkpointer": "trainkit.checkpoint"}, globals())
