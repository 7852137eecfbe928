"""A tier on an object store (S3 and anything else fsspec speaks), behind the Tier Protocol.

An object store has neither fsync nor rename, so the local tier's commit (write a temp
file, fsync, rename) has no equivalent. What it has instead: a PUT is atomic (the object
appears whole or not at all) and, on S3 since 2020, strongly read-after-write consistent.
The commit is therefore ordering:

- every data object is written and acknowledged (``write`` returns only after the PUT
  succeeded) before the step's ``zarr.json`` is put: ``publish`` is the commit;
- ``unpublish`` deletes the manifest object first, and ``remove`` deletes it before any
  data object, so a step half-deleted by an interrupted garbage collection is merely
  uncommitted, never committed-but-broken.

Retries live here and only here. A connection cut mid-upload is retried a few times with
exponential backoff; then ``write`` raises :class:`ObjectStoreError` (an ``OSError``
naming the object), which the writer reports as a failed step (``CheckpointWriteError``),
and the step is never committed. For ``s3://`` the retry loops of s3fs and botocore are
set to a single attempt unless ``storage_options`` say otherwise: stacked, the three
loops would retry a dead endpoint 75 times over minutes.

Credentials and endpoint: ``storage_options`` (passed to the fsspec filesystem, e.g.
``{"endpoint_url": ..., "key": ..., "secret": ...}``), else the standard AWS environment
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, profiles), which botocore reads.

Thread-safety: every method may be called from several threads at once (the engine's
I/O pool does); fsspec runs the async calls on its own event loop thread.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from trainkit.checkpoint.format.layout import COMMIT_FILE, parse_step_dirname, step_dirname

__all__ = ["FsspecTier", "ObjectStoreError", "s3_defaults"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that retrying cannot fix: the object or bucket is missing, access is denied, the
# request is malformed. Everything else (connection reset or refused, timeouts, 5xx,
# throttling) is treated as transient.
_PERMANENT: tuple[type[BaseException], ...] = (
    FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
    FileExistsError, ValueError, TypeError, KeyError, NotImplementedError,
)


class ObjectStoreError(OSError):
    """An object-store operation failed after its retries; ``filename`` is the object."""


def s3_defaults(storage_options: dict[str, Any] | None,
                environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The s3fs options a tier uses: the caller's, plus what a checkpoint tier needs.

    - ``endpoint_url`` from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` when not given.
      botocore reads these too, but fsspec caches filesystem instances by their
      arguments, so an endpoint read only from the environment could be served by a
      cached instance made for another one.
    - no listing cache: ``step_dirs`` must see steps other processes committed.
    - one attempt inside botocore: the tier retries (module docstring). s3fs's own loop
      is a filesystem attribute, not an option: :class:`FsspecTier` sets it.
    """
    env = os.environ if environ is None else environ
    opts = dict(storage_options or {})
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in opts and "endpoint_url" not in opts.get(
            "client_kwargs", {}):
        opts["endpoint_url"] = endpoint
    opts.setdefault("use_listings_cache", False)
    config = dict(opts.get("config_kwargs") or {})
    config.setdefault("retries", {"max_attempts": 1})
    opts["config_kwargs"] = config
    return opts


class FsspecTier:
    """A checkpoint tier under an fsspec URL: ``s3://bucket/prefix``, ``memory://name``, ...

    Example::

        tier = FsspecTier("s3://bucket/run1",
                          storage_options={"endpoint_url": "http://127.0.0.1:9000"})
        Checkpointer("s3://bucket/run1", storage_options={...})   # the same, via open_tier

    Args:
        url: the tier's root; objects are ``<url>/step_0000000100/rank_00000/...``.
        name: the tier's role ("persistent" normally).
        shared: whether every node sees the same copy (true for an object store).
        storage_options: keyword arguments for the fsspec filesystem (credentials,
            endpoint, ...). For ``s3://`` see :func:`s3_defaults`.
        attempts: tries per operation on transient errors (at least 1).
        backoff_s: the first retry's delay; doubled each retry, with +-25% jitter.
    """

    def __init__(self, url: str, *, name: str = "persistent", shared: bool = True,
                 storage_options: dict[str, Any] | None = None, attempts: int = 4,
                 backoff_s: float = 0.2) -> None:
        import fsspec

        if "://" not in url:
            raise ValueError(f"FsspecTier needs a URL such as s3://bucket/prefix, got {url!r}")
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        protocol = url.split("://", 1)[0]
        opts = dict(storage_options or {})
        is_s3 = protocol in ("s3", "s3a")
        inner_retries = opts.pop("retries", 1) if is_s3 else None  # s3fs: an attribute
        if is_s3:
            opts = s3_defaults(opts)
        try:
            self._fs, root = fsspec.core.url_to_fs(url, **opts)
        except (ImportError, ValueError, TypeError) as exc:
            raise ValueError(f"cannot open checkpoint tier {url!r}: {exc}") from exc
        if inner_retries is not None and hasattr(self._fs, "retries"):
            self._fs.retries = int(inner_retries)
        self._root = root.rstrip("/")
        if not self._root.strip("/"):
            raise ValueError(f"checkpoint tier {url!r} has no bucket or prefix")
        self.url = url.rstrip("/")
        self.name = name
        self.shared = shared
        self.attempts = int(attempts)
        self.backoff_s = float(backoff_s)

    def __repr__(self) -> str:
        return f"FsspecTier({self.name}: {self.url})"

    # -- helpers ------------------------------------------------------------------------
    def _path(self, rel: str) -> str:
        return f"{self._root}/{rel}" if rel else self._root

    def _url(self, rel: str) -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def _retry(self, what: str, rel: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; retry transient errors with backoff, then raise ObjectStoreError.

        Permanent errors pass through unchanged (``FileNotFoundError`` means "absent" to
        the reader), so callers decide what they mean.
        """
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except _PERMANENT:
                raise
            except Exception as exc:  # noqa: BLE001 - classified as transient
                if attempt == self.attempts:
                    code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
                    raise ObjectStoreError(
                        code, f"{what} failed after {self.attempts} attempts: "
                              f"{type(exc).__name__}: {exc}", self._url(rel)) from exc
                log.warning("%s %s failed (attempt %d of %d), retrying in %.2fs: %s: %s",
                            what, self._url(rel), attempt, self.attempts, delay,
                            type(exc).__name__, exc)
                time.sleep(delay * random.uniform(0.75, 1.25))
                delay *= 2
        raise AssertionError("unreachable")

    def _put(self, rel: str, payload: bytes) -> None:
        try:
            self._retry("upload", rel, lambda: self._fs.pipe_file(self._path(rel), payload))
        except ObjectStoreError:
            raise
        except OSError as exc:      # a missing bucket, access denied: name the object
            raise ObjectStoreError(exc.errno or errno.EIO, f"upload failed: "
                                   f"{type(exc).__name__}: {exc}", self._url(rel)) from exc

    def _delete_tree(self, rel: str) -> None:
        def rm() -> None:
            try:
                self._fs.rm(self._path(rel), recursive=True)
            except FileNotFoundError:
                pass
        self._retry("delete", rel, rm)

    # -- the Tier Protocol --------------------------------------------------------------
    def write(self, rel: str, data: memoryview, *, direct: bool = False) -> None:
        """PUT one object; returns once the store acknowledged it (``direct`` is moot)."""
        self._put(rel, bytes(memoryview(data).cast("B")))

    def read_into(self, rel: str, buffers: Sequence[memoryview], offset: int = 0) -> None:
        """Fill ``buffers`` from one ranged GET at ``offset``; a short object raises
        ``EOFError``, a missing one ``FileNotFoundError``."""
        total = sum(len(b) for b in buffers)
        if total == 0:
            return
        end = offset + total
        try:
            data = self._retry("ranged read", rel,
                               lambda: self._fs.cat_file(self._path(rel), start=offset, end=end))
        except ObjectStoreError as exc:     # a range past the end fails on some stores
            try:
                size = self.size(rel)
            except OSError:
                raise exc from None
            if size is not None and size < end:
                raise EOFError(f"{self._url(rel)} ends at byte {size}, earlier than expected "
                               f"({end})") from None
            raise
        if len(data) < total:
            raise EOFError(f"{self._url(rel)} ends at byte {offset + len(data)}, earlier than "
                           f"expected ({end})")
        src = memoryview(data)
        pos = 0
        for b in buffers:
            n = len(b)
            if n:
                dst = b if b.format == "B" else b.cast("B")
                dst[:] = src[pos:pos + n]
                pos += n

    def read(self, rel: str) -> bytes:
        return self._retry("read", rel, lambda: self._fs.cat_file(self._path(rel)))

    def size(self, rel: str) -> int | None:
        """The object's size, or None when there is no such object (a prefix is none)."""
        def info() -> int | None:
            try:
                got = self._fs.info(self._path(rel))
            except (FileNotFoundError, NotADirectoryError):
                return None
            return int(got["size"]) if got.get("type") == "file" else None
        return self._retry("stat", rel, info)

    def step_dirs(self) -> list[int]:
        """Steps with any object under them, committed or not, oldest first."""
        def ls() -> list[str]:
            self._fs.invalidate_cache(self._root)
            try:
                return self._fs.ls(self._root, detail=False)
            except FileNotFoundError:
                return []
        names = self._retry("list", "", ls)
        steps = (parse_step_dirname(n.rstrip("/").rsplit("/", 1)[-1]) for n in names)
        return sorted(s for s in steps if s is not None)

    def prepare(self, step: int, rank_dir: str) -> None:
        """Delete what an interrupted attempt left under the rank's prefix (there are no
        directories to create on an object store)."""
        self._delete_tree(f"{step_dirname(step)}/{rank_dir}")

    def sync(self, step: int, rank_dir: str) -> None:
        """Nothing to do: every object was acknowledged by its PUT."""

    def publish(self, step: int, doc: dict) -> None:
        """Commit: PUT the step's ``zarr.json``. Callers write every data object first;
        a single PUT is atomic, so readers see the whole record or none."""
        payload = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
        self._put(f"{step_dirname(step)}/{COMMIT_FILE}", payload)

    def unpublish(self, step: int) -> None:
        """Uncommit: delete the manifest object (absent already is fine)."""
        rel = f"{step_dirname(step)}/{COMMIT_FILE}"

        def rm() -> None:
            try:
                self._fs.rm_file(self._path(rel))
            except FileNotFoundError:
                pass
        self._retry("delete", rel, rm)

    def remove(self, step: int) -> None:
        """Delete a step: its manifest first, then every other object under its prefix."""
        self.unpublish(step)
        self._delete_tree(step_dirname(step))
