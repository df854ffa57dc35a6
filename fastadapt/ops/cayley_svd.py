"""The SVD-coordinate rotation layer of PSOFT, SSVD and AntiPaSTO:

    y = x W^T + bias + ((x A^T) C_g^T) B^T,   A (r, in), B (out, r), C an r x r core

shared (C (1, r, r)) or one per sample (C (G, r, r), x grouped as (G, T, in): AntiPaSTO's
per-sample steering).  With z = x A^T and u = z C^T:

    du = dy B,  dC_g = du_g^T z_g,  dz = du C,  dx = dy W + dz A,
    dA = dz^T x,  dB = dy^T u,  dW = dy^T x,  dbias = sum dy.

Saved: z (N x r) and the parameters; x itself only when A or W train (PSOFT, SSVD and AntiPaSTO
freeze both, so the layer keeps N r numbers, not N d).  The output is one GEMM plus one rank-r
update into the same buffer: no N x d temporary.

Dtype layouts (fastadapt.ops._policy): one dtype throughout, or PEFT's mixed layout, x, W and
bias half with A, B and C float32 (PEFT casts x to the adapter's dtype, runs the adapter path in
float32 and adds it to the half base output in float32, rounding the sum once): z, u, du, dz and
the adapter gradients in float32, the half operands converted a row chunk at a time (no float32
copy of x or dy), the base GEMMs in the half dtype (the Triton svd_core kernel splits A into two
half operands for tensor-core products: fastadapt.triton_kernels.cayley).

Ops: svd_rotation_linear -> (y, z) (torch; triton: z and u from one kernel for a shared core,
z kept in registers between the two products), svd_rotation_linear_backward (GEMMs: the torch
implementation serves both backends).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..testing import randn
from ._registry import fused_op

CHUNK_ROWS = 1024  # rows of a half operand converted to float32 at a time in the mixed layout


def _kernels():
    from ..triton_kernels import cayley as kernels
    return kernels


# ----------------------------------------------------------------------------------------------
# products in the adapter's dtype


def _mm(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """a (M, K) @ b (K, N) computed in ``dtype`` (b's), a converted a row chunk at a time."""
    if a.dtype == dtype:
        return a @ b
    out = torch.empty(a.shape[0], b.shape[1], dtype=dtype, device=a.device)
    for start in range(0, a.shape[0], CHUNK_ROWS):
        torch.mm(a[start:start + CHUNK_ROWS].to(dtype), b, out=out[start:start + CHUNK_ROWS])
    return out


def _add_mm_(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """out += a @ b, computed in a's dtype and rounded once into out's (row chunks if they differ)."""
    if out.dtype == a.dtype:
        return out.addmm_(a, b)
    for start in range(0, out.shape[0], CHUNK_ROWS):
        rows = out[start:start + CHUNK_ROWS]
        rows.copy_(torch.addmm(rows.to(a.dtype), a[start:start + CHUNK_ROWS], b))
    return out


def _tmm(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """a^T b for a (M, K), b (M, N), reduced over the M rows in ``dtype``."""
    if a.dtype == b.dtype == dtype:
        return a.T @ b
    out = torch.zeros(a.shape[1], b.shape[1], dtype=dtype, device=a.device)
    for start in range(0, a.shape[0], CHUNK_ROWS):
        out.addmm_(a[start:start + CHUNK_ROWS].to(dtype).T, b[start:start + CHUNK_ROWS].to(dtype))
    return out


def _core_product(z: Tensor, C: Tensor, groups: int) -> Tensor:
    """u = z C_g^T for z (G T, r) and C (1 | G, r, r) -> (G T, r)."""
    if C.shape[0] == 1:
        return z @ C[0].T
    return torch.bmm(z.view(groups, z.shape[0] // groups, z.shape[-1]), C.transpose(-2, -1)).view(z.shape)


def _forward_torch(x3, weight, bias, A, B, C):
    G, T, d = x3.shape
    x2d = x3.reshape(G * T, d)
    z = _mm(x2d, A.T, A.dtype)
    y = F.linear(x2d, weight, bias)
    _add_mm_(y, _core_product(z, C, G), B.T)
    return y.view(G, T, weight.shape[0]), z.view(G, T, A.shape[0])


# ----------------------------------------------------------------------------------------------
# ops


@fused_op("svd_rotation_linear")
def svd_rotation_linear_op(x3: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                           C: Tensor) -> tuple[Tensor, Tensor]:
    """(y, z) for x (G, T, in): y = x W^T + bias + ((x A^T) C_g^T) B^T, z = x A^T (for the backward)."""
    return _forward_torch(x3, weight, bias, A, B, C)


@svd_rotation_linear_op.impl("triton")
def _(x3, weight, bias, A, B, C):
    if C.shape[0] != 1:  # one core per sample: batched GEMMs
        return _forward_torch(x3, weight, bias, A, B, C)
    G, T, d = x3.shape
    x2d = x3.reshape(G * T, d)
    z, u = _kernels().svd_core_forward(x2d, A, C[0])
    y = F.linear(x2d, weight, bias)
    _add_mm_(y, u, B.T)
    return y.view(G, T, weight.shape[0]), z.view(G, T, A.shape[0])


@svd_rotation_linear_op.fake
def _(x3, weight, bias, A, B, C):
    G, T, _ = x3.shape
    return x3.new_empty(G, T, weight.shape[0]), A.new_empty(G, T, A.shape[0])


@fused_op("svd_rotation_linear_backward")
def svd_rotation_linear_backward_op(dy: Tensor, x3: Optional[Tensor], z: Tensor, weight: Tensor, A: Tensor,
                                    B: Tensor, C: Tensor, need_x: bool, need_weight: bool, need_A: bool,
                                    need_B: bool, need_C: bool) -> list[Tensor]:
    """[dx, dW, dA, dB, dC], each only where its flag is set (module docstring)."""
    G, T, out = dy.shape
    dy2 = dy.reshape(G * T, out)
    z2 = z.reshape(G * T, z.shape[-1])
    du = _mm(dy2, B, B.dtype)
    dz = _core_product(du, C.transpose(-2, -1), G)
    grads = []
    if need_x:
        dx = dy2 @ weight
        grads.append(_add_mm_(dx, dz, A).view(G, T, weight.shape[1]))
    x2d = None if x3 is None else x3.reshape(G * T, x3.shape[-1])
    if need_weight:
        grads.append(dy2.T @ x2d)
    if need_A:
        grads.append(_tmm(dz, x2d, A.dtype))
    if need_B:
        grads.append(_tmm(dy2, _core_product(z2, C, G), B.dtype))
    if need_C:
        dC = torch.bmm(du.view(G, T, du.shape[-1]).transpose(-2, -1), z)
        grads.append(dC.sum(0, keepdim=True) if C.shape[0] == 1 else dC)
    return grads


svd_rotation_linear_backward_op.impl("triton")(svd_rotation_linear_backward_op.implementations["torch"])


@svd_rotation_linear_backward_op.fake
def _(dy, x3, z, weight, A, B, C, need_x, need_weight, need_A, need_B, need_C):
    G, T, _ = dy.shape
    shapes = [(need_x, lambda: dy.new_empty(G, T, weight.shape[1])), (need_weight, lambda: torch.empty_like(weight)),
              (need_A, lambda: torch.empty_like(A)), (need_B, lambda: torch.empty_like(B)),
              (need_C, lambda: torch.empty_like(C))]
    return [make() for flag, make in shapes if flag]


def _setup(ctx, inputs, output):
    x3, weight, bias, A, B, C = inputs
    need_x_saved = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
    ctx.save_for_backward(x3 if need_x_saved else None, output[1], weight, A, B, C)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _):
    if dy is None:
        return (None,) * 6
    x3, z, weight, A, B, C = ctx.saved_tensors
    need_x, need_W, need_b, need_A, need_B, need_C = ctx.needs_input_grad
    flags = (need_x, need_W, need_A, need_B, need_C)
    grads = iter(svd_rotation_linear_backward_op(dy, x3, z, weight, A, B, C, *flags) if any(flags) else [])
    dx, dW, dA, dB, dC = [next(grads) if flag else None for flag in flags]
    db = dy.sum((0, 1)) if need_b and ctx.has_bias else None
    return dx, dW, db, dA, dB, dC


svd_rotation_linear_op.autograd(_backward, _setup)


def _example_layer(groups: int, dtype=torch.float64, adapter_dtype=torch.float64, grad=True):
    x = randn(groups, 5, 10, dtype=dtype, requires_grad=grad, seed=80)
    W, bias = randn(7, 10, dtype=dtype, seed=81), randn(7, dtype=dtype, seed=82)
    A, B = randn(3, 10, dtype=adapter_dtype, seed=83), randn(7, 3, dtype=adapter_dtype, seed=84)
    C = randn(1 if groups == 1 else groups, 3, 3, dtype=adapter_dtype, requires_grad=grad, seed=85)
    return x, W, bias, A, B, C


@svd_rotation_linear_op.example
def _():
    yield _example_layer(1), {}
    yield _example_layer(3), {}
    yield _example_layer(2, torch.bfloat16, torch.float32, grad=False), {}
    x, W, bias, A, B, C = _example_layer(1)
    yield (x, W.requires_grad_(), bias.requires_grad_(), A.requires_grad_(), B.requires_grad_(), C), {}


@svd_rotation_linear_backward_op.example
def _():
    for groups in (1, 3):
        x, W, _, A, B, C = (t.detach() for t in _example_layer(groups))
        z = x @ A.T
        dy = randn(groups, 5, 7, seed=86)
        yield (dy, None, z, W, A, B, C, True, False, False, False, True), {}
        yield (dy, x, z, W, A, B, C, True, True, True, True, True), {}
