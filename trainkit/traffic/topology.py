"""Leaf-spine topology: NIC placement, directed links, failures and degradation.

Why one frozen dataclass: planners, the simulator and the steering step all need
the same answers (which leaf a NIC sits on, what a link can carry), and a
failure is just a new topology (``with_down``), so a re-plan is a pure function
of (topology, flows).

Links are directed. A cable between leaf ``i`` and spine ``s`` with parallel
index ``k`` carries an up link (leaf -> spine) and a down link (spine -> leaf);
``--down``/``--degrade`` act on the cable, so both directions change together.
Host links (NIC <-> leaf) run at ``host_gbps`` and never fail in this model.

Example::

    topo = LeafSpine(leaves=16, spines=16, hosts_per_leaf=16, nics_per_host=1,
                     host_gbps=400, uplink_gbps=400)
    topo.leaf_of([0, 17, 255])      # -> array([0, 1, 15])
    broken = topo.with_down(3, 5)   # leaf3:spine5 down, all parallel links
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainkit.traffic.errors import TopologyError
from trainkit.traffic.limits import check_limit

__all__ = ["LeafSpine", "LinkSpec", "parse_link", "LAYOUTS"]

LAYOUTS = ("default", "rail")


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """One leaf-spine cable (``link=None``: all parallel cables of that pair)."""

    leaf: int
    spine: int
    link: int | None = None
    factor: float = 0.0  # capacity multiplier; 0 means down

    def label(self) -> str:
        text = f"leaf{self.leaf}:spine{self.spine}"
        return text if self.link is None else f"{text}#{self.link}"


_LINK_RE = re.compile(r"^\s*leaf(\d+)\s*:\s*spine(\d+)\s*(?:#(\d+))?\s*(?:=\s*([0-9.eE+-]+))?\s*$")


def parse_link(text: str, *, field_name: str = "link", degrade: bool = False) -> LinkSpec:
    """Parse ``leaf3:spine5``, ``leaf3:spine5#1`` (parallel index) or ``leaf3:spine5=0.5``."""
    match = _LINK_RE.match(str(text))
    if not match:
        raise TopologyError(field_name, f"cannot parse {text!r}; expected 'leafI:spineJ[#K][=FACTOR]'")
    leaf, spine, link, factor = match.groups()
    if degrade and factor is None:
        raise TopologyError(field_name, f"{text!r} needs '=FACTOR' (e.g. leaf3:spine5=0.5)")
    if not degrade and factor is not None:
        raise TopologyError(field_name, f"{text!r}: a down link takes no '=FACTOR'")
    value = float(factor) if factor is not None else 0.0
    if degrade and not 0.0 <= value <= 1.0:
        raise TopologyError(field_name, f"{text!r}: factor must be within [0, 1]")
    return LinkSpec(int(leaf), int(spine), None if link is None else int(link), value)


@dataclass(frozen=True, kw_only=True, slots=True)
class LeafSpine:
    """A two-tier leaf-spine fabric.

    leaves, spines: switch counts. hosts_per_leaf, nics_per_host: placement.
    host_gbps: NIC <-> leaf link speed. uplink_gbps: each leaf <-> spine cable.
    links_per_spine: parallel cables between every leaf and every spine.
    layout: ``"default"`` (NIC n on leaf n // (hosts_per_leaf*nics_per_host)) or
    ``"rail"`` (rail-optimised: NIC r of every host in a group of
    hosts_per_leaf*nics_per_host hosts sits on that group's leaf r).
    ports_per_leaf: optional switch radix, checked against hosts and uplinks.
    impaired: down (factor 0) or degraded cables.
    spraying, adaptive_routing: the fabric spreads packets itself (packet spraying,
    NIC multipath, adaptive routing), so per-flow planning has nothing to steer.
    """

    leaves: int
    spines: int
    hosts_per_leaf: int
    nics_per_host: int = 1
    host_gbps: float = 400.0
    uplink_gbps: float = 400.0
    links_per_spine: int = 1
    layout: str = "default"
    ports_per_leaf: int | None = None
    impaired: tuple[LinkSpec, ...] = field(default=())
    spraying: bool = False
    adaptive_routing: bool = False

    def __post_init__(self) -> None:
        for name in ("leaves", "spines", "hosts_per_leaf", "nics_per_host", "links_per_spine"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise TopologyError(name, f"must be a positive integer, got {value!r}")
            check_limit(name, int(value), name, TopologyError)
        check_limit("hosts_per_leaf", self.leaves * self.hosts_per_leaf * self.nics_per_host, "nics",
                    TopologyError)
        for name in ("host_gbps", "uplink_gbps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise TopologyError(name, f"must be a positive number of Gbit/s, got {value!r}")
        for name in ("spraying", "adaptive_routing"):
            if not isinstance(getattr(self, name), bool):
                raise TopologyError(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.layout not in LAYOUTS:
            raise TopologyError("layout", f"unknown layout {self.layout!r}; choose from {LAYOUTS}")
        if self.layout == "rail" and self.leaves % self.nics_per_host:
            raise TopologyError(
                "leaves",
                f"rail layout needs leaves ({self.leaves}) divisible by nics_per_host ({self.nics_per_host})",
            )
        if self.ports_per_leaf is not None:
            needed = self.nic_ports_per_leaf + self.spines * self.links_per_spine
            if needed > self.ports_per_leaf:
                raise TopologyError(
                    "hosts_per_leaf",
                    f"{self.nic_ports_per_leaf} NIC ports + {self.spines * self.links_per_spine} uplinks "
                    f"exceed ports_per_leaf={self.ports_per_leaf}",
                )
        for n, spec in enumerate(self.impaired):
            where = f"impaired[{n}] ({spec.label()})"
            if not 0 <= spec.leaf < self.leaves:
                raise TopologyError(where, f"dangling link: leaf {spec.leaf} does not exist (leaves={self.leaves})")
            if not 0 <= spec.spine < self.spines:
                raise TopologyError(where, f"dangling link: spine {spec.spine} does not exist (spines={self.spines})")
            if spec.link is not None and not 0 <= spec.link < self.links_per_spine:
                raise TopologyError(
                    where, f"dangling link: parallel index {spec.link} >= links_per_spine={self.links_per_spine}"
                )
            if not 0.0 <= spec.factor <= 1.0:
                raise TopologyError(where, f"capacity factor {spec.factor} is outside [0, 1]")

    # ---- placement -------------------------------------------------------
    @property
    def nic_ports_per_leaf(self) -> int:
        return self.hosts_per_leaf * self.nics_per_host

    @property
    def nics(self) -> int:
        """Total NICs (the ``hosts=`` indices a job may use)."""
        return self.leaves * self.nic_ports_per_leaf

    @property
    def paths(self) -> int:
        """Spine paths between two leaves on a healthy fabric (spines x parallel links)."""
        return self.spines * self.links_per_spine

    def host_of(self, nic: Any) -> np.ndarray:
        return np.asarray(nic, dtype=np.int64) // self.nics_per_host

    def leaf_of(self, nic: Any) -> np.ndarray:
        """Leaf of each NIC index (vectorised)."""
        nic = np.asarray(nic, dtype=np.int64)
        if self.layout == "default":
            return nic // self.nic_ports_per_leaf
        host, rail = np.divmod(nic, self.nics_per_host)
        group = host // self.nic_ports_per_leaf
        return group * self.nics_per_host + rail

    # ---- capacities ------------------------------------------------------
    def link_gbps(self) -> np.ndarray:
        """Capacity of every cable, shape (leaves, spines, links_per_spine), Gbit/s per direction."""
        cap = np.full((self.leaves, self.spines, self.links_per_spine), float(self.uplink_gbps))
        for spec in self.impaired:
            idx = slice(None) if spec.link is None else spec.link
            cap[spec.leaf, spec.spine, idx] = np.minimum(
                cap[spec.leaf, spec.spine, idx], self.uplink_gbps * spec.factor
            )
        return cap

    @property
    def healthy(self) -> bool:
        """True when every cable runs at ``uplink_gbps`` (the closed-form optimum applies)."""
        return all(spec.factor >= 1.0 for spec in self.impaired)

    def with_down(self, leaf: int, spine: int, link: int | None = None) -> "LeafSpine":
        """A copy with cable leaf:spine (all parallel links unless ``link``) down."""
        return self.with_impaired(LinkSpec(leaf, spine, link, 0.0))

    def with_degraded(self, leaf: int, spine: int, factor: float, link: int | None = None) -> "LeafSpine":
        """A copy with cable leaf:spine running at ``factor`` of its capacity."""
        return self.with_impaired(LinkSpec(leaf, spine, link, float(factor)))

    @property
    def self_balancing(self) -> bool:
        """True when the fabric spreads packets itself (spraying or adaptive routing)."""
        return self.spraying or self.adaptive_routing

    def with_impaired(self, *specs: LinkSpec) -> "LeafSpine":
        return dataclasses.replace(self, impaired=self.impaired + tuple(specs))

    # ---- files -----------------------------------------------------------
    _KEYS = (
        "leaves", "spines", "hosts_per_leaf", "nics_per_host", "host_gbps", "uplink_gbps",
        "links_per_spine", "layout", "ports_per_leaf", "spraying", "adaptive_routing",
    )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LeafSpine":
        """Build from a TOML/JSON mapping (optionally nested under ``[topology]``)."""
        if "topology" in data and isinstance(data["topology"], dict):
            data = data["topology"]
        data = dict(data)
        data.pop("placement", None)  # a [placement] table may sit next to the topology
        kind = data.pop("kind", "leaf-spine")
        if kind not in ("leaf-spine", "leafspine", "leaf_spine"):
            raise TopologyError("kind", f"unsupported topology kind {kind!r}; only 'leaf-spine' is built")
        if "parallel_links" in data:
            data["links_per_spine"] = data.pop("parallel_links")
        down = data.pop("down", [])
        degrade = data.pop("degrade", {})
        unknown = sorted(set(data) - set(cls._KEYS))
        if unknown:
            raise TopologyError(unknown[0], f"unknown topology field; known: {', '.join(cls._KEYS)}, down, degrade")
        for required in ("leaves", "spines", "hosts_per_leaf"):
            if required not in data:
                raise TopologyError(required, "missing required topology field")
        if isinstance(down, str):
            down = [down]
        specs = [parse_link(text, field_name=f"down[{n}]") for n, text in enumerate(down)]
        if isinstance(degrade, dict):
            degrade = [f"{key}={value}" for key, value in degrade.items()]
        specs += [parse_link(text, field_name=f"degrade[{n}]", degrade=True) for n, text in enumerate(degrade)]
        return cls(**data, impaired=tuple(specs))

    def to_dict(self) -> dict[str, Any]:
        out = {key: getattr(self, key) for key in self._KEYS
               if getattr(self, key) is not None and getattr(self, key) is not False}
        out["down"] = [s.label() for s in self.impaired if s.factor == 0.0]
        out["degrade"] = {s.label(): s.factor for s in self.impaired if s.factor > 0.0}
        return out
