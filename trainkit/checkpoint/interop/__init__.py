"""Interoperability with other tools: torch.distributed.checkpoint (``dcp``: ZarrWriter,
ZarrReader; ``dcp_import``), the streaming shard writer they share (``shard_stream``),
and export of a step to Hugging Face safetensors (``export``)."""
