"""MiSS's fused linear op (PEFT's ``MissLinear``, modes "default" and "mini"), on 2-D x (N, in).

Notation: D = ``miss_block`` (r, out) (mode "mini": the (r, mini_r) block tiled along the outputs,
by the caller), fold(x) (N, r) the sum of x's length-r blocks (x zero-padded to a multiple of r:
fold(x)_k = sum_{j = k mod r} x_j), x_d = mask o x (dropout), F (r, in) the 0/1 matrix with
F[k, j] = [j mod r = k] (fold(x) = x F^T).  ``fastadapt::miss_linear``::

    y  = x W^T + b + fold(x_d) D          (x_d = mask o pad(x): PEFT pads x, then drops)
                                          = x (W + D^T F)^T + b without dropout:
                                            W_eff[o, j] = W[o, j] + D[j mod r, o]
    t  = dY D^T                            (N, r)
    dx = dY W + mask o (t F)               (t F)[:, j] = t[:, j mod r]: t tiled over x's blocks
    dD = fold(x_d)^T dY                    (r, out);    db = colsum(dY)

Without dropout (float32 / float64) the op multiplies by W_eff (one out x in pass builds it, in
forward and again in backward): the frozen layer's two GEMMs plus dD's thin product, no (N, out)
or (N, in) pass but fold(x)'s read of x.  With dropout, or on a half base, the low-rank form: u =
fold(x_d) in float32, y from the fused GEMM with u D in its accumulator (rounded where PEFT's half
GEMM rounds), dx with t tiled (CPU) or t F in the GEMM epilogue (Triton, masked in-kernel).

Saved: x only (fold(x_d) is one pass, recomputed in backward), and the mask's seed or bits.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..testing import randn
from . import _lowrank_gemm as gemm
from ._dropout_mask import DropoutMask
from ._policy import HALF_DTYPES, acc_dtype
from ._registry import fused_op
from .dropout import draw_dropout


def padded(x: Tensor, r: int) -> Tensor:
    """x (N, in) zero-padded to a multiple of r columns, as PEFT pads it (before dropout); x itself
    where r divides in (F.pad copies x even for a zero pad: 3.3 ms per call at N = 2048, in = 1024)."""
    pad = (-x.shape[1]) % r
    return F.pad(x, (0, pad)) if pad else x


def fold(x: Tensor, r: int) -> Tensor:
    """fold(x) (N, r): the sum of x's (zero-padded) length-r blocks, in x's dtype."""
    return padded(x, r).unflatten(1, (-1, r)).sum(dim=1)


@functools.lru_cache(maxsize=32)
def fold_matrix(r: int, in_features: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """F (r, in): F[k, j] = [j mod r = k], so fold(x) = x F^T and t F tiles t over x's blocks."""
    return (torch.arange(in_features, device=device) % r == torch.arange(r, device=device)[:, None]).to(dtype)


def merged_weight(weight: Tensor, miss_block: Tensor) -> Tensor:
    """W + D^T F (out, in) in W's dtype: column j of W gets D[j mod r].  One pass (read W, write
    the sum) with D^T made contiguous first: a broadcast add reading D^T's strided rows, or a clone
    then an in-place add, costs 3.3 ms instead of 0.13 ms at out = in = 1024, r = 64 (1 thread)."""
    r, in_features = miss_block.shape[0], weight.shape[1]
    whole = in_features // r * r
    block = miss_block.to(weight.dtype).T.contiguous()
    merged = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    torch.add(weight[:, :whole].unflatten(1, (-1, r)), block[:, None, :], out=merged[:, :whole].unflatten(1, (-1, r)))
    torch.add(weight[:, whole:], block[:, :in_features - whole], out=merged[:, whole:])
    return merged


def _torch_tiled_dx(dy, weight, t, fold_f, mask: Optional[DropoutMask]):
    """dY W + mask o (t F), with t F as t tiled over x's blocks (no GEMM).  A mask of the padded x
    (in not a multiple of r) applies to the tiled t over the padded width, then cut to in."""
    dx = dy @ weight
    r, in_features = fold_f.shape
    if mask is None and in_features % r == 0:   # t added to x's blocks by broadcast: no (N, in) tile
        acc_dx = dx if dx.dtype == t.dtype else dx.to(t.dtype)
        acc_dx.view(dx.shape[0], -1, r).add_(t[:, None, :])
        return acc_dx.to(dx.dtype)
    reps = -(-in_features // r)
    tiled = t.repeat(1, reps)
    if mask is not None and reps * r != in_features:
        tiled = mask.apply(tiled)
        mask = None
    tiled = tiled[:, :in_features]
    if mask is None:
        return dx.add_(tiled) if dx.dtype == tiled.dtype else (dx.to(t.dtype) + tiled).to(dx.dtype)
    return mask.add_(dx, tiled)


def _triton_tiled_dx(dy, weight, t, fold_f, mask: Optional[DropoutMask]):
    padded_mask = mask is not None and fold_f.shape[1] % fold_f.shape[0] != 0
    if dy.dtype == torch.float64 or padded_mask or (mask is not None and mask.philox_seed is None):
        return _torch_tiled_dx(dy, weight, t, fold_f, mask)
    if mask is None:
        return gemm.triton().lowrank_gemm(dy, weight, t, fold_f, round_base=True)
    from ..triton_kernels import lowrank as kernels
    return kernels.masked_lowrank_gemm(dy, weight, t, fold_f, mask.philox_seed, mask.p)


class MissKernels(NamedTuple):
    """One backend's primitives for MiSS: the shared GEMM set and dY W + mask o (t F)."""

    gemm: gemm.Kernels
    tiled_dx: Callable


TORCH = MissKernels(gemm.TORCH, _torch_tiled_dx)


@functools.lru_cache(maxsize=None)
def _triton() -> MissKernels:
    return MissKernels(gemm.triton(), _triton_tiled_dx)


def _mask(p, seed, bits, dtype) -> Optional[DropoutMask]:
    return None if p == 0 else DropoutMask(p, seed, bits, dtype)


def _merged_mode(x: Tensor, miss_block: Tensor, mask) -> bool:
    return mask is None and x.dtype not in HALF_DTYPES and miss_block.dtype == x.dtype


def _folded(x: Tensor, r: int, mask: Optional[DropoutMask], acc: torch.dtype) -> Tensor:
    """fold(mask o pad(x)) in ``acc``: the mask belongs to the padded x (PEFT pads, then drops).
    Without a mask the sum converts x's elements as it reads them (no float32 copy of x)."""
    if mask is None:
        return padded(x, r).unflatten(1, (-1, r)).sum(dim=1, dtype=acc)
    x = padded(x.to(acc), r)
    return fold(x if mask is None else mask.apply(x), r)


def _forward(k: MissKernels, x, weight, bias, miss_block, p, seed, bits):
    mask = _mask(p, seed, bits, miss_block.dtype)           # PEFT drops x cast to the block's dtype
    if _merged_mode(x, miss_block, mask):
        return F.linear(x, merged_weight(weight, miss_block), bias)
    acc = torch.promote_types(acc_dtype(x.dtype), acc_dtype(miss_block.dtype))
    u = _folded(x, miss_block.shape[0], mask, acc)
    return k.gemm.lowrank_gemm(x, weight.T, u, miss_block.to(acc), bias=bias, round_base=True, bias_in_base=True)


def _backward(k: MissKernels, dy, x, weight, miss_block, p, seed, bits, needs):
    mask = _mask(p, seed, bits, miss_block.dtype)
    acc = torch.promote_types(acc_dtype(x.dtype), acc_dtype(miss_block.dtype))
    r = miss_block.shape[0]
    dx, d_bias, d_block = (dy.new_empty(0) for _ in range(3))
    merged = _merged_mode(x, miss_block, mask)
    # BLAS's products take float32 operands: a half dY converted once for t and dD (Triton converts tiles)
    dy_thin = dy.to(acc) if k is TORCH and (needs[2] or (needs[0] and not merged)) else dy
    if needs[0] and merged:
        dx = dy @ merged_weight(weight, miss_block)
    elif needs[0]:
        t = k.gemm.acc_matmul(dy_thin, miss_block.T)                   # dY D^T (N, r)
        dx = k.tiled_dx(dy, weight, t, fold_matrix(r, x.shape[1], acc, x.device), mask)
    if needs[2]:
        d_block = k.gemm.acc_matmul(_folded(x, r, mask, acc).T, dy_thin).to(miss_block.dtype)
    if needs[1]:
        d_bias = dy.sum(dim=0, dtype=acc)
    return [dx, d_bias, d_block]


# ----------------------------------------------------------------------------------------------
# fastadapt::miss_linear

@fused_op("miss_linear")
def miss_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], miss_block: Tensor, p: float,
                   seed: Optional[Tensor], bits: Optional[Tensor]) -> Tensor:
    """y = x W^T + b + fold(x_d) D (module docstring); dropout p > 0 with the mask of ``seed``
    (Philox) or ``bits`` (nn.Dropout's, drawn on x cast to D's dtype), p = 0 without."""
    return _forward(TORCH, x, weight, bias, miss_block, p, seed, bits)


def _triton_serves(x: Tensor) -> bool:
    return x.dtype != torch.float64 and x.shape[0] > 0


@miss_linear_op.impl("triton")
def _(x, *args):
    return _forward(_triton() if _triton_serves(x) else TORCH, x, *args)


@miss_linear_op.fake
def _(x, weight, bias, miss_block, p, seed, bits):
    return x.new_empty(x.shape[0], weight.shape[0])


@fused_op("miss_linear_backward", autocast=False)
def miss_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, miss_block: Tensor, p: float,
                            seed: Optional[Tensor], bits: Optional[Tensor], needs: list[bool]) -> list[Tensor]:
    """[dx, db, dD] of ``miss_linear`` (``needs``: which of them; the others are empty)."""
    return _backward(TORCH, dy, x, weight, miss_block, p, seed, bits, needs)


@miss_linear_backward_op.impl("triton")
def _(dy, x, *args):
    return _backward(_triton() if _triton_serves(x) else TORCH, dy, x, *args)


@miss_linear_backward_op.fake
def _(dy, x, weight, miss_block, p, seed, bits, needs):
    acc = torch.promote_types(acc_dtype(x.dtype), acc_dtype(miss_block.dtype))
    shapes = [(x.dtype, x.shape), (acc, dy.shape[1:]), (miss_block.dtype, miss_block.shape)]
    return [dy.new_empty(shape, dtype=dtype) if need else dy.new_empty(0) for (dtype, shape), need in zip(shapes, needs)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, miss_block, p, seed, bits = inputs
    ctx.save_for_backward(x, weight, miss_block, seed, bits)
    ctx.p, ctx.bias_dtype = p, None if bias is None else bias.dtype


def _backward_entry(ctx, dy):
    n = ctx.needs_input_grad
    needs = [n[0], n[2], n[3]]
    if not any(needs):
        return (None,) * 7
    x, weight, miss_block, seed, bits = ctx.saved_tensors
    dx, d_bias, d_block = miss_linear_backward_op(dy, x, weight, miss_block, ctx.p, seed, bits, needs)
    return (dx if needs[0] else None, None, d_bias.to(ctx.bias_dtype) if needs[1] else None,
            d_block if needs[2] else None, None, None, None)


miss_linear_op.autograd(_backward_entry, _setup_context)


# ----------------------------------------------------------------------------------------------
# opcheck examples: r dividing in and not (padding), float64 / float32 (strided x) / a float32
# block on a bfloat16 base; without dropout, with a Philox seed, with nn.Dropout's bits

def _examples():
    for i, (dtype, block_dtype, r, with_bias) in enumerate([(torch.float64, torch.float64, 3, True),
                                                            (torch.float32, torch.float32, 4, False),
                                                            (torch.bfloat16, torch.float32, 3, True)]):
        x = randn(5, 8, dtype=dtype, requires_grad=True, seed=10 * i)
        if i == 1:
            x = x.detach().T.contiguous().T.requires_grad_()
        weight = randn(6, 8, dtype=dtype, scale=0.4, seed=10 * i + 1)
        bias = randn(6, dtype=dtype, requires_grad=True, seed=10 * i + 2) if with_bias else None
        block = randn(r, 6, dtype=block_dtype, requires_grad=True, seed=10 * i + 3)
        yield (x, weight, bias, block, 0.0, None, None), {}
        yield (x, weight, bias, block, 0.25, torch.tensor(5 + i), None), {}
        torch.manual_seed(i)     # nn.Dropout's bits belong to x padded to a multiple of r
        yield (x, weight, bias, block, 0.25, None, draw_dropout(padded(x.detach().to(block_dtype), r), 0.25)[1]), {}


def _backward_examples():
    for (x, weight, bias, block, p, seed, bits), _ in _examples():
        dy = randn(x.shape[0], weight.shape[0], dtype=x.dtype, seed=94)
        yield (dy, x.detach(), weight, block.detach(), p, seed, bits, [True, bias is not None, True]), {}
        yield (dy, x.detach(), weight, block.detach(), p, seed, bits, [False, False, True]), {}


miss_linear_op.example(_examples)
miss_linear_backward_op.example(_backward_examples)
