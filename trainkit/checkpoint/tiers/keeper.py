"""The memory tier's owner: a small long-lived process per node.

Why a separate owner: the memory tier exists to serve the restart after a worker
crashes, so it cannot live in the worker's heap. It lives in ``/dev/shm`` (tmpfs: the
pages are RAM, and they outlive the process that wrote them), and something must decide
when it is no longer needed, or a crashed job leaves gigabytes of RAM pinned forever.

- Under ``trainkit run`` the node agent owns it: the agent sets ``TRAINKIT_MEMORY_DIR``
  for its workers and removes the directory when the job ends.
- Used alone, ``Checkpointer(keep_in_memory=...)`` starts this keeper, detached (its own
  session, so torchrun's teardown of the workers does not take it down). Each worker
  holds a *lease* (a file named after its pid). The keeper removes the directory once no
  lease has had a live process for ``ttl`` seconds: long enough for a restart to find
  the copy, short enough that a dead job gives its memory back.

Run as ``python -m trainkit.checkpoint.tiers.keeper DIR --ttl SECONDS``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import time

from trainkit.checkpoint.tiers.local import ensure_private_dir, remove_tree
from trainkit.rundir import MEMORY_DIR_ENV

__all__ = ["memory_dir_for", "secure_memory_dir", "ensure_keeper", "take_lease", "drop_lease",
           "keeper_pid", "SHM_ROOT"]

_LEASES = ".leases"
_LOCK = ".keeper.lock"
log = logging.getLogger(__name__)


SHM_ROOT = "/dev/shm"      # where default memory tiers live (tests point it elsewhere)


def shm_root() -> str:
    """The shared memory file system the memory tier lives on (or $TMPDIR without one)."""
    return SHM_ROOT if os.path.isdir(SHM_ROOT) else os.environ.get("TMPDIR", "/tmp")


def memory_dir_for(persistent: str) -> tuple[str, bool]:
    """The memory tier's directory for a checkpoint whose persistent tier is
    ``persistent``, and whether a launcher owns it (``TRAINKIT_MEMORY_DIR`` set)."""
    owned = os.environ.get(MEMORY_DIR_ENV)
    digest = hashlib.sha1(persistent.encode()).hexdigest()[:16]
    if owned:
        return os.path.join(owned, digest), True
    return os.path.join(shm_root(), f"trainkit-{os.getuid()}", digest), False


def secure_memory_dir(directory: str) -> None:
    """Create (0700) or check the memory tier's directory and, below the shared memory
    file system's root, each directory above it (``trainkit-<uid>``, the agent's
    ``run-...``): all must be this user's, mode 0700, real directories. Else
    :class:`~trainkit.checkpoint.errors.UnsafeDirectoryError` naming the culprit."""
    root, path = os.path.abspath(shm_root()), os.path.abspath(directory)
    ensure_private_dir(path, below=root if path.startswith(root + os.sep) else None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def take_lease(directory: str) -> str:
    """Mark this process as a user of the memory tier; returns the lease path."""
    leases = os.path.join(directory, _LEASES)
    os.makedirs(leases, mode=0o700, exist_ok=True)
    path = os.path.join(leases, str(os.getpid()))
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    return path


def drop_lease(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def live_leases(directory: str) -> list[int]:
    try:
        names = os.listdir(os.path.join(directory, _LEASES))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name.isdigit() and _alive(int(name)):
            out.append(int(name))
        elif name.isdigit():
            drop_lease(os.path.join(directory, _LEASES, name))
    return out


def ensure_keeper(directory: str, *, ttl: float) -> None:
    """Start the keeper for ``directory`` unless one is running (it holds a lock file)."""
    secure_memory_dir(directory)
    lock = os.path.join(directory, _LOCK)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return                              # a keeper holds it
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    subprocess.Popen([sys.executable, "-m", "trainkit.checkpoint.tiers.keeper", directory,
                      "--ttl", str(ttl)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:      # wait until it holds the lock
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        finally:
            os.close(fd)
        time.sleep(0.02)
    log.warning("the memory-tier keeper for %s did not start; the copy will stay until "
                "/dev/shm is cleared", directory)


def keeper_pid(directory: str) -> int | None:
    """The pid of the keeper holding ``directory``, if one does."""
    lock = os.path.join(directory, _LOCK)
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.pread(fd, 32, 0)
            return int(raw) if raw.strip().isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def keep(directory: str, ttl: float, poll: float = 1.0) -> int:
    """The keeper's loop: hold the lock; remove ``directory`` after ``ttl`` seconds with no
    live lease."""
    lock = os.path.join(directory, _LOCK)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0                            # another keeper won the race
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)   # so tools (and tests) can find it
    idle_since = time.monotonic()
    while True:
        if not os.path.isdir(directory):
            return 0
        if live_leases(directory):
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > ttl:
            remove_tree(directory)
            return 0
        time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Own a trainkit memory tier in /dev/shm.")
    p.add_argument("directory")
    p.add_argument("--ttl", type=float, default=300.0,
                   help="remove the directory after this many seconds without a live worker")
    args = p.parse_args(argv)
    return keep(args.directory, args.ttl)


if __name__ == "__main__":
    sys.exit(main())
