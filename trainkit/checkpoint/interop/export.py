"""``trainkit ckpt export``: the model part of a step as safetensors, for HF tooling.

The tensors under a key prefix (default ``model.``, the key a training loop usually
saves its ``model.state_dict()`` under) are written with the prefix stripped, through
:mod:`trainkit.io`'s sharded writer, so ``transformers``, ``safetensors`` and
``trainkit merge`` read the result directly:

* ``--to DIR`` (or ``--to DIR/model.safetensors``): the Hugging Face layout,
  ``model.safetensors``, or ``model-00001-of-0000N.safetensors`` ... plus
  ``model.safetensors.index.json`` when the model exceeds one shard;
* ``--to NAME.safetensors``: one file, or ``NAME-0000i-of-0000N.safetensors`` plus
  ``NAME.safetensors.index.json`` when it does not fit one shard.

What is read comes from the read face, :mod:`~trainkit.checkpoint.tensors`: only the
tensors under the prefix (never the optimizer state), one tensor at a time for a step
written through DCP, the prefix's tensors together for a step saved by the
Checkpointer.

Loadable by ``from_pretrained``: ``hf_config=DIR`` (``--hf-config``) copies
``config.json``, ``generation_config.json`` and the tokenizer files of a Hugging Face
directory next to the weights. Tied weights: when ``lm_head.weight`` is the
embedding (the same storage in the checkpoint, or ``tie_word_embeddings`` in the
given config), it is written once, under the embedding's name, as
``save_pretrained`` does, so the export merges with HF-saved fine-tunes.

Atomic: everything is written and fsynced in a hidden staging directory beside the
target, then renamed into place, the index last, so a reader never sees a partial
export. Existing files are not replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from trainkit.checkpoint import reader
from trainkit.checkpoint.errors import CheckpointError
from trainkit.checkpoint.tensors import Source, step_names, step_tensors
from trainkit.checkpoint.tiers import Tier
from trainkit.checkpoint.tiers.local import fsync_dir, fsync_file
from trainkit.io import DEFAULT_SHARD_BYTES, ShardedWriter, plan_shards
from trainkit.io.safetensors_format import TORCH_TO_DTYPE

__all__ = ["export_safetensors", "select_tensors", "output_names", "tied_head", "HF_FILES"]

INDEX_SUFFIX = ".safetensors.index.json"
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
            "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja")
"""What ``--hf-config DIR`` copies (those present; config.json is required)."""
HEAD = "lm_head.weight"
EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight", "wte.weight",
              "model.decoder.embed_tokens.weight", "gpt_neox.embed_in.weight", "shared.weight",
              "transformer.word_embeddings.weight")


def _hf_config(directory: str | os.PathLike | None) -> tuple[list[Path], bool]:
    """(files to copy, tie_word_embeddings) of an HF directory; config.json must be there."""
    if directory is None:
        return [], False
    d = Path(directory)
    config = d / "config.json"
    if not config.is_file():
        raise CheckpointError(f"--hf-config {d}: no config.json there (give the Hugging Face model directory)")
    try:
        tied = json.loads(config.read_text()).get("tie_word_embeddings") is True
    except (ValueError, AttributeError) as exc:
        raise CheckpointError(f"{config}: not a JSON object ({exc})") from None
    return [d / n for n in HF_FILES if (d / n).is_file()], tied


def tied_head(tensors: Source, tied_by_config: bool) -> str | None:
    """The embedding name ``lm_head.weight`` is tied to, or None.

    Tied when the checkpoint holds both as one storage, or when the config says so
    (then the values must be equal: writing one would otherwise lose the other).
    """
    if HEAD not in tensors:
        return None
    head_meta, head_get = tensors[HEAD]
    for name in EMBEDDINGS:
        if name not in tensors or tensors[name][0].shape != head_meta.shape:
            continue
        head, emb = head_get(), tensors[name][1]()
        same = (head.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr()
                and head.storage_offset() == emb.storage_offset() and head.stride() == emb.stride())
        if same:
            return name
        if tied_by_config:
            if not torch.equal(head, emb):
                raise CheckpointError(f"the config says tie_word_embeddings, but {HEAD} differs from {name} "
                                      "in this checkpoint; export without --hf-config or fix the config")
            return name
    return None


def select_tensors(source: Source, prefix: str, tier: Tier | None = None,
                   step: int | None = None) -> Source:
    """Tensors whose dotted name starts with ``prefix``, renamed without it. When none
    does, the error lists the step's top-level keys that hold tensors (from metadata)."""
    chosen = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
    if not chosen or "" in chosen:
        names = source if tier is None or step is None else step_names(tier, step)
        tops = sorted({k.split(".")[0] for k in names})
        raise CheckpointError(f"no tensors under the prefix {prefix!r} (tensor names are "
                              f"dotted key paths; top-level keys with tensors: "
                              f"{tops[:20] or 'none'}); pass --prefix")
    bad = sorted(k for k, (meta, _) in chosen.items() if meta.dtype not in TORCH_TO_DTYPE)
    if bad:
        raise CheckpointError(f"safetensors cannot hold the dtype of {bad[:5]} "
                              f"({chosen[bad[0]][0].dtype})")
    return chosen


def output_names(to: str | os.PathLike, nshards: int) -> tuple[Path, list[str], str | None]:
    """(directory, shard file names, index file name or None) for ``--to``."""
    to = Path(to)
    if to.name.endswith(".safetensors"):
        directory, stem = to.parent, to.name[:-len(".safetensors")]
    else:
        directory, stem = to, "model"
    if not stem:
        raise CheckpointError(f"{to}: the output file needs a name before .safetensors")
    if nshards == 1:
        return directory, [f"{stem}.safetensors"], None
    names = [f"{stem}-{i + 1:05d}-of-{nshards:05d}.safetensors" for i in range(nshards)]
    return directory, names, f"{stem}{INDEX_SUFFIX}"


def export_safetensors(where: Tier | str, step: int, to: str | os.PathLike, *,
                       prefix: str = "model.", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                       overwrite: bool = False,
                       on_bytes: Callable[[int], None] | None = None,
                       on_total: Callable[[int], None] | None = None,
                       hf_config: str | os.PathLike | None = None) -> list[Path]:
    """Export the tensors under ``prefix`` of committed ``step``; returns the files made.

    ``on_total(n)`` is told the bytes to write once known, ``on_bytes(n)`` as they go.
    ``hf_config`` is a Hugging Face directory whose config, generation config and
    tokenizer files are copied beside the weights. A tied ``lm_head.weight`` is not
    written (see the module docstring).

    Raises :class:`CheckpointError` for a missing step, an empty prefix match, a dtype
    safetensors cannot store, or existing output files (without ``overwrite``).
    """
    if max_shard_bytes <= 0:
        raise CheckpointError(f"the maximum shard size must be positive, got {max_shard_bytes}")
    tier = reader.as_tier(where)
    tensors = select_tensors(step_tensors(tier, step, prefix=prefix), prefix, tier, step)
    extra, tied_by_config = _hf_config(hf_config)
    if tied_head(tensors, tied_by_config) is not None:
        del tensors[HEAD]  # written once, under the embedding's name, as save_pretrained does
    plan = plan_shards({k: meta for k, (meta, _) in tensors.items()}, max_shard_bytes)
    if on_total is not None:
        on_total(plan.total_size)
    directory, names, index_name = output_names(to, len(plan.shard_names))
    finals = ([directory / n for n in names] + ([directory / index_name] if index_name else [])
              + [directory / p.name for p in extra])
    existing = [str(p) for p in finals if p.exists()]
    if existing and not overwrite:
        raise CheckpointError(f"{existing[0]} exists; remove it or pass --overwrite")
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    stage = directory / f".trainkit-export-{os.getpid()}-{step}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        with ShardedWriter(stage, plan) as writer:
            for name, (meta, produce) in tensors.items():
                writer.write(name, produce())
                if on_bytes is not None:
                    on_bytes(meta.nbytes)
        renamed = dict(zip(plan.shard_names, names))
        for old in plan.shard_names:
            fsync_file(stage / old)
        if index_name:
            index = {"metadata": {"total_size": plan.total_size,
                                  "trainkit": {"source": tier.url, "step": step,
                                               "prefix": prefix}},
                     "weight_map": {k: renamed[s] for k, (s, _) in plan.placement.items()}}
            (stage / index_name).write_text(json.dumps(index, indent=2))
            fsync_file(stage / index_name)
        for p in extra:
            shutil.copyfile(p, stage / p.name)
            fsync_file(stage / p.name)
        for p in extra:                          # config and tokenizer, then shards, the index last
            os.replace(stage / p.name, directory / p.name)
        for old in plan.shard_names:
            os.replace(stage / old, directory / renamed[old])
        if index_name:
            os.replace(stage / index_name, directory / index_name)
        fsync_dir(str(directory))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return finals
