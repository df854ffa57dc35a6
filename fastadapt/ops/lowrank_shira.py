"""SHiRA's fused linear op (PEFT's ``shira.Linear``), on 2-D x (N, in).

Notation: w = ``shira_weight`` (K,) at the positions (p_k, q_k) = ``shira_indices`` (repeated
positions add up, as PEFT's sparse COO sum), s the scaling (PEFT's ``set_scale``).
``fastadapt::shira_linear``::

    W_eff = W + s sum_k w_k e_{p_k} e_{q_k}^T        (W's dtype; built, used, freed)
    y     = x W_eff^T + b
    dx    = dY W_eff,     db = colsum(dY)
    dw_k  = s sum_t dY[t, p_k] x[t, q_k]             (a sampled product: only the K entries)

The weight's gradient is never formed: PEFT's autograd computes the whole dY^T x (2 N out in
FLOPs) and keeps K of its entries; here the K dot products over the tokens run as one sampled
dense-dense product (``torch.sparse.sampled_addmm`` over the positions in CSR order, over token
chunks that keep its operands in cache: 2 N K FLOPs).
W_eff is never a saved tensor (PEFT keeps it for backward): saved are x, the plan's int32 index
tensors (2 K + out of them: K = r (in + out), 3 % of bytes(x) at r = 16, d = 1024, N = 2048) and the
parameters.

On the Triton path the K dot products run in fastadapt.triton_kernels.lowrank's sampled-product
kernel (float32 partial sums over token chunks); on the CPU, where csrc/ builds, in the C++ op
``torch.ops.fastadapt_cpu.sampled_product`` (csrc/sampled_product.cpp: token chunks transposed into
L2-sized buffers, 8 positions of a row per load of dY's vector, AVX2; its result does not depend on
the thread count), else by ``torch.sparse.sampled_addmm``.

The CSR plan of the positions (``shira_plan``: a stable sort of the flat positions, row pointers by
searchsorted; static shapes, no host read) is built per call; the range check (``check_indices``,
one host read: PEFT does not check and indexes out of bounds) once per index tensor by the caller.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..testing import randn
from ._policy import acc_dtype
from ._registry import fused_op


class ShiraPlan(NamedTuple):
    """The positions of a SHiRA adapter in CSR order (sorted by row, then column; repeated positions
    kept as separate entries): crow (out + 1,) and ccol (K,) int32, order (K,) int32 (entry i of the
    CSR order is position ``order[i]`` of ``shira_weight``).  Static shapes: built without host
    reads, also inside torch.compile."""

    crow: Tensor
    ccol: Tensor
    order: Tensor


def check_indices(indices: Tensor, out_features: int, in_features: int) -> None:
    """ValueError naming ``shira_indices`` for a tensor that is not (2, K) integer positions inside
    an (out, in) weight (one host read of the range: PEFT does not check and indexes out of bounds)."""
    if indices.ndim != 2 or indices.shape[0] != 2 or indices.is_floating_point():
        raise ValueError(f"shira_indices has shape {tuple(indices.shape)} ({indices.dtype}); expected an integer "
                         "(2, K) tensor of (row, column) positions")
    rows, cols = indices.to(torch.int64)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= out_features or int(cols.min()) < 0
                         or int(cols.max()) >= in_features):
        raise ValueError(f"shira_indices must hold rows in 0..{out_features - 1} and columns in 0..{in_features - 1}")


def shira_plan(indices: Tensor, out_features: int, in_features: int) -> ShiraPlan:
    """The CSR plan of ``indices`` (2, K) (checked by :func:`check_indices` where it comes from)."""
    rows, cols = indices.to(torch.int64)
    order = torch.argsort(rows * in_features + cols, stable=True)
    crow = torch.searchsorted(rows[order], torch.arange(out_features + 1, device=indices.device))
    return ShiraPlan(crow.to(torch.int32), cols[order].to(torch.int32), order.to(torch.int32))


def _positions(crow: Tensor, ccol: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, cols) int64 of the CSR entries."""
    rows = torch.repeat_interleave(torch.arange(crow.shape[0] - 1, device=crow.device), crow.diff(),
                                   output_size=ccol.shape[0])
    return rows, ccol.to(torch.int64)


def _merged_weight(weight: Tensor, shira_weight: Tensor, scaling: float, crow: Tensor, ccol: Tensor,
                   order: Tensor) -> Tensor:
    values = (shira_weight[order.to(torch.int64)] * scaling).to(weight.dtype)
    return weight.index_put(_positions(crow, ccol), values, accumulate=True)


# Tokens per call of the sampled product: torch's kernel transposes its second operand and runs one
# dot product per entry over the tokens; chunks of about a megabyte of x (float32) keep both
# operands' rows in cache (1.6x faster than one call over N = 2048 tokens, d = 1024, K = 65536).
SAMPLED_CHUNK_ELEMENTS = 1 << 18
SAMPLED_MIN_ROWS = 64


def sampled_product(dy: Tensor, x: Tensor, crow: Tensor, ccol: Tensor) -> Tensor:
    """(dY^T x)[p, q] at the CSR entries (K,), in the accumulation dtype (half inputs in float32),
    summed over token chunks of SAMPLED_CHUNK_ELEMENTS elements of x."""
    acc = acc_dtype(x.dtype)
    rows = max(SAMPLED_MIN_ROWS, SAMPLED_CHUNK_ELEMENTS // max(x.shape[1], dy.shape[1], 1))
    values = torch.zeros(ccol.shape[0], dtype=acc, device=x.device)
    with warnings.catch_warnings():   # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, ccol, torch.zeros_like(values), (dy.shape[1], x.shape[1]),
                                          check_invariants=False)
        for start in range(0, x.shape[0], rows):
            stop = start + rows
            values.add_(torch.sparse.sampled_addmm(pattern, dy[start:stop].to(acc).T, x[start:stop].to(acc),
                                                   beta=0.0).values())
    return values


@fused_op("shira_linear")
def shira_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], shira_weight: Tensor, scaling: float,
                    crow: Tensor, ccol: Tensor, order: Tensor) -> Tensor:
    """y = x (W + s sparse(w))^T + b (module docstring; the plan's tensors from :func:`shira_plan`)."""
    return F.linear(x, _merged_weight(weight, shira_weight, scaling, crow, ccol, order), bias)


shira_linear_op.impl("triton")(shira_linear_op.implementations["torch"])   # W_eff by index_put, cuBLAS's GEMM


@shira_linear_op.fake
def _(x, weight, bias, shira_weight, scaling, crow, ccol, order):
    return x.new_empty(x.shape[0], weight.shape[0])


def _backward(dy, x, weight, shira_weight, scaling, crow, ccol, order, needs, sampled):
    dx, d_bias, d_w = (dy.new_empty(0) for _ in range(3))
    if needs[0]:
        dx = dy @ _merged_weight(weight, shira_weight, scaling, crow, ccol, order)
    if needs[2]:
        values = sampled() * scaling                                   # in CSR order
        d_w = torch.empty_like(values).index_copy_(0, order.to(torch.int64), values).to(shira_weight.dtype)
    if needs[1]:
        d_bias = dy.sum(dim=0, dtype=acc_dtype(dy.dtype))
    return [dx, d_bias, d_w]


@fused_op("shira_linear_backward", autocast=False)
def shira_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, shira_weight: Tensor, scaling: float,
                             crow: Tensor, ccol: Tensor, order: Tensor, needs: list[bool]) -> list[Tensor]:
    """[dx, db, dw] of ``shira_linear`` (``needs``: which of them; the others are empty)."""
    return _backward(dy, x, weight, shira_weight, scaling, crow, ccol, order, needs,
                     lambda: sampled_product(dy, x, crow, ccol))


@shira_linear_backward_op.impl("cpp")
def _(dy, x, weight, shira_weight, scaling, crow, ccol, order, needs):
    from .. import _cpp
    _cpp.extension()   # loads csrc/, which registers torch.ops.fastadapt_cpu
    return _backward(dy, x, weight, shira_weight, scaling, crow, ccol, order, needs,
                     lambda: torch.ops.fastadapt_cpu.sampled_product(dy, x, crow, ccol))


@shira_linear_backward_op.impl("triton")
def _(dy, x, weight, shira_weight, scaling, crow, ccol, order, needs):
    if x.dtype == torch.float64:
        return shira_linear_backward_op.implementations["torch"](dy, x, weight, shira_weight, scaling, crow, ccol,
                                                                 order, needs)
    from ..triton_kernels import lowrank as kernels
    return _backward(dy, x, weight, shira_weight, scaling, crow, ccol, order, needs,
                     lambda: kernels.sampled_product(dy, x, *_positions(crow, ccol)))


@shira_linear_backward_op.fake
def _(dy, x, weight, shira_weight, scaling, crow, ccol, order, needs):
    shapes = [(x.dtype, x.shape), (acc_dtype(dy.dtype), dy.shape[1:]), (shira_weight.dtype, shira_weight.shape)]
    return [dy.new_empty(shape, dtype=dtype) if need else dy.new_empty(0) for (dtype, shape), need in zip(shapes, needs)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, shira_weight, scaling, crow, ccol, order = inputs
    ctx.save_for_backward(x, weight, shira_weight, crow, ccol, order)
    ctx.scaling, ctx.bias_dtype = scaling, None if bias is None else bias.dtype


def _backward_entry(ctx, dy):
    n = ctx.needs_input_grad
    needs = [n[0], n[2], n[3]]
    if not any(needs):
        return (None,) * 8
    x, weight, shira_weight, *plan = ctx.saved_tensors
    dx, d_bias, d_w = shira_linear_backward_op(dy, x, weight, shira_weight, ctx.scaling, *plan, needs)
    return (dx if needs[0] else None, None, d_bias.to(ctx.bias_dtype) if needs[1] else None,
            d_w if needs[2] else None, None, None, None, None)


shira_linear_op.autograd(_backward_entry, _setup_context)


def _examples():
    for i, (dtype, w_dtype, with_bias) in enumerate([(torch.float64, torch.float64, True),
                                                     (torch.float32, torch.float32, False),
                                                     (torch.bfloat16, torch.float32, True)]):
        x = randn(5, 7, dtype=dtype, requires_grad=True, seed=10 * i)
        if i == 1:
            x = x.detach().T.contiguous().T.requires_grad_()
        weight = randn(6, 7, dtype=dtype, scale=0.4, seed=10 * i + 1)
        bias = randn(6, dtype=dtype, requires_grad=True, seed=10 * i + 2) if with_bias else None
        indices = torch.tensor([[0, 5, 2, 2, 5], [6, 1, 3, 3, 0]])      # a repeated position
        shira_weight = randn(5, dtype=w_dtype, requires_grad=True, seed=10 * i + 3)
        yield (x, weight, bias, shira_weight, 1.5, *shira_plan(indices, 6, 7)), {}


def _backward_examples():
    for (x, weight, bias, shira_weight, scaling, *plan), _ in _examples():
        dy = randn(x.shape[0], weight.shape[0], dtype=x.dtype, seed=93)
        yield (dy, x.detach(), weight, shira_weight.detach(), scaling, *plan, [True, bias is not None, True]), {}


shira_linear_op.example(_examples)
shira_linear_backward_op.example(_backward_examples)
