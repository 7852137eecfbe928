"""Fault injection: make a chosen rank hang, crash, slow down or delay one peer.

Fault injection is first-class so that tests, benchmarks, demos and users
rehearsing failures all exercise the same code. It is driven by an API
(:func:`parse_faults`, :class:`FaultInjector`) and by the environment variable
``TRAINKIT_FAULT``, whose format is a contract::

    TRAINKIT_FAULT="rank=2,step=50,kind=hang"
    TRAINKIT_FAULT="host=node3,step=10,kind=crash;rank=1,step=5,kind=slow:3.0"

- kinds: ``hang`` (never issue the next collective), ``hang_comm`` (record the
  arrival at the next collective, then withhold it), ``crash`` (SIGKILL),
  ``slow:FACTOR`` (compute FACTOR times slower from that step on),
  ``delay_peer:RANK:MS`` (sends to global rank RANK leave MS milliseconds late;
  point-to-point only, because on gloo delaying a collective's issue is
  indistinguishable from a straggler);
- target: ``rank=R`` (global rank), ``host=NAME`` (every rank on that host) or
  ``node=K`` (every rank of node K: ``TRAINKIT_NODE_INDEX`` under ``trainkit run``,
  whose node indices are stable across restarts, else torchelastic's ``GROUP_RANK``);
- ``step`` is the value passed to ``CollectiveMonitor.step()``; the fault acts
  before the first collective issued after that step begins.

Each fault fires once per run: when it fires it leaves a marker under
``run_dir/faults/``, so a restarted job that inherits the same environment does
not crash again forever. A malformed value raises :class:`FaultSpecError` at
start-up, naming the offending part.

The injector only ever acts inside trainkit's monitored process-group wrapper
(:mod:`trainkit.detect.probe`), so trainkit's own groups are never injected.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from trainkit.errors import TrainkitError
from trainkit.rundir import FAULT_ENV, FAULTS_DIR, local_identity

__all__ = [
    "FAULT_ENV",
    "FAULT_KINDS",
    "FaultSpec",
    "FaultSpecError",
    "FaultInjector",
    "parse_faults",
    "local_identity",
]

FAULT_KINDS = ("hang", "hang_comm", "crash", "slow", "delay_peer")


class FaultSpecError(TrainkitError, ValueError):
    """A ``TRAINKIT_FAULT`` value (or API argument) that does not parse."""


@dataclass(frozen=True)
class FaultSpec:
    """One fault: what happens, to whom, from which step."""

    kind: str
    step: int
    rank: int | None = None
    host: str | None = None
    node: int | None = None
    factor: float | None = None      # slow
    peer: int | None = None          # delay_peer
    delay_ms: float | None = None    # delay_peer

    @property
    def fault_id(self) -> str:
        """Canonical text of the fault; it names the fired-marker file."""
        target = (f"rank={self.rank}" if self.rank is not None
                  else f"host={self.host}" if self.host is not None else f"node={self.node}")
        kind = self.kind
        if self.kind == "slow":
            kind = f"slow:{self.factor:g}"
        elif self.kind == "delay_peer":
            kind = f"delay_peer:{self.peer}:{self.delay_ms:g}"
        return f"{target},step={self.step},kind={kind}"

    def matches(self, *, rank: int, host: str, node: int | None) -> bool:
        if self.rank is not None:
            return self.rank == rank
        if self.host is not None:
            return self.host == host
        return node is not None and self.node == node


def _parse_int(key: str, value: str, part: str) -> int:
    try:
        out = int(value)
    except ValueError:
        raise FaultSpecError(f"{FAULT_ENV}: {key}={value!r} is not an integer in {part!r}") from None
    if out < 0:
        raise FaultSpecError(f"{FAULT_ENV}: {key} must be >= 0 in {part!r}")
    return out


def _parse_kind(value: str, part: str) -> dict:
    name, *params = value.split(":")
    if name not in FAULT_KINDS:
        raise FaultSpecError(f"{FAULT_ENV}: unknown kind {name!r} in {part!r}; "
                             f"expected one of hang, hang_comm, crash, slow:F, delay_peer:R:MS")
    if name in ("hang", "hang_comm", "crash"):
        if params:
            raise FaultSpecError(f"{FAULT_ENV}: kind {name!r} takes no parameters in {part!r}")
        return {"kind": name}
    if name == "slow":
        if len(params) != 1:
            raise FaultSpecError(f"{FAULT_ENV}: slow needs one factor, e.g. slow:3.0, in {part!r}")
        try:
            factor = float(params[0])
        except ValueError:
            raise FaultSpecError(f"{FAULT_ENV}: slow factor {params[0]!r} is not a number "
                                 f"in {part!r}") from None
        if not factor > 1.0 or factor != factor or factor == float("inf"):
            raise FaultSpecError(f"{FAULT_ENV}: slow factor must be a finite number > 1 in {part!r}")
        return {"kind": "slow", "factor": factor}
    if len(params) != 2:
        raise FaultSpecError(f"{FAULT_ENV}: delay_peer needs RANK:MS, e.g. delay_peer:1:200, "
                             f"in {part!r}")
    peer = _parse_int("delay_peer rank", params[0], part)
    try:
        delay_ms = float(params[1])
    except ValueError:
        raise FaultSpecError(f"{FAULT_ENV}: delay_peer milliseconds {params[1]!r} is not a number "
                             f"in {part!r}") from None
    if not 0 < delay_ms < 3_600_000:
        raise FaultSpecError(f"{FAULT_ENV}: delay_peer milliseconds must be in (0, 3600000) "
                             f"in {part!r}")
    return {"kind": "delay_peer", "peer": peer, "delay_ms": delay_ms}


def parse_faults(text: str | None) -> tuple[FaultSpec, ...]:
    """Parse the ``TRAINKIT_FAULT`` contract format; ``None``/empty gives no faults, and a
    value of separators only (``";;;"``) is refused.

    >>> parse_faults("rank=2,step=50,kind=hang")[0].rank
    2
    """
    if text is None or not text.strip():
        return ()
    specs: list[FaultSpec] = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        fields: dict[str, str] = {}
        for item in part.split(","):
            key, sep, value = item.strip().partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise FaultSpecError(f"{FAULT_ENV}: expected key=value, got {item.strip()!r} "
                                     f"in {part!r}")
            if key not in ("rank", "host", "node", "step", "kind"):
                raise FaultSpecError(f"{FAULT_ENV}: unknown key {key!r} in {part!r}; "
                                     f"expected rank|host|node, step, kind")
            if key in fields:
                raise FaultSpecError(f"{FAULT_ENV}: {key!r} given twice in {part!r}")
            fields[key] = value
        targets = [k for k in ("rank", "host", "node") if k in fields]
        if len(targets) != 1:
            raise FaultSpecError(f"{FAULT_ENV}: give exactly one of rank=, host=, node= in {part!r}")
        for required in ("step", "kind"):
            if required not in fields:
                raise FaultSpecError(f"{FAULT_ENV}: missing {required}= in {part!r}")
        target: dict = {}
        if "rank" in fields:
            target["rank"] = _parse_int("rank", fields["rank"], part)
        elif "node" in fields:
            target["node"] = _parse_int("node", fields["node"], part)
        else:
            if not re.fullmatch(r"[A-Za-z0-9_.\-]+", fields["host"]):
                raise FaultSpecError(f"{FAULT_ENV}: bad host name {fields['host']!r} in {part!r}")
            target["host"] = fields["host"]
        spec = FaultSpec(step=_parse_int("step", fields["step"], part),
                         **target, **_parse_kind(fields["kind"], part))
        if spec.kind == "delay_peer" and spec.rank is not None and spec.peer == spec.rank:
            raise FaultSpecError(f"{FAULT_ENV}: delay_peer cannot delay a rank to itself in {part!r}")
        specs.append(spec)
    if not specs:   # only separators: a typo, not a deliberate "no faults" (that is unset/empty)
        raise FaultSpecError(f"{FAULT_ENV}={text!r} names no fault; unset it (or leave it empty) "
                             "for none")
    return tuple(specs)


class FaultInjector:
    """Acts out the faults aimed at this rank, from the monitored process group.

    Who calls what: ``CollectiveMonitor.step(s)`` calls :meth:`on_step`; the
    process-group wrapper calls :meth:`before_issue` before issuing every
    collective and :meth:`after_arrival` after recording its arrival. All
    three run on the training thread.
    """

    def __init__(self, faults: tuple[FaultSpec, ...], *, rank: int, run_dir: str | os.PathLike | None,
                 host: str | None = None, node: int | None = None, attempt: int | None = None):
        ident_host, _, ident_attempt, ident_node = local_identity()
        self.rank = rank
        self.host = host if host is not None else ident_host
        self.node = node if node is not None else ident_node
        self.attempt = attempt if attempt is not None else ident_attempt
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.faults = tuple(f for f in faults if f.matches(rank=rank, host=self.host, node=self.node))
        self._step: int | None = None
        self._pending: list[FaultSpec] = []   # armed, waiting for the next collective
        self._slow: FaultSpec | None = None
        self._delays: dict[int, float] = {}   # peer global rank -> seconds
        self._fired: set[str] = set()
        self._step_started = time.perf_counter()
        self._injected_sleep = 0.0
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, *, rank: int, run_dir: str | os.PathLike | None) -> FaultInjector:
        """The injector for ``TRAINKIT_FAULT``; raises FaultSpecError when malformed."""
        return cls(parse_faults(os.environ.get(FAULT_ENV)), rank=rank, run_dir=run_dir)

    @property
    def active(self) -> bool:
        return bool(self.faults)

    # -- markers ---------------------------------------------------------------
    def _marker_dir(self) -> Path | None:
        return self.run_dir / FAULTS_DIR if self.run_dir is not None else None

    @staticmethod
    def _marker_stem(fault: FaultSpec) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", fault.fault_id)

    def already_fired(self, fault: FaultSpec) -> bool:
        """True if this rank fired it before, or another rank fired it in an earlier attempt."""
        if fault.fault_id in self._fired:
            return True
        mdir = self._marker_dir()
        if mdir is None or not mdir.is_dir():
            return False
        stem = self._marker_stem(fault)
        for path in mdir.glob(f"{stem}.rank*.json"):
            if path.name == f"{stem}.rank{self.rank}.json":
                return True
            try:
                if json.loads(path.read_text()).get("attempt") != self.attempt:
                    return True
            except (OSError, ValueError):
                return True
        return False

    def _mark(self, fault: FaultSpec, step: int | None) -> None:
        self._fired.add(fault.fault_id)
        mdir = self._marker_dir()
        if mdir is None:
            return
        mdir.mkdir(parents=True, exist_ok=True)
        record = {"fault": fault.fault_id, "kind": fault.kind, "rank": self.rank, "host": self.host,
                  "attempt": self.attempt, "step": step, "time": time.time(), "pid": os.getpid()}
        path = mdir / f"{self._marker_stem(fault)}.rank{self.rank}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)

    # -- hooks -----------------------------------------------------------------
    def on_step(self, step: int) -> None:
        """A new step begins: arm faults whose step has come; apply a slowdown."""
        now = time.perf_counter()
        compute = max(0.0, now - self._step_started - self._injected_sleep)
        self._step_started, self._injected_sleep = now, 0.0
        self._step = step
        for fault in self.faults:
            if fault.step <= step and fault not in self._pending and not self.already_fired(fault):
                self._pending.append(fault)
        if self._slow is not None and compute > 0:
            # The previous step's own work took `compute`; stretch this one by (F-1)x.
            self._sleep((self._slow.factor - 1.0) * compute)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)
            self._injected_sleep += seconds

    def before_issue(self, op: str, peer: int | None) -> None:
        """Runs before a collective is recorded and issued: crash, hang, arm slow/delay."""
        if not self._pending:
            return
        with self._lock:
            pending, self._pending = self._pending, []
        keep: list[FaultSpec] = []
        for fault in pending:
            if fault.kind == "crash":
                self._mark(fault, self._step)
                os.kill(os.getpid(), signal.SIGKILL)
            elif fault.kind == "hang":
                self._mark(fault, self._step)
                _hang_forever()
            elif fault.kind == "slow":
                self._mark(fault, self._step)
                self._slow = fault
            elif fault.kind == "delay_peer":
                self._mark(fault, self._step)
                self._delays[fault.peer] = fault.delay_ms / 1000.0
            else:   # hang_comm acts after the arrival is recorded
                keep.append(fault)
        self._pending = keep + self._pending

    def after_arrival(self, op: str, peer: int | None) -> None:
        """Runs after the arrival is recorded, before the real issue: withhold, delay."""
        if self._pending:
            for fault in list(self._pending):
                if fault.kind == "hang_comm":
                    self._mark(fault, self._step)
                    _hang_forever()
        if self._delays and op == "send" and peer in self._delays:
            time.sleep(self._delays[peer])


def _hang_forever() -> None:
    """Block the calling (training) thread for good; background threads keep running."""
    while True:
        time.sleep(3600)
