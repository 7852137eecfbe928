"""Plans: which path every subflow takes, and what that does to every link.

A planner returns an :class:`Assignment` per phase (vectorised arrays), and
:class:`Plan` turns those into link loads. Load accounting lives here, once, so
every planner is judged by the same arithmetic: a directed link's load is the
seconds its bytes need, ``bytes * 8 / (Gbps * 1e9)``, and ``max_link_load`` is
the busiest link of the busiest phase.

``up_link``/``down_link`` give the parallel cable on the leaf->spine and
spine->leaf hop; ``-1`` means the bytes are spread over the parallel cables in
proportion to their capacity (a pooled trunk, used by the LP bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np

from trainkit.traffic.collectives import Flows, Phase
from trainkit.traffic.demand import FlowTable
from trainkit.traffic.topology import LeafSpine

__all__ = ["Assignment", "PhasePlan", "Plan", "Subflow", "link_loads"]


class Subflow(NamedTuple):
    """One subflow (one QP). Aggregated leaf-pair records have ``src = dst = None``
    and ``count`` > 1: they stand for ``count`` equal subflows of ``nbytes / count``."""

    phase: int
    src: int | None
    dst: int | None
    spine: int | None
    nbytes: float
    up_link: int | None = None
    down_link: int | None = None
    src_leaf: int = 0
    dst_leaf: int = 0
    count: int = 1
    flow: int = 0  # row of the phase's flow table


@dataclass(frozen=True, eq=False)
class Assignment:
    """Planner output for one phase: ``count`` subflows of ``each`` bytes per record."""

    row: np.ndarray
    spine: np.ndarray  # -1 within one leaf
    up_link: np.ndarray
    down_link: np.ndarray
    each: np.ndarray
    count: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def concat(parts: list["Assignment"], info: dict[str, Any] | None = None) -> "Assignment":
        parts = [p for p in parts if len(p.row)]
        if not parts:
            z = np.zeros(0, np.int64)
            return Assignment(z, z, z, z, np.zeros(0), z, info or {})
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        merged = {k: v for p in parts for k, v in p.info.items()}
        merged.update(info or {})
        return Assignment(
            cat("row").astype(np.int64), cat("spine").astype(np.int64), cat("up_link").astype(np.int64),
            cat("down_link").astype(np.int64), cat("each").astype(np.float64), cat("count").astype(np.int64), merged,
        )


def _spread(bytes_: np.ndarray, leaf: np.ndarray, spine: np.ndarray, link: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Bytes per cable (leaf, spine, link); link -1 spreads over the parallel cables by capacity."""
    L, S, P = cap.shape
    fixed = link >= 0
    flat = (leaf[fixed] * S + spine[fixed]) * P + link[fixed]
    out = np.bincount(flat, weights=bytes_[fixed], minlength=L * S * P).reshape(cap.shape)
    pooled = ~fixed
    if pooled.any():
        caps = cap[leaf[pooled], spine[pooled], :]
        total = caps.sum(axis=1, keepdims=True)
        share = np.divide(caps, total, out=np.zeros_like(caps), where=total > 0)
        np.add.at(out, (leaf[pooled], spine[pooled]), bytes_[pooled, None] * share)
    return out


def link_loads(topo: LeafSpine, table: FlowTable, a: Assignment) -> tuple[np.ndarray, np.ndarray]:
    """Bytes on every up cable (leaf, spine, link) and down cable (leaf, spine, link)."""
    cap = topo.link_gbps()
    fab = a.spine >= 0
    bytes_ = (a.each * a.count)[fab]
    rows = a.row[fab]
    up = _spread(bytes_, table.src_leaf[rows], a.spine[fab], a.up_link[fab], cap)
    down = _spread(bytes_, table.dst_leaf[rows], a.spine[fab], a.down_link[fab], cap)
    return up, down


def _seconds(bytes_: np.ndarray, gbps: np.ndarray | float) -> np.ndarray:
    gbps = np.broadcast_to(np.asarray(gbps, dtype=np.float64), np.shape(bytes_))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = bytes_ * 8.0 / (gbps * 1e9)
    return np.where(bytes_ > 0, np.where(gbps > 0, t, np.inf), 0.0)


@dataclass(frozen=True, eq=False)
class PhasePlan:
    index: int
    phase: Phase
    table: FlowTable
    assignment: Assignment
    up_bytes: np.ndarray
    down_bytes: np.ndarray
    host_time: float  # busiest host link, seconds per repeat
    fabric_time: float  # busiest leaf-spine link, seconds per repeat

    @property
    def max_link_load(self) -> float:
        return max(self.host_time, self.fabric_time)

    @staticmethod
    def build(topo: LeafSpine, index: int, phase: Phase, table: FlowTable, a: Assignment) -> "PhasePlan":
        up, down = link_loads(topo, table, a)
        cap = topo.link_gbps()
        host = _seconds(np.maximum(table.host_tx, table.host_rx), topo.host_gbps)
        fabric = max(_seconds(up, cap).max(initial=0.0), _seconds(down, cap).max(initial=0.0))
        return PhasePlan(index, phase, table, a, up, down, float(host.max(initial=0.0)), float(fabric))

    def subflows_per_flow(self) -> np.ndarray:
        """Subflows (QPs) each inter-leaf flow needed; aggregated rows count per flow on average."""
        a, t = self.assignment, self.table
        per_row = np.bincount(a.row, weights=a.count, minlength=len(t))
        inter = t.inter
        return per_row[inter] / t.count[inter]


@dataclass(frozen=True, eq=False)
class Plan:
    """A plan for every phase of a job. See :func:`trainkit.traffic.plan`."""

    method: str
    topology: LeafSpine
    flows: Flows
    phases: tuple[PhasePlan, ...]
    seconds: float = 0.0  # wall time the planner took
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def max_link_load(self) -> float:
        """Seconds the busiest directed link needs for its bytes in the busiest phase."""
        return max((p.max_link_load for p in self.phases), default=0.0)

    @property
    def fabric_load(self) -> float:
        """Like max_link_load, over leaf-spine links only."""
        return max((p.fabric_time for p in self.phases), default=0.0)

    @property
    def host_load(self) -> float:
        """Like max_link_load, over host (NIC-leaf) links only; no planner can change it."""
        return max((p.host_time for p in self.phases), default=0.0)

    @property
    def total_load(self) -> float:
        """Sum over phases of repeat x busiest link: the bottleneck-bound completion time."""
        return sum(p.phase.repeat * p.max_link_load for p in self.phases)

    @cached_property
    def subflows(self) -> list[Subflow]:
        out: list[Subflow] = []
        for p in self.phases:
            a, t = p.assignment, p.table
            for r, s, ul, dl, each, cnt in zip(
                a.row.tolist(), a.spine.tolist(), a.up_link.tolist(), a.down_link.tolist(),
                a.each.tolist(), a.count.tolist(),
            ):
                src, dst = int(t.src[r]), int(t.dst[r])
                spine = None if s < 0 else s
                up = None if s < 0 or ul < 0 else ul
                down = None if s < 0 or dl < 0 else dl
                sl, dl_ = int(t.src_leaf[r]), int(t.dst_leaf[r])
                if src < 0:
                    out.append(Subflow(p.index, None, None, spine, each * cnt, up, down, sl, dl_, cnt, r))
                else:
                    rec = Subflow(p.index, src, dst, spine, each, up, down, sl, dl_, 1, r)
                    out.extend([rec] * cnt)
        return out

    def subflow_stats(self) -> dict[str, float]:
        """Mean and max subflows per inter-leaf flow over all phases."""
        values = [p.subflows_per_flow() for p in self.phases]
        values = np.concatenate(values) if values else np.zeros(0)
        if not len(values):
            return {"mean": 0.0, "max": 0.0}
        return {"mean": float(values.mean()), "max": float(values.max())}

    def qps_per_connection(self) -> int:
        """NCCL_IB_QPS_PER_CONNECTION that realises every planned split with an even data split.

        A flow planned as k equal subflows needs k QPs; NCCL's setting is global,
        so the answer is the lcm over flows (each flow then pins groups of QPs).
        """
        lcm = 1
        for p in self.phases:
            a, t = p.assignment, p.table
            explicit = (t.src[a.row] >= 0) & (a.spine >= 0)
            if not explicit.any():
                continue
            per_row = np.bincount(a.row[explicit], weights=a.count[explicit], minlength=len(t))
            for k in np.unique(per_row[per_row > 0]).astype(int).tolist():
                lcm = math.lcm(lcm, k)
        return lcm
