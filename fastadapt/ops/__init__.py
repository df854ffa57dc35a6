"""fastadapt.ops: functional, differentiable ops per kernel family.

Each family module ``fastadapt/ops/<family>.py`` declares
``METHODS``        catalog names with a fast CPU path (torch or csrc/) in this family, and
``TRITON_METHODS`` catalog names whose hot path has a Triton kernel,
and its ops as torch custom ops through :func:`fastadapt.ops._registry.fused_op` (the backend
choice, autocast, torch.compile and opcheck come from that registration; see its docstring).
Shared by every family: ``_policy`` (PEFT's adapter dtype policy) and ``dropout`` (Philox masks).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .._catalog import FAMILIES


def family_module(family: str) -> ModuleType | None:
    """The ops module of ``family``, or None while that family has not landed."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not a kernel family; valid choices: {list(FAMILIES)}")
    name = f"{__name__}.{family}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        raise


def implemented() -> tuple[set[str], set[str]]:
    """(methods with a CPU path, methods with a Triton kernel) over all landed families."""
    cpu, triton = set(), set()
    for family in FAMILIES:
        module = family_module(family)
        if module is not None:
            cpu |= set(getattr(module, "METHODS", ()))
            triton |= set(getattr(module, "TRITON_METHODS", ()))
    return cpu, triton
