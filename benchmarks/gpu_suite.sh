#!/usr/bin/env bash
# The one script to run on a lent GPU (DESIGN.md section 6): install, every test with compiled
# Triton kernels (the kernel tests parametrize fp32/fp16/bf16 on CUDA), then the benchmark at the
# GPU standard shape (bf16, d=4096, N=8192), the kernel microbenchmarks, one training step's memory
# per method, then the exact-Cayley solver comparison.  Budget: under 9 minutes on one H200 (tests
# <= 240 s, benchmark <= BENCH_BUDGET_S = 150 s, micro 40 s, memory 40 s, solvers <= 90 s; the
# AOT compile report (benchmarks/results/compile/) shows fp32 tile programs at b = 128 taking 40-100 s
# each to compile).  The benchmark runs one family per process, the families and their case counts
# read from benchmarks/cases_*.py by the runner's own discovery (no list here).
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
# family:seconds -- every family of benchmarks/cases_*.py with 15 s of startup plus 8 s per case
# (case build, Triton JIT and autotuning, 20 timed iterations), all scaled down together when the
# families need more than BENCH_BUDGET_S (a family that runs out of time loses only its own rows).
BENCH_BUDGET_S=${BENCH_BUDGET_S:-150}
plan=$(python - "$BENCH_BUDGET_S" <<'EOF'
import collections, sys
from fastadapt.bench.runner import cases_dir, discover
found = discover(cases_dir())
for module, error in found.errors.items():
    print(f"cases module not loaded: {module}: {error}", file=sys.stderr)
counts = collections.Counter(case.family for case in found.cases)
want = {family: 15 + 8 * n for family, n in counts.items()}
scale = min(1.0, int(sys.argv[1]) / max(1, sum(want.values())))
if scale < 1:
    print(f"benchmark families need {sum(want.values())} s > {sys.argv[1]} s: each gets {scale:.2f} of its time",
          file=sys.stderr)
print(" ".join(f"{family}:{max(20, int(seconds * scale))}" for family, seconds in want.items()))
EOF
) || status=1
echo "benchmark plan (family:seconds): $plan"
for entry in $plan; do
    only=${entry%%:*}
    timeout "${entry##*:}" python -m benchmarks.run --device cuda --dtype bfloat16 --d 4096 --n 8192 \
        --iters 20 --no-compile --only "$only" --out "$OUT" >"$OUT/bench_$only.log" 2>&1 || status=1
    tail -n 40 "$OUT/bench_$only.log"
done
# Kernel microbenchmarks (pytest-benchmark JSON, one round each: the GPU shapes' op timings beside
# the torch reference and PEFT's op) and one training step's memory per method with the allocator's
# timeline (fastadapt memory on CUDA), each boxed so the suite keeps its budget.
# SIGINT at the box's end: pytest stops where it is and pytest-benchmark still writes the JSON.
timeout -s INT -k 10 40 python -m pytest -q -p no:cacheprovider benchmarks/micro --benchmark-only \
    --benchmark-min-rounds=1 --benchmark-max-time=0.05 --benchmark-warmup=off --benchmark-json="$OUT/micro.json" \
    >"$OUT/micro.log" 2>&1 || status=1
tail -n 5 "$OUT/micro.log"
timeout 40 python -m fastadapt.cli memory --device cuda --no-compile --out "$OUT" >"$OUT/memory.log" 2>&1 || status=1
tail -n 30 "$OUT/memory.log"
# Exact Cayley: elimination vs Newton-Schulz vs Neumann-5 (time, error, orthogonality) at b = 16..128,
# and whether an OFT step syncs the host (torch.cuda.set_sync_debug_mode): picks the default solver.
timeout 90 python -m benchmarks.cayley_solvers --device cuda --iters 20 --out "$OUT/cayley_solvers.json" \
    >"$OUT/bench_cayley_solvers.log" 2>&1 || status=1
tail -n 45 "$OUT/bench_cayley_solvers.log"
exit $status
