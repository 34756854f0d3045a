#!/usr/bin/env bash
# The wheels the GPU machine lacks, for its Python (3.12, x86-64), into .whl/ (git-ignored).
# Run it here, where the package registry is reachable; the device call then carries .whl and
# bench/gpu_check.sh installs them. That machine already has torch, transformers, accelerate,
# tokenizers, numpy, tqdm, prometheus-client, anyio, click, h11, httpx and pytest; not httpx2,
# which Starlette's TestClient wants (its huggingface_hub is a release that uses httpx).
#
#   bash bench/gpu_wheels.sh
set -euo pipefail
case "$*" in
  "") ;;
  -h|--help) awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit 0 ;;
  *) echo "usage: bash bench/gpu_wheels.sh   (no arguments)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
if [[ -z ${SENTIMENT_WHEELS_LOCKED:-} ]]; then  # one at a time in a checkout (see bench/gpu_rehearsal.sh)
    exec 9<bench/gpu_wheels.sh
    flock -n 9 || { echo "waiting for the other GPU rehearsal or wheel download in this checkout to end" >&2; flock 9; }
fi
rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "polars==2.1.0" "polars-runtime-32==2.1.0" "starlette>=0.40" "uvicorn>=0.36" \
    "httpx2>=2.0" "httpcore2>=2.0" "truststore>=0.10"
du -ch .whl/*.whl | tail -n 1
