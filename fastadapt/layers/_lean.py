"""Pieces of the bridge's small-call forwards (``BridgeEntry.small_forward``): PEFT's own math
without the per-call Python of PEFT's forward and of its submodules' ``__call__``.

Each family's small forward reads PEFT's parameters straight from the layer (``submodule``, no
``nn.Module.__getattr__``), checks with :func:`fastadapt.peft.hookless` that no module it bypasses
has hooks, and runs the exact torch ops PEFT's forward runs, in PEFT's order: the same numbers bit
for bit, the same random draws, the same autograd graph.
"""
from __future__ import annotations

import functools
import importlib

import torch.nn.functional as F
from torch import nn


@functools.cache
def peft_module(method: str):
    """PEFT's ``peft.tuners.<method>.layer`` module (imported on first use: PEFT is optional), for
    the helpers PEFT's forwards call (its autograd Functions, ``_apply_road``, ``make_kron``)."""
    return importlib.import_module(f"peft.tuners.{method}.layer")


def cast_input(layer: nn.Module, x, dtype):
    """PEFT's ``BaseTunerLayer._cast_input_dtype``: x in ``dtype`` unless the layer's input cast is
    disabled (``cast_input_dtype_enabled``, read only when the dtypes differ)."""
    if x.dtype == dtype or not getattr(layer, "cast_input_dtype_enabled", True):
        return x
    return x.to(dtype=dtype)


def submodule(layer: nn.Module, container: str, adapter: str) -> nn.Module:
    """``layer.<container>[adapter]`` (a ModuleDict entry) without nn.Module's attribute lookup."""
    return layer._modules[container]._modules[adapter]


def run(module: nn.Module, x):
    """``module(x)`` for a hookless module: nn.Linear, nn.Identity and nn.Dropout run their forward's
    one op directly, any other module is called."""
    kind = type(module)
    if kind is nn.Linear:
        return F.linear(x, module.weight, module.bias)
    if kind is nn.Identity:
        return x
    if kind is nn.Dropout:
        return F.dropout(x, module.p, module.training, module.inplace)
    return module(x)
