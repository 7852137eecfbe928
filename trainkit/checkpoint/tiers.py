"""Storage tiers: where a checkpoint's bytes live, behind one small Protocol.

A checkpointer writes the same layout (:mod:`~trainkit.checkpoint.layout`) to up to three
tiers, fastest first: host memory (``/dev/shm``, see :mod:`~trainkit.checkpoint.keeper`),
node-local disk, and persistent storage (a shared directory or an object store). Every
tier holds complete step groups, and every tier has its own commit record: a step's
``zarr.json`` is published last on each tier, so a tier either holds a committed step or
does not.

The Protocol is byte-level on purpose (write a file, read a byte range, publish a
record, list, delete): the writer, reader, flusher and garbage collector are written once
against it, and an object store needs only these operations. Paths are relative to the
tier's root, ``/``-separated, e.g. ``step_0000000100/rank_00000/data/c/0``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from trainkit.checkpoint.layout import parse_step_dirname, step_dirname
from trainkit.checkpoint.storage import (
    fsync_dir,
    preadv_exact,
    remove_tree,
    write_file,
    write_json_atomic,
)

__all__ = ["Tier", "LocalTier", "open_tier", "COMMIT_FILE", "is_url"]

COMMIT_FILE = "zarr.json"


@runtime_checkable
class Tier(Protocol):
    """One level of storage holding complete, separately committed step groups.

    ``name`` is the tier's role ("memory", "local" or "persistent"); ``shared`` says
    whether every node sees the same copy (a shared file system or an object store) or
    each node has its own (memory, node-local disk). ``write`` returns only once the data
    is as durable as the tier can make it; ``publish`` is atomic and is the commit.
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


def is_url(path: str) -> bool:
    """True for ``scheme://...`` other than ``file://``."""
    return "://" in path and not path.startswith("file://")


class LocalTier:
    """A directory on a local or shared POSIX file system.

    Durable by construction: files are fsynced, and so are the directories whose entries
    change. ``fsync=False`` is the memory tier on ``/dev/shm``: tmpfs has nothing to sync
    to, and skipping the calls keeps it a plain memcpy.
    """

    def __init__(self, root: str, *, name: str = "persistent", shared: bool = True,
                 fsync: bool = True) -> None:
        if root.startswith("file://"):
            root = root[len("file://"):]
        self.root = os.path.abspath(root)
        self.url = self.root
        self.name = name
        self.shared = shared
        self._fsync = fsync
        os.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalTier({self.name}: {self.root})"

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def write(self, rel: str, data: memoryview, *, direct: bool = False) -> None:
        path = self.path(rel)
        write_file(path, data, fsync=self._fsync, direct=direct and self._fsync)

    def read_into(self, rel: str, buffers: Sequence[memoryview], offset: int = 0) -> None:
        path = self.path(rel)
        fd = os.open(path, os.O_RDONLY)
        try:
            preadv_exact(fd, buffers, offset, path)
        finally:
            os.close(fd)

    def read(self, rel: str) -> bytes:
        with open(self.path(rel), "rb") as f:
            return f.read()

    def size(self, rel: str) -> int | None:
        try:
            return os.stat(self.path(rel)).st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def step_dirs(self) -> list[int]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(s for s in map(parse_step_dirname, names) if s is not None)

    def prepare(self, step: int, rank_dir: str) -> None:
        """Make ``step/rank_dir/data/c`` empty: leftovers of an interrupted attempt go."""
        path = self.path(os.path.join(step_dirname(step), rank_dir))
        remove_tree(path)
        os.makedirs(os.path.join(path, "data", "c"))

    def sync(self, step: int, rank_dir: str) -> None:
        """Make the directory entries of a rank's files durable (files are synced already)."""
        if not self._fsync:
            return
        step_dir = self.path(step_dirname(step))
        rank = os.path.join(step_dir, rank_dir)
        for d in (os.path.join(rank, "data", "c"), os.path.join(rank, "data"), rank, step_dir,
                  self.root):
            fsync_dir(d)

    def publish(self, step: int, doc: dict) -> None:
        path = self.path(os.path.join(step_dirname(step), COMMIT_FILE))
        if self._fsync:
            write_json_atomic(path, doc)
            return
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.replace(tmp, path)

    def unpublish(self, step: int) -> None:
        path = self.path(os.path.join(step_dirname(step), COMMIT_FILE))
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        if self._fsync:
            fsync_dir(os.path.dirname(path))

    def remove(self, step: int) -> None:
        remove_tree(self.path(step_dirname(step)))


def open_tier(path_or_url: str, *, name: str = "persistent", shared: bool = True,
              storage_options: dict | None = None) -> Tier:
    """The tier for a local path or a URL (``s3://``, ``memory://``, ... via fsspec).

    ``storage_options`` (credentials, endpoint, ...) go to the fsspec filesystem of a URL;
    they mean nothing for a local path, so passing them with one is an error.
    """
    if is_url(path_or_url):
        from trainkit.checkpoint.tiers_fsspec import FsspecTier

        return FsspecTier(path_or_url, name=name, shared=shared,
                          storage_options=storage_options)
    if storage_options:
        raise ValueError(f"storage_options apply to URLs (s3://...) only; {path_or_url!r} is "
                         f"a local path")
    return LocalTier(path_or_url, name=name, shared=shared)
