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

import contextlib
import errno
import json
import os
import shutil
import stat
from collections.abc import Iterator, Sequence

from trainkit.checkpoint.errors import UnsafeDirectoryError
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
    "ensure_private_dir",
    "SET_ASIDE_SUFFIX",
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


def _write_all(path: str, view: memoryview, flags: int, fsync: bool, dir_fd: int | None = None,
               mode: int = 0o644) -> None:
    if dir_fd is None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, mode)
    else:       # a tier's file: never through a link, never into a file that existed
        fd = _create_new(path, os.O_WRONLY | flags, mode, dir_fd)
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


def _create_new(name: str, flags: int, mode: int, dir_fd: int) -> int:
    """Open a new file ``name`` in the directory ``dir_fd`` (O_EXCL, O_NOFOLLOW); an
    existing entry of that name is unlinked first, so a planted link or a hard link to
    someone else's file is replaced, never written through."""
    flags |= os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        return os.open(name, flags, mode, dir_fd=dir_fd)
    except FileExistsError:
        os.unlink(name, dir_fd=dir_fd)
        return os.open(name, flags, mode, dir_fd=dir_fd)


def write_file(path: str, data, *, fsync: bool = True, direct: bool = False,
               dir_fd: int | None = None, mode: int = 0o644) -> None:
    """Create (or replace) ``path`` with ``data`` (a buffer), optionally fsyncing it.

    With ``dir_fd``, ``path`` is a name in that directory, created anew (see
    :func:`_create_new`) with ``mode``.

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
            _write_all(path, view, os.O_DIRECT, fsync, dir_fd, mode)
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _direct_refused = True
    _write_all(path, view, 0, fsync, dir_fd, mode)


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
    """Remove a directory tree; a link or file at ``path`` is unlinked, never followed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def ensure_private_dir(path: str, *, below: str | None = None) -> None:
    """Make sure ``path`` and every directory between ``below`` and it (only ``path``
    itself when ``below`` is None) are real directories (not links) owned by this user
    with mode 0700, creating missing ones so. One of ours that others could only read
    (0755, made by an older trainkit) is tightened to 0700; one they could write to is
    refused. Why: another local user who can plant or
    redirect a shared directory (``/dev/shm`` is world-writable) could read the weights
    or feed a job forged ones. Raises :class:`UnsafeDirectoryError` naming the path."""
    path = os.path.abspath(path)
    chain = [path]
    if below is not None:
        below = os.path.abspath(below)
        up = os.path.dirname(path)
        while up.startswith(below + os.sep) and up != below:
            chain.append(up)
            up = os.path.dirname(up)
    for d in reversed(chain):
        try:
            os.mkdir(d, 0o700)
            os.chmod(d, 0o700, follow_symlinks=False)
        except FileExistsError:
            pass
        except FileNotFoundError:
            os.makedirs(os.path.dirname(d), exist_ok=True)
            os.mkdir(d, 0o700)
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeDirectoryError(f"{d} is not a real directory (a link or a file): "
                                       f"refusing to keep checkpoints there")
        if st.st_uid != os.getuid():
            raise UnsafeDirectoryError(f"{d} is owned by uid {st.st_uid}, not by this user "
                                       f"(uid {os.getuid()}): refusing to use it for the memory "
                                       f"tier; remove it or pick another memory_dir")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o022:
            raise UnsafeDirectoryError(f"{d} has mode {mode:04o}, not 0700: other users could "
                                       f"have planted checkpoints there; remove it (or chmod "
                                       f"700 it if you know its contents are yours)")
        if mode != 0o700:       # ours, and nobody else could write into it: tighten it
            os.chmod(d, 0o700, follow_symlinks=False)


SET_ASIDE_SUFFIX = ".corrupt"     # step_0000000100.corrupt: a step load() set aside


class LocalTier:
    """A directory on a local or shared POSIX file system.

    Durable by construction: files are fsynced, and so are the directories whose entries
    change. ``fsync=False`` is the memory tier on ``/dev/shm``: tmpfs has nothing to sync
    to, and skipping the calls keeps it a plain memcpy.

    Nothing below the root is followed through a symbolic link: every path is walked
    from the root's descriptor with ``O_NOFOLLOW``, and files are created anew
    (``O_EXCL``). A step directory replaced by a link therefore neither redirects writes
    nor feeds reads; it is not even listed. ``private=True`` (the memory tier) makes the
    root a 0700 directory of this user (refusing one that is not) and files 0600.
    """

    def __init__(self, root: str, *, name: str = "persistent", shared: bool = True,
                 fsync: bool = True, private: bool = False) -> None:
        if root.startswith("file://"):
            root = root[len("file://"):]
        self.root = os.path.abspath(root)
        self.url = self.root
        self.name = name
        self.shared = shared
        self._fsync = fsync
        self._file_mode = 0o600 if private else 0o644
        self._dir_mode = 0o700 if private else 0o777
        if private:
            ensure_private_dir(self.root)
        else:
            os.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalTier({self.name}: {self.root})"

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    # -- walking without following links ------------------------------------------------
    def _open_dir(self, parts: list[str], *, create: bool = False) -> int:
        """A descriptor of the directory ``root/parts...``, each component opened with
        O_NOFOLLOW (ELOOP for a link); missing ones are made when ``create``."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts:
                if part in ("", ".", ".."):
                    raise OSError(errno.EINVAL, "path component not allowed",
                                  self.path("/".join(parts)))
                try:
                    nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(part, self._dir_mode, dir_fd=fd)
                    except FileExistsError:
                        pass
                    nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ELOOP, errno.ENOTDIR) and exc.filename is None:
                exc.filename = self.path("/".join(parts))
            raise
        return fd

    def _parent(self, rel: str, *, create: bool = False) -> tuple[int, str]:
        *dirs, name = rel.split("/")
        if name in ("", ".", ".."):
            raise OSError(errno.EINVAL, "not a file path", self.path(rel))
        return self._open_dir(dirs, create=create), name

    @contextlib.contextmanager
    def _in_parent(self, rel: str, *, create: bool = False) -> Iterator[tuple[int, str]]:
        """(parent directory's fd, file name) for ``rel``, closed afterwards; an error about
        the bare name is re-labelled with the tier path, so messages name the real file."""
        fd, name = self._parent(rel, create=create)
        try:
            yield fd, name
        except OSError as exc:
            if exc.filename is None or exc.filename == name:
                exc.filename = self.path(rel)
            raise
        finally:
            os.close(fd)

    def _open_file(self, rel: str) -> int:
        with self._in_parent(rel) as (fd, name):
            return os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)

    # -- the Tier protocol --------------------------------------------------------------
    def write(self, rel: str, data: memoryview, *, direct: bool = False) -> None:
        with self._in_parent(rel, create=True) as (fd, name):
            write_file(name, data, fsync=self._fsync, direct=direct and self._fsync,
                       dir_fd=fd, mode=self._file_mode)

    def read_into(self, rel: str, buffers: Sequence[memoryview], offset: int = 0) -> None:
        fd = self._open_file(rel)
        try:
            preadv_exact(fd, buffers, offset, self.path(rel))
        finally:
            os.close(fd)

    def read(self, rel: str) -> bytes:
        with os.fdopen(self._open_file(rel), "rb") as f:
            return f.read()

    def size(self, rel: str) -> int | None:
        """The size of a regular file; None for anything else (missing, a directory, a
        link, or a path through a link)."""
        try:
            fd, name = self._parent(rel)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EINVAL):
                return None
            raise
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        finally:
            os.close(fd)
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def step_dirs(self) -> list[int]:
        """Step directories: real directories with canonical names (no links, no files)."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        steps = []
        for e in entries:
            step = parse_step_dirname(e.name)
            if step is not None and e.is_dir(follow_symlinks=False):
                steps.append(step)
        return sorted(steps)

    def prepare(self, step: int, rank_dir: str) -> None:
        """Make ``step/rank_dir/data/c`` empty: leftovers of an interrupted attempt go."""
        fd = self._open_dir([step_dirname(step)], create=True)
        try:
            try:
                st = os.stat(rank_dir, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and stat.S_ISDIR(st.st_mode):
                shutil.rmtree(rank_dir, dir_fd=fd)
            elif st is not None:
                os.unlink(rank_dir, dir_fd=fd)
        finally:
            os.close(fd)
        os.close(self._open_dir([step_dirname(step), rank_dir, "data", "c"], create=True))

    def sync(self, step: int, rank_dir: str) -> None:
        """Make the directory entries of a rank's files durable (files are synced already)."""
        if not self._fsync:
            return
        parts = [step_dirname(step), rank_dir, "data", "c"]
        for n in range(len(parts), -1, -1):
            fd = self._open_dir(parts[:n])
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def publish(self, step: int, doc: dict) -> None:
        """Write the commit record atomically: a new temp file, renamed over it."""
        tmp = f"{COMMIT_FILE}.tmp.{os.getpid()}"
        self.write(f"{step_dirname(step)}/{tmp}", memoryview(_dump(doc)))
        fd = self._open_dir([step_dirname(step)])
        try:
            os.replace(tmp, COMMIT_FILE, src_dir_fd=fd, dst_dir_fd=fd)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def unpublish(self, step: int) -> None:
        try:
            fd = self._open_dir([step_dirname(step)])
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            os.unlink(COMMIT_FILE, dir_fd=fd)
            if self._fsync:
                os.fsync(fd)
        except FileNotFoundError:
            return
        finally:
            os.close(fd)

    def remove(self, step: int) -> None:
        remove_tree(self.path(step_dirname(step)))

    def set_aside(self, step: int) -> str:
        """Rename the whole step directory to ``step_N.corrupt`` (``.corrupt.2``, ...):
        no longer a step, its commit record and data kept as they were for a person or
        ``ckpt gc --force`` to decide on, and its name free for the step to be saved
        again. Returns the new path."""
        src = step_dirname(step)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for n in range(1, 1000):
                dst = f"{src}{SET_ASIDE_SUFFIX}" + (f".{n}" if n > 1 else "")
                try:
                    os.stat(dst, dir_fd=fd, follow_symlinks=False)
                    continue
                except FileNotFoundError:
                    pass
                os.rename(src, dst, src_dir_fd=fd, dst_dir_fd=fd)
                if self._fsync:
                    os.fsync(fd)
                return self.path(dst)
        finally:
            os.close(fd)
        raise OSError(errno.EEXIST, "no free name to set the step aside", self.path(src))
