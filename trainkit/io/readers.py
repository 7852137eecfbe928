"""Lazy tensor readers: every input kind yields tensors by name, one at a time.

All readers implement :class:`TensorReader`. ``keys()`` and ``meta()`` come from
headers only (no tensor data is read), so a merge can validate its inputs and
plan its output before touching a byte. ``get()`` returns a tensor backed by a
memory map where the format allows it (safetensors, ``torch.load(mmap=True)``),
so input pages stay file-backed and do not count as anonymous memory.

Readers are safe to call from several threads at once: ``get()`` only creates
views of read-only maps. Tensors returned by ``get()`` must not be modified.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from trainkit.errors import InputError
from trainkit.io.safetensors_format import DTYPE_TO_TORCH, TensorMeta, read_header

__all__ = [
    "TensorReader",
    "SafetensorsReader",
    "ShardedSafetensorsReader",
    "TorchFileReader",
    "DictReader",
    "InputSpec",
    "parse_input_spec",
    "open_reader",
    "flatten_state",
]


@runtime_checkable
class TensorReader(Protocol):
    """A named collection of tensors read lazily.

    Call order: ``keys()``/``meta()`` any time; ``get(name)`` from any thread;
    ``files()`` lists the bytes that define the input (used for content hashes).
    """

    description: str

    def keys(self) -> list[str]: ...

    def meta(self, name: str) -> TensorMeta: ...

    def get(self, name: str) -> torch.Tensor: ...

    def files(self) -> list[Path]: ...


class SafetensorsReader:
    """One ``.safetensors`` file, memory-mapped (copy-on-write, never written)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.description = str(self.path)
        self._data_offset, header = read_header(self.path)
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, tuple[TensorMeta, int, int]] = {}
        for name, info in header.items():    # validated by read_header
            begin, end = info["data_offsets"]
            self._entries[name] = (TensorMeta(tuple(info["shape"]), DTYPE_TO_TORCH[info["dtype"]]),
                                   begin, end)
        self._map: mmap.mmap | None = None

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "rb") as f:
                # ACCESS_COPY gives a writable buffer (torch.frombuffer wants one)
                # whose pages stay file-backed as long as nobody writes them.
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._map

    def keys(self) -> list[str]:
        return list(self._entries)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading a tensor's bytes now (async readahead)."""
        _, begin, end = self._entries[name]
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, self._data_offset + begin, end - begin, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError):  # advisory only; not on every platform
            pass

    def meta(self, name: str) -> TensorMeta:
        return self._entries[name][0]

    def get(self, name: str) -> torch.Tensor:
        meta, begin, end = self._entries[name]
        if meta.numel == 0:
            return torch.empty(meta.shape, dtype=meta.dtype)
        offset = self._data_offset + begin
        if offset % meta.dtype.itemsize:
            # Misaligned data (hand-made files): copy instead of viewing.
            raw = bytearray(self._mapped()[offset : self._data_offset + end])
            return torch.frombuffer(raw, dtype=meta.dtype).reshape(meta.shape)
        t = torch.frombuffer(self._mapped(), dtype=meta.dtype, count=meta.numel, offset=offset)
        return t.reshape(meta.shape)

    def files(self) -> list[Path]:
        return [self.path]


class ShardedSafetensorsReader:
    """A Hugging Face directory: ``model.safetensors`` or shards plus an index."""

    INDEX = "model.safetensors.index.json"
    SINGLE = "model.safetensors"

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.description = str(self.directory)
        index = self.directory / self.INDEX
        if index.exists():
            weight_map = _weight_map(index)
            shard_names = sorted(set(weight_map.values()))
        elif (self.directory / self.SINGLE).exists():
            shard_names = [self.SINGLE]
            weight_map = {}
        else:
            raise FileNotFoundError(
                f"{self.directory}: no {self.SINGLE} and no {self.INDEX} "
                f"(found: {sorted(p.name for p in self.directory.iterdir())[:20]})"
            )
        self._shards = {n: SafetensorsReader(self.directory / n) for n in shard_names}
        self._where: dict[str, SafetensorsReader] = {}
        for shard in self._shards.values():
            for key in shard.keys():
                self._where[key] = shard
        missing = sorted(k for k in weight_map if k not in self._where)
        if missing:
            raise ValueError(f"{index}: tensors listed but absent from their shards: {missing[:10]}")

    def keys(self) -> list[str]:
        return list(self._where)

    def meta(self, name: str) -> TensorMeta:
        return self._where[name].meta(name)

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get(name)

    def prefetch(self, name: str) -> None:
        self._where[name].prefetch(name)

    def files(self) -> list[Path]:
        return [s.path for s in self._shards.values()]


def _weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index: tensor name -> a shard file of the same directory."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise InputError(f"{index}: not a shard index with a weight_map "
                         f"({type(exc).__name__}: {exc})") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v and "/" not in v and "\\" not in v
            and v not in (".", "..") for k, v in weight_map.items()):
        raise InputError(f"{index}: weight_map must map tensor names to shard file names "
                         "in the same directory")
    return weight_map


def flatten_state(state: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (dotted name, tensor) for every tensor leaf of a nested mapping/list."""
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            yield name, value
        elif isinstance(value, Mapping):
            yield from flatten_state(value, name + ".")
        elif isinstance(value, (list, tuple)):
            yield from flatten_state({str(i): v for i, v in enumerate(value)}, name + ".")


class DictReader:
    """Tensors already in memory (the in-memory ``ties_merge`` path and tests)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], description: str = "<dict>"):
        self.description = description
        self._tensors = dict(tensors)
        bad = sorted(k for k, v in self._tensors.items() if not isinstance(v, torch.Tensor))
        if bad:
            raise TypeError(f"{description}: values that are not tensors: {bad[:10]}")

    def keys(self) -> list[str]:
        return list(self._tensors)

    def meta(self, name: str) -> TensorMeta:
        t = self._tensors[name]
        return TensorMeta(tuple(t.shape), t.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach()

    def files(self) -> list[Path]:
        return []


class TorchFileReader(DictReader):
    """A torch ``.pt``/``.bin`` state dict, loaded ``weights_only`` and memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            obj = _load_weights_only(self.path)
        except pickle.UnpicklingError:
            raise InputError(f"refused: {self.path} is not a weights-only torch file") from None
        except (RuntimeError, ValueError, EOFError, KeyError, TypeError, IndexError,
                RecursionError, AttributeError) as exc:
            detail = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise InputError(f"{self.path}: not a readable torch file ({detail})") from None
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise InputError(f"{self.path}: expected a state dict, found {type(obj).__name__}")
        super().__init__(dict(flatten_state(obj)), str(self.path))

    def files(self) -> list[Path]:
        return [self.path]


def _load_weights_only(path: Path) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped unless the file predates the zip format."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap can only be used" not in str(exc):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


class InputSpec:
    """A parsed input argument: a path, plus step and key prefix for checkpoints."""

    _CKPT = re.compile(r"^trainkit:(?P<path>.+?)(?:@(?P<step>\d+))?(?:#(?P<prefix>.*))?$")

    def __init__(self, path: Path, *, checkpoint: bool = False, step: int | None = None, prefix: str = "model."):
        self.path, self.checkpoint, self.step, self.prefix = path, checkpoint, step, prefix

    def __repr__(self) -> str:
        if self.checkpoint:
            return f"trainkit:{self.path}@{self.step}#{self.prefix}"
        return str(self.path)


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``PATH`` or ``trainkit:DIR[@STEP][#PREFIX]`` (a trainkit checkpoint)."""
    m = InputSpec._CKPT.match(text)
    if m:
        step = int(m["step"]) if m["step"] is not None else None
        prefix = m["prefix"] if m["prefix"] is not None else "model."
        return InputSpec(Path(m["path"]), checkpoint=True, step=step, prefix=prefix)
    return InputSpec(Path(text))


def open_reader(spec: str | Path | InputSpec) -> TensorReader:
    """Open a model file: HF directory, ``.safetensors``, ``.pt``/``.bin``.

    A ``trainkit:`` checkpoint input is not opened here: ``io`` knows nothing of
    checkpoints (it is the floor capabilities stand on). ``trainkit.merge`` opens those
    through :class:`trainkit.checkpoint.tensors.StepTensorReader`.
    """
    if not isinstance(spec, InputSpec):
        spec = parse_input_spec(str(spec))
    path = spec.path
    if spec.checkpoint:
        raise ValueError(f"{spec!r}: a trainkit checkpoint input; open it with "
                         f"trainkit.checkpoint.tensors.StepTensorReader (trainkit merge does)")
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_dir():
        if (path / ShardedSafetensorsReader.INDEX).exists() or (path / ShardedSafetensorsReader.SINGLE).exists():
            return ShardedSafetensorsReader(path)
        for name in ("pytorch_model.bin",):
            if (path / name).exists():
                return TorchFileReader(path / name)
        raise FileNotFoundError(
            f"{path}: not a model directory (no model.safetensors, model.safetensors.index.json "
            f"or pytorch_model.bin); for a trainkit checkpoint write trainkit:{path}@STEP#model."
        )
    if path.suffix == ".safetensors":
        return SafetensorsReader(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        return TorchFileReader(path)
    raise ValueError(f"{path}: unknown input kind (expected a directory, .safetensors, .pt or .bin)")
