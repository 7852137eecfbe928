#!/usr/bin/env bash
# The fault drill (README's main demo): 3 nodes x 2 processes on this machine, a hang
# injected on node 2; trainkit detects it, excludes node 2, restarts on the remaining
# 2 nodes, resumes from the newest checkpoint, finishes, and prints the recovery timeline.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python3
exec "$py" -m trainkit run --drill "$@"
