"""Errors of the traffic planner, each naming the offending field.

Why a module of its own: every layer (topology, job files, planners) reports bad
input the same way, so the CLI can print one clean line instead of a traceback.
"""

from __future__ import annotations

from trainkit.errors import TrainkitError

__all__ = ["TrafficError", "TopologyError", "JobError", "UnroutableError"]


class TrafficError(TrainkitError, ValueError):
    """Bad traffic-planning input. ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class TopologyError(TrafficError):
    """The topology is inconsistent with itself (ports, links, capacities)."""


class JobError(TrafficError):
    """The job does not fit the topology, or names an unknown collective/planner."""


class UnroutableError(TrafficError):
    """Every path between two leaves that must exchange bytes is down."""
