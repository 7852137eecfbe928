"""``python -m trainkit.run.torchrun_main ARGS``: torchrun, its worker store bound to one address.

Why: torch's ``TCPStore`` server listens on every interface whatever host name it is
given, and torchrun's c10d rendezvous hosts a second store on the rank-0 node for the
workers' bootstrap (``MASTER_ADDR:MASTER_PORT``, shared with the agent). With nothing
in front of it, a one-host job listened on ``*:PORT`` for anyone on the network. This
entry point pre-binds that store's socket to the node's rendezvous address (its
``--local-addr``, which ``trainkit run`` sets to loopback for a one-host job, else its
host name's address) and hands it over as ``master_listen_fd``; everything else is
torchrun. The hook is on a private torch method, so when it is missing (another torch)
torchrun runs unchanged.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["install", "main"]


def install() -> bool:
    """Make torchrun's shared worker store listen only on the node's address; False if
    this torch has no such hook."""
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr

    from trainkit.run.control import listen_socket

    handler = getattr(dr, "DynamicRendezvousHandler", None)
    original = getattr(handler, "_create_tcp_store_server", None)
    if original is None:
        return False

    def create(self: Any, master_addr: str, master_port: int) -> dist.TCPStore:
        try:
            sock = listen_socket(master_addr, master_port)
        except OSError:
            return original(self, master_addr, master_port)
        port = sock.getsockname()[1]
        return dist.TCPStore(host_name=master_addr, port=port, is_master=True, multi_tenant=True,
                             master_listen_fd=sock.detach())

    handler._create_tcp_store_server = create
    return True


def main(argv: list[str] | None = None) -> None:
    from torch.distributed import run

    install()
    if argv is not None:
        sys.argv[1:] = argv
    run.main()


if __name__ == "__main__":
    main()
