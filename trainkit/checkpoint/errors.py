"""Exceptions raised by the checkpoint engine.

Every error names what a user needs to act on it: the step, and where relevant the
rank, the tensor and the file. They all derive from :class:`CheckpointError`, so a
training loop can catch one type.
"""

from __future__ import annotations

from trainkit.errors import TrainkitError

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CommitError",
    "CorruptCheckpointError",
    "CheckpointWriteError",
    "PickleRefusedError",
    "UnsafeDirectoryError",
    "StateMismatchError",
]


class CheckpointError(TrainkitError, RuntimeError):
    """Base class of every checkpoint failure."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The requested step does not exist or was never committed."""


class CheckpointWriteError(CheckpointError):
    """A rank could not write its shard (disk full, permission denied, ...)."""


class CommitError(CheckpointError):
    """The ranks could not agree to commit a step (a rank failed, died or timed out)."""


class CorruptCheckpointError(CheckpointError):
    """A committed step failed verification: a file is missing, truncated or altered."""


class PickleRefusedError(CheckpointError):
    """A step holds a pickled value (a non-tensor item written through DCP) and the
    caller did not pass ``allow_pickle=True``: unpickling runs code from the file."""


class UnsafeDirectoryError(CheckpointError, PermissionError):
    """A directory that must be this user's alone (the memory tier in ``/dev/shm``) is a
    link, belongs to another user, or is open to others: refused, not used."""
class StateMismatchError(CheckpointError):
    """``load(step, into=target)``: the target and the step do not hold the same keys,
    or a tensor's shape or dtype differs. Lists them all; not a reason to fall back to
    another tier or step (every copy of the step has the same keys)."""
