"""Test setup: Triton kernels run through the interpreter where no CUDA device exists.

TRITON_INTERPRET must be set before triton is imported, so this runs first (pytest imports
conftest.py before any test module).  On a GPU machine the same tests run compiled kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE
