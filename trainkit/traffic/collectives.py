"""Collectives -> flows, phase by phase.

A *phase* is one set of flows that run together; a pattern that repeats (every
step of a ring) is one phase with a ``repeat`` count, so a 16k-rank ring is one
phase of 16k flows, not 32k phases. All-to-all is kept as a dense group and only
expanded to NIC pairs when that is small enough; planners aggregate it by leaf
pair otherwise (16k GPUs would be 268M host pairs).

``hosts`` are global NIC indices in rank order: rank ``r`` runs on NIC
``hosts[r]``. Sizes follow NCCL's conventions: ``nbytes`` is the all-reduce
buffer, the all-gather output, the reduce-scatter input, and each rank's
all-to-all send buffer.

Example::

    flows = collective("allreduce_ring", hosts=list(range(256)), nbytes=256 << 20, channels=2)
    flows.phases[0].repeat      # 510 = 2 (n - 1)
    both = combine(flows, collective("alltoall", hosts=range(256, 512), nbytes=1 << 30))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from trainkit.traffic.errors import JobError

__all__ = ["Phase", "DenseGroup", "Flows", "collective", "combine", "flows_from_pairs", "COLLECTIVES"]


@dataclass(frozen=True, eq=False)
class DenseGroup:
    """All-to-all among ``members``: every ordered pair exchanges ``pair_bytes``."""

    members: np.ndarray
    pair_bytes: float

    @property
    def flow_count(self) -> int:
        n = len(self.members)
        return n * (n - 1)


@dataclass(frozen=True, eq=False)
class Phase:
    """Flows that run together, ``repeat`` times back to back."""

    name: str
    repeat: int
    src: np.ndarray
    dst: np.ndarray
    nbytes: np.ndarray
    dense: tuple[DenseGroup, ...] = ()

    @property
    def flow_count(self) -> int:
        return len(self.src) + sum(g.flow_count for g in self.dense)

    @property
    def total_bytes(self) -> float:
        return float(self.nbytes.sum()) + sum(g.flow_count * g.pair_bytes for g in self.dense)


def _phase(name: str, repeat: int, src: Sequence[int] | np.ndarray, dst, nbytes) -> Phase:
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    nbytes = np.broadcast_to(np.asarray(nbytes, dtype=np.float64), src.shape).copy()
    return Phase(name, int(repeat), src, dst, nbytes)


@dataclass(frozen=True, eq=False)
class Flows:
    """The phases of one job (or of several jobs merged by :func:`combine`)."""

    phases: tuple[Phase, ...]
    nics: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __iter__(self):
        return iter(self.phases)

    def __len__(self) -> int:
        return len(self.phases)

    def __add__(self, other: "Flows") -> "Flows":
        return combine(self, other)


# ---- individual collectives ----------------------------------------------
def _ring(hosts: np.ndarray, nbytes: float, steps: int, channels: int, name: str) -> list[Phase]:
    n = len(hosts)
    if n < 2:
        return []
    src = np.tile(hosts, channels)
    dst = np.tile(np.roll(hosts, -1), channels)
    return [_phase(name, steps, src, dst, nbytes / (n * channels))]


def _allreduce_ring(hosts, nbytes, channels=1):
    return _ring(hosts, nbytes, 2 * (len(hosts) - 1), channels, "ring")


def _allgather_ring(hosts, nbytes, channels=1):
    return _ring(hosts, nbytes, len(hosts) - 1, channels, "allgather")


def _reducescatter_ring(hosts, nbytes, channels=1):
    return _ring(hosts, nbytes, len(hosts) - 1, channels, "reducescatter")


def _btree_parents(n: int) -> np.ndarray:
    """NCCL's binary tree (ncclGetBtree): parent of every rank, -1 for the root (rank 0)."""
    ranks = np.arange(n, dtype=np.int64)
    bit = ranks & -ranks
    up = (ranks ^ bit) | (bit << 1)
    up = np.where(up >= n, ranks ^ bit, up)
    up[0] = -1
    return up


def _allreduce_tree(hosts, nbytes, channels=1):
    """Double binary tree: two trees, each reducing then broadcasting half the data."""
    n = len(hosts)
    if n < 2:
        return []
    parent1 = _btree_parents(n)
    ranks = np.arange(n)
    if n % 2 == 0:  # mirrored tree, as NCCL does for even counts
        parent2 = np.where(parent1[n - 1 - ranks] < 0, -1, n - 1 - parent1[n - 1 - ranks])
    else:  # shifted tree for odd counts
        shifted = parent1[(ranks - 1) % n]
        parent2 = np.where(shifted < 0, -1, (shifted + 1) % n)
    child = np.concatenate([ranks[parent1 >= 0], ranks[parent2 >= 0]])
    parent = np.concatenate([parent1[parent1 >= 0], parent2[parent2 >= 0]])
    child, parent = np.tile(child, channels), np.tile(parent, channels)
    size = nbytes / (2 * channels)
    return [
        _phase("tree_reduce", 1, hosts[child], hosts[parent], size),
        _phase("tree_broadcast", 1, hosts[parent], hosts[child], size),
    ]


def _fold(hosts: np.ndarray, nbytes: float) -> tuple[int, list[Phase], list[Phase]]:
    """Non-power-of-two counts: the extra ranks hand their data to a partner first."""
    n = len(hosts)
    p = 1 << (n.bit_length() - 1)
    if p == n:
        return p, [], []
    extra = np.arange(p, n)
    pre = [_phase("fold_in", 1, hosts[extra], hosts[extra - p], nbytes)]
    post = [_phase("fold_out", 1, hosts[extra - p], hosts[extra], nbytes)]
    return p, pre, post


def _exchange(hosts: np.ndarray, p: int, distance: int, size: float, name: str) -> Phase:
    ranks = np.arange(p)
    return _phase(name, 1, hosts[ranks], hosts[ranks ^ distance], size)


def _allreduce_halving_doubling(hosts, nbytes, channels=1):
    """Rabenseifner: recursive-halving reduce-scatter, then recursive-doubling all-gather."""
    if len(hosts) < 2:
        return []
    p, pre, post = _fold(hosts, nbytes)
    steps = p.bit_length() - 1
    rs = [_exchange(hosts, p, p >> (k + 1), nbytes / (2 << k), f"halving{k}") for k in range(steps)]
    ag = [_exchange(hosts, p, p >> (k + 1), nbytes / (2 << k), f"doubling{k}") for k in reversed(range(steps))]
    return pre + rs + ag + post


def _allreduce_recursive_doubling(hosts, nbytes, channels=1):
    """Every step exchanges the whole buffer with the partner at distance 2^k."""
    if len(hosts) < 2:
        return []
    p, pre, post = _fold(hosts, nbytes)
    steps = p.bit_length() - 1
    return pre + [_exchange(hosts, p, 1 << k, nbytes, f"doubling{k}") for k in range(steps)] + post


def _alltoall(hosts, nbytes, channels=1):
    n = len(hosts)
    if n < 2:
        return []
    empty = np.zeros(0, dtype=np.int64)
    group = DenseGroup(hosts.copy(), nbytes / n)
    return [Phase("alltoall", 1, empty, empty, np.zeros(0), (group,))]


COLLECTIVES: dict[str, Callable[..., list[Phase]]] = {
    "allreduce_ring": _allreduce_ring,
    "allreduce_tree": _allreduce_tree,
    "allreduce_double_binary_tree": _allreduce_tree,
    "allreduce_halving_doubling": _allreduce_halving_doubling,
    "allreduce_recursive_doubling": _allreduce_recursive_doubling,
    "alltoall": _alltoall,
    "allgather_ring": _allgather_ring,
    "reducescatter_ring": _reducescatter_ring,
}


def collective(name: str, *, hosts: Iterable[int], nbytes: float, channels: int = 1) -> Flows:
    """Flows of one collective over ``hosts`` (global NIC indices, in rank order).

    ``channels`` is NCCL's number of rings/trees; each channel is its own
    connection (its own flow), carrying ``1/channels`` of the data.
    """
    if name not in COLLECTIVES:
        raise JobError("collective", f"unknown collective {name!r}; choose from {', '.join(COLLECTIVES)}")
    hosts_arr = np.asarray(list(hosts), dtype=np.int64)
    if hosts_arr.ndim != 1 or len(hosts_arr) == 0:
        raise JobError("hosts", "must be a non-empty list of NIC indices")
    if (hosts_arr < 0).any():
        raise JobError("hosts", f"NIC indices must be >= 0, got {int(hosts_arr.min())}")
    if len(np.unique(hosts_arr)) != len(hosts_arr):
        raise JobError("hosts", "a NIC appears twice; each rank needs its own NIC")
    if not isinstance(nbytes, (int, float, np.integer, np.floating)) or not nbytes > 0:
        raise JobError("nbytes", f"must be a positive byte count, got {nbytes!r}")
    if not isinstance(channels, (int, np.integer)) or channels < 1:
        raise JobError("channels", f"must be a positive integer, got {channels!r}")
    phases = COLLECTIVES[name](hosts_arr, float(nbytes), int(channels))
    return Flows(tuple(phases), np.sort(hosts_arr))


def flows_from_pairs(src, dst, nbytes, *, repeat: int = 1, name: str = "custom") -> Flows:
    """One phase of explicit flows ``src[k] -> dst[k]`` (NIC indices) of ``nbytes[k]`` bytes."""
    src_arr = np.asarray(src, dtype=np.int64)
    dst_arr = np.asarray(dst, dtype=np.int64)
    if src_arr.shape != dst_arr.shape or src_arr.ndim != 1:
        raise JobError("dst", "src and dst must be equally long lists of NIC indices")
    if len(src_arr) and (min(src_arr.min(), dst_arr.min()) < 0):
        raise JobError("src", "NIC indices must be >= 0")
    size = np.broadcast_to(np.asarray(nbytes, dtype=np.float64), src_arr.shape)
    if (size <= 0).any():
        raise JobError("nbytes", "flow sizes must be positive")
    if (src_arr == dst_arr).any():
        raise JobError("dst", "a flow cannot go from a NIC to itself")
    phase = _phase(name, repeat, src_arr, dst_arr, size)
    return Flows((phase,), np.unique(np.concatenate([src_arr, dst_arr])))


def combine(*jobs: Flows) -> Flows:
    """Several jobs on one fabric, stepping phase by phase together.

    Model: job phases line up in order, and repeat counts are merged run-length
    style, so a phase that repeats 30 times next to one that repeats 10 times
    becomes 10 shared repeats followed by 20 alone.
    """
    if not jobs:
        raise JobError("jobs", "combine() needs at least one job")
    nics = np.concatenate([job.nics for job in jobs])
    if len(np.unique(nics)) != len(nics):
        raise JobError("hosts", "two jobs share a NIC; give each job its own NICs")
    queues = [[[phase, phase.repeat] for phase in job.phases] for job in jobs]
    merged: list[Phase] = []
    while any(queues):
        current = [queue[0] for queue in queues if queue]
        run = min(item[1] for item in current)
        parts = [item[0] for item in current]
        if len(parts) == 1:
            merged.append(Phase(parts[0].name, run, parts[0].src, parts[0].dst, parts[0].nbytes, parts[0].dense))
        else:
            merged.append(
                Phase(
                    "+".join(p.name for p in parts),
                    run,
                    np.concatenate([p.src for p in parts]),
                    np.concatenate([p.dst for p in parts]),
                    np.concatenate([p.nbytes for p in parts]),
                    tuple(g for p in parts for g in p.dense),
                )
            )
        for queue in queues:
            if queue:
                queue[0][1] -= run
                if queue[0][1] == 0:
                    queue.pop(0)
    return Flows(tuple(merged), np.sort(nics))
