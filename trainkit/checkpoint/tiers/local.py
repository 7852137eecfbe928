"""The local tier: a POSIX directory (node-local disk, a shared file system, /dev/shm).

Why by hand rather than through zarr's LocalStore: LocalStore never fsyncs, and a
checkpoint that is not durable is not a checkpoint. The helpers here write with
``os.pwrite``/``os.preadv``, which release the GIL for the whole transfer, fsync files,
and fsync the directories whose entries changed (a new file is only durable once its
directory entry is). The checkpoint data of a local tier goes through them; a few
other modules touch files of their own (the keeper's leases, ``ckpt export``'s
safetensors output, ``import-dcp``'s source reads).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Sequence

from trainkit.checkpoint.format.layout import COMMIT_FILE, parse_step_dirname, step_dirname


__all__ = [
    "LocalTier",
    "DIRECT_ALIGN",
    "fsync_dir",
    "fsync_file",
    "write_file",
    "write_json_atomic",
    "preadv_exact",
    "remove_tree",
]

_IOV_MAX = 512



def fsync_dir(path: str) -> None:
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY)


def fsync_file(path: str | os.PathLike) -> None:
    """Make an already-written file's contents durable."""
    _fsync(path, os.O_RDONLY)


def _fsync(path: str | os.PathLike, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


DIRECT_ALIGN = 4096
_direct_refused = False   # set once a filesystem refuses O_DIRECT; buffered from then on


def _write_all(path: str, view: memoryview, flags: int, fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
    try:
        pos, n = 0, len(view)
        while pos < n:
            written = os.pwrite(fd, view[pos:pos + (1 << 30)], pos)
            if written == 0:
                raise OSError(errno.EIO, f"write returned 0 at byte {pos}", path)
            pos += written
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str, data, *, fsync: bool = True, direct: bool = False) -> None:
    """Create (or replace) ``path`` with ``data`` (a buffer), optionally fsyncing it.

    ``direct=True`` (the caller guarantees a 4096-aligned address and length) writes with
    O_DIRECT: the disk reads the host buffer by DMA, so the kernel neither copies the
    bytes into the page cache nor spends a core doing it, a core that training needs.
    Filesystems that refuse it (EINVAL: tmpfs, some network filesystems) get a
    buffered write instead.
    """
    global _direct_refused
    view = memoryview(data).cast("B")
    if (direct and not _direct_refused and hasattr(os, "O_DIRECT")
            and len(view) % DIRECT_ALIGN == 0):
        try:
            _write_all(path, view, os.O_DIRECT, fsync)
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _direct_refused = True
    _write_all(path, view, 0, fsync)


def _dump(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()



def write_json_atomic(path: str, doc: dict) -> None:
    """Write + fsync a temp file, rename it over ``path``, fsync the directory."""
    tmp = f"{path}.tmp.{os.getpid()}"
    write_file(tmp, _dump(doc), fsync=True)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")



def preadv_exact(fd: int, buffers: Sequence[memoryview], offset: int, path: str) -> None:
    """Fill ``buffers`` from ``fd`` at ``offset``; a short file raises ``EOFError``."""
    bufs = [b for b in buffers if len(b)]
    while bufs:
        batch = bufs[:_IOV_MAX]
        want = sum(len(b) for b in batch)
        got = os.preadv(fd, batch, offset)
        if got == 0:
            raise EOFError(f"{path} ends at byte {offset}, earlier than expected")
        offset += got
        if got == want:
            bufs = bufs[len(batch):]
            continue
        # partial read: drop the buffers that were filled, trim the one cut in half
        rest: list[memoryview] = []
        for b in bufs:
            if got >= len(b):
                got -= len(b)
                continue
            rest.append(b[got:])
            got = 0
        bufs = rest


def remove_tree(path: str) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path)


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
