"""Typed, pickle-free encoding of the non-tensor part of a checkpoint.

Why not pickle: loading a pickle executes code, and a checkpoint directory is often
shared. Why not plain JSON: it turns tuples into lists and int dict keys into strings,
and an optimizer ``state_dict()`` relies on both (``state`` is keyed by int, ``betas``
is a tuple). Numpy's PCG64 state also holds 128-bit integers.

The encoding is JSON with a few tagged objects, each a one-key dict whose key starts
with ``$``:

==================  =====================================================
Python value        encoded as
==================  =====================================================
None, bool, str     themselves
int                 itself if it fits in 53 bits, else ``{"$int": "<decimal>"}``
float               itself, or ``{"$float": "nan" | "inf" | "-inf"}``
bytes               ``{"$bytes": "<base64>"}``
list                a list of encoded items
tuple               ``{"$tuple": [...]}``
set / frozenset     ``{"$set": [...]}`` / ``{"$frozenset": [...]}``
dict                a JSON object when every key is a str not starting with ``$``,
                    else ``{"$dict": [[key, value], ...]}``
tensor              ``{"$tensor": <index into the rank's tensor table>}``
numpy array         ``{"$ndarray": {"dtype": "<f4", "shape": [...], "data": "<base64>"}}``
numpy scalar        ``{"$npscalar": {"dtype": ..., "data": ...}}``
torch.dtype         ``{"$dtype": "bfloat16"}``
torch.Size          ``{"$size": [...]}``
torch.device        ``{"$device": "cpu"}``
pickled bytes       ``{"$pickled": <index into the rank's tensor table>}``: an opaque
                    ``torch.save`` blob written through DCP (never by ``encode``);
                    decoding it needs the caller's explicit consent (``pickled=``)
==================  =====================================================

Anything else raises ``TypeError`` naming its key path, at ``save()`` time.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from trainkit.checkpoint.errors import CorruptCheckpointError

__all__ = ["encode", "decode", "format_key_path", "TableRef", "MalformedValueError"]

_SAFE_INT = 2**53

KeyPath = tuple[Any, ...]


def format_key_path(path: KeyPath) -> str:
    """``('optim', 'state', 0, 'exp_avg')`` -> ``state['optim']['state'][0]['exp_avg']``."""
    return "state" + "".join(f"[{k!r}]" for k in path)


class TableRef:
    """A leaf that is already an entry of the rank's tensor table: ``encode`` writes it
    as ``{"$tensor": entry}``, or ``{"$pickled": entry}`` for an opaque pickled blob.

    For writers that build the tensor table themselves (DCP's ZarrWriter, import-dcp)
    and need the tree in the same tagged form as the engine's."""

    __slots__ = ("entry", "pickled")

    def __init__(self, entry: int, *, pickled: bool = False) -> None:
        self.entry, self.pickled = entry, pickled


def encode(obj: Any, on_tensor: Callable[[KeyPath, torch.Tensor], int],
           path: KeyPath = ()) -> Any:
    """Encode ``obj`` into JSON-compatible data; tensors go to ``on_tensor``.

    ``on_tensor(path, tensor)`` returns the index the tensor gets in the rank's table.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        if isinstance(obj, np.integer):
            return _encode_np_scalar(obj)
        return obj if -_SAFE_INT < obj < _SAFE_INT else {"$int": str(int(obj))}
    if isinstance(obj, float):
        if isinstance(obj, np.floating):
            return _encode_np_scalar(obj)
        if math.isfinite(obj):
            return obj
        return {"$float": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if isinstance(obj, torch.Tensor):
        return {"$tensor": on_tensor(path, obj)}
    if isinstance(obj, TableRef):
        return {"$pickled" if obj.pickled else "$tensor": obj.entry}
    if isinstance(obj, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, torch.Size):
        return {"$size": [int(d) for d in obj]}
    if isinstance(obj, tuple):
        return {"$tuple": [encode(v, on_tensor, path + (i,)) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, on_tensor, path + (i,)) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        return _encode_dict(obj, on_tensor, path)
    if isinstance(obj, (set, frozenset)):
        tag = "$set" if isinstance(obj, set) else "$frozenset"
        return {tag: [encode(v, on_tensor, path + ("<set item>",)) for v in obj]}
    if isinstance(obj, np.ndarray):
        return {"$ndarray": _encode_ndarray(obj, path)}
    if isinstance(obj, np.generic):
        return _encode_np_scalar(obj)
    if isinstance(obj, torch.dtype):
        return {"$dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {"$device": str(obj)}
    raise TypeError(f"cannot store a value of type {type(obj).__module__}.{type(obj).__qualname__} "
                    f"at {format_key_path(path)}: checkpoints hold tensors, numpy arrays and "
                    f"plain Python values (int, float, str, bytes, bool, None, list, tuple, dict, "
                    f"set); convert it, e.g. with its state_dict()")


def _encode_dict(obj: dict, on_tensor: Callable[[KeyPath, torch.Tensor], int],
                 path: KeyPath) -> Any:
    if all(isinstance(k, str) and not k.startswith("$") for k in obj):
        return {k: encode(v, on_tensor, path + (k,)) for k, v in obj.items()}
    items = []
    for k, v in obj.items():
        if isinstance(k, torch.Tensor):
            raise TypeError(f"cannot store a tensor as a dict key at {format_key_path(path)}")
        items.append([encode(k, on_tensor, path + ("<key>",)), encode(v, on_tensor, path + (k,))])
    return {"$dict": items}


def _encode_ndarray(arr: np.ndarray, path: KeyPath) -> dict:
    if arr.dtype.hasobject or arr.dtype.fields is not None:
        raise TypeError(f"cannot store a numpy array of dtype {arr.dtype} at "
                        f"{format_key_path(path)}: object and structured dtypes need pickle")
    data = np.ascontiguousarray(arr).tobytes()
    return {"dtype": arr.dtype.str, "shape": list(arr.shape),
            "data": base64.b64encode(data).decode("ascii")}


def _encode_np_scalar(value: np.generic) -> dict:
    arr = np.asarray(value)
    return {"$npscalar": {"dtype": arr.dtype.str,
                          "data": base64.b64encode(arr.tobytes()).decode("ascii")}}


def decode(data: Any, tensors: Callable[[int], torch.Tensor],
           pickled: Callable[[int], Any] | None = None) -> Any:
    """Invert :func:`encode`; ``tensors(i)`` returns the tensor stored at index ``i``.

    ``pickled(i)`` turns the opaque pickled blob at index ``i`` into a value (or refuses
    it); without it a pickled value raises, so no decoder unpickles by accident.

    The data comes from a file: anything malformed in it (a bad tag payload, a ``$dtype``
    that is no torch dtype, a table index out of range, nesting deep enough to exhaust
    the stack) raises :class:`~trainkit.checkpoint.errors.CorruptCheckpointError`, which
    is also a ``ValueError``. Errors of the callbacks themselves (a refused pickle) pass.
    """
    try:
        return _decode(data, tensors, pickled)
    except RecursionError:
        raise MalformedValueError("checkpoint value nested too deeply") from None
    except MalformedValueError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, MemoryError) as exc:
        raise MalformedValueError(f"malformed checkpoint value: {type(exc).__name__}: "
                                  f"{exc}"[:300]) from None


class MalformedValueError(CorruptCheckpointError, ValueError):
    """A value in a checkpoint's tree that :func:`decode` cannot have written."""


def _index(payload: Any, tag: str) -> int:
    if isinstance(payload, bool) or not isinstance(payload, int) or payload < 0:
        raise MalformedValueError(f"{tag} needs a table index >= 0, got {payload!r:.40}")
    return payload


def _decode(data: Any, tensors: Callable[[int], torch.Tensor],
            pickled: Callable[[int], Any] | None = None) -> Any:
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [_decode(v, tensors, pickled) for v in data]
    if not isinstance(data, dict):
        raise ValueError(f"malformed checkpoint value: {data!r:.80}")
    if len(data) == 1:
        ((tag, payload),) = data.items()
        if tag.startswith("$"):
            return _decode_tagged(tag, payload, tensors, pickled)
    return {k: _decode(v, tensors, pickled) for k, v in data.items()}


def _decode_tagged(tag: str, payload: Any, tensors: Callable[[int], torch.Tensor],
                   pickled: Callable[[int], Any] | None) -> Any:
    if tag == "$tensor":
        return tensors(_index(payload, tag))
    if tag == "$pickled":
        if pickled is None:
            raise ValueError(f"pickled value (tensor table entry {payload}) in the checkpoint "
                             f"and no consent to unpickle it")
        return pickled(_index(payload, tag))
    if tag == "$int":
        return int(payload)
    if tag == "$float":
        return float(payload)
    if tag == "$bytes":
        return base64.b64decode(payload)
    if tag == "$tuple":
        return tuple(_decode(v, tensors, pickled) for v in payload)
    if tag == "$set":
        return {_decode(v, tensors, pickled) for v in payload}
    if tag == "$frozenset":
        return frozenset(_decode(v, tensors, pickled) for v in payload)
    if tag == "$dict":
        return {_decode(k, tensors, pickled): _decode(v, tensors, pickled) for k, v in payload}
    if tag == "$ndarray":
        raw = base64.b64decode(payload["data"], validate=True)
        return np.frombuffer(raw, dtype=_np_dtype(payload["dtype"])).reshape(
            payload["shape"]).copy()
    if tag == "$npscalar":
        raw = base64.b64decode(payload["data"], validate=True)
        return np.frombuffer(raw, dtype=_np_dtype(payload["dtype"]))[0]
    if tag == "$dtype":
        value = getattr(torch, payload, None) if isinstance(payload, str) else None
        if not isinstance(value, torch.dtype):      # never any other attribute of torch
            raise MalformedValueError(f"$dtype {payload!r:.40} is not a torch dtype")
        return value
    if tag == "$size":
        return torch.Size(payload)
    if tag == "$device":
        try:
            return torch.device(payload)
        except RuntimeError as exc:         # torch's own parse error for a bad string
            raise MalformedValueError(f"$device {payload!r:.40}: {exc}") from None
    raise ValueError(f"unknown tag {tag!r} in checkpoint metadata (written by a newer trainkit?)")


def _np_dtype(spec: Any) -> np.dtype:
    """A plain numpy dtype from a string (``"<f4"``): no object or structured dtypes,
    whose decoding would need pickle."""
    if not isinstance(spec, str):
        raise MalformedValueError(f"numpy dtype {spec!r:.40} is not a string")
    dtype = np.dtype(spec)
    if dtype.hasobject or dtype.fields is not None:
        raise MalformedValueError(f"numpy dtype {spec!r:.40} needs pickle")
    return dtype
