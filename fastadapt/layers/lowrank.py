"""lowrank family in PEFT's layers: fused forwards for LoRA (and PiSSA / OLoRA, LoRA with another
init) through the bridge.

PEFT keeps its own parameters, with PEFT's names: ``lora_A[a].weight`` (r, in), ``lora_B[a].weight``
(out, r) (and ``lora_B[a].bias`` with ``lora_bias=True``), ``scaling[a]`` read at every call
(set_scale, scale_layer, rsLoRA).  Merge and unmerge stay PEFT's own; a merged layer runs PEFT's
forward (fastadapt.peft).  Under ``torch.autocast`` the fused op takes x, W, b and the factors in
the autocast dtype, as PEFT's nn.Linear adapter modules do there.  transformers Conv1D bases (``fan_in_fan_out``) are served through the
weight's transpose (a view).

A call runs PEFT's forward, with the reason counted, when the fused path would not reproduce it
exactly: the dtype layouts fastadapt.ops._policy.fallback_reason names, ``lora_bias=True`` with a
float32 adapter on a half base, a trainable base weight, a dropout module other than nn.Dropout /
nn.Identity, or dropout in training with ``accelerate(model, dropout="torch")`` on a device other
than CPU (nn.Dropout's own mask stream is reproduced only on CPU).  LoRA variants (DoRA and the
others PEFT keeps in ``lora_variant``) are other entries' or PEFT's.

Dropout masks (``fastadapt.peft.dropout_stream(layer)``, set by ``accelerate(model, dropout=...)``):
"philox" (default) regenerates the mask from one seed per call and never stores it (nn.Dropout's
distribution, not PEFT's bits: the report counts such calls under :data:`PHILOX_DROPOUT_NOTE`);
"torch" draws nn.Dropout's own mask (bit-identical to PEFT on CPU) and keeps 1 bit per element.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..ops._policy import fallback_reason
from ..ops.lowrank import lora_linear, lora_mixed_linear
from ..peft import BridgeEntry, dropout_stream

PHILOX_DROPOUT_NOTE = "dropout mask from fastadapt's Philox stream (nn.Dropout's distribution, not PEFT's bits)"
BASE_CLASSES = ("torch.nn.modules.linear.Linear", "transformers.pytorch_utils.Conv1D")


# ----------------------------------------------------------------------------------------------
# Dropout modules of PEFT's layers

def _dropout_p(dropout: nn.Module) -> float:
    """The drop probability a PEFT dropout module applies now (0 for nn.Identity or in eval)."""
    return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _dropout_reason(layer, dropout: nn.Module, x) -> Optional[str]:
    """Why a call's dropout cannot run fused, or None."""
    if isinstance(dropout, nn.Identity) or not dropout.training:
        return None
    if type(dropout) is not nn.Dropout:
        return f"dropout module {type(dropout).__name__} is not nn.Dropout"
    if dropout.p > 0 and dropout_stream(layer) == "torch" and x.device.type != "cpu":
        return (f"dropout='torch' in training on {x.device.type}: nn.Dropout's own mask stream is reproduced "
                "only on CPU (dropout='philox' runs fused)")
    return None


def _dropout_note(layer, dropout: nn.Module) -> Optional[str]:
    if _dropout_p(dropout) > 0 and dropout_stream(layer) == "philox":
        return PHILOX_DROPOUT_NOTE
    return None


def _weight(layer):
    """The base weight as (out, in): a transposed view for fan_in_fan_out (Conv1D) storage."""
    base = layer.get_base_layer()
    return base.weight.T if layer.fan_in_fan_out else base.weight


def _base_reason(layer, x, adapter_tensors, *, casts_x: bool) -> Optional[str]:
    base = layer.get_base_layer()
    if base.weight.requires_grad:
        return "base weight is trainable"
    return fallback_reason(layer, x, (base.weight, base.bias), adapter_tensors, casts_x=casts_x)


# ----------------------------------------------------------------------------------------------
# LoRA: peft.tuners.lora.layer.Linear without a variant

def _lora_applies(layer, adapter: str) -> bool:
    return adapter in layer.lora_A and adapter not in layer.lora_variant


def _lora_check(layer, adapter: str, x) -> Optional[str]:
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter]
    reason = _base_reason(layer, x, (a, b.weight), casts_x=True)
    if reason is None and b.bias is not None and a.dtype != x.dtype:
        reason = "lora_bias=True with an adapter dtype other than the base's"
    return reason or _dropout_reason(layer, layer.lora_dropout[adapter], x)


def _lora_note(layer, adapter: str, x) -> Optional[str]:
    return _dropout_note(layer, layer.lora_dropout[adapter])


def lora_forward_adapters(layer, adapters: list[str], x):
    """PEFT's ``lora.Linear.forward`` for the active ``adapters`` (each on the layer, none a
    variant), fused: one branch of concatenated rank.  ``lora_bias`` adds s_i b_i to the bias."""
    base = layer.get_base_layer()
    bias = base.bias
    for adapter in adapters:
        lora_bias = layer.lora_B[adapter].bias
        if lora_bias is not None:
            scaled = lora_bias * layer.scaling[adapter]
            bias = scaled if bias is None else bias + scaled
    return lora_linear(x, _weight(layer), bias, [layer.lora_A[a].weight for a in adapters],
                       [layer.lora_B[a].weight for a in adapters], [layer.scaling[a] for a in adapters],
                       dropout_p=[_dropout_p(layer.lora_dropout[a]) for a in adapters],
                       dropout_stream=dropout_stream(layer))


def lora_forward(layer, adapter: str, x):
    """PEFT's ``lora.Linear.forward`` for one active adapter, fused (:func:`lora_forward_adapters`)."""
    return lora_forward_adapters(layer, [adapter], x)


def _lora_check_many(layer, adapters: list[str], x, adapter_names) -> Optional[str]:
    """What a mixed-adapter batch (``adapter_names``) adds to the per-adapter checks."""
    if adapter_names is None:
        return None
    if x.dim() < 2:
        return "adapter_names with a 1-D x"
    if any(layer.lora_B[a].bias is not None for a in adapters):
        return "adapter_names with lora_bias=True"
    if any(_dropout_p(layer.lora_dropout[a]) > 0 for a in adapters):
        return "adapter_names with dropout in training"
    return None


def lora_forward_mixed(layer, adapters: list[str], x, adapter_names: list[str]):
    """PEFT's ``lora.Linear._mixed_batch_forward``, fused: sample b of x gets adapter
    ``adapter_names[b]`` when it is one of ``adapters`` (held by the layer), else the base layer alone
    ("__base__", or an adapter the layer does not hold); PEFT's own argument checks first."""
    layer._check_forward_args(x, adapter_names=adapter_names)
    position = {a: i for i, a in enumerate(adapters)}
    base = layer.get_base_layer()
    return lora_mixed_linear(x, _weight(layer), base.bias, [layer.lora_A[a].weight for a in adapters],
                             [layer.lora_B[a].weight for a in adapters], [layer.scaling[a] for a in adapters],
                             [position.get(name, -1) for name in adapter_names])


def lora_forward_many(layer, adapters: list[str], x, adapter_names=None):
    """Several active adapters at once (one concatenated-rank branch), or a mixed-adapter batch."""
    if adapter_names is None:
        return lora_forward_adapters(layer, adapters, x)
    return lora_forward_mixed(layer, adapters, x, adapter_names)


def _lora_entry(method: str) -> BridgeEntry:
    return BridgeEntry(peft_class="peft.tuners.lora.layer.Linear", method=method, forward=lora_forward,
                       applies=_lora_applies, check=_lora_check, note=_lora_note, base_classes=BASE_CLASSES,
                       autocast=True, **_many_fields(lora_forward_many, _lora_check_many))


def _many_fields(forward_many, check_many) -> dict:
    """The bridge's several-adapter fields, where fastadapt.peft.BridgeEntry has them (see the report)."""
    import dataclasses
    fields = {f.name for f in dataclasses.fields(BridgeEntry)}
    return {"forward_many": forward_many, "check_many": check_many} if "forward_many" in fields else {}


# PiSSA / OLoRA are LoRA with another init (PEFT rewrites the base weight to the residual at init):
# the same fused forward, listed under its catalog name so accelerate(methods=["pissa"]) finds it.
PEFT_BRIDGE = [_lora_entry("lora"), _lora_entry("pissa")]

__all__ = ["PEFT_BRIDGE", "PHILOX_DROPOUT_NOTE", "lora_forward", "lora_forward_adapters", "lora_forward_many",
           "lora_forward_mixed"]
