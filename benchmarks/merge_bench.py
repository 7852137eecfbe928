"""Speed and memory of `trainkit merge ties` against mergekit 0.1.5, side by side.

What it does, in one run:

1. Generates a synthetic Llama-style Hugging Face model (valid config.json,
   sharded float32 safetensors, random weights; about 1 GB, ~0.1 GB with
   --quick) plus 3 fine-tuned variants (base + small noise).
2. Makes a venv for mergekit (torch==2.13.0 CPU installed first, then
   mergekit==0.1.5) unless it exists.
3. Runs, interleaved, for --repeats rounds:
   - ``mergekit-yaml`` (merge_method ties, weight 1, density D, normalize true,
     lambda 1, dtype float32, -j <cores>);
   - ``trainkit merge ties --scope tensor --compat mergekit`` on the same inputs;
   - ``trainkit merge ties --scope tensor`` and ``--scope global`` (authors' rule);
   - a plain vectorised torch TIES (``PLAIN_TIES``: stack, ``kthvalue``, sign vote,
     masked mean, tensor scope), the baseline issue #14 asks trainkit to beat 2x;
   - a raw read of the same input bytes.
   Each is a separate process; peak anonymous memory (RssAnon summed over the
   process tree) is sampled from /proc every 10 ms.
4. Compares mergekit's output with trainkit's compat output element by element
   (max distance in ulps of float32) and prints a JSON summary (--json FILE).

Usage::

    python benchmarks/merge_bench.py --quick          # ~0.1 GB model, minutes
    python benchmarks/merge_bench.py                  # ~1 GB model (4 GB of input)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainkit.io import ShardedWriter, TensorMeta, open_reader, plan_shards  # noqa: E402


def llama_shapes(hidden: int, inter: int, layers: int, vocab: int, kv_heads: int, heads: int) -> dict[str, tuple[int, ...]]:
    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (hidden, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def generate(root: Path, quick: bool) -> tuple[Path, list[Path], dict]:
    """Write base + 3 fine-tuned variants (deterministic), reuse them if present."""
    if quick:
        dims = dict(hidden=512, inter=1408, layers=4, vocab=16000, kv_heads=4, heads=8)
    else:
        dims = dict(hidden=1024, inter=2816, layers=14, vocab=32000, kv_heads=4, heads=16)
    shapes = llama_shapes(**dims)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dims["hidden"],
        "intermediate_size": dims["inter"],
        "num_hidden_layers": dims["layers"],
        "num_attention_heads": dims["heads"],
        "num_key_value_heads": dims["kv_heads"],
        "vocab_size": dims["vocab"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    names = ["base", "ft_a", "ft_b", "ft_c"]
    dirs = [root / n for n in names]
    stamp = root / f"generated-{'quick' if quick else 'full'}.json"
    if stamp.exists():
        return dirs[0], dirs[1:], json.loads(stamp.read_text())
    shutil.rmtree(root, ignore_errors=True)
    metas = {k: TensorMeta(s, torch.float32) for k, s in shapes.items()}
    plan = plan_shards(metas, max_shard_bytes=(64 if quick else 400) * 1024**2)
    for i, d in enumerate(dirs):
        with ShardedWriter(d, plan) as w:
            for j, (name, shape) in enumerate(shapes.items()):
                g = torch.Generator().manual_seed(1000 * j + 7)
                base = torch.randn(shape, generator=g) * 0.02
                if i:
                    g2 = torch.Generator().manual_seed(1000 * j + i)
                    base += torch.randn(shape, generator=g2) * 0.002
                w.write(name, base)
        (d / "config.json").write_text(json.dumps(config, indent=2))
    info = {"params": sum(m.numel for m in metas.values()), "bytes_per_model": plan.total_size, "dims": dims}
    stamp.write_text(json.dumps(info))
    return dirs[0], dirs[1:], info


def ensure_mergekit(venv: Path) -> Path:
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU build, before mergekit can pull another
    subprocess.run([*pip, "mergekit==0.1.5"], check=True)
    return exe


def _tree_rss_anon(pid: int) -> int:
    """Sum of RssAnon (bytes) over a process and its descendants, from /proc."""
    total = 0
    todo = [pid]
    seen = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1]) * 1024
            for tid in os.listdir(f"/proc/{p}/task"):
                kids = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
                todo.extend(int(k) for k in kids)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def measure(cmd: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """Run a command; return wall seconds, CPU seconds (user + system, all its
    threads: steadier than wall time on a shared machine) and peak RssAnon of its
    process tree."""
    peak = 0
    t0 = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss_anon(proc.pid))
            stop.wait(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, usage = os.wait4(proc.pid, 0)  # reaps it and returns its CPU time
    wall = time.perf_counter() - t0
    rc = proc.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    th.join()
    if log:
        out.close()
    if rc != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise RuntimeError(f"command failed ({rc}): {' '.join(cmd)}\n{tail}")
    return {"seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_anon_bytes": peak}


RAW_READ = """
import sys
buf = bytearray(8 << 20)
n = 0
for p in sys.argv[1:]:
    with open(p, 'rb', buffering=0) as f:
        while k := f.readinto(buf):
            n += k
print(n)
"""


# The plain vectorised torch TIES of issue #14 (tensor scope): the baseline trainkit must beat.
# Per tensor: stack the task vectors, kthvalue threshold per model, sign vote, masked mean.
PLAIN_TIES = """
import sys, torch
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
torch.set_num_threads(int(sys.argv[1])); density = float(sys.argv[2]); out = Path(sys.argv[3])
base, *fts = map(Path, sys.argv[4:])
out.mkdir(parents=True, exist_ok=True)
for shard in sorted(base.glob('*.safetensors')):
    fb, fm, res = safe_open(shard, 'pt'), [safe_open(d / shard.name, 'pt') for d in fts], {}
    for k in fb.keys():
        b = fb.get_tensor(k)
        tv = torch.stack([f.get_tensor(k).reshape(-1) for f in fm]) - b.reshape(1, -1)
        kth = tv.shape[1] - int(tv.shape[1] * density)
        if kth > 0:
            tv = tv * (tv.abs() >= tv.abs().kthvalue(kth, dim=1, keepdim=True).values)
        agree = (torch.sign(tv) == torch.sign(tv.sum(0))) & (tv != 0)
        mean = (tv * agree).sum(0) / agree.sum(0).clamp(min=1)
        res[k] = (b.reshape(-1) + mean).reshape(b.shape)
    save_file(res, out / shard.name)
for index in base.glob('*.safetensors.index.json'):
    (out / index.name).write_bytes(index.read_bytes())
"""


def ulp_compare(a_dir: Path, b_dir: Path) -> dict:
    """Max float32 ulp distance and count of differing elements between two model dirs."""
    a, b = open_reader(a_dir), open_reader(b_dir)
    if set(a.keys()) != set(b.keys()):
        return {"same_keys": False, "missing_in_b": sorted(set(a.keys()) - set(b.keys()))[:10]}
    max_ulp = 0
    differing = 0
    total = 0
    for k in a.keys():
        x, y = a.get(k), b.get(k)
        if x.dtype != y.dtype or x.shape != y.shape:
            return {"same_keys": True, "mismatch": f"{k}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"}
        xi = x.reshape(-1).view(torch.int32).to(torch.int64)
        yi = y.reshape(-1).view(torch.int32).to(torch.int64)
        # map sign-magnitude float bits to a monotonic integer line
        xi = torch.where(xi < 0, -(xi & 0x7FFFFFFF), xi)
        yi = torch.where(yi < 0, -(yi & 0x7FFFFFFF), yi)
        d = (xi - yi).abs()
        max_ulp = max(max_ulp, int(d.max()))
        differing += int((d > 0).sum())
        total += d.numel()
    return {"same_keys": True, "max_ulp": max_ulp, "differing_elements": differing, "elements": total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~0.1 GB model instead of ~1 GB")
    ap.add_argument("--work", type=Path, default=ROOT / "bench_out" / "merge_bench")
    ap.add_argument("--venv", type=Path, default=ROOT / "bench_out" / "mergekit-venv")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3 quick, 1 full)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--skip-compat", action="store_true",
                    help="leave out trainkit --compat mergekit (with --skip-mergekit: a shorter run for the plain-TIES bar)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    repeats = args.repeats or (3 if args.quick else 1)
    args.work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    base, fts, info = generate(args.work / ("models-quick" if args.quick else "models-full"), args.quick)
    gen_s = time.perf_counter() - t0
    input_files = [p for d in (base, *fts) for p in sorted(d.glob("*.safetensors"))]
    input_bytes = sum(p.stat().st_size for p in input_files)
    print(f"inputs: 4 models x {info['bytes_per_model'] / 1e9:.3f} GB ({info['params'] / 1e6:.1f}M params), "
          f"generated/reused in {gen_s:.1f}s", flush=True)

    runs: dict[str, list[dict]] = {}
    outs = args.work / "outputs"
    shutil.rmtree(outs, ignore_errors=True)
    outs.mkdir()
    py = ROOT / ".venv" / "bin" / "python"
    trainkit = [str(py if py.exists() else sys.executable), "-m", "trainkit", "merge", "ties", "--base", str(base),
                "--models", *map(str, fts), "--density", str(args.density), "--lam", "1.0",
                "--threads", str(args.threads), "--progress", "off", "--overwrite"]
    jobs = {
        "raw_read": [sys.executable, "-c", RAW_READ, *map(str, input_files)],
        "trainkit_tensor_compat": [*trainkit, "--scope", "tensor", "--compat", "mergekit", "--out", str(outs / "tk_compat")],
        "trainkit_tensor": [*trainkit, "--scope", "tensor", "--out", str(outs / "tk_tensor")],
        "trainkit_global": [*trainkit, "--scope", "global", "--out", str(outs / "tk_global")],
        "plain_torch_ties": [sys.executable, "-c", PLAIN_TIES, str(args.threads), str(args.density),
                             str(outs / "plain_ties"), str(base), *map(str, fts)],
    }
    if args.skip_compat:
        del jobs["trainkit_tensor_compat"]
    if not args.skip_mergekit:
        exe = ensure_mergekit(args.venv)
        cfg = outs.parent / "mergekit.yml"
        models_yaml = "".join(
            f"  - model: {d}\n    parameters:\n      weight: 1.0\n      density: {args.density}\n" for d in fts
        )
        cfg.write_text(
            f"merge_method: ties\nbase_model: {base}\nmodels:\n{models_yaml}"
            "parameters:\n  normalize: true\n  lambda: 1.0\ndtype: float32\n"
        )
        jobs["mergekit"] = [str(exe), str(cfg), str(outs / "mergekit"), "--no-copy-tokenizer",
                            "--no-write-model-card", "--quiet", "-j", str(args.threads)]
    order = ["raw_read", "mergekit", "trainkit_tensor_compat", "trainkit_tensor", "trainkit_global", "plain_torch_ties"]
    for r in range(repeats):
        for name in order:
            if name not in jobs:
                continue
            if name == "mergekit":
                shutil.rmtree(outs / "mergekit", ignore_errors=True)
            res = measure(jobs[name], log=args.work / f"{name}.log")
            runs.setdefault(name, []).append(res)
            print(f"round {r + 1} {name:<24} {res['seconds']:8.2f}s wall {res['cpu_seconds']:8.2f}s cpu  "
                  f"peak RssAnon {res['peak_rss_anon_bytes'] / 2**20:8.1f} MiB", flush=True)

    summary: dict = {
        "quick": args.quick, "repeats": repeats, "threads": args.threads, "density": args.density,
        "cores": os.cpu_count(), "input_bytes": input_bytes, "params_per_model": info["params"], "runs": {},
    }
    for name, rs in runs.items():
        med = statistics.median(x["seconds"] for x in rs)
        peak = max(x["peak_rss_anon_bytes"] for x in rs)
        cpu = statistics.median(x["cpu_seconds"] for x in rs)
        summary["runs"][name] = {"median_seconds": med, "median_cpu_seconds": cpu, "peak_rss_anon_mib": peak / 2**20,
                                 "input_gb_per_s": input_bytes / med / 1e9, "all_seconds": [x["seconds"] for x in rs],
                                 "all_cpu_seconds": [x["cpu_seconds"] for x in rs]}
    R = summary["runs"]
    if "mergekit" in R and "trainkit_tensor_compat" in R:
        summary["speedup_vs_mergekit"] = R["mergekit"]["median_seconds"] / R["trainkit_tensor_compat"]["median_seconds"]
        summary["cpu_time_ratio_mergekit_over_trainkit"] = (
            R["mergekit"]["median_cpu_seconds"] / R["trainkit_tensor_compat"]["median_cpu_seconds"]
        )
        summary["anon_memory_ratio_vs_mergekit"] = R["trainkit_tensor_compat"]["peak_rss_anon_mib"] / R["mergekit"]["peak_rss_anon_mib"]
        summary["mergekit_vs_trainkit_compat"] = ulp_compare(outs / "mergekit", outs / "tk_compat")
    raw = R["raw_read"]["median_seconds"]
    for name in R:
        R[name]["time_over_raw_read"] = R[name]["median_seconds"] / raw
    # issue #14's bar: tensor-scope trainkit at least 2x faster than the plain torch TIES
    summary["tensor_speedup_vs_plain_torch_ties"] = R["plain_torch_ties"]["median_seconds"] / R["trainkit_tensor"]["median_seconds"]
    summary["tensor_cpu_speedup_vs_plain_torch_ties"] = (
        R["plain_torch_ties"]["median_cpu_seconds"] / R["trainkit_tensor"]["median_cpu_seconds"]
    )
    summary["plain_torch_ties_vs_trainkit_tensor"] = ulp_compare(outs / "plain_ties", outs / "tk_tensor")
    summary["global_over_tensor_time"] = R["trainkit_global"]["median_seconds"] / R["trainkit_tensor"]["median_seconds"]
    summary["global_over_tensor_cpu"] = R["trainkit_global"]["median_cpu_seconds"] / R["trainkit_tensor"]["median_cpu_seconds"]
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
