"""RandLoRA's fused linear op (PEFT's ``randlora.Linear``), on 2-D x (N, in).

Notation (PEFT 0.21): d = min(in, out), D = max(in, out), n bases of rank r; the shared frozen bases
sliced to the layer, A (r, 1, d) (one base, broadcast over the n) and B (D, n, r); the trainable
lambda (r, n) and gamma (n, d); s = randlora_alpha / r::

    A_s   = lambda[:, :, None] o A o gamma[None]   reshaped (r n, d)     (row k = (i, b): k = i n + b)
    M     = B.reshape(D, n r) A_s                  (D, d)                (column k of B = (b, i): k = b r + i,
                                                                          PEFT's pairing, kept)
    dW    = s M (in <= out) or s M^T (in > out)    (out, in)
    y     = x W^T + b + x_d dW^T                   x_d = mask o x (dropout; x_d = x without)

The update is full rank (r n >= d), so the activation path PEFT runs (x_d A_s^T, then B) costs two
full GEMMs each way; here dW is formed (2 D r n d FLOPs, independent of N) and, without dropout on a
float32 / float64 base, merged: y = x (W + dW)^T + b is the frozen layer's own GEMM (W + dW from
one GEMM that starts its accumulator at W).  Backward::

    dx    = dY (W + dW)        (without dropout; else dY W + mask o (dY dW))
    G     = dY^T x_d           (out, in): the one GEMM the gradient needs (2 N out in FLOPs)
    dM    = s G (in <= out) or s G^T,     dA_s = B.reshape(D, n r)^T dM   (r n, d)
    E     = dA_s o A                                     (formed from dA_s / s; s joins the results)
    dlambda[i, b] = sum_j E[(i, b), j] gamma[b, j]
    dgamma[b, j]  = sum_i lambda[i, b] E[(i, b), j]       (a batched GEMV over b)
which is PEFT's ``UniqueBaseGrad`` for its one-base A.  A half base (or dropout) keeps the base GEMM
in the base dtype, rounded as PEFT's, and adds x_d dW^T computed in float32 (PEFT: two float32
GEMMs), rounding the sum once.  Saved: x (and the mask's seed or bits); dW is rebuilt in backward,
never saved.  On the Triton path dlambda and dgamma come from one read of dA_s
(fastadapt.triton_kernels.lowrank's scale-gradient kernel); the GEMMs are cuBLAS's.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..testing import randn
from ._dropout_mask import DropoutMask
from ._policy import HALF_DTYPES, acc_dtype
from ._registry import fused_op
from .dropout import draw_dropout


def _factors(lora_A: Tensor, lora_B: Tensor, lam: Tensor, gamma: Tensor, in_le_out: bool, acc: torch.dtype):
    """(left, right) in ``acc`` with dW = s left @ right (out, in): (B_flat, A_s), or (A_s^T, B_flat^T)
    for in > out."""
    a_s = (lam.to(acc)[:, :, None] * lora_A.to(acc) * gamma.to(acc)[None]).reshape(-1, lora_A.shape[-1])
    b_flat = lora_B.to(acc).reshape(lora_B.shape[0], -1)
    return (b_flat, a_s) if in_le_out else (a_s.T, b_flat.T)


def delta_weight(lora_A: Tensor, lora_B: Tensor, lam: Tensor, gamma: Tensor, scaling: float, in_le_out: bool,
                 acc: torch.dtype) -> Tensor:
    """dW (out, in) in ``acc``."""
    left, right = _factors(lora_A, lora_B, lam, gamma, in_le_out, acc)
    return (left @ right).mul_(scaling)


def merged_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, lam: Tensor, gamma: Tensor, scaling: float,
                  in_le_out: bool) -> Tensor:
    """W + dW (out, in) in W's dtype (float32 / float64 with an adapter of that dtype): one GEMM with
    W as its accumulator's start (no dW temporary, no scaling or add pass over (out, in))."""
    return torch.addmm(weight, *_factors(lora_A, lora_B, lam, gamma, in_le_out, weight.dtype), alpha=scaling)


def _mask(p, seed, bits, dtype) -> Optional[DropoutMask]:
    return None if p == 0 else DropoutMask(p, seed, bits, dtype)


def _merged_mode(x: Tensor, mask) -> bool:
    return mask is None and x.dtype not in HALF_DTYPES


@fused_op("randlora_linear")
def randlora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                       randlora_lambda: Tensor, randlora_gamma: Tensor, scaling: float, in_le_out: bool, p: float,
                       seed: Optional[Tensor], bits: Optional[Tensor]) -> Tensor:
    """y = x W^T + b + x_d dW^T (module docstring); dropout p > 0 with the mask of ``seed`` (Philox)
    or ``bits`` (nn.Dropout's, drawn on x cast to the adapter's dtype), p = 0 without."""
    mask = _mask(p, seed, bits, randlora_lambda.dtype)
    acc = torch.promote_types(acc_dtype(x.dtype), acc_dtype(randlora_lambda.dtype))
    if _merged_mode(x, mask) and acc == x.dtype:
        return F.linear(x, merged_weight(weight, lora_A, lora_B, randlora_lambda, randlora_gamma, scaling, in_le_out),
                        bias)
    delta = delta_weight(lora_A, lora_B, randlora_lambda, randlora_gamma, scaling, in_le_out, acc)
    x_d = x.to(acc) if mask is None else mask.apply(x.to(acc))
    return torch.addmm(F.linear(x, weight, bias).to(acc), x_d, delta.T).to(x.dtype)


randlora_linear_op.impl("triton")(randlora_linear_op.implementations["torch"])   # GEMMs: cuBLAS's


@randlora_linear_op.fake
def _(x, weight, bias, lora_A, lora_B, randlora_lambda, randlora_gamma, scaling, in_le_out, p, seed, bits):
    return x.new_empty(x.shape[0], weight.shape[0])


@fused_op("randlora_linear_backward", autocast=False)
def randlora_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                                randlora_lambda: Tensor, randlora_gamma: Tensor, scaling: float, in_le_out: bool,
                                p: float, seed: Optional[Tensor], bits: Optional[Tensor],
                                needs: list[bool]) -> list[Tensor]:
    """[dx, db, dlambda, dgamma] of ``randlora_linear`` (``needs``: which; the others are empty)."""
    return _backward(dy, x, weight, lora_A, lora_B, randlora_lambda, randlora_gamma, scaling, in_le_out, p, seed,
                     bits, needs, triton_scale_grad=False)


def _backward(dy, x, weight, lora_A, lora_B, randlora_lambda, randlora_gamma, scaling, in_le_out, p, seed, bits,
              needs, triton_scale_grad):
    mask = _mask(p, seed, bits, randlora_lambda.dtype)
    acc = torch.promote_types(acc_dtype(x.dtype), acc_dtype(randlora_lambda.dtype))
    dx, d_bias, d_lambda, d_gamma = (dy.new_empty(0) for _ in range(4))
    if needs[0] and _merged_mode(x, mask) and acc == x.dtype:
        dx = dy @ merged_weight(weight, lora_A, lora_B, randlora_lambda, randlora_gamma, scaling, in_le_out)
    elif needs[0]:
        inner = dy.to(acc) @ delta_weight(lora_A, lora_B, randlora_lambda, randlora_gamma, scaling, in_le_out, acc)
        dx = ((dy @ weight).to(acc) + inner if mask is None else mask.add_((dy @ weight).to(acc), inner))
        dx = dx.to(x.dtype)
    if needs[2] or needs[3]:
        x_d = x.to(acc) if mask is None else mask.apply(x.to(acc))
        g = dy.to(acc).T @ x_d                                               # dY^T x_d (out, in)
        b_flat = lora_B.to(acc).reshape(lora_B.shape[0], -1)
        d_a_s = (b_flat.T @ (g if in_le_out else g.T)).view(lora_A.shape[0], -1, lora_A.shape[-1])   # dA_s / s
        if triton_scale_grad:
            from ..triton_kernels import lowrank as kernels
            d_lambda, d_gamma = kernels.randlora_scale_grad(d_a_s, lora_A, randlora_lambda, randlora_gamma)
        else:   # E = dA_s o A: dlambda = s sum_j E gamma, dgamma[b] = s lambda[:, b]^T E[:, b] (a batched GEMV)
            e = d_a_s * lora_A.to(acc)
            d_lambda = (e * randlora_gamma.to(acc)).sum(dim=-1)
            d_gamma = torch.bmm(randlora_lambda.to(acc).T.unsqueeze(1), e.transpose(0, 1)).squeeze(1)
        d_lambda = (d_lambda * scaling).to(randlora_lambda.dtype) if needs[2] else dy.new_empty(0)
        d_gamma = (d_gamma * scaling).to(randlora_gamma.dtype) if needs[3] else dy.new_empty(0)
    if needs[1]:
        d_bias = dy.sum(dim=0, dtype=acc_dtype(dy.dtype))
    return [dx, d_bias, d_lambda, d_gamma]


@randlora_linear_backward_op.impl("triton")
def _(dy, x, weight, lora_A, lora_B, randlora_lambda, randlora_gamma, scaling, in_le_out, p, seed, bits, needs):
    return _backward(dy, x, weight, lora_A, lora_B, randlora_lambda, randlora_gamma, scaling, in_le_out, p, seed,
                     bits, needs, triton_scale_grad=x.dtype != torch.float64)


@randlora_linear_backward_op.fake
def _(dy, x, weight, lora_A, lora_B, randlora_lambda, randlora_gamma, scaling, in_le_out, p, seed, bits, needs):
    shapes = [(x.dtype, x.shape), (acc_dtype(dy.dtype), dy.shape[1:]), (randlora_lambda.dtype, randlora_lambda.shape),
              (randlora_gamma.dtype, randlora_gamma.shape)]
    return [dy.new_empty(shape, dtype=dtype) if need else dy.new_empty(0) for (dtype, shape), need in zip(shapes, needs)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, lam, gamma, scaling, in_le_out, p, seed, bits = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, lam, gamma, seed, bits)
    ctx.scaling, ctx.in_le_out, ctx.p = scaling, in_le_out, p
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_entry(ctx, dy):
    n = ctx.needs_input_grad
    needs = [n[0], n[2], n[5], n[6]]     # x, bias, lambda, gamma
    if not any(needs):
        return (None,) * 12
    x, weight, lora_A, lora_B, lam, gamma, seed, bits = ctx.saved_tensors
    dx, d_bias, d_lambda, d_gamma = randlora_linear_backward_op(dy, x, weight, lora_A, lora_B, lam, gamma,
                                                                ctx.scaling, ctx.in_le_out, ctx.p, seed, bits, needs)
    return (dx if needs[0] else None, None, d_bias.to(ctx.bias_dtype) if needs[1] else None, None, None,
            d_lambda if needs[2] else None, d_gamma if needs[3] else None, None, None, None, None, None)


randlora_linear_op.autograd(_backward_entry, _setup_context)


def _examples():
    for i, (dtype, adapter_dtype, d_in, d_out) in enumerate([(torch.float64, torch.float64, 6, 8),
                                                             (torch.float32, torch.float32, 8, 6),
                                                             (torch.bfloat16, torch.float32, 6, 8)]):
        r = 2
        d, big = min(d_in, d_out), max(d_in, d_out)
        n = -(-d // r)
        x = randn(5, d_in, dtype=dtype, requires_grad=True, seed=10 * i)
        weight = randn(d_out, d_in, dtype=dtype, scale=0.4, seed=10 * i + 1)
        bias = randn(d_out, dtype=dtype, requires_grad=True, seed=10 * i + 2) if i != 1 else None
        bases = (randn(r, 1, d, dtype=adapter_dtype, seed=10 * i + 3), randn(big, n, r, dtype=adapter_dtype, seed=10 * i + 4))
        lam = randn(r, n, dtype=adapter_dtype, requires_grad=True, seed=10 * i + 5)
        gamma = randn(n, d, dtype=adapter_dtype, requires_grad=True, seed=10 * i + 6)
        args = (x, weight, bias, *bases, lam, gamma, 0.5, d_in <= d_out)
        yield (*args, 0.0, None, None), {}
        yield (*args, 0.3, torch.tensor(3 + i), None), {}
        torch.manual_seed(i)
        yield (*args, 0.3, None, draw_dropout(x.detach().to(adapter_dtype), 0.3)[1]), {}


def _backward_examples():
    for (x, weight, bias, a, b, lam, gamma, scaling, in_le_out, p, seed, bits), _ in _examples():
        dy = randn(x.shape[0], weight.shape[0], dtype=x.dtype, seed=92)
        yield (dy, x.detach(), weight, a, b, lam.detach(), gamma.detach(), scaling, in_le_out, p, seed, bits,
               [True, bias is not None, True, True]), {}


randlora_linear_op.example(_examples)
randlora_linear_backward_op.example(_backward_examples)
