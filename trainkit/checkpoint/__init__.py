"""Lazy asynchronous checkpointing to zarr v3 (``trainkit.checkpoint``).

``Checkpointer(path)`` saves nested training state (tensors and plain Python values)
with a ``save()`` that returns at once, writes each rank's shard from background
threads, and commits a step atomically once every rank's shard is durable. See
``docs/design.md`` for the layout and the commit protocol.

Names are resolved on first use, so ``trainkit ckpt --help`` does not import torch.
"""

from __future__ import annotations

from trainkit._lazy import lazy_getattr

__all__ = [
    "Checkpointer",
    "SaveHandle",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "CommitError",
    "CorruptCheckpointError",
    "PickleRefusedError",
    "StateMismatchError",
    "LoadReport",
    "ZarrWriter",
    "ZarrReader",
    "LazyStager",
    "committed_steps",
    "verify_step",
    "PerRank",
    "Tier",
    "LocalTier",
    "FsspecTier",
    "open_tier",
]

_WHERE = {
    "Checkpointer": "engine",
    "SaveHandle": "engine",
    "CheckpointError": "errors",
    "CheckpointNotFoundError": "errors",
    "CheckpointWriteError": "errors",
    "CommitError": "errors",
    "CorruptCheckpointError": "errors",
    "PickleRefusedError": "errors",
    "StateMismatchError": "errors",
    "LoadReport": "into",
    "ZarrWriter": "interop.dcp",
    "ZarrReader": "interop.dcp",
    "LazyStager": "interop.lazy_stager",
    "committed_steps": "reader",
    "verify_step": "reader",
    "PerRank": "restore",
    "Tier": "tiers.base",
    "LocalTier": "tiers.local",
    "FsspecTier": "tiers.fsspec",
    "open_tier": "tiers.base",
}


__getattr__ = lazy_getattr(__name__, {k: f"trainkit.checkpoint.{v}" for k, v in _WHERE.items()},
                           globals())


def __dir__() -> list[str]:
    return sorted(__all__)
