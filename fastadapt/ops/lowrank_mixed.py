"""LoRA over a mixed-adapter batch (PEFT's ``adapter_names``): every row of x (N, in) has its own
adapter, or none, in one op.

Notation: adapters g = 1..G with factors A_g (r_g, in), B_g (out, r_g) and scalings s_g, passed
as lists (the op saves the factors themselves, never a concatenated copy); ``rows`` is a permutation of the N row
indices grouped by adapter: ``counts[g]`` rows for adapter g, in adapter order, then the rows of no
adapter (PEFT's "__base__"); R_g = the rows of group g.  ``fastadapt::lora_mixed_linear`` returns [y, u_1, ..., u_G]::

    u_g          = x[R_g] A_g^T                                (|R_g|, r_g), the accumulation dtype
    y            = x W^T + b,   y[R_g] += fl(s_g u_g B_g^T)     (fl: rounded to y's dtype, as PEFT's
                                                                result[idx] += lora.to(result.dtype))

Its backward op ``fastadapt::lora_mixed_linear_backward``, with dY (N, out) and t_g = s_g dY[R_g] B_g::

    dx           = dY W,   dx[R_g] += fl(t_g A_g)
    dA_g         = t_g^T x[R_g],    dB_g = s_g dY[R_g]^T u_g,   db = colsum(dY)

Saved (besides parameters and buffers): x and the u_g (R / in of bytes(x) at most, float32 on a
half x); the factors are saved as the caller's tensors (parameters: no copy).  The groups are disjoint, so their order does not change the result (PEFT iterates over a
set).  No dropout: PEFT's model refuses ``adapter_names`` in training (the bridge runs PEFT's
forward for a layer called directly in training with dropout).

Backends: torch (CPU) gathers each group's rows (index_select), runs its thin products by BLAS and
adds them back with index_add_; triton runs the row-grouped kernels of
fastadapt.triton_kernels.lowrank (one launch for the u_g, one for y; the same two for t_g and dx),
rows read and written through ``rows``, and the parameter gradients as per-group thin products.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..testing import randn
from ._policy import acc_dtype
from ._registry import fused_op


def _groups(rows: Tensor, counts: list[int]) -> list[Tensor]:
    """The row indices of each group, in adapter order."""
    found, row0 = [], 0
    for n_rows in counts:
        found.append(rows[row0:row0 + n_rows])
        row0 += n_rows
    return found


def _acc(*tensors: Tensor) -> torch.dtype:
    dtype = acc_dtype(tensors[0].dtype)
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, acc_dtype(t.dtype))
    return dtype


def _grads(d_a: list[Tensor], d_b: list[Tensor], lora_A: list[Tensor], lora_B: list[Tensor],
           needs: list[bool], like: Tensor) -> list[Tensor]:
    """dA_g, dB_g in the factors' dtypes, or empty tensors where not needed."""
    return ([d.to(a.dtype) for d, a in zip(d_a, lora_A)] if needs[2] else [like.new_empty(0) for _ in lora_A]) + \
           ([d.to(b.dtype) for d, b in zip(d_b, lora_B)] if needs[3] else [like.new_empty(0) for _ in lora_B])


# ----------------------------------------------------------------------------------------------
# torch (CPU) bodies

def _forward_torch(x, weight, bias, lora_A, lora_B, scalings, rows, counts):
    acc = _acc(x, *lora_A)
    y = torch.nn.functional.linear(x, weight, bias)
    us = []
    for idx, a, b, s in zip(_groups(rows, counts), lora_A, lora_B, scalings):
        u = x.index_select(0, idx).to(acc) @ a.to(acc).T
        y.index_add_(0, idx, (u @ (b.to(acc) * s).T).to(y.dtype))
        us.append(u)
    return [y, *us]


def _backward_torch(dy, x, weight, lora_A, lora_B, us, scalings, rows, counts, needs):
    acc = _acc(dy, *lora_A)
    dx, d_bias = dy.new_empty(0), dy.new_empty(0)   # distinct tensors: outputs may not alias
    d_a, d_b = [], []
    if needs[0]:
        dx = dy @ weight
    for idx, a, b, s, u in zip(_groups(rows, counts), lora_A, lora_B, scalings, us):
        dy_g = dy.index_select(0, idx).to(acc)
        if needs[0] or needs[2]:
            t = dy_g @ b.to(acc) * s
            if needs[0]:
                dx.index_add_(0, idx, (t @ a.to(acc)).to(dx.dtype))
            if needs[2]:
                d_a.append(t.T @ x.index_select(0, idx).to(acc))
        if needs[3]:
            d_b.append((dy_g.T @ u) * s)
    if needs[1]:
        d_bias = dy.sum(dim=0, dtype=acc)
    return [dx, d_bias, *_grads(d_a, d_b, lora_A, lora_B, needs, dy)]


# ----------------------------------------------------------------------------------------------
# triton bodies: the row-grouped kernels for the N-row passes, per-group products for dA, dB

def _triton_serves(x: Tensor) -> bool:
    return x.dtype != torch.float64 and x.shape[0] > 0


def _forward_triton(x, weight, bias, lora_A, lora_B, scalings, rows, counts):
    from ..triton_kernels import lowrank as kernels
    acc = _acc(x, *lora_A)
    plan = kernels.segment_plan(counts, x.shape[0], x.device)
    a_packed = kernels.pack_segments([a.T for a in lora_A], torch.float32)
    v_packed = kernels.pack_segments([(b.to(acc) * s).T for b, s in zip(lora_B, scalings)], torch.float32)
    u = kernels.segment_lowrank(x, rows, a_packed, plan)                        # (len(rows), r_max)
    y = kernels.segment_gemm(x, weight.T, rows, u, v_packed, plan, bias=bias, round_lowrank=True)
    us, row0 = [], 0
    for n_rows, a in zip(counts, lora_A):
        us.append(u[row0:row0 + n_rows, :a.shape[0]].contiguous())
        row0 += n_rows
    return [y, *us]


def _backward_triton(dy, x, weight, lora_A, lora_B, us, scalings, rows, counts, needs):
    from ..triton_kernels import lowrank as kernels
    acc = _acc(dy, *lora_A)
    plan = kernels.segment_plan(counts, dy.shape[0], dy.device)
    b_packed = kernels.pack_segments([b.to(acc) * s for b, s in zip(lora_B, scalings)], torch.float32)
    t = kernels.segment_lowrank(dy, rows, b_packed, plan)                       # s_g dY[R_g] B_g, padded
    dx, d_bias = dy.new_empty(0), dy.new_empty(0)
    d_a, d_b = [], []
    if needs[0]:
        a_packed = kernels.pack_segments(list(lora_A), torch.float32)
        dx = kernels.segment_gemm(dy, weight, rows, t, a_packed, plan, round_lowrank=True)
    if needs[2] or needs[3]:
        row0 = 0
        for idx, a, s, u, n_rows in zip(_groups(rows, counts), lora_A, scalings, us, counts):
            t_g = t[row0:row0 + n_rows, :a.shape[0]]
            row0 += n_rows
            if needs[2]:
                d_a.append(t_g.T @ x.index_select(0, idx).to(acc))
            if needs[3]:
                d_b.append((dy.index_select(0, idx).to(acc).T @ u) * s)
    if needs[1]:
        d_bias = dy.sum(dim=0, dtype=acc)
    return [dx, d_bias, *_grads(d_a, d_b, lora_A, lora_B, needs, dy)]


# ----------------------------------------------------------------------------------------------
# fastadapt::lora_mixed_linear

@fused_op("lora_mixed_linear")
def lora_mixed_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: list[Tensor],
                         lora_B: list[Tensor], scalings: list[float], rows: Tensor, counts: list[int]) -> list[Tensor]:
    """[y, u_1, ..., u_G] of LoRA over a mixed-adapter batch (module docstring) for x (N, in)."""
    return _forward_torch(x, weight, bias, lora_A, lora_B, scalings, rows, counts)


@lora_mixed_linear_op.impl("triton")
def _(x, *args):
    return (_forward_triton if _triton_serves(x) else _forward_torch)(x, *args)


@lora_mixed_linear_op.fake
def _(x, weight, bias, lora_A, lora_B, scalings, rows, counts):
    acc = _acc(x, *lora_A)
    return [x.new_empty(x.shape[0], weight.shape[0]), *[x.new_empty(n, a.shape[0], dtype=acc) for n, a in zip(counts, lora_A)]]


@fused_op("lora_mixed_linear_backward", autocast=False)
def lora_mixed_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, lora_A: list[Tensor], lora_B: list[Tensor],
                                  us: list[Tensor], scalings: list[float], rows: Tensor, counts: list[int],
                                  needs: list[bool]) -> list[Tensor]:
    """[dx, db, dA_1..dA_G, dB_1..dB_G] of ``lora_mixed_linear`` (``needs``: x, bias, the A's, the B's;
    the others are empty)."""
    return _backward_torch(dy, x, weight, lora_A, lora_B, us, scalings, rows, counts, needs)


@lora_mixed_linear_backward_op.impl("triton")
def _(dy, x, *args):
    return (_backward_triton if _triton_serves(x) else _backward_torch)(dy, x, *args)


@lora_mixed_linear_backward_op.fake
def _(dy, x, weight, lora_A, lora_B, us, scalings, rows, counts, needs):
    acc = _acc(dy, *lora_A)
    first = [dy.new_empty(x.shape, dtype=x.dtype) if needs[0] else dy.new_empty(0),
             dy.new_empty(dy.shape[1:], dtype=acc) if needs[1] else dy.new_empty(0)]
    return (first + [dy.new_empty(a.shape, dtype=a.dtype) if needs[2] else dy.new_empty(0) for a in lora_A]
            + [dy.new_empty(b.shape, dtype=b.dtype) if needs[3] else dy.new_empty(0) for b in lora_B])


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scalings, rows, counts = inputs
    us = output[1:]
    ctx.mark_non_differentiable(*us)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, rows, *lora_A, *lora_B, *us)   # the factors themselves, not a copy
    ctx.scalings, ctx.counts, ctx.adapters = scalings, counts, len(lora_A)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_entry(ctx, grads):
    n, g = ctx.needs_input_grad, ctx.adapters
    needs = [n[0], n[2], any(n[3]), any(n[4])]     # x, bias, the A's, the B's
    if grads[0] is None or not any(needs):
        return None, None, None, [None] * g, [None] * g, None, None, None
    x, weight, rows, *factors = ctx.saved_tensors
    lora_A, lora_B, us = factors[:g], factors[g:2 * g], factors[2 * g:]
    dx, d_bias, *d_ab = lora_mixed_linear_backward_op(grads[0], x, weight, lora_A, lora_B, us, ctx.scalings,
                                                      rows, ctx.counts, needs)
    d_a = [d if need else None for d, need in zip(d_ab[:g], n[3])]
    d_b = [d if need else None for d, need in zip(d_ab[g:], n[4])]
    return (dx if needs[0] else None, None, d_bias.to(ctx.bias_dtype) if needs[1] else None,
            d_a, d_b, None, None, None)


lora_mixed_linear_op.autograd(_backward_entry, _setup_context)


# ----------------------------------------------------------------------------------------------
# opcheck examples: float64 and float32 (two adapters of ranks 2 and 3, rows of no adapter, a
# strided x), a float32 adapter on a bfloat16 base

def _examples():
    for i, (dtype, adapter_dtype, with_bias) in enumerate([(torch.float64, torch.float64, True),
                                                           (torch.float32, torch.float32, False),
                                                           (torch.bfloat16, torch.float32, True)]):
        s = 10 * i
        x = randn(7, 6, dtype=dtype, requires_grad=True, seed=s)
        if i == 1:
            x = x.detach().T.contiguous().T.requires_grad_()
        weight = randn(5, 6, dtype=dtype, scale=0.4, seed=s + 1)
        bias = randn(5, dtype=dtype, requires_grad=True, seed=s + 2) if with_bias else None
        lora_A = [randn(r, 6, dtype=adapter_dtype, requires_grad=True, seed=s + 3 + r) for r in (2, 3)]
        lora_B = [randn(5, r, dtype=adapter_dtype, requires_grad=True, seed=s + 6 + r) for r in (2, 3)]
        rows = torch.tensor([4, 0, 6, 1, 3], dtype=torch.int64)     # rows 2 and 5: no adapter
        yield (x, weight, bias, lora_A, lora_B, [1.5, 0.5], rows, [3, 2]), {}


def _backward_examples():
    for args, _ in _examples():
        with torch.no_grad():
            y, *us = lora_mixed_linear_op(*args)
        x, weight, bias, lora_A, lora_B, scalings, rows, counts = args
        dy = randn(*y.shape, dtype=x.dtype, seed=97)
        inputs = [t.detach() for t in (dy, x, weight)]
        factors = [[t.detach() for t in lora_A], [t.detach() for t in lora_B]]
        yield (*inputs, *factors, us, scalings, rows, counts, [True, bias is not None, True, True]), {}
        yield (*inputs, *factors, us, scalings, rows, counts, [False, False, False, True]), {}


lora_mixed_linear_op.example(_examples)
lora_mixed_linear_backward_op.example(_backward_examples)
