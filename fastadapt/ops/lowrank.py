"""lowrank family: a frozen GEMM plus a thin low-rank (or sparse, or diagonal) branch, fused.

    LoRA       y = x W^T + b + s (x_d A^T) B^T                    x_d = mask o x (dropout)
               (CPU float32 / float64 without dropout, when it costs less: y = x (W + s B A)^T + b)
               several active adapters: one branch of concatenated rank (A_1; A_2; ...),
               (s_1 B_1, s_2 B_2, ...), one mask per adapter with dropout
               mixed-adapter batch (adapter_names): sample b gets adapter g(b), or none; rows grouped
               by adapter, one thin product per group, the base GEMM once

Ops (``torch.library`` custom ops, fastadapt.ops._registry; the torch implementation is the CPU
path, "triton" the CUDA one; each module's docstring gives the gradient formulas and what is saved):

    fastadapt::lora_linear (+ _backward)      fastadapt.ops.lowrank_lora
    fastadapt::lora_mixed_linear (+ _backward)  fastadapt.ops.lowrank_mixed (PEFT's adapter_names: each
                                              sample of a batch with its own adapter, or none)
    fastadapt::ia3_output_linear, ::ia3_input_linear (+ _backward)    fastadapt.ops.lowrank_ia3
    fastadapt::miss_linear (+ _backward)      fastadapt.ops.lowrank_miss
    fastadapt::shira_linear (+ _backward)     fastadapt.ops.lowrank_shira
    fastadapt::randlora_linear (+ _backward)  fastadapt.ops.lowrank_randlora
    fastadapt::svft_linear (+ _backward)      fastadapt.ops.lowrank_svft (LoRA's bodies, B = U M formed in the op)

    fastadapt::vera_linear (+ _backward)      fastadapt.ops.lowrank_lora (LoRA's bodies, B' = lambda_b B
                                              lambda_d formed in the op; u and the merged weight saved
                                              in place of x where they fit in its bytes)

AdaLoRA and VB-LoRA run on LoRA's op: their factors are built from their parameters by small
differentiable ops per call (AdaLoRA: A o E and B scaling / (ranknum + 1e-5); VB-LoRA: the top-k
mixtures of the vector bank), the rest is LoRA's.

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
from ..backend import select
from ._dropout_mask import draw_dropout_seed
from .dropout import draw_dropout
from ._policy import adapter_compute_dtype
from .lowrank_ia3 import ia3_input_linear_op, ia3_output_linear_op
from .lowrank_lora import lora_linear_op, vera_linear_op
from .lowrank_miss import miss_linear_op
from .lowrank_mixed import lora_mixed_linear_op
from .lowrank_randlora import randlora_linear_op
from .lowrank_shira import check_indices, shira_linear_op, shira_plan
from .lowrank_svft import svft_linear_op

METHODS = ("lora", "pissa", "vera", "adalora", "vblora", "ia3", "miss", "shira", "randlora", "svft")
TRITON_METHODS = ("lora", "pissa", "vera", "adalora", "vblora", "miss", "ia3", "shira", "randlora", "svft")

DROPOUT_STREAMS = ("philox", "torch")

__all__ = ["METHODS", "TRITON_METHODS", "DROPOUT_STREAMS", "ia3_linear", "lora_linear", "lora_mixed_linear",
           "miss_linear", "randlora_linear", "shira_linear", "svft_linear", "vera_linear"]


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


# One read + write pass over an (out, in) float32 matrix costs about as much CPU time as this many
# multiply-adds per element (8 bytes at ~8 GB/s vs ~20 GFLOP/s on the benchmark machine): the
# merged mode's two merges are charged 2 (R + MERGE_PASS_FLOPS) out in against the thin products
# over the tokens it saves, N (in + out) R (benchmarks/NOTES.md, lowrank).
MERGE_PASS_FLOPS = 20
# u (N, R) is kept for backward while it costs at most 1/32 of bytes(x), else recomputed there.
KEPT_U_FRACTION = 1 / 32


def _lora_plan(x2d: Tensor, weight: Tensor, rank: int, masked: bool, adapter_dtype: torch.dtype) -> tuple[bool, bool]:
    """(merged, keep_u) for one call: the merged weight W + s B A where it costs less than the
    low-rank products over the tokens (CPU torch path, float32 / float64, no dropout mask)."""
    n, (out_features, in_features) = x2d.shape[0], weight.shape
    on_torch = select("lora_linear", x2d.device, ("torch", "triton")) == "torch"
    merged = (on_torch and not masked and x2d.dtype in (torch.float32, torch.float64) and adapter_dtype == x2d.dtype
              and n * (in_features + out_features) * rank > 2 * in_features * out_features * (rank + MERGE_PASS_FLOPS))
    u_bytes = rank * (4 if x2d.dtype in (torch.float16, torch.bfloat16) else x2d.element_size())
    return merged, u_bytes <= KEPT_U_FRACTION * in_features * x2d.element_size()


def _vera_plan(x2d: Tensor, weight: Tensor, rank: int, masked: bool, adapter_dtype: torch.dtype,
               training: bool) -> tuple[bool, bool, bool, bool]:
    """(merged, keep_u, keep_merged, keep_h) of one VeRA call: LoRA's merged rule, and what autograd
    saves in training.  VeRA's backward never reads x but to recompute u = x A^T, so u is saved in
    place of x where it is not larger, and the merged W_eff beside it where the two stay within
    bytes(x) (its rebuild in backward, 2 out r in multiply-adds, then skipped).  A half base with
    float32 adapters (PEFT's default) on the CPU keeps u and PEFT's float32 h = (lambda_d o u) B^T
    (N, out), PEFT's own saved set: float32 products run at about half the rate of the half GEMMs
    there, and h spares the fifth one, dY^T u (benchmarks/NOTES.md, lowrank)."""
    merged, _ = _lora_plan(x2d, weight, rank, masked, adapter_dtype)
    half = x2d.dtype in (torch.float16, torch.bfloat16)
    keep_h = (training and half and adapter_dtype == torch.float32
              and select("vera_linear", x2d.device, ("torch", "triton")) == "torch")
    x_bytes = x2d.numel() * x2d.element_size()
    u_bytes = x2d.shape[0] * rank * (4 if half else x2d.element_size())
    keep_u = training and (half or u_bytes <= x_bytes)
    saved = u_bytes if keep_u else x_bytes
    keep_merged = merged and training and saved + weight.numel() * weight.element_size() <= x_bytes
    return merged, keep_u, keep_merged, keep_h


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
    merged, keep_u = _lora_plan(x2d, weight, sum(ranks), any(p > 0 for p in ps), adapter_dtype)
    y = lora_linear_op(x2d, weight, bias, a, b, s, seg_ranks, seg_ps, seeds, bits, merged, keep_u)[0]
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
    _check_lora_factors(a_list, b_list, in_features, out_features)
    adapter_compute_dtype("x", x, [(f"lora_A[{i}]", a) for i, a in enumerate(a_list)]
                          + [(f"lora_B[{i}]", b) for i, b in enumerate(b_list)])
    index = [int(i) for i in adapter_index]
    if len(index) != x.shape[0]:
        raise ValueError(f"adapter_index has {len(index)} entries but x has {x.shape[0]} samples; pass one per sample")
    if any(not -1 <= i < len(a_list) for i in index):
        raise ValueError(f"adapter_index={index} must hold -1 (no adapter) or 0..{len(a_list) - 1}")
    x2d = x.reshape(-1, in_features)
    rows, counts = _sample_rows(index, len(a_list), x2d.shape[0] // max(x.shape[0], 1))
    y = lora_mixed_linear_op(x2d, weight, bias, a_list, b_list, scalings, rows.to(x.device, non_blocking=True),
                             counts)[0]
    return y.reshape(*x.shape[:-1], out_features)


def vera_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], vera_A: Union[Tensor, Sequence[Tensor]],
                vera_B: Union[Tensor, Sequence[Tensor]], vera_lambda_b: Union[Tensor, Sequence[Tensor]],
                vera_lambda_d: Union[Tensor, Sequence[Tensor]], *, dropout_p: Union[float, Sequence[float]] = 0.0,
                dropout_stream: str = "philox") -> Tensor:
    """VeRA as PEFT computes it, differentiable in x, bias and the lambdas:
    y = x W^T + b + sum_i lambda_b,i o ((lambda_d,i o (x_i A_i^T)) B_i^T).

    vera_A (r, in) and vera_B (out, r): the shared frozen projections sliced to the layer (PEFT's
    vera_A[:, :in], vera_B[:out, :]); vera_lambda_b (out,), vera_lambda_d (r,); or sequences of
    them (several active adapters: one concatenated-rank branch)."""
    out_features, in_features = _check_base(x, weight, bias)
    a_list = _as_list("vera_A", vera_A)
    count = len(a_list)
    b_list = _as_list("vera_B", vera_B, count)
    lb_list, ld_list = _as_list("vera_lambda_b", vera_lambda_b, count), _as_list("vera_lambda_d", vera_lambda_d, count)
    ps = [_check_dropout(p, dropout_stream) for p in _as_list("dropout_p", dropout_p, count)]
    ranks = _check_lora_factors(a_list, b_list, in_features, out_features)
    for lb, ld, r in zip(lb_list, ld_list, ranks):
        _validate.tensor("vera_lambda_b", lb, shape=(out_features,))
        _validate.tensor("vera_lambda_d", ld, shape=(r,))
    for name, t in (("vera_A", a_list), ("vera_B", b_list)):
        for tensor in t:
            _check_frozen(name, tensor)
    adapter_dtype = adapter_compute_dtype("x", x, [(n, t) for n, ts in (("vera_A", a_list), ("vera_B", b_list),
                                                                        ("vera_lambda_b", lb_list),
                                                                        ("vera_lambda_d", ld_list)) for t in ts])
    if count > 1:   # several adapters: LoRA's op on the concatenated factors (B' saved there, parameter-sized)
        return lora_linear(x, weight, bias, a_list, [lb[:, None] * b * ld for lb, b, ld in zip(lb_list, b_list, ld_list)],
                           [1.0] * count, dropout_p=ps, dropout_stream=dropout_stream)
    x2d = x.reshape(-1, in_features)
    seeds, bits = _mask_inputs(x2d, ps, dropout_stream, adapter_dtype)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                               for t in (x, bias, lb_list[0], ld_list[0]))
    merged, keep_u, keep_merged, keep_h = _vera_plan(x2d, weight, ranks[0], ps[0] > 0, adapter_dtype, training)
    y = vera_linear_op(x2d, weight, bias, a_list[0], b_list[0], lb_list[0], ld_list[0], ranks, ps, seeds, bits, merged,
                       keep_u, keep_merged, keep_h)[0]
    return y.reshape(*x.shape[:-1], out_features)


# ----------------------------------------------------------------------------------------------
# IA3, MiSS, SHiRA, RandLoRA

def ia3_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], ia3_l: Tensor, *, feedforward: bool) -> Tensor:
    """(IA)^3 as PEFT computes it, differentiable in x, bias and ia3_l: y = (x o l) W^T + b
    (``feedforward``, l = ia3_l (1, in) or (in,)) or y = (x W^T + b) o l (l (out, 1) or (out,)).
    x (..., in); weight (out, in) frozen; l in x's dtype or float32 on a half x.  Several active
    adapters: pass the product of their vectors (PEFT multiplies them)."""
    out_features, in_features = _check_base(x, weight, bias)
    size = in_features if feedforward else out_features
    _validate.tensor("ia3_l", ia3_l)
    if ia3_l.numel() != size:
        raise ValueError(f"ia3_l has shape {tuple(ia3_l.shape)}; expected {size} values "
                         f"({'in' if feedforward else 'out'}_features, feedforward={feedforward})")
    adapter_compute_dtype("x", x, (("ia3_l", ia3_l),))
    x2d = x.reshape(-1, in_features)
    l = ia3_l.reshape(size)
    y = ia3_input_linear_op(x2d, weight, bias, l) if feedforward else ia3_output_linear_op(x2d, weight, bias, l)[0]
    return y.reshape(*x.shape[:-1], out_features)


def miss_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], miss_block: Tensor, *, dropout_p: float = 0.0,
                dropout_stream: str = "philox") -> Tensor:
    """MiSS (modes "default" / "mini") as PEFT computes it, differentiable in x, bias and miss_block:
    y = x W^T + b + fold(x_d) D with D = ``miss_block`` (r, out) (a "mini" block tiled to (r, out)
    by the caller), fold(x) the sum of x's zero-padded length-r blocks.  1 <= r <= in_features."""
    out_features, in_features = _check_base(x, weight, bias)
    _validate.tensor("miss_block", miss_block, ndim=2)
    r = miss_block.shape[0]
    if not 1 <= r <= in_features or miss_block.shape[1] != out_features:
        raise ValueError(f"miss_block has shape {tuple(miss_block.shape)}; expected (r, out_features={out_features}) "
                         f"with r in 1..in_features={in_features}")
    adapter_dtype = adapter_compute_dtype("x", x, (("miss_block", miss_block),))
    p = _check_dropout(dropout_p, dropout_stream)
    x2d = x.reshape(-1, in_features)
    width = in_features + (-in_features) % r      # PEFT pads x to a multiple of r, then drops
    seeds, bits = _mask_inputs(x2d.new_empty(()).expand(x2d.shape[0], width), [p], dropout_stream, adapter_dtype)
    y = miss_linear_op(x2d, weight, bias, miss_block, p, seeds[0] if seeds else None, bits[0] if bits else None)
    return y.reshape(*x.shape[:-1], out_features)


def shira_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], shira_weight: Tensor, shira_indices: Tensor,
                 scaling: float = 1.0, *, check: bool = True) -> Tensor:
    """SHiRA as PEFT computes it, differentiable in x, bias and shira_weight:
    y = x (W + s sparse(shira_weight at shira_indices))^T + b.  ``shira_indices``: (2, K) integer
    (row, column) positions; ``check``: verify they lie inside the weight (a host read: pass False
    for an index tensor already checked)."""
    out_features, in_features = _check_base(x, weight, bias)
    _validate.tensor("shira_weight", shira_weight, ndim=1)
    if check:
        check_indices(shira_indices, out_features, in_features)
    if shira_indices.shape[-1] != shira_weight.shape[0]:
        raise ValueError(f"shira_indices has {shira_indices.shape[-1]} positions but shira_weight has "
                         f"{shira_weight.shape[0]} values; pass one position per value")
    adapter_compute_dtype("x", x, (("shira_weight", shira_weight),))
    x2d = x.reshape(-1, in_features)
    y = shira_linear_op(x2d, weight, bias, shira_weight, float(scaling),
                        *shira_plan(shira_indices, out_features, in_features))
    return y.reshape(*x.shape[:-1], out_features)


def randlora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], randlora_A: Tensor, randlora_B: Tensor,
                    randlora_lambda: Tensor, randlora_gamma: Tensor, scaling: float, *, dropout_p: float = 0.0,
                    dropout_stream: str = "philox") -> Tensor:
    """RandLoRA as PEFT computes it, differentiable in x, bias, randlora_lambda and randlora_gamma.

    randlora_A (r, 1, d) and randlora_B (D, n, r): the shared frozen bases sliced to the layer
    (d = min(in, out), D = max(in, out), n = ceil(d / r)); lambda (r, n), gamma (n, d); scaling =
    randlora_alpha / r (see fastadapt.ops.lowrank_randlora for the product and PEFT's pairing)."""
    out_features, in_features = _check_base(x, weight, bias)
    d, big = min(in_features, out_features), max(in_features, out_features)
    _validate.tensor("randlora_lambda", randlora_lambda, ndim=2)
    r, n = randlora_lambda.shape
    _validate.tensor("randlora_A", randlora_A, shape=(r, 1, d))
    _validate.tensor("randlora_B", randlora_B, shape=(big, n, r))
    _validate.tensor("randlora_gamma", randlora_gamma, shape=(n, d))
    adapter_dtype = adapter_compute_dtype("x", x, (("randlora_A", randlora_A), ("randlora_B", randlora_B),
                                                   ("randlora_lambda", randlora_lambda),
                                                   ("randlora_gamma", randlora_gamma)))
    for name, t in (("randlora_A", randlora_A), ("randlora_B", randlora_B)):
        _check_frozen(name, t)
    p = _check_dropout(dropout_p, dropout_stream)
    x2d = x.reshape(-1, in_features)
    seeds, bits = _mask_inputs(x2d, [p], dropout_stream, adapter_dtype)
    y = randlora_linear_op(x2d, weight, bias, randlora_A, randlora_B, randlora_lambda, randlora_gamma, float(scaling),
                           in_features <= out_features, p, seeds[0] if seeds else None, bits[0] if bits else None)
    return y.reshape(*x.shape[:-1], out_features)


def svft_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], svft_u: Tensor, svft_vh: Tensor, svft_m: Tensor,
                svft_indices: Tensor) -> Tensor:
    """SVFT, differentiable in x, bias and svft_m: y = x W^T + b + (x V) (U M)^T with U = svft_u
    (out, r) and V^T = svft_vh (r, in) frozen, M (r, r) sparse: svft_m (K,) at svft_indices (2, K)."""
    out_features, in_features = _check_base(x, weight, bias)
    _validate.tensor("svft_vh", svft_vh, ndim=2)
    r = _validate.positive_int("r", svft_vh.shape[0])
    _validate.tensor("svft_vh", svft_vh, shape=(r, in_features))
    _validate.tensor("svft_u", svft_u, shape=(out_features, r))
    _validate.tensor("svft_m", svft_m, ndim=1)
    if svft_indices.shape != (2, svft_m.shape[0]) or svft_indices.is_floating_point():
        raise ValueError(f"svft_indices has shape {tuple(svft_indices.shape)}; expected integer (2, {svft_m.shape[0]})")
    for name, t in (("svft_u", svft_u), ("svft_vh", svft_vh)):
        _check_frozen(name, t)
    adapter_dtype = adapter_compute_dtype("x", x, (("svft_u", svft_u), ("svft_vh", svft_vh), ("svft_m", svft_m)))
    x2d = x.reshape(-1, in_features)
    merged, keep_u = _lora_plan(x2d, weight, r, False, adapter_dtype)
    rows, cols = svft_indices.to(torch.int64)
    y = svft_linear_op(x2d, weight, bias, svft_vh, svft_u, svft_m, rows, cols, merged, keep_u)[0]
    return y.reshape(*x.shape[:-1], out_features)
