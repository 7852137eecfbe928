"""The detector's findings as policy faults: a finding names hosts, the policy nodes.

The coordinator tails ``run_dir/diagnosis.jsonl`` through
:class:`trainkit.rundir.FindingTail` (typed :class:`~trainkit.rundir.Finding` objects)
and maps each finding's culprit hosts to node ids here. Agents give their workers
``TRAINKIT_HOSTNAME=<node id>``, so on one machine with several simulated nodes the hosts a
finding names are still the nodes' ids.
"""

from __future__ import annotations

from trainkit.rundir import Finding
from trainkit.run.policy import Fault

__all__ = ["fault_from_finding"]


def fault_from_finding(finding: Finding, members: tuple[str, ...]) -> Fault:
    """The policy's view of a finding: its class and the member nodes it names.

    It reads one field, :attr:`Finding.named_hosts` (the ``hosts`` of the line); hosts
    that are not members of the generation (a spare, an unknown ``"?"``) are dropped.
    """
    named = tuple(h for h in finding.named_hosts if h in members)
    hardware = bool(finding.evidence.get("hardware"))
    return Fault(kind=finding.cls, nodes=named, hardware=hardware,
                 reason=f"detector: {finding.cls} on ranks {list(finding.ranks)} "
                        f"hosts {list(named) or '?'}")
