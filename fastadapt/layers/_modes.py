"""Per-layer modes of the fused forwards (e.g. recompute instead of save), kept in each PEFT layer's
``__dict__`` so state_dict, checkpoints and PEFT's own forward never see them."""
from __future__ import annotations

from torch import nn


def set_mode(model: nn.Module, layer_class: type, attr: str, value) -> int:
    """``attr`` = ``value`` on every ``layer_class`` module of ``model``; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, layer_class):
            module.__dict__[attr] = value
            count += 1
    return count
