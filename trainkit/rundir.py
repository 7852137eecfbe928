"""The ground floor shared by ``detect``, ``run``, ``checkpoint`` and the CLI.

Why one module: the run directory and the ``TRAINKIT_*`` environment are contracts
between processes written by different capabilities (the aggregator writes
``diagnosis.jsonl``, ``trainkit run`` tails it; agents set ``TRAINKIT_MEMORY_DIR``, the
checkpointer reads it). Defining each name once, below every capability, keeps the two
sides from drifting apart and lets imports run one way.

Environment variables (set by ``trainkit run`` for its workers, or by a user):

| variable | meaning |
|---|---|
| ``TRAINKIT_AGGREGATOR`` | ``host:port`` of a running aggregator; when unset, rank 0 starts one |
| ``TRAINKIT_AGG_SECRET`` | the job's aggregator secret, made by whoever starts the aggregator; every rank's hello carries it |
| ``TRAINKIT_RUN_DIR`` | run directory (findings, markers) |
| ``TRAINKIT_HANG_TIMEOUT`` | seconds, overrides the monitor's ``hang_timeout`` |
| ``TRAINKIT_DETECT`` | ``0`` disables the monitor entirely |
| ``TRAINKIT_HOSTNAME`` | host name to report; ``trainkit run`` sets the node id (so several simulated nodes on one machine are told apart) |
| ``TRAINKIT_NODE`` | node name of the agent |
| ``TRAINKIT_NODE_INDEX`` | node index that survives re-rendezvous |
| ``TRAINKIT_GENERATION`` | generation (restart attempt) number |
| ``TRAINKIT_STACK_SIGNAL`` | signal for faulthandler stack dumps (default ``SIGUSR2``) |
| ``TRAINKIT_FAULT`` | fault injection, see :mod:`trainkit.faults` |
| ``TRAINKIT_MEMORY_DIR`` | memory-tier directory owned by the node agent |
| ``TRAINKIT_WARM_GO`` | file whose appearance releases a pre-started warm generation |
| ``TRAINKIT_PLAN`` | traffic plan (``plan.gen<G>.json``) this generation runs under (``--traffic-plan``) |
| ``TRAINKIT_RESTORE_BEFORE`` | step: a resuming ``Checkpointer`` loads only steps older than it (set by ``trainkit run`` after a restart loop) |
| ``TRAINKIT_AUTO_MONITOR`` | ``0``: ``trainkit run``'s worker bootstrap does not monitor a script that never imports trainkit (``--no-monitor``) |

Run-dir readers: every JSON-lines file of a run directory is appended one line at a
time by another process, so a reader can meet a torn last line (a writer killed or
caught mid-write). :func:`read_jsonl` and :class:`JsonlTail` are the only readers, and
they agree: a torn last line is skipped (whole-file read) or waited for (tail).

Who writes and who reads ``diagnosis.jsonl``: the aggregator (one process per job,
``trainkit.detect.aggregator``) appends one :class:`Finding` per line with
:meth:`Finding.to_json`; ``trainkit run``'s coordinator tails it with
:class:`FindingTail` (typed findings, in order); ``trainkit diagnose`` reads it whole.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "AGGREGATOR_ENV", "AGG_SECRET_ENV", "RUN_DIR_ENV", "HANG_TIMEOUT_ENV", "DETECT_ENV", "HOSTNAME_ENV",
    "NODE_ENV", "NODE_INDEX_ENV", "GENERATION_ENV", "STACK_SIGNAL_ENV",
    "FAULT_ENV", "MEMORY_DIR_ENV", "WARM_GO_ENV", "PLAN_ENV", "RESTORE_BEFORE_ENV", "BAD_STEP_EXIT",
    "REPORTS_FILE", "GOODPUT_FILE", "report", "report_step", "restore_before",
    "AUTO_MONITOR_ENV",
    "AGGREGATOR_ADDR_FILE", "DIAGNOSIS_FILE", "TIMELINE_FILE", "EVENTS_FILE", "LOGS_DIR",
    "FAULTS_DIR",
    "FINDING_CLASSES", "FINDING_FIELDS", "NOTE_CLASSES", "Finding", "append_note", "FindingTail", "JsonlError", "JsonlTail",
    "local_identity", "read_fault_markers", "read_findings", "read_jsonl",
    "STATUS_DIR", "read_status", "write_status",
]

AGGREGATOR_ENV = "TRAINKIT_AGGREGATOR"
AGG_SECRET_ENV = "TRAINKIT_AGG_SECRET"
RUN_DIR_ENV = "TRAINKIT_RUN_DIR"
HANG_TIMEOUT_ENV = "TRAINKIT_HANG_TIMEOUT"
DETECT_ENV = "TRAINKIT_DETECT"
HOSTNAME_ENV = "TRAINKIT_HOSTNAME"
NODE_ENV = "TRAINKIT_NODE"
NODE_INDEX_ENV = "TRAINKIT_NODE_INDEX"
GENERATION_ENV = "TRAINKIT_GENERATION"
STACK_SIGNAL_ENV = "TRAINKIT_STACK_SIGNAL"
FAULT_ENV = "TRAINKIT_FAULT"
MEMORY_DIR_ENV = "TRAINKIT_MEMORY_DIR"
WARM_GO_ENV = "TRAINKIT_WARM_GO"
PLAN_ENV = "TRAINKIT_PLAN"
RESTORE_BEFORE_ENV = "TRAINKIT_RESTORE_BEFORE"
# A worker that exits with this code says "this step is bad" (a NaN loss, say), after
# ``trainkit.run.report_bad_step`` (EX_DATAERR of sysexits.h).
BAD_STEP_EXIT = 65
AUTO_MONITOR_ENV = "TRAINKIT_AUTO_MONITOR"

# Files of a run directory.
AGGREGATOR_ADDR_FILE = "aggregator.json"   # {"host", "port", "pid"}, once the aggregator listens
DIAGNOSIS_FILE = "diagnosis.jsonl"          # one finding per line, appended by the aggregator
TIMELINE_FILE = "timeline.jsonl"            # collectives around faults, for `diagnose --plot`
EVENTS_FILE = "events.jsonl"                # every decision of `trainkit run`
LOGS_DIR = "logs"                           # torchrun and worker output
FAULTS_DIR = "faults"                       # markers written when an injected fault fires
REPORTS_FILE = "reports.jsonl"              # workers' progress and checkpoint costs, see report()
GOODPUT_FILE = "goodput.json"               # the time breakdown `trainkit run` writes at the end
STATUS_DIR = "status"                       # latest step / checkpoint, for the live console


# -- identity --------------------------------------------------------------------------
def local_identity() -> tuple[str, int, int, int | None]:
    """(host, local_rank, restart attempt, node) of this process, from torchelastic env.

    ``TRAINKIT_HOSTNAME`` overrides the host name, so several "hosts" can be
    simulated on one machine. ``trainkit run`` starts a fresh torchrun per
    generation, so it sets ``TRAINKIT_GENERATION`` (the attempt) and
    ``TRAINKIT_NODE_INDEX`` (a node index that survives re-rendezvous); they take
    precedence over torchelastic's ``TORCHELASTIC_RESTART_COUNT`` and ``GROUP_RANK``.
    That count is per agent and can differ between the nodes of one round, so anything
    that must agree across ranks (a store key, the aggregator's timeline) takes rank 0's:
    ``CollectiveMonitor.attempt``.
    """
    host = os.environ.get(HOSTNAME_ENV) or socket.gethostname()
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    attempt = int(os.environ.get(GENERATION_ENV)
                  or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    node_text = os.environ.get(NODE_INDEX_ENV) or os.environ.get("GROUP_RANK")
    return host, local_rank, attempt, int(node_text) if node_text else None


# -- workers' reports -------------------------------------------------------------------
def report(kind: str, **fields: Any) -> None:
    """Append one line to ``$TRAINKIT_RUN_DIR/reports.jsonl``; nothing outside a run.

    Why: goodput accounting and the restart-loop guard of ``trainkit run`` need what
    only the workers know (the step they reached, what a checkpoint save stalled, what a
    restore took). Kinds: ``step`` (rank 0, per step), ``ckpt_save`` (``step``,
    ``stall_s``), ``ckpt_commit`` (``step``, ``tier``), ``ckpt_restore`` (``step``,
    ``tier``, ``seconds``), ``bad_step`` (``step``, ``reason``). Each line is one
    ``O_APPEND`` write, so lines of concurrent writers do not interleave; a failure to
    write never reaches the training loop.
    """
    run_dir = os.environ.get(RUN_DIR_ENV)
    if not run_dir:
        return
    record = {"time": time.time(), "kind": kind,
              "rank": int(os.environ.get("RANK", "0") or 0),
              "node": os.environ.get(NODE_ENV),
              "gen": int(os.environ.get(GENERATION_ENV, "0") or 0), **fields}
    try:
        fd = os.open(Path(run_dir) / REPORTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record, default=str) + "\n").encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def report_step(step: int) -> None:
    """Rank 0's progress: one ``step`` report (training step ``step`` begins)."""
    if os.environ.get("RANK", "0") == "0":
        report("step", step=int(step))


def restore_before() -> int | None:
    """``TRAINKIT_RESTORE_BEFORE`` as a step, or None (unset or not a number)."""
    text = os.environ.get(RESTORE_BEFORE_ENV, "").strip()
    return int(text) if text.lstrip("-").isdigit() else None


# -- JSON lines ------------------------------------------------------------------------
class JsonlError(ValueError):
    """A complete (newline-terminated) line that is not JSON, in a strict read."""

    def __init__(self, path: Path, lineno: int) -> None:
        super().__init__(f"{path}:{lineno}: not a JSON line")
        self.path, self.lineno = path, lineno


def _parse(lines: list[bytes], *, path: Path, first: int, strict: bool) -> Iterator[Any]:
    for n, line in enumerate(lines, first):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError:
            if strict:
                raise JsonlError(path, n) from None


def read_jsonl(path: str | os.PathLike, *, strict: bool = False) -> list[Any]:
    """Every JSON line of ``path`` (none if it does not exist), oldest first.

    A torn last line (no newline, not JSON) is skipped in every mode: its writer was
    caught mid-write. A last line without a newline that *is* JSON counts (a writer
    that never ends with a newline). A complete line that is not JSON is skipped, or
    with ``strict=True`` raises :class:`JsonlError` naming the line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    tail = lines.pop()          # b"" when the file ends with a newline
    out = list(_parse(lines, path=path, first=1, strict=strict))
    out.extend(_parse([tail], path=path, first=len(lines) + 1, strict=False))
    return out


class JsonlTail:
    """Yields the JSON lines appended to ``path`` since the last :meth:`poll`.

    Starts at the file's current end (``from_start=False``) so a restarted reader does
    not replay old lines. A half-written last line stays unread until its newline
    arrives; complete lines that are not JSON are skipped. One reader thread per tail.
    """

    def __init__(self, path: str | os.PathLike, *, from_start: bool = False) -> None:
        self.path = Path(path)
        self._offset = 0 if from_start or not self.path.exists() else self.path.stat().st_size
        self._lineno = 1

    def poll(self) -> list[Any]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[:data.rfind(b"\n") + 1]   # a half-written last line waits
        self._offset += len(complete)
        lines = complete.splitlines()
        first, self._lineno = self._lineno, self._lineno + len(lines)
        return list(_parse(lines, path=self.path, first=first, strict=False))


def write_status(run_dir: str | os.PathLike, name: str, record: Mapping[str, Any]) -> None:
    """Replace ``run_dir/status/<name>.json`` atomically (the newest value wins).

    Written by global rank 0 at most a few times a second (``step``: the latest training
    step, ``checkpoint``: the latest committed step and its tier) and read by the
    console's status line; one file per writer, so writers never race each other."""
    sdir = Path(run_dir) / STATUS_DIR
    sdir.mkdir(parents=True, exist_ok=True)
    tmp = sdir / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(dict(record), default=str))
    os.replace(tmp, sdir / f"{name}.json")


def read_status(run_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Every status record of a run, by name; unreadable ones are left out."""
    out: dict[str, dict[str, Any]] = {}
    sdir = Path(run_dir) / STATUS_DIR
    for path in sdir.glob("*.json") if sdir.is_dir() else []:
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return out


def read_fault_markers(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The markers injected faults left under ``run_dir/faults/`` (see
    :mod:`trainkit.faults`), in name order; unreadable ones are skipped."""
    out = []
    mdir = Path(run_dir) / FAULTS_DIR
    for path in sorted(mdir.glob("*.json")) if mdir.is_dir() else []:
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


# -- findings --------------------------------------------------------------------------
FINDING_CLASSES = ("crash", "hang_noncomm", "hang_comm", "straggler", "slow_link")
# Lines of diagnosis.jsonl that are not faults: shown by `trainkit diagnose`, never acted on.
NOTE_CLASSES = ("coverage",)
FINDING_FIELDS = ("time", "class", "ranks", "hosts", "ids", "link", "step", "group", "seq",
                  "evidence", "confidence")


def _expect(name: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ValueError(f"finding field {name!r}: expected {what}, got {value!r}")
    if not isinstance(value, kind):
        raise ValueError(f"finding field {name!r}: expected {what}, got {value!r}")
    return value


def _get(data: dict[str, Any], key: str, default: Any) -> Any:
    """``data[key]``, with ``default`` for a missing key or a JSON null."""
    value = data.get(key)
    return default if value is None else value


def _optional_int(name: str, value: Any) -> int | None:
    return None if value is None else _expect(name, value, int, "an integer or null")


def _int_list(name: str, value: Any) -> tuple[int, ...]:
    _expect(name, value, list, "a list of integers")
    return tuple(_expect(name, v, int, "a list of integers") for v in value)


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One line of ``run_dir/diagnosis.jsonl``; the JSON field names are a contract.

    ``ranks`` are the culprit global ranks and ``hosts`` their hosts, position by
    position (``"?"`` for a rank the aggregator never heard from). ``ids`` carry each
    culprit's full identity (rank, host, local rank, attempt) for people and plots; the
    host named there is the same as in ``hosts``, which is the field code reads, through
    :attr:`named_hosts`. ``extra`` keeps fields a newer writer added, so a round trip
    through an older reader loses nothing.
    """

    time: float
    cls: str
    ranks: tuple[int, ...] = ()
    hosts: tuple[str, ...] = ()
    ids: tuple[Mapping[str, Any], ...] = ()
    link: tuple[int, int] | None = None
    step: int | None = None
    group: str | None = None
    seq: int | None = None
    evidence: Mapping[str, Any] = field(default_factory=dict)
    confidence: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def named_hosts(self) -> tuple[str, ...]:
        """The culprits' hosts, each once, in order; unknown (``"?"``) hosts left out."""
        return tuple(dict.fromkeys(h for h in self.hosts if h and h != "?"))

    @property
    def attempts(self) -> frozenset[int]:
        """Restart attempts (generations) of the culprit ranks, where known."""
        return frozenset(i["attempt"] for i in self.ids if isinstance(i.get("attempt"), int))

    def to_json(self) -> dict[str, Any]:
        out = {"time": self.time, "class": self.cls, "ranks": list(self.ranks),
               "hosts": list(self.hosts), "ids": [dict(i) for i in self.ids],
               "link": list(self.link) if self.link is not None else None, "step": self.step,
               "group": self.group, "seq": self.seq, "evidence": dict(self.evidence),
               "confidence": round(float(min(1.0, max(0.0, self.confidence))), 4)}
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    @classmethod
    def from_json(cls, data: Any) -> Finding:
        """The finding of one parsed line; a field of the wrong type raises ValueError.

        Missing optional fields take their defaults; a line without ``hosts`` (written
        by hand, or by an older writer) takes them from ``ids``.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a finding is a JSON object, got {type(data).__name__}")
        for key in ("time", "class"):
            if key not in data:
                raise ValueError(f"finding without {key!r}: {sorted(data)}")
        when = _expect("time", data["time"], (int, float), "a number")
        if not math.isfinite(when):
            raise ValueError(f"finding field 'time': expected a finite number, got {when!r}")
        kind = _expect("class", data["class"], str, "a string")
        ranks = _int_list("ranks", _get(data, "ranks", []))
        ids = _expect("ids", _get(data, "ids", []), list, "a list of objects")
        ids = tuple(dict(_expect("ids", i, dict, "a list of objects")) for i in ids)
        hosts = data.get("hosts")
        if hosts is None:
            hosts = [str(i.get("host", "?")) for i in ids]
        _expect("hosts", hosts, list, "a list of strings")
        hosts = tuple(_expect("hosts", h, str, "a list of strings") for h in hosts)
        link = data.get("link")
        if link is not None:
            link = _int_list("link", link)
            if len(link) != 2:
                raise ValueError(f"finding field 'link': expected two ranks, got {list(link)}")
        group = data.get("group")
        if group is not None:
            _expect("group", group, str, "a string or null")
        evidence = _expect("evidence", _get(data, "evidence", {}), dict, "an object")
        confidence = _expect("confidence", _get(data, "confidence", 0.0), (int, float),
                             "a number")
        extra = {k: v for k, v in data.items() if k not in FINDING_FIELDS}
        return cls(time=float(when), cls=kind, ranks=ranks, hosts=hosts, ids=ids,
                   link=link, step=_optional_int("step", data.get("step")), group=group,
                   seq=_optional_int("seq", data.get("seq")), evidence=evidence,
                   confidence=float(confidence), extra=extra)


def append_note(run_dir: str | os.PathLike, note: Finding) -> None:
    """Append a note (a :class:`Finding` of a :data:`NOTE_CLASSES` class, written by a rank
    rather than the aggregator) to ``diagnosis.jsonl``: one ``O_APPEND`` write of one
    line, so it never interleaves with the aggregator's lines."""
    if note.cls not in NOTE_CLASSES:
        raise ValueError(f"append_note: {note.cls!r} is not a note class {NOTE_CLASSES}")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    line = (json.dumps(note.to_json(), default=str) + "\n").encode()
    fd = os.open(Path(run_dir) / DIAGNOSIS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _findings(records: list[Any]) -> list[Finding]:
    out = []
    for record in records:
        try:
            out.append(Finding.from_json(record))
        except ValueError:
            continue   # a line this version cannot type: skipped, like a torn one
    return out


def read_findings(run_dir: str | os.PathLike) -> list[Finding]:
    """Every finding of a run directory, typed, oldest first (lines that are not
    findings are skipped)."""
    return _findings(read_jsonl(Path(run_dir) / DIAGNOSIS_FILE))


class FindingTail:
    """The findings appended to ``run_dir/diagnosis.jsonl`` since the last :meth:`poll`.

    Called by ``trainkit run``'s coordinator, on its one thread, a few times a second
    while a generation runs; the file may not exist yet (the aggregator creates it with
    its first finding).
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self._tail = JsonlTail(Path(run_dir) / DIAGNOSIS_FILE)

    @property
    def path(self) -> Path:
        return self._tail.path

    def poll(self) -> list[Finding]:
        return _findings(self._tail.poll())
