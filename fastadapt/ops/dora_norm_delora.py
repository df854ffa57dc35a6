"""DeLoRA's fused linear op (PEFT's ``DeloraLinear``), on 2-D x (N, in).

Notation: W (out, in) frozen, w = delora_w_norm (in,) frozen, A (r, in), B (out, r), lambda (1,),
c_i = lambda / r / (||A_i|| ||B_:,i||) (norms clamped at 1e-4, as PEFT does), A_w = A o w[None, :]
(r, in), x_d = mask o x (PEFT's module_dropout; mask = 1 without dropout), u = x_d A_w^T (N, r)::

    y = x W^T + b + (u o c) B^T

x o w is never formed: (x o w) A^T = x (A o w)^T.  ``fastadapt::delora_linear`` returns [y, u];
its backward op ``fastadapt::delora_linear_backward``, with dY (N, out) and t = dY B (N, r)::

    dx  = dY W + mask o ((t o c) A_w)
    dc  = colsum(t o u)                                       (r,), summed over the N tokens
    dA  = ((t o c)^T x_d) o w  +  (-dc c / ||A_i||^2) A_i      (second term where ||A_i|| >= 1e-4)
    dB  = (u^T dY)^T o c       +  (-dc c / ||B_:,i||^2) B_:,i  (second term where ||B_:,i|| >= 1e-4)
    dlambda = sum_i dc_i / (r ||A_i|| ||B_:,i||)               (= sum_i dc_i c_i / lambda)

Saved (besides parameters and buffers): x and u, 1 + r/in times bytes(x) for float32 x (u is
float32 on a half x); with dropout the Philox seed (a CPU scalar: the mask is regenerated for x_d
and dx) or nn.Dropout's bits (1/32 of bytes(x) for float32).

Precision.  float32 / float64 run in their own dtype.  On a float16 / bfloat16 base the adapter
path is float32 whatever the adapter's dtype: u = fl32(x_d) A_w^T and t = fl32(dY) B are never
rounded to the half dtype, so dc, and with it dlambda (a sum over tokens and ranks with heavy
cancellation: its relative error is the rounding of its terms times the sum's condition number),
is as accurate as float32 inputs allow.  The base GEMMs run in the half dtype and are rounded where
PEFT's half GEMM rounds them (the bias inside, as F.linear(x, W, b)); the float32 low-rank term
joins and the output is rounded once:
    y  = fl_h(fl32(fl_h(x W^T + b)) + (u o c) B^T)
    dx = fl_h(fl32(fl_h(dY W)) + mask o ((t o c) A_w))
The mask is drawn on x's dtype, as PEFT's dropout(x).  The op's body is written once against the
GEMM kernel sets of fastadapt.ops._lowrank_gemm (torch: BLAS; triton: the fused GEMM with the
low-rank term and the bias in its epilogue, float32 products of half tiles converted on load with
the Philox mask applied in-kernel).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference.dora import DELORA_NORM_CLAMP
from ..testing import randn
from . import _lowrank_gemm as gemm
from ._lowrank_gemm import cast
from ._dropout_mask import DropoutMask
from ._policy import acc_dtype
from ._registry import fused_op


def delora_component_scale(lora_A: torch.Tensor, lora_B: torch.Tensor, delora_lambda: torch.Tensor):
    """(c, a_norm, b_norm, a_live, b_live): c_i = lambda / r / (max(||A_i||, 1e-4) max(||B_:,i||, 1e-4)),
    all (r,) in float32 (float64 for float64); ``*_live`` marks norms at or above the clamp (where
    the clamp passes gradient, as torch.clamp does)."""
    acc = acc_dtype(lora_A.dtype)
    r = lora_A.shape[0]
    a_norm = torch.linalg.vector_norm(lora_A.detach(), dim=1, dtype=acc)
    b_norm = torch.linalg.vector_norm(lora_B.detach(), dim=0, dtype=acc)
    a_live, b_live = a_norm >= DELORA_NORM_CLAMP, b_norm >= DELORA_NORM_CLAMP
    c = delora_lambda.detach().to(acc) / r / (a_norm.clamp_min(DELORA_NORM_CLAMP) * b_norm.clamp_min(DELORA_NORM_CLAMP))
    return c, a_norm, b_norm, a_live, b_live


def _mask(x, p, seed, bits) -> Optional[DropoutMask]:
    return None if p == 0 else DropoutMask(p, seed, bits, x.dtype)   # PEFT drops x itself


def _forward(k: gemm.Kernels, x, weight, bias, lora_A, lora_B, delora_lambda, w_norm, p, seed, bits):
    c, *_ = delora_component_scale(lora_A, lora_B, delora_lambda)
    a_w = cast(lora_A, c.dtype) * cast(w_norm, c.dtype)                     # A o w
    u = k.acc_matmul(x, a_w.T, mask_a=_mask(x, p, seed, bits))          # x_d A_w^T
    y = k.lowrank_gemm(x, weight.T, u, (cast(lora_B, c.dtype) * c).T, bias=bias, round_base=True, bias_in_base=True)
    return [y, u]


def _backward(k: gemm.Kernels, dy, x, weight, bias, lora_A, lora_B, delora_lambda, w_norm, u, p, seed, bits, needs):
    mask = _mask(x, p, seed, bits)
    c, a_norm, b_norm, a_live, b_live = delora_component_scale(lora_A, lora_B, delora_lambda)
    acc, r = c.dtype, lora_A.shape[0]
    a_w = cast(lora_A, acc) * cast(w_norm, acc)
    t = k.acc_matmul(dy, lora_B)                                        # dY B (N, r)
    tc = t * c
    dx, d_a, d_b, d_lambda = (dy.new_empty(0) for _ in range(4))   # distinct tensors: outputs may not alias
    if needs[0] and mask is None:
        dx = k.lowrank_gemm(dy, weight, tc, a_w, round_base=True)       # dY W + (t o c) A_w
    elif needs[0]:
        dx = mask.add_(dy @ weight, tc @ a_w)
    a_c, b_c = a_norm.clamp_min(DELORA_NORM_CLAMP), b_norm.clamp_min(DELORA_NORM_CLAMP)
    dc = torch.linalg.vecdot(t, u, dim=0)                               # (r,): sums over tokens in acc
    if needs[1]:
        radial = (torch.where(a_live, -dc * c / a_c, 0) / a_c)[:, None] * cast(lora_A, acc)
        d_a = cast(k.acc_matmul(tc.T, x, mask_b=mask) * cast(w_norm, acc) + radial, lora_A.dtype)
    if needs[2]:
        radial = cast(lora_B, acc) * (torch.where(b_live, -dc * c / b_c, 0) / b_c)
        d_b = cast(k.acc_matmul(u.T, dy).T * c + radial, lora_B.dtype).contiguous()  # u^T dY: BLAS's faster layout
    if needs[3]:
        d_lambda = cast((dc / (r * a_c * b_c)).sum().reshape(1), delora_lambda.dtype)
    d_bias = dy.sum(dim=0) if needs[4] else dy.new_empty(0)
    return [dx, d_a, d_b, d_lambda, d_bias]


# ----------------------------------------------------------------------------------------------
# fastadapt::delora_linear

@fused_op("delora_linear", autocast_keep=("delora_A", "delora_B", "delora_lambda", "delora_w_norm"))
def delora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], delora_A: Tensor, delora_B: Tensor,
                     delora_lambda: Tensor, delora_w_norm: Tensor, p: float, seed: Optional[Tensor],
                     bits: Optional[Tensor]) -> list[Tensor]:
    """[y, u] of DeLoRA (module docstring); dropout p > 0 with the mask of ``seed`` (Philox) or
    ``bits`` (nn.Dropout's, drawn on x), p = 0 without."""
    return _forward(gemm.TORCH, x, weight, bias, delora_A, delora_B, delora_lambda, delora_w_norm, p, seed, bits)


@delora_linear_op.impl("triton")
def _(*args):
    return _forward(gemm.triton(), *args)


@delora_linear_op.fake
def _(x, weight, bias, delora_A, delora_B, delora_lambda, delora_w_norm, p, seed, bits):
    acc = torch.promote_types(acc_dtype(x.dtype), acc_dtype(delora_A.dtype))
    return [x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], delora_A.shape[0], dtype=acc)]


@fused_op("delora_linear_backward", autocast=False)
def delora_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], delora_A: Tensor,
                              delora_B: Tensor, delora_lambda: Tensor, delora_w_norm: Tensor, u: Tensor, p: float,
                              seed: Optional[Tensor], bits: Optional[Tensor], needs: list[bool]) -> list[Tensor]:
    """[dx, dA, dB, dlambda, db] of ``delora_linear`` (``needs``: which of them; the others are empty)."""
    return _backward(gemm.TORCH, dy, x, weight, bias, delora_A, delora_B, delora_lambda, delora_w_norm, u, p, seed,
                     bits, needs)


@delora_linear_backward_op.impl("triton")
def _(*args):
    return _backward(gemm.triton(), *args)


@delora_linear_backward_op.fake
def _(dy, x, weight, bias, delora_A, delora_B, delora_lambda, delora_w_norm, u, p, seed, bits, needs):
    shapes = [(x, x.shape), (delora_A, delora_A.shape), (delora_B, delora_B.shape),
              (delora_lambda, delora_lambda.shape), (dy, dy.shape[1:])]
    return [like.new_empty(shape) if need else dy.new_empty(0) for (like, shape), need in zip(shapes, needs)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, delora_A, delora_B, delora_lambda, w_norm, p, seed, bits = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, bias, delora_A, delora_B, delora_lambda, w_norm, output[1], seed, bits)
    ctx.p = p


def _backward_entry(ctx, grads):
    n = ctx.needs_input_grad
    needs = [n[0], n[3], n[4], n[5], n[2]]     # x, A, B, lambda, bias
    if grads[0] is None or not any(needs):
        return (None,) * 10
    x, weight, bias, delora_A, delora_B, delora_lambda, w_norm, u, seed, bits = ctx.saved_tensors
    out = delora_linear_backward_op(grads[0], x, weight, bias, delora_A, delora_B, delora_lambda, w_norm, u, ctx.p,
                                    seed, bits, needs)
    dx, d_a, d_b, d_lambda, d_bias = (g if need else None for g, need in zip(out, needs))
    return dx, None, d_bias, d_a, d_b, d_lambda, None, None, None, None


delora_linear_op.autograd(_backward_entry, _setup_context)


# ----------------------------------------------------------------------------------------------
# opcheck examples: float64, float32 with strided x, a float32 adapter on a bfloat16 base; each
# without dropout, with a Philox seed and with nn.Dropout's bits.

def _examples():
    from .dropout import draw_dropout
    for i, (dtype, adapter_dtype, bias) in enumerate([(torch.float64, torch.float64, True),
                                                      (torch.float32, torch.float32, False),
                                                      (torch.bfloat16, torch.float32, True)]):
        s = 10 * i
        x = randn(5, 7, dtype=dtype, requires_grad=True, seed=s)
        if i == 1:
            x = x.detach().T.contiguous().T.requires_grad_()
        weight = randn(6, 7, dtype=dtype, scale=0.4, seed=s + 1)
        b = randn(6, dtype=dtype, requires_grad=True, seed=s + 2) if bias else None
        adapter = [randn(*shape, dtype=adapter_dtype, requires_grad=True, seed=s + 3 + j)
                   for j, shape in enumerate([(3, 7), (6, 3), (1,)])]
        w_norm = randn(7, dtype=adapter_dtype, seed=s + 6).abs()
        args = (x, weight, b, *adapter, w_norm)
        yield (*args, 0.0, None, None), {}
        yield (*args, 0.25, torch.tensor(77 + i), None), {}
        torch.manual_seed(i)
        yield (*args, 0.25, None, draw_dropout(x.detach(), 0.25)[1]), {}


def _backward_examples():
    for args, _ in _examples():
        with torch.no_grad():
            _, u = delora_linear_op(*args)
        x, weight, bias = args[:3]
        dy = randn(x.shape[0], weight.shape[0], dtype=x.dtype, seed=98)
        inputs = [t.detach() if isinstance(t, torch.Tensor) else t for t in (dy, *args[:7], u, *args[7:])]
        yield (*inputs, [True, True, True, True, bias is not None]), {}
        yield (*inputs, [False, True, False, False, False]), {}


delora_linear_op.example(_examples)
delora_linear_backward_op.example(_backward_examples)
