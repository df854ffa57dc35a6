"""Test setup: Triton kernels run through the interpreter where no CUDA device exists, and every
test draws its data from seeds of its own.

TRITON_INTERPRET must be set before triton is imported, so this runs first (pytest imports
conftest.py before any test module).  On a GPU machine the same tests run compiled kernels.
"""
import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastadapt import testing  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def per_test_seeds(request):
    """Seeds derived from the test's node id: fastadapt.testing's default-seed stream, torch's default
    generator (PEFT's initialisers, nn.Dropout, Tensor.normal_) and Python's ``random``.  A test's
    data then never depends on which tests ran before it in the same process or xdist worker."""
    seed = testing.seed_for(request.node.nodeid)
    testing.reset_seeds(seed)
    torch.manual_seed(seed)
    random.seed(seed)


@pytest.fixture(autouse=True)
def fuse_every_call(monkeypatch):
    """Tests use tiny layers to exercise the fused paths, far below the CPU crossovers where
    ``accelerate`` hands calls to PEFT's forward (BridgeEntry.min_macs): every call is fused here
    unless a test asks for the crossover (tests/test_bridge.py tests it)."""
    import fastadapt.peft
    monkeypatch.setattr(fastadapt.peft, "measured_crossover", lambda layer, x: 0)


@pytest.fixture
def without_compiler(monkeypatch):
    """csrc/ as on a machine without a C++ compiler: every build raises, FASTADAPT_BACKEND unset,
    the extension's cached load cleared before and after (so the next test builds for real)."""
    import torch.utils.cpp_extension as cpp_extension

    from fastadapt import _cpp, backend

    def no_compiler(*args, **kwargs):
        raise OSError("no C++ compiler found")

    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    _cpp.extension.cache_clear()
    yield
    _cpp.extension.cache_clear()


@pytest.fixture
def thin_pass():
    """torch.ops.fastadapt_cpu.lora_backward_thin (csrc/lora.cpp, the cpp backward of LoRA and DoRA);
    skips where this machine cannot build csrc/ or its CPU has no AVX-512 (the cpp backends run the
    torch body there)."""
    from fastadapt import _cpp
    if _cpp.extension() is None:
        pytest.skip("csrc/ could not be built here (no C++ compiler or ninja): only the torch body runs")
    if not torch.ops.fastadapt_cpu.lora_thin_supported():
        pytest.skip("this CPU has no AVX-512F: the cpp backward runs the torch body")
    return torch.ops.fastadapt_cpu.lora_backward_thin
