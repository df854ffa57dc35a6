"""Circulant-family layers (C3A, FourierFT) with PEFT's parameter names, and the PEFT bridge.

    C3ALinear        y = x (W + dW)^T + b,  dW = block-circulant(c3a_kernel) / in_features
    FourierFTLinear  y = x (W + dW)^T + b,  dW = scaling Re(ifft2(S)),  S sparse: fourierft_spectrum
                     at locations regenerated from random_loc_seed (randperm(out * in), as PEFT)

Both run :mod:`fastadapt.ops.circulant` (one GEMM with the merged weight, gradients of the adapter
from block / row DFTs).  ``merge()`` writes the merged weight the forward uses (so the merged
layer's output equals the unmerged one's, bit for bit, on the same backend); ``unmerge()``
subtracts the same delta (exact up to one rounding of W).

PEFT_BRIDGE serves ``peft.tuners.c3a.layer.C3ALinear`` (nn.Linear bases) and
``peft.tuners.fourierft.layer.FourierFTLinear`` (nn.Linear and transformers Conv1D bases).
Calls run PEFT's forward, with the reason counted, for: x, base weight and bias of different
dtypes, an adapter dtype other than the base's or float32 on a half base, a trainable base
weight.  Several active adapters run PEFT's forward for every method (fastadapt.peft); for C3A
that is also the only exact choice, since PEFT feeds each active C3A adapter's output into the
next one (x is replaced by the previous adapter's term) rather than adding them.

FourierFT calls below the measured crossover (``BridgeEntry.min_macs``) run
:func:`fourierft_small_forward`: PEFT's own ops in PEFT's order without PEFT's per-call Python, so
PEFT's numbers bit for bit.

One documented difference: PEFT 0.21's C3A input gradient is not the gradient of its own forward.
``BlockCircularConvolution.backward`` computes dx = fft(fft(dY) ifft(K)), i.e.
dx[n b + j] = sum_m sum_k dY[m b + k] K[m, n, (k + j) mod b] / I, where the adjoint of its forward
has K[m, n, (j - k) mod b]: PEFT's dx is the true gradient for dY reversed within each block
(k -> -k mod b; the same for b <= 2).  The fused path returns the true gradient (float64
gradcheck); the report notes such calls (:data:`C3A_INPUT_GRADIENT_NOTE`).  The output, the kernel
gradient and the bias gradient equal PEFT's.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validate
from ..ops import circulant as ops
from ..ops._policy import HALF_DTYPES, fallback_reason
from ..peft import BridgeEntry, hookless, peft_forward
from ..reference.circulant import spectrum_indices
from ._lean import run

C3A_INITS = (True, False, "gaussian", "kaiming_uniform", "xavier_uniform")


def _frozen_linear(base_layer) -> nn.Linear:
    if not isinstance(base_layer, nn.Linear):
        raise TypeError(f"base_layer must be nn.Linear, got {type(base_layer).__name__}")
    base_layer.requires_grad_(False)
    return base_layer


def _adapter_dtype(weight: torch.Tensor, autocast_adapter_dtype: bool) -> torch.dtype:
    """PEFT's rule: the base dtype, upcast to float32 on a float16 / bfloat16 base by default."""
    return torch.float32 if autocast_adapter_dtype and weight.dtype in HALF_DTYPES else weight.dtype


class _MergedWeight(nn.Module):
    """merge / unmerge through the layer's ``merged_weight()`` (the weight the forward multiplies by)."""

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
            delta = self.merged_weight() - weight   # dW on top of the merged weight: the delta merge added
            weight.sub_(delta)
            self.merged = False


class C3ALinear(_MergedWeight):
    """C3A on an nn.Linear (PEFT's names and init): ``c3a_kernel`` (out / b, in / b, b) with b =
    ``block_size`` dividing both feature sizes, and

        y = x (W + dW)^T + bias,   dW[m b + k, n b + j] = c3a_kernel[m, n, (j - k) mod b] / in_features.

    init_weights (PEFT's choices): "xavier_uniform" (PEFT's default; False means the same) draws
    U(-a, a), a = sqrt(6 / (in + out)); "kaiming_uniform" a = sqrt(1 / in); "gaussian" N(0, 1);
    True zeros (the identity).  The kernel is float32 on a float16 / bfloat16 base unless
    ``autocast_adapter_dtype=False`` (PEFT's switch), else the base dtype.
    """

    def __init__(self, base_layer: nn.Linear, block_size: int, *, init_weights="xavier_uniform",
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        self.base_layer = _frozen_linear(base_layer)
        in_features, out_features = base_layer.in_features, base_layer.out_features
        _validate.divides("block_size", block_size, in_features)
        _validate.divides("block_size", block_size, out_features, "out_features")
        if init_weights not in C3A_INITS:
            raise ValueError(f"init_weights={init_weights!r} is not a C3A init; valid choices: {list(C3A_INITS)}")
        self.block_size = block_size
        w = base_layer.weight
        kernel = torch.zeros(out_features // block_size, in_features // block_size, block_size,
                             dtype=_adapter_dtype(w, autocast_adapter_dtype), device=w.device)
        self.c3a_kernel = nn.Parameter(kernel)
        self.reset_parameters(init_weights)

    @torch.no_grad()
    def reset_parameters(self, init_weights="xavier_uniform"):
        """PEFT's ``reset_c3a_parameters`` (the same draws from the default generator)."""
        kernel = self.c3a_kernel
        if init_weights is True:
            kernel.zero_()
        elif init_weights == "gaussian":
            nn.init.normal_(kernel)
        elif init_weights in ("xavier_uniform", False):
            fan_in, fan_out = self.base_layer.in_features, self.base_layer.out_features
            bound = math.sqrt(3.0) * math.sqrt(2.0 / float(fan_in + fan_out))
            nn.init.uniform_(kernel, -bound, bound)
        elif init_weights == "kaiming_uniform":
            bound = math.sqrt(1.0 / float(self.base_layer.in_features))
            nn.init.uniform_(kernel, -bound, bound)
        else:
            raise ValueError(f"init_weights={init_weights!r} is not a C3A init; valid choices: {list(C3A_INITS)}")

    def merged_weight(self) -> torch.Tensor:
        return ops.c3a_merged_weight(self.base_layer.weight, self.c3a_kernel)

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        return ops.c3a_linear(x, self.base_layer.weight, self.base_layer.bias, self.c3a_kernel)


class FourierFTLinear(_MergedWeight):
    """FourierFT on an nn.Linear (PEFT's names and init): ``fourierft_spectrum`` (n_frequency,) at
    the locations ``indices`` (2, n_frequency) = (flat // in, flat % in) of the first n_frequency
    entries of randperm(out * in) seeded with ``random_loc_seed`` (regenerated, never saved), and

        y = x (W + dW)^T + bias,   dW = scaling Re(ifft2(S)).

    init_weights=False (PEFT's default) draws the spectrum from N(0, 1) (default generator), True
    zeros it.  ``scaling`` is read at every call.  Spectrum dtype: PEFT's rule (float32 on a half
    base unless ``autocast_adapter_dtype=False``).
    """

    def __init__(self, base_layer: nn.Linear, n_frequency: int = 1000, *, scaling: float = 150.0,
                 random_loc_seed: int = 777, init_weights: bool = False, autocast_adapter_dtype: bool = True):
        super().__init__()
        self.base_layer = _frozen_linear(base_layer)
        in_features, out_features = base_layer.in_features, base_layer.out_features
        _validate.positive_int("n_frequency", n_frequency)
        top = in_features * out_features
        if n_frequency > top:
            raise ValueError(f"n_frequency={n_frequency} exceeds out_features * in_features={top}; "
                             f"choose n_frequency in 1..{top}")
        self.n_frequency, self.scaling, self.random_loc_seed = n_frequency, scaling, random_loc_seed
        w = base_layer.weight
        spectrum = torch.zeros(n_frequency) if init_weights else torch.randn(n_frequency)
        self.fourierft_spectrum = nn.Parameter(spectrum.to(w.device, _adapter_dtype(w, autocast_adapter_dtype)))
        self.register_buffer("indices", spectrum_indices(out_features, in_features, n_frequency,
                                                         random_loc_seed).to(w.device), persistent=False)

    def merged_weight(self) -> torch.Tensor:
        return ops.fourierft_merged_weight(self.base_layer.weight, self.fourierft_spectrum, self.indices, self.scaling)

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        return ops.fourierft_linear(x, self.base_layer.weight, self.base_layer.bias, self.fourierft_spectrum,
                                    self.indices, self.scaling)


# ----------------------------------------------------------------------------------------------
# PEFT bridge

def _base_reason(layer, x, weight, adapter_tensor) -> Optional[str]:
    base = layer.get_base_layer()
    if weight.requires_grad:
        return "base weight is trainable"
    # Neither PEFT layer has cast_input_dtype: C3A casts x to float32, FourierFT to the spectrum's dtype.
    return fallback_reason(layer, x, (weight, base.bias), (adapter_tensor,), casts_x=False)


def _c3a_check(layer, adapter: str, x) -> Optional[str]:
    return _base_reason(layer, x, layer.get_base_layer().weight, layer.c3a_kernel[adapter])


C3A_INPUT_GRADIENT_NOTE = ("x's gradient is the exact one; PEFT 0.21's C3A backward (BlockCircularConvolution) "
                           "returns the true gradient of dY reversed within each block, so dL/dx differs from "
                           "PEFT's for block_size > 2")


def _c3a_note(layer, adapter: str, x) -> Optional[str]:
    """The report's note for a call whose input gradient will differ from PEFT's (see the module doc)."""
    if torch.is_grad_enabled() and x.requires_grad and layer.block_size[adapter] > 2:
        return C3A_INPUT_GRADIENT_NOTE
    return None


def _c3a_forward(layer, adapter: str, x):
    """PEFT's ``C3ALinear.forward`` for one active adapter: base(x) + BlockCircularConvolution(x, K) / in."""
    base = layer.get_base_layer()
    # PEFT returns x's dtype, which differs from the op's under torch.autocast (a float32 x)
    return ops.c3a_linear(x, base.weight, base.bias, layer.c3a_kernel[adapter]).to(x.dtype)


def _fourierft_weight(layer):
    base = layer.get_base_layer()
    return base.weight.T if layer.fan_in_fan_out else base.weight


_INDICES_ATTR = "_fastadapt_fourierft_indices"


def _fourierft_index_copy(layer, adapter: str, device) -> tuple:
    """(PEFT's ``indices[adapter]``, its int64 copy on ``device``, the copy's rows, its columns).
    PEFT keeps the (2, n) indices on the CPU and copies them to the device every call; the bridge
    keeps one copy per (adapter, device), renewed when PEFT replaces the tensor (update_layer)."""
    cache = layer.__dict__.setdefault(_INDICES_ATTR, {})
    source = layer.indices[adapter]
    hit = cache.get((adapter, device))
    if hit is None or hit[0] is not source:
        indices = source.to(device=device, dtype=torch.int64).contiguous()
        hit = (source, indices, indices[0, :], indices[1, :])
        cache[(adapter, device)] = hit
    return hit


def _fourierft_indices(layer, adapter: str, device) -> torch.Tensor:
    return _fourierft_index_copy(layer, adapter, device)[1]


def _fourierft_check(layer, adapter: str, x) -> Optional[str]:
    return _base_reason(layer, x, _fourierft_weight(layer), layer.fourierft_spectrum[adapter])


def _fourierft_forward(layer, adapter: str, x):
    """PEFT's ``FourierFTLinear.forward`` for one active adapter: base(x) + x dW^T, dW = scaling Re(ifft2(S))."""
    spectrum = layer.fourierft_spectrum[adapter]
    out = ops.fourierft_linear(x, _fourierft_weight(layer), layer.get_base_layer().bias, spectrum,
                               _fourierft_indices(layer, adapter, spectrum.device), layer.fourierft_scaling[adapter])
    return out.to(x.dtype)  # PEFT's output dtype, also under torch.autocast


def fourierft_small_forward(layer, adapter: str, x):
    """PEFT's ``FourierFTLinear.forward`` for one adapter, for small calls, as the same ops
    (fastadapt.peft: ``BridgeEntry.small_forward``): base(x) + x dW^T with PEFT's
    ``get_delta_weight`` inline (the spectrum scattered into float32 zeros at PEFT's indices, kept
    on the device as the fused path keeps them; ifft2, real part times scaling, the spectrum's
    dtype), x in dW's dtype, then x's dtype.  PEFT's forward where the base layer has hooks."""
    base = layer._modules["base_layer"]
    if not hookless(base):
        return peft_forward(layer, x)
    previous_dtype = x.dtype
    result = run(base, x)
    spectrum = layer._modules["fourierft_spectrum"]._parameters[adapter]
    device = spectrum.device
    _, _, rows, cols = _fourierft_index_copy(layer, adapter, device)   # PEFT's indices[0, :], [1, :] on device
    dense_spectrum = torch.zeros(layer.out_features, layer.in_features, device=device)
    dense_spectrum[rows, cols] = spectrum.float()
    delta_weight = torch.fft.ifft2(dense_spectrum).real * layer.fourierft_scaling[adapter]
    # PEFT's casts, written as tests: Tensor.to(dtype) returns the tensor itself where it has that dtype
    if delta_weight.dtype != spectrum.dtype:
        delta_weight = delta_weight.to(spectrum.dtype)
    if x.dtype != delta_weight.dtype:
        x = x.to(delta_weight.dtype)
    result = result + F.linear(x, delta_weight)
    return result if result.dtype == previous_dtype else result.to(previous_dtype)


PEFT_BRIDGE = [
    BridgeEntry(peft_class="peft.tuners.c3a.layer.C3ALinear", method="c3a", forward=_c3a_forward,
                applies=lambda layer, adapter: adapter in layer.c3a_kernel, check=_c3a_check, note=_c3a_note,
                autocast=True),
    BridgeEntry(peft_class="peft.tuners.fourierft.layer.FourierFTLinear", method="fourierft",
                forward=_fourierft_forward, applies=lambda layer, adapter: adapter in layer.fourierft_spectrum,
                check=_fourierft_check,
                base_classes=("torch.nn.modules.linear.Linear", "transformers.pytorch_utils.Conv1D"), autocast=True,
                min_macs={"cpu": 32 << 20}, small_forward=fourierft_small_forward),
]

__all__ = ["C3ALinear", "FourierFTLinear", "PEFT_BRIDGE"]
