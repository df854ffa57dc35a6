"""Block-diagonal rotation of activations, y = x R_bd (OFTv2's input-centric rotation), and the
OFT layer around a given R.

Math (b = block size, n = d / b blocks, x (M, n b), R (n or 1 shared, b, b)):

    y[m, i b:(i+1) b] = x[m, i b:(i+1) b] R_i                     y = x R_bd
    dx = dy R_bd^T  (the same rotation with R_i^T),   dR_i = x_i^T dy_i   (summed over i if shared)

    OFT layer  y = (x R_bd) W^T + bias.  Forward rotates the smaller operand: the weight,
    y = x (W R_bd^T)^T (2 out d b FLOPs), when M > out, else x (2 M d b).  Backward with
    g = dy W (the gradient at the rotated input):  dx = g R_bd^T,  dR_i = x_i^T g_i,
    dW = dy^T (x R_bd),  dbias = sum dy.  When R is orthogonal (exact Cayley), fp32/fp64 and the
    weight side is the smaller one, g is never formed: dx = dy (W R_bd^T) and, since
    g_i = dx_i R_i^{-T} = dx_i R_i,  dR_i = (x_i^T dx_i) R_i.

Mixed precision (PEFT's float32 adapter on a half base): x half, R float32.  The rotation runs in
float32 and rounds once to x's dtype (PEFT casts x to the adapter's dtype, rotates, casts back);
dR accumulates in R's dtype.  The Triton kernel splits R into two half operands and runs two
tensor-core products (2p bits of R: fastadapt.triton_kernels.cayley).

Torch building blocks (also used by fastadapt.ops.cayley_oft): ``rotate`` (one bmm writing the
(M, n, b) output through a strided view, no transposed copies), ``rotate_`` (in place, a row
chunk at a time through one small buffer: no second M x d allocation, which on CPU costs page
faults comparable to the rotation itself), ``block_grad`` (x^T g per block over 512-row slices).

Ops:
    block_rotate                 torch, triton    y = x R_bd; saves x and R; gradients through
                                                  block_rotate (dx, R^T as a strided view) and
                                                  block_rotate_weight_grad
    block_rotate_weight_grad     torch, triton    dR_i = x_i^T g_i, accumulated in fp32 (or fp64)
    block_rotate_linear          torch, triton    the OFT layer around a given R; saves x, R, W
                                                  (never x R_bd or W R_bd^T); gradients through
                                                  the two ops above and GEMMs
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..testing import randn
from ._registry import fused_op
from .cayley_maps import cayley_torch, packed_size, skew_torch


def _kernels():
    from ..triton_kernels import cayley as kernels
    return kernels


# ----------------------------------------------------------------------------------------------
# torch building blocks

ROTATE_ROWS = 1024  # rows per chunk of the chunked rotation: few launches, one small reused buffer
GRAD_ROWS = 512     # rows per accumulation step of dR (measured: 512 beats 128, 256, 1024 and 2048)


def _blocks_of(R: Tensor, n: int, transpose: bool) -> Tensor:
    b = R.shape[-1]
    return (R.transpose(-2, -1) if transpose else R).expand(n, b, b)


def _rotate_rows(src: Tensor, dst: Tensor, R: Tensor, transpose: bool) -> Tensor:
    """dst = src R_bd (or R_bd^T), computed in R's dtype ROTATE_ROWS rows at a time through one
    buffer and rounded into dst's dtype; dst may be src itself."""
    M, d = src.shape
    b = R.shape[-1]
    n = d // b
    blocks = _blocks_of(R, n, transpose)
    buffer = torch.empty(min(M, ROTATE_ROWS), n, b, dtype=R.dtype, device=src.device)
    for start in range(0, M, ROTATE_ROWS):
        rows = src[start:start + ROTATE_ROWS]
        chunk = buffer[:rows.shape[0]]
        torch.bmm(rows.to(R.dtype).unflatten(1, (n, b)).transpose(0, 1), blocks, out=chunk.transpose(0, 1))
        dst[start:start + ROTATE_ROWS].copy_(chunk.view(rows.shape))
    return dst


def rotate(t2d: Tensor, R: Tensor, *, transpose: bool = False) -> Tensor:
    """(M, n b) x (n | 1, b, b) -> (M, n b) in t's dtype: chunk i times R_i (or R_i^T)."""
    if t2d.dtype != R.dtype:  # half activations, float32 rotation: float32 chunks
        return _rotate_rows(t2d, torch.empty(t2d.shape, dtype=t2d.dtype, device=t2d.device), R, transpose)
    M, d = t2d.shape
    b = R.shape[-1]
    n = d // b
    out = torch.empty(M, n, b, dtype=t2d.dtype, device=t2d.device)
    torch.bmm(t2d.unflatten(1, (n, b)).transpose(0, 1), _blocks_of(R, n, transpose), out=out.transpose(0, 1))
    return out.view(M, d)


def rotate_(t2d: Tensor, R: Tensor, *, transpose: bool = False) -> Tensor:
    """t2d R_bd (or t2d R_bd^T) for a contiguous (M, n b) ``t2d`` the caller gives up: overwritten
    in place when it spans more than one chunk, else rotated into a fresh (small) tensor."""
    if t2d.shape[0] <= ROTATE_ROWS:
        return rotate(t2d, R, transpose=transpose)
    return _rotate_rows(t2d, t2d, R, transpose)


def block_grad(x2d: Tensor, g2d: Tensor, block_size: int, shared: bool, dtype: torch.dtype) -> Tensor:
    """dR_i = x_i^T g_i (b x b per block, in ``dtype``), summed over blocks when R is shared;
    accumulated over GRAD_ROWS-row slices (about 15 % faster than one bmm over 2048 rows at
    b = 32 / 128 on the CPU benchmark machine)."""
    n = x2d.shape[1] // block_size
    grad = None
    for start in range(0, x2d.shape[0], GRAD_ROWS):
        xs = x2d[start:start + GRAD_ROWS].to(dtype).unflatten(1, (n, block_size)).permute(1, 2, 0)
        gs = g2d[start:start + GRAD_ROWS].to(dtype).unflatten(1, (n, block_size)).transpose(0, 1)
        grad = torch.bmm(xs, gs) if grad is None else grad.baddbmm_(xs, gs)
    if grad is None:  # no rows
        grad = x2d.new_zeros(n, block_size, block_size, dtype=dtype)
    return grad.sum(0, keepdim=True) if shared else grad


# ----------------------------------------------------------------------------------------------
# ops


@fused_op("block_rotate")
def block_rotate_op(x2d: Tensor, R: Tensor) -> Tensor:
    """y = x R_bd for x (M, n b) any strides, R (n | 1, b, b) any strides; y in x's dtype."""
    return rotate(x2d, R)


@block_rotate_op.impl("triton")
def _(x2d, R):
    return _kernels().block_rotate_forward(x2d, R)


@block_rotate_op.fake
def _(x2d, R):
    return x2d.new_empty(x2d.shape)


@fused_op("block_rotate_weight_grad")
def block_rotate_weight_grad_op(x2d: Tensor, g2d: Tensor, block_size: int, shared: bool,
                                dtype: torch.dtype) -> Tensor:
    """dR (n | 1, b, b) in ``dtype`` with dR_i = x_i^T g_i (fp32 or wider accumulation)."""
    return block_grad(x2d, g2d, block_size, shared, dtype)


@block_rotate_weight_grad_op.impl("triton")
def _(x2d, g2d, block_size, shared, dtype):
    grad = _kernels().block_rotate_backward_weight(x2d, g2d, block_size, out_dtype=dtype)
    return grad.sum(0, keepdim=True) if shared else grad


@block_rotate_weight_grad_op.fake
def _(x2d, g2d, block_size, shared, dtype):
    return x2d.new_empty(1 if shared else x2d.shape[1] // block_size, block_size, block_size, dtype=dtype)


def _save_x_and_r(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:2])


def _block_rotate_backward(ctx, dy):
    x2d, R = ctx.saved_tensors
    need_x, need_R = ctx.needs_input_grad[:2]
    dx = block_rotate_op(dy, R.transpose(-2, -1)) if need_x else None
    dR = block_rotate_weight_grad_op(x2d, dy, R.shape[-1], R.shape[0] == 1, R.dtype) if need_R else None
    return dx, dR


block_rotate_op.autograd(_block_rotate_backward, _save_x_and_r)


def _example_blocks(n: int, b: int, seed: int, dtype=torch.float64) -> Tensor:
    return cayley_torch(skew_torch(randn(n, packed_size(b), scale=0.3, seed=seed), b)).to(dtype)


@block_rotate_op.example
def _():
    x = randn(7, 12, requires_grad=True, seed=30)
    yield (x, _example_blocks(3, 4, 31).requires_grad_()), {}
    yield (x, _example_blocks(1, 4, 32).requires_grad_()), {}
    yield (randn(5, 8, dtype=torch.bfloat16, seed=33), _example_blocks(2, 4, 34, torch.float32)), {}


@block_rotate_weight_grad_op.example
def _():
    x, g = randn(9, 12, seed=35), randn(9, 12, seed=36)
    yield (x, g, 4, False, torch.float64), {}
    yield (x.float(), g.float(), 4, True, torch.float32), {}
    yield (x.half(), g.half(), 4, False, torch.float32), {}


# -- the OFT layer around a given R --------------------------------------------------------------


def _rotated_product(x2d: Tensor, R: Tensor, weight: Tensor, bias: Optional[Tensor], rotate_fn) -> Tensor:
    """(x R_bd) W^T + bias, rotating the smaller operand (module docstring)."""
    if x2d.shape[0] > weight.shape[0]:
        return F.linear(x2d, rotate_fn(weight, R, transpose=True), bias)
    return F.linear(rotate_fn(x2d, R), weight, bias)


@fused_op("block_rotate_linear")
def block_rotate_linear_op(x2d: Tensor, R: Tensor, weight: Tensor, bias: Optional[Tensor],
                           orthogonal: bool) -> Tensor:
    """y = (x R_bd) W^T + bias; ``orthogonal``: R^{-1} = R^T (exact Cayley), used by the backward."""
    return _rotated_product(x2d, R, weight, bias, rotate)


@block_rotate_linear_op.impl("triton")
def _(x2d, R, weight, bias, orthogonal):
    kernels = _kernels()

    def rotate_fn(t, blocks, transpose=False):
        return kernels.block_rotate_forward(t, blocks.transpose(-2, -1) if transpose else blocks)
    return _rotated_product(x2d, R, weight, bias, rotate_fn)


@block_rotate_linear_op.fake
def _(x2d, R, weight, bias, orthogonal):
    return x2d.new_empty(x2d.shape[0], weight.shape[0])


def _block_rotate_linear_setup(ctx, inputs, output):
    x2d, R, weight, bias, orthogonal = inputs
    ctx.save_for_backward(x2d, R, weight)
    ctx.has_bias = bias is not None
    ctx.weight_side_orthogonal = (x2d.shape[0] > weight.shape[0] and orthogonal
                                  and x2d.dtype in (torch.float32, torch.float64))


def _block_rotate_linear_backward(ctx, dy):
    x2d, R, weight = ctx.saved_tensors
    need_x, need_R, need_W, need_b = ctx.needs_input_grad[:4]
    b, shared = R.shape[-1], R.shape[0] == 1
    dx = dR = dW = db = None
    if ctx.weight_side_orthogonal:
        dx = dy @ block_rotate_op(weight, R.transpose(-2, -1))
        if need_R:
            dR = block_rotate_weight_grad_op(x2d, dx, b, shared, R.dtype) @ R
    else:
        g = dy @ weight
        if need_R:
            dR = block_rotate_weight_grad_op(x2d, g, b, shared, R.dtype)
        if need_x:
            dx = block_rotate_op(g, R.transpose(-2, -1))
    if need_W:
        dW = dy.T @ block_rotate_op(x2d, R)
    if need_b and ctx.has_bias:
        db = dy.sum(0)
    return dx if need_x else None, dR, dW, db, None


block_rotate_linear_op.autograd(_block_rotate_linear_backward, _block_rotate_linear_setup)


@block_rotate_linear_op.example
def _():
    R = _example_blocks(3, 4, 37).requires_grad_()
    W, bias = randn(5, 12, requires_grad=True, seed=38), randn(5, requires_grad=True, seed=39)
    for rows in (4, 9):  # x rotated; W rotated (rows > out)
        x = randn(rows, 12, requires_grad=True, seed=40 + rows)
        yield (x, R, W, bias, True), {}
        yield (x, R, W, None, False), {}
