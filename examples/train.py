"""A small DDP training job that checkpoints lazily and resumes exactly.

Run it under torchrun (gloo, CPU)::

    torchrun --nproc-per-node=2 examples/train.py --steps 200 --ckpt-every 20 \\
        --ckpt-dir runs/demo/ckpt --loss-log runs/demo/loss.txt

Kill it at any moment and run the same command again: it resumes from the newest
committed checkpoint and logs the same losses, bit for bit, as a run that was never
interrupted. Everything that decides a loss is in the checkpoint: the model, the
optimizer, the LR schedule, every RNG of every rank (torch, numpy, Python's ``random``,
the data-order generator) and the position in the data.

The model is an MLP with dropout and BatchNorm (its running stats change in the forward,
so they are copied inside ``save()``; the optimizer-owned weights are copied lazily).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from trainkit.checkpoint import Checkpointer, CheckpointNotFoundError, PerRank

SAMPLES, FEATURES, CLASSES = 4096, 32, 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200, help="total optimizer steps")
    p.add_argument("--ckpt-every", type=int, default=20, help="save every N steps")
    p.add_argument("--ckpt-dir", default="runs/train/ckpt",
                   help="checkpoint directory (the persistent tier)")
    p.add_argument("--local-dir", default=None,
                   help="node-local checkpoint tier; '{node}' is replaced by the node index "
                        "under trainkit run")
    p.add_argument("--keep-in-memory", type=int, default=0,
                   help="newest checkpoints kept in /dev/shm (the memory tier), for restarts")
    p.add_argument("--persist-every", type=int, default=1,
                   help="copy every n-th checkpoint to the persistent tier")
    p.add_argument("--loss-log", default=None, help="rank 0 appends 'step loss' lines here")
    p.add_argument("--stop-after", type=int, default=None,
                   help="simulated crash: every rank exits abruptly (os._exit) after this step, "
                        "with its last save possibly still in flight")
    p.add_argument("--batch", type=int, default=64, help="per-rank batch size")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-delay", type=float, default=0.0,
                   help="sleep per step (seconds), to make a run long enough to kill")
    p.add_argument("--no-attach", action="store_true", help="eager snapshots (no lazy mode)")
    p.add_argument("--fsdp", action="store_true",
                   help="FSDP2 (fully_shard) instead of DDP: DTensor state, loaded with into=")
    p.add_argument("--detect", action=argparse.BooleanOptionalAction,
                   default=bool(os.environ.get("TRAINKIT_AGGREGATOR")),
                   help="record collectives with trainkit.detect.CollectiveMonitor (default: on "
                        "under `trainkit run`, which sets TRAINKIT_AGGREGATOR)")
    p.add_argument("--run-dir", default=None,
                   help="run directory for the monitor (default: $TRAINKIT_RUN_DIR)")
    p.add_argument("--hang-timeout", type=float, default=30.0, help="monitor's hang timeout")
    p.add_argument("--ckpt-backend", choices=("trainkit", "torch"), default="trainkit",
                   help="trainkit's lazy checkpointer, or synchronous torch.save (the baseline)")
    p.add_argument("--pg-timeout", type=float, default=None,
                   help="collective timeout in seconds (torch's default: 30 min on gloo)")
    p.add_argument("--progress-log", default=None,
                   help="rank 0 appends one JSON line per step: step, loss, time, world size, "
                        "generation (used by the fault drill's recovery timeline)")
    return p.parse_args(argv)


def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic classification task, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES, FEATURES, generator=g)
    w = torch.randn(FEATURES, CLASSES, generator=g)
    y = (x @ w + 0.5 * torch.randn(SAMPLES, CLASSES, generator=g)).argmax(dim=1)
    return x, y


class Batches:
    """Epoch-shuffled global batches; each rank takes its slice. The position (epoch,
    offset) is checkpointed, and the order of an epoch derives from (seed, epoch)."""

    def __init__(self, seed: int, batch: int, rank: int, world: int) -> None:
        self.seed, self.batch, self.rank, self.world = seed, batch, rank, world
        self.epoch, self.offset = 0, 0
        self._perm = self._order()

    def _order(self) -> torch.Tensor:
        return torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(
            self.seed * 1000 + self.epoch))

    def next(self) -> torch.Tensor:
        span = self.batch * self.world
        if self.offset + span > SAMPLES:
            self.epoch, self.offset = self.epoch + 1, 0
            self._perm = self._order()
        start = self.offset + self.rank * self.batch
        self.offset += span
        return self._perm[start:start + self.batch]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._perm = self._order()


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def agreed_latest(ckpt: Checkpointer) -> int | None:
    """The newest step every rank sees committed (ranks can race a commit at start-up)."""
    mine = ckpt.latest()
    t = torch.tensor([-1 if mine is None else mine], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return None if t.item() < 0 else int(t.item())


def this_ranks_view(state: object, rank: int) -> object:
    """After a shrink (a node excluded by `trainkit run`), ``load()`` returns per-rank
    entries (RNG streams, data positions) as ``PerRank``; rank r takes saved rank r's.
    Model and optimizer state are replicated under DDP and load as themselves."""
    if isinstance(state, PerRank):
        return state[rank] if rank in state else state[min(state)]
    if isinstance(state, dict):
        return {k: this_ranks_view(v, rank) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(this_ranks_view(v, rank) for v in state)
    return state


def restore(ckpt: object, rank: int, into: dict | None = None) -> tuple[int | None, dict | None]:
    """The newest checkpoint every rank can load (collective), or (None, None). ``into``
    (FSDP2): a target whose DTensors say where each saved piece goes."""
    if isinstance(ckpt, Checkpointer):
        try:
            state = ckpt.load() if into is None else ckpt.load(into=into)
        except CheckpointNotFoundError as exc:
            if rank == 0:
                print(f"[train] starting fresh: {exc}", flush=True)
            return None, None
        if rank == 0:
            print(f"[train] restored step {ckpt.loaded_step} from the {ckpt.loaded_from} tier",
                  flush=True)
        return ckpt.loaded_step, this_ranks_view(state, rank)
    resumed = agreed_latest(ckpt)
    return (None, None) if resumed is None else (resumed, ckpt.load(resumed))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    timeout = {} if args.pg_timeout is None else {"timeout": timedelta(seconds=args.pg_timeout)}
    dist.init_process_group("gloo", **timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    mon = None
    if args.detect:    # before DDP is built, so the reducer's collectives are recorded too
        from trainkit.detect import CollectiveMonitor

        mon = CollectiveMonitor(run_dir=args.run_dir, hang_timeout=args.hang_timeout)
        mon.start()
    torch.manual_seed(args.seed)               # identical initial weights on every rank
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, args.hidden), torch.nn.BatchNorm1d(args.hidden),
        torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(args.hidden, args.hidden),
        torch.nn.ReLU(), torch.nn.Linear(args.hidden, CLASSES))
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[4], model[6]):
            fully_shard(layer)
        ddp = fully_shard(model)
    else:
        ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    x_all, y_all = make_data(args.seed)
    data = Batches(args.seed, args.batch, rank, world)
    torch.manual_seed(args.seed + 1 + rank)    # per-rank streams: dropout, input noise
    np.random.seed(args.seed + 1 + rank)
    random.seed(args.seed + 1 + rank)

    if args.ckpt_backend == "torch":
        from torch_save_ckpt import TorchSaveCheckpointer

        ckpt = TorchSaveCheckpointer(args.ckpt_dir)
    else:
        local = (None if args.local_dir is None else
                 args.local_dir.replace("{node}", os.environ.get("TRAINKIT_NODE_INDEX", "0")))
        ckpt = Checkpointer(args.ckpt_dir, local_dir=local, keep_in_memory=args.keep_in_memory,
                            persist_every=args.persist_every, timeout=60)
    if not args.no_attach:
        ckpt.attach(opt)
    start = 1
    target = None
    if args.fsdp:
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        m_sd, o_sd = get_state_dict(model, opt)
        target = {"model": m_sd, "optim": o_sd, "sched": sched.state_dict(), "step": 0,
                  "data": data.state_dict(), "rng": rng_state()}
    resumed, state = restore(ckpt, rank, target)
    if resumed is not None:
        if args.fsdp:
            set_state_dict(model, opt, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
        else:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        data.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        start = state["step"] + 1
        if rank == 0:
            print(f"[train] resumed from step {resumed}", flush=True)
    log = open(args.loss_log, "a") if (args.loss_log and rank == 0) else None
    progress = open(args.progress_log, "a") if (args.progress_log and rank == 0) else None

    for step in range(start, args.steps + 1):
        if mon is not None:
            mon.step(step)
        idx = data.next()
        noise = random.uniform(0.005, 0.02)    # Python's RNG matters too
        x = x_all[idx] + noise * torch.from_numpy(np.random.standard_normal(
            (len(idx), FEATURES)).astype(np.float32))
        loss = F.cross_entropy(ddp(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        # the logged loss: gathered and summed in rank order, because gloo's all_reduce of
        # a scalar may add the ranks' values in a timing-dependent order (1-ulp jitter
        # was seen), and recomputed steps after a restart must be comparable bit for bit
        parts = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(parts, loss.detach())
        mean = torch.stack(parts).sum()
        if log is not None:
            log.write(f"{step} {(mean.item() / world)!r}\n")
            log.flush()
        if progress is not None:
            progress.write(json.dumps({"step": step, "loss": mean.item() / world,
                                       "time": time.time(), "world": world,
                                       "generation": os.environ.get("TRAINKIT_GENERATION")})
                           + "\n")
            progress.flush()
        if step % args.ckpt_every == 0:
            m_sd, o_sd = (get_state_dict(model, opt) if args.fsdp else
                          (model.state_dict(), opt.state_dict()))
            ckpt.save(step, {"model": m_sd, "optim": o_sd,
                             "sched": sched.state_dict(), "step": step, "data": data.state_dict(),
                             "rng": rng_state()})
        if args.stop_after is not None and step == args.stop_after:
            if log is not None:
                log.close()
            os._exit(3)                        # no close(), no flush: a crash
        if args.step_delay:
            time.sleep(args.step_delay)
    ckpt.close()                               # waits for the last saves to commit
    if mon is not None:
        mon.close()
    for f in (log, progress):
        if f is not None:
            f.close()
    if rank == 0:
        print(f"[train] done: {args.steps} steps, committed checkpoints {ckpt.steps()}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # torch 2.13 (CPU, gloo) sometimes aborts while the interpreter tears down after
    # destroy_process_group ("terminate called without an active exception", SIGABRT):
    # seen in about 1 run in 10 of this script even with trainkit's monitor disabled
    # (TRAINKIT_DETECT=0). Everything is closed and flushed by now, so skip the teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
