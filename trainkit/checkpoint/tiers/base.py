"""The Tier seam: where a checkpoint's bytes live, behind one small Protocol.

A checkpointer writes the same layout (:mod:`~trainkit.checkpoint.format.layout`) to up to
three tiers, fastest first: host memory (``/dev/shm``, see
:mod:`~trainkit.checkpoint.tiers.keeper`), node-local disk, and persistent storage (a
shared directory or an object store). Every tier holds complete step groups, and every
tier has its own commit record: a step's ``zarr.json`` is published last on each tier, so
a tier either holds a committed step or does not.

The Protocol is byte-level on purpose (write a file, read a byte range, publish a
record, list, delete): the writer, reader, flusher and garbage collector are written once
against it, and an object store needs only these operations. Paths are relative to the
tier's root, ``/``-separated, e.g. ``step_0000000100/rank_00000/data/c/0``.

``TIERS`` is the explicit registry of implementations (name -> factory taking the root or
URL and ``name=``, ``shared=``, ``storage_options=``); :func:`open_tier` picks from it, and
the contract test (``tests/test_checkpoint_tier_contract.py``) runs every entry. A new
tier is one module in this package plus one line in ``TIERS``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from trainkit.checkpoint.tiers.fsspec import FsspecTier
from trainkit.checkpoint.tiers.local import LocalTier

__all__ = ["Tier", "TIERS", "open_tier", "is_url"]


@runtime_checkable
class Tier(Protocol):
    """One level of storage holding complete, separately committed step groups.

    ``name`` is the tier's role ("memory", "local" or "persistent"); ``shared`` says
    whether every node sees the same copy (a shared file system or an object store) or
    each node has its own (memory, node-local disk). ``write`` returns only once the data
    is as durable as the tier can make it; ``publish`` is atomic and is the commit.

    Who calls what, in which order, for one step:

    1. (every rank, flush thread) ``prepare(step, rank_dir)``: empty the rank's directory
       (leftovers of an interrupted attempt go);
    2. (every rank, I/O threads, concurrently) ``write(rel, data)`` for each chunk and
       metadata file of the rank;
    3. (every rank) ``sync(step, rank_dir)``: the rank's directory entries are durable;
       the rank then reports its manifest to the coordinator;
    4. (rank 0 for a ``shared`` tier, once every rank's shard is durable; each node's
       first rank for a node-local tier) ``publish(step, doc)``: the commit;
    5. (the tier flow, later, per rank) steps 1-4 again to copy the step to the next
       tier down;
    6. (garbage collection: rank 0 on a shared tier, one rank per node otherwise)
       ``unpublish(step)`` then ``remove(step)``; a step half-removed is merely
       uncommitted.

    Readers (any process, any rank, any time) use ``step_dirs``, ``size``, ``read`` and
    ``read_into``; they treat a step as present only once its commit record is. Every
    method may be called from several threads at once.
    """

    name: str
    url: str
    shared: bool

    def write(self, rel: str, data: memoryview, *, direct: bool = False) -> None: ...

    def read_into(self, rel: str, buffers: Sequence[memoryview], offset: int = 0) -> None: ...

    def read(self, rel: str) -> bytes: ...

    def size(self, rel: str) -> int | None: ...

    def step_dirs(self) -> list[int]: ...

    def prepare(self, step: int, rank_dir: str) -> None: ...

    def sync(self, step: int, rank_dir: str) -> None: ...

    def publish(self, step: int, doc: dict) -> None: ...

    def unpublish(self, step: int) -> None: ...

    def remove(self, step: int) -> None: ...


def _local(root: str, *, name: str = "persistent", shared: bool = True,
           storage_options: dict | None = None) -> Tier:
    if storage_options:
        raise ValueError(f"storage_options apply to URLs (s3://...) only; {root!r} is a "
                         f"local path")
    return LocalTier(root, name=name, shared=shared)


def _memory(root: str, *, name: str = "memory", shared: bool = False,
            storage_options: dict | None = None) -> Tier:
    """A directory on tmpfs (``/dev/shm``): nothing to sync to, so no fsync; private
    (a 0700 directory of this user, files 0600), since ``/dev/shm`` is shared."""
    if storage_options:
        raise ValueError(f"storage_options apply to URLs (s3://...) only; {root!r} is a "
                         f"local path")
    return LocalTier(root, name=name, shared=shared, fsync=False, private=True)


TIERS: dict[str, Callable[..., Tier]] = {
    "local": _local,       # a POSIX directory, fsynced: node-local disk or a shared FS
    "memory": _memory,     # a tmpfs directory (/dev/shm), not fsynced
    "fsspec": FsspecTier,  # any fsspec URL: s3://, gs://, memory://, ...
}


def is_url(path: str) -> bool:
    """True for ``scheme://...`` other than ``file://``."""
    return "://" in path and not path.startswith("file://")


def open_tier(path_or_url: str, *, name: str = "persistent", shared: bool = True,
              storage_options: dict[str, Any] | None = None) -> Tier:
    """The tier for a local path (``TIERS["local"]``) or a URL (``TIERS["fsspec"]``).

    ``storage_options`` (credentials, endpoint, ...) go to the fsspec filesystem of a URL;
    they mean nothing for a local path, so passing them with one is an error.
    """
    kind = "fsspec" if is_url(path_or_url) else "local"
    return TIERS[kind](path_or_url, name=name, shared=shared, storage_options=storage_options)
