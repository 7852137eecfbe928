"""``trainkit run --metrics-port P``: the job's health as Prometheus metrics.

Why a scrape endpoint: the dashboards and alerts people already run read Prometheus.
The coordinator serves ``http://127.0.0.1:P/metrics`` (``--metrics-host`` to bind
elsewhere) through ``prometheus-client`` (the ``metrics`` extra). Every value is derived,
at scrape time, from the run directory's files (``events.jsonl``, ``reports.jsonl``,
``diagnosis.jsonl`` via the coordinator's ``finding`` events, ``faults/``), read
incrementally, so the endpoint needs no hook into the coordinator's loop and shows the
same numbers as ``trainkit goodput``.

Metrics:

| name | type | meaning |
|---|---|---|
| ``trainkit_goodput_ratio`` | gauge | productive / wall time so far (:mod:`trainkit.run.goodput`) |
| ``trainkit_badput_seconds{category}`` | gauge | the badput parts, same categories |
| ``trainkit_wall_seconds`` | gauge | the job's wall time so far |
| ``trainkit_restarts_total`` | counter | whole-job restarts decided |
| ``trainkit_step`` | gauge | the newest training step rank 0 reported |
| ``trainkit_findings_total{class}`` | counter | detector findings, by class |
| ``trainkit_excluded_nodes`` | gauge | nodes excluded so far |
| ``trainkit_last_checkpoint_step`` | gauge | the newest committed checkpoint step (-1: none) |
| ``trainkit_generation`` | gauge | the running generation |
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainkit.rundir import (EVENTS_FILE, FINDING_CLASSES, REPORTS_FILE, JsonlTail,
                             read_fault_markers)
from trainkit.run.goodput import compute

__all__ = ["MetricsServer", "RunCollector", "serve_metrics"]

RESTART_ACTIONS = ("restart", "exclude_and_restart")


class RunCollector:
    """A ``prometheus_client`` collector over one run directory (module docstring).

    Thread-safe: the HTTP server may scrape from several threads at once.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self._events = JsonlTail(self.run_dir / EVENTS_FILE, from_start=True)
        self._reports = JsonlTail(self.run_dir / REPORTS_FILE, from_start=True)
        self._event_list: list[dict[str, Any]] = []
        self._report_list: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def snapshot(self) -> dict[str, Any]:
        """The current values, as plain numbers (what :meth:`collect` exposes)."""
        with self._lock:
            self._event_list += [e for e in self._events.poll() if isinstance(e, dict)]
            self._report_list += [r for r in self._reports.poll() if isinstance(r, dict)]
            events, reports = list(self._event_list), list(self._report_list)
        gp = compute(events, reports, read_fault_markers(self.run_dir), now=time.time())
        findings: Counter[str] = Counter({c: 0 for c in FINDING_CLASSES})
        excluded: set[str] = set()
        restarts, generation = 0, 0
        for e in events:
            kind = e.get("event")
            if kind == "finding":
                findings[str((e.get("finding") or {}).get("class", "unknown"))] += 1
            elif kind == "decision" and e.get("action") in RESTART_ACTIONS:
                restarts += 1
            elif kind == "generation_start" and isinstance(e.get("gen"), int):
                generation = e["gen"]
            if kind in ("decision", "exclude"):
                excluded.update(str(n) for n in e.get("exclude") or ())
        steps = [r["step"] for r in reports if r.get("kind") == "step"
                 and isinstance(r.get("step"), int)]
        # the newest step committed in the running generation (slower tiers commit older
        # steps later), else the step it restored
        commits = [r["step"] for r in reports if r.get("kind") in ("ckpt_commit", "ckpt_restore")
                   and r.get("gen") == generation and isinstance(r.get("step"), int)]
        return {"goodput": gp.goodput, "wall": gp.wall_s, "badput": dict(gp.badput_s),
                "restarts": restarts, "step": steps[-1] if steps else 0,
                "findings": dict(findings), "excluded": len(excluded),
                "last_checkpoint": max(commits, default=-1), "generation": generation}

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.snapshot()
        yield GaugeMetricFamily("trainkit_goodput_ratio",
                                "productive training time / wall time so far", value=s["goodput"])
        yield GaugeMetricFamily("trainkit_wall_seconds", "the job's wall time so far",
                                value=s["wall"])
        bad = GaugeMetricFamily("trainkit_badput_seconds", "time not spent training, by cause",
                                labels=["category"])
        for cat, secs in s["badput"].items():
            bad.add_metric([cat], secs)
        yield bad
        yield CounterMetricFamily("trainkit_restarts", "whole-job restarts decided",
                                  value=s["restarts"])
        yield GaugeMetricFamily("trainkit_step", "the newest training step reported by rank 0",
                                value=s["step"])
        found = CounterMetricFamily("trainkit_findings", "detector findings, by class",
                                    labels=["class"])
        for cls, n in sorted(s["findings"].items()):
            found.add_metric([cls], n)
        yield found
        yield GaugeMetricFamily("trainkit_excluded_nodes", "nodes excluded so far",
                                value=s["excluded"])
        yield GaugeMetricFamily("trainkit_last_checkpoint_step",
                                "the newest committed checkpoint step (-1: none)",
                                value=s["last_checkpoint"])
        yield GaugeMetricFamily("trainkit_generation", "the running generation",
                                value=s["generation"])


@dataclass
class MetricsServer:
    """A running endpoint; ``close()`` stops it."""

    host: str
    port: int
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(run_dir: str | os.PathLike, *, port: int, host: str = "127.0.0.1"
                  ) -> MetricsServer:
    """Serve the run's metrics on ``host:port`` (0: a free port) in a daemon thread.

    Raises ImportError when ``prometheus-client`` is missing (the ``metrics`` extra) and
    OSError when the address cannot be bound."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=True)
    registry.register(RunCollector(run_dir))
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(host, server.server_address[1], server, thread)
