#!/usr/bin/env bash
# Creates .venv and installs trainkit with the extras named in $1 (default: dev).
#
# Why a script: on a machine without a GPU, an unpinned `torch` pulls a
# multi-GB CUDA build. We therefore install the CPU build (torch==2.13.0)
# first when no NVIDIA GPU is visible; pyproject.toml still accepts any
# torch>=2.4, so on a GPU cluster pip keeps whatever CUDA build it picks.
# Override the torch requirement with TRAINKIT_TORCH_SPEC if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
stamp=".venv/.trainkit-$(cat pyproject.toml | sha1sum | cut -c1-12)-${extras//,/_}"
if [ -f "$stamp" ]; then
    exit 0
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "${pip[@]}" "${TRAINKIT_TORCH_SPEC:-torch>=2.4}"
    else
        "${pip[@]}" "${TRAINKIT_TORCH_SPEC:-torch==2.13.0}"
    fi
fi
"${pip[@]}" -e ".[${extras}]"
touch "$stamp"
