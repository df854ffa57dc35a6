"""LoRA's fused linear op (PEFT's ``lora.Linear`` without a variant), on 2-D x (N, in), for one
adapter or several active adapters as one concatenated-rank branch.

Notation: W (out, in) frozen, A (R, in) and B (out, R) the adapters' factors concatenated along
the rank (adapter i owns rank columns [o_i, o_i + r_i), ``ranks`` = [r_1, r_2, ...]), s the
scaling applied to all of B (several adapters arrive with their own scalings folded into B), and
one dropout mask per rank segment: segment i has probability ``ps[i]`` (0: no dropout) and
x_i = mask_i o x (x_i = x where p_i = 0).  ``fastadapt::lora_linear`` returns [y, u]::

    u[:, seg_i] = x_i A_i^T                                (N, R), the accumulation dtype
    y           = x W^T + b + s u B^T

one GEMM with W whose accumulator starts from (or receives) the low-rank term, so neither the
scaling nor the adapter's sum costs a pass over (N, out).  Its backward op
``fastadapt::lora_linear_backward``, with dY (N, out) and t = s dY B (N, R)::

    dx      = dY W + sum_i mask_i o (t_i A_i)              (unmasked segments: one GEMM, t A as
                                                            its accumulator's start)
    dA_i    = t_i^T x_i                                    (R, in); x_i regenerated from the seed
    dB      = s dY^T u                                     (out, R)
    db      = colsum(dY)

Saved (besides parameters and buffers): x and u, (1 + R / in) bytes(x) for float32 x (u is
float32 on a half x: 1 + 2 R / in); with dropout the Philox seed of each masked segment (an int64
CPU scalar: the mask is regenerated for dA and dx, x_i never stored) or nn.Dropout's bits (1 bit
per element).  u is an output the backward reads, never written in place.

Precision (PEFT's dtype policy, fastadapt.ops._policy).  float32 / float64 run in their own dtype.
A float16 / bfloat16 base (x, W, b) keeps u and t in float32 whatever the adapter's dtype; the
GEMMs with W run in the half dtype and are rounded where PEFT's half GEMM rounds them (the bias
inside, as F.linear(x, W, b)), the low-rank term joins in float32 and the output is rounded once::

    y  = fl_h(fl32(fl_h(x W^T + b)) + s u B^T)              PEFT: the same, with fl32(u B^T) s
    dx = fl_h(fl32(fl_h(dY W)) + t A)                       PEFT: fl_h(fl_h(dY W) + fl_h(t A))

With a half adapter (``autocast_adapter_dtype=False``) the low-rank operands of the output GEMM
are rounded to the half dtype first (u, s B), where PEFT's half lora_A / lora_B round them, so
the GPU runs that term on tensor cores.  The mask is drawn on x cast to the adapter dtype, as
PEFT's dropout sees it.  The body is written once against the GEMM kernel sets of
fastadapt.ops._lowrank_gemm (torch: BLAS; triton: the fused GEMM with the low-rank term and the
bias in its epilogue, float32 products of half tiles with the Philox mask applied in-kernel) and,
for a masked dx, fastadapt.triton_kernels.lowrank's GEMM with a masked low-rank epilogue.

The backward's "cpp" backend (CPU) forms the thin products t, t A, t^T x and u^T dY in
csrc/lora.cpp, one parallel pass over 128-row chunks (AVX-512 kernels, the ranks across a
register's lanes; dY and x read once per chunk while they sit in L2; the partial dA, dB summed in a
fixed chunk order, so the bits do not depend on the thread count), then dx = (t A) + dY W by one
addmm_ into that buffer, as the torch body.  It takes float32 / float64 with rank >= 2, no dropout,
not merged, on an AVX-512 CPU; the rest runs the torch body.  Saved tensors are the same.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ..testing import randn
from . import _lowrank_gemm as gemm
from ._dropout_mask import DropoutMask
from .dropout import draw_dropout
from ._policy import HALF_DTYPES, acc_dtype
from ._registry import fused_op


def _torch_masked_dx(dy, weight, t, a, mask: DropoutMask):
    """dY W + mask o (t A) (dx of a masked segment alone): the base GEMM, then the masked add."""
    return mask.add_(dy @ weight, t @ a)


def _triton_masked_dx(dy, weight, t, a, mask: DropoutMask):
    if dy.dtype == torch.float64 or mask.philox_seed is None:   # tl.dot has no float64; nn.Dropout's bits: torch
        return _torch_masked_dx(dy, weight, t, a, mask)
    from ..triton_kernels import lowrank as kernels
    return kernels.masked_lowrank_gemm(dy, weight, t, a.to(t.dtype), mask.philox_seed, mask.p)


class LoraKernels(NamedTuple):
    """One backend's primitives for LoRA: the shared GEMM set and dY W + mask o (t A)."""

    gemm: gemm.Kernels
    masked_dx: Callable


TORCH = LoraKernels(gemm.TORCH, _torch_masked_dx)


@functools.lru_cache(maxsize=None)
def _triton() -> LoraKernels:
    return LoraKernels(gemm.triton(), _triton_masked_dx)


# ----------------------------------------------------------------------------------------------
# Segments and masks

def _segments(ranks, ps, seeds, bits, dtype) -> list[tuple[int, int, Optional[DropoutMask]]]:
    """(first rank column, end, mask or None) per rank segment; the masks in segment order take
    the seeds (Philox) or the bits (nn.Dropout's) in order."""
    stream = iter(seeds) if seeds else iter(bits)
    found, start = [], 0
    for r, p in zip(ranks, ps):
        mask = None
        if p > 0:
            token = next(stream)
            mask = DropoutMask(p, token, None, dtype) if seeds else DropoutMask(p, None, token, dtype)
        found.append((start, start + r, mask))
        start += r
    return found


def _lowrank_operands(x: Tensor, u: Tensor, b_scaled: Tensor) -> tuple[Tensor, Tensor]:
    """(u, (s B)^T) as the output GEMM takes them: in x's dtype for a half adapter on its own half
    base (PEFT rounds u there), else in the accumulation dtype."""
    if x.dtype in HALF_DTYPES and b_scaled.dtype == x.dtype:
        return u.to(x.dtype), b_scaled.T
    return u, b_scaled.to(u.dtype).T


# ----------------------------------------------------------------------------------------------
# Bodies (k: the kernel set)

def _merged_weight(weight, lora_A, lora_B, scaling) -> Tensor:
    """W + s B A (out, in) in W's dtype (float32 / float64 only: the merged mode's dtypes)."""
    return torch.addmm(weight, lora_B.to(weight.dtype), lora_A.to(weight.dtype), alpha=scaling)


def _lowrank_input(k: LoraKernels, x, lora_A, segments) -> Tensor:
    """u = [x_i A_i^T] (N, R) in the accumulation dtype, each segment's mask applied to x."""
    if all(mask is None for *_, mask in segments):
        return k.gemm.acc_matmul(x, lora_A.T)
    return torch.cat([k.gemm.acc_matmul(x, lora_A[s:e].T, mask_a=mask) for s, e, mask in segments], dim=1)


def _forward(k: LoraKernels, x, weight, bias, lora_A, lora_B, scaling, ranks, ps, seeds, bits, merged, keep_u):
    acc = torch.promote_types(acc_dtype(x.dtype), acc_dtype(lora_A.dtype))
    if merged:
        y = torch.nn.functional.linear(x, _merged_weight(weight, lora_A, lora_B, scaling), bias)
        return [y, x.new_empty(0, lora_A.shape[0], dtype=acc)]
    u = _lowrank_input(k, x, lora_A, _segments(ranks, ps, seeds, bits, lora_A.dtype))
    u_op, v = _lowrank_operands(x, u, lora_B * scaling)
    y = k.gemm.lowrank_gemm(x, weight.T, u_op, v, bias=bias, round_base=True, bias_in_base=True)
    return [y, u if keep_u else u.new_empty(0, u.shape[1])]


def _input_grad(k: LoraKernels, dy, weight, t, a, segments) -> Tensor:
    """dx = dY W + sum_i mask_i o (t_i A_i) (unmasked segments: t A as the base GEMM's accumulator start)."""
    plain = [(s, e) for s, e, mask in segments if mask is None]
    masked = [(s, e, mask) for s, e, mask in segments if mask is not None]
    if not masked:
        return k.gemm.lowrank_gemm(dy, weight, t, a, round_base=True)
    if len(masked) == 1 and not plain:
        return k.masked_dx(dy, weight, t, a, masked[0][2])
    # several masks: the base GEMM (with the unmasked segments), then one masked add each
    cols = torch.cat([torch.arange(s, e, device=t.device) for s, e in plain]) if plain else None
    dx = (dy @ weight if cols is None else
          k.gemm.lowrank_gemm(dy, weight, t[:, cols], a[cols], round_base=True, out_dtype=t.dtype))
    for s, e, mask in masked:
        dx = mask.add_(dx, t[:, s:e] @ a[s:e])
    return dx.to(dy.dtype)


def _backward(k: LoraKernels, dy, x, weight, lora_A, lora_B, u, scaling, ranks, ps, seeds, bits, merged, needs):
    segments = _segments(ranks, ps, seeds, bits, lora_A.dtype)
    acc = u.dtype
    dx, d_bias, d_a, d_b = (dy.new_empty(0) for _ in range(4))   # distinct tensors: outputs may not alias
    wants_t = needs[2] or (needs[0] and not merged)
    dy_acc = k.gemm.acc_operand(dy) if wants_t or needs[3] else dy      # read by t and dB
    t = k.gemm.acc_matmul(dy_acc, lora_B) if wants_t else None        # s dY B
    if t is not None and scaling != 1.0:
        t.mul_(scaling)
    if needs[0] and merged:
        dx = dy @ _merged_weight(weight, lora_A, lora_B, scaling)
    elif needs[0]:
        dx = _input_grad(k, dy, weight, t, lora_A.to(acc), segments)
    if needs[2]:
        d_a = torch.cat([k.gemm.acc_matmul(t[:, s:e].T, x, mask_b=mask) for s, e, mask in segments]) \
            if len(segments) > 1 else k.gemm.acc_matmul(t.T, x, mask_b=segments[0][2])
        d_a = d_a.to(lora_A.dtype)
    if needs[3]:
        if u.shape[0] != dy.shape[0]:   # not kept: x_i A_i^T again, the masks regenerated
            u = _lowrank_input(k, x, lora_A, segments)
        d_b = k.gemm.acc_matmul(u.T, dy_acc).T   # u^T dY: BLAS's faster layout
        d_b = (d_b * scaling if scaling != 1.0 else d_b).to(lora_B.dtype).contiguous()
    if needs[1]:
        d_bias = dy.sum(dim=0, dtype=acc)
    return [dx, d_bias, d_a, d_b]


# ----------------------------------------------------------------------------------------------
# fastadapt::lora_linear

@fused_op("lora_linear")
def lora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                   scaling: float, ranks: list[int], ps: list[float], seeds: list[Tensor],
                   bits: list[Tensor], merged: bool, keep_u: bool) -> list[Tensor]:
    """[y, u] of LoRA (module docstring) for x (N, in); ``ranks`` / ``ps`` per rank segment, the
    masks of the segments with p > 0 from ``seeds`` (Philox) or ``bits`` (nn.Dropout's, drawn on x
    cast to the adapter dtype), in segment order.  ``merged``: y = x (W + s B A)^T + b (no masks,
    float32 / float64); u is then (0, R), as it is without ``keep_u`` (backward recomputes it)."""
    return _forward(TORCH, x, weight, bias, lora_A, lora_B, scaling, ranks, ps, seeds, bits, merged, keep_u)


def _triton_serves(x: Tensor) -> bool:
    """The Triton kernels take float32 / float16 / bfloat16 rows (tl.dot has no float64; no empty grid)."""
    return x.dtype != torch.float64 and x.shape[0] > 0


@lora_linear_op.impl("triton")
def _(x, *args):
    return _forward(_triton() if _triton_serves(x) else TORCH, x, *args)


@lora_linear_op.fake
def _(x, weight, bias, lora_A, lora_B, scaling, ranks, ps, seeds, bits, merged, keep_u):
    acc = torch.promote_types(acc_dtype(x.dtype), acc_dtype(lora_A.dtype))
    rows = x.shape[0] if keep_u and not merged else 0
    return [x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(rows, lora_A.shape[0], dtype=acc)]


@fused_op("lora_linear_backward", autocast=False)
def lora_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, u: Tensor,
                            scaling: float, ranks: list[int], ps: list[float], seeds: list[Tensor],
                            bits: list[Tensor], merged: bool, needs: list[bool]) -> list[Tensor]:
    """[dx, db, dA, dB] of ``lora_linear`` (``needs``: which of them; the others are empty)."""
    return _backward(TORCH, dy, x, weight, lora_A, lora_B, u, scaling, ranks, ps, seeds, bits, merged, needs)


@lora_linear_backward_op.impl("triton")
def _(dy, x, *args):
    return _backward(_triton() if _triton_serves(x) else TORCH, dy, x, *args)


# The thin products in C++ (csrc/lora.cpp): t, t A, t^T x and u^T dY in one parallel pass over
# _LORA_CHUNK_ROWS-row chunks, each chunk's dY and x panels read while they sit in L2.
_LORA_CHUNK_ROWS = 128


def _cpp_serves(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, u: Tensor, ps, merged: bool,
                needs) -> bool:
    """True when csrc/lora.cpp takes this backward (``gemm.thin_pass_takes``): no dropout, not
    merged, some thin product wanted."""
    return (not merged and not any(p > 0 for p in ps) and (needs[0] or needs[2] or needs[3])
            and gemm.thin_pass_takes(lora_A.shape[0], (dy, x), (weight, lora_A, lora_B, u)))


@lora_linear_backward_op.impl("cpp")
def _(dy, x, weight, lora_A, lora_B, u, scaling, ranks, ps, seeds, bits, merged, needs):
    if not _cpp_serves(dy, x, weight, lora_A, lora_B, u, ps, merged, needs):
        return _backward(TORCH, dy, x, weight, lora_A, lora_B, u, scaling, ranks, ps, seeds, bits, merged, needs)
    if needs[3] and u.shape[0] != dy.shape[0]:   # not kept: x A^T again
        u = x @ lora_A.T
    dx, d_a, d_b, _ = torch.ops.fastadapt_cpu.lora_backward_thin(dy, x, u, lora_B, lora_A, scaling, needs[0], needs[2],
                                                                  needs[3], _LORA_CHUNK_ROWS)
    if needs[0]:
        dx.addmm_(dy, weight)   # dY W onto t A (beta = 1), as the torch path's lowrank_gemm
    d_bias = dy.sum(dim=0) if needs[1] else dy.new_empty(0)
    return [dx, d_bias, d_a, d_b]


@lora_linear_backward_op.fake
def _(dy, x, weight, lora_A, lora_B, u, scaling, ranks, ps, seeds, bits, merged, needs):
    shapes = [(x, x.shape), (u, dy.shape[1:]), (lora_A, lora_A.shape), (lora_B, lora_B.shape)]
    return [like.new_empty(shape) if need else dy.new_empty(0) for (like, shape), need in zip(shapes, needs)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, ranks, ps, seeds, bits, merged, keep_u = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], *seeds, *bits)
    ctx.scaling, ctx.ranks, ctx.ps, ctx.merged = scaling, ranks, ps, merged
    ctx.num_seeds, ctx.num_bits, ctx.bias_dtype = len(seeds), len(bits), None if bias is None else bias.dtype


def _backward_entry(ctx, grads):
    n = ctx.needs_input_grad
    needs = [n[0], n[2], n[3], n[4]]     # x, bias, A, B
    no_grads = (None, None, None, [None] * ctx.num_seeds, [None] * ctx.num_bits, None, None)  # scaling .. keep_u
    if grads[0] is None or not any(needs):
        return (None,) * 5 + no_grads
    x, weight, lora_A, lora_B, u, *masks = ctx.saved_tensors
    seeds, bits = masks[:ctx.num_seeds], masks[ctx.num_seeds:]
    dx, d_bias, d_a, d_b = lora_linear_backward_op(grads[0], x, weight, lora_A, lora_B, u, ctx.scaling, ctx.ranks,
                                                   ctx.ps, seeds, bits, ctx.merged, needs)
    return (dx if needs[0] else None, None, d_bias.to(ctx.bias_dtype) if needs[1] else None,
            d_a if needs[2] else None, d_b if needs[3] else None, *no_grads)


lora_linear_op.autograd(_backward_entry, _setup_context)


# ----------------------------------------------------------------------------------------------
# opcheck examples: float64, float32 with strided x, a float32 adapter on a bfloat16 base; each
# without dropout, with Philox seeds and with nn.Dropout's bits; one and two rank segments.

def _examples():
    for i, (dtype, adapter_dtype, with_bias) in enumerate([(torch.float64, torch.float64, True),
                                                           (torch.float32, torch.float32, False),
                                                           (torch.bfloat16, torch.float32, True)]):
        s = 10 * i
        x = randn(5, 7, dtype=dtype, requires_grad=True, seed=s)
        if i == 1:
            x = x.detach().T.contiguous().T.requires_grad_()
        weight = randn(6, 7, dtype=dtype, scale=0.4, seed=s + 1)
        bias = randn(6, dtype=dtype, requires_grad=True, seed=s + 2) if with_bias else None
        lora_A = randn(5, 7, dtype=adapter_dtype, requires_grad=True, seed=s + 3)
        lora_B = randn(6, 5, dtype=adapter_dtype, requires_grad=True, seed=s + 4)
        args = (x, weight, bias, lora_A, lora_B, 1.5)
        yield (*args, [5], [0.0], [], [], False, True), {}
        yield (*args, [5], [0.0], [], [], dtype != torch.bfloat16, False), {}     # merged (float32 / float64)
        yield (*args, [3, 2], [0.25, 0.0], [torch.tensor(77 + i)], [], False, True), {}
        yield (*args, [3, 2], [0.25, 0.5], [torch.tensor(7 + i), torch.tensor(9)], [], False, False), {}
        torch.manual_seed(i)
        like = x.detach().to(adapter_dtype)
        yield (*args, [2, 3], [0.0, 0.25], [], [draw_dropout(like, 0.25)[1]], False, True), {}


def _backward_examples():
    for args, _ in _examples():
        with torch.no_grad():
            _, u = lora_linear_op(*args)
        x, weight, bias, lora_A, lora_B, scaling, ranks, ps, seeds, bits, merged, keep_u = args
        dy = randn(x.shape[0], weight.shape[0], dtype=x.dtype, seed=98)
        inputs = [t.detach() for t in (dy, x, weight, lora_A, lora_B, u)]
        yield (*inputs, scaling, ranks, ps, seeds, bits, merged, [True, bias is not None, True, True]), {}
        yield (*inputs, scaling, ranks, ps, seeds, bits, merged, [False, False, True, False]), {}


lora_linear_op.example(_examples)
lora_linear_backward_op.example(_backward_examples)


# ----------------------------------------------------------------------------------------------
# fastadapt::vera_linear: LoRA's bodies with B' = lambda_b o B o lambda_d formed inside the op
#
# VeRA's factors: A = vera_A sliced (r, in) and B = vera_B sliced (out, r) frozen, lambda_b (out,) and
# lambda_d (r,) trained.  From dB' = dY^T u (LoRA's dB with s = 1):
#     dlambda_b[o] = sum_k dB'[o, k] B[o, k] lambda_d[k],    dlambda_d[k] = sum_o dB'[o, k] B[o, k] lambda_b[o]
# A being frozen, LoRA's t = dY B' only serves dx, and no gradient reads x: the backward needs u
# (for dB') and, for dx, W (+ t A) or the merged W_eff = W + B' A.  So the op returns u and the
# merged weight for autograd to save in place of x when the caller asks (``keep_u``,
# ``keep_merged``: fastadapt.ops.lowrank.vera_linear decides); x is saved only where u is not
# (then u = x A^T is recomputed in backward, masks regenerated).  B' is built in forward and again
# in backward (parameter-sized, not saved); W_eff likewise unless it is kept.
#
# ``keep_h`` (a half base with float32 adapters, PEFT's default; CPU): PEFT's order and saved set.
# h = (lambda_d o u) B^T (N, out) in float32 is kept, y = fl_h(fl32(fl_h(x W^T + b)) + lambda_b o h),
# and with t0 = dY diag(lambda_b) B (N, r):
#     dlambda_b = colsum(dY o h),   dlambda_d = colsum(u o t0),   dx = dY W + (t0 diag(lambda_d)) A
# four float32 products over the tokens instead of five (no dY^T u), for an (N, out) float32 save.

def _vera_b(vera_B: Tensor, lambda_b: Tensor, lambda_d: Tensor) -> Tensor:
    return lambda_b[:, None] * vera_B * lambda_d[None, :]


def _vera_forward(k: LoraKernels, x, weight, bias, vera_A, vera_B, lambda_b, lambda_d, ranks, ps, seeds, bits, merged,
                  keep_u, keep_merged, keep_h):
    acc = torch.promote_types(acc_dtype(x.dtype), acc_dtype(vera_A.dtype))
    no_merged, no_h = weight.new_empty(0, 0), x.new_empty(0, weight.shape[0], dtype=acc)
    if keep_h:
        u = _lowrank_input(k, x, vera_A, _segments(ranks, ps, seeds, bits, vera_A.dtype))
        h = k.gemm.acc_matmul(u, (vera_B * lambda_d).T)
        y = torch.nn.functional.linear(x, weight, bias).to(acc).addcmul_(h, lambda_b.to(acc)).to(x.dtype)
        return [y, u, no_merged, h]
    b_scaled = _vera_b(vera_B, lambda_b, lambda_d)
    if not merged:
        return [*_forward(k, x, weight, bias, vera_A, b_scaled, 1.0, ranks, ps, seeds, bits, False, keep_u), no_merged,
                no_h]
    w_eff = _merged_weight(weight, vera_A, b_scaled, 1.0)
    y = torch.nn.functional.linear(x, w_eff, bias)
    u = k.gemm.acc_matmul(x, vera_A.T) if keep_u else x.new_empty(0, vera_A.shape[0])   # merged: float32 / float64
    return [y, u, w_eff if keep_merged else no_merged, no_h]


@fused_op("vera_linear")
def vera_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], vera_A: Tensor, vera_B: Tensor,
                   lambda_b: Tensor, lambda_d: Tensor, ranks: list[int], ps: list[float], seeds: list[Tensor],
                   bits: list[Tensor], merged: bool, keep_u: bool, keep_merged: bool, keep_h: bool) -> list[Tensor]:
    """[y, u, W_eff, h] of VeRA: LoRA's op with A = vera_A, B = lambda_b o vera_B o lambda_d, s = 1;
    u is (0, r) without ``keep_u`` (``keep_h`` keeps it), W_eff = W + B A (out, in) with ``merged``
    and ``keep_merged``, else (0, 0); h = (lambda_d o u) vera_B^T (N, out) with ``keep_h`` (a half
    x, float32 adapters, not merged), else (0, out)."""
    return _vera_forward(TORCH, x, weight, bias, vera_A, vera_B, lambda_b, lambda_d, ranks, ps, seeds, bits, merged,
                         keep_u, keep_merged, keep_h)


@vera_linear_op.impl("triton")
def _(x, *args):
    return _vera_forward(_triton() if _triton_serves(x) else TORCH, x, *args)


@vera_linear_op.fake
def _(x, weight, bias, vera_A, vera_B, lambda_b, lambda_d, ranks, ps, seeds, bits, merged, keep_u, keep_merged, keep_h):
    acc = torch.promote_types(acc_dtype(x.dtype), acc_dtype(vera_A.dtype))
    rows = x.shape[0] if keep_u or keep_h else 0
    merged_shape = weight.shape if merged and keep_merged else (0, 0)
    return [x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(rows, vera_A.shape[0], dtype=acc),
            weight.new_empty(merged_shape), x.new_empty(x.shape[0] if keep_h else 0, weight.shape[0], dtype=acc)]


def _vera_kept_h_backward(k: LoraKernels, dy, weight, vera_A, vera_B, lambda_b, lambda_d, u, h, segments, needs):
    """[dx, db, dlambda_b, dlambda_d] from the kept u and h (the ``keep_h`` formulas above)."""
    acc = u.dtype
    dx, d_bias, d_lambda_b, d_lambda_d = (dy.new_empty(0) for _ in range(4))
    dy_acc = k.gemm.acc_operand(dy)
    t = k.gemm.acc_matmul(dy_acc, lambda_b.to(acc)[:, None] * vera_B.to(acc))      # t0 = dY diag(lambda_b) B
    if needs[3]:
        d_lambda_d = (u * t).sum(dim=0).to(lambda_d.dtype)
    if needs[2]:   # dY o h in dY's float32 copy where it is one (a half dY)
        d_lambda_b = (dy_acc.mul_(h) if dy_acc is not dy else dy_acc * h).sum(dim=0).to(lambda_b.dtype)
    if needs[0]:
        dx = _input_grad(k, dy, weight, t.mul_(lambda_d.to(acc)), vera_A.to(acc), segments)
    if needs[1]:
        d_bias = dy.sum(dim=0, dtype=acc)
    return [dx, d_bias, d_lambda_b, d_lambda_d]


def _vera_backward_body(k: LoraKernels, dy, x, weight, vera_A, vera_B, lambda_b, lambda_d, u, merged_weight, h, ranks,
                        ps, seeds, bits, merged, needs):
    if h.shape[0] > 0:
        return _vera_kept_h_backward(k, dy, weight, vera_A, vera_B, lambda_b, lambda_d, u, h,
                                     _segments(ranks, ps, seeds, bits, vera_A.dtype), needs)
    b_scaled = _vera_b(vera_B, lambda_b, lambda_d)
    wants_b = needs[2] or needs[3]
    dx_by_kept = needs[0] and merged_weight.shape[0] > 0
    dx, d_bias, _, d_b = _backward(k, dy, x, weight, vera_A, b_scaled, u, 1.0, ranks, ps, seeds, bits, merged,
                                   [needs[0] and not dx_by_kept, needs[1], False, wants_b])
    if dx_by_kept:
        dx = dy @ merged_weight
    d_lambda_b, d_lambda_d = dy.new_empty(0), dy.new_empty(0)
    if wants_b:
        prod = d_b.to(u.dtype) * vera_B.to(u.dtype)
        if needs[2]:
            d_lambda_b = (prod @ lambda_d.to(u.dtype)).to(lambda_b.dtype)
        if needs[3]:
            d_lambda_d = (lambda_b.to(u.dtype) @ prod).to(lambda_d.dtype)
    return [dx, d_bias, d_lambda_b, d_lambda_d]


@fused_op("vera_linear_backward", autocast=False)
def vera_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, vera_A: Tensor, vera_B: Tensor, lambda_b: Tensor,
                            lambda_d: Tensor, u: Tensor, merged_weight: Tensor, h: Tensor, ranks: list[int],
                            ps: list[float], seeds: list[Tensor], bits: list[Tensor], merged: bool,
                            needs: list[bool]) -> list[Tensor]:
    """[dx, db, dlambda_b, dlambda_d] of ``vera_linear`` (``needs``: which; the others are empty).
    x may be empty (0, in) where u is given (N, r); ``merged_weight``: the forward's W_eff or (0, 0);
    ``h``: the forward's h or (0, out)."""
    return _vera_backward_body(TORCH, dy, x, weight, vera_A, vera_B, lambda_b, lambda_d, u, merged_weight, h, ranks,
                               ps, seeds, bits, merged, needs)


@vera_linear_backward_op.impl("triton")
def _(dy, *args):
    return _vera_backward_body(_triton() if _triton_serves(dy) else TORCH, dy, *args)


@vera_linear_backward_op.fake
def _(dy, x, weight, vera_A, vera_B, lambda_b, lambda_d, u, merged_weight, h, ranks, ps, seeds, bits, merged, needs):
    shapes = [(dy, (dy.shape[0], weight.shape[1])), (u, dy.shape[1:]), (lambda_b, lambda_b.shape),
              (lambda_d, lambda_d.shape)]
    return [like.new_empty(shape) if need else dy.new_empty(0) for (like, shape), need in zip(shapes, needs)]


def _vera_setup(ctx, inputs, output):
    x, weight, bias, vera_A, vera_B, lambda_b, lambda_d, ranks, ps, seeds, bits, merged, keep_u, keep_merged, keep_h \
        = inputs
    _, u, merged_weight, h = output
    ctx.mark_non_differentiable(u, merged_weight, h)
    ctx.set_materialize_grads(False)
    x_saved = x.new_empty(0, x.shape[1]) if keep_u or keep_h else x    # the backward reads x only to recompute u
    ctx.save_for_backward(x_saved, weight, vera_A, vera_B, lambda_b, lambda_d, u, merged_weight, h, *seeds, *bits)
    ctx.ranks, ctx.ps, ctx.merged = ranks, ps, merged
    ctx.num_seeds, ctx.num_bits, ctx.bias_dtype = len(seeds), len(bits), None if bias is None else bias.dtype


def _vera_backward_entry(ctx, grads):
    n = ctx.needs_input_grad
    needs = [n[0], n[2], n[5], n[6]]     # x, bias, lambda_b, lambda_d
    no_grads = ([None] * ctx.num_seeds, [None] * ctx.num_bits, None, None, None, None)
    if grads[0] is None or not any(needs):
        return (None,) * 9 + no_grads
    x, weight, vera_A, vera_B, lambda_b, lambda_d, u, merged_weight, h, *masks = ctx.saved_tensors
    seeds, bits = masks[:ctx.num_seeds], masks[ctx.num_seeds:]
    dx, d_bias, d_lb, d_ld = vera_linear_backward_op(grads[0], x, weight, vera_A, vera_B, lambda_b, lambda_d, u,
                                                     merged_weight, h, ctx.ranks, ctx.ps, seeds, bits, ctx.merged,
                                                     needs)
    return (dx if needs[0] else None, None, d_bias.to(ctx.bias_dtype) if needs[1] else None, None, None,
            d_lb if needs[2] else None, d_ld if needs[3] else None, None, None, *no_grads)


vera_linear_op.autograd(_vera_backward_entry, _vera_setup)


def _vera_examples():
    """LoRA's examples with VeRA's lambdas; a merged example keeps W_eff, and once u as well; the
    float32 adapter on a bfloat16 base keeps h as well."""
    for args, _ in _examples():
        x, weight, bias, lora_A, lora_B, scaling, ranks, ps, seeds, bits, merged, keep_u = args
        out, r = lora_B.shape
        lambda_b = randn(out, dtype=lora_A.dtype, requires_grad=True, seed=61)
        lambda_d = randn(r, dtype=lora_A.dtype, requires_grad=True, seed=62)
        head = (x, weight, bias, lora_A.detach(), lora_B.detach(), lambda_b, lambda_d, ranks, ps, seeds, bits, merged)
        yield (*head, keep_u, merged, False), {}
        if merged:
            yield (*head, True, False, False), {}
        if x.dtype == torch.bfloat16:
            yield (*head, True, False, True), {}


def _vera_backward_examples():
    for args, _ in _vera_examples():
        with torch.no_grad():
            _, u, merged_weight, h = vera_linear_op(*args)
        x, weight, bias, vera_A, vera_B, lambda_b, lambda_d, ranks, ps, seeds, bits, merged, keep_u, _, keep_h = args
        dy = randn(x.shape[0], weight.shape[0], dtype=x.dtype, seed=63)
        x_saved = x.new_empty(0, x.shape[1]) if keep_u or keep_h else x
        inputs = [t.detach() for t in (dy, x_saved, weight, vera_A, vera_B, lambda_b, lambda_d, u, merged_weight, h)]
        yield (*inputs, ranks, ps, seeds, bits, merged, [True, bias is not None, True, True]), {}


vera_linear_op.example(_vera_examples)
vera_linear_backward_op.example(_vera_backward_examples)
