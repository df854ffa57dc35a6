"""(IA)^3's fused linear ops (PEFT's ``ia3.Linear``), on 2-D x (N, in); l the product of the active
adapters' ``ia3_l`` vectors (flattened).

``fastadapt::ia3_output_linear`` (attention projections, l (out,)) returns [y, pre]::

    pre  = x W^T,            y = (pre + b) o l
    dx   = (dY o l) W,       dl = colsum(dY o pre) + b o colsum(dY),      db = colsum(dY) o l

Saved: pre (N, out), the only activation dl needs (x is not: dx needs only dY, l and W): out / in
of bytes(x).  float32 / float64 fold l into W for dx on the CPU (an out x in pass instead of an
N x out one); the Triton path scales in the shared fused GEMM: l and b o l in the epilogue (y and pre
from one pass), dY's tiles by l as they are loaded for dx.

``fastadapt::ia3_input_linear`` (feed-forward layers, l (in,))::

    y    = (x o l) W^T + b   =   x (W diag(l))^T + b
    g    = dY W,   dx = g o l,   dl = colsum(x o g),   db = colsum(dY)

Saved: x (PEFT keeps x and x o l).  On the CPU float32 / float64 multiply W's columns by l (an
out x in pass) instead of x's (N x in); a half base rounds x o l to its dtype before the GEMM, as
PEFT's ``(x * l).to(x.dtype)``.  The Triton path scales x's tiles by l as the shared fused GEMM loads
them (rounded to x's dtype there), and backward gets g and dx = l o g from one pass (y_pre = g).

Precision: PEFT's float32 l on a half base: base = fl_h(x W^T + b), y = fl_h(base l) (output), and
the products with l in float32, rounded where PEFT's ``.to`` rounds them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..testing import randn
from . import _lowrank_gemm as gemm
from ._policy import HALF_DTYPES, acc_dtype
from ._registry import fused_op


def _acc(x: Tensor, l: Tensor) -> torch.dtype:
    return torch.promote_types(acc_dtype(x.dtype), l.dtype)


# ----------------------------------------------------------------------------------------------
# fastadapt::ia3_output_linear

def _no_lowrank(x: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Rank-1 zero factors for the shared fused GEMM, which always adds a low-rank term."""
    return x.new_zeros(x.shape[0], 1, dtype=torch.float32), x.new_zeros(1, n, dtype=torch.float32)


def _triton_serves(x: Tensor) -> bool:
    return x.dtype != torch.float64 and x.shape[0] > 0


@fused_op("ia3_output_linear")
def ia3_output_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], l: Tensor) -> list[Tensor]:
    """[y, pre] for y = (x W^T + b) o l, pre = x W^T (module docstring)."""
    pre = x @ weight.T
    acc = _acc(x, l)
    scaled = pre.to(acc) * l if bias is None else (pre.to(acc) + bias).mul_(l)   # pre is saved: never in place
    return [scaled.to(x.dtype), pre]


@ia3_output_linear_op.impl("triton")
def _(x, weight, bias, l):
    if not _triton_serves(x):
        return ia3_output_linear_op.implementations["torch"](x, weight, bias, l)
    u, v = _no_lowrank(x, weight.shape[0])
    scaled_bias = None if bias is None else (bias.to(l.dtype) * l)
    y, pre = gemm.triton().lowrank_gemm(x, weight.T, u, v, out_scale=l, bias=scaled_bias, with_pre=True,
                                        round_base=True)
    return [y, pre]


@ia3_output_linear_op.fake
def _(x, weight, bias, l):
    return [x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], weight.shape[0])]


def _output_backward_body(k: gemm.Kernels, dy, pre, weight, bias, l, needs):
    acc = _acc(dy, l)
    dx, d_bias, d_l = (dy.new_empty(0) for _ in range(3))
    if needs[0] and k is gemm.TORCH and dy.dtype not in HALF_DTYPES:
        dx = dy @ (weight * l[:, None].to(weight.dtype))                  # dY (l o W): an out x in pass
    elif needs[0] and k is gemm.TORCH:
        dx = (dy.to(acc) * l).to(dy.dtype) @ weight                        # PEFT's d(base), in base's dtype
    elif needs[0]:
        dx = k.lowrank_gemm(dy, weight, *_no_lowrank(dy, weight.shape[1]), k_scale=l, round_base=True)
    dy_sum = dy.sum(dim=0, dtype=acc) if needs[1] or (needs[2] and bias is not None) else None
    if needs[1]:   # colsum(dY o l) = colsum(dY) o l
        d_bias = dy_sum * l
    if needs[2]:   # colsum(dY o (x W^T + b))
        d_l = torch.linalg.vecdot(dy.to(acc), pre.to(acc), dim=0)
        d_l = (d_l if bias is None else d_l + dy_sum * bias.to(acc)).to(l.dtype)
    return [dx, d_bias, d_l]


@fused_op("ia3_output_linear_backward", autocast=False)
def ia3_output_linear_backward_op(dy: Tensor, pre: Tensor, weight: Tensor, bias: Optional[Tensor], l: Tensor,
                                  needs: list[bool]) -> list[Tensor]:
    """[dx, db, dl] of ``ia3_output_linear`` (``needs``: which; the others are empty)."""
    return _output_backward_body(gemm.TORCH, dy, pre, weight, bias, l, needs)


@ia3_output_linear_backward_op.impl("triton")
def _(dy, pre, weight, bias, l, needs):
    return _output_backward_body(gemm.triton() if _triton_serves(dy) else gemm.TORCH, dy, pre, weight, bias, l, needs)


@ia3_output_linear_backward_op.fake
def _(dy, pre, weight, bias, l, needs):
    acc = _acc(dy, l)
    shapes = [(dy.dtype, (dy.shape[0], weight.shape[1])), (acc, dy.shape[1:]), (l.dtype, l.shape)]
    return [dy.new_empty(shape, dtype=dtype) if need else dy.new_empty(0) for (dtype, shape), need in zip(shapes, needs)]


def _output_setup(ctx, inputs, output):
    x, weight, bias, l = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1], weight, bias, l)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _output_backward(ctx, grads):
    n = ctx.needs_input_grad
    needs = [n[0], n[2], n[3]]
    if grads[0] is None or not any(needs):
        return None, None, None, None
    pre, weight, bias, l = ctx.saved_tensors
    dx, d_bias, d_l = ia3_output_linear_backward_op(grads[0], pre, weight, bias, l, needs)
    return (dx if needs[0] else None, None, d_bias.to(ctx.bias_dtype) if needs[1] else None,
            d_l if needs[2] else None)


ia3_output_linear_op.autograd(_output_backward, _output_setup)


# ----------------------------------------------------------------------------------------------
# fastadapt::ia3_input_linear

def _scaled_columns(x: Tensor, weight: Tensor, l: Tensor) -> tuple[Tensor, Tensor]:
    """(x', W') with x' W'^T = (x o l) W^T: W's columns scaled (float32 / float64), or x o l rounded
    to x's dtype (a half base, PEFT's rounding)."""
    if x.dtype in HALF_DTYPES:
        return x.to(_acc(x, l)).mul_(l).to(x.dtype), weight       # x's float32 copy scaled in place
    return x, weight * l.to(weight.dtype)


@fused_op("ia3_input_linear")
def ia3_input_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], l: Tensor) -> Tensor:
    """y = (x o l) W^T + b (module docstring)."""
    return F.linear(*_scaled_columns(x, weight, l), bias)


@ia3_input_linear_op.impl("triton")
def _(x, weight, bias, l):
    if not _triton_serves(x):
        return ia3_input_linear_op.implementations["torch"](x, weight, bias, l)
    # l scales x's tiles as the GEMM loads them, rounded to x's dtype there (PEFT's (x * l).to(x.dtype))
    return gemm.triton().lowrank_gemm(x, weight.T, *_no_lowrank(x, weight.shape[0]), k_scale=l, bias=bias,
                                      round_base=True, bias_in_base=True)


@ia3_input_linear_op.fake
def _(x, weight, bias, l):
    return x.new_empty(x.shape[0], weight.shape[0])


# Rows per chunk of dl's column dots on a half x: x's float32 rows converted a chunk at a time stay
# in cache (no float32 copy of the whole x).
COLUMN_DOT_ROWS = 256


def _column_dots(g: Tensor, x: Tensor, acc: torch.dtype) -> Tensor:
    """colsum(g o x) (in,) in ``acc`` for g already in ``acc``, x converted a chunk of rows at a time."""
    if x.dtype == acc:
        return torch.linalg.vecdot(g, x, dim=0)
    total = torch.zeros(x.shape[1], dtype=acc, device=x.device)
    for start in range(0, x.shape[0], COLUMN_DOT_ROWS):
        stop = start + COLUMN_DOT_ROWS
        total.add_(torch.linalg.vecdot(g[start:stop], x[start:stop].to(acc), dim=0))
    return total


def _input_backward_body(k: gemm.Kernels, dy, x, weight, l, needs):
    acc = _acc(x, l)
    dx, d_bias, d_l = (dy.new_empty(0) for _ in range(3))
    if (needs[0] or needs[2]) and k is gemm.TORCH:
        g = (dy @ weight).to(acc)                                          # d(x o l), rounded as PEFT's GEMM
        if needs[2]:
            d_l = _column_dots(g, x, acc).to(l.dtype)
        if needs[0]:   # l o g in g's own buffer (a fresh product, read by dl above): no N x in temporary
            dx = g.mul_(l).to(x.dtype)
    elif needs[0] or needs[2]:   # dx = l o g and g = dY W from one GEMM pass (y_pre: g)
        dx, g = k.lowrank_gemm(dy, weight, *_no_lowrank(dy, weight.shape[1]), out_scale=l, with_pre=True,
                               round_base=True)
        if needs[2]:
            d_l = torch.linalg.vecdot(g.to(acc), x.to(acc), dim=0).to(l.dtype)
    if needs[1]:
        d_bias = dy.sum(dim=0, dtype=acc_dtype(dy.dtype))
    return [dx, d_bias, d_l]


@fused_op("ia3_input_linear_backward", autocast=False)
def ia3_input_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, l: Tensor,
                                 needs: list[bool]) -> list[Tensor]:
    """[dx, db, dl] of ``ia3_input_linear`` (``needs``: which; the others are empty)."""
    return _input_backward_body(gemm.TORCH, dy, x, weight, l, needs)


@ia3_input_linear_backward_op.impl("triton")
def _(dy, x, weight, l, needs):
    return _input_backward_body(gemm.triton() if _triton_serves(x) else gemm.TORCH, dy, x, weight, l, needs)


@ia3_input_linear_backward_op.fake
def _(dy, x, weight, l, needs):
    shapes = [(x.dtype, x.shape), (acc_dtype(dy.dtype), dy.shape[1:]), (l.dtype, l.shape)]
    return [dy.new_empty(shape, dtype=dtype) if need else dy.new_empty(0) for (dtype, shape), need in zip(shapes, needs)]


def _input_setup(ctx, inputs, output):
    x, weight, bias, l = inputs
    ctx.save_for_backward(x, weight, l)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _input_backward(ctx, dy):
    n = ctx.needs_input_grad
    needs = [n[0], n[2], n[3]]
    if not any(needs):
        return None, None, None, None
    x, weight, l = ctx.saved_tensors
    dx, d_bias, d_l = ia3_input_linear_backward_op(dy, x, weight, l, needs)
    return (dx if needs[0] else None, None, d_bias.to(ctx.bias_dtype) if needs[1] else None,
            d_l if needs[2] else None)


ia3_input_linear_op.autograd(_input_backward, _input_setup)


# ----------------------------------------------------------------------------------------------
# opcheck examples: float64, float32 with strided x, PEFT's float32 l on a bfloat16 base

def _examples():
    for i, (dtype, l_dtype, with_bias) in enumerate([(torch.float64, torch.float64, True),
                                                     (torch.float32, torch.float32, False),
                                                     (torch.bfloat16, torch.float32, True)]):
        x = randn(5, 7, dtype=dtype, requires_grad=True, seed=10 * i)
        if i == 1:
            x = x.detach().T.contiguous().T.requires_grad_()
        weight = randn(6, 7, dtype=dtype, scale=0.4, seed=10 * i + 1)
        bias = randn(6, dtype=dtype, requires_grad=True, seed=10 * i + 2) if with_bias else None
        yield x, weight, bias, l_dtype, i


def _output_examples():
    for x, weight, bias, l_dtype, i in _examples():
        yield (x, weight, bias, randn(6, dtype=l_dtype, requires_grad=True, seed=10 * i + 3)), {}


def _input_examples():
    for x, weight, bias, l_dtype, i in _examples():
        yield (x, weight, bias, randn(7, dtype=l_dtype, requires_grad=True, seed=10 * i + 4)), {}


def _output_backward_examples():
    for (x, weight, bias, l), _ in _output_examples():
        with torch.no_grad():
            _, pre = ia3_output_linear_op(x, weight, bias, l)
        dy = randn(*pre.shape, dtype=pre.dtype, seed=95)
        b = None if bias is None else bias.detach()
        yield (dy, pre, weight, b, l.detach(), [True, bias is not None, True]), {}


def _input_backward_examples():
    for (x, weight, bias, l), _ in _input_examples():
        dy = randn(x.shape[0], weight.shape[0], dtype=x.dtype, seed=96)
        yield (dy, x.detach(), weight, l.detach(), [True, bias is not None, True]), {}
        yield (dy, x.detach(), weight, l.detach(), [False, False, True]), {}


ia3_output_linear_op.example(_output_examples)
ia3_input_linear_op.example(_input_examples)
ia3_output_linear_backward_op.example(_output_backward_examples)
ia3_input_linear_backward_op.example(_input_backward_examples)
