"""Durable local-filesystem primitives: the only module that touches files.

Why by hand rather than through zarr's LocalStore: LocalStore never fsyncs, and a
checkpoint that is not durable is not a checkpoint. These helpers write with
``os.pwrite``/``os.preadv``, which release the GIL for the whole transfer, fsync files,
and fsync the directories whose entries changed (a new file is only durable once its
directory entry is).

Issue 3 puts tiers (memory, node-local, object store) behind a small Protocol; this
module is the local-disk implementation's toolbox.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import zlib
from collections.abc import Sequence

try:  # ISA-L's CRC-32 is the same function as zlib's, ~6x faster; zlib is the fallback
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal is a dependency, but the format needs only zlib
    _crc32 = zlib.crc32

__all__ = [
    "crc32",
    "fsync_dir",
    "write_file",
    "write_json_atomic",
    "write_json",
    "read_json",
    "preadv_exact",
    "remove_tree",
]

_IOV_MAX = 512


def crc32(data, value: int = 0) -> int:
    """CRC-32 (zlib's polynomial) of a buffer; both implementations release the GIL."""
    return _crc32(data, value)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
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


def write_json(path: str, doc: dict, *, fsync: bool = True) -> tuple[int, int]:
    """Write a JSON document; returns (size, crc32) for the inventory."""
    data = _dump(doc)
    write_file(path, data, fsync=fsync)
    return len(data), crc32(data)


def write_json_atomic(path: str, doc: dict) -> None:
    """Write + fsync a temp file, rename it over ``path``, fsync the directory."""
    tmp = f"{path}.tmp.{os.getpid()}"
    write_file(tmp, _dump(doc), fsync=True)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def read_json(path: str) -> tuple[dict, bytes]:
    with open(path, "rb") as f:
        raw = f.read()
    return json.loads(raw), raw


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
