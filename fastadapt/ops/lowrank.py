"""lowrank family: a frozen GEMM plus a thin low-rank (or sparse, or diagonal) branch, fused.

    LoRA       y = x W^T + b + s (x_d A^T) B^T                    x_d = mask o x (dropout)
               several active adapters: one branch of concatenated rank (A_1; A_2; ...),
               (s_1 B_1, s_2 B_2, ...), one mask per adapter with dropout
               mixed-adapter batch (adapter_names): sample b gets adapter g(b), or none; rows grouped
               by adapter, one thin product per group, the base GEMM once

Ops (``torch.library`` custom ops, fastadapt.ops._registry; the torch implementation is the CPU
path, "triton" the CUDA one; each module's docstring gives the gradient formulas and what is saved):

    fastadapt::lora_linear (+ _backward)      fastadapt.ops.lowrank_lora
    fastadapt::lora_mixed_linear (+ _backward)  fastadapt.ops.lowrank_mixed (PEFT's adapter_names: each
                                              sample of a batch with its own adapter, or none)

Every public function here validates its inputs (ValueError / TypeError naming the parameter and a
valid value), flattens the leading dims of x, and calls the op.  Dtypes follow PEFT's policy
(fastadapt.ops._policy): the adapter in x's dtype, or float32 on a float16 / bfloat16 x.  Under
``torch.autocast`` the ops take every floating-point input in the autocast dtype, as PEFT's
nn.Linear adapter modules do there.

Dropout masks (``dropout_stream``): "philox" (default) draws one int64 seed per masked adapter
from CPU's default generator (no device sync; reproducible under ``torch.manual_seed``) and the
mask Philox(seed, element index) is regenerated wherever it is needed, never stored; the same bits
on CPU (C++) and CUDA (Triton); nn.Dropout's distribution and 1 / (1 - p) scaling, not its bits.
"torch" draws nn.Dropout's own mask from the default generator (bit-identical to PEFT's dropout on
CPU, adapter by adapter in PEFT's order) and keeps it as 1 bit per element for backward.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from .. import _validate
from ._dropout_mask import draw_dropout_seed
from .dropout import draw_dropout
from ._policy import adapter_compute_dtype
from .lowrank_lora import lora_linear_op
from .lowrank_mixed import lora_mixed_linear_op

METHODS = ("lora", "pissa")
TRITON_METHODS = ("lora", "pissa")

DROPOUT_STREAMS = ("philox", "torch")

__all__ = ["METHODS", "TRITON_METHODS", "DROPOUT_STREAMS", "lora_linear", "lora_mixed_linear"]


# ----------------------------------------------------------------------------------------------
# Checks shared by the public functions

def _check_frozen(name: str, t: Tensor) -> None:
    if t.requires_grad:
        raise ValueError(f"{name} requires grad; the fused path needs it frozen ({name}.requires_grad_(False))")


def _check_base(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[int, int]:
    """(out_features, in_features) of a frozen weight (out, in) that x (..., in) and bias (out,) fit."""
    _validate.tensor("x", x, min_ndim=1)
    _validate.tensor("weight", weight, ndim=2)
    out_features, in_features = weight.shape
    _validate.tensor("x", x, shape=(*x.shape[:-1], in_features))
    _validate.same("x", x, "weight", weight)
    if bias is not None:
        _validate.tensor("bias", bias, shape=(out_features,))
        _validate.same("x", x, "bias", bias)
    _check_frozen("weight", weight)
    return out_features, in_features


def _check_dropout(dropout_p: float, dropout_stream: str, name: str = "dropout_p") -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name}={dropout_p!r} must be a float in [0, 1), e.g. {name}=0.1")
    if dropout_stream not in DROPOUT_STREAMS:
        raise ValueError(f"dropout_stream={dropout_stream!r} is not a mask stream; valid choices: "
                         f"{list(DROPOUT_STREAMS)}")
    return float(dropout_p)


def _as_list(name: str, value, count: Optional[int] = None) -> list:
    """``value`` as a list: a sequence as it is, a single value once (or ``count`` times)."""
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    if items is None:
        return [value] * (count or 1)
    if not items or (count is not None and len(items) != count):
        raise ValueError(f"{name} has {len(items)} entries; pass one per adapter ({count or 'at least one'})")
    return items


def _mask_inputs(x2d: Tensor, ps: list[float], stream: str, dtype: torch.dtype) -> tuple[list, list]:
    """(seeds, bits) of one call's masks, one per p > 0 in order: Philox seeds, or nn.Dropout's
    bits drawn on x's shape in ``dtype`` (the dtype PEFT's dropout sees)."""
    masked = [p for p in ps if p > 0]
    if not masked:
        return [], []
    if stream == "philox":
        return [draw_dropout_seed() for _ in masked], []
    like = x2d if x2d.dtype == dtype else torch.empty((), dtype=dtype, device=x2d.device).expand(x2d.shape)
    return [], [draw_dropout(like, p)[1] for p in masked]


# ----------------------------------------------------------------------------------------------
# LoRA

def _rank_segments(ranks: list[int], ps: list[float]) -> tuple[list[int], list[float]]:
    """Adjacent adapters without dropout share one segment (one mask-free product)."""
    seg_ranks, seg_ps = [], []
    for r, p in zip(ranks, ps):
        if p == 0 and seg_ps and seg_ps[-1] == 0:
            seg_ranks[-1] += r
        else:
            seg_ranks.append(r)
            seg_ps.append(p)
    return seg_ranks, seg_ps


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Union[Tensor, Sequence[Tensor]],
                lora_B: Union[Tensor, Sequence[Tensor]], scaling: Union[float, Sequence[float]], *,
                dropout_p: Union[float, Sequence[float]] = 0.0, dropout_stream: str = "philox") -> Tensor:
    """LoRA's forward as PEFT computes it, differentiable in x, bias, lora_A and lora_B:
    y = x W^T + b + sum_i s_i (x_i A_i^T) B_i^T, x_i = mask_i o x (dropout).

    x (..., in); weight (out, in) frozen (pass ``weight.T`` for fan_in_fan_out storage); bias
    (out,) or None; lora_A (r, in), lora_B (out, r), scaling s (read at every call: set_scale,
    rsLoRA) -- or sequences of them, one per active adapter (several active adapters: one
    concatenated-rank branch); any r >= 1 (PEFT accepts r above the layer's sizes).
    ``dropout_p``: training-mode dropout per adapter (0 in eval), masks from ``dropout_stream``
    ("philox" or "torch", see the module docstring).  The adapters share x's dtype, or are float32
    on a float16 / bfloat16 x (PEFT's default autocast_adapter_dtype).  Returns (..., out) in x's dtype.
    """
    out_features, in_features = _check_base(x, weight, bias)
    a_list = _as_list("lora_A", lora_A)
    count = len(a_list)
    b_list = _as_list("lora_B", lora_B, count)
    scalings = [float(s) for s in _as_list("scaling", scaling, count)]
    ps = [_check_dropout(p, dropout_stream) for p in _as_list("dropout_p", dropout_p, count)]
    ranks = _check_lora_factors(a_list, b_list, in_features, out_features)
    adapter_dtype = adapter_compute_dtype("x", x, [(f"lora_A[{i}]", a) for i, a in enumerate(a_list)]
                                          + [(f"lora_B[{i}]", b) for i, b in enumerate(b_list)])
    if count == 1:
        a, b, s = a_list[0], b_list[0], scalings[0]
    elif len(set(scalings)) == 1:
        a, b, s = torch.cat(a_list), torch.cat(b_list, dim=1), scalings[0]
    else:   # the scalings fold into B (a parameter-sized product per call)
        a, b, s = torch.cat(a_list), torch.cat([bi * si for bi, si in zip(b_list, scalings)], dim=1), 1.0
    seg_ranks, seg_ps = _rank_segments(ranks, ps)
    x2d = x.reshape(-1, in_features)
    seeds, bits = _mask_inputs(x2d, seg_ps, dropout_stream, adapter_dtype)
    y = lora_linear_op(x2d, weight, bias, a, b, s, seg_ranks, seg_ps, seeds, bits)[0]
    return y.reshape(*x.shape[:-1], out_features)


def _check_lora_factors(a_list, b_list, in_features: int, out_features: int) -> list[int]:
    ranks = []
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        name = "lora_A" if len(a_list) == 1 else f"lora_A[{i}]"
        _validate.tensor(name, a, ndim=2)
        r = _validate.positive_int("r", a.shape[0])
        _validate.tensor(name, a, shape=(r, in_features))
        _validate.tensor(name.replace("A", "B"), b, shape=(out_features, r))
        ranks.append(r)
    return ranks


def _sample_rows(adapter_index: list[int], adapters: int, rows_per_sample: int) -> tuple[Tensor, list[int]]:
    """(rows, counts): the row indices of a batch of len(adapter_index) samples of ``rows_per_sample``
    rows each, grouped by the samples' adapter (0 .. adapters - 1, then -1: no adapter), on the CPU."""
    index = torch.tensor(adapter_index, dtype=torch.int64)
    order = torch.argsort(torch.where(index < 0, adapters, index), stable=True)
    counts = torch.bincount(index[index >= 0], minlength=adapters).tolist()
    rows = (order[:, None] * rows_per_sample + torch.arange(rows_per_sample)).reshape(-1)
    return rows, [c * rows_per_sample for c in counts]


def lora_mixed_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Sequence[Tensor],
                      lora_B: Sequence[Tensor], scaling: Sequence[float], adapter_index: Sequence[int]) -> Tensor:
    """LoRA over a mixed-adapter batch as PEFT's ``adapter_names`` computes it, differentiable in x,
    bias, lora_A and lora_B: sample b of x (its first dim) gets adapter ``adapter_index[b]``
    (0 .. len(lora_A) - 1), or none for -1, y_b = x_b W^T + b + s_g (x_b A_g^T) B_g^T.

    x (batch, ..., in); weight (out, in) frozen; bias (out,) or None; lora_A / lora_B / scaling: one
    per adapter (ranks may differ); the adapters share x's dtype, or are float32 on a float16 /
    bfloat16 x.  The low-rank term is rounded to y's dtype before it is added (PEFT's
    ``result[idx] += lora.to(result.dtype)``).  No dropout (PEFT's model allows adapter_names in
    eval only).  Returns (batch, ..., out) in x's dtype.
    """
    out_features, in_features = _check_base(x, weight, bias)
    if x.dim() < 2:
        raise ValueError(f"x has shape {tuple(x.shape)}; a mixed-adapter batch needs x (batch, ..., in_features)")
    a_list, b_list = list(lora_A), list(lora_B)
    if not a_list or len(b_list) != len(a_list):
        raise ValueError(f"lora_A has {len(a_list)} entries and lora_B {len(b_list)}: pass one of each per adapter")
    scalings = [float(s) for s in _as_list("scaling", scaling, len(a_list))]
    ranks = _check_lora_factors(a_list, b_list, in_features, out_features)
    adapter_compute_dtype("x", x, [(f"lora_A[{i}]", a) for i, a in enumerate(a_list)]
                          + [(f"lora_B[{i}]", b) for i, b in enumerate(b_list)])
    index = [int(i) for i in adapter_index]
    if len(index) != x.shape[0]:
        raise ValueError(f"adapter_index has {len(index)} entries but x has {x.shape[0]} samples; pass one per sample")
    if any(not -1 <= i < len(a_list) for i in index):
        raise ValueError(f"adapter_index={index} must hold -1 (no adapter) or 0..{len(a_list) - 1}")
    x2d = x.reshape(-1, in_features)
    rows, counts = _sample_rows(index, len(a_list), x2d.shape[0] // max(x.shape[0], 1))
    y = lora_mixed_linear_op(x2d, weight, bias, torch.cat(a_list), torch.cat(b_list, dim=1), scalings, ranks,
                             rows.to(x.device, non_blocking=True), counts)[0]
    return y.reshape(*x.shape[:-1], out_features)
