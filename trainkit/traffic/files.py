"""Topology and job files (TOML or JSON), with errors that name the field.

A job file lists one or more jobs; several jobs share the fabric and are merged
phase by phase (:func:`combine`)::

    [[job]]
    name = "train"
    collective = "allreduce_ring"
    hosts = "0-255"          # or a list, or {start = 0, count = 256, stride = 1}
    nbytes = "256MiB"        # or an integer
    channels = 4
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from trainkit import _units
from trainkit.traffic.collectives import Flows, collective, combine
from trainkit.traffic.errors import JobError, TopologyError, TrafficError
from trainkit.traffic.limits import LIMITS, check_limit
from trainkit.traffic.topology import LeafSpine

__all__ = ["load_mapping", "load_topology", "load_job", "job_from_dict", "parse_hosts", "parse_size"]

def load_mapping(path: str | Path, *, what: str) -> dict[str, Any]:
    """Read a TOML or JSON file (by extension; TOML otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise TrafficError(what, f"file not found: {path}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise TrafficError(what, f"cannot parse {path}: {exc}") from None
    if not isinstance(data, dict):
        raise TrafficError(what, f"{path} must hold a table/object at top level")
    return data


def load_topology(path: str | Path) -> LeafSpine:
    try:
        return LeafSpine.from_dict(load_mapping(path, what="topology"))
    except TypeError as exc:
        raise TopologyError("topology", str(exc)) from None


def parse_size(value: Any, *, field: str = "nbytes") -> float:
    """Bytes from an integer or a string such as '256MiB' or '1.5GB' (see :mod:`trainkit._units`).

    KB/MB/GB are powers of 1000 and KiB/MiB/GiB powers of 1024; a bare K/M/G is
    refused as ambiguous. Errors name ``field``.
    """
    try:
        return float(_units.parse_size(value))
    except ValueError as exc:
        raise JobError(field, str(exc)) from None


def parse_hosts(value: Any, *, field: str = "hosts") -> list[int]:
    """NIC list from a list, 'a-b,c' ranges, or {start, count, stride}."""
    if isinstance(value, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise JobError(field, "list entries must be integer NIC indices")
        check_limit(field, len(value), "nics", JobError)
        return value
    if isinstance(value, dict):
        unknown = set(value) - {"start", "count", "stride"}
        if unknown or "count" not in value:
            raise JobError(field, "expects {start, count, stride} with count required")
        try:
            start, stride = int(value.get("start", 0)), int(value.get("stride", 1))
            count = int(value["count"])
        except (TypeError, ValueError, OverflowError):
            raise JobError(field, "start, count and stride must be integers") from None
        check_limit(field, count, "nics", JobError)
        return [start + k * stride for k in range(count)]
    if isinstance(value, str):
        out: list[int] = []
        for part in value.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not m:
                raise JobError(field, f"cannot parse {part!r}; use e.g. '0-127,256-383'")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) else lo
            check_limit(field, len(out) + max(0, hi - lo + 1), "nics", JobError)
            out.extend(range(lo, hi + 1))
        return out
    raise JobError(field, f"unsupported hosts value {value!r}")


def _channels(value: Any, field: str) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        check_limit(field, value, "channels", JobError)
    return value      # other types are refused by collective(), naming the field


def job_from_dict(data: dict[str, Any]) -> Flows:
    jobs = data.get("job", data.get("jobs"))
    if jobs is None:
        jobs = [data]
    if isinstance(jobs, dict):
        jobs = [jobs]
    flows = []
    for n, job in enumerate(jobs):
        where = f"job[{n}]"
        known = {"name", "collective", "hosts", "nbytes", "channels"}
        unknown = sorted(set(job) - known)
        if unknown:
            raise JobError(f"{where}.{unknown[0]}", f"unknown job field; known: {sorted(known)}")
        for required in ("collective", "hosts", "nbytes"):
            if required not in job:
                raise JobError(f"{where}.{required}", "missing required job field")
        try:
            flows.append(collective(
                job["collective"], hosts=parse_hosts(job["hosts"], field=f"{where}.hosts"),
                nbytes=parse_size(job["nbytes"], field=f"{where}.nbytes"),
                channels=_channels(job.get("channels", 1), f"{where}.channels"),
            ))
        except JobError as exc:
            if exc.field.startswith("job["):
                raise
            raise JobError(f"{where}.{exc.field}", str(exc).split(": ", 1)[1]) from None
    return flows[0] if len(flows) == 1 else combine(*flows)


def load_job(path: str | Path) -> Flows:
    return job_from_dict(load_mapping(path, what="job"))
