#!/usr/bin/env bash
# Installs trainkit into .venv, then runs the main demo: the fault drill
# (hang on one of 3 nodes -> detect -> isolate -> restart -> resume).
# `bash scripts/demo.sh resume` runs the checkpoint kill-and-resume demo instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
if [ "${1:-}" = "resume" ]; then
    shift
    exec .venv/bin/python examples/demo.py "$@"
fi
exec .venv/bin/python -m trainkit run --drill "$@"
