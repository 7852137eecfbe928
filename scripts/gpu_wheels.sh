#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels the H200 device machine needs beyond its
# image, for benchmarks/gpu_check.py and the test suite. The machine has no network, so
# they travel with the tree (the device tool's `carry`) and are installed there with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#
# What the image already has (/work/.library/device/KINDS.md, read 2026-11-17): Python
# 3.12, torch 2.11 (CUDA 13), numpy 2.5, safetensors 0.8, psutil, packaging, pyyaml,
# fsspec. Missing: zarr (tests read checkpoints with it) and its numcodecs, donfig and
# google-crc32c, and isal (trainkit.checkpoint's fast CRC-32; it falls back to zlib).
# typing_extensions is pinned too because zarr needs >= 4.12 and the image's version was
# not read. Versions are those of the development venv, where the suite passes.
#
# Usage: bash scripts/gpu_wheels.sh        (needs PyPI; about 10 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
WHEELS=(
    zarr==3.1.6
    numcodecs==0.16.6
    donfig==0.8.1.post1
    google-crc32c==1.9.0
    isal==1.9.1
    typing_extensions==4.16.0
)

mkdir -p .whl
for spec in "${WHEELS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl "$spec"
done

total=$(du -cb .whl/*.whl | tail -n 1 | cut -f 1)
limit=$((40 << 20))
echo "gpu_wheels: $(ls .whl/*.whl | wc -l) wheels in .whl/, $((total >> 10)) KiB"
if [ "$total" -ge "$limit" ]; then
    echo "gpu_wheels: error: .whl/ holds $((total >> 20)) MiB, over the 40 MiB carry budget" >&2
    exit 1
fi
