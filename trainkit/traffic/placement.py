"""Placement: which host (and NIC) sits under which leaf.

Why a file of its own: the detector names ranks and hosts, the planner knows NIC
indices and leaves. The placement is the one fact that joins them, and it is a
property of the cluster's cabling, not of the job, so it lives next to the
topology (a ``[placement]`` table in the topology file, or a file of its own)::

    [placement]
    node0 = { leaf = 0 }
    node1 = { leaf = 1, nic = 2 }     # nic: the topology's NIC index (optional)
    node2 = { leaf = 2, nic = [4, 5] } # one NIC per local rank
    "gpu-host-17" = "leaf3"           # shorthand: the leaf alone

Or as an array, one table per host (``[[placement]]`` with ``host``, ``leaf``,
``nic``). A host without ``nic`` gets the next free NIC of its leaf, in file
order. Validation against the topology: an unknown leaf, a NIC outside the
fabric or on another leaf, two hosts on one NIC, and a host named twice are
errors that name the file and the host.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainkit.traffic.errors import TrafficError
from trainkit.traffic.topology import LeafSpine

__all__ = ["HostPlace", "Placement", "PlacementError", "load_placement", "placement_from_mapping"]


class PlacementError(TrafficError):
    """A placement that does not parse or does not fit the topology."""


@dataclass(frozen=True, slots=True)
class HostPlace:
    """Where one host is cabled: its leaf and the topology NIC indices it uses
    (one per local rank; a host with one NIC serves all its ranks through it)."""

    leaf: int
    nics: tuple[int, ...]
    nic_given: bool = False

    def nic(self, local_rank: int | None = None) -> int:
        if local_rank is not None and 0 <= local_rank < len(self.nics):
            return self.nics[local_rank]
        return self.nics[0]


@dataclass(frozen=True, slots=True)
class Placement:
    """Host name -> :class:`HostPlace`, validated against one topology."""

    hosts: Mapping[str, HostPlace]
    source: str = "placement"

    def leaf(self, host: str) -> int | None:
        place = self.hosts.get(host)
        return None if place is None else place.leaf

    def nic(self, host: str, local_rank: int | None = None) -> int | None:
        """The NIC of ``host`` (of its ``local_rank``-th rank, when it lists one per rank)."""
        place = self.hosts.get(host)
        return None if place is None else place.nic(local_rank)

    def to_dict(self) -> dict[str, Any]:
        def nic(p: HostPlace) -> dict[str, Any]:
            return {"nic": p.nics[0] if len(p.nics) == 1 else list(p.nics)} if p.nic_given else {}
        return {h: {"leaf": p.leaf, **nic(p)} for h, p in self.hosts.items()}


_LEAF_RE = re.compile(r"^\s*(?:leaf)?(\d+)\s*$")


def _leaf_value(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _LEAF_RE.match(value):
        return int(_LEAF_RE.match(value).group(1))  # type: ignore[union-attr]
    raise PlacementError(where, f"leaf must be an integer or 'leafN', got {value!r}")


def _entries(data: Any, source: str) -> list[tuple[str, Any]]:
    """(host, value) pairs in file order, from the table or the array form."""
    if isinstance(data, Mapping):
        return list(data.items())
    if isinstance(data, list):
        out = []
        for n, item in enumerate(data):
            if not isinstance(item, Mapping) or "host" not in item:
                raise PlacementError(f"{source}: placement[{n}]", "each entry needs 'host' and 'leaf'")
            rest = {k: v for k, v in item.items() if k != "host"}
            out.append((str(item["host"]), rest))
        return out
    raise PlacementError(source, "[placement] must be a table (host = {leaf = N}) or an array of tables")


def placement_from_mapping(data: Any, topo: LeafSpine, *, source: str = "placement") -> Placement:
    """Validate ``data`` (the ``[placement]`` content) against ``topo``."""
    entries = _entries(data, source)
    if not entries:
        raise PlacementError(source, "the placement names no host")
    seen: set[str] = set()
    parsed: list[tuple[str, int, tuple[int, ...] | None]] = []
    for host, value in entries:
        where = f"{source}: host {host!r}"
        if host in seen:
            raise PlacementError(where, "is placed twice (duplicate host)")
        seen.add(host)
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"leaf", "nic"})
            if unknown:
                raise PlacementError(where, f"unknown field {unknown[0]!r}; known: leaf, nic")
            if "leaf" not in value:
                raise PlacementError(where, "missing 'leaf'")
            leaf, nic = _leaf_value(value["leaf"], where), value.get("nic")
        else:
            leaf, nic = _leaf_value(value, where), None
        if not 0 <= leaf < topo.leaves:
            raise PlacementError(where, f"unknown leaf {leaf}: the topology has leaves 0-{topo.leaves - 1}")
        nics = None if nic is None else tuple(nic) if isinstance(nic, list) else (nic,)
        for one in nics or ():
            if not isinstance(one, int) or isinstance(one, bool) or not 0 <= one < topo.nics:
                raise PlacementError(where, f"nic must be a NIC index 0-{topo.nics - 1} (or a list), got {nic!r}")
            if int(topo.leaf_of(one)) != leaf:
                raise PlacementError(where, f"nic {one} sits on leaf{int(topo.leaf_of(one))}, not leaf{leaf}")
        if nics == ():
            raise PlacementError(where, "nic list is empty")
        parsed.append((host, leaf, nics))
    used: dict[int, str] = {}
    for host, _, nics in parsed:
        for one in nics or ():
            if one in used:
                raise PlacementError(f"{source}: host {host!r}", f"nic {one} is already {used[one]!r}'s")
            used[one] = host
    free = {leaf: [n for n in range(topo.nics) if int(topo.leaf_of(n)) == leaf and n not in used]
            for leaf in range(topo.leaves)}
    hosts: dict[str, HostPlace] = {}
    for host, leaf, nics in parsed:
        if nics is None:
            if not free[leaf]:
                raise PlacementError(f"{source}: host {host!r}", f"leaf{leaf} has no free NIC left")
            hosts[host] = HostPlace(leaf, (free[leaf].pop(0),))
        else:
            hosts[host] = HostPlace(leaf, nics, True)
    return Placement(hosts, source)


def _duplicate_in_toml(path: Path, exc: tomllib.TOMLDecodeError) -> str:
    """tomllib says 'Cannot overwrite a value' for a key given twice: name the host."""
    m = re.search(r"line (\d+)", str(exc))
    if m and "overwrite" in str(exc):
        line = path.read_text().splitlines()[int(m.group(1)) - 1]
        key = line.split("=", 1)[0].strip().strip('"\'')
        return f"host {key!r} is placed twice (duplicate host, line {m.group(1)})"
    return f"cannot parse: {exc}"


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PlacementError("placement", f"file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
            keys = [k for k, _ in items]
            dup = next((k for k in keys if keys.count(k) > 1), None)
            if dup is not None:
                raise PlacementError(str(path), f"host {dup!r} is placed twice (duplicate host)")
            return dict(items)
        try:
            data = json.loads(text, object_pairs_hook=pairs)
        except json.JSONDecodeError as exc:
            raise PlacementError(str(path), f"cannot parse: {exc}") from None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PlacementError(str(path), _duplicate_in_toml(path, exc)) from None
    if not isinstance(data, dict):
        raise PlacementError(str(path), "must hold a table/object at top level")
    return data


def load_placement(path: str | Path, topo: LeafSpine) -> Placement:
    """The ``[placement]`` table of ``path`` (a placement file, or the topology file
    that carries one), validated against ``topo``."""
    path = Path(path)
    data = _read(path)
    if "placement" not in data:
        raise PlacementError(str(path), "no [placement] table (host = {leaf = N, nic = M})")
    return placement_from_mapping(data["placement"], topo, source=str(path))
