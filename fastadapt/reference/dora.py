"""Dense references of the dora_norm family: DoRA and DeLoRA, float64, exactly PEFT's semantics.

DoRA (Liu et al., arXiv:2402.09353), as PEFT 0.21 computes it for a Linear layer::

    n   = || W + s B A ||_row          (one norm per output row, *detached*: no gradient)
    y   = (m / n) * (x W^T + s x A^T B^T) + b                         (dropout off / eval)
    y   = x W^T + b + (m / n - 1) * (x_d W^T) + (m / n) * s x_d A^T B^T (dropout on, training)

with W (out, in) frozen, A = ``lora_A.weight`` (r, in), B = ``lora_B.weight`` (out, r),
m = ``lora_magnitude_vector[a].weight`` (out,), s = ``scaling[a]`` and x_d = dropout(x).  With
dropout PEFT adds the DoRA correction to the base output of the *un-dropped* x, so two full
GEMMs with W are needed.  The merged weight is W' = (m / n)[:, None] * (W + s B A).

DeLoRA (Bini et al., arXiv:2503.18225), as PEFT 0.21 computes it::

    c_i = lambda / r / (max(||A_i||, 1e-4) * max(||B_:,i||, 1e-4))      (i = 1..r)
    y   = x W^T + b + ((x_d * w) A^T * c) B^T
    dW  = B diag(c) A * w[None, :]

with A = ``delora_A`` (r, in), B = ``delora_B`` (out, r), lambda = ``delora_lambda`` (1,) and the
frozen per-input-column base norm w = ``delora_w_norm`` (in,) = ||W_:,k|| captured at init.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validate
from ._base import ReferenceAdapter, peft_base_layer

DELORA_NORM_CLAMP = 1e-4  # PEFT's clamp on ||A_i|| and ||B_:,i||


def check_magnitude(magnitude: torch.Tensor, out_features: int) -> torch.Tensor:
    """``lora_magnitude_vector`` must hold one entry per output feature."""
    if magnitude.ndim != 1 or magnitude.shape[0] != out_features:
        raise ValueError(
            f"lora_magnitude_vector has shape {tuple(magnitude.shape)} but the layer has "
            f"out_features={out_features}: expected shape ({out_features},) (a checkpoint from another model?)")
    return magnitude


class DoRA(ReferenceAdapter):
    """DoRA: y = (m / n) (x W^T + s x A^T B^T) + b with n = ||W + s B A||_row detached.

    Shapes: weight (out, in), lora_A (r, in), lora_B (out, r), magnitude (out,).  ``forward(x,
    dropout_mask=None)``: a ``dropout_mask`` (x's shape, already scaled by 1 / (1 - p)) selects
    PEFT's training-with-dropout form, in which the base output of the un-dropped x is corrected.
    Paper: Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353.
    """

    def __init__(self, weight, bias, lora_A, lora_B, magnitude, scaling: float):
        super().__init__(weight, bias)
        r = lora_A.shape[0]
        _validate.rank(r, self.in_features, self.out_features)
        _validate.tensor("lora_A", lora_A, shape=(r, self.in_features))
        _validate.tensor("lora_B", lora_B, shape=(self.out_features, r))
        check_magnitude(magnitude, self.out_features)
        self.lora_A = nn.Parameter(lora_A.detach().clone())
        self.lora_B = nn.Parameter(lora_B.detach().clone())
        self.magnitude = nn.Parameter(magnitude.detach().clone())
        self.scaling = float(scaling)

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default") -> "DoRA":
        """Copy a PEFT ``lora.Linear`` with ``use_dora=True`` (float64); W is (out, in) here."""
        if layer.lora_B[adapter_name].bias is not None:
            raise ValueError("lora_bias=True is not covered by the DoRA reference; use lora_bias=False")
        base = peft_base_layer(layer)
        weight = base.weight.T if layer.fan_in_fan_out else base.weight
        f64 = dict(dtype=torch.float64)
        return cls(weight.to(**f64), None if base.bias is None else base.bias.to(**f64),
                   layer.lora_A[adapter_name].weight.to(**f64), layer.lora_B[adapter_name].weight.to(**f64),
                   layer.lora_magnitude_vector[adapter_name].weight.to(**f64), layer.scaling[adapter_name])

    @classmethod
    def demo(cls, d_in: int = 12, d_out: int = 10, r: int = 4) -> "DoRA":
        g = torch.Generator().manual_seed(0)
        w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5
        return cls(w, torch.randn(d_out, generator=g, dtype=torch.float64),
                   torch.randn(r, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5,
                   torch.randn(d_out, r, generator=g, dtype=torch.float64) * 0.1,
                   torch.rand(d_out, generator=g, dtype=torch.float64) + 0.5, scaling=2.0)

    def weight_norm(self) -> torch.Tensor:
        """n = ||W + s B A||_row, detached (PEFT and the paper's section 4.3)."""
        return torch.linalg.vector_norm(self.weight + self.scaling * self.lora_B @ self.lora_A, dim=1).detach()

    def delta_weight(self) -> torch.Tensor:
        scale = (self.magnitude / self.weight_norm())[:, None]
        return scale * (self.weight + self.scaling * self.lora_B @ self.lora_A) - self.weight

    def forward(self, x: torch.Tensor, dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.magnitude / self.weight_norm()
        if dropout_mask is None:
            y_pre = F.linear(x, self.weight) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)
            y = scale * y_pre
            return y if self.bias is None else y + self.bias
        x_d = x * dropout_mask
        y_pre_d = F.linear(x_d, self.weight)
        lora = F.linear(F.linear(x_d, self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + (scale - 1) * y_pre_d + scale * self.scaling * lora


class DeLoRA(ReferenceAdapter):
    """DeLoRA: y = x W^T + b + ((x_d * w) A^T * c) B^T, c_i = lambda / r / (||A_i|| ||B_:,i||).

    Shapes: weight (out, in), delora_A (r, in), delora_B (out, r), delora_lambda (1,),
    delora_w_norm (in,) frozen (a buffer).  Norms are clamped at 1e-4 as in PEFT.
    ``forward(x, dropout_mask=None)``: the mask (x's shape, scaled by 1 / (1 - p)) is PEFT's
    ``module_dropout`` on x.
    Paper: Bini et al., "Decoupling Angles and Strength in Low-rank Adaptation", arXiv:2503.18225.
    """

    def __init__(self, weight, bias, delora_A, delora_B, delora_lambda, delora_w_norm):
        super().__init__(weight, bias)
        r = delora_A.shape[0]
        _validate.rank(r, self.in_features, self.out_features)
        _validate.tensor("delora_A", delora_A, shape=(r, self.in_features))
        _validate.tensor("delora_B", delora_B, shape=(self.out_features, r))
        _validate.tensor("delora_lambda", delora_lambda, shape=(1,))
        _validate.tensor("delora_w_norm", delora_w_norm, shape=(self.in_features,))
        self.r = r
        self.delora_A = nn.Parameter(delora_A.detach().clone())
        self.delora_B = nn.Parameter(delora_B.detach().clone())
        self.delora_lambda = nn.Parameter(delora_lambda.detach().clone())
        self.register_buffer("delora_w_norm", delora_w_norm.detach().clone())

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default") -> "DeLoRA":
        """Copy a PEFT ``delora.DeloraLinear`` (float64)."""
        base = peft_base_layer(layer)
        f64 = dict(dtype=torch.float64)
        return cls(base.weight.to(**f64), None if base.bias is None else base.bias.to(**f64),
                   layer.delora_A[adapter_name].to(**f64), layer.delora_B[adapter_name].to(**f64),
                   layer.delora_lambda[adapter_name].to(**f64), layer.delora_w_norm[adapter_name].to(**f64))

    @classmethod
    def demo(cls, d_in: int = 12, d_out: int = 10, r: int = 4) -> "DeLoRA":
        g = torch.Generator().manual_seed(0)
        w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5
        return cls(w, torch.randn(d_out, generator=g, dtype=torch.float64),
                   torch.randn(r, d_in, generator=g, dtype=torch.float64),
                   torch.randn(d_out, r, generator=g, dtype=torch.float64),
                   torch.tensor([15.0], dtype=torch.float64), torch.linalg.vector_norm(w, dim=0))

    def component_scale(self) -> torch.Tensor:
        """c_i = lambda / r / (max(||A_i||, 1e-4) max(||B_:,i||, 1e-4)), shape (r,)."""
        a_norm = torch.clamp(torch.linalg.vector_norm(self.delora_A, dim=1), min=DELORA_NORM_CLAMP)
        b_norm = torch.clamp(torch.linalg.vector_norm(self.delora_B, dim=0), min=DELORA_NORM_CLAMP)
        return self.delora_lambda / self.r / (a_norm * b_norm)

    def delta_weight(self) -> torch.Tensor:
        return (self.delora_B * self.component_scale()) @ self.delora_A * self.delora_w_norm

    def forward(self, x: torch.Tensor, dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
        x_d = x if dropout_mask is None else x * dropout_mask
        h = F.linear(x_d * self.delora_w_norm, self.delora_A) * self.component_scale()
        return F.linear(x, self.weight, self.bias) + F.linear(h, self.delora_B)


REFERENCES = {"dora": DoRA, "delora": DeLoRA}
