"""Benchmark cases (``cases_<family>.py``, each with ``CASES: list[fastadapt.bench.Case]``) and
the runner entry ``python -m benchmarks.run``; results go to ``benchmarks/results/<device>/``."""
