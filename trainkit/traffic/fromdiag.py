"""A run's diagnosis to a new traffic plan: files in, inference, ``replan()``, report.

Shared by ``trainkit plan --from-diagnosis`` and ``trainkit run --traffic-plan``, so
the two agree on what a finding implicates. Steps:

1. load the topology, the placement (``--placement``, else the ``[placement]``
   table of the topology file) and the job;
2. rebuild the plan the job ran under: the newest ``plan.gen<G>.json`` of the run
   directory (the plan ``trainkit run`` handed the workers), else ``ran_with`` on the
   healthy fabric (default ``ecmp``: without a plan the switches' hash routes);
3. infer the implicated cables (:func:`trainkit.traffic.infer.infer_links`);
4. plan ``method`` on the healthy fabric (the plan that ignores the finding) and
   ``replan()`` it on the inferred fabric; simulate both there.

On a fabric that sprays packets or routes adaptively none of this is useful: the
switches already spread every flow, so :func:`replan_from_findings` says so and
returns no plan (no port assignments).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainkit.rundir import Finding, read_findings
from trainkit.traffic.collectives import Flows
from trainkit.traffic.errors import TrafficError
from trainkit.traffic.files import load_job, load_mapping, load_topology
from trainkit.traffic.hashing import HashModel
from trainkit.traffic.infer import Inference, infer_links
from trainkit.traffic.placement import Placement, load_placement
from trainkit.traffic.plan import PhasePlan, Plan
from trainkit.traffic.planners import plan, planner_options, replan
from trainkit.traffic.topology import LeafSpine

__all__ = ["NOT_USEFUL", "Replanned", "TrafficInputs", "load_inputs", "latest_plan_file", "on_fabric",
           "replan_from_findings", "replan_from_run", "running_plan", "spraying_document", "write_json"]

NOT_USEFUL = ("the fabric {how}: the switches already spread every flow over all paths, so per-flow "
              "planning does nothing useful here and no port assignments are emitted")
_PLAN_FILE = re.compile(r"^plan\.gen(\d+)\.json$")


@dataclass(frozen=True)
class TrafficInputs:
    """The three files ``--traffic-plan T,P,J`` names, loaded and checked together."""

    topology: LeafSpine
    placement: Placement
    flows: Flows
    files: tuple[str, str, str]


def load_inputs(topology: str | Path, placement: str | Path | None, job: str | Path) -> TrafficInputs:
    """Load and cross-check the files; placement None: the topology file's ``[placement]``."""
    topo = load_topology(topology)
    place = load_placement(placement if placement else topology, topo)
    flows = load_job(job)
    return TrafficInputs(topo, place, flows, (str(topology), str(placement or topology), str(job)))


def on_fabric(p: Plan, topo: LeafSpine) -> Plan:
    """The same routing as ``p``, its loads recomputed on another fabric (e.g. the degraded one)."""
    phases = tuple(PhasePlan.build(topo, ph.index, ph.phase, ph.table, ph.assignment) for ph in p.phases)
    return dataclasses.replace(p, topology=topo, phases=phases)


def _hash_options(method: str, hm: HashModel | None) -> dict[str, Any]:
    return {"hash_model": hm} if hm is not None and "hash_model" in planner_options(method) else {}


def latest_plan_file(run_dir: str | Path) -> Path | None:
    """The newest ``plan.gen<G>.json`` of a run directory (the plan its workers last got)."""
    best: tuple[int, Path] | None = None
    for path in Path(run_dir).glob("plan.gen*.json"):
        m = _PLAN_FILE.match(path.name)
        if m and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), path)
    return None if best is None else best[1]


def running_plan(inputs: TrafficInputs, run_dir: str | Path | None = None, *, ran_with: str = "ecmp",
                 hash_model: HashModel | None = None) -> tuple[Plan, str]:
    """The plan the job ran under, and where that came from (for the report)."""
    path = latest_plan_file(run_dir) if run_dir is not None else None
    if path is not None:
        doc = load_mapping(path, what=str(path))
        try:
            topo = LeafSpine.from_dict(doc["topology"])
            method = str(doc["method"])
            hm_fields = {k: v for k, v in (doc.get("hash") or {}).items() if k != "select"}
            hm = HashModel.from_dict(hm_fields) if hm_fields else hash_model
        except (KeyError, TypeError, ValueError) as exc:
            raise TrafficError(str(path), f"not a trainkit plan file: {exc}") from None
        p = plan(topo, inputs.flows, method=method, **_hash_options(method, hm))
        return on_fabric(p, inputs.topology), f"{path.name} ({method})"
    p = plan(inputs.topology, inputs.flows, method=ran_with, **_hash_options(ran_with, hash_model))
    how = "the switches' ECMP hash, as without a plan" if ran_with == "ecmp" else "re-planned"
    return p, f"{ran_with} on the healthy fabric ({how})"


@dataclass(frozen=True)
class Replanned:
    """Everything ``--from-diagnosis`` reports: the inference, both plans, their times."""

    inference: Inference
    running: Plan
    running_from: str
    unaware: Plan | None            # ``method`` on the healthy fabric (ignores the findings)
    new: Plan | None                # ``replan()`` of it on the inferred fabric; None when not useful
    unaware_s: float | None         # simulated completion on the inferred fabric
    new_s: float | None
    not_useful: str | None = None

    @property
    def link_set(self) -> frozenset[str]:
        return self.inference.link_set


def _simulate(p: Plan) -> float:
    from trainkit.traffic.simulate import simulate

    return simulate(p, rel_tol=1e-3).total


def replan_from_findings(findings: Sequence[Finding], inputs: TrafficInputs, *, running: Plan,
                         running_from: str = "", method: str = "split",
                         hosts: Mapping[int, str] | None = None, simulate: bool = True) -> Replanned:
    """Infer the implicated cables and re-plan ``method`` around them."""
    topo = inputs.topology
    inference = infer_links(findings, topo, inputs.placement, running=running, hosts=hosts)
    if topo.self_balancing:
        how = "sprays packets" if topo.spraying else "routes adaptively"
        return Replanned(inference, running, running_from, None, None, None, None, NOT_USEFUL.format(how=how))
    unaware = plan(topo, inputs.flows, method=method)
    impaired = inference.topology(topo)
    new = replan(unaware, impaired) if inference.links else unaware
    unaware_s = new_s = None
    if simulate:
        unaware_s = _simulate(on_fabric(unaware, impaired))
        new_s = _simulate(new)
    return Replanned(inference, running, running_from, unaware, new, unaware_s, new_s)


def replan_from_run(run_dir: str | Path, inputs: TrafficInputs, *, method: str = "split",
                    ran_with: str = "ecmp", simulate: bool = True) -> Replanned:
    """``replan_from_findings`` over every finding of ``run_dir/diagnosis.jsonl``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TrafficError("--from-diagnosis", f"run directory not found: {run_dir}")
    findings = read_findings(run_dir)
    running, source = running_plan(inputs, run_dir, ran_with=ran_with)
    return replan_from_findings(findings, inputs, running=running, running_from=source, method=method,
                                simulate=simulate)


def spraying_document(topo: LeafSpine, reason: str) -> dict[str, Any]:
    """What ``--out`` holds on a self-balancing fabric: the reason, and no port assignments."""
    return {"format": "trainkit.traffic.plan/1", "method": None, "topology": topo.to_dict(),
            "planning": "not useful", "note": reason, "nccl": {}, "phases": []}


def write_json(doc: Mapping[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(doc, indent=1))
