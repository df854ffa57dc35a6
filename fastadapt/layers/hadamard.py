"""Hadamard-family layers (LoHa, LoKr) with PEFT's parameter names, and the PEFT bridge.

    LoHaLinear  y = x (W + dW)^T + b,  dW = s (hada_w1_a hada_w1_b) o (hada_w2_a hada_w2_b),
                s = alpha / r rounded to float32 (PEFT's torch.tensor(scaling), float64 models included)
    LoKrLinear  y = x (W + dW)^T + b,  dW = (alpha / r) kron(w1, w2),  w1 = lokr_w1 or lokr_w1_a lokr_w1_b,
                                                                      w2 = lokr_w2 or lokr_w2_a lokr_w2_b

Both run fastadapt.ops.hadamard (no O x I delta kept; see there for the two LoHa algorithms and the
LoKr reshape-and-matmul).  LoKr's layout is PEFT's: in = c d and out = a b split by PEFT's
factorization (``decompose_factor``: -1 near the square root, or a divisor), w1 (a, c) factored only
with ``decompose_both`` and r < max(a, c) / 2, w2 (b, d) factored when r < max(b, d) / 2.
``merge()`` writes the merged weight W + dW (summed in float32, rounded to W's dtype once);
``unmerge()`` subtracts the same delta (exact up to one rounding of W).  The output has x's dtype, also
under torch.autocast (PEFT's ``result.to(previous_dtype)``).

PEFT_BRIDGE serves ``peft.tuners.loha.layer.Linear`` and ``peft.tuners.lokr.layer.Linear`` on an
nn.Linear base (PEFT's LoHa / LoKr take no other linear base).  Calls run PEFT's forward, with the
reason counted, for: x, base weight and bias of different dtypes, an adapter dtype other than the
base's or float32 on a half base, a trainable base weight, ``module_dropout > 0`` in training (PEFT
skips the whole adapter by a host-side coin flip: no fused path), and LoKr's ``rank_dropout > 0``
in training.  LoHa's ``rank_dropout`` runs fused and exactly: PEFT's row mask m (drawn by
torch.rand on the CPU, kept rows rescaled by 1 / mean(m)) scales the rows of dW, which is LoHa
with hada_w1_a's rows scaled by m, so the fused op gets m o hada_w1_a and autograd the rest.  In
training every fused call draws PEFT's torch.rand(1) module-dropout coin (unused at p = 0) so the
default generator advances exactly as under PEFT.  PEFT's Conv1d / Conv2d LoHa and LoKr layers
(including ``use_effective_conv2d`` and the CP-form ``hada_t1`` / ``lokr_t2``) are other classes:
not patched, PEFT's forward, named in the acceleration report.  Calls below the method's crossover
(``BridgeEntry.min_macs``) run PEFT's own ops without PEFT's per-call Python (``loha_small_forward``,
``lokr_small_forward``): PEFT's numbers, random draws (both dropouts included) and autograd graph.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validate
from ..ops import hadamard as ops
from ..ops._policy import HALF_DTYPES, fallback_reason
from ..peft import BridgeEntry, hookless, peft_forward
from ..reference.hadamard import LoKr as _LoKrReference
from ._lean import cast_input, peft_module

LOKR_INITS = (True, False, "lycoris")


def _frozen_linear(base_layer) -> nn.Linear:
    if not isinstance(base_layer, nn.Linear):
        raise TypeError(f"base_layer must be nn.Linear, got {type(base_layer).__name__}")
    base_layer.requires_grad_(False)
    return base_layer


def _adapter_parameter(shape, like: torch.Tensor, autocast_adapter_dtype: bool, init) -> nn.Parameter:
    """A float32 tensor initialised by ``init`` (PEFT draws in float32), then in PEFT's adapter dtype:
    the base dtype, upcast to float32 on a float16 / bfloat16 base by default."""
    value = torch.empty(shape, dtype=torch.float32)
    init(value)
    dtype = torch.float32 if autocast_adapter_dtype and like.dtype in HALF_DTYPES else like.dtype
    return nn.Parameter(value.to(device=like.device, dtype=dtype))


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def loha_scale(scaling: float) -> float:
    """The scale PEFT's LoHa multiplies by: ``torch.tensor(scaling)``, i.e. alpha / r rounded to float32
    (nearest, ties to even; also for a float64 model).  Plain float arithmetic, so torch.compile traces
    it as a constant."""
    mantissa, exponent = math.frexp(scaling)
    return math.ldexp(round(mantissa * 2 ** 24) / 2 ** 24, exponent)


class _MergedWeight(nn.Module):
    """merge / unmerge through ``merged_weight()`` (W + dW, the weight of the merged layer)."""

    merged = False

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base_layer.weight.copy_(self.merged_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            weight = self.base_layer.weight
            weight.sub_(self.merged_weight() - weight)   # dW on top of the merged weight: the delta merge added
            self.merged = False

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoHaLinear(_MergedWeight):
    """LoHa on an nn.Linear with PEFT's names and init: ``hada_w1_a``, ``hada_w2_a`` (out, r),
    ``hada_w1_b``, ``hada_w2_b`` (r, in), scaling = alpha / r (read at every call, rounded to
    float32 as PEFT's LoHa does: :func:`loha_scale`).

    init_weights=True (PEFT's default): kaiming-uniform (a = sqrt(5)) for all but hada_w2_b = 0 (the
    identity); False: all four kaiming-uniform.  Draws from the default generator in PEFT's order.
    r must lie in 1..min(in, out).  Adapter dtype: PEFT's rule (float32 on a half base unless
    ``autocast_adapter_dtype=False``).
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float = 8.0, *, init_weights: bool = True,
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        self.base_layer = _frozen_linear(base_layer)
        in_features, out_features = base_layer.in_features, base_layer.out_features
        _validate.rank(r, in_features, out_features)
        if not isinstance(init_weights, bool):
            raise ValueError(f"init_weights={init_weights!r}; valid choices: [True, False]")
        self.r, self.alpha = r, alpha
        w = base_layer.weight
        shapes = {"hada_w1_a": (out_features, r), "hada_w1_b": (r, in_features), "hada_w2_a": (out_features, r),
                  "hada_w2_b": (r, in_features)}
        for name, shape in shapes.items():
            init = nn.init.zeros_ if init_weights and name == "hada_w2_b" else _kaiming
            setattr(self, name, _adapter_parameter(shape, w, autocast_adapter_dtype, init))

    def factors(self) -> tuple[torch.Tensor, ...]:
        return self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b

    def merged_weight(self) -> torch.Tensor:
        return ops.loha_merged_weight(self.base_layer.weight, *self.factors(), loha_scale(self.scaling))

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        return ops.loha_linear(x, self.base_layer.weight, self.base_layer.bias, *self.factors(),
                               loha_scale(self.scaling)).to(x.dtype)


class LoKrLinear(_MergedWeight):
    """LoKr on an nn.Linear with PEFT's names, layout and init (module docstring): ``lokr_w1`` (a, c)
    or ``lokr_w1_a`` (a, r) and ``lokr_w1_b`` (r, c); ``lokr_w2`` (b, d) or ``lokr_w2_a``, ``lokr_w2_b``;
    scaling = alpha / r (read at every call).

    init_weights=True (PEFT's default): w1 (or w1_a) zero, the rest kaiming-uniform (the identity);
    "lycoris": w2 (or w2_b) zero; False: all kaiming-uniform.  r must lie in 1..min(in, out);
    decompose_factor is -1 or a positive integer.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float = 8.0, *, decompose_both: bool = False,
                 decompose_factor: int = -1, init_weights=True, autocast_adapter_dtype: bool = True):
        super().__init__()
        self.base_layer = _frozen_linear(base_layer)
        in_features, out_features = base_layer.in_features, base_layer.out_features
        _validate.rank(r, in_features, out_features)
        if init_weights not in LOKR_INITS or not isinstance(init_weights, (bool, str)):
            raise ValueError(f"init_weights={init_weights!r}; valid choices: {list(LOKR_INITS)}")
        self.r, self.alpha = r, alpha
        self.layout = _LoKrReference.layout(in_features, out_features, r, decompose_both=decompose_both,
                                            decompose_factor=decompose_factor)
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}[init_weights]
        w = base_layer.weight
        for name in ops.LOKR_FACTORS:      # PEFT's creation and init order: w1 side, then w2 side
            if name in self.layout:
                init = nn.init.zeros_ if name in zero else _kaiming
                setattr(self, name, _adapter_parameter(self.layout[name], w, autocast_adapter_dtype, init))

    def factors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.layout}

    def merged_weight(self) -> torch.Tensor:
        return ops.lokr_merged_weight(self.base_layer.weight, self.scaling, **self.factors())

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        return ops.lokr_linear(x, self.base_layer.weight, self.base_layer.bias, self.scaling,
                               **self.factors()).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# PEFT bridge

MODULE_DROPOUT_REASON = "module_dropout > 0 in training (PEFT drops the whole adapter by a host-side coin flip)"
LOKR_RANK_DROPOUT_REASON = "LoKr rank_dropout > 0 in training"


def _loha_factors(layer, adapter: str) -> tuple[torch.Tensor, ...]:
    return tuple(getattr(layer, name)[adapter] for name in ops.LOHA_FACTORS)


def _lokr_factors(layer, adapter: str) -> dict[str, torch.Tensor]:
    return {name: getattr(layer, name)[adapter] for name in ops.LOKR_FACTORS if adapter in getattr(layer, name)}


def _check(layer, adapter: str, x, adapter_tensors, rank_dropout_fused: bool) -> Optional[str]:
    base = layer.get_base_layer()
    if base.weight.requires_grad:
        return "base weight is trainable"
    if layer.training and layer.module_dropout[adapter] > 0:
        return MODULE_DROPOUT_REASON
    if layer.training and layer.rank_dropout[adapter] > 0 and not rank_dropout_fused:
        return LOKR_RANK_DROPOUT_REASON
    return fallback_reason(layer, x, (base.weight, base.bias), adapter_tensors, casts_x=True)


def _module_dropout_coin(layer) -> Optional[torch.Tensor]:
    """PEFT's training forward draws torch.rand(1) per adapter call and keeps the adapter if it exceeds
    module_dropout (0 here: PEFT's forward runs otherwise): the same draw, so the default generator
    advances as under PEFT; None in eval (PEFT draws nothing)."""
    return torch.rand(1) if layer.training else None


def loha_check(layer, adapter: str, x) -> Optional[str]:
    return _check(layer, adapter, x, _loha_factors(layer, adapter), rank_dropout_fused=True)


def loha_forward(layer, adapter: str, x):
    """PEFT's ``loha.Linear.forward`` for one active adapter, fused; rank dropout as PEFT draws it.

    With rank dropout, hada_w1_a's rows are scaled by PEFT's mask m / mean(m) times the module-dropout
    coin's verdict (1 unless the coin is exactly 0; then PEFT skips the adapter and this call adds a
    zero delta), which also keeps the coin's draw in a compiled graph."""
    coin = _module_dropout_coin(layer)
    w1a, w1b, w2a, w2b = _loha_factors(layer, adapter)
    p = layer.rank_dropout[adapter]
    if layer.training and p:
        keep = (torch.rand(w1a.shape[0]) > p).to(w1a.dtype)      # PEFT's draw: CPU, one per output row
        keep = (keep / keep.mean() * (coin > 0).to(w1a.dtype)).to(w1a.device)
        w1a = w1a * keep[:, None]
    base = layer.get_base_layer()
    y = ops.loha_linear(x, base.weight, base.bias, w1a, w1b, w2a, w2b, loha_scale(layer.scaling[adapter]))
    return y.to(x.dtype)      # PEFT's result.to(previous_dtype) (differs under torch.autocast)


def lokr_check(layer, adapter: str, x) -> Optional[str]:
    return _check(layer, adapter, x, tuple(_lokr_factors(layer, adapter).values()), rank_dropout_fused=False)


def lokr_forward(layer, adapter: str, x):
    """PEFT's ``lokr.Linear.forward`` for one active adapter, fused (reshape and matmul)."""
    _module_dropout_coin(layer)
    base = layer.get_base_layer()
    y = ops.lokr_linear(x, base.weight, base.bias, layer.scaling[adapter], **_lokr_factors(layer, adapter))
    return y.to(x.dtype)      # PEFT's result.to(previous_dtype) (differs under torch.autocast)



def _lycoris_small_forward(layer, adapter: str, x, cp_factor: str, delta_weight):
    """PEFT's lycoris ``forward`` for one adapter of a LoHa / LoKr Linear, as PEFT's ops: base(x); in
    training PEFT's module-dropout coin (torch.rand(1)) may skip the adapter; else dW =
    ``delta_weight(layer, adapter, W.shape)`` (the adapter's ``get_delta_weight``), x cast to dW's
    dtype as PEFT casts it, base(x) + x dW^T, in x's dtype.  PEFT's forward for a base layer other
    than a hookless nn.Linear, or an adapter in its CP form (``cp_factor``, PEFT's Conv layers only)."""
    base = layer._modules["base_layer"]
    if type(base) is not nn.Linear or adapter in layer._modules[cp_factor]._parameters or not hookless(base):
        return peft_forward(layer, x)
    previous_dtype = x.dtype
    result = F.linear(x, base.weight, base.bias)
    if layer.training and not torch.rand(1) > layer.module_dropout[adapter]:
        return result.to(previous_dtype)
    weight = delta_weight(layer, adapter, base.weight.shape)
    x = cast_input(layer, x, weight.dtype)
    return (result + F.linear(x, weight)).to(previous_dtype)


def _loha_delta_weight(layer, adapter: str, shape):
    """PEFT's LoHa ``get_delta_weight``: HadaWeight(w1a, w1b, w2a, w2b, torch.tensor(scaling)) in W's
    shape; in training with rank_dropout, rows kept by torch.rand(out) > p (on the CPU), the mask
    divided by its mean."""
    params = layer._modules
    weight = peft_module("loha").HadaWeight.apply(
        params["hada_w1_a"]._parameters[adapter], params["hada_w1_b"]._parameters[adapter],
        params["hada_w2_a"]._parameters[adapter], params["hada_w2_b"]._parameters[adapter],
        torch.tensor(layer.scaling[adapter])).reshape(shape)
    rank_dropout = layer.rank_dropout[adapter]
    if layer.training and rank_dropout:
        drop = (torch.rand(weight.size(0)) > rank_dropout).to(weight.dtype)
        drop = drop.view(-1, 1).to(weight.device)
        drop /= drop.mean()
        weight *= drop
    return weight


def _lokr_factor(params, name: str, adapter: str):
    """LoKr's w1 or w2: the whole factor, or the product of its two low-rank factors."""
    whole = params[name]._parameters.get(adapter)
    if whole is not None:
        return whole
    return params[name + "_a"]._parameters[adapter] @ params[name + "_b"]._parameters[adapter]


def _lokr_delta_weight(layer, adapter: str, shape):
    """PEFT's LoKr ``get_delta_weight``: make_kron(w1, w2, scaling) in W's shape; in training with
    rank_dropout, a float32 row mask torch.rand(out) > p (on the CPU), divided by its mean with
    rank_dropout_scale."""
    params = layer._modules
    w1 = _lokr_factor(params, "lokr_w1", adapter)
    weight = peft_module("lokr").make_kron(w1, _lokr_factor(params, "lokr_w2", adapter),
                                            layer.scaling[adapter]).reshape(shape)
    rank_dropout = layer.rank_dropout[adapter]
    if layer.training and rank_dropout:
        drop = (torch.rand(weight.size(0)) > rank_dropout).float()
        drop = drop.view(-1, 1).to(weight.device)
        if layer.rank_dropout_scale[adapter]:
            drop /= drop.mean()
        weight *= drop
    return weight


def loha_small_forward(layer, adapter: str, x):
    """PEFT's LoHa ``Linear.forward`` for one active adapter, for small calls (fastadapt.peft:
    ``BridgeEntry.small_forward``): PEFT's ops without PEFT's per-call Python."""
    return _lycoris_small_forward(layer, adapter, x, "hada_t1", _loha_delta_weight)


def lokr_small_forward(layer, adapter: str, x):
    """PEFT's LoKr ``Linear.forward`` for one active adapter, for small calls (fastadapt.peft:
    ``BridgeEntry.small_forward``): PEFT's ops without PEFT's per-call Python."""
    return _lycoris_small_forward(layer, adapter, x, "lokr_t2", _lokr_delta_weight)


PEFT_BRIDGE = [
    BridgeEntry(peft_class="peft.tuners.loha.layer.Linear", method="loha", forward=loha_forward,
                applies=lambda layer, a: a in layer.hada_w1_a, check=loha_check, autocast=True,
                min_macs={"cpu": 4 << 20}, small_forward=loha_small_forward),
    BridgeEntry(peft_class="peft.tuners.lokr.layer.Linear", method="lokr", forward=lokr_forward,
                applies=lambda layer, a: a in layer.lokr_w1 or a in layer.lokr_w1_a, check=lokr_check,
                autocast=True, min_macs={"cpu": 4 << 20}, small_forward=lokr_small_forward),
]

__all__ = ["LoHaLinear", "LoKrLinear", "PEFT_BRIDGE"]
