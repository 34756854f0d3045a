#!/usr/bin/env bash
# The GPU check rehearsed here, in the software the GPU machine has, before its minutes are spent:
# a fresh virtual environment with that machine's packages and versions (torch is this machine's
# CPU wheel: the GPU machine's CUDA build is gigabytes), the wheels of bench/gpu_wheels.sh in .whl/
# as the device call will carry them, then `bench/gpu_check.sh --cpu-smoke` installing them as it
# will there. A package the check needs that neither brings fails here, not on the lent GPU.
#
#   bash bench/gpu_rehearsal.sh     # about 7 minutes on 2 cores; OUT=DIR keeps the check's report and log
set -euo pipefail
case "$*" in
  "") ;;
  -h|--help) awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit 0 ;;
  *) echo "usage: bash bench/gpu_rehearsal.sh   (no arguments; OUT=DIR keeps the report and log)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
# One rehearsal or wheel download at a time in a checkout: a second would rebuild .whl/ under the
# first one's install. Both lock bench/gpu_wheels.sh; the wheels step below runs under this lock.
exec 9<bench/gpu_wheels.sh
flock -n 9 || { echo "waiting for the other GPU rehearsal or wheel download in this checkout to end" >&2; flock 9; }
export SENTIMENT_WHEELS_LOCKED=1
# What the GPU machine's Python 3.12 has (the device tool's notes; uvicorn runs on uvloop there, as it
# does wherever uvloop is installed); update these with it.
gpu_machine=("transformers==5.17.0" "accelerate==1.15.0" tokenizers numpy tqdm prometheus-client pytest pytest-xdist httpx
             uvloop)
# The wheels are for the GPU machine's Python 3.12; polars' runtime among them needs 3.11 or later.
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  { echo "the rehearsal needs a python3 of 3.11 or later first on PATH, as the GPU machine's wheels do" >&2; exit 2; }
venv="$(mktemp -d)"
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q torch==2.13.0 "${gpu_machine[@]}"
bash bench/gpu_wheels.sh
PATH="$venv/bin:$PATH" PYTHON="$venv/bin/python" bash bench/gpu_check.sh --cpu-smoke
