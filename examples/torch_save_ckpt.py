"""The baseline a user has today: synchronous ``torch.save`` checkpoints, one file per rank.

Used by ``examples/train.py --ckpt-backend torch`` and ``benchmarks/recovery_bench.py``
as the comparison for trainkit's checkpointer. It is made fair, not naive: each file is
fsynced and renamed into place, so a crash never leaves a torn checkpoint, and a step
counts only when every rank's file exists.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

_FILE = re.compile(r"^step_(\d+)\.rank(\d+)\.pt$")


class TorchSaveCheckpointer:
    """The subset of ``trainkit.checkpoint.Checkpointer``'s API that train.py uses."""

    def __init__(self, path: str | os.PathLike, **_: Any) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Nothing to do: every save is synchronous."""

    def save(self, step: int, state: dict) -> None:
        final = self.path / f"step_{step:08d}.rank{self.rank}.pt"
        tmp = final.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def steps(self) -> list[int]:
        ranks: dict[int, set[int]] = {}
        for p in self.path.iterdir():
            m = _FILE.match(p.name)
            if m:
                ranks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        return sorted(s for s, r in ranks.items() if len(r) >= self.world)

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def load(self, step: int, *, rank: int | None = None) -> dict:
        r = self.rank if rank is None else rank
        return torch.load(self.path / f"step_{step:08d}.rank{r}.pt", weights_only=False)

    def close(self) -> None:
        """Nothing pending."""
