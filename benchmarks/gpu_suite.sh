#!/usr/bin/env bash
# The one script to run on a lent GPU (DESIGN.md section 6): install, every test with compiled
# Triton kernels (the kernel tests parametrize fp32/fp16/bf16 on CUDA), then the benchmark at the
# GPU standard shape (bf16, d=4096, N=8192), then the exact-Cayley solver comparison.  Budget: under
# 8.5 minutes on one H200 (tests <= 240 s, benchmark <= 165 s, solvers <= 90 s; the AOT compile report
# (benchmarks/results/compile/) shows fp32 tile programs at b = 128 taking 40-100 s each to compile).
#
#   device run:  bash benchmarks/gpu_suite.sh        (results land in $OUT, else benchmarks/results/gpu-run)
#   then commit: benchmarks/results/<gpu-name>/ from what came back.
#
# What comes back: $OUT/gpu_suite.tar.gz (the device tool returns at most 8 files) holding
# info.txt, tests_full.log (whole pytest output, slowest tests and skip reasons), tests.log (its
# tail), and per benchmark selection a results .json/.md pair and bench_<selection>.log.  The benchmark runs one selection per process so that one which runs
# out of time loses only its own rows.  It measures the eager arms only (--no-compile): a
# torch.compile(PEFT) arm recompiles per case (train, eval and saved-tensor-hook modes) and does
# not fit this budget at d=4096; run it separately when there is time.
set -uo pipefail
FINAL=${OUT:-$PWD/benchmarks/results/gpu-run}
OUT=$(mktemp -d)
trap 'tar czf "$FINAL/gpu_suite.tar.gz" -C "$OUT" . && rm -rf "$OUT"' EXIT
mkdir -p "$FINAL"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET FASTADAPT_BACKEND  # compiled kernels, default backend choice
pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python -m fastadapt.cli info 2>&1 | tee "$OUT/info.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$OUT/info.txt" 2>&1
status=0
# 8 workers on the machine's 16 cores: 2 CPU threads each (torch would start 16 per worker).
workers=$(python -c "import xdist" 2>/dev/null && echo "-n 8")  # pytest-xdist may be absent there
OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 timeout 240 python -m pytest -q $workers -p no:cacheprovider -rs \
    --durations=25 tests >"$OUT/tests_full.log" 2>&1 || status=1
tail -n 60 "$OUT/tests_full.log" | tee "$OUT/tests.log"
# selection:seconds -- a family or a case-name prefix (--only), about 10 s of startup each plus
# 5-10 s per case; ssvd apart, as its case starts with two 4096 x 4096 float64 SVDs.
for entry in dora_norm:75 oft:45 psoft:20 ssvd:25; do
    only=${entry%%:*}
    timeout "${entry##*:}" python -m benchmarks.run --device cuda --dtype bfloat16 --d 4096 --n 8192 \
        --iters 20 --no-compile --only "$only" --out "$OUT" >"$OUT/bench_$only.log" 2>&1 || status=1
    tail -n 40 "$OUT/bench_$only.log"
done
# Exact Cayley: elimination vs Newton-Schulz vs Neumann-5 (time, error, orthogonality) at b = 16..128,
# and whether an OFT step syncs the host (torch.cuda.set_sync_debug_mode): picks the default solver.
timeout 90 python -m benchmarks.cayley_solvers --device cuda --iters 20 --out "$OUT/cayley_solvers.json" \
    >"$OUT/bench_cayley_solvers.log" 2>&1 || status=1
tail -n 45 "$OUT/bench_cayley_solvers.log"
exit $status
