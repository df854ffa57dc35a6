"""One tolerance table for the whole project, and the error measure it applies to.

Error is the relative Frobenius error against a float64 reference:
``||actual - expected||_F / ||expected||_F``, computed in float64.  Tests and benchmarks use
the same table.
"""
from __future__ import annotations

import torch

# Relative Frobenius error allowed per input dtype.  "tf32" is fp32 where tl.dot runs tf32.
TOLERANCE: dict[object, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    "tf32": 3e-4,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def tolerance(dtype: torch.dtype | str, *, scale: float = 1.0) -> float:
    """Tolerance for ``dtype`` ("tf32" allowed), times ``scale`` for long reductions."""
    if dtype not in TOLERANCE:
        raise ValueError(f"dtype={dtype!r} has no tolerance; valid choices: {list(TOLERANCE)}")
    return TOLERANCE[dtype] * scale


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error of ``actual`` against ``expected``, in float64.

    An all-zero ``expected`` makes this the absolute norm of ``actual``.
    NaN anywhere gives NaN (never a pass).
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    den = torch.linalg.vector_norm(e)
    num = torch.linalg.vector_norm(a - e)
    if den == 0:
        return float(num)
    return float(num / den)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, *,
                     scale: float = 1.0, name: str = "") -> float:
    """Assert ``rel_error(actual, expected) <= tolerance(dtype)``; returns the error.

    ``dtype`` defaults to ``actual.dtype``.
    """
    dtype = actual.dtype if dtype is None else dtype
    err = rel_error(actual, expected)
    tol = tolerance(dtype, scale=scale)
    if not err <= tol:  # also catches NaN
        raise AssertionError(f"{name or 'tensor'}: relative error {err:.3e} > {tol:.1e} ({dtype})")
    return err
