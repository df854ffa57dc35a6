"""dora_norm family in PEFT's layers: fused forwards for LoRA-with-DoRA and DeLoRA (the bridge).

PEFT keeps its own parameters, with PEFT's names: ``lora_A[a].weight``, ``lora_B[a].weight``,
``lora_magnitude_vector[a].weight`` (DoRA); ``delora_A[a]``, ``delora_B[a]``,
``delora_lambda[a]``, ``delora_w_norm[a]`` (DeLoRA).  Merge and unmerge stay PEFT's own (DoRA
caches the norm for unmerge there); a merged layer runs PEFT's forward (fastadapt.peft).  The
norm op caches ||W||_row^2 per frozen weight; PEFT's merge/unmerge invalidate it by replacing
``weight.data``.

A float32 adapter on a float16 / bfloat16 base (PEFT's default ``autocast_adapter_dtype=True``)
runs fused with PEFT's casts (see fastadapt.ops.dora_norm_dora / dora_norm_delora), and so does
a call under ``torch.autocast`` (x, W and b in the autocast dtype, the adapter as it is; the
output dtype PEFT's layer gives).

A call runs PEFT's forward, with the reason counted, when the fused path would not reproduce
it exactly: the dtype layouts fastadapt.ops._policy.fallback_reason names, ``lora_bias=True``, a
trainable base weight, a dropout module other than nn.Dropout / nn.Identity, or dropout in
training with ``accelerate(model, dropout="torch")`` on a device other than CPU (nn.Dropout's
own mask stream is reproduced only on CPU).

Calls below the measured crossover (``BridgeEntry.min_macs``) run :func:`dora_small_forward` /
:func:`delora_small_forward`: PEFT's own ops in PEFT's order without PEFT's per-call Python, so
PEFT's numbers and dropout draws bit for bit.

Dropout masks (``fastadapt.peft.dropout_stream(layer)``, set by ``accelerate(model, dropout=...)``).
"philox" (default): fastadapt's Philox stream, one int seed drawn from CPU's default generator per
call, the mask regenerated in forward and backward and never stored, the same bits on CPU (C++)
and CUDA (Triton).  It has nn.Dropout's distribution and 1 / (1 - p) scaling but not PEFT's bits,
so a run is reproducible under ``torch.manual_seed`` and matches PEFT in distribution, not mask
for mask; the acceleration report counts such calls under :data:`PHILOX_DROPOUT_NOTE`.  "torch":
nn.Dropout's own draw from the default generator, bit-identical to PEFT's lora_dropout /
module_dropout on CPU for the same seed, kept as 1 bit per element for backward.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._policy import fallback_reason
from ..ops.dora_norm import delora_linear, dora_linear
from ..peft import BridgeEntry, dropout_stream, hookless, peft_forward
from ._lean import run, submodule
from ._modes import set_mode

_RECOMPUTE_ATTR = "_fastadapt_dora_recompute"

PHILOX_DROPOUT_NOTE = "dropout mask from fastadapt's Philox stream (nn.Dropout's distribution, not PEFT's bits)"


def _active_dropout(layer, dropout: nn.Module) -> bool:
    return layer.training and isinstance(dropout, nn.Dropout) and dropout.p > 0


def _dropout_reason(layer, dropout: nn.Module, x) -> Optional[str]:
    """Why dropout cannot run fused, or None."""
    if isinstance(dropout, nn.Identity) or not layer.training:
        return None
    if type(dropout) is not nn.Dropout:
        return f"dropout module {type(dropout).__name__} is not nn.Dropout"
    if dropout.p > 0 and dropout_stream(layer, x) == "torch" and x.device.type != "cpu":
        return (f"dropout='torch' in training on {x.device.type}: nn.Dropout's own mask stream is reproduced "
                "only on CPU (dropout='philox' runs fused)")
    return None


def _dropout_note(layer, dropout: nn.Module, x) -> Optional[str]:
    """The report's note for a fused call whose dropout mask is the Philox stream's."""
    if _active_dropout(layer, dropout) and dropout_stream(layer, x) == "philox":
        return PHILOX_DROPOUT_NOTE
    return None


def _dropout_p(layer, dropout: nn.Module) -> float:
    return dropout.p if layer.training and isinstance(dropout, nn.Dropout) else 0.0


# ----------------------------------------------------------------------------------------------
# DoRA: peft.tuners.lora.layer.Linear with use_dora

def _dora_weight(layer):
    base = layer.get_base_layer()
    return base.weight.T if layer.fan_in_fan_out else base.weight


def dora_check(layer, adapter: str, x) -> Optional[str]:
    base = layer.get_base_layer()
    if layer.lora_B[adapter].bias is not None:
        return "lora_bias=True"
    if base.weight.requires_grad:
        return "base weight is trainable"
    return (fallback_reason(layer, x, (base.weight, base.bias),
                            (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight,
                             layer.lora_magnitude_vector[adapter].weight), casts_x=True)
            or _dropout_reason(layer, layer.lora_dropout[adapter], x))


def dora_note(layer, adapter: str, x) -> Optional[str]:
    return _dropout_note(layer, layer.lora_dropout[adapter], x)


def dora_forward(layer, adapter: str, x):
    """PEFT's ``lora.Linear.forward`` with use_dora for one active adapter, fused.

    Saves x, u and y_pre by default; x and u only after :func:`set_recompute` (see
    fastadapt.ops.dora_norm_dora for what each mode saves and costs).  A 1-D x gives PEFT's
    (1, out_features) (its DoRA broadcasts against the (1, out_features) scale m / n).
    """
    y = dora_linear(x, _dora_weight(layer), layer.get_base_layer().bias, layer.lora_A[adapter].weight,
                    layer.lora_B[adapter].weight, layer.lora_magnitude_vector[adapter].weight,
                    layer.scaling[adapter], dropout_p=_dropout_p(layer, layer.lora_dropout[adapter]),
                    recompute=layer.__dict__.get(_RECOMPUTE_ATTR, False), dropout_stream=dropout_stream(layer, x))
    return y.unsqueeze(0) if x.ndim == 1 else y


@functools.cache
def _peft_dora():
    """(peft.tuners.lora.dora, DoraLinearVariant, PEFT's ``transpose``, the base classes whose
    ``dequantize_module_weight`` is ``base.weight``), imported on first use: PEFT is optional."""
    from peft.tuners.lora import dora
    from peft.tuners.lora.variants import DoraLinearVariant
    from peft.utils.other import transpose
    from transformers.pytorch_utils import Conv1D
    return dora, DoraLinearVariant, transpose, (nn.Linear, Conv1D)


def dora_small_forward(layer, adapter: str, x):
    """PEFT's ``lora.Linear.forward`` with DoRA (``DoraLinearVariant`` -> ``DoraLinearLayer``) for one
    adapter, for small calls, as the same ops (fastadapt.peft: ``BridgeEntry.small_forward``):

        result = base(x);  lora_weight = B(A(eye(in))).T;  n = ||W + scaling lora_weight||_row (detached)
        s = (m / n).view(1, -1);  base_result = result - bias, or W x' with dropout x' = dropout(x)
        y = result + (s - 1) base_result + s B(A(x')) scaling,  then the base output's dtype.

    x is cast to A's dtype after the base product, as PEFT's ``_cast_input_dtype`` does (a float32
    adapter on a half base).  PEFT's forward where that cast is switched off and needed, the variant
    is not plain DoRA, PEFT's DoRA cache is on (``ENABLE_DORA_CACHING``), the base weight is
    quantized or a module has hooks."""
    a, b = submodule(layer, "lora_A", adapter), submodule(layer, "lora_B", adapter)
    dropout, dora = submodule(layer, "lora_dropout", adapter), submodule(layer, "lora_magnitude_vector", adapter)
    base = layer._modules["base_layer"]
    a_weight = a.weight
    peft_dora, variant, transpose, plain_bases = _peft_dora()
    # plain bases hold an nn.Parameter weight: PEFT's dequantize_module_weight(base) is base.weight
    cast = x.dtype != a_weight.dtype
    if (type(layer.lora_variant.get(adapter)) is not variant or (cast and not layer.cast_input_dtype_enabled)
            or peft_dora.ENABLE_DORA_CACHING or type(base) not in plain_bases
            or type(base._parameters["weight"]) is not nn.Parameter or not hookless(base, a, b, dropout, dora)):
        return peft_forward(layer, x)
    scaling, fan_in_fan_out = layer.scaling[adapter], dora.fan_in_fan_out
    result = run(base, x)
    if cast:
        x = x.to(a_weight.dtype)
    if isinstance(dropout, nn.Identity) or not layer.training:
        base_result = result
    else:
        x = run(dropout, x)
        base_result = None
    cache = dora._dora_cache   # PEFT's cache decorator clears it on every uncached call
    if cache:
        cache.clear()
    eye = torch.eye(a_weight.shape[1], device=a_weight.device, dtype=a_weight.dtype)
    lora_weight = run(b, run(a, eye)).T
    # PEFT's casts, written as tests: Tensor.to(dtype) returns the tensor itself where it has that dtype
    if lora_weight.dtype != x.dtype:   # under torch.autocast
        lora_weight = lora_weight.to(x.dtype)
    weight = base.weight
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    weight_sum = transpose(weight, fan_in_fan_out) + scaling * lora_weight.detach()
    weight_norm = torch.linalg.norm(weight_sum, dim=1)
    if weight_norm.dtype != weight_sum.dtype:   # under autocast
        weight_norm = weight_norm.to(weight_sum.dtype)
    mag_norm_scale = (dora.weight / weight_norm.detach()).view(1, -1)
    lora_result = run(b, run(a, x))
    if base_result is None:
        base_result = F.linear(x, transpose(weight, fan_in_fan_out))
    elif base.bias is not None:
        base_result = base_result - base.bias
    y = result + ((mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling)
    return y if y.dtype == result.dtype else y.to(result.dtype)


def set_recompute(model: nn.Module, recompute: bool = True) -> int:
    """Make the fused DoRA forward of every LoRA layer in ``model`` save only x and u
    (``recompute``) or also y_pre (default); returns the number of layers set."""
    from peft.tuners.lora.layer import LoraLayer
    return set_mode(model, LoraLayer, _RECOMPUTE_ATTR, bool(recompute))


# ----------------------------------------------------------------------------------------------
# DeLoRA: peft.tuners.delora.layer.DeloraLinear

def delora_check(layer, adapter: str, x) -> Optional[str]:
    base = layer.get_base_layer()
    if base.weight.requires_grad:
        return "base weight is trainable"
    return (fallback_reason(layer, x, (base.weight, base.bias),
                            (layer.delora_A[adapter], layer.delora_B[adapter], layer.delora_lambda[adapter],
                             layer.delora_w_norm[adapter]), casts_x=False)
            or _dropout_reason(layer, layer.delora_dropout[adapter], x))


def delora_note(layer, adapter: str, x) -> Optional[str]:
    return _dropout_note(layer, layer.delora_dropout[adapter], x)


def delora_forward(layer, adapter: str, x):
    """PEFT's ``DeloraLinear.forward`` for one active adapter, fused."""
    base = layer.get_base_layer()
    return delora_linear(x, base.weight, base.bias, layer.delora_A[adapter], layer.delora_B[adapter],
                         layer.delora_lambda[adapter], layer.delora_w_norm[adapter],
                         dropout_p=_dropout_p(layer, layer.delora_dropout[adapter]),
                         dropout_stream=dropout_stream(layer, x))


def delora_small_forward(layer, adapter: str, x):
    """PEFT's ``DeloraLinear.forward`` for one adapter, for small calls, as the same ops
    (fastadapt.peft: ``BridgeEntry.small_forward``): base(x) plus, accumulated into zeros as PEFT
    does, ((dropout(x) w_norm) A^T (lambda / r) / (||A_i|| ||B^i||)) B^T, then x's dtype.  PEFT's
    forward where the base or dropout module has hooks."""
    base, dropout = layer._modules["base_layer"], submodule(layer, "delora_dropout", adapter)
    if not hookless(base, dropout):
        return peft_forward(layer, x)
    lora_a = layer._modules["delora_A"]._parameters[adapter]
    lora_b = layer._modules["delora_B"]._parameters[adapter]
    previous_dtype = x.dtype
    base_out = run(base, x)
    add_out = torch.zeros_like(base_out)
    h = F.linear(run(dropout, x) * layer._modules["delora_w_norm"]._buffers[adapter], lora_a)
    a_norm = torch.clamp(lora_a.norm(dim=1), min=1e-4)
    b_norm = torch.clamp(lora_b.norm(dim=0), min=1e-4)
    h = F.linear(h * ((layer._modules["delora_lambda"]._parameters[adapter] / layer.r[adapter]) / (a_norm * b_norm)),
                 lora_b)
    add_out += h
    result = base_out + add_out   # add_out has base_out's dtype: PEFT's .to() is a no-op
    return result if result.dtype == previous_dtype else result.to(previous_dtype)


PEFT_BRIDGE = [
    BridgeEntry(peft_class="peft.tuners.lora.layer.Linear", method="dora", forward=dora_forward,
                applies=lambda layer, a: bool(layer.use_dora.get(a, False)), check=dora_check, note=dora_note,
                base_classes=("torch.nn.modules.linear.Linear", "transformers.pytorch_utils.Conv1D"), autocast=True,
                min_macs={"cpu": 4 << 20}, small_forward=dora_small_forward),
    BridgeEntry(peft_class="peft.tuners.delora.layer.DeloraLinear", method="delora", forward=delora_forward,
                applies=lambda layer, a: a in layer.delora_A, check=delora_check, note=delora_note, autocast=True,
                min_macs={"cpu": 300 << 20}, small_forward=delora_small_forward),
]
