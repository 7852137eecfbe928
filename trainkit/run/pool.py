"""The warm pool: pre-started workers that can join any membership.

Why: a restart after an exclusion used to be cold. The warm generation each agent
pre-started was a multi-node torchrun of the *current* members, so when a node was
excluded it was discarded, and the survivors paid torchrun, Python and torch start-up
again (about 6.6 s after the decision in the drill, on a quiet machine).

Now each node's agent pre-starts a *one-node* torchrun whose workers import what a
training script needs and wait on a go file (:mod:`trainkit.run.warm`). Nothing in them
depends on the membership yet: the go file carries it. When the coordinator starts a
generation on pools, it hosts a fresh ``TCPStore`` for that generation (the workers'
``env://`` rendezvous, what torchrun's agent store is in a cold start) and every member's
agent writes a go file with the generation's environment: the node's rank among the
members, the member count, the store's address, the generation. Each warm worker turns
that into ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/... and runs the script. torchrun still
supervises each node's workers (exit codes, signals); only the cross-node rendezvous of
a warm generation is the per-generation store instead of torchrun's c10d rendezvous.

Keys (control store, JSON): ``tk/pool/<node>``: ``{"seq": k, "state": "started" |
"ready" | "failed", "time": t}``, the node's current pool, written by its agent.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from trainkit.run.control import Control, listen_socket

__all__ = ["GenerationStore", "GoPlan", "pool_key", "pools_ready", "worker_env", "write_go"]


def pool_key(node: str) -> str:
    return f"tk/pool/{node}"


@dataclass(frozen=True, kw_only=True, slots=True)
class GoPlan:
    """What a warm node needs to join a generation: written into its go file."""

    node_rank: int
    nnodes: int
    master_addr: str
    master_port: int
    run_id: str
    env: dict[str, str]      # trainkit's per-generation variables (generation, node index, ...)

    def to_json(self) -> dict[str, Any]:
        return {"node_rank": self.node_rank, "nnodes": self.nnodes,
                "master_addr": self.master_addr, "master_port": self.master_port,
                "run_id": self.run_id, "env": dict(self.env)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GoPlan:
        return cls(node_rank=int(d["node_rank"]), nnodes=int(d["nnodes"]),
                   master_addr=str(d["master_addr"]), master_port=int(d["master_port"]),
                   run_id=str(d["run_id"]), env={str(k): str(v) for k, v in d["env"].items()})


def write_go(path: Path, go: GoPlan) -> None:
    """Atomically: a worker polls for the file and reads it the moment it appears."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(go.to_json()))
    os.replace(tmp, path)


def worker_env(go: GoPlan, *, local_rank: int, local_world_size: int) -> dict[str, str]:
    """The variables torchrun would have given this worker in a cold start of the same
    membership: ranks follow the node's position among the members, as the pinned
    per-node addresses make the c10d rendezvous order them."""
    rank = go.node_rank * local_world_size + local_rank
    world = go.nnodes * local_world_size
    return {**go.env, "RANK": str(rank), "WORLD_SIZE": str(world), "ROLE_RANK": str(rank),
            "ROLE_WORLD_SIZE": str(world), "GROUP_RANK": str(go.node_rank),
            "GROUP_WORLD_SIZE": str(go.nnodes), "MASTER_ADDR": go.master_addr,
            "MASTER_PORT": str(go.master_port), "TORCHELASTIC_RUN_ID": go.run_id,
            "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"}


class GenerationStore:
    """The workers' rendezvous store of one warm generation, hosted by the coordinator
    and listening only on the rendezvous host's address (loopback for a one-host job),
    as the control store does (:mod:`trainkit.run.control`)."""

    def __init__(self, host: str, *, timeout: float = 60.0) -> None:
        sock = listen_socket(host, 0)
        self.host = host
        self.port = sock.getsockname()[1]
        self.store = dist.TCPStore(host, self.port, is_master=True, wait_for_workers=False,
                                   multi_tenant=True, timeout=timedelta(seconds=timeout),
                                   master_listen_fd=sock.detach())

    def close(self) -> None:
        self.store = None   # the server thread stops with the last reference


def pools_ready(control: Control, members: tuple[str, ...], *, wait: float) -> dict[str, int] | None:
    """Each member's ready pool sequence number, or None if some member has none.

    A pool that was started but is still importing is waited for (up to ``wait``): it is
    ahead of a cold start in every case. A member with no pool, or a failed one, means
    a cold start.
    """
    deadline = time.monotonic() + wait
    while True:
        states = {m: control.get(pool_key(m)) for m in members}
        if any(s is None or s.get("state") == "failed" for s in states.values()):
            return None
        if all(s.get("state") == "ready" for s in states.values()):
            return {m: int(s["seq"]) for m, s in states.items()}
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)
