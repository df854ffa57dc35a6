"""Run every benchmarks/cases_*.py; write JSON + Markdown to --out and print the table.

    python -m benchmarks.run --device cpu [--d 1024 --n 2048 --dtype float32 --iters 20
                                           --only NAME --out benchmarks/results/cpu]

The same as ``fastadapt bench``; the logic lives in fastadapt.bench.runner.
"""
import sys

from fastadapt.bench.runner import main

if __name__ == "__main__":
    sys.exit(main())
