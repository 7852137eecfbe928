"""Shared tensor IO: lazy readers for every model format and a sharded safetensors writer.

Used by ``trainkit.merge`` and by checkpoint export (``trainkit ckpt export``). The floor:
it imports no capability; ``trainkit:`` checkpoint inputs are opened by ``trainkit.merge``
through ``trainkit.checkpoint.tensors``.

Example::

    from trainkit.io import open_reader, plan_shards, ShardedWriter
    src = open_reader("path/to/hf_model")           # or x.safetensors, x.pt
    plan = plan_shards({k: src.meta(k) for k in src.keys()})
    with ShardedWriter("out", plan) as w:
        for k in src.keys():
            w.write(k, src.get(k))
"""

from trainkit.io.readers import (
    DictReader,
    InputSpec,
    SafetensorsReader,
    ShardedSafetensorsReader,
    TensorReader,
    TorchFileReader,
    flatten_state,
    open_reader,
    parse_input_spec,
)
from trainkit.io.safetensors_format import TensorMeta
from trainkit.io.writer import DEFAULT_SHARD_BYTES, ShardedWriter, ShardPlan, plan_shards

__all__ = [
    "DictReader",
    "InputSpec",
    "SafetensorsReader",
    "ShardedSafetensorsReader",
    "TensorReader",
    "TorchFileReader",
    "TensorMeta",
    "flatten_state",
    "open_reader",
    "parse_input_spec",
    "DEFAULT_SHARD_BYTES",
    "ShardedWriter",
    "ShardPlan",
    "plan_shards",
]
