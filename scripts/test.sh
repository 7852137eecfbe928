#!/usr/bin/env bash
# Installs trainkit with its test extras into .venv, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
exec .venv/bin/python -m pytest -q "$@"
