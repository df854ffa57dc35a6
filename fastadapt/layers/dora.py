"""dora_norm family in PEFT's layers: fused forwards for LoRA-with-DoRA and DeLoRA (the bridge).

PEFT keeps its own parameters, with PEFT's names: ``lora_A[a].weight``, ``lora_B[a].weight``,
``lora_magnitude_vector[a].weight`` (DoRA); ``delora_A[a]``, ``delora_B[a]``,
``delora_lambda[a]``, ``delora_w_norm[a]`` (DeLoRA).  Merge and unmerge stay PEFT's own (DoRA
caches the norm for unmerge there); a merged layer runs PEFT's forward (fastadapt.peft).  Each
patched layer keeps a :class:`~fastadapt.ops.dora_norm.RowSqNormCache` of ||W||_row^2, which
PEFT's merge/unmerge invalidate by replacing ``weight.data``.

A float32 adapter on a float16 / bfloat16 base (PEFT's default ``autocast_adapter_dtype=True``)
runs fused with PEFT's casts (see ``DoraLinearFunction`` / ``DeloraLinearFunction``).

A call runs PEFT's forward, with the reason counted, when the fused path would not reproduce
it exactly: x, base weight and bias of different dtypes, adapter tensors of different dtypes, an
adapter dtype other than the base's or float32 on a half base, PEFT's input cast switched off
(``cast_input_dtype_enabled=False``) with a float32 adapter on a half base, ``lora_bias=True``, a
trainable base weight, a dropout module other than nn.Dropout / nn.Identity, or dropout in
training on a non-CPU device without the Triton kernels (float64, or FASTADAPT_BACKEND=torch):
only the Philox kernels or CPU's nn.Dropout stream give a mask fastadapt can regenerate.

Dropout masks.  On CPU (torch backend) the fused forward draws nn.Dropout's own mask from the
default generator: bit-identical to PEFT's lora_dropout / module_dropout for the same seed.  On
CUDA (every dtype but float64, including PEFT's default float32 adapter on a half base; also on
CPU under FASTADAPT_BACKEND=triton, through the interpreter) the mask comes from
fastadapt's Philox stream: one int seed drawn from CPU's default generator per
call, the mask regenerated in-kernel in forward and backward and never stored.  It has
nn.Dropout's distribution and 1 / (1 - p) scaling but not PEFT's bits (CUDA's nn.Dropout uses its
own fused kernel and stream), so a run is reproducible under ``torch.manual_seed`` and matches
PEFT in distribution, not mask for mask; the acceleration report counts such calls under
:data:`PHILOX_DROPOUT_NOTE`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.dora_norm import HALF_DTYPES, RowSqNormCache, delora_linear, dora_linear, seeded_dropout_masks
from ..peft import BridgeEntry

_CACHE_ATTR = "_fastadapt_weight_sq_norm"
_RECOMPUTE_ATTR = "_fastadapt_dora_recompute"


def _weight_sq_norm(layer, weight):
    cache = layer.__dict__.get(_CACHE_ATTR)
    if cache is None:
        cache = RowSqNormCache()
        layer.__dict__[_CACHE_ATTR] = cache
    return cache.get(weight)


def _dropout_reason(layer, dropout: nn.Module, x) -> Optional[str]:
    """Why dropout cannot run fused, or None.  The Philox kernels regenerate a mask on any device
    with Triton; without them only CPU's draw is nn.Dropout's mask stream."""
    if isinstance(dropout, nn.Identity) or not layer.training:
        return None
    if type(dropout) is not nn.Dropout:
        return f"dropout module {type(dropout).__name__} is not nn.Dropout"
    if dropout.p > 0 and x.device.type != "cpu" and not seeded_dropout_masks(x):
        return (f"dropout in training on {x.device.type} without the Philox kernels (float64 or the torch "
                "backend forced): only CPU's mask stream is nn.Dropout's")
    return None


PHILOX_DROPOUT_NOTE = "dropout mask from fastadapt's Philox stream (nn.Dropout's distribution, not PEFT's bits)"


def _dropout_note(layer, dropout: nn.Module, x) -> Optional[str]:
    """The report's note for a fused call whose dropout mask is the Philox kernels' mask."""
    if layer.training and type(dropout) is nn.Dropout and dropout.p > 0 and seeded_dropout_masks(x):
        return PHILOX_DROPOUT_NOTE
    return None


def _dtype_reason(layer, x, base_tensors, adapter_tensors, *, casts_x: bool) -> Optional[str]:
    """Why the dtypes cannot run fused, or None.

    Fused: x, W and the bias share one dtype, the adapter tensors share one dtype, and that is
    x's dtype or float32 on a float16 / bfloat16 x (PEFT's default autocast_adapter_dtype).
    ``casts_x``: the PEFT layer casts x to the adapter dtype (lora.Linear does, unless
    ``cast_input_dtype_enabled`` is off, in which case PEFT's own forward raises on the mix).
    """
    base_dtypes = {x.dtype, *(t.dtype for t in base_tensors if t is not None)}
    if len(base_dtypes) > 1:
        return f"x, base weight and bias have mixed dtypes {sorted(str(d) for d in base_dtypes)}"
    adapter_dtypes = {t.dtype for t in adapter_tensors}
    if len(adapter_dtypes) > 1:
        return f"adapter tensors have mixed dtypes {sorted(str(d) for d in adapter_dtypes)}"
    (adapter_dtype,) = adapter_dtypes
    if adapter_dtype == x.dtype:
        return None
    if adapter_dtype != torch.float32 or x.dtype not in HALF_DTYPES:
        return f"adapter dtype {adapter_dtype} on a {x.dtype} base (fused: the same dtype, or float32 on a half base)"
    if casts_x and not getattr(layer, "cast_input_dtype_enabled", True):
        return "cast_input_dtype_enabled=False with a float32 adapter on a half base"
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
    return (_dtype_reason(layer, x, (base.weight, base.bias),
                          (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight,
                           layer.lora_magnitude_vector[adapter].weight), casts_x=True)
            or _dropout_reason(layer, layer.lora_dropout[adapter], x))


def dora_note(layer, adapter: str, x) -> Optional[str]:
    return _dropout_note(layer, layer.lora_dropout[adapter], x)


def dora_forward(layer, adapter: str, x):
    """PEFT's ``lora.Linear.forward`` with use_dora for one active adapter, fused.

    Saves x and the output by default; x only after :func:`set_recompute` (see
    :class:`~fastadapt.ops.dora_norm.DoraLinearFunction` for what each mode saves and costs).
    """
    weight = _dora_weight(layer)
    return dora_linear(x, weight, layer.get_base_layer().bias, layer.lora_A[adapter].weight,
                       layer.lora_B[adapter].weight, layer.lora_magnitude_vector[adapter].weight,
                       layer.scaling[adapter], dropout_p=_dropout_p(layer, layer.lora_dropout[adapter]),
                       recompute=layer.__dict__.get(_RECOMPUTE_ATTR, False),
                       weight_sq_norm=_weight_sq_norm(layer, weight))


def set_recompute(model: nn.Module, recompute: bool = True) -> int:
    """Make the fused DoRA forward of every LoRA layer in ``model`` save only x (``recompute``)
    or x and the output (default); returns the number of layers set."""
    from peft.tuners.lora.layer import LoraLayer
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.__dict__[_RECOMPUTE_ATTR] = bool(recompute)
            count += 1
    return count


# ----------------------------------------------------------------------------------------------
# DeLoRA: peft.tuners.delora.layer.DeloraLinear

def delora_check(layer, adapter: str, x) -> Optional[str]:
    base = layer.get_base_layer()
    if base.weight.requires_grad:
        return "base weight is trainable"
    return (_dtype_reason(layer, x, (base.weight, base.bias),
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
                         dropout_p=_dropout_p(layer, layer.delora_dropout[adapter]))


PEFT_BRIDGE = [
    BridgeEntry(peft_class="peft.tuners.lora.layer.Linear", method="dora", forward=dora_forward,
                applies=lambda layer, a: bool(layer.use_dora.get(a, False)), check=dora_check, note=dora_note,
                base_classes=("torch.nn.modules.linear.Linear", "transformers.pytorch_utils.Conv1D")),
    BridgeEntry(peft_class="peft.tuners.delora.layer.DeloraLinear", method="delora", forward=delora_forward,
                applies=lambda layer, a: a in layer.delora_A, check=delora_check, note=delora_note),
]
