"""Pieces of the bridge's small-call forwards (``BridgeEntry.small_forward``): PEFT's own math
without the per-call Python of PEFT's forward and of its submodules' ``__call__``.

Each family's small forward reads PEFT's parameters straight from the layer (``submodule``, no
``nn.Module.__getattr__``), checks with :func:`fastadapt.peft.hookless` that no module it bypasses
has hooks, and runs the exact torch ops PEFT's forward runs, in PEFT's order: the same numbers bit
for bit, the same random draws, the same autograd graph.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn


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
