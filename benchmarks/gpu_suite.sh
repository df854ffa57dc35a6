#!/usr/bin/env bash
# The one script to run on a lent GPU (DESIGN.md section 6): install, every test with compiled
# Triton kernels (the kernel tests parametrize fp32/fp16/bf16 on CUDA), then the benchmark at the
# GPU standard shape (bf16, d=4096, N=8192).  Budget: under 8 minutes on one H200.
#
#   device run:  bash benchmarks/gpu_suite.sh        (results land in $OUT, else benchmarks/results/gpu-run)
#   then commit: benchmarks/results/<gpu-name>/ from what came back.
set -uo pipefail
OUT=${OUT:-$PWD/benchmarks/results/gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python -m fastadapt.cli info 2>&1 | tee "$OUT/info.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$OUT/info.txt" 2>&1
status=0
timeout 270 python -m pytest -q -n 8 -p no:cacheprovider tests 2>&1 | tail -n 60 | tee "$OUT/tests.log" || status=1
timeout 180 python -m benchmarks.run --device cuda --dtype bfloat16 --d 4096 --n 8192 --iters 20 \
    --out "$OUT" 2>&1 | tee "$OUT/bench.log" || status=1
exit $status
