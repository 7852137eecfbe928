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
| ``TRAINKIT_RUN_DIR`` | run directory (findings, markers) |
| ``TRAINKIT_HANG_TIMEOUT`` | seconds, overrides the monitor's ``hang_timeout`` |
| ``TRAINKIT_DETECT`` | ``0`` disables the monitor entirely |
| ``TRAINKIT_HOSTNAME`` | host name to report (simulating several hosts on one machine) |
| ``TRAINKIT_HOST`` | node id given to workers by ``trainkit run`` |
| ``TRAINKIT_NODE`` | node name of the agent |
| ``TRAINKIT_NODE_INDEX`` | node index that survives re-rendezvous |
| ``TRAINKIT_GENERATION`` | generation (restart attempt) number |
| ``TRAINKIT_STACK_SIGNAL`` | signal for faulthandler stack dumps (default ``SIGUSR2``) |
| ``TRAINKIT_FAULT`` | fault injection, see :mod:`trainkit.faults` |
| ``TRAINKIT_MEMORY_DIR`` | memory-tier directory owned by the node agent |
| ``TRAINKIT_WARM_GO`` | file whose appearance releases a pre-started warm generation |
"""

from __future__ import annotations

__all__ = [
    "AGGREGATOR_ENV", "RUN_DIR_ENV", "HANG_TIMEOUT_ENV", "DETECT_ENV", "HOSTNAME_ENV",
    "HOST_ENV", "NODE_ENV", "NODE_INDEX_ENV", "GENERATION_ENV", "STACK_SIGNAL_ENV",
    "FAULT_ENV", "MEMORY_DIR_ENV", "WARM_GO_ENV",
    "AGGREGATOR_ADDR_FILE", "DIAGNOSIS_FILE", "TIMELINE_FILE", "EVENTS_FILE", "LOGS_DIR",
    "FAULTS_DIR",
]

AGGREGATOR_ENV = "TRAINKIT_AGGREGATOR"
RUN_DIR_ENV = "TRAINKIT_RUN_DIR"
HANG_TIMEOUT_ENV = "TRAINKIT_HANG_TIMEOUT"
DETECT_ENV = "TRAINKIT_DETECT"
HOSTNAME_ENV = "TRAINKIT_HOSTNAME"
HOST_ENV = "TRAINKIT_HOST"
NODE_ENV = "TRAINKIT_NODE"
NODE_INDEX_ENV = "TRAINKIT_NODE_INDEX"
GENERATION_ENV = "TRAINKIT_GENERATION"
STACK_SIGNAL_ENV = "TRAINKIT_STACK_SIGNAL"
FAULT_ENV = "TRAINKIT_FAULT"
MEMORY_DIR_ENV = "TRAINKIT_MEMORY_DIR"
WARM_GO_ENV = "TRAINKIT_WARM_GO"

# Files of a run directory.
AGGREGATOR_ADDR_FILE = "aggregator.json"   # {"host", "port", "pid"}, once the aggregator listens
DIAGNOSIS_FILE = "diagnosis.jsonl"          # one finding per line, appended by the aggregator
TIMELINE_FILE = "timeline.jsonl"            # collectives around faults, for `diagnose --plot`
EVENTS_FILE = "events.jsonl"                # every decision of `trainkit run`
LOGS_DIR = "logs"                           # torchrun and worker output
FAULTS_DIR = "faults"                       # markers written when an injected fault fires
