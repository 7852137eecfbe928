"""The safetensors on-disk format, parsed by hand so tensors can be memory-mapped.

Why not ``safetensors.safe_open``: its ``get_tensor`` copies every tensor into
anonymous memory. Mapping the file and viewing the bytes with
``torch.frombuffer`` keeps input tensors in the page cache (file-backed RSS),
which is what keeps a streamed merge's RssAnon independent of model size.

Layout: 8-byte little-endian header length N, N bytes of JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``),
then the data block; offsets are relative to the data block.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from trainkit.errors import InputError

__all__ = [
    "DTYPE_TO_TORCH",
    "SafetensorsError",
    "TORCH_TO_DTYPE",
    "TensorMeta",
    "check_header",
    "read_header",
    "encode_header",
]

DTYPE_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_TO_TORCH.items()}


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Shape and dtype of one stored tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class SafetensorsError(InputError):
    """A file that is not a well-formed safetensors file."""


_MAX_HEADER = 100_000_000


def read_header(path: str | Path) -> tuple[int, dict]:
    """Return (offset of the data block, parsed JSON header) of a safetensors file.

    The header is validated before anything trusts it (:func:`check_header`): every
    entry's dtype, shape and ``data_offsets`` must describe bytes inside the file, one
    tensor's bytes not overlapping another's. A bad file raises :class:`SafetensorsError`.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise SafetensorsError(f"{path}: not a safetensors file (header length {n} but the "
                                   f"file has {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as exc:
            raise SafetensorsError(f"{path}: safetensors header is not JSON ({exc})") from None
    check_header(path, header, size - 8 - n)
    return 8 + n, header


def check_header(path: str | Path, header: object, data_bytes: int) -> None:
    """Raise :class:`SafetensorsError` unless ``header`` describes ``data_bytes`` bytes of
    tensors: known dtypes, shapes of non-negative integers, offsets inside the data block
    that match each tensor's size and do not overlap."""
    def bad(problem: str) -> SafetensorsError:
        return SafetensorsError(f"{path}: bad safetensors header: {problem}")

    if not isinstance(header, dict):
        raise bad("not a JSON object")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise bad("__metadata__ is not an object of strings")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise bad(f"tensor {name!r} is not an object")
        dtype = DTYPE_TO_TORCH.get(info.get("dtype")) if isinstance(info.get("dtype"), str) \
            else None
        if dtype is None:
            raise bad(f"tensor {name!r} has {'no' if 'dtype' not in info else 'an unsupported'} "
                      f"dtype{'' if 'dtype' not in info else ' ' + repr(info['dtype'])[:40]}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise bad(f"tensor {name!r} has a bad shape {str(shape)[:60]}")
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise bad(f"tensor {name!r} has bad data_offsets {str(offsets)[:60]}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes:
            raise bad(f"tensor {name!r} data_offsets {offsets} are outside the data block "
                      f"({data_bytes} bytes)")
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize:
            raise bad(f"tensor {name!r} data_offsets {offsets} hold {end - begin} bytes, but "
                      f"shape {shape} of {info['dtype']} needs {numel * dtype.itemsize}")
        if end > begin:
            spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise bad(f"tensors {a!r} and {b!r} overlap")


def encode_header(entries: dict[str, dict], metadata: dict[str, str] | None = None) -> bytes:
    """Encode a header, padded with spaces so the data block starts 8-byte aligned."""
    obj: dict = {}
    if metadata:
        obj["__metadata__"] = metadata
    obj.update(entries)
    body = json.dumps(obj, separators=(",", ":")).encode()
    body += b" " * ((-len(body)) % 8)
    return struct.pack("<Q", len(body)) + body
