"""The coordinator: one per job. Hosts the store, runs the detector, decides.

Generation loop: publish a plan (members, rendezvous id), watch the generation, and
when a finding or a failed node arrives ask the policy (``trainkit.run.policy``) what to
do; stop the workers if the answer is a restart, and publish the next plan. Every
decision goes to ``events.jsonl`` with its reason.

Warm start: every agent keeps a warm pool, a one-node torchrun whose workers have done
their imports and wait for a go file (:mod:`trainkit.run.pool`). A restart whose members
all have a ready pool runs on the pools, whatever the membership (a node excluded or
not): the coordinator hosts the generation's store and the plan tells the agents where
it is; otherwise the generation starts cold, through torchrun's own c10d rendezvous.
Once the first step of a restarted generation is reported, a ``first_step`` event says
which path it took and how long after the decision it came.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainkit.rundir import (BAD_STEP_EXIT, NOTE_CLASSES, REPORTS_FILE, Finding, FindingTail,
                             JsonlTail, read_jsonl)
from trainkit.run.control import Control
from trainkit.run.detector import AggregatorHandle
from trainkit.run.events import EventLog, read_events
from trainkit.run.findings import fault_from_finding
from trainkit.run.goodput import write_goodput
from trainkit.run.loops import Suspect, check_loop, generation_records
from trainkit.run.policy import Decision, Fault, PolicyConfig, PolicyState, decide
from trainkit.run.pool import GenerationStore, pools_ready

if TYPE_CHECKING:
    from trainkit.run.replan import TrafficReplanner

__all__ = ["FAST_RDZV_CONF", "Coordinator", "CoordinatorConfig"]

# Rendezvous settings that make a restart take seconds rather than torchrun's defaults
# (join waits up to 600 s, last call 30 s, keep-alive 5 s): members per generation are
# fixed, so the rendezvous completes the moment the last member joins.
FAST_RDZV_CONF = "join_timeout=120,last_call_timeout=1,close_timeout=5,keep_alive_interval=1," \
                 "keep_alive_max_attempt=5"


@dataclass(kw_only=True)
class CoordinatorConfig:
    run_dir: Path
    policy: PolicyConfig
    max_nodes: int
    spare: int = 0
    rdzv_id: str = "trainkit"
    join_timeout: float = 120.0
    stop_timeout: float = 30.0
    agent_timeout: float = 10.0
    exit_grace: float = 3.0
    aggregator: AggregatorHandle | None = None
    warm_start: bool = True
    warm_wait: float = 60.0
    store_host: str = "127.0.0.1"   # where a warm generation's store listens (the rendezvous host)
    traffic: TrafficReplanner | None = None   # --traffic-plan: re-plan around slow links
    monitor: bool = True          # zero-code monitoring in the workers' bootstrap


def _natural_key(name: str) -> list[int | str]:
    """Sort node2 before node10, so node indices follow the names people read."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@dataclass(kw_only=True)
class _Outcome:
    """How one generation ended, and the policy state after it.

    ``state`` carries the strikes of findings the policy let pass ("continue") while the
    generation ran; ``decision`` is the policy's answer to the fault that ended it when
    that was a finding (``decide`` runs once per finding, in ``_watch``), else None.
    """

    status: str  # "done" | "fault"
    state: PolicyState
    fault: Fault | None = None
    finding: Finding | None = None
    decision: Decision | None = None
    detail: dict[str, Any] = field(default_factory=dict)   # extra fields of the decision event


class Coordinator:
    def __init__(self, control: Control, cfg: CoordinatorConfig, events: EventLog) -> None:
        self.control = control
        self.cfg = cfg
        self.events = events
        self.tail = FindingTail(cfg.run_dir)
        self._aggregator_warned = False
        self._findings: list[Finding] = []
        self._failed_gens: list[int] = []
        self._restore_before: int | None = None     # the restart-loop guard's, see loops
        self._suspect: Suspect | None = None
        self._gen_store: GenerationStore | None = None
        self._reports = JsonlTail(cfg.run_dir / REPORTS_FILE)
        self._resume: dict[str, Any] | None = None   # the restarted generation's first step pending

    # -- membership -------------------------------------------------------------------
    def _wait_for_agents(self) -> list[str]:
        deadline = time.monotonic() + self.cfg.join_timeout
        nodes: list[str] = []
        while time.monotonic() < deadline:
            nodes = self.control.nodes()
            if len(nodes) >= self.cfg.max_nodes + self.cfg.spare:
                break
            time.sleep(0.1)
        minimum = self.cfg.policy.min_nodes
        if len(nodes) < minimum:
            raise RuntimeError(f"only {len(nodes)} node agent(s) registered within "
                               f"{self.cfg.join_timeout:.0f}s, fewer than the minimum of "
                               f"{minimum}: {nodes}")
        return nodes

    # -- main loop --------------------------------------------------------------------
    def run(self) -> int:
        nodes = sorted(self._wait_for_agents(), key=_natural_key)
        index = {n: i for i, n in enumerate(nodes)}
        state = PolicyState(members=tuple(nodes[:self.cfg.max_nodes]),
                            standby=tuple(nodes[self.cfg.max_nodes:]))
        self.events.log("start", nodes=nodes, members=list(state.members),
                        standby=list(state.standby), reason=f"{len(nodes)} node(s) registered")
        gen = 0
        decided: float | None = None
        try:
            while True:
                started = time.time()
                # the generation's environment reaches warm workers through their go file
                env = dict(self.cfg.traffic.env) if self.cfg.traffic else {}
                warm = self._warm_plan(gen, state.members)
                self.control.put(f"tk/gen/{gen}/plan", {
                    "members": list(state.members), "index": index, "time": started,
                    "rdzv_id": self._rdzv_id(gen, False), "use_warm": warm is not None,
                    "warm": warm, "pool": {"rdzv_id": f"{self.cfg.rdzv_id}-pool"}
                    if self.cfg.warm_start else None,
                    "aggregator": self.cfg.aggregator.address if self.cfg.aggregator else None,
                    "rdzv_conf": FAST_RDZV_CONF, "env": env,
                    "restore_before": self._restore_before, "monitor": self.cfg.monitor})
                path = "warm" if warm is not None else "cold"
                self.events.log("generation_start", gen=gen, members=list(state.members),
                                warm=warm is not None, path=path,
                                reason=f"launching torchrun on {len(state.members)} node(s)"
                                       + (": the warm pools take it" if warm else ""))
                if decided is not None:
                    self._resume = {"gen": gen, "decided": decided, "path": path}
                outcome = self._watch(gen, state, started)
                self._note_first_step()
                if outcome.status != "done":
                    state, decided, rc = self._after_fault(gen, state, outcome)
                    if rc is not None:
                        return rc
                    gen += 1
                    continue
                self._write_goodput({"event": "done", "gen": gen})
                self.events.log("done", gen=gen, restarts=state.restarts,
                                excluded=list(state.excluded), reason="all workers finished")
                self.control.put("tk/final", {"status": "done"})
                return 0
        finally:
            self._gen_store = None

    def _after_fault(self, gen: int, state: PolicyState, outcome: _Outcome
                     ) -> tuple[PolicyState, float, int | None]:
        """Stop generation ``gen`` and apply the policy's decision: the next state, when
        it was decided, and an exit code when the job ends here."""
        assert outcome.fault is not None
        decision = outcome.decision or decide(outcome.fault, outcome.state, self.cfg.policy)
        decided = time.time()
        self._stop(gen, outcome.fault.reason)
        # Only the nodes that stay are waited for: an excluded node's workers may take
        # their time to die, and the restart does not need them.
        wait_for = state.members if decision.action == "give_up" else tuple(
            m for m in state.members if m in decision.state.members)   # not a promoted spare
        lost = self._lost_members(gen, wait_for)
        self.events.log("decision", gen=gen, action=decision.action,
                        exclude=list(decision.exclude), fault=outcome.fault.kind,
                        culprits=list(outcome.fault.nodes), reason=decision.reason,
                        restarts=decision.state.restarts, decided=decided,
                        **outcome.detail)
        self._check_loop(gen)
        if decision.action == "give_up":
            self.control.put("tk/final", {"status": "give_up"})
            self._summary(decision)
            return decision.state, decided, 1
        state = decision.state
        lost = tuple(m for m in lost if m in state.members)
        if lost:
            state = PolicyState(members=tuple(m for m in state.members if m not in lost),
                                standby=state.standby, excluded=state.excluded + lost,
                                restarts=state.restarts, strikes=state.strikes)
            self.events.log("exclude", gen=gen, exclude=list(lost),
                            reason="agent did not report after the stop: node lost")
            if len(state.members) < self.cfg.policy.min_nodes:
                self.control.put("tk/final", {"status": "give_up"})
                self._summary(decision)
                return state, decided, 1
        return state, decided, None

    def _warm_plan(self, gen: int, members: tuple[str, ...]) -> dict[str, Any] | None:
        """The plan's ``warm`` part when every member has a ready pool (waiting for one
        still importing, up to ``warm_wait``): the pools to use and the generation's
        store, hosted here. None: a cold start."""
        self._gen_store = None          # the previous warm generation's store is done
        if not gen or not self.cfg.warm_start:
            return None
        pools = pools_ready(self.control, members, wait=self.cfg.warm_wait)
        if pools is None:
            return None
        self._gen_store = store = GenerationStore(self.cfg.store_host)
        return {"pools": pools, "master_addr": store.host, "master_port": store.port,
                "run_id": self._rdzv_id(gen, True)}

    def _rdzv_id(self, gen: int, warm: bool) -> str:
        """A warm generation's run id differs from a cold one's, so a cold start of the
        same generation never meets anything of the warm one."""
        return f"{self.cfg.rdzv_id}-g{gen}{'w' if warm else ''}"

    def _note_first_step(self) -> None:
        """The ``first_step`` event of a restarted generation: which path it took (warm
        pools or cold torchrun) and how long after the decision its first step began."""
        pending = self._resume
        if pending is None:
            return
        for r in self._reports.poll():
            if r.get("kind") == "step" and r.get("gen") == pending["gen"]:
                self._resume = None
                since = r["time"] - pending["decided"]
                self.events.log("first_step", gen=pending["gen"], step=r.get("step"),
                                path=pending["path"], since_decision_s=round(since, 3),
                                reason=f"step {r.get('step')} began {since:.2f} s after the "
                                       f"decision ({pending['path']} start)")
                return

    # -- watching one generation ------------------------------------------------------
    def _watch(self, gen: int, state: PolicyState, started: float) -> _Outcome:
        """Watch generation ``gen`` until it finishes or a fault ends it.

        Each finding of this generation goes to the policy once: a "continue" keeps the
        generation running with the new state (its strikes count later), anything else
        ends the watch with that decision. The returned outcome always carries the
        latest state.
        """
        first_failure: float | None = None
        while True:
            exits = {m: self.control.get(f"tk/gen/{gen}/exit/{m}") for m in state.members}
            done = {m: e for m, e in exits.items() if e is not None}
            if len(done) == len(state.members) and all(e["rc"] == 0 for e in done.values()):
                return _Outcome(status="done", state=state)
            for finding in self.tail.poll():
                if (finding.time < started or not self._same_generation(finding, gen)
                        or finding.cls in NOTE_CLASSES):
                    continue
                self._findings.append(finding)
                self.events.log("finding", gen=gen, finding=finding.to_json(),
                                reason=f"{finding.cls} ranks={list(finding.ranks)} "
                                       f"hosts={list(finding.hosts)}")
                fault = fault_from_finding(finding, state.members)
                decision = decide(fault, state, self.cfg.policy)
                if decision.action == "continue":
                    self.events.log("decision", gen=gen, action="continue", fault=fault.kind,
                                    culprits=list(fault.nodes), reason=decision.reason)
                    state = decision.state
                    replanned = self._traffic_replan(gen, finding, fault, state)
                    if replanned is not None:
                        return replanned
                    continue
                return _Outcome(status="fault", state=state, fault=fault, finding=finding,
                                decision=decision)
            failed = {m: e for m, e in done.items() if e["rc"] != 0}
            if failed:
                first_failure = first_failure or time.monotonic()
                if time.monotonic() - first_failure >= self.cfg.exit_grace:
                    return _Outcome(status="fault", state=state,
                                    fault=self._exit_fault(failed, self._bad_step_report(gen)))
            lost = self._stale(state.members, done)
            if lost:
                return _Outcome(status="fault", state=state, fault=Fault(
                    kind="crash", nodes=tuple(lost), hardware=True,
                    reason=f"node agent(s) {lost} stopped heartbeating"))
            self._check_aggregator(gen)
            self._note_first_step()
            time.sleep(0.1)

    def _traffic_replan(self, gen: int, finding: Finding, fault: Fault,
                        state: PolicyState) -> _Outcome | None:
        """--traffic-plan: a slow link the policy lets pass becomes the next generation's
        plan (:mod:`trainkit.run.replan`); a restart, within --max-restarts, once per link set."""
        traffic = self.cfg.traffic
        if traffic is None:
            return None
        result = traffic.consider(finding)
        if result is None:
            return None
        if result.restart and state.restarts + 1 > self.cfg.policy.max_restarts:
            self.events.log("traffic_plan", gen=gen, restart=False, **result.event_fields(),
                            reason=f"{result.reason}; not restarting: --max-restarts="
                                   f"{self.cfg.policy.max_restarts} exhausted")
            return None
        if not result.restart:
            self.events.log("traffic_plan", gen=gen, restart=False, **result.event_fields(),
                            reason=result.reason)
            return None
        path = traffic.commit(result, gen + 1)
        self.events.log("traffic_plan", gen=gen, restart=True, plan=str(path), env=traffic.env,
                        **result.event_fields(), reason=f"{result.reason}: wrote {path.name}")
        reason = f"{result.reason}; generation {gen + 1} runs under {path.name}"
        decision = Decision(action="restart", exclude=(), reason=reason,
                            state=replace(state, restarts=state.restarts + 1))
        return _Outcome(status="fault", state=state, fault=replace(fault, reason=reason),
                        finding=finding, decision=decision,
                        detail={"links": list(result.links), "plan": str(path)})

    @staticmethod
    def _same_generation(finding: Finding, gen: int) -> bool:
        return not finding.attempts or gen in finding.attempts

    def _bad_step_report(self, gen: int) -> str | None:
        """What generation ``gen``'s ``bad_step`` report said, if it sent one (read once,
        when the generation has failed)."""
        record = generation_records(read_jsonl(self.cfg.run_dir / REPORTS_FILE)).get(gen)
        if record is None or record.bad_step is None:
            return None
        return f"step {record.bad_step}" + (f" ({record.bad_reason})" if record.bad_reason else "")

    @staticmethod
    def _exit_fault(failed: dict[str, dict[str, Any]], bad_step: str | None = None) -> Fault:
        """Culprits of a failure the detector did not explain: nodes whose workers died
        from a signal other than the SIGTERM torchrun sends a failed worker's siblings,
        else the node that failed first.

        A bad step is the job's fault, not a node's: known from ``BAD_STEP_EXIT`` or from
        the generation's ``bad_step`` report (``bad_step``). The report counts on its own
        because the exit code can be lost: a worker that calls ``sys.exit`` with its
        process group still alive can abort in C++ teardown (SIGABRT, "terminate called
        without an active exception"), and that must not read as a crash."""
        signalled = tuple(m for m, e in failed.items()
                          if any(c < 0 and c != -signal.SIGTERM for c in e["exitcodes"]))
        first = min(failed, key=lambda m: failed[m]["time"])
        nodes = signalled or (first,)
        codes = {m: failed[m]["exitcodes"] or [failed[m]["rc"]] for m in nodes}
        if any(BAD_STEP_EXIT in e["exitcodes"] for e in failed.values()):
            return Fault(kind="bad_step", reason=f"the script reported a bad step (exit code "
                         f"{BAD_STEP_EXIT}): {codes}")
        if bad_step is not None:
            return Fault(kind="bad_step", reason=f"the script reported a bad step at {bad_step}; "
                         f"workers exited with {codes}")
        return Fault(kind="crash", nodes=nodes, reason=f"workers exited with {codes}")

    def _stale(self, members: tuple[str, ...], done: dict[str, Any]) -> list[str]:
        now = time.time()
        out = []
        for m in members:
            if m in done:
                continue
            hb = self.control.get(f"tk/hb/{m}")
            if hb is not None and now - hb > self.cfg.agent_timeout:
                out.append(m)
        return out

    def _check_aggregator(self, gen: int) -> None:
        agg = self.cfg.aggregator
        if agg is not None and not self._aggregator_warned and not agg.alive():
            self._aggregator_warned = True
            self.events.log("warning", gen=gen, reason=f"the detection aggregator (pid {agg.pid}) "
                            "is gone: training continues unmonitored")

    # -- stopping -----------------------------------------------------------------------
    def _stop(self, gen: int, reason: str) -> None:
        self.control.put(f"tk/gen/{gen}/stop", {"reason": reason, "time": time.time()})

    def _lost_members(self, gen: int, members: tuple[str, ...]) -> tuple[str, ...]:
        """Wait for every member to report the stop; those that never do are lost."""
        deadline = time.monotonic() + self.cfg.stop_timeout
        pending = set(members)
        while pending and time.monotonic() < deadline:
            pending = {m for m in pending if self.control.get(f"tk/gen/{gen}/exit/{m}") is None}
            if pending:
                time.sleep(0.1)
        self.events.log("stopped", gen=gen, reason="workers stopped" if not pending else
                        f"workers stopped; no report from {sorted(pending)}")
        return tuple(sorted(pending))

    def wait_for_goodbyes(self, timeout: float) -> None:
        """Keep the store up until every agent has seen ``tk/final`` (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        nodes = self.control.nodes()
        while time.monotonic() < deadline:
            if all(self.control.get(f"tk/bye/{n}") is not None
                   or self.control.get(f"tk/left/{n}") is not None for n in nodes):
                return
            time.sleep(0.1)

    def _check_loop(self, gen: int) -> None:
        """The restart-loop guard (:mod:`trainkit.run.loops`) after generation ``gen``
        failed: a suspect step makes the next generations restore an older one."""
        self._failed_gens.append(gen)
        records = generation_records(read_jsonl(self.cfg.run_dir / REPORTS_FILE))
        suspect = check_loop([records[g] for g in self._failed_gens if g in records])
        if suspect is None or suspect.restore_before == self._restore_before:
            return
        self._suspect, self._restore_before = suspect, suspect.restore_before
        self.events.log("suspect_step", gen=gen, step=suspect.step,
                        fail_step=suspect.fail_step, restore_before=suspect.restore_before,
                        reason=f"{suspect.reason}; the next generation restores a step "
                               f"before {suspect.restore_before}")

    def _write_goodput(self, final: dict[str, Any]) -> None:
        """``run_dir/goodput.json``, before the final event (which stays the last line)."""
        try:
            write_goodput(self.cfg.run_dir, final=final)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.events.log("warning", reason=f"goodput.json not written: {exc}")

    def _summary(self, decision: Decision) -> None:
        state = decision.state
        self._write_goodput({"event": "give_up"})
        self.events.log("give_up", restarts=state.restarts, excluded=list(state.excluded),
                        findings=len(self._findings), reason=decision.reason,
                        suspect=None if self._suspect is None else self._suspect.reason)
        faults = [e for e in read_events(self.cfg.run_dir) if e["event"] == "decision"]
        lines = [f"trainkit run: giving up after {state.restarts} restart(s): {decision.reason}",
                 f"  nodes excluded: {', '.join(state.excluded) or 'none'}",
                 f"  faults seen: {len(faults)}"]
        lines += [f"    gen {e.get('gen')}: {e.get('fault')} on {e.get('culprits') or '?'} -> "
                  f"{e.get('action')}" for e in faults]
        if self._suspect is not None:
            lines.append(f"  suspected cause: {self._suspect.reason}")
        lines.append(f"  details: {self.events.path}")
        print("\n".join(lines), file=sys.stderr, flush=True)
