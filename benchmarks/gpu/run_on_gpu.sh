#!/usr/bin/env bash
# The GPU run, as one command on a GPU machine that starts bare and has no network.
# `make gpu-bundle` prepares .gpu_bundle/ beside the code (wheels for what the machine
# lacks, the reference scripts); this installs the wheels into /tmp/site and runs the
# benchmark, which writes gpu_bench.json and gpu_bench.md to $OUT. Extra arguments go
# to bench_gpu.py (e.g. --only sd15/ours --budget-s 200).
set -euo pipefail
cd "$(dirname "$0")/../.."
BUNDLE="${GPU_BUNDLE:-.gpu_bundle}"
OUT="${OUT:-$PWD/gpu-bench-out}"
PYTHON="${PYTHON:-python3}"
SITE="${GPU_SITE:-/tmp/site}"
if [ ! -f "$BUNDLE/manifest.json" ]; then
    echo "no $BUNDLE/manifest.json beside the code: run 'make gpu-bundle' and bring $BUNDLE/ along" >&2
    exit 2
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$BUNDLE"/wheels/*.whl
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
# The benchmark keeps to its own 450 s budget; this is the backstop under 8 minutes.
exec timeout --kill-after=10 470 "$PYTHON" benchmarks/gpu/bench_gpu.py --out "$OUT" \
    --reference-dir "$BUNDLE/reference" "$@"
