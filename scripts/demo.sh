#!/usr/bin/env bash
# Installs trainkit into .venv, then runs the main demo (examples/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
exec .venv/bin/python examples/demo.py "$@"
