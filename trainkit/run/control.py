"""The control plane between the coordinator and the node agents.

It is a torch ``TCPStore`` hosted by the coordinator on the rendezvous endpoint. torchrun's
c10d rendezvous of every generation uses the same store (as a client, ``is_host=false``)
under its own run id, so one port serves both, and nothing here is a home-made cluster
runtime: just a handful of keys.

Keys (all JSON values):

- ``tk/node/<id>``: an agent registered (host, pid).
- ``tk/hb/<id>``: the agent's last heartbeat (unix seconds).
- ``tk/gen/<g>/plan``: generation g: members, node indices, rendezvous id, aggregator.
- ``tk/gen/<g>/stop``: the coordinator wants generation g stopped (reason).
- ``tk/gen/<g>/exit/<id>``: how generation g ended on an agent (rc, stopped, exit codes).
- ``tk/final``: the job is over (``done`` or ``give_up``); agents exit.
- ``tk/bye/<id>`` / ``tk/left/<id>``: an agent saw the end, or was excluded and left.

The store is polled with ``check`` (non-blocking) rather than ``wait``, because a
``wait`` timeout logs a warning from C++ on every poll.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist


def host_store(host: str, port: int, *, timeout: float = 30.0) -> dist.TCPStore:
    """Start the control/rendezvous store server (coordinator side)."""
    return dist.TCPStore(host, port, is_master=True, wait_for_workers=False, multi_tenant=True,
                         timeout=timedelta(seconds=timeout))


def connect_store(host: str, port: int, *, timeout: float = 60.0) -> dist.TCPStore:
    """Connect to the coordinator's store (agent side); retries until ``timeout``."""
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout))


class Control:
    """Typed access to the control keys of one job."""

    def __init__(self, store: dist.TCPStore) -> None:
        self.store = store

    def put(self, key: str, value: Any) -> None:
        self.store.set(key, json.dumps(value))

    def get(self, key: str) -> Any | None:
        if not self.store.check([key]):
            return None
        return json.loads(self.store.get(key))

    def wait(self, key: str, timeout: float, *, poll: float = 0.05,
             also: str | None = None) -> Any | None:
        """Poll for ``key`` (or ``also``) until ``timeout``; returns its value or None."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.get(key)
            if value is not None:
                return value
            if also is not None and self.get(also) is not None:
                return None
            if time.monotonic() >= deadline:
                return None
            time.sleep(poll)

    def nodes(self) -> list[str]:
        """Registered node ids, in registration order."""
        count = int(self.store.add("tk/nodes/count", 0))
        return [json.loads(self.store.get(f"tk/nodes/{i}"))["id"] for i in range(count)
                if self.store.check([f"tk/nodes/{i}"])]

    def register(self, node_id: str, info: dict[str, Any]) -> None:
        self.put(f"tk/node/{node_id}", info)
        index = int(self.store.add("tk/nodes/count", 1)) - 1
        self.put(f"tk/nodes/{index}", {"id": node_id, **info})
