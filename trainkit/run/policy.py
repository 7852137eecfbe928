"""The isolation policy: from a finding (or a failed generation) to a decision.

A pure function over frozen dataclasses, so every branch is unit-tested without a
cluster. The coordinator applies the decision; it never reasons about faults itself.

Rules (C4's loop, made explicit):

- crash or hang: restart. The culprit node's strike count goes up.
- a node named ``exclude_after`` times (default 2), or whose hardware is named by the
  finding, is excluded from the next rendezvous, if the job can still run without it
  (elastic minimum or a spare node); otherwise the job restarts with it and says so.
- a persistent straggler or slow link: restart without the node when the elastic minimum
  or a standby (spare) node allows it; otherwise report and keep going.
- an excluded member is replaced by a standby node when one is registered.
- any restart beyond ``max_restarts``: give up with a non-zero exit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

Action = Literal["restart", "exclude_and_restart", "continue", "give_up"]
FATAL = frozenset({"crash", "hang_noncomm", "hang_comm"})
SLOW = frozenset({"straggler", "slow_link"})


@dataclass(frozen=True, kw_only=True, slots=True)
class Fault:
    """What went wrong in one generation, as seen by the coordinator.

    ``kind`` is a detector class (``crash``, ``hang_noncomm``, ``hang_comm``,
    ``straggler``, ``slow_link``) or ``exit`` for a worker failure the detector did not
    classify. ``nodes`` are the culprit node ids (may be empty when nobody was named).
    """

    kind: str
    nodes: tuple[str, ...] = ()
    hardware: bool = False
    reason: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class PolicyConfig:
    max_restarts: int = 3
    exclude_after: int = 2
    min_nodes: int = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class PolicyState:
    """Everything the policy remembers across generations."""

    members: tuple[str, ...]
    standby: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    restarts: int = 0
    strikes: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, slots=True)
class Decision:
    action: Action
    exclude: tuple[str, ...]
    reason: str
    state: PolicyState


def _can_drop(state: PolicyState, nodes: Sequence[str], cfg: PolicyConfig) -> bool:
    remaining = len([m for m in state.members if m not in nodes]) + len(state.standby)
    return remaining >= max(1, cfg.min_nodes)


def decide(fault: Fault, state: PolicyState, cfg: PolicyConfig) -> Decision:
    """Apply the policy to one fault; return the decision and the new state."""
    culprits = tuple(n for n in fault.nodes if n in state.members)
    strikes = dict(state.strikes)
    for node in culprits:
        strikes[node] = strikes.get(node, 0) + 1

    if fault.kind in SLOW:
        if culprits and _can_drop(state, culprits, cfg):
            action: Action = "exclude_and_restart"
            reason = f"persistent {fault.kind} on {', '.join(culprits)}: restarting without it"
        else:
            new = replace(state, strikes=strikes)
            why = "no culprit node named" if not culprits else (
                f"dropping {', '.join(culprits)} would go below the minimum of "
                f"{cfg.min_nodes} nodes and no spare is available")
            return Decision(action="continue", exclude=(), state=new,
                            reason=f"{fault.kind} reported, job keeps going: {why}")
    else:
        repeat = [n for n in culprits if strikes[n] >= cfg.exclude_after]
        to_drop = tuple(culprits if fault.hardware else repeat)
        if to_drop and _can_drop(state, to_drop, cfg):
            action = "exclude_and_restart"
            why = "its hardware was named" if fault.hardware else (
                f"culprit {cfg.exclude_after} time(s)")
            reason = f"{fault.kind} on {', '.join(to_drop)}, {why}: excluding it and restarting"
            culprits = to_drop
        else:
            action = "restart"
            named = f" on {', '.join(culprits)}" if culprits else " (no culprit named)"
            reason = f"{fault.kind}{named}: restarting"
            if to_drop:
                reason += (f"; cannot exclude {', '.join(to_drop)} without going below "
                           f"{cfg.min_nodes} nodes")
            culprits = ()

    if state.restarts + 1 > cfg.max_restarts:
        new = replace(state, strikes=strikes)
        return Decision(action="give_up", exclude=(), state=new,
                        reason=f"{fault.kind}: --max-restarts={cfg.max_restarts} exhausted")
    excluded = culprits if action == "exclude_and_restart" else ()
    members = [m for m in state.members if m not in excluded]
    standby = list(state.standby)
    while excluded and standby and len(members) < len(state.members):
        members.append(standby.pop(0))
    if excluded:
        reason += f"; next generation runs on {len(members)} node(s): {', '.join(members)}"
    new = PolicyState(members=tuple(members), standby=tuple(standby),
                      excluded=state.excluded + excluded, restarts=state.restarts + 1,
                      strikes=strikes)
    return Decision(action=action, exclude=excluded, reason=reason, state=new)
