"""Is `trainkit merge --config` bit-identical to mergekit 0.1.5 on the same YAML? Method by method.

Writes a tiny Llama (base + 3 fine-tunes, float32 and bfloat16 copies), then for
every method runs the same mergekit YAML through ``mergekit-yaml`` (in its own
venv: torch 2.13.0 CPU, then mergekit==0.1.5) and through ``trainkit merge
--config``, and compares the outputs element by element. Not part of the test
suite, which must not install mergekit.

Usage::

    python benchmarks/mergekit_compat.py --venv /tmp/mk14            # makes the venv if absent
    python benchmarks/mergekit_compat.py --venv /tmp/mk14 --methods ties linear --json out.json
    python benchmarks/mergekit_compat.py --venv /tmp/mk14 --dtypes float32:bfloat16   # stored:dtype

A ``--dtypes`` entry ``STORED:DTYPE`` writes the models in STORED and sets the
YAML's ``dtype: DTYPE`` (mergekit casts the inputs and computes in DTYPE); a
plain entry uses one dtype for both.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from merge_bench import ensure_mergekit, llama_shapes  # noqa: E402

from trainkit.io import ShardedWriter, TensorMeta, open_reader, plan_shards  # noqa: E402

DIMS = dict(hidden=64, inter=176, layers=2, vocab=512, kv_heads=2, heads=4)

# method -> (per-model parameters, top-level parameters); random ones run with --random-seed
CASES: dict[str, tuple[list[dict], dict]] = {
    "ties": ([{"density": 0.2, "weight": 1.0}, {"density": 0.5, "weight": 0.7}, {"density": 0.3, "weight": 1.3}],
             {"normalize": True, "lambda": 1.0}),
    "ties_lambda": ([{"density": 0.4, "weight": 1.0}] * 3, {"lambda": 0.8, "normalize": False}),
    "task_arithmetic": ([{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.7}], {"lambda": 0.9}),
    "linear": ([{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}], {}),
    "dare_ties": ([{"density": 0.5, "weight": 1.0}] * 3, {}),
    "breadcrumbs": ([{"density": 0.5, "weight": 1.0}] * 3, {}),
    "breadcrumbs_ties": ([{"density": 0.5, "weight": 1.0}] * 3, {}),
    "dare_linear": ([{"density": 0.5, "weight": 1.0}] * 3, {}),
    "della": ([{"density": 0.5, "weight": 1.0}] * 3, {}),
    "della_linear": ([{"density": 0.5, "weight": 1.0}] * 3, {}),
}


def write_models(root: Path, dtype: torch.dtype) -> tuple[Path, list[Path]]:
    shapes = llama_shapes(**DIMS)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": DIMS["hidden"],
              "intermediate_size": DIMS["inter"], "num_hidden_layers": DIMS["layers"],
              "num_attention_heads": DIMS["heads"], "num_key_value_heads": DIMS["kv_heads"],
              "vocab_size": DIMS["vocab"], "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
              "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": str(dtype).split(".")[-1]}
    metas = {k: TensorMeta(s, dtype) for k, s in shapes.items()}
    plan = plan_shards(metas, max_shard_bytes=1 << 30)
    dirs = [root / n for n in ("base", "ft_a", "ft_b", "ft_c")]
    if all((d / "config.json").exists() for d in dirs):  # written for an earlier --dtypes entry
        return dirs[0], dirs[1:]
    for i, d in enumerate(dirs):
        with ShardedWriter(d, plan) as w:
            for j, (name, shape) in enumerate(shapes.items()):
                t = torch.randn(shape, generator=torch.Generator().manual_seed(1000 * j + 7)) * 0.02
                if i:
                    t += torch.randn(shape, generator=torch.Generator().manual_seed(1000 * j + i)) * 0.002
                w.write(name, t.to(dtype))
        (d / "config.json").write_text(json.dumps(config))
    return dirs[0], dirs[1:]


def yaml_text(method: str, base: Path, fts: list[Path], dtype: str) -> str:
    per_model, top = CASES[method]
    name = method.split("_lambda")[0]
    lines = [f"merge_method: {name}", "models:"] if name == "linear" else [
        f"merge_method: {name}", f"base_model: {base}", "models:"]
    for d, p in zip(fts, per_model):
        lines.append(f"  - model: {d}")
        lines.append("    parameters: {" + ", ".join(f"{k}: {v}" for k, v in p.items()) + "}")
    if top:
        lines.append("parameters: {" + ", ".join(f"{k}: {str(v).lower()}" for k, v in top.items()) + "}")
    lines.append(f"dtype: {dtype}")
    return "\n".join(lines) + "\n"


def compare(a_dir: Path, b_dir: Path) -> dict:
    a, b = open_reader(a_dir), open_reader(b_dir)
    if set(a.keys()) != set(b.keys()):
        return {"same_keys": False}
    differing = total = 0
    max_abs = 0.0
    for k in a.keys():
        x, y = a.get(k), b.get(k)
        if x.dtype != y.dtype:
            return {"dtype": f"{k}: {x.dtype} vs {y.dtype}"}
        ne = x != y
        differing += int(ne.sum())
        total += x.numel()
        if ne.any():
            max_abs = max(max_abs, float((x.float() - y.float()).abs().max()))
    return {"bit_identical": differing == 0, "differing_elements": differing, "elements": total,
            "max_abs_diff": max_abs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", type=Path, default=ROOT / "bench_out" / "mergekit-venv")
    ap.add_argument("--work", type=Path, default=ROOT / "bench_out" / "mergekit_compat")
    ap.add_argument("--methods", nargs="+", default=list(CASES))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float32:bfloat16"],
                    help="STORED or STORED:DTYPE (models written in STORED, the YAML's dtype: DTYPE)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="trainkit's --threads (the seeded presets must not depend on it)")
    args = ap.parse_args()
    exe = ensure_mergekit(args.venv)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    results: dict[str, dict] = {}
    for entry in args.dtypes:
        stored, _, dtype = entry.partition(":")
        dtype = dtype or stored
        label = stored if dtype == stored else f"{stored}-as-{dtype}"
        base, fts = write_models(args.work / f"models-{stored}", getattr(torch, stored))
        for method in args.methods:
            cfg = args.work / f"{method}-{label}.yml"
            cfg.write_text(yaml_text(method, base, fts, dtype))
            mk, tk = args.work / f"mk-{method}-{label}", args.work / f"tk-{method}-{label}"
            r1 = subprocess.run([str(exe), str(cfg), str(mk), "--no-copy-tokenizer", "--no-write-model-card",
                                 "--quiet", "--random-seed", str(args.seed)], capture_output=True, text=True)
            r2 = subprocess.run([sys.executable, "-m", "trainkit", "merge", "--config", str(cfg), "--out", str(tk),
                                 "--seed", str(args.seed), "--threads", str(args.threads)],
                                capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
            key = f"{method}/{label}"
            if r1.returncode or r2.returncode:
                results[key] = {"mergekit_rc": r1.returncode, "trainkit_rc": r2.returncode,
                                "error": (r1.stderr.strip().splitlines() or [""])[-1] if r1.returncode
                                else r2.stderr.strip()}
            else:
                results[key] = compare(mk, tk)
            print(f"{key:<28} {json.dumps(results[key])}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
