"""Base class of the dense references: a frozen base linear map plus an adapter.

References are the oracles of the test suite, never the fast path.  They are written for
reading: dense matrices, the paper's notation, float64 by default.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


def peft_base_layer(layer) -> nn.Module:
    """The frozen base nn.Linear under a PEFT tuner layer."""
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer
