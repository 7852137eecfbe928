"""Merging model files to a model directory: readers -> engine -> sharded writer.

Besides the weights it copies the base directory's other files (config.json,
tokenizer files, ...) and writes ``merge.json``: method, parameters, inputs with
SHA-256 content hashes, and the trainkit version, so a merge can be reproduced
and audited. Hashes are computed in a background thread during the merge.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch

from trainkit import __version__
from trainkit.errors import InputError
from trainkit.io import TensorMeta
from trainkit.io.readers import InputSpec, TensorReader, open_reader, parse_input_spec
from trainkit.io.writer import DEFAULT_SHARD_BYTES, ShardedWriter, plan_shards
from trainkit.merge.engine import MergeStats, run_merge
from trainkit.merge.mergekit_ops import planned_dtype
from trainkit.merge.methods import MergeConfig
from trainkit.merge.plan import plan_merge
from trainkit.merge.tied import untie_inputs

__all__ = ["check_output", "merge_files", "open_input", "sha256_file", "WEIGHT_SUFFIXES"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def open_input(spec: str | Path | InputSpec) -> TensorReader:
    """A merge input: a model file through :func:`trainkit.io.open_reader`, or a
    ``trainkit:DIR[@STEP][#PREFIX]`` checkpoint through the checkpoint's read face,
    which reads only the tensors under the prefix (never the optimizer state)."""
    if not isinstance(spec, InputSpec):
        spec = parse_input_spec(str(spec))
    if spec.checkpoint:
        from trainkit.checkpoint.tensors import StepTensorReader   # torch-heavy: on use

        return StepTensorReader(str(spec.path), spec.step, spec.prefix)
    return open_reader(spec)


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


class _Hasher(threading.Thread):
    """Hashes every input file while the merge runs."""

    def __init__(self, readers: list[TensorReader]):
        super().__init__(daemon=True, name="trainkit-merge-hash")
        self.files = sorted({p for r in readers for p in r.files()})
        self.result: dict[Path, str] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for p in self.files:
                self.result[p] = sha256_file(p)
        except BaseException as exc:  # reported by the caller
            self.error = exc


def _copy_side_files(base: InputSpec, out: Path) -> list[str]:
    if base.checkpoint or not base.path.is_dir():
        return []
    copied = []
    for p in sorted(base.path.iterdir()):
        if p.is_file() and p.suffix not in WEIGHT_SUFFIXES and p.name not in WEIGHT_INDEXES and p.name != "merge.json":
            shutil.copy2(p, out / p.name)
            copied.append(p.name)
    return copied


def _set_config_dtype(path: Path, cfg: MergeConfig) -> None:
    """Under compat with ``out_dtype`` or ``dtype``, the copied config names the written dtype,
    as mergekit's does (else ``from_pretrained`` would load the weights as the base's dtype)."""
    name = cfg.out_dtype or cfg.dtype
    if cfg.compat != "mergekit" or name is None:
        return
    try:
        config = json.loads(path.read_text())
    except ValueError:
        return  # not JSON: copied as it was
    if not isinstance(config, dict):
        return
    config["torch_dtype"] = name
    if "dtype" in config:
        config["dtype"] = name
    path.write_text(json.dumps(config, indent=2) + "\n")


def merge_files(
    base: str | Path,
    models: list[str | Path],
    out: str | Path,
    cfg: MergeConfig,
    *,
    threads: int = 1,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
    command: str | None = None,
    device: str = "cpu",
) -> dict:
    """Merge model files into ``out`` (sharded safetensors + index + merge.json).

    ``device="cuda"`` streams each tensor's operands to the GPU and the result back.

    The output is written into a staging directory beside ``out`` and moved into place
    only when complete, so a merge that fails half-way (a non-finite value found in the
    merge pass, a full disk) leaves no partial model behind. Returns the ``merge.json``
    record.
    """
    final = Path(out)
    check_output(final, [base, *models])
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        record = _merge_into(base, models, stage, cfg, threads=threads, shard_bytes=shard_bytes,
                             progress=progress, command=command, device=device)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _publish(stage, final)
    return record


def check_output(out: Path, inputs: list[str | Path]) -> None:
    """Refuse an output that is an existing file, or that is or contains an input: an
    ``--overwrite`` would replace the input (and delete its weights) when published."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory")
    target = out.resolve()
    for text in inputs:
        path = parse_input_spec(str(text)).path.resolve()
        if path == target or target in path.parents:
            raise InputError(f"refused: output {out} {'is' if path == target else 'contains'} "
                             f"the input {text}; write the merge somewhere else")


def _publish(stage: Path, final: Path) -> None:
    """Move a finished output into place; an existing (``--overwrite``) one is replaced."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(stage, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _merge_into(
    base: str | Path,
    models: list[str | Path],
    out: Path,
    cfg: MergeConfig,
    *,
    threads: int,
    shard_bytes: int,
    progress: bool,
    command: str | None,
    device: str = "cpu",
) -> dict:
    out = Path(out)
    base_spec = parse_input_spec(str(base))
    model_specs = [parse_input_spec(str(m)) for m in models]
    base_r = open_input(base_spec)
    model_rs = [open_input(s) for s in model_specs]
    base_dir = base_spec.path if not base_spec.checkpoint and base_spec.path.is_dir() else None
    (base_r, *model_rs), tied = untie_inputs(base_dir, [base_r, *model_rs])  # tie_word_embeddings
    plan = plan_merge(base_r, model_rs, cfg)
    metas = {t.name: base_r.meta(t.name) for t in plan.tasks}
    if cfg.compat == "mergekit":  # mergekit's dtype / out_dtype decide what is written
        metas = {k: TensorMeta(m.shape, planned_dtype(cfg, m.dtype)) for k, m in metas.items()}
    shard_plan = plan_shards(metas, shard_bytes)
    out.mkdir(parents=True, exist_ok=True)
    hasher = _Hasher([base_r, *model_rs])
    hasher.start()
    prev_threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)  # parallelism comes from tensors in flight, not inside each op
    try:
        with ShardedWriter(out, shard_plan) as writer:
            stats: MergeStats = run_merge(base_r, model_rs, cfg, writer, plan=plan, threads=threads, progress=progress,
                                              device=device)
    finally:
        torch.set_num_threads(prev_threads)
    copied = _copy_side_files(base_spec, out)
    if "config.json" in copied:
        _set_config_dtype(out / "config.json", cfg)
    hasher.join()
    if hasher.error is not None:
        raise hasher.error

    def describe(spec: InputSpec, reader: TensorReader) -> dict:
        return {
            "spec": repr(spec),
            "files": [
                {"path": str(p), "bytes": p.stat().st_size, "sha256": hasher.result[p]} for p in reader.files()
            ],
        }

    record = {
        "method": cfg.method.name,
        "parameters": cfg.to_json(),
        "inputs": {
            "base": describe(base_spec, base_r),
            "models": [describe(s, r) for s, r in zip(model_specs, model_rs)],
        },
        "trainkit_version": __version__,
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "output": {
            "shards": list(shard_plan.shard_names),
            "total_size": shard_plan.total_size,
            "tensors": len(plan.tasks),
            "copied_files": copied,
            "tied_lm_head": tied,
        },
        "threads": threads,
        "device": device,
        "stats": stats.to_json(),
    }
    (out / "merge.json").write_text(json.dumps(record, indent=2))
    return record
