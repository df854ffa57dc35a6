"""Helpers for the pytest-benchmark kernel microbenchmarks in ``benchmarks/micro/``.

One module per kernel family (``benchmarks/micro/test_<family>.py``) times each fused op, forward
and forward+backward, against its torch reference and PEFT's equivalent, grouped so that
pytest-benchmark's tables put the three side by side; ``test_registered_ops.py`` times every
registered custom op of every family at its opcheck examples, per backend.  Each benchmark
records the peak memory of one call in ``extra_info["peak_bytes"]`` (CPU profiler allocator
records, CUDA max_memory_allocated).

Shapes: ``FASTADAPT_MICRO=tiny`` (what the test suite uses to check the modules run) or the
standard shapes (CPU fp32 d=1024, N=2048; CUDA bf16 d=4096, N=8192).  On CUDA every timed call
ends with a synchronize, so the time is the device's.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

import torch

from .measure import peak_bytes_during

SCALES = ("tiny", "standard")


def micro_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def micro_scale() -> str:
    scale = os.environ.get("FASTADAPT_MICRO", "standard")
    if scale not in SCALES:
        raise ValueError(f"FASTADAPT_MICRO={scale!r}; valid choices: {list(SCALES)}")
    return scale


def micro_shape() -> tuple[int, int, torch.dtype]:
    """(d, tokens, dtype) of the layer-level microbenchmarks on this machine at this scale."""
    if micro_scale() == "tiny":
        return 64, 32, torch.float32
    return (4096, 8192, torch.bfloat16) if micro_device().type == "cuda" else (1024, 2048, torch.float32)


def forward_backward(fn: Callable[[], torch.Tensor], leaves: Iterable[torch.Tensor]) -> Callable[[], None]:
    """A call running ``fn()`` and its backward with a fixed random gradient, clearing the
    ``.grad`` of ``leaves`` after (as zero_grad(set_to_none=True) would)."""
    leaves = list(leaves)
    with torch.no_grad():
        out = fn()
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.dtype).to(out.device)

    def call():
        fn().backward(grad)
        for t in leaves:
            t.grad = None
    return call


def forward_only(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def call():
        with torch.no_grad():
            fn()
    return call


def run(benchmark, call: Callable[[], None], *, group: str, device: torch.device) -> None:
    """Time ``call`` with pytest-benchmark in ``group`` (synchronizing CUDA after each call) and
    record its peak memory in ``extra_info``."""
    def timed():
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    timed()  # warm-up outside the peak measurement (lazy initialisation, caches)
    benchmark.group = group
    benchmark.extra_info["peak_bytes"] = peak_bytes_during(timed, device)
    benchmark.extra_info["device"] = str(device)
    benchmark(timed)
