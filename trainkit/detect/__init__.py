"""Collective-communication anomaly detection: find and name the faulty rank, node or link.

Per rank, :class:`CollectiveMonitor` records every collective (through a
``ProcessGroup`` wrapper) and streams arrivals and completions over a side
channel to an aggregator process, which classifies crashes, hangs (with and
without communication), stragglers and slow links and appends findings to
``run_dir/diagnosis.jsonl``. ``trainkit diagnose RUN_DIR`` shows them.

Names that need torch are imported on first use, so ``trainkit --help`` and
``trainkit diagnose`` stay light.
"""

from __future__ import annotations

from trainkit._lazy import lazy_getattr
from trainkit.detect.knobs import ClassifierConfig
from trainkit.detect.report import load_findings
from trainkit.rundir import (AGG_SECRET_ENV, AGGREGATOR_ENV, DETECT_ENV, FINDING_CLASSES, FINDING_FIELDS,
                             HANG_TIMEOUT_ENV, RUN_DIR_ENV, Finding)

__all__ = [
    "AGG_SECRET_ENV",
    "AGGREGATOR_ENV",
    "DETECT_ENV",
    "HANG_TIMEOUT_ENV",
    "RUN_DIR_ENV",
    "ClassifierConfig",
    "CollectiveMonitor",
    "FINDING_CLASSES",
    "FINDING_FIELDS",
    "Finding",
    "MonitoredProcessGroup",
    "job_secret",
    "load_findings",
    "start_aggregator",
    "unmonitored",
]

_LAZY = {
    "CollectiveMonitor": "trainkit.detect.monitor",
    "start_aggregator": "trainkit.detect.monitor",
    "job_secret": "trainkit.detect.monitor",
    "MonitoredProcessGroup": "trainkit.detect.probe",
    "unmonitored": "trainkit.detect.probe",
}


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
