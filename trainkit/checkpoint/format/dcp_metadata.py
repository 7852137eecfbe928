"""DCP's ``Metadata`` as JSON, so reading a DCP-written step never runs pickle.

``torch.distributed.checkpoint`` pickles its ``Metadata`` into ``.metadata``. It is a
tree of small dataclasses (tensor properties, sizes, chunk offsets, the planner's key
mapping, the storage layer's locations), so it encodes to JSON losslessly:

* ``state_dict_metadata``: ``{fqn: {"tensor": {dtype, size, chunks, ...}} | {"bytes": {}}}``;
* ``planner_data``: the default planner's ``{fqn: key path}`` mapping, through
  :mod:`~trainkit.checkpoint.format.codec` (tuples and ints survive); a custom planner's data
  that the codec cannot express is kept as a base64 pickle under ``"$pickle"`` and is
  only unpickled when the reader allows pickle;
* ``storage_data``: a list of ``[fqn, offset or null, location]``, the location being
  ZarrWriter's ``{"rank": r, "entry": i}`` (the item's index in that rank's table);
* ``storage_meta`` and ``version`` as plain fields.
"""

from __future__ import annotations

import base64
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from trainkit.checkpoint.format import codec
from trainkit.checkpoint.errors import PickleRefusedError

__all__ = ["encode_metadata", "decode_metadata", "Location"]

# Where a DCP item lives in a trainkit step: (rank, index in that rank's tensor table).
Location = tuple[int, int]

_FORMATS = {torch.contiguous_format: "contiguous_format", torch.channels_last: "channels_last",
            torch.preserve_format: "preserve_format"}


def _no_tensors(path: codec.KeyPath, t: torch.Tensor) -> int:
    raise TypeError(f"a tensor in DCP planner data at {codec.format_key_path(path)}")


def _encode_props(p: TensorProperties) -> dict:
    return {"dtype": str(p.dtype).removeprefix("torch."),
            "layout": str(p.layout).removeprefix("torch."),
            "requires_grad": bool(p.requires_grad),
            "memory_format": _FORMATS.get(p.memory_format, "contiguous_format"),
            "pin_memory": bool(p.pin_memory)}


def _torch_attr(name: Any, kind: type) -> Any:
    """``torch.<name>`` only when it is a ``kind`` (a dtype, layout, memory format):
    never any other attribute of torch, whatever the file says."""
    value = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(value, kind):
        raise ValueError(f"{name!r:.40} is not a torch {kind.__name__}")
    return value


def _size(values: Any) -> torch.Size:
    if not isinstance(values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62 for v in values):
        raise ValueError(f"size {values!r:.60} is not a list of non-negative integers")
    return torch.Size(values)


def _decode_props(d: dict) -> TensorProperties:
    return TensorProperties(dtype=_torch_attr(d["dtype"], torch.dtype),
                            layout=_torch_attr(d["layout"], torch.layout),
                            requires_grad=d["requires_grad"],
                            memory_format=_torch_attr(d["memory_format"], torch.memory_format),
                            pin_memory=d["pin_memory"])


def encode_metadata(md: Metadata, locations: dict[MetadataIndex, Location]) -> dict:
    """The JSON document for ``md``, with ``locations`` as its storage data."""
    items: dict[str, Any] = {}
    for fqn, sm in md.state_dict_metadata.items():
        if isinstance(sm, BytesStorageMetadata):
            items[fqn] = {"bytes": {}}
        elif isinstance(sm, TensorStorageMetadata):
            items[fqn] = {"tensor": {
                "properties": _encode_props(sm.properties), "size": list(sm.size),
                "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)}
                           for c in sm.chunks]}}
        else:
            raise TypeError(f"DCP metadata of {fqn!r} has an unknown type "
                            f"{type(sm).__qualname__}")
    try:
        planner = codec.encode(md.planner_data, _no_tensors)
    except TypeError:
        planner = {"$pickle": base64.b64encode(pickle.dumps(md.planner_data)).decode("ascii")}
    sm = md.storage_meta
    return {
        "version": md.version,
        "state_dict_metadata": items,
        "planner_data": planner,
        "storage_data": [[idx.fqn, None if idx.offset is None else list(idx.offset), rank, entry]
                         for idx, (rank, entry) in locations.items()],
        "storage_meta": None if sm is None else {
            "checkpoint_id": None if sm.checkpoint_id is None else str(sm.checkpoint_id),
            "save_id": sm.save_id, "load_id": sm.load_id, "modules": list(sm.modules)},
    }


def decode_metadata(doc: dict, *, allow_pickle: bool = False) -> Metadata:
    """Rebuild the ``Metadata`` of :func:`encode_metadata`; storage data maps each
    ``MetadataIndex`` to its :data:`Location`."""
    items: dict[str, Any] = {}
    for fqn, d in doc["state_dict_metadata"].items():
        if "bytes" in d:
            items[fqn] = BytesStorageMetadata()
            continue
        t = d["tensor"]
        items[fqn] = TensorStorageMetadata(
            properties=_decode_props(t["properties"]), size=_size(t["size"]),
            chunks=[ChunkStorageMetadata(offsets=_size(c["offsets"]),
                                         sizes=_size(c["sizes"])) for c in t["chunks"]])
        size = items[fqn].size
        for c in items[fqn].chunks:
            if len(c.offsets) != len(size) or len(c.sizes) != len(size) or any(
                    o + n > d for o, n, d in zip(c.offsets, c.sizes, size)):
                raise ValueError(f"{fqn}: chunk {list(c.offsets)}+{list(c.sizes)} lies outside "
                                 f"its tensor {list(size)}")
    planner = doc.get("planner_data")
    if isinstance(planner, dict) and set(planner) == {"$pickle"}:
        if not allow_pickle:
            raise PickleRefusedError("the DCP planner data of this step is pickled (a custom "
                                     "planner); pass allow_pickle=True to read it")
        planner = pickle.loads(base64.b64decode(planner["$pickle"]))
    else:
        planner = codec.decode(planner, lambda i: _no_tensors((), None))  # type: ignore[arg-type]
    storage = {MetadataIndex(fqn, offset): (rank, entry)
               for fqn, offset, rank, entry in doc["storage_data"]}
    sm = doc.get("storage_meta")
    meta = None if sm is None else StorageMeta(checkpoint_id=sm["checkpoint_id"],
                                               save_id=sm["save_id"], load_id=sm["load_id"],
                                               modules=list(sm["modules"]))
    return Metadata(state_dict_metadata=items, planner_data=planner, storage_data=storage,
                    storage_meta=meta, version=doc.get("version"))
