"""``trainkit run --traffic-plan T,P,J``: a slow link found in generation G becomes the
traffic plan of generation G+1.

The coordinator calls :meth:`TrafficReplanner.consider` (on its one thread) for each
``slow_link`` finding the policy lets pass ("continue": the node stays). The finding
is mapped onto fabric cables (:mod:`trainkit.traffic.infer`) against the plan the
current generation runs under, and the job is re-planned around every cable
implicated so far. A restart for this reason happens at most once per distinct set of
implicated cables, and only within ``--max-restarts`` (the coordinator checks that).
:meth:`commit` writes ``run_dir/plan.gen<G>.json``; from then on :attr:`env` gives the
workers ``NCCL_IB_QPS_PER_CONNECTION``, ``NCCL_IB_SPLIT_DATA_ON_QPS`` and
``TRAINKIT_PLAN`` (the file).

On a fabric that sprays packets or routes adaptively planning is moot: the finding is
reported once and nothing restarts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainkit.rundir import PLAN_ENV, Finding
from trainkit.traffic.errors import TrafficError
from trainkit.traffic.fromdiag import load_inputs, replan_from_findings, running_plan, write_json
from trainkit.traffic.plan import Plan
from trainkit.traffic.steering import nccl_settings, plan_document
from trainkit.traffic.topology import LinkSpec

__all__ = ["PLAN_FILE", "ReplanResult", "TrafficReplanner", "parse_traffic_plan"]

PLAN_FILE = "plan.gen{gen}.json"


def parse_traffic_plan(text: str) -> tuple[str, str | None, str]:
    """``T,P,J`` -> (topology, placement or None, job); an empty P means the topology
    file's own ``[placement]`` table."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 3 or not parts[0] or not parts[2]:
        raise TrafficError("--traffic-plan", f"expected TOPOLOGY,PLACEMENT,JOB (PLACEMENT may be empty), "
                                             f"got {text!r}")
    return parts[0], parts[1] or None, parts[2]


@dataclass(frozen=True)
class ReplanResult:
    """What one finding led to; ``restart`` means a new plan for the next generation."""

    restart: bool
    reason: str
    links: tuple[dict[str, Any], ...] = ()
    link_set: frozenset[str] = frozenset()
    host_problems: tuple[dict[str, Any], ...] = ()
    new: Plan | None = field(default=None, repr=False)
    specs: tuple[LinkSpec, ...] = ()

    def event_fields(self) -> dict[str, Any]:
        return {"links": list(self.links), "link_set": sorted(self.link_set),
                "host_problems": list(self.host_problems)}


class TrafficReplanner:
    """Coordinator-side state of ``--traffic-plan``: the plan in force and the link sets
    already planned around. Not thread-safe: the coordinator's thread only."""

    def __init__(self, spec: str, run_dir: Path, *, method: str = "split", ran_with: str = "ecmp") -> None:
        topology, placement, job = parse_traffic_plan(spec)
        self.inputs = load_inputs(topology, placement, job)
        self.run_dir = Path(run_dir)
        self.method = method
        self.running, self.running_from = running_plan(self.inputs, None, ran_with=ran_with)
        self.planned: set[frozenset[str]] = set()
        self.known: frozenset[str] = frozenset()
        self.specs: tuple[LinkSpec, ...] = ()
        self.replanned_pairs: set[frozenset[int]] = set()
        self.findings: list[Finding] = []
        self.env: dict[str, str] = {}
        self.path: Path | None = None
        self._said_not_useful = False

    def consider(self, finding: Finding) -> ReplanResult | None:
        """The re-plan ``finding`` calls for (not yet written: see :meth:`commit`), or None."""
        if finding.cls != "slow_link":
            return None
        pair = frozenset(finding.link or finding.ranks)
        if pair in self.replanned_pairs:
            return ReplanResult(False, f"slow link {'-'.join(map(str, sorted(pair)))} persists after re-planning "
                                       f"around {', '.join(sorted(self.known))}: routing did not fix it (a host, "
                                       "NIC or further links); not restarting for it again", link_set=self.known)
        self.findings.append(finding)
        # cables implicated in earlier generations stay impaired in every later plan
        inputs = dataclasses.replace(self.inputs, topology=self.inputs.topology.with_impaired(*self.specs))
        r = replan_from_findings(self.findings, inputs, running=self.running,
                                 running_from=self.running_from, method=self.method, simulate=False)
        inf = r.inference
        cumulative = self.known | inf.link_set
        links = tuple(inf.to_json()["links"])
        hosts = tuple(inf.to_json()["host_problems"])
        if r.not_useful:
            if self._said_not_useful:
                return None
            self._said_not_useful = True
            return ReplanResult(False, r.not_useful, links, inf.link_set, hosts)
        mine = len(self.findings) - 1
        if any(h.finding == mine for h in inf.host_problems):
            self.findings.pop()
            return ReplanResult(False, f"{inf.host_problems[-1].reason}; traffic plan unchanged", (), frozenset(),
                                hosts)
        if not inf.links:
            why = "inside one leaf: a host or NIC problem, not the fabric" if inf.host_problems else \
                "no fabric link could be inferred"
            return ReplanResult(False, f"slow link {why}; traffic plan unchanged", links, inf.link_set, hosts)
        if cumulative in self.planned:
            return ReplanResult(False, f"already planned around {', '.join(sorted(cumulative))}",
                                links, cumulative, hosts)
        flags = " ".join(link.flag for link in inf.links)
        return ReplanResult(True, f"re-planned traffic around {flags}", links, cumulative, hosts, r.new,
                            inf.specs())

    def commit(self, result: ReplanResult, gen: int) -> Path:
        """Write ``plan.gen<gen>.json`` for generation ``gen``; its workers get :attr:`env`."""
        assert result.restart and result.new is not None
        path = self.run_dir / PLAN_FILE.format(gen=gen)
        doc = plan_document(result.new)
        doc["inferred"] = {"links": list(result.links), "host_problems": list(result.host_problems)}
        write_json(doc, path)
        self.planned.add(result.link_set)
        self.known = result.link_set
        self.specs = self.specs + result.specs
        self.running, self.running_from = result.new, path.name
        self.replanned_pairs |= {frozenset(f.link or f.ranks) for f in self.findings}
        self.findings = []          # the next generation's findings are read against the new plan
        self.path = path
        self.env = {**nccl_settings(result.new), PLAN_ENV: str(path)}
        return path

