"""The streaming merge engine: threshold passes, then a tensor-by-tensor merge pass.

Memory: at any moment at most ``threads`` tensors are in flight, each holding
its base and one float32 task vector per model plus a few accumulators, so peak
anonymous memory is about ``threads * (n_models + 5) * largest tensor * 4`` bytes,
whatever the model size (on the fused path, the output tensor, the threshold
candidates and ``(n_models + 5) * fused.CHUNK`` floats of scratch per thread).
Inputs are memory-mapped (file-backed pages) and each output tensor is written
to its final place in its shard at once.

Passes:

1. ``scope="global"`` with a magnitude trim: each task vector's exact threshold
   over all tensors, from a sample pass and one counting pass on the fused path
   (``sampleselect.GlobalSelection``), else (or when its bracket misses) from
   radix-selection histogram passes (two for float32). (mergekit-compat is tensor
   scope only: mergekit has no global threshold.)
2. The merge pass. In global scope a tensor whose exact-zero vote sums make its
   values depend on the global majority sign (known only at the end) is
   deferred and merged again after the pass; this is rare (exact cancellation).
   Under mergekit compat each tensor runs :mod:`trainkit.merge.mergekit_ops`
   instead; when it draws random masks, tensors start in name order and take
   turns drawing from one seeded generator (:class:`~trainkit.merge.mergekit_ops.DrawStream`).

Parallelism: tensors run in a thread pool (torch kernels release the GIL) while
the kernel is asked to read ahead the next tensors' bytes (``posix_fadvise``),
so reads overlap with compute.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Protocol

import torch

from trainkit._units import Progress
from trainkit.io.readers import TensorReader
from trainkit.merge import fused
from trainkit.merge.kernel import (
    DEFER,
    Keep,
    TensorResult,
    apply_trim,
    combine,
    linear,
    magnitude_rank,
    sparsify,
    task_vectors,
    tensor_thresholds,
)
from trainkit.merge import mergekit_ops
from trainkit.merge.methods import MergeConfig
from trainkit.merge.plan import MergeInputError, MergePlan, TensorTask, plan_merge
from trainkit.merge.sampleselect import GlobalSelection, tensor_keeps
from trainkit.merge.threshold import RadixSelect

__all__ = ["TensorSink", "DictSink", "MergeStats", "run_merge", "limit_heap_retention"]


class TensorSink(Protocol):
    """Receives output tensors, one call per tensor, from any worker thread."""

    def write(self, name: str, tensor: torch.Tensor) -> None: ...


class DictSink:
    """Collects the output in a dict (the in-memory API)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor


@dataclass
class MergeStats:
    """What a merge did: passes run, their seconds, thresholds, deferred tensors."""

    passes: list[tuple[str, float]] = field(default_factory=list)
    thresholds: list[float | None] = field(default_factory=list)
    deferred: int = 0
    sign_balance: float = 0.0
    bytes_per_pass: int = 0

    def to_json(self) -> dict:
        return {
            "passes": [{"name": n, "seconds": round(s, 4)} for n, s in self.passes],
            "thresholds": self.thresholds,
            "deferred_tensors": self.deferred,
            "bytes_read_per_pass": self.bytes_per_pass,
        }


BUDGET_FACTOR = 1.5
"""Tensors in flight hold at most this many times the largest tensor's elements."""


class _Inputs:
    """The readers plus slicing for shared-rows merges."""

    def __init__(self, base: TensorReader, models: list[TensorReader], device: str = "cpu"):
        self.base, self.models, self.device = base, models, device

    def operands(self, task: TensorTask) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Return (full base tensor, merged slice of the base, merged slices of the models),
        on the merge device (copied there as they are read)."""
        full = self.base.get(task.name)
        ms = [m.get(task.name) for m in self.models]
        if self.device != "cpu":
            full, ms = full.to(self.device), [m.to(self.device) for m in ms]
        if task.rows is None:
            return full, full, ms
        return full, full[: task.rows], [m[: task.rows] for m in ms]

    def prefetch(self, task: TensorTask) -> None:
        for r in (self.base, *self.models):
            fn = getattr(r, "prefetch", None)
            if fn is not None:
                fn(task.name)


def _parallel(
    tasks: list[TensorTask],
    work: Callable[[TensorTask], object],
    done: Callable[[TensorTask, object], None],
    inputs: _Inputs,
    threads: int,
    progress: Progress | None,
    nbytes: Callable[[TensorTask], int],
    ordered: bool = False,
) -> None:
    """Run ``work`` over ``tasks`` with at most ``threads`` in flight, reading ahead.

    Memory-aware: the elements of the tensors in flight stay within
    ``BUDGET_FACTOR`` x the largest tensor, so the largest tensors (embeddings,
    LM head) never run side by side while smaller ones fill the other workers.
    ``ordered``: start tasks strictly in list order (a later one never overtakes
    one that waits for memory), as the seeded draws of compat require.
    """
    budget = BUDGET_FACTOR * max((t.merged_numel for t in tasks), default=0)
    waiting = list(tasks)
    pending: dict[Future, TensorTask] = {}
    in_flight = 0
    prefetched = 0

    def prefetch_ahead() -> None:
        nonlocal prefetched
        while prefetched < len(tasks) and prefetched < len(tasks) - len(waiting) + 2 * threads:
            inputs.prefetch(tasks[prefetched])
            prefetched += 1

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="trainkit-merge") as pool:
        try:
            while waiting or pending:
                while waiting and len(pending) < threads:
                    pick = next(
                        (i for i, t in enumerate(waiting[:1] if ordered else waiting)
                         if not pending or in_flight + t.merged_numel <= budget), None
                    )
                    if pick is None:
                        break
                    t = waiting.pop(pick)
                    in_flight += t.merged_numel
                    pending[pool.submit(work, t)] = t
                prefetch_ahead()
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    t = pending.pop(f)
                    in_flight -= t.merged_numel
                    done(t, f.result())
                    if progress is not None:
                        progress.update(nbytes(t))
        except BaseException:
            for f in pending:
                f.cancel()
            raise


def _nonfinite(task: TensorTask, model: TensorReader) -> str:
    return f"{task.name}: non-finite values (inf/nan) in {model.description} or the base"


def _check_finite(task: TensorTask, tvs: list[torch.Tensor], models: list[TensorReader]) -> list[str]:
    bad = []
    for tv, m in zip(tvs, models):
        # A sum is non-finite whenever an entry is; confirm, since a sum can also overflow.
        if not torch.isfinite(tv.sum()) and not bool(torch.isfinite(tv).all()):
            bad.append(_nonfinite(task, m))
    return bad


def limit_heap_retention() -> None:
    """Make glibc return large freed blocks to the OS at once.

    By default glibc raises its mmap threshold after big blocks are freed, so
    later tensor-sized allocations come from the heap and stay resident after
    ``free``: RssAnon then grows with fragmentation instead of tracking the live
    working set. A fixed 1 MiB threshold keeps every tensor buffer in its own
    mapping. No-op where glibc is absent.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


def run_merge(
    base: TensorReader,
    models: list[TensorReader],
    cfg: MergeConfig,
    sink: TensorSink,
    *,
    plan: MergePlan | None = None,
    threads: int = 1,
    progress: bool = False,
    device: str = "cpu",
) -> MergeStats:
    """Merge ``models`` into ``base`` tensor by tensor, writing each result to ``sink``.

    ``device="cuda"``: operands go to the GPU as they are read, results come back
    to the CPU before ``sink.write``. On the CPU the default TIES rule runs the
    fused kernel (``merge/fused.py``), with torch ops single-threaded meanwhile:
    the ``threads`` workers are the parallelism.
    """
    with fused.serial_ops(fused.applies(cfg, device)):
        return _run_merge(base, models, cfg, sink, plan=plan, threads=threads, progress=progress, device=device)


def _run_merge(
    base: TensorReader,
    models: list[TensorReader],
    cfg: MergeConfig,
    sink: TensorSink,
    *,
    plan: MergePlan | None,
    threads: int,
    progress: bool,
    device: str,
) -> MergeStats:
    plan = plan or plan_merge(base, models, cfg)
    limit_heap_retention()
    inputs = _Inputs(base, models, device)
    stats = MergeStats()
    n = len(models)
    merged = sorted((t for t in plan.tasks if t.merged), key=lambda t: -t.merged_numel)
    copied = [t for t in plan.tasks if not t.merged]
    itemsize = {t.name: t.dtype.itemsize for t in plan.tasks}

    def nbytes(t: TensorTask) -> int:
        return t.merged_numel * itemsize[t.name] * (n + 1)

    stats.bytes_per_pass = sum(nbytes(t) for t in merged)
    checked_finite = False
    problems: list[str] = []

    stream: mergekit_ops.DrawStream | None = None
    if cfg.compat == "mergekit" and mergekit_ops.draws_masks(cfg, n):
        # mergekit draws every mask from one generator, tensors in name order
        merged.sort(key=lambda t: t.name)
        stream = mergekit_ops.DrawStream(cfg.seed, [t.name for t in merged])

    def run_pass(label: str, tasks: list[TensorTask], work, done) -> None:
        # progress=True draws the bar whatever stderr is; False draws nothing
        bar = Progress(sum(nbytes(t) for t in tasks), label, force=True) if progress else None
        t0 = time.perf_counter()
        try:
            _parallel(tasks, work, done, inputs, max(1, threads), bar, nbytes, ordered=stream is not None)
        finally:
            if bar is not None:
                bar.close()
        stats.passes.append((label, time.perf_counter() - t0))
        if problems:
            raise MergeInputError(problems)

    global_keeps: list[Keep] | None = None
    # global thresholds only: compat is tensor scope, and its trims are mergekit_ops'
    ranks = ([magnitude_rank(plan.total, cfg, i) for i in range(n)]
             if cfg.scope == "global" and cfg.compat is None else [0] * n)
    use_fused = fused.applies(cfg, device)
    if use_fused and cfg.scope == "global" and any(ranks):  # sample bracket + one counting pass, exact
        gs = GlobalSelection(ranks, plan.total, cfg, plan.dtype)
        run_pass("threshold 1 (sample)", merged, lambda t: gs.sample(*inputs.operands(t)[1:]), lambda t, r: None)
        gs.close_samples()
        run_pass("threshold 2 (count)", merged,
                 lambda t: [_nonfinite(t, models[i]) for i in gs.count(*inputs.operands(t)[1:])],
                 lambda t, r: problems.extend(r))
        checked_finite = True
        found = gs.thresholds()
        if found is not None:  # else a bracket missed: radix selection below
            stats.thresholds = found
            global_keeps = [Keep(thr) for thr in found]
    if cfg.method.trim == "magnitude" and cfg.scope == "global" and any(ranks) and global_keeps is None:
        sel = RadixSelect(ranks, plan.dtype)
        first = True

        def hist_work(t: TensorTask):
            _, b, ms = inputs.operands(t)
            bad: list[str] = []
            for i, m in enumerate(ms):  # one task vector at a time: less memory
                _, (tv,) = task_vectors(b, [m], cfg.for_model(i), plan.dtype)
                if first:
                    bad += _check_finite(t, [tv], [models[i]])
                sel.add(i, sel.histogram(tv.abs_(), i))
                del tv
            return bad

        while not sel.done:
            run_pass(f"threshold {sel.pass_index + 1}", merged, hist_work, lambda t, r: problems.extend(r))
            first = False
            sel.advance()
        checked_finite = True
        thresholds = [sel.threshold(i) for i in range(n)]
        stats.thresholds = thresholds
        global_keeps = [Keep(thr) for thr in thresholds]

    balance = 0.0
    deferred: list[TensorTask] = []

    def merge_one(t: TensorTask, majority: int | None):
        res = _merge_once(t, majority)
        if not isinstance(res, list) and res.retry_majority is not None:
            res = _merge_once(t, res.retry_majority)
        return res

    def _merge_fused(t: TensorTask, majority: int | None, full, b, ms):
        keeps = global_keeps
        if keeps is None:
            keeps, bad = tensor_keeps(b, ms, cfg, plan.dtype)
            if bad:
                return [_nonfinite(t, models[i]) for i in bad]
        return _write(t, full, fused.fused_combine(b, ms, keeps, cfg, majority, t.dtype, plan.dtype))

    def _merge_once(t: TensorTask, majority: int | None):
        if cfg.compat == "mergekit":
            try:
                return _merge_mergekit(t)
            except BaseException:
                if stream is not None:
                    stream.abort()
                raise
        full, b, ms = inputs.operands(t)
        if use_fused:
            return _merge_fused(t, majority, full, b, ms)
        if cfg.method.combine == "linear":  # the models themselves, not task vectors
            bad = [] if checked_finite else _check_finite(t, ms, models)
            return bad or _write(t, full, TensorResult(linear(ms, cfg, plan.dtype), 0.0, False))
        bf, tvs = task_vectors(b, ms, cfg, plan.dtype)
        bad = [] if checked_finite else _check_finite(t, tvs, models)
        if bad:
            return bad
        if cfg.method.trim == "magnitude":
            if global_keeps is None:
                keeps = tensor_thresholds(tvs, cfg)
            else:
                keeps = global_keeps
            for i, k in enumerate(keeps):
                tvs[i] = apply_trim(tvs[i], k)  # replace in place of the list: frees the untrimmed one
        elif cfg.method.trim != "none":
            for i in range(len(tvs)):
                tvs[i] = sparsify(tvs[i], cfg, i, t.name)
        return _write(t, full, combine(bf, tvs, cfg, majority))

    def _merge_mergekit(t: TensorTask):
        """mergekit 0.1.5's ops in mergekit's dtypes (:mod:`trainkit.merge.mergekit_ops`)."""
        full, b, ms = inputs.operands(t)
        bad = [] if checked_finite else _check_finite(t, [b, *ms], [base, *models])
        if bad:
            if stream is not None:
                with stream.turn(t.name):  # keep the draw order of the tensors after this one
                    pass
            return bad
        dt = mergekit_ops.compute_dtype(cfg, [b.dtype, *(m.dtype for m in ms)])
        b, ms = b.to(dt), [m.to(dt) for m in ms]
        if cfg.method.combine == "linear":
            values = mergekit_ops.linear_tensor(ms, cfg)
        else:
            values = mergekit_ops.merge_tensor(b, ms, cfg, name=t.name, stream=stream)
        return _write(t, full, TensorResult(values, 0.0, False), mergekit_ops.output_dtype(cfg, dt))

    def _write(t: TensorTask, full: torch.Tensor, res: TensorResult,
               dtype: torch.dtype | None = None) -> TensorResult:
        if res.values is not None:
            out = res.values.to(device="cpu", dtype=dtype or t.dtype)
            if t.rows is not None:
                full_out = full.to(dtype=out.dtype, copy=True)
                full_out[: t.rows] = out
                out = full_out
            sink.write(t.name, out)
        return res

    def merge_done(t: TensorTask, res) -> None:
        nonlocal balance
        if isinstance(res, list):
            problems.extend(res)
            return
        balance += res.sign_balance
        if res.values is None:
            deferred.append(t)

    first_majority = DEFER if (cfg.method.elect and cfg.scope == "global" and cfg.compat is None) else None
    run_pass("merge", merged, lambda t: merge_one(t, first_majority), merge_done)
    for t in copied:
        sink.write(t.name, base.get(t.name).clone())
    stats.sign_balance = balance
    if deferred:
        majority = 1 if balance > 0 else (-1 if balance < 0 else 0)
        stats.deferred = len(deferred)
        run_pass("merge deferred", deferred, lambda t: merge_one(t, majority), merge_done)
    return stats
