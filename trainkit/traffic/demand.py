"""One phase as a flow table: NIC-level rows, or leaf-pair aggregates at scale.

Why a table: planners, loads and the simulator are vectorised over rows. A row
is ``count`` identical flows of ``size`` bytes from ``src_leaf`` to
``dst_leaf``; explicit flows have ``count == 1`` and real NIC indices, while a
large all-to-all becomes one row per leaf pair (``src == dst == -1``) so a 16k
GPU all-to-all is 16k rows instead of 268M. Host-link bytes are kept per NIC
apart from the rows because they do not depend on the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainkit.traffic.collectives import Phase
from trainkit.traffic.errors import JobError
from trainkit.traffic.topology import LeafSpine

__all__ = ["FlowTable", "build_table", "EXPAND_LIMIT"]

EXPAND_LIMIT = 1 << 18  # dense groups with more ordered pairs than this (n > 512) are aggregated


@dataclass(frozen=True, eq=False)
class FlowTable:
    src: np.ndarray  # NIC, -1 for aggregated rows
    dst: np.ndarray
    src_leaf: np.ndarray
    dst_leaf: np.ndarray
    size: np.ndarray  # bytes of one flow
    count: np.ndarray  # identical flows in the row
    host_tx: np.ndarray  # bytes each NIC sends (indexed by NIC)
    host_rx: np.ndarray

    def __len__(self) -> int:
        return len(self.src)

    @property
    def aggregated(self) -> np.ndarray:
        return self.src < 0

    @property
    def inter(self) -> np.ndarray:
        return self.src_leaf != self.dst_leaf

    @property
    def row_bytes(self) -> np.ndarray:
        return self.size * self.count


def _check_fits(topo: LeafSpine, nics: np.ndarray) -> None:
    if len(nics) and int(nics.max()) >= topo.nics:
        raise JobError(
            "hosts",
            f"job uses NIC {int(nics.max())} but the topology has {topo.nics} NICs "
            f"({topo.leaves} leaves x {topo.hosts_per_leaf} hosts x {topo.nics_per_host} NICs)",
        )


def build_table(topo: LeafSpine, phase: Phase, *, expand_limit: int = EXPAND_LIMIT) -> FlowTable:
    """Flow table of ``phase`` on ``topo`` (raises JobError if the job does not fit)."""
    srcs, dsts, sizes, counts = [phase.src], [phase.dst], [phase.nbytes], [np.ones(len(phase.src), np.int64)]
    agg_src_leaf, agg_dst_leaf = [], []
    _check_fits(topo, phase.src)
    _check_fits(topo, phase.dst)
    host_tx = np.bincount(phase.src, weights=phase.nbytes, minlength=topo.nics).astype(np.float64)
    host_rx = np.bincount(phase.dst, weights=phase.nbytes, minlength=topo.nics).astype(np.float64)
    for group in phase.dense:
        _check_fits(topo, group.members)
        n = len(group.members)
        host_tx[group.members] += (n - 1) * group.pair_bytes
        host_rx[group.members] += (n - 1) * group.pair_bytes
        if group.flow_count <= expand_limit:
            a, b = np.meshgrid(group.members, group.members, indexing="ij")
            keep = a != b
            srcs.append(a[keep])
            dsts.append(b[keep])
            sizes.append(np.full(int(keep.sum()), group.pair_bytes))
            counts.append(np.ones(int(keep.sum()), np.int64))
            continue
        per_leaf = np.bincount(topo.leaf_of(group.members), minlength=topo.leaves)
        pair_count = np.outer(per_leaf, per_leaf) - np.diag(per_leaf)
        li, lj = np.nonzero(pair_count)
        srcs.append(np.full(len(li), -1, np.int64))
        dsts.append(np.full(len(li), -1, np.int64))
        sizes.append(np.full(len(li), group.pair_bytes))
        counts.append(pair_count[li, lj].astype(np.int64))
        agg_src_leaf.append(li)
        agg_dst_leaf.append(lj)
    src = np.concatenate(srcs).astype(np.int64)
    dst = np.concatenate(dsts).astype(np.int64)
    src_leaf = topo.leaf_of(np.maximum(src, 0))
    dst_leaf = topo.leaf_of(np.maximum(dst, 0))
    if agg_src_leaf:
        mask = src < 0
        src_leaf[mask] = np.concatenate(agg_src_leaf)
        dst_leaf[mask] = np.concatenate(agg_dst_leaf)
    return FlowTable(
        src, dst, src_leaf.astype(np.int64), dst_leaf.astype(np.int64),
        np.concatenate(sizes).astype(np.float64), np.concatenate(counts).astype(np.int64), host_tx, host_rx,
    )
