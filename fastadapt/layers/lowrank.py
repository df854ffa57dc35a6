"""lowrank family: fused forwards for PEFT's LoRA (and PiSSA / OLoRA, LoRA with another init), VeRA,
AdaLoRA, VB-LoRA, IA3, MiSS, SHiRA and RandLoRA layers through the bridge, and SVFT (not in PEFT) as
fastadapt's own layer, :class:`SVFTLinear`.

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

Calls below a method's measured crossover (``BridgeEntry.min_macs``) run ``<method>_small_forward``:
PEFT's forward for one adapter as PEFT's own torch ops in PEFT's order (the same bits, random draws
and autograd graph), without PEFT's per-call Python; PEFT's forward where a module has hooks or a
configuration it does not cover (MiSS "bat", a quantized base).

Dropout masks (``fastadapt.peft.dropout_stream(layer)``, set by ``accelerate(model, dropout=...)``):
"philox" (default) regenerates the mask from one seed per call and never stores it (nn.Dropout's
distribution, not PEFT's bits: the report counts such calls under :data:`PHILOX_DROPOUT_NOTE`);
"torch" draws nn.Dropout's own mask (bit-identical to PEFT on CPU) and keeps 1 bit per element.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._policy import fallback_reason
from ..ops._policy import HALF_DTYPES
from ..ops.lowrank import ia3_linear, lora_linear, lora_mixed_linear, miss_linear, randlora_linear, shira_linear, \
    svft_linear, vera_linear
from ..reference.structured import svft_pattern
from ..peft import BridgeEntry, dropout_stream, hookless, peft_forward
from ._lean import cast_input, peft_module, run, submodule

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
    if dropout.p > 0 and dropout_stream(layer, x) == "torch" and x.device.type != "cpu":
        return (f"dropout='torch' in training on {x.device.type}: nn.Dropout's own mask stream is reproduced "
                "only on CPU (dropout='philox' runs fused)")
    return None


def _dropout_note(layer, dropout: nn.Module, x) -> Optional[str]:
    if _dropout_p(dropout) > 0 and dropout_stream(layer, x) == "philox":
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
    return _dropout_note(layer, layer.lora_dropout[adapter], x)


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
                       dropout_stream=dropout_stream(layer, x))


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


def lora_small_forward(layer, adapter: str, x):
    """PEFT's ``lora.Linear.forward`` for one vanilla adapter, for small calls: base(x) + lora_B(
    lora_A(dropout(x in the adapter's dtype))) * scaling, then the base output's dtype, as the same ops
    (fastadapt.peft: ``BridgeEntry.small_forward``); PEFT's forward where a module has hooks."""
    a, b = submodule(layer, "lora_A", adapter), submodule(layer, "lora_B", adapter)
    dropout, base = submodule(layer, "lora_dropout", adapter), layer._modules["base_layer"]
    if adapter in layer.lora_variant or not hookless(base, a, b, dropout):
        return peft_forward(layer, x)
    result = run(base, x)
    branch = run(b, run(a, run(dropout, cast_input(layer, x, a.weight.dtype)))) * layer.scaling[adapter]
    return (result + branch).to(result.dtype)


def _lora_entry(method: str) -> BridgeEntry:
    return BridgeEntry(peft_class="peft.tuners.lora.layer.Linear", method=method, forward=lora_forward,
                       applies=_lora_applies, check=_lora_check, note=_lora_note, base_classes=BASE_CLASSES,
                       autocast=True, forward_many=lora_forward_many, check_many=_lora_check_many,
                       min_macs={"cpu": 400 << 20}, small_forward=lora_small_forward)


def _not_mixed(layer, adapters, x, adapter_names) -> Optional[str]:
    return None if adapter_names is None else "adapter_names (PEFT has mixed-adapter batches for LoRA only)"


# ----------------------------------------------------------------------------------------------
# Methods on LoRA's branch: each one's factors (A, B, scaling) built from its parameters by small
# differentiable ops per call (parameter-sized), then the fused LoRA op

def _branch_forward(layer, adapters: list[str], x, factors, dropouts: nn.ModuleDict, output_in_x_dtype: bool):
    """y = x W^T + b + sum_a s_a (x_a A_a^T) B_a^T for the factors(layer, a) = (A_a, B_a, s_a)."""
    a_list, b_list, scalings = zip(*(factors(layer, a) for a in adapters))
    y = lora_linear(x, _weight(layer), layer.get_base_layer().bias, list(a_list), list(b_list), list(scalings),
                    dropout_p=[_dropout_p(dropouts[a]) for a in adapters], dropout_stream=dropout_stream(layer, x))
    return y.to(x.dtype) if output_in_x_dtype else y


def _branch_entry(peft_class: str, method: str, factors, dropouts: str, adapter_tensors, held: str,
                  check=None, output_in_x_dtype: bool = False, small_forward=None) -> BridgeEntry:
    """A bridge entry for a method on LoRA's branch: ``factors(layer, adapter) -> (A, B, s)``,
    ``dropouts`` the name of its dropout ModuleDict, ``adapter_tensors(layer, adapter)`` the tensors
    PEFT's dtype policy applies to, ``held`` the container of its adapters, ``check`` extra reasons,
    ``output_in_x_dtype``: PEFT returns x's dtype (under autocast too), ``small_forward`` the entry's
    (fastadapt.peft.BridgeEntry)."""
    def entry_check(layer, adapter, x):
        return (_base_reason(layer, x, adapter_tensors(layer, adapter), casts_x=True)
                or (None if check is None else check(layer, adapter, x))
                or _dropout_reason(layer, getattr(layer, dropouts)[adapter], x))

    def forward(layer, adapter, x):
        return _branch_forward(layer, [adapter], x, factors, getattr(layer, dropouts), output_in_x_dtype)

    def forward_many(layer, adapters, x, adapter_names):
        return _branch_forward(layer, adapters, x, factors, getattr(layer, dropouts), output_in_x_dtype)

    return BridgeEntry(peft_class=peft_class, method=method, forward=forward,
                       applies=lambda layer, adapter: adapter in getattr(layer, held), check=entry_check,
                       note=lambda layer, adapter, x: _dropout_note(layer, getattr(layer, dropouts)[adapter], x),
                       base_classes=BASE_CLASSES, autocast=True, forward_many=forward_many, check_many=_not_mixed,
                       min_macs={"cpu": 400 << 20}, small_forward=small_forward)


# VeRA: y = x W^T + b + lambda_b o ((lambda_d o (x_d A^T)) B^T) with the shared frozen projections
# sliced to the layer (A = vera_A[:, :in], B = vera_B[:out, :]): fastadapt::vera_linear (B' =
# lambda_b B lambda_d formed inside the op, never saved).  PEFT returns x's dtype.

def _vera_sliced(layer, adapter):
    return layer.vera_A[adapter][:, :layer.in_features], layer.vera_B[adapter][:layer.out_features, :]


def _vera_forward_many(layer, adapters, x, adapter_names=None):
    sliced = [_vera_sliced(layer, a) for a in adapters]
    y = vera_linear(x, _weight(layer), layer.get_base_layer().bias, [a for a, _ in sliced], [b for _, b in sliced],
                    [layer.vera_lambda_b[a] for a in adapters], [layer.vera_lambda_d[a] for a in adapters],
                    dropout_p=[_dropout_p(layer.vera_dropout[a]) for a in adapters],
                    dropout_stream=dropout_stream(layer, x))
    return y.to(x.dtype)


def vera_small_forward(layer, adapter: str, x):
    """PEFT's ``vera.Linear.forward`` for one adapter, for small calls: base(x), the shared
    projections sliced to the layer, result + lambda_b * linear(lambda_d * linear(dropout(x), A), B),
    then the base output's and x's dtype; PEFT's forward for a quantized base or a module with hooks."""
    modules, state = layer._modules, layer.__dict__
    base, dropout = modules["base_layer"], modules["vera_dropout"]._modules[adapter]
    if layer.quantization_backend is not None or not hookless(base, dropout):
        return peft_forward(layer, x)
    previous_dtype = x.dtype
    result = run(base, x)
    orig_dtype = result.dtype
    lambda_d, lambda_b = modules["vera_lambda_d"]._parameters[adapter], modules["vera_lambda_b"]._parameters[adapter]
    sliced_a = modules["vera_A"]._buffers[adapter][:, :state["in_features"]].to(x.device)
    sliced_b = modules["vera_B"]._buffers[adapter][:state["out_features"], :].to(x.device)
    x = cast_input(layer, x, lambda_d.dtype)
    result = result + lambda_b * F.linear(lambda_d * F.linear(run(dropout, x), sliced_a), sliced_b)
    if result.dtype != orig_dtype:
        result = result.to(orig_dtype)
    return result if result.dtype == previous_dtype else result.to(previous_dtype)


def _vera_tensors(layer, adapter):
    return (layer.vera_A[adapter], layer.vera_B[adapter], layer.vera_lambda_b[adapter], layer.vera_lambda_d[adapter])


def _vera_check(layer, adapter, x):
    r = layer.vera_lambda_d[adapter].shape[0]
    if layer.vera_A[adapter].shape[0] != r or layer.vera_B[adapter].shape[1] != r:
        return "shared projections of another rank than the adapter's (PEFT's forward does not broadcast them)"
    return (_base_reason(layer, x, _vera_tensors(layer, adapter), casts_x=True)
            or _dropout_reason(layer, layer.vera_dropout[adapter], x))


# AdaLoRA: y = x W^T + b + (x_d (A o E)^T B^T) scaling / (ranknum + 1e-5), ranknum a tensor (the
# factor is folded into B by a tensor op: no host read of ranknum).  A half adapter's factors are
# formed in float32 (the op then runs PEFT's float32-adapter layout): B's product with the factor and
# the gradients through it (E's, and ranknum's where PEFT leaves it trainable) are not rounded.

def _adalora_factors(layer, adapter):
    a, e, b, ranknum = (layer.lora_A[adapter], layer.lora_E[adapter], layer.lora_B[adapter], layer.ranknum[adapter])
    if a.dtype in (torch.float16, torch.bfloat16):
        a, e, b, ranknum = a.float(), e.float(), b.float(), ranknum.float()
    return a * e, b * (layer.scaling[adapter] / (ranknum + 1e-5)), 1.0


def adalora_small_forward(layer, adapter: str, x):
    """PEFT's ``adalora.SVDLinear.forward`` for one adapter, for small calls: result = base(x), then
    in place result += (dropout(x) @ (A * E).T @ B.T) * scaling / (ranknum + 1e-5) with x cast to A's
    dtype (PEFT's input cast); PEFT's forward where a module has hooks."""
    modules = layer._modules
    base, dropout = modules["base_layer"], modules["lora_dropout"]._modules[adapter]
    if not hookless(base, dropout):
        return peft_forward(layer, x)
    result = run(base, x)
    lora_a, lora_e = modules["lora_A"]._parameters[adapter], modules["lora_E"]._parameters[adapter]
    lora_b, scaling = modules["lora_B"]._parameters[adapter], layer.__dict__["scaling"][adapter]
    ranknum = modules["ranknum"]._parameters[adapter] + 1e-5
    x = cast_input(layer, x, lora_a.dtype)
    result += (run(dropout, x) @ (lora_a * lora_e).T @ lora_b.T) * scaling / ranknum
    return result


def _adalora_tensors(layer, adapter):
    return (layer.lora_A[adapter], layer.lora_E[adapter], layer.lora_B[adapter])


def _adalora_check(layer, adapter, x):
    return "r=0 (an empty AdaLoRA adapter)" if layer.lora_A[adapter].shape[0] == 0 else None


# VB-LoRA: A and B assembled from the shared vector bank by the top-k softmax mixtures of their
# logits (PEFT's assembly, parameter-sized, without its host-side check: see _vblora_check), then
# LoRA's branch without scaling.  PEFT returns x's dtype.

def _vblora_mix(logits, bank, topk: int):
    top, indices = logits.topk(topk, dim=-1)
    return (torch.softmax(top, dim=-1).unsqueeze(-1) * bank[indices]).sum(-2)


def _vblora_factors(layer, adapter):
    logits_a, logits_b = layer.vblora_logits_A[adapter], layer.vblora_logits_B[adapter]
    bank, topk = layer.vblora_vector_bank[adapter].to(logits_a.device), layer.topk[adapter]
    a = _vblora_mix(logits_a, bank, topk).reshape(logits_a.shape[0], -1)
    b = _vblora_mix(logits_b, bank, topk).transpose(1, 2).reshape(-1, logits_b.shape[1])
    return a, b, 1.0


def _vblora_tensors(layer, adapter):
    return (layer.vblora_vector_bank[adapter], layer.vblora_logits_A[adapter], layer.vblora_logits_B[adapter])


def vblora_small_forward(layer, adapter: str, x):
    """PEFT's ``vblora.Linear.forward`` (with ``_get_lora_matrices``) for one adapter, for small
    calls: base(x), A and B mixed from the bank, result + linear(linear(dropout(x), A), B) with x in
    the bank's dtype, then x's dtype; PEFT's forward (which raises) for infinite logits in training
    (checked eagerly, as :func:`_vblora_check`), and where a module has hooks."""
    modules = layer._modules
    base, dropout = modules["base_layer"], modules["vblora_dropout"]._modules[adapter]
    logits_a, logits_b = modules["vblora_logits_A"]._parameters[adapter], modules["vblora_logits_B"]._parameters[adapter]
    if not hookless(base, dropout) or _vblora_check(layer, adapter, x) is not None:
        return peft_forward(layer, x)
    previous_dtype = x.dtype
    result = run(base, x)
    bank = modules["vblora_vector_bank"]._parameters[adapter]
    moved_bank, topk = bank.to(logits_a.device), layer.__dict__["topk"][adapter]
    lora_a = _vblora_mix(logits_a, moved_bank, topk).reshape(logits_a.shape[0], -1)
    lora_b = _vblora_mix(logits_b, moved_bank, topk).transpose(1, 2).reshape(-1, logits_b.shape[1])
    if x.dtype != bank.dtype:
        x = x.to(bank.dtype)
    result = result + F.linear(F.linear(run(dropout, x), lora_a), lora_b)
    return result if result.dtype == previous_dtype else result.to(previous_dtype)


def _vblora_check(layer, adapter, x):
    # PEFT raises for infinite logits in training (a save_only_topk_weights checkpoint): its forward
    # runs there and raises.  The check reads one element on the host (eager calls only).
    if (layer.training and not torch.compiler.is_compiling()
            and bool(layer.vblora_logits_A[adapter][0, 0].isinf().any())):
        return "infinite VB-LoRA logits in training (PEFT raises)"
    return None


# ----------------------------------------------------------------------------------------------
# IA3: peft.tuners.ia3.layer.Linear (feed-forward: the input scaled; otherwise the output)

def _ia3_vector(layer, adapters):
    l = layer.ia3_l[adapters[0]].flatten()
    for adapter in adapters[1:]:
        l = l * layer.ia3_l[adapter].flatten()     # PEFT multiplies the active adapters' vectors
    return l


def _ia3_check(layer, adapter, x) -> Optional[str]:
    return _base_reason(layer, x, (layer.ia3_l[adapter],), casts_x=False)


def _ia3_forward_many(layer, adapters, x, adapter_names=None):
    base = layer.get_base_layer()
    return ia3_linear(x, _weight(layer), base.bias, _ia3_vector(layer, adapters), feedforward=layer.is_feedforward)


def ia3_small_forward(layer, adapter: str, x):
    """PEFT's ``ia3.Linear.forward`` for one adapter, for small calls: feed-forward, base((x * l) in
    x's dtype) with x in l's dtype; otherwise (base(x) * l) in the base output's dtype, l as PEFT forms
    it (``1 * l.flatten()``: its product over the active adapters starts from the int 1).  PEFT's
    forward where the base has hooks."""
    base = layer._modules["base_layer"]
    if not hookless(base):
        return peft_forward(layer, x)
    vector = layer._modules["ia3_l"]._parameters[adapter]
    scaling = 1 * vector.flatten()
    if layer.__dict__["is_feedforward"]:
        previous_dtype = x.dtype
        if previous_dtype != vector.dtype:
            x = x.to(vector.dtype)
        scaled = x * scaling
        return run(base, scaled if scaled.dtype == previous_dtype else scaled.to(previous_dtype))
    result = run(base, x)
    scaled = result * scaling
    return scaled if scaled.dtype == result.dtype else scaled.to(result.dtype)


# ----------------------------------------------------------------------------------------------
# MiSS: peft.tuners.miss.layer.MissLinear, modes "default" and "mini" ("bat" runs PEFT's forward)

def _miss_applies(layer, adapter) -> bool:
    return adapter in layer.miss_block and layer.miss_fn != "bat"


def _miss_check(layer, adapter, x) -> Optional[str]:
    if layer.quantization_backend is not None:
        return "quantized base"
    return (_base_reason(layer, x, (layer.miss_block[adapter],), casts_x=True)
            or _dropout_reason(layer, layer.miss_dropout[adapter], x))


def _miss_forward(layer, adapter, x):
    block = layer.miss_block[adapter]
    if layer.miss_fn == "mini":
        block = block.repeat(1, layer.out_features // layer.miss_mini_r[adapter])
    y = miss_linear(x, layer.get_base_layer().weight, layer.get_base_layer().bias, block,
                    dropout_p=_dropout_p(layer.miss_dropout[adapter]), dropout_stream=dropout_stream(layer, x))
    return y.to(x.dtype)     # PEFT returns x's dtype (under autocast too)


def miss_small_forward(layer, adapter: str, x):
    """PEFT's ``miss.MissLinear.forward`` ("default" and "mini") for one adapter, for small calls:
    base(x), the block (repeated for "mini"), x padded to a multiple of its rows and cast to its dtype,
    result + sum over the row groups of dropout(x) @ block, then x's dtype; PEFT's forward for "bat",
    a quantized base or a module with hooks."""
    modules, state = layer._modules, layer.__dict__
    base, dropout, mode = modules["base_layer"], modules["miss_dropout"]._modules[adapter], state["miss_fn"]
    if mode == "bat" or layer.quantization_backend is not None or not hookless(base, dropout):
        return peft_forward(layer, x)
    previous_dtype = x.dtype
    result = run(base, x)
    block = modules["miss_block"]._parameters[adapter]
    if mode == "mini":
        block = block.repeat(1, base.out_features // state["miss_mini_r"][adapter])
    r = block.size(0)
    if x.size(-1) % r != 0:
        x = F.pad(x, (0, (r - x.size(-1) % r) % r))
    x = cast_input(layer, x, block.dtype)
    result = result + torch.sum(run(dropout, x).reshape(*x.shape[:-1], x.size(-1) // r, r), dim=-2) @ block
    return result if result.dtype == previous_dtype else result.to(previous_dtype)


# ----------------------------------------------------------------------------------------------
# SHiRA: peft.tuners.shira.layer.Linear

_SHIRA_CHECKED = "_fastadapt_shira_checked"


def _shira_indices(layer, adapter):
    """The adapter's positions on the weight's device (PEFT moves them there the same way), range
    checked once per index tensor in eager calls (fastadapt.ops.lowrank_shira.check_indices)."""
    indices = layer.shira_indices[adapter].to(layer.shira_weight[adapter].device)
    layer.shira_indices[adapter] = indices
    if torch.compiler.is_compiling():
        return indices, False
    checked = layer.__dict__.setdefault(_SHIRA_CHECKED, {})
    fresh = checked.get(adapter) is not indices
    checked[adapter] = indices
    return indices, fresh


def _shira_check(layer, adapter, x) -> Optional[str]:
    if layer.quantization_backend is not None:
        return "quantized base"
    return _base_reason(layer, x, (layer.shira_weight[adapter],), casts_x=False)


def _shira_forward(layer, adapter, x):
    base = layer.get_base_layer()
    indices, check = _shira_indices(layer, adapter)
    return shira_linear(x, base.weight, base.bias, layer.shira_weight[adapter], indices, layer.scaling[adapter],
                        check=check)


def shira_small_forward(layer, adapter: str, x):
    """PEFT's ``shira.Linear.forward`` (with ``get_delta_weight``) for one adapter, for small calls:
    a clone of the base weight plus the sparse COO update (shira_weight * scaling at its indices,
    moved to the weight's device as PEFT does), then linear(x, that, base bias); PEFT's forward for a
    quantized base or a base with hooks (PEFT's forward warns about those)."""
    modules, state = layer._modules, layer.__dict__
    base = modules["base_layer"]
    if layer.quantization_backend is not None or not hookless(base):
        return peft_forward(layer, x)
    new_weight = base.weight.data.clone()
    weight, held_indices = modules["shira_weight"]._parameters[adapter], state["shira_indices"]
    indices = held_indices[adapter] = held_indices[adapter].to(weight.device)
    new_weight += torch.sparse_coo_tensor(indices, weight * state["scaling"][adapter],
                                          (state["out_features"], state["in_features"]))
    return F.linear(x, new_weight, bias=base.bias)


# ----------------------------------------------------------------------------------------------
# RandLoRA: peft.tuners.randlora.layer.Linear

def _randlora_bases(layer, adapter):
    d, big = min(layer.in_features, layer.out_features), max(layer.in_features, layer.out_features)
    n = layer.num_bases
    return layer.randlora_A[adapter][:, :n, :d], layer.randlora_B[adapter][:big, :n, :]


def _randlora_check(layer, adapter, x) -> Optional[str]:
    a, b = _randlora_bases(layer, adapter)
    if a.shape[1] != 1:
        return "randlora_A with several bases (PEFT's UniqueBaseGrad sums the gradient over them)"
    if tuple(layer.randlora_lambda[adapter].shape) != (a.shape[0], b.shape[1]):
        return "randlora_lambda of another shape than the layer's bases (PEFT's forward does not broadcast it)"
    return (_base_reason(layer, x, (a, b, layer.randlora_lambda[adapter], layer.randlora_gamma[adapter]), casts_x=True)
            or _dropout_reason(layer, layer.randlora_dropout[adapter], x))


def _randlora_forward(layer, adapter, x):
    a, b = _randlora_bases(layer, adapter)
    y = randlora_linear(x, _weight(layer), layer.get_base_layer().bias, a, b, layer.randlora_lambda[adapter],
                        layer.randlora_gamma[adapter], layer.scaling[adapter],
                        dropout_p=_dropout_p(layer.randlora_dropout[adapter]), dropout_stream=dropout_stream(layer, x))
    return y.to(x.dtype)


def randlora_small_forward(layer, adapter: str, x):
    """PEFT's ``randlora.Linear.forward`` (with ``get_scaled_bases``) for one adapter, for small calls:
    base(x), the bases sliced and scaled by PEFT's own ``UniqueBaseGrad``, result + linear(linear(
    dropout(x), first), second) * scaling in PEFT's order (float32 bases on CPU for a half adapter),
    then x's dtype; PEFT's forward where a module has hooks."""
    modules, state = layer._modules, layer.__dict__
    base, dropout = modules["base_layer"], modules["randlora_dropout"]._modules[adapter]
    if not hookless(base, dropout):
        return peft_forward(layer, x)
    previous_dtype, device = x.dtype, x.device
    result = run(base, x)
    bases_a, bases_b = modules["randlora_A"]._buffers[adapter], modules["randlora_B"]._buffers[adapter]
    scale_a = modules["randlora_lambda"]._parameters[adapter].to(device)
    scale_b = modules["randlora_gamma"]._parameters[adapter].to(device)
    if x.is_cpu and bases_b.dtype in HALF_DTYPES:
        bases_a, bases_b, scale_a, scale_b = bases_a.float(), bases_b.float(), scale_a.float(), scale_b.float()
    d_in, d_out, num_bases = state["in_features"], state["out_features"], state["num_bases"]
    min_dim, max_dim = min(d_out, d_in), max(d_out, d_in)
    sliced_a = bases_a[:, :num_bases, :min_dim].to(device)
    sliced_b = bases_b[:max_dim, :num_bases, :].to(device)
    update_b = sliced_b.flatten(start_dim=1)
    update_a = peft_module("randlora").UniqueBaseGrad.apply(sliced_a, scale_a, scale_b).flatten(end_dim=1)
    first, second = (update_a, update_b) if min_dim == d_in else (update_b.T, update_a.T)
    if x.dtype != second.dtype:
        x = x.to(second.dtype)
    result = result + F.linear(F.linear(run(dropout, x), first), second) * state["scaling"][adapter]
    return result if result.dtype == previous_dtype else result.to(previous_dtype)


# PiSSA / OLoRA are LoRA with another init (PEFT rewrites the base weight to the residual at init):
# the same fused forward, listed under its catalog name so accelerate(methods=["pissa"]) finds it.
PEFT_BRIDGE = [
    _lora_entry("lora"), _lora_entry("pissa"),
    BridgeEntry(peft_class="peft.tuners.vera.layer.Linear", method="vera",
                forward=lambda layer, adapter, x: _vera_forward_many(layer, [adapter], x),
                applies=lambda layer, adapter: adapter in layer.vera_lambda_d, check=_vera_check,
                note=lambda layer, adapter, x: _dropout_note(layer, layer.vera_dropout[adapter], x),
                base_classes=BASE_CLASSES, autocast=True, forward_many=_vera_forward_many, check_many=_not_mixed,
                min_macs={"cpu": 1 << 30}, small_forward=vera_small_forward),
    _branch_entry("peft.tuners.adalora.layer.SVDLinear", "adalora", _adalora_factors, "lora_dropout",
                  _adalora_tensors, "lora_A", _adalora_check, small_forward=adalora_small_forward),
    _branch_entry("peft.tuners.vblora.layer.Linear", "vblora", _vblora_factors, "vblora_dropout", _vblora_tensors,
                  "vblora_logits_A", _vblora_check, output_in_x_dtype=True, small_forward=vblora_small_forward),
    BridgeEntry(peft_class="peft.tuners.ia3.layer.Linear", method="ia3",
                forward=lambda layer, adapter, x: _ia3_forward_many(layer, [adapter], x),
                applies=lambda layer, adapter: adapter in layer.ia3_l, check=_ia3_check, base_classes=BASE_CLASSES,
                autocast=True, forward_many=_ia3_forward_many, check_many=_not_mixed, min_macs={"cpu": 400 << 20},
                small_forward=ia3_small_forward),
    BridgeEntry(peft_class="peft.tuners.miss.layer.MissLinear", method="miss", forward=_miss_forward,
                applies=_miss_applies, check=_miss_check,
                note=lambda layer, adapter, x: _dropout_note(layer, layer.miss_dropout[adapter], x), autocast=True,
                min_macs={"cpu": 1 << 30}, small_forward=miss_small_forward),
    BridgeEntry(peft_class="peft.tuners.shira.layer.Linear", method="shira", forward=_shira_forward,
                applies=lambda layer, adapter: adapter in layer.shira_weight, check=_shira_check, autocast=True,
                min_macs={"cpu": 128 << 20}, small_forward=shira_small_forward),
    BridgeEntry(peft_class="peft.tuners.randlora.layer.Linear", method="randlora", forward=_randlora_forward,
                applies=lambda layer, adapter: adapter in layer.randlora_lambda, check=_randlora_check,
                note=lambda layer, adapter, x: _dropout_note(layer, layer.randlora_dropout[adapter], x),
                base_classes=BASE_CLASSES, autocast=True, min_macs={"cpu": 256 << 20},
                small_forward=randlora_small_forward),
]

# ----------------------------------------------------------------------------------------------
# SVFT: fastadapt's layer (PEFT has no SVFT)

class SVFTLinear(nn.Module):
    """SVFT on an nn.Linear (arXiv:2405.19597): W = U S V^T (its top r singular triplets), a sparse
    trainable r x r matrix M at the positions of ``pattern`` (fastadapt.reference.structured.svft_pattern:
    "plain" diagonal, "banded" |i - j| <= off_diag, "random"), and

        y = x W^T + b + (x V) (U M)^T,     dW = U M V^T

    Buffers ``svft_u`` (out, r), ``svft_s`` (r,), ``svft_vh`` (r, in), ``svft_indices`` (2, K); parameter
    ``svft_m`` (K,), zeros at init (the identity).  r defaults to min(in, out).  The SVD runs in
    float64; U, S, V^T and M are float32 on a float16 / bfloat16 base unless
    ``autocast_adapter_dtype=False`` (PEFT's rule), else the base dtype.  W stays exact: only the
    update lives in the top-r subspace.  ``merge()`` adds dW to W (in float32 for a half W, rounded
    once), ``unmerge()`` subtracts it.
    """

    def __init__(self, base_layer: nn.Linear, r: Optional[int] = None, *, pattern: str = "banded",
                 off_diag: int = 2, seed: Optional[int] = None, autocast_adapter_dtype: bool = True):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer.requires_grad_(False)
        w = base_layer.weight
        d_out, d_in = w.shape
        from .. import _validate
        r = min(d_in, d_out) if r is None else _validate.rank(r, d_in, d_out)
        if pattern == "plain":
            off_diag = 0
        indices = svft_pattern(r, pattern, off_diag, seed).to(w.device)
        dtype = torch.float32 if autocast_adapter_dtype and w.dtype in HALF_DTYPES else w.dtype
        u, s, vh = torch.linalg.svd(w.detach().to(torch.float64), full_matrices=False)
        self.register_buffer("svft_u", u[:, :r].to(dtype).contiguous())
        self.register_buffer("svft_s", s[:r].to(dtype).contiguous())
        self.register_buffer("svft_vh", vh[:r].to(dtype).contiguous())
        self.register_buffer("svft_indices", indices)
        self.svft_m = nn.Parameter(torch.zeros(indices.shape[1], dtype=dtype, device=w.device))
        self.r, self.pattern, self.off_diag = r, pattern, off_diag
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """U M V^T (out, in) in the adapter's dtype (no gradient)."""
        with torch.no_grad():
            rows, cols = self.svft_indices
            m = self.svft_m.new_zeros(self.r, self.r).index_put((rows, cols), self.svft_m, accumulate=True)
            return self.svft_u @ m @ self.svft_vh

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() if w.dtype in HALF_DTYPES else w) + self.delta_weight().to(torch.promote_types(
                w.dtype, torch.float32)))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() if w.dtype in HALF_DTYPES else w) - self.delta_weight().to(torch.promote_types(
                w.dtype, torch.float32)))
            self.merged = False

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        return svft_linear(x, self.base_layer.weight, self.base_layer.bias, self.svft_u, self.svft_vh, self.svft_m,
                           self.svft_indices)


__all__ = ["PEFT_BRIDGE", "SVFTLinear", "PHILOX_DROPOUT_NOTE", "lora_forward", "lora_forward_adapters", "lora_forward_many",
           "lora_forward_mixed"]
