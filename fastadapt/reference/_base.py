"""Base class of the dense references: a frozen base linear map plus an adapter.

References are the oracles of the test suite, never the fast path.  They are written for
reading: dense matrices, the paper's notation, float64 by default.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validate


class ReferenceAdapter(nn.Module):
    """A frozen base ``y = x W^T + b`` with an adapter on top.

    ``weight``: (out_features, in_features) buffer; ``bias``: (out_features,) buffer or None.
    Subclasses define ``delta_weight()`` (the dense change of W, where the method has one) and may
    override ``forward`` with the method's activation-space form; tests check that
    ``forward(x) == x (W + delta_weight())^T + merged_bias()``.
    """

    has_delta_weight = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"weight must be (out_features, in_features), got shape {tuple(weight.shape)}")
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no dense delta weight")

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.delta_weight()

    def merged_bias(self) -> torch.Tensor | None:
        """The bias of the merged layer (methods that act on outputs may change it)."""
        return self.bias

    def base(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.merged_weight(), self.merged_bias())


def float64(t: torch.Tensor | None) -> torch.Tensor | None:
    """A detached float64 copy of ``t`` (None stays None)."""
    return None if t is None else t.detach().to(torch.float64).clone()


def checked_parameter(name: str, value: torch.Tensor, shape, like: torch.Tensor) -> nn.Parameter:
    """``value`` checked against ``shape`` and ``like``'s dtype/device, as a fresh Parameter."""
    _validate.tensor(name, value, shape=shape)
    _validate.same(name, value, "weight", like)
    return nn.Parameter(value.detach().clone())


def demo_linear(d_in: int, d_out: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random float64 base (weight scaled by 1/sqrt(d_in), bias) for ``demo()`` instances."""
    weight = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64) / math.sqrt(d_in)
    bias = torch.randn(d_out, generator=generator, dtype=torch.float64)
    return weight, bias


def peft_weight_and_bias(layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float64 copies of the (out_features, in_features) weight and the bias under a PEFT layer.

    PEFT stores the weight transposed when its layer has ``fan_in_fan_out=True`` (Conv1D).
    """
    base = peft_base_layer(layer)
    weight = base.weight.T if getattr(layer, "fan_in_fan_out", False) else base.weight
    return float64(weight), float64(base.bias)


def peft_base_layer(layer) -> nn.Module:
    """The frozen base nn.Linear under a PEFT tuner layer."""
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer
