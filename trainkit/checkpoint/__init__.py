"""Lazy asynchronous checkpointing to zarr v3 (``trainkit.checkpoint``).

``Checkpointer(path)`` saves nested training state (tensors and plain Python values)
with a ``save()`` that returns at once, writes each rank's shard from background
threads, and commits a step atomically once every rank's shard is durable. See
``docs/design.md`` for the layout and the commit protocol.
"""

from trainkit.checkpoint.engine import Checkpointer, SaveHandle
from trainkit.checkpoint.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CommitError,
    CorruptCheckpointError,
)
from trainkit.checkpoint.reader import committed_steps, verify_step

__all__ = [
    "Checkpointer",
    "SaveHandle",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "CommitError",
    "CorruptCheckpointError",
    "committed_steps",
    "verify_step",
]
