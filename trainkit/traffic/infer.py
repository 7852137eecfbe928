"""From the detector's findings to the fabric links they implicate (C4D -> C4P).

A ``slow_link`` finding (or a ``hang_comm`` that names a link) names a rank pair.
Placement turns the ranks' hosts into leaves. The plan the job ran under turns
the pair into the directed links its bytes crossed: the uplink at the sender's
leaf and the downlink at the receiver's, for every spine it used. Two leaves the
same: the fabric is not involved, and the finding is a host or NIC problem.

Which of those links is bad is network tomography over the plan's paths:

- every flow of the plan that no finding names counts as healthy, and the
  directed links where it was (near) its bottleneck in the plan are exonerated
  (a degraded link there would have slowed it: the detector compares each flow
  with its peers); a link it crossed with room to spare could hide a mild fault;
- a cable explains a finding through either direction (a degradation acts on
  the cable, as ``--degrade`` does);
- of the remaining suspects, the smallest set that explains every finding is
  chosen greedily; links that explain exactly the same findings cannot be told
  apart and are implicated together ("one of k"), each with 1/k of the confidence.

Degradation from the evidence: a flow whose bottleneck was the bad cable slows
by 1/factor, and one that shares it with a busier link slows less, so the
factor is 1 / (largest slowdown among the findings the cable explains). A
factor under :data:`DOWN_BELOW`, or a hang, is taken as down.

Pure: :func:`infer_links` takes typed findings and returns an :class:`Inference`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainkit.rundir import Finding
from trainkit.traffic.plan import Plan
from trainkit.traffic.placement import Placement
from trainkit.traffic.topology import LeafSpine, LinkSpec

__all__ = ["DOWN_BELOW", "HostProblem", "Inference", "InferredLink", "LINK_CLASSES",
           "finding_slowdown", "infer_links", "rank_hosts"]

DOWN_BELOW = 0.1          # a cable slower than this fraction of its capacity is as good as down
LINK_CLASSES = ("slow_link", "hang_comm")
_DEFAULT_FACTOR = 0.5     # slow, but the evidence gives no ratio
TIGHT = 0.9               # a healthy flow clears a link carrying it at >= this share of its bottleneck

DirLink = tuple[str, int, int, int]   # ("up" | "down", leaf, spine, parallel link or -1)


@dataclass(frozen=True, slots=True)
class InferredLink:
    """One cable the findings implicate, with the estimated capacity factor (0: down)."""

    spec: LinkSpec
    confidence: float
    findings: tuple[int, ...]       # indices into the findings given to infer_links
    tied: int                       # cables that explain the same findings equally well
    reason: str

    @property
    def label(self) -> str:
        """``leafN:spineM`` (the cable, as ``--down``/``--degrade`` take it)."""
        return self.spec.label()

    @property
    def flag(self) -> str:
        """The equivalent CLI flag: ``--down leafN:spineM`` or ``--degrade leafN:spineM=F``."""
        if self.spec.factor == 0.0:
            return f"--down {self.label}"
        return f"--degrade {self.label}={self.spec.factor:.3g}"


@dataclass(frozen=True, slots=True)
class HostProblem:
    """A finding inside one leaf: the fabric is not involved, a host or NIC is."""

    finding: int
    ranks: tuple[int, ...]
    hosts: tuple[str, ...]
    leaf: int
    confidence: float

    @property
    def reason(self) -> str:
        return (f"ranks {list(self.ranks)} on {', '.join(self.hosts)} share leaf{self.leaf}: "
                f"no fabric link between them, so a host or NIC problem (check the NICs and cables "
                f"of {', '.join(self.hosts)})")


@dataclass(frozen=True)
class Inference:
    """What the findings say about the fabric, and how sure that is."""

    links: tuple[InferredLink, ...]
    host_problems: tuple[HostProblem, ...]
    skipped: tuple[str, ...]          # findings that name no usable link, with why
    used: tuple[int, ...] = ()        # findings that were mapped onto the fabric
    notes: tuple[str, ...] = field(default=())

    @property
    def link_set(self) -> frozenset[str]:
        """The implicated cables (labels), factor left out: what a restart is keyed on."""
        return frozenset(link.label for link in self.links)

    def specs(self) -> tuple[LinkSpec, ...]:
        return tuple(link.spec for link in self.links)

    def topology(self, topo: LeafSpine) -> LeafSpine:
        """``topo`` with the inferred impairments applied."""
        return topo.with_impaired(*self.specs()) if self.links else topo

    def lines(self) -> list[str]:
        """The report printed before the new plan: every inference and its confidence."""
        out = []
        for link in self.links:
            what = "down" if link.spec.factor == 0.0 else f"at {link.spec.factor:.0%} of capacity"
            out.append(f"fabric    {link.label:<18} {what:<22} confidence {link.confidence:.2f}  "
                       f"({link.reason}; {link.flag})")
        for hp in self.host_problems:
            out.append(f"host/NIC  {', '.join(hp.hosts):<18} {'not a fabric link':<22} confidence "
                       f"{hp.confidence:.2f}  ({hp.reason})")
        out += [f"skipped   {why}" for why in self.skipped]
        out += [f"note      {note}" for note in self.notes]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "links": [{"link": lk.label, "factor": lk.spec.factor, "down": lk.spec.factor == 0.0,
                       "confidence": round(lk.confidence, 4), "tied": lk.tied,
                       "findings": list(lk.findings), "reason": lk.reason} for lk in self.links],
            "host_problems": [{"ranks": list(h.ranks), "hosts": list(h.hosts), "leaf": h.leaf,
                               "confidence": round(h.confidence, 4), "reason": h.reason}
                              for h in self.host_problems],
            "skipped": list(self.skipped), "notes": list(self.notes),
        }


# -- evidence ------------------------------------------------------------------------
def finding_slowdown(f: Finding) -> float | None:
    """How many times slower than normal the finding's link ran (inf: hung; None: unknown)."""
    if f.cls == "hang_comm":
        return math.inf
    ev = f.evidence
    direct = ev.get("slowdown")
    if isinstance(direct, (int, float)) and not isinstance(direct, bool) and direct > 0:
        return float(direct)
    normal = ev.get("normal_duration_s")
    recent = ev.get("recent_duration_s")
    recent = recent.get("median") if isinstance(recent, Mapping) else recent
    if isinstance(normal, (int, float)) and isinstance(recent, (int, float)) and normal > 0:
        return max(1.0, float(recent) / float(normal))
    return None


def rank_hosts(findings: Iterable[Finding]) -> dict[int, str]:
    """rank -> host as the findings' ``ranks``/``hosts`` and ``ids`` report it."""
    out: dict[int, str] = {}
    for f in findings:
        for rank, host in zip(f.ranks, f.hosts):
            if host and host != "?":
                out.setdefault(rank, host)
        for ident in f.ids:
            rank, host = ident.get("rank"), ident.get("host")
            if isinstance(rank, int) and isinstance(host, str) and host and host != "?":
                out.setdefault(rank, host)
    return out


# -- paths of the running plan ---------------------------------------------------------
@dataclass
class _Paths:
    nic: dict[tuple[int, int], set[DirLink]]
    leaf: dict[tuple[int, int], set[DirLink]]   # aggregated (leaf-pair) rows only
    # the links that were (near) the flow's bottleneck: a degradation there would have shown
    nic_tight: dict[tuple[int, int], set[DirLink]]
    leaf_tight: dict[tuple[int, int], set[DirLink]]


def _paths(p: Plan) -> _Paths:
    nic: dict[tuple[int, int], set[DirLink]] = defaultdict(set)
    leaf: dict[tuple[int, int], set[DirLink]] = defaultdict(set)
    nic_t: dict[tuple[int, int], set[DirLink]] = defaultdict(set)
    leaf_t: dict[tuple[int, int], set[DirLink]] = defaultdict(set)
    cap = p.topology.link_gbps() * 1e9 / 8
    for ph in p.phases:
        a, t = ph.assignment, ph.table
        with np.errstate(divide="ignore", invalid="ignore"):
            up_t, down_t = ph.up_bytes / cap, ph.down_bytes / cap
        per_row: dict[int, list[tuple[DirLink, float]]] = defaultdict(list)
        for i in np.flatnonzero(a.spine >= 0).tolist():
            row = int(a.row[i])
            sl, dl, s = int(t.src_leaf[row]), int(t.dst_leaf[row]), int(a.spine[i])
            ul, dk = int(a.up_link[i]), int(a.down_link[i])
            per_row[row] += [(("up", sl, s, ul), float(up_t[sl, s, max(ul, 0)])),
                             (("down", dl, s, dk), float(down_t[dl, s, max(dk, 0)]))]
        for row, links in per_row.items():
            if t.src[row] >= 0:
                key, full, tight = (int(t.src[row]), int(t.dst[row])), nic, nic_t
            else:
                key, full, tight = (int(t.src_leaf[row]), int(t.dst_leaf[row])), leaf, leaf_t
            slowest = max(v for _, v in links)
            full[key] |= {d for d, _ in links}
            tight[key] |= {d for d, v in links if v >= TIGHT * slowest}
    return _Paths(dict(nic), dict(leaf), dict(nic_t), dict(leaf_t))


def _all_between(topo: LeafSpine, la: int, lb: int) -> set[DirLink]:
    """Every directed link a byte between leaves la and lb could cross (no path known)."""
    out: set[DirLink] = set()
    for s in range(topo.spines):
        for k in range(topo.links_per_spine):
            out |= {("up", la, s, k), ("down", lb, s, k), ("up", lb, s, k), ("down", la, s, k)}
    return out


def _cable(d: DirLink, topo: LeafSpine) -> tuple[int, int, int | None]:
    _, leaf, spine, k = d
    return leaf, spine, (None if topo.links_per_spine == 1 or k < 0 else k)


# -- the inference -------------------------------------------------------------------
@dataclass
class _Mapped:
    index: int
    ranks: tuple[int, int]
    nics: tuple[int, int]
    leaves: tuple[int, int]
    slowdown: float | None
    confidence: float
    candidates: set[DirLink]
    on_path: bool          # the plan routed this pair (else: every link between the leaves)


def _local_ranks(f: Finding) -> dict[int, int]:
    """rank -> local rank, where the finding's ``ids`` say."""
    out = {}
    for ident in f.ids:
        rank, local = ident.get("rank"), ident.get("local_rank")
        if isinstance(rank, int) and isinstance(local, int):
            out[rank] = local
    return out


def _map(findings: Sequence[Finding], topo: LeafSpine, placement: Placement,
         paths: _Paths | None, hosts_of: Mapping[int, str]
         ) -> tuple[list[_Mapped], list[HostProblem], list[str]]:
    mapped, host_problems, skipped = [], [], []
    for n, f in enumerate(findings):
        if f.cls not in LINK_CLASSES:
            continue
        if f.link is None:
            if f.cls == "slow_link":
                skipped.append(f"finding {n} ({f.cls}, ranks {list(f.ranks)}): names no link")
            continue
        a, b = f.link
        ha, hb = hosts_of.get(a), hosts_of.get(b)
        missing = [f"rank {r}" for r, h in ((a, ha), (b, hb)) if h is None]
        if missing:
            skipped.append(f"finding {n} ({f.cls} {a}-{b}): no host known for {', '.join(missing)}")
            continue
        assert ha is not None and hb is not None
        unplaced = [h for h in (ha, hb) if h not in placement.hosts]
        if unplaced:
            skipped.append(f"finding {n} ({f.cls} {a}-{b}): host(s) {', '.join(unplaced)} not in "
                           f"{placement.source}")
            continue
        la, lb = placement.leaf(ha), placement.leaf(hb)
        assert la is not None and lb is not None
        if la == lb:
            host_problems.append(HostProblem(n, (a, b), tuple(dict.fromkeys((ha, hb))), la,
                                             float(f.confidence)))
            continue
        local = _local_ranks(f)
        na, nb = int(placement.nic(ha, local.get(a))), int(placement.nic(hb, local.get(b)))  # type: ignore[arg-type]
        cand: set[DirLink] = set()
        if paths is not None:
            cand = paths.nic.get((na, nb), set()) | paths.nic.get((nb, na), set())
            if not cand:
                cand = paths.leaf.get((la, lb), set()) | paths.leaf.get((lb, la), set())
        on_path = bool(cand)
        if not cand:
            cand = _all_between(topo, la, lb)
        mapped.append(_Mapped(n, (a, b), (na, nb), (la, lb), finding_slowdown(f), float(f.confidence),
                              cand, on_path))
    return mapped, host_problems, skipped


def _exonerated(paths: _Paths, mapped: list[_Mapped]) -> set[DirLink]:
    slow_nics = {frozenset(m.nics) for m in mapped}
    slow_leaves = {frozenset(m.leaves) for m in mapped}
    out: set[DirLink] = set()
    for (s, d), links in paths.nic_tight.items():
        if frozenset((s, d)) not in slow_nics:
            out |= links
    for (s, d), links in paths.leaf_tight.items():
        if frozenset((s, d)) not in slow_leaves:
            out |= links
    return out


def infer_links(
    findings: Sequence[Finding], topo: LeafSpine, placement: Placement, *,
    running: Plan | None = None, hosts: Mapping[int, str] | None = None, exonerate: bool = True,
) -> Inference:
    """The fabric cables ``findings`` implicate, with a capacity factor and a confidence each.

    running: the plan the job ran under (its paths localise a pair to the spines it
    used, and its healthy flows exonerate links); None means every cable between the
    two leaves is a suspect. hosts: rank -> host where findings do not say.
    exonerate: treat the plan's flows that no finding names as healthy.
    """
    hosts_of = {**(hosts or {}), **rank_hosts(findings)}
    paths = _paths(running) if running is not None else None
    mapped, host_problems, skipped = _map(findings, topo, placement, paths, hosts_of)
    notes: list[str] = []
    cleared = _exonerated(paths, mapped) if (paths is not None and exonerate) else set()
    suspects: dict[int, set[DirLink]] = {}
    contradicted: set[int] = set()
    for m in mapped:
        left = m.candidates - cleared
        if not left:
            left = set(m.candidates)
            contradicted.add(m.index)
            notes.append(f"finding {m.index} (ranks {m.ranks[0]}-{m.ranks[1]}): every link on its path also "
                         "carries flows nobody reported slow; all of them stay suspects")
        suspects[m.index] = left
        if not m.on_path:
            notes.append(f"finding {m.index} (ranks {m.ranks[0]}-{m.ranks[1]}): the plan routes no traffic "
                         f"between leaf{m.leaves[0]} and leaf{m.leaves[1]}; every cable between them is a suspect")
    by_index = {m.index: m for m in mapped}
    # A cable explains a finding through either direction (--degrade acts on the cable).
    cable_sets = {i: {_cable(d, topo) for d in links} for i, links in suspects.items()}
    dirs: dict[tuple[int, int, int | None], set[str]] = defaultdict(set)
    for links in suspects.values():
        for d in links:
            dirs[_cable(d, topo)].add(d[0])
    todo = set(cable_sets)
    cables: dict[tuple[int, int, int | None], dict[str, Any]] = {}
    while todo:
        cover: dict[tuple[int, int, int | None], frozenset[int]] = {}
        for i in todo:
            for cab in cable_sets[i]:
                cover.setdefault(cab, frozenset(j for j in todo if cab in cable_sets[j]))
        best = max(len(c) for c in cover.values())
        # the signature covering the most findings; ties broken by the larger total slowdown, then order
        sigs = {c for c in cover.values() if len(c) == best}
        sig = max(sigs, key=lambda c: (sum(min(by_index[i].slowdown or 1.0, 1e6) for i in c), -min(c)))
        group = sorted(cab for cab, c in cover.items() if c == sig)
        for cab in group:
            cables[cab] = {"findings": set(sig), "tied": len(group), "dirs": dirs[cab]}
        todo -= sig
    out: list[InferredLink] = []
    for (leaf, spine, k), entry in sorted(cables.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0)):
        idx = tuple(sorted(entry["findings"]))
        ratios = [by_index[i].slowdown for i in idx]
        known = [r for r in ratios if r is not None]
        factor = 1.0 / max(known) if known else _DEFAULT_FACTOR
        factor = 0.0 if factor < DOWN_BELOW else round(min(1.0, factor), 4)
        base = sum(by_index[i].confidence for i in idx) / len(idx)
        conf = base / entry["tied"]
        if any(i in contradicted or not by_index[i].on_path for i in idx):
            conf *= 0.5
        if not known:
            conf *= 0.5
        pairs = ", ".join(f"{by_index[i].ranks[0]}-{by_index[i].ranks[1]}" for i in idx)
        slow = (f"{max(known):.1f}x slower" if known and math.isfinite(max(known)) else
                "hung" if known else "slowdown unknown")
        tie = f", one of {entry['tied']} cables that explain them equally" if entry["tied"] > 1 else ""
        direction = "/".join(sorted(entry["dirs"]))
        out.append(InferredLink(LinkSpec(leaf, spine, k, float(factor)), min(1.0, conf), idx, entry["tied"],
                                f"{direction} on the path of rank pair(s) {pairs}, {slow}{tie}"))
    return Inference(tuple(out), tuple(host_problems), tuple(skipped), tuple(m.index for m in mapped),
                     tuple(dict.fromkeys(notes)))
