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
- ``tk/pool/<id>``: the node's warm pool (sequence number, ``started`` / ``ready`` /
  ``failed``), see :mod:`trainkit.run.pool`; a plan's ``warm`` names the pools to use and
  the store the coordinator hosts for that generation.
- ``tk/agg_secret``: the aggregator's secret, only for a multi-host job whose hosts were
  not given ``TRAINKIT_AGG_SECRET`` (the store has no authentication: see the README).

Where it listens: torch's ``TCPStore`` server always binds every interface, whatever
host name it is given, so :func:`host_store` binds the socket itself, to the
rendezvous host's address (loopback for a one-host job), and hands it over as
``master_listen_fd``.

The store is polled with ``check`` (non-blocking) rather than ``wait``, because a
``wait`` timeout logs a warning from C++ on every poll.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist


AGG_SECRET_KEY = "tk/agg_secret"


def bind_host(host: str) -> str:
    """The address to listen on for the rendezvous host ``host``: the address it names,
    except a non-loopback name that resolves to loopback here (Debian's ``127.0.1.1``
    hostname entry), which other hosts could not reach: that one gets every interface."""
    try:
        if ipaddress.ip_address(host):
            return host
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return host                     # let bind() report it
    addrs = [info[4][0] for info in infos]
    if host != "localhost" and addrs and all(ipaddress.ip_address(a.split("%")[0]).is_loopback
                                            for a in addrs):
        return ""
    return host


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``bind_host(host)``:``port`` (every interface for "")."""
    addr = bind_host(host)
    if not addr:
        if socket.has_dualstack_ipv6():
            return socket.create_server(("::", port), family=socket.AF_INET6, backlog=1024,
                                        dualstack_ipv6=True)
        return socket.create_server(("", port), backlog=1024)
    family, _, _, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def host_store(host: str, port: int, *, timeout: float = 30.0) -> dist.TCPStore:
    """Start the control/rendezvous store server (coordinator side), listening only on
    ``host``'s address (see the module docstring)."""
    sock = listen_socket(host, port)
    # The store's event loop takes the descriptor over (and closes it with the store).
    return dist.TCPStore(host, port, is_master=True, wait_for_workers=False, multi_tenant=True,
                         timeout=timedelta(seconds=timeout), master_listen_fd=sock.detach())


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
