"""Reading the detector's findings (``run_dir/diagnosis.jsonl``) as policy faults.

The coordinator tails the file the aggregator appends to and maps each finding's culprit
hosts to node ids. Agents give their workers ``TRAINKIT_HOST=<node id>``, so on one machine
with several simulated nodes the hosts a finding names are still the nodes' ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from trainkit.run.policy import Fault

DIAGNOSIS_FILE = "diagnosis.jsonl"


class FindingTail:
    """Yields findings appended to ``diagnosis.jsonl`` since the last call."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / DIAGNOSIS_FILE
        self._offset = self.path.stat().st_size if self.path.exists() else 0

    def poll(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]  # a half-written last line waits
        self._offset += len(complete)
        for line in complete.splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


def fault_from_finding(finding: dict[str, Any], members: tuple[str, ...]) -> Fault:
    """The policy's view of a finding: its class and the member nodes it names."""
    named: list[str] = []
    for host in finding.get("hosts") or []:
        if host in members and host not in named:
            named.append(host)
    for ident in finding.get("ids") or []:
        host = ident.get("host") if isinstance(ident, dict) else None
        if host in members and host not in named:
            named.append(host)
    evidence = finding.get("evidence")
    hardware = bool(isinstance(evidence, dict) and evidence.get("hardware"))
    ranks = finding.get("ranks")
    return Fault(kind=str(finding.get("class", "unknown")), nodes=tuple(named), hardware=hardware,
                 reason=f"detector: {finding.get('class')} on ranks {ranks} hosts {named or '?'}")
