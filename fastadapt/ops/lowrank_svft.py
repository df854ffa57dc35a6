"""SVFT's fused linear op (not in PEFT; fastadapt.layers.lowrank.SVFTLinear), on 2-D x (N, in).

With the frozen top-r singular vectors of W, U = ``svft_u`` (out, r) and V^T = ``svft_vh`` (r, in),
and the trainable sparse r x r matrix M (``svft_m`` (K,) at the positions (p_k, q_k))::

    z  = x V (N, r),   y = x W^T + b + (z M^T) U^T  =  x W^T + b + (x V) (U M)^T

which is LoRA's branch with A = V^T and B = U M (s = 1): ``fastadapt::svft_linear`` runs LoRA's bodies
(fastadapt.ops.lowrank_lora: one GEMM with W and the low-rank term in its accumulator, or the merged
weight where it costs less) with B = U M formed inside the op (out x r, never saved).  Backward:
LoRA's dx and dB = dY^T z, then dM = U^T dB (r x r) and dm_k = dM[p_k, q_k]; V^T and U are frozen.
Saved: x (and z where it costs at most 1/32 of bytes(x)).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..testing import randn
from ._policy import acc_dtype
from ._registry import fused_op
from .lowrank_lora import TORCH, _backward, _forward, _triton, _triton_serves


def _coefficients(svft_m: Tensor, rows: Tensor, cols: Tensor, r: int) -> Tensor:
    """M (r, r): svft_m at (rows, cols), repeated positions added."""
    return svft_m.new_zeros(r, r).index_put((rows, cols), svft_m, accumulate=True)


def _b(svft_u: Tensor, svft_m: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    return svft_u @ _coefficients(svft_m, rows, cols, svft_u.shape[1]).to(svft_u.dtype)


@fused_op("svft_linear")
def svft_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], svft_vh: Tensor, svft_u: Tensor, svft_m: Tensor,
                   rows: Tensor, cols: Tensor, merged: bool, keep_u: bool) -> list[Tensor]:
    """[y, z] of SVFT (module docstring)."""
    return _forward(TORCH, x, weight, bias, svft_vh, _b(svft_u, svft_m, rows, cols), 1.0, [svft_vh.shape[0]], [0.0],
                    [], [], merged, keep_u)


@svft_linear_op.impl("triton")
def _(x, weight, bias, svft_vh, svft_u, svft_m, rows, cols, merged, keep_u):
    return _forward(_triton() if _triton_serves(x) else TORCH, x, weight, bias, svft_vh, _b(svft_u, svft_m, rows, cols),
                    1.0, [svft_vh.shape[0]], [0.0], [], [], merged, keep_u)


@svft_linear_op.fake
def _(x, weight, bias, svft_vh, svft_u, svft_m, rows, cols, merged, keep_u):
    acc = torch.promote_types(acc_dtype(x.dtype), acc_dtype(svft_vh.dtype))
    return [x.new_empty(x.shape[0], weight.shape[0]),
            x.new_empty(x.shape[0] if keep_u and not merged else 0, svft_vh.shape[0], dtype=acc)]


def _backward_body(k, dy, x, weight, svft_vh, svft_u, svft_m, rows, cols, z, merged, needs):
    r = svft_vh.shape[0]
    dx, d_bias, _, d_b = _backward(k, dy, x, weight, svft_vh, _b(svft_u, svft_m, rows, cols), z, 1.0, [r], [0.0], [],
                                   [], merged, [needs[0], needs[1], False, needs[2]])
    d_m = dy.new_empty(0)
    if needs[2]:
        d_m = (svft_u.to(d_b.dtype).T @ d_b)[rows, cols].to(svft_m.dtype)
    return [dx, d_bias, d_m]


@fused_op("svft_linear_backward", autocast=False)
def svft_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, svft_vh: Tensor, svft_u: Tensor, svft_m: Tensor,
                            rows: Tensor, cols: Tensor, z: Tensor, merged: bool, needs: list[bool]) -> list[Tensor]:
    """[dx, db, dm] of ``svft_linear`` (``needs``: which; the others are empty)."""
    return _backward_body(TORCH, dy, x, weight, svft_vh, svft_u, svft_m, rows, cols, z, merged, needs)


@svft_linear_backward_op.impl("triton")
def _(dy, x, *args):
    return _backward_body(_triton() if _triton_serves(x) else TORCH, dy, x, *args)


@svft_linear_backward_op.fake
def _(dy, x, weight, svft_vh, svft_u, svft_m, rows, cols, z, merged, needs):
    shapes = [(x, x.shape), (z, dy.shape[1:]), (svft_m, svft_m.shape)]
    return [like.new_empty(shape) if need else dy.new_empty(0) for (like, shape), need in zip(shapes, needs)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, svft_vh, svft_u, svft_m, rows, cols, merged, keep_u = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, svft_vh, svft_u, svft_m, rows, cols, output[1])
    ctx.merged, ctx.bias_dtype = merged, None if bias is None else bias.dtype


def _backward_entry(ctx, grads):
    n = ctx.needs_input_grad
    needs = [n[0], n[2], n[5]]
    if grads[0] is None or not any(needs):
        return (None,) * 10
    x, weight, svft_vh, svft_u, svft_m, rows, cols, z = ctx.saved_tensors
    dx, d_bias, d_m = svft_linear_backward_op(grads[0], x, weight, svft_vh, svft_u, svft_m, rows, cols, z, ctx.merged,
                                              needs)
    return (dx if needs[0] else None, None, d_bias.to(ctx.bias_dtype) if needs[1] else None, None, None,
            d_m if needs[2] else None, None, None, None, None)


svft_linear_op.autograd(_backward_entry, _setup_context)


def _examples():
    for i, (dtype, adapter_dtype, merged) in enumerate([(torch.float64, torch.float64, True),
                                                        (torch.float32, torch.float32, False),
                                                        (torch.bfloat16, torch.float32, False)]):
        x = randn(5, 7, dtype=dtype, requires_grad=True, seed=10 * i)
        weight = randn(6, 7, dtype=dtype, scale=0.4, seed=10 * i + 1)
        bias = randn(6, dtype=dtype, requires_grad=True, seed=10 * i + 2)
        vh, u = randn(4, 7, dtype=adapter_dtype, seed=10 * i + 3), randn(6, 4, dtype=adapter_dtype, seed=10 * i + 4)
        rows, cols = torch.tensor([0, 1, 1, 2, 3, 3]), torch.tensor([0, 0, 1, 2, 2, 3])
        m = randn(6, dtype=adapter_dtype, requires_grad=True, seed=10 * i + 5)
        yield (x, weight, bias, vh, u, m, rows, cols, merged, i != 1), {}


def _backward_examples():
    for args, _ in _examples():
        with torch.no_grad():
            _, z = svft_linear_op(*args)
        x, weight, bias, vh, u, m, rows, cols, merged, keep_u = args
        dy = randn(x.shape[0], weight.shape[0], dtype=x.dtype, seed=91)
        yield (dy, x.detach(), weight, vh, u, m.detach(), rows, cols, z, merged, [True, True, True]), {}


svft_linear_op.example(_examples)
svft_linear_backward_op.example(_backward_examples)
