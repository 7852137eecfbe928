"""Per-peer reachability probes over trainkit's own TCP, to localise a communication hang.

When every rank has issued collective #k and none has completed it, the
collective's timings carry no per-peer evidence: everyone is waiting. What
can still be asked is whether each pair of ranks can talk at all. Each rank
runs a tiny echo server on its own thread (never the training process group,
which is stuck); on request every rank connects to every peer with a short
timeout, sends a token and expects it back. A link that drops or blackholes
traffic fails in both directions; a rank whose host or process is frozen
fails with every peer (the kernel may accept the connection, but nobody
echoes) and does not answer the request itself.

Who calls what:

- rank side: ``CollectiveMonitor.start()`` creates a :class:`PeerProbeServer`
  before connecting to the aggregator and advertises its address in the
  hello; the channel thread hands it ``{"t": "peer_probe", "id", "peers",
  "timeout"}`` requests; :func:`probe_peers` runs them (one thread per peer)
  and the rank replies ``{"t": "peer_probe_result", "id", "results"}``;
- aggregator side: the hang classifier asks for a probe among the group's
  members and reads the answers with :func:`localise` (a pure function).

The probe travels the route the rank's own traffic to ``MASTER_ADDR`` takes,
which on a cluster is the data-plane interface gloo/NCCL bootstrap over.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["PeerProbeServer", "advertised_host", "listen_host", "localise", "peers_to_probe",
           "probe_peers"]

_TOKEN = b"trainkit-peer-probe\n"
_MAX_ALL_PAIRS = 64
_RING_REACH = 8


def advertised_host() -> str | None:
    """This host's address on the route to ``MASTER_ADDR`` (no packet is sent), else None."""
    master = os.environ.get("MASTER_ADDR")
    if not master:
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, int(os.environ.get("MASTER_PORT", "29500") or 29500)))
            host = s.getsockname()[0]
    except (OSError, ValueError):
        return None
    return None if host in ("0.0.0.0", "") else host


_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """A loopback literal or name (no lookup: a host name is not assumed to be local)."""
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen_host() -> str:
    """Where trainkit's own listeners of a rank bind (peer-probe server, self-started aggregator).

    Loopback when the job is on one host (``MASTER_ADDR`` unset or loopback, or
    ``LOCAL_WORLD_SIZE == WORLD_SIZE``); else this host's address on the route to
    ``MASTER_ADDR``, the rendezvous interface; all interfaces only when that cannot be told.
    """
    master = os.environ.get("MASTER_ADDR")
    local, world = os.environ.get("LOCAL_WORLD_SIZE"), os.environ.get("WORLD_SIZE")
    if not master or is_loopback(master) or (local and local == world):
        return "127.0.0.1"
    return advertised_host() or "0.0.0.0"


class PeerProbeServer:
    """An echo server on a daemon thread: reads the token, writes it back, closes."""

    def __init__(self, host: str = "127.0.0.1", *, io_timeout: float = 2.0):
        self.io_timeout = io_timeout
        self._sock = socket.create_server((host, 0), backlog=64)
        self._sock.settimeout(0.5)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name="trainkit-detect-peerprobe")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            # One short-lived thread per connection: a prober whose data stalls after
            # the handshake must not hold up the other peers' probes of this rank.
            threading.Thread(target=self._echo, args=(conn,), daemon=True,
                             name="trainkit-detect-peerprobe-echo").start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(self.io_timeout)
                data = b""
                while not data.endswith(b"\n") and len(data) < 256:
                    chunk = conn.recv(256)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        try:
            self._sock.close()
        except OSError:
            pass
        self._thread.join(timeout=2.0)


def _probe_one(host: str, port: int, timeout: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(max(0.05, timeout - (time.perf_counter() - t0)))
            s.sendall(_TOKEN)
            data = b""
            while len(data) < len(_TOKEN):
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
        if data != _TOKEN:
            return {"ok": False, "rtt_s": None, "error": "no echo (connection closed)"}
        return {"ok": True, "rtt_s": round(time.perf_counter() - t0, 6), "error": None}
    except OSError as exc:
        return {"ok": False, "rtt_s": None, "error": f"{type(exc).__name__}: {exc}"[:200]}


def peers_to_probe(me: int, members: Sequence[int]) -> list[int]:
    """Whom ``me`` probes: everyone in groups up to 64 ranks, else its 8 ring neighbours
    on each side (every link a ring collective uses is still covered)."""
    ranks = sorted(set(members))
    if me not in ranks:
        return []
    if len(ranks) <= _MAX_ALL_PAIRS:
        return [r for r in ranks if r != me]
    i, n = ranks.index(me), len(ranks)
    return sorted({ranks[(i + d) % n] for d in range(-_RING_REACH, _RING_REACH + 1)} - {me})


def probe_peers(peers: Mapping[int, Sequence[Any]], *, timeout: float = 1.0) -> dict[int, dict]:
    """Probe every ``rank -> (host, port)`` in parallel; returns each peer's result.

    Bounded by about ``timeout``, whatever the peers do: each probe has its own
    thread (at most ``len(peers)``, which :func:`peers_to_probe` keeps small).
    """
    results: dict[int, dict] = {}
    threads = []
    for rank, (host, port) in peers.items():
        def run(rank: int = rank, host: str = str(host), port: int = int(port)) -> None:
            results[rank] = _probe_one(host, port, timeout)

        t = threading.Thread(target=run, daemon=True, name="trainkit-detect-peerprobe-client")
        t.start()
        threads.append(t)
    deadline = time.monotonic() + timeout + 0.5
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    for rank in peers:
        results.setdefault(rank, {"ok": False, "rtt_s": None, "error": "probe did not finish"})
    return results


def localise(results: Mapping[int, Mapping[int, Mapping[str, Any]]],
             members: Sequence[int]) -> dict[str, Any]:
    """Name the rank or link the probes implicate, from ``results[prober][peer]``.

    - a pair failed if either direction failed;
    - failed pairs that all share one rank which did not answer the request
      itself: that rank (its host or process is frozen);
    - one failed pair: that link;
    - several failed pairs that all share one rank: that rank;
    - failed pairs with no common rank: every rank in them, no link;
    - every tested pair failed (more than one): not localised, since a firewall
      between hosts blocking the probe port looks the same;
    - no failure: not localised (the network between every pair works, so the
      hang is inside the ranks or the collective itself).
    """
    members = sorted(set(members))
    answered = sorted(r for r in members if r in results)
    unanswered = [r for r in members if r not in results]
    pair_ok: dict[tuple[int, int], bool] = {}
    rtt: dict[str, float] = {}
    errors: dict[str, str] = {}
    for prober, per_peer in results.items():
        for peer, res in per_peer.items():
            peer = int(peer)
            if peer == prober or peer not in members:
                continue
            key = (min(prober, peer), max(prober, peer))
            ok = bool(res.get("ok"))
            pair_ok[key] = pair_ok.get(key, True) and ok
            if ok and res.get("rtt_s") is not None:
                rtt[f"{prober}->{peer}"] = float(res["rtt_s"])
            elif not ok:
                errors[f"{prober}->{peer}"] = str(res.get("error"))
    failed = sorted(k for k, ok in pair_ok.items() if not ok)
    out: dict[str, Any] = {"answered": answered, "unanswered": unanswered,
                           "pairs_tested": len(pair_ok), "failed_pairs": [list(p) for p in failed],
                           "errors": errors, "rtt_s": rtt, "ranks": [], "link": None,
                           "localised": False}
    if not failed:
        out["summary"] = (f"all {len(pair_ok)} tested pairs answered over trainkit's side "
                          "channel; the network does not localise the hang"
                          if pair_ok else "no probe answers; nothing localises the hang")
        return out
    if len(failed) == len(pair_ok) > 1:
        out["summary"] = (f"every one of the {len(pair_ok)} tested pairs failed: the probe "
                          "ports may be blocked between hosts; nothing localised")
        return out
    involved = sorted({r for p in failed for r in p})
    common = set(failed[0]).intersection(*failed[1:]) if len(failed) > 1 else set(failed[0])
    silent = sorted(common & set(unanswered))
    if len(silent) == 1:
        out.update(ranks=silent, localised=True,
                   summary=f"rank {silent[0]} fails its probes with {len(failed)} peer(s) "
                           "and did not answer the probe request")
    elif len(failed) == 1:
        out.update(ranks=list(failed[0]), link=failed[0], localised=True,
                   summary=f"only the link {failed[0][0]}-{failed[0][1]} fails its probes")
    elif len(common) == 1:
        (rank,) = common
        out.update(ranks=[rank], localised=True,
                   summary=f"rank {rank} fails its probes with {len(failed)} peer(s)")
    else:
        out.update(ranks=involved, localised=True,
                   summary=f"{len(failed)} pairs fail their probes with no common rank")
    return out
