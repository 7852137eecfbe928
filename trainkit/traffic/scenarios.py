"""Random topologies and jobs for tests and the benchmark.

Why in the package: the optimality evidence (split == LP on many random
instances) and the benchmark draw from the same generator, so a figure in
docs/benchmarks.md can be reproduced from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainkit.traffic.collectives import COLLECTIVES, Flows, collective, combine
from trainkit.traffic.topology import LeafSpine, LinkSpec

__all__ = ["Instance", "random_instance", "random_impairment", "NAMES"]

NAMES = tuple(name for name in COLLECTIVES if name != "allreduce_double_binary_tree")


@dataclass(frozen=True, eq=False)
class Instance:
    topo: LeafSpine
    flows: Flows
    label: str


def _placement(rng: np.random.Generator, topo: LeafSpine, n: int, pool: np.ndarray) -> np.ndarray:
    """n NICs from pool, unevenly spread across leaves, in a shuffled or sorted rank order."""
    weights = rng.dirichlet(np.full(topo.leaves, 0.7))[topo.leaf_of(pool)]
    chosen = rng.choice(pool, size=n, replace=False, p=weights / weights.sum())
    return chosen if rng.random() < 0.5 else np.sort(chosen)


def random_instance(rng: np.random.Generator, *, max_leaves: int = 6, max_spines: int = 6) -> Instance:
    """A small random fabric (possibly oversubscribed) with one or two jobs on it."""
    leaves = int(rng.integers(2, max_leaves + 1))
    spines = int(rng.integers(1, max_spines + 1))
    links = int(rng.choice([1, 1, 2]))
    hosts = int(rng.integers(1, 5))
    nics = int(rng.choice([1, 1, 2]))
    layout = "rail" if nics > 1 and leaves % nics == 0 and rng.random() < 0.3 else "default"
    host_gbps = float(rng.choice([100, 200, 400]))
    oversub = float(rng.choice([1, 2, 4]))
    uplink = host_gbps * hosts * nics / (spines * links * oversub)
    topo = LeafSpine(leaves=leaves, spines=spines, hosts_per_leaf=hosts, nics_per_host=nics, host_gbps=host_gbps,
                     uplink_gbps=float(uplink), links_per_spine=links, layout=layout)
    pool = rng.permutation(topo.nics)
    jobs = []
    for _ in range(1 if rng.random() < 0.7 or topo.nics < 4 else 2):
        if len(pool) < 2:
            break
        n = int(rng.integers(2, len(pool) + 1)) if len(jobs) == 0 else len(pool)
        n = min(n, int(rng.integers(2, len(pool) + 1)))
        members = _placement(rng, topo, n, pool)
        pool = np.setdiff1d(pool, members)
        name = str(rng.choice(NAMES))
        nbytes = float(rng.choice([1 << 20, 3 << 20, 64 << 20, 1e9]))
        jobs.append(collective(name, hosts=members.tolist(), nbytes=nbytes, channels=int(rng.integers(1, 4))))
    flows = jobs[0] if len(jobs) == 1 else combine(*jobs)
    label = f"L{leaves}xS{spines}x{links} h{hosts}n{nics} {layout} {oversub:g}:1 jobs={len(jobs)}"
    return Instance(topo, flows, label)


def random_impairment(rng: np.random.Generator, topo: LeafSpine, *, links: int = 1) -> LeafSpine:
    """topo with ``links`` random cables down or degraded (factor 0.25-0.9)."""
    specs = []
    for _ in range(links):
        leaf, spine = int(rng.integers(topo.leaves)), int(rng.integers(topo.spines))
        link = int(rng.integers(topo.links_per_spine)) if topo.links_per_spine > 1 else None
        factor = 0.0 if rng.random() < 0.5 else float(rng.uniform(0.25, 0.9))
        specs.append(LinkSpec(leaf, spine, link, factor))
    return topo.with_impaired(*specs)
