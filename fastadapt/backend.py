"""Backend choice: the one place that decides which implementation an op runs.

    CUDA tensors      -> "triton"  (fastadapt.triton_kernels launchers)
    CPU tensors       -> "cpp" for an op that registered a csrc/ kernel (one that beats torch),
                         when the extension is built or builds now; else "torch"
    MPS / other       -> "torch"
    FASTADAPT_BACKEND=reference|torch|cpp|triton forces one ("triton" on CPU runs the
    Triton interpreter, which needs TRITON_INTERPRET=1 set before triton is imported).

Ops call :func:`select` with the backends they implement; they never repeat this logic.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

BACKENDS = ("reference", "torch", "cpp", "triton")
ENV_VAR = "FASTADAPT_BACKEND"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when triton imports (it is a Linux-only optional dependency)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


def interpreter_mode() -> bool:
    """True when Triton kernels run through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend() -> str | None:
    """The backend forced by FASTADAPT_BACKEND, or None; ValueError on an unknown value."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a backend; valid choices: {list(BACKENDS)}")
    return value


def default_backend(device: torch.device) -> str:
    """The backend used for tensors on ``device`` when nothing is forced, for an op without a
    csrc/ kernel (:func:`select` prefers "cpp" on CPU for ops that have one)."""
    if device.type == "cuda" and triton_available():
        return "triton"
    return "torch"


_warned: set[tuple[str, str]] = set()


def select(op: str, device: torch.device, implemented: tuple[str, ...]) -> str:
    """Pick the backend for ``op`` on ``device`` among the ``implemented`` ones.

    Unforced, a CPU tensor runs "cpp" where ``op`` implements it and csrc/ builds (the first such
    call builds it), else the device's default.  A forced backend that ``op`` does not implement
    falls back to "torch" with one warning per (op, backend) pair, never silently.  Forcing
    "triton" on a CPU tensor requires triton and the interpreter; otherwise this raises
    RuntimeError saying what to set.  A missing compiler runs "torch" (csrc/ warned once).
    """
    forced = forced_backend()
    want = forced or default_backend(device)
    if forced is None and device.type == "cpu" and "cpp" in implemented:
        want = "cpp"
    if want == "cpp" and "cpp" in implemented:
        from . import _cpp
        if _cpp.extension() is None:  # compiler missing: _cpp already warned once
            want = "torch"
    if want == "triton" and "triton" in implemented:
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but triton is not installed")
        if device.type != "cuda" and not interpreter_mode():
            raise RuntimeError(
                f"{op}: triton on a {device.type} tensor needs the interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported, or use a CUDA tensor")
    if want not in implemented:
        fallback = "torch" if "torch" in implemented else implemented[0]
        if (op, want) not in _warned:
            _warned.add((op, want))
            warnings.warn(f"{op}: backend {want!r} is not implemented; running {fallback!r} "
                          f"(implemented: {list(implemented)})", stacklevel=3)
        want = fallback
    return want
