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
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "DTYPE_TO_TORCH",
    "TORCH_TO_DTYPE",
    "TensorMeta",
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


def read_header(path: str | Path) -> tuple[int, dict]:
    """Return (offset of the data block, parsed JSON header) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    return 8 + n, header


def encode_header(entries: dict[str, dict], metadata: dict[str, str] | None = None) -> bytes:
    """Encode a header, padded with spaces so the data block starts 8-byte aligned."""
    obj: dict = {}
    if metadata:
        obj["__metadata__"] = metadata
    obj.update(entries)
    body = json.dumps(obj, separators=(",", ":")).encode()
    body += b" " * ((-len(body)) % 8)
    return struct.pack("<Q", len(body)) + body
