"""Checking a checkpoint's metadata before anything is allocated or read from it.

Why a separate pass: the commit record and the rank indexes are files on a disk that
other people and other jobs can write. The reader, the resharding loader, ``ckpt
export`` and ``trainkit merge`` all use their integers to size buffers, cut chunks and
build tensor views. An index claiming ``nchunks = 2**40`` must not make a loader eat all
memory, a ``path`` of ``../../elsewhere`` must not send reads outside the step, and a
stride out of range must not surface as an ``IndexError`` from deep inside torch. Every
such document is therefore parsed by :func:`parse_json` (bounded nesting) and checked
here, and every violation is a :class:`~trainkit.checkpoint.errors.CorruptCheckpointError`
naming the file and the field.

What is checked (fields this module does not know are left alone, so newer writers can
add them):

- commit record: ``world_size`` in range and equal to ``len(ranks)``, ``files`` a map of
  safe relative paths to ``[size, crc32]``, ``replicated`` blob numbers, ``sharded``
  dimensions, shapes and offsets consistent;
- rank index: ``rank`` and ``world_size`` as the record says; each array's ``path`` is
  the one the layout gives (``rank_NNNNN/data``), its chunks are files of the record of
  ``chunk_bytes`` bytes each; every blob lies inside its array with one checksum per
  chunk it touches; every tensor has an allowed dtype, a shape, strides and an offset
  that stay inside its blob.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from trainkit.checkpoint.errors import CorruptCheckpointError
from trainkit.checkpoint.format.layout import NUMPY_DTYPE, chunk_relpath, rank_array

__all__ = ["MAX_DEPTH", "MAX_WORLD_SIZE", "DTYPES", "parse_json", "check_depth",
           "validate_record", "validate_index", "dtype_of", "safe_relpath"]

MAX_DEPTH = 200              # JSON nesting of a checkpoint document (state trees are ~10)
MAX_WORLD_SIZE = 1 << 20     # ranks a step may claim
_MAX_INT = 1 << 62           # any byte count, shape or stride
_MAX_DIMS = 64

# dtype names a tensor entry may carry: the torch dtypes the format knows
DTYPES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in NUMPY_DTYPE}


def check_depth(doc: Any, where: str, limit: int = MAX_DEPTH) -> None:
    """Raise unless ``doc`` (parsed JSON) nests at most ``limit`` deep; iterative, so a
    hostile document cannot exhaust the stack here either."""
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise CorruptCheckpointError(f"{where}: nested more than {limit} levels deep")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))


def parse_json(raw: bytes | str, where: str) -> Any:
    """``json.loads`` for checkpoint metadata: bad JSON and nesting beyond
    :data:`MAX_DEPTH` (which would overflow the parser's or the decoder's stack) are a
    :class:`CorruptCheckpointError` naming ``where``."""
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise CorruptCheckpointError(f"{where}: nested too deeply to be checkpoint "
                                     f"metadata") from None
    except (ValueError, TypeError) as exc:       # UnicodeDecodeError is a ValueError
        raise CorruptCheckpointError(f"{where} is not valid JSON: {exc}") from None
    check_depth(doc, where)
    return doc


def _fail(where: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{where}: {what}")


def _int(value: Any, where: str, field: str, low: int = 0, high: int = _MAX_INT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(where, f"{field} must be an integer in [{low}, {high}], got {value!r:.60}")
    return value


def _ints(value: Any, where: str, field: str, low: int = 0, high: int = _MAX_INT,
          max_len: int = _MAX_INT) -> list[int]:
    if not isinstance(value, list) or len(value) > max_len:
        raise _fail(where, f"{field} must be a list of at most {max_len} integers")
    for i, v in enumerate(value):
        _int(v, where, f"{field}[{i}]", low, high)
    return value


def _dict(value: Any, where: str, field: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(where, f"{field} must be an object, got {type(value).__name__}")
    return value


def _list(value: Any, where: str, field: str) -> list:
    if not isinstance(value, list):
        raise _fail(where, f"{field} must be a list, got {type(value).__name__}")
    return value


def safe_relpath(rel: Any, where: str) -> str:
    """A path inside a step directory: relative, ``/``-separated, no ``..``, ``.`` or
    empty components, no backslashes or NULs."""
    if (not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel
            or "\0" in rel or any(p in ("", ".", "..") for p in rel.split("/"))):
        raise _fail(where, f"file path {rel!r:.80} leaves the step directory or is malformed")
    return rel


def validate_record(record: dict, where: str) -> dict:
    """Check a step's commit record (its ``attributes.trainkit``); returns it."""
    world = _int(record.get("world_size"), where, "world_size", 1, MAX_WORLD_SIZE)
    ranks = _list(record.get("ranks", []), where, "ranks")
    if len(ranks) != world:
        raise _fail(where, f"world_size is {world} but {len(ranks)} ranks are listed")
    for i, r in enumerate(ranks):
        r = _dict(r, where, f"ranks[{i}]")
        for field in ("nbytes", "ntensors"):
            if field in r:
                _int(r[field], where, f"ranks[{i}].{field}")
    files = _dict(record.get("files"), where, "files")
    for rel, entry in files.items():
        safe_relpath(rel, where)
        if (not isinstance(entry, list) or len(entry) != 2):
            raise _fail(where, f"files[{rel!r}] must be [size, crc32]")
        _int(entry[0], where, f"files[{rel!r}] size")
        _int(entry[1], where, f"files[{rel!r}] crc32", 0, 0xFFFFFFFF)
    _ints(record.get("replicated", []), where, "replicated")
    sharded = _dict(record.get("sharded", {}), where, "sharded")
    for name, info in sharded.items():
        info = _dict(info, where, f"sharded[{name!r}]")
        shape = _ints(info.get("shape"), where, f"sharded[{name!r}].shape", max_len=_MAX_DIMS)
        _int(info.get("dim"), where, f"sharded[{name!r}].dim", 0, max(len(shape) - 1, 0))
        if not shape:
            raise _fail(where, f"sharded[{name!r}].shape is empty")
        offsets = _ints(info.get("offsets"), where, f"sharded[{name!r}].offsets",
                        high=shape[info["dim"]])
        if len(offsets) != world or offsets != sorted(offsets) or (offsets and offsets[0]):
            raise _fail(where, f"sharded[{name!r}].offsets must be {world} ascending "
                               f"offsets from 0")
    return record


def dtype_of(name: Any, where: str) -> torch.dtype:
    """The torch dtype a tensor entry names, from the allow-list :data:`DTYPES`."""
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise _fail(where, f"dtype {name!r:.40} is not a tensor dtype this format stores")
    return dtype


def _extent(shape: list[int], stride: list[int]) -> int:
    """Elements from the first to one past the last a view touches (0 if empty)."""
    if any(d == 0 for d in shape):
        return 0
    return 1 + sum((d - 1) * s for d, s in zip(shape, stride))


def validate_index(index: Any, record: dict, rank: int, where: str) -> dict:
    """Check a rank's index (``attributes.trainkit`` of ``rank_NNNNN/zarr.json``) against
    the step's already validated commit record; returns it."""
    index = _dict(index, where, "the rank index")
    if index.get("rank", rank) != rank:
        raise _fail(where, f"rank is {index.get('rank')!r:.20}, expected {rank}")
    if index.get("world_size", record["world_size"]) != record["world_size"]:
        raise _fail(where, f"world_size {index.get('world_size')!r:.20} differs from the "
                           f"commit record's {record['world_size']}")
    files = record["files"]
    arrays = _dict(index.get("arrays"), where, "arrays")
    sizes: dict[str, int] = {}
    for name, info in arrays.items():
        info = _dict(info, where, f"arrays[{name!r}]")
        if name != "rank" or info.get("path") != rank_array(rank):
            raise _fail(where, f"array {name!r:.40} at {info.get('path')!r:.80}: a rank's "
                               f"only array is 'rank' at {rank_array(rank)!r}")
        chunk = _int(info.get("chunk_bytes"), where, f"arrays[{name!r}].chunk_bytes", 1)
        nchunks = _int(info.get("nchunks"), where, f"arrays[{name!r}].nchunks",
                       high=len(files))
        if "nbytes" in info:
            _int(info["nbytes"], where, f"arrays[{name!r}].nbytes", high=chunk * nchunks)
        shared = _dict(info.get("shared", {}), where, f"arrays[{name!r}].shared")
        for c, owner in shared.items():
            if not (isinstance(c, str) and c.isdigit() and int(c) < nchunks):
                raise _fail(where, f"arrays[{name!r}].shared names chunk {c!r:.20}")
            _int(owner, where, f"arrays[{name!r}].shared[{c}]", 0, record["world_size"] - 1)
        for c in range(nchunks):
            owner = shared.get(str(c), rank)
            rel = chunk_relpath(rank_array(owner), c)
            if rel not in files:
                raise _fail(where, f"chunk {rel} is not in the commit record")
            if files[rel][0] != chunk:
                raise _fail(where, f"chunk {rel} has {files[rel][0]} bytes in the commit record,"
                                   f" the index says chunks are {chunk}: nchunks * chunk_bytes "
                                   f"is not the array's size")
        sizes[name] = chunk * nchunks
    blobs = _list(index.get("blobs"), where, "blobs")
    spans = []
    for i, b in enumerate(blobs):
        b = _dict(b, where, f"blobs[{i}]")
        array = b.get("array", "rank")
        if array not in sizes:
            raise _fail(where, f"blobs[{i}] lives in array {array!r:.40}, which the index lacks")
        off = _int(b.get("offset"), where, f"blobs[{i}].offset")
        n = _int(b.get("nbytes"), where, f"blobs[{i}].nbytes")
        if off + n > sizes[array]:
            raise _fail(where, f"blobs[{i}] ([{off}, {off + n})) reaches past the end of its "
                               f"array ({sizes[array]} bytes)")
        chunk = arrays[array]["chunk_bytes"]
        spanned = 0 if n == 0 else (off + n - 1) // chunk - off // chunk + 1
        _ints(b.get("crc32"), where, f"blobs[{i}].crc32", high=0xFFFFFFFF)
        if len(b["crc32"]) != spanned:
            raise _fail(where, f"blobs[{i}] touches {spanned} chunks but has "
                               f"{len(b['crc32'])} checksums")
        if n:
            spans.append((array, off, off + n, i))
    spans.sort()
    for (a1, _, e1, i1), (a2, s2, _, i2) in zip(spans, spans[1:]):
        if a1 == a2 and s2 < e1:
            raise _fail(where, f"blobs[{i1}] and blobs[{i2}] overlap")
    tensors = _list(index.get("tensors"), where, "tensors")
    for i, t in enumerate(tensors):
        t = _dict(t, where, f"tensors[{i}]")
        label = f"tensors[{i}] ({t.get('name')!r:.60})"
        if not isinstance(t.get("name"), str):
            raise _fail(where, f"{label}: name must be a string")
        dtype = dtype_of(t.get("dtype"), f"{where}: {label}")
        blob = _int(t.get("blob"), where, f"{label}.blob", 0, len(blobs) - 1)
        shape = _ints(t.get("shape"), where, f"{label}.shape", max_len=_MAX_DIMS)
        stride = _ints(t.get("stride"), where, f"{label}.stride", max_len=_MAX_DIMS)
        if len(stride) != len(shape):
            raise _fail(where, f"{label}: {len(shape)} dimensions but {len(stride)} strides")
        offset = _int(t.get("offset"), where, f"{label}.offset")
        if offset % dtype.itemsize:
            raise _fail(where, f"{label}: offset {offset} is not a multiple of its element "
                               f"size {dtype.itemsize}")
        numel = math.prod(shape)
        if "nbytes" in t and t["nbytes"] != numel * dtype.itemsize:
            raise _fail(where, f"{label}: nbytes {t['nbytes']!r:.20} is not shape x element "
                               f"size ({numel * dtype.itemsize})")
        end = offset + _extent(shape, stride) * dtype.itemsize
        if numel and end > blobs[blob]["nbytes"]:
            raise _fail(where, f"{label}: shape {shape}, stride {stride} and offset {offset} "
                               f"reach byte {end} of a {blobs[blob]['nbytes']}-byte blob")
    _check_refs(index.get("tree"), len(tensors), where)
    return index


def _check_refs(tree: Any, ntensors: int, where: str) -> None:
    """Every ``$tensor`` / ``$pickled`` leaf of the tree names an entry of the table."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if len(node) == 1:
                ((tag, payload),) = node.items()
                if tag in ("$tensor", "$pickled"):
                    _int(payload, where, f"tree {tag}", 0, ntensors - 1)
                    continue
            stack.extend(node.values())
