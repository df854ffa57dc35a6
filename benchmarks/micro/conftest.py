"""Kernel microbenchmarks (pytest-benchmark), outside the default ``pytest tests`` run.

    pytest benchmarks/micro --benchmark-only                             # every family, this machine's shapes
    pytest benchmarks/micro/test_cayley.py --benchmark-only -k rotation  # one family, one op
    pytest benchmarks/micro --benchmark-only --benchmark-json benchmarks/results/micro/<name>.json
    pytest benchmarks/micro --benchmark-only --benchmark-autosave --benchmark-storage benchmarks/results/micro
    pytest benchmarks/micro --benchmark-only --benchmark-compare --benchmark-storage benchmarks/results/micro

The last two store a run per commit and compare the current code against the latest stored run
(``--benchmark-compare=0001`` picks one; ``--benchmark-compare-fail=median:10%`` fails on a
regression).  ``FASTADAPT_MICRO=tiny`` runs every benchmark at toy shapes (the test suite does
this, with ``--benchmark-disable``, to check the modules run).
"""
import pytest

from fastadapt.bench.micro import micro_device, micro_shape


@pytest.fixture
def device():
    return micro_device()


@pytest.fixture
def shape():
    """(d, tokens, dtype) for layer-level benchmarks."""
    return micro_shape()
