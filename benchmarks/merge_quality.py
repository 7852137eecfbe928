"""Does TIES beat task arithmetic and averaging? The paper's central result, small and on CPU.

Setup (mirrors the paper's vision setting at toy scale):

- A shared trunk (MLP 64 -> 256 -> 256) is pre-trained on a synthetic 10-class
  task: the "base model".
- It is fine-tuned separately on 5 distinct tasks, each with its own head:
  scikit-learn's bundled digits, breast_cancer and wine data sets, plus two
  generated ones (make_classification, make_gaussian_quantiles). Each data set
  is mapped to the shared 64-d input by a fixed random projection. Nothing is
  downloaded.
- The fine-tuned trunks are merged (heads left out of the merge) with
  averaging, task arithmetic and TIES (trainkit.merge, global scope). lambda
  (and density for TIES) is tuned on a validation split by the mean validation
  accuracy over tasks, as in the paper.
- Reported: normalized accuracy on the test split, per task (merged model with
  the task's own head / the fine-tuned model's accuracy), and the average,
  over --seeds seeds.

Usage::

    python benchmarks/merge_quality.py            # 3 seeds
    python benchmarks/merge_quality.py --quick    # 1 seed, coarser grids
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainkit.merge import merge, ties_merge  # noqa: E402

try:
    from sklearn import datasets
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
except ImportError:  # pragma: no cover
    sys.exit("merge_quality.py needs scikit-learn: pip install -e '.[bench]'")

DIM, HIDDEN = 64, 256


@dataclass
class Task:
    name: str
    classes: int
    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]


def _load(name: str, seed: int):
    if name == "digits":
        return datasets.load_digits(return_X_y=True)
    if name == "breast_cancer":
        return datasets.load_breast_cancer(return_X_y=True)
    if name == "wine":
        return datasets.load_wine(return_X_y=True)
    if name == "synthetic":
        return datasets.make_classification(1500, 40, n_informative=20, n_classes=5, random_state=seed + 11)
    if name == "quantiles":
        return datasets.make_gaussian_quantiles(n_samples=1500, n_features=10, n_classes=3, random_state=seed + 12)
    if name == "pretrain":
        return datasets.make_classification(4000, 64, n_informative=40, n_classes=10, random_state=seed + 99)
    raise ValueError(name)


def make_task(name: str, seed: int) -> Task:
    x, y = _load(name, seed)
    x = StandardScaler().fit_transform(x)
    rng = np.random.default_rng(seed * 100 + len(name))
    if x.shape[1] != DIM:  # a fixed random projection into the shared input space
        proj = rng.normal(size=(x.shape[1], DIM)) / np.sqrt(x.shape[1])
        x = x @ proj
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    xva, xte, yva, yte = train_test_split(xte, yte, test_size=0.5, random_state=seed, stratify=yte)
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    li = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return Task(name, int(y.max()) + 1, {"train": t(xtr), "val": t(xva), "test": t(xte)},
                {"train": li(ytr), "val": li(yva), "test": li(yte)})


def trunk() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())


def train(body: nn.Module, head: nn.Module, task: Task, epochs: int, lr: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=lr)
    x, y = task.x["train"], task.y["train"]
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(head(body(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def accuracy(body: nn.Module, head: nn.Module, task: Task, split: str) -> float:
    pred = head(body(task.x[split])).argmax(1)
    return float((pred == task.y[split]).float().mean())


def run_seed(seed: int, quick: bool) -> dict:
    torch.manual_seed(seed)
    names = ["digits", "breast_cancer", "wine", "synthetic", "quantiles"]
    tasks = [make_task(n, seed) for n in names]
    pre = make_task("pretrain", seed)
    base = trunk()
    train(base, nn.Linear(HIDDEN, pre.classes), pre, epochs=10, lr=1e-3, seed=seed)
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}

    fine, heads, ft_acc = [], [], {}
    for i, task in enumerate(tasks):
        body = trunk()
        body.load_state_dict(base_sd)
        head = nn.Linear(HIDDEN, task.classes)
        train(body, head, task, epochs=30, lr=1e-3, seed=seed * 10 + i)
        fine.append({k: v.detach().clone() for k, v in body.state_dict().items()})
        heads.append(head)
        ft_acc[task.name] = accuracy(body, head, task, "test")

    def evaluate(sd: dict, split: str) -> dict[str, float]:
        body = trunk()
        body.load_state_dict(sd)
        return {t.name: accuracy(body, h, t, split) for t, h in zip(tasks, heads)}

    lams = [0.25 * i for i in range(1, 13)] if quick else [round(0.1 * i, 1) for i in range(1, 31)]
    densities = [0.1, 0.2, 0.5, 1.0] if quick else [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
    candidates = {
        "averaging": [({}, lambda: merge("average", base_sd, fine))],
        "task_arithmetic": [({"lam": lam}, lambda lam=lam: merge("task_arithmetic", base_sd, fine, lam=lam)) for lam in lams],
        "ties": [
            ({"lam": lam, "density": d}, lambda lam=lam, d=d: ties_merge(base_sd, fine, density=d, lam=lam))
            for d in densities
            for lam in lams
        ],
    }
    result = {"finetuned_test_acc": ft_acc, "base_zero_shot": None, "methods": {}}
    for method, grid in candidates.items():
        best = None
        for params, make in grid:
            sd = make()
            val = statistics.mean(evaluate(sd, "val").values())
            if best is None or val > best[0]:
                best = (val, params, sd)
        val, params, sd = best
        test = evaluate(sd, "test")
        norm = {k: test[k] / ft_acc[k] for k in test}
        result["methods"][method] = {
            "params": params,
            "val_mean_acc": val,
            "test_acc": test,
            "normalized": norm,
            "normalized_mean": statistics.mean(norm.values()),
        }
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = args.seeds or (1 if args.quick else 3)
    t0 = time.perf_counter()
    runs = [run_seed(s, args.quick) for s in range(seeds)]
    methods = list(runs[0]["methods"])
    names = list(runs[0]["finetuned_test_acc"])
    print(f"{'method':<16}" + "".join(f"{n:>14}" for n in names) + f"{'average':>10}   tuned (seed 0)")
    summary = {"seeds": seeds, "quick": args.quick, "seconds": None, "per_seed": runs, "mean": {}}
    for m in methods:
        per_task = {n: statistics.mean(r["methods"][m]["normalized"][n] for r in runs) for n in names}
        avg = statistics.mean(r["methods"][m]["normalized_mean"] for r in runs)
        sd = statistics.pstdev(r["methods"][m]["normalized_mean"] for r in runs) if seeds > 1 else 0.0
        summary["mean"][m] = {"normalized": per_task, "normalized_mean": avg, "normalized_mean_std": sd}
        print(f"{m:<16}" + "".join(f"{per_task[n] * 100:13.1f}%" for n in names) + f"{avg * 100:9.1f}%   {runs[0]['methods'][m]['params']}")
    ft = {n: statistics.mean(r["finetuned_test_acc"][n] for r in runs) for n in names}
    print(f"{'fine-tuned acc':<16}" + "".join(f"{ft[n] * 100:13.1f}%" for n in names))
    summary["seconds"] = time.perf_counter() - t0
    print(f"{seeds} seed(s), {summary['seconds']:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
