"""CPU row-block loops of the dora_norm family: reductions over the N tokens that read dY (and x)
block of rows by block, each block from memory once and through cache-sized buffers, instead of
one pass per product and N x d product temporaries (a fresh N x d allocation costs its page faults
on top of the extra pass; benchmarks/NOTES.md, dora_norm, round 2).

    dy_row_pass:           v = dY b_s,  P = u^T dY,  c = colsum(dY o y_pre)     (DoRA's backward)
    colsum_product_linear: colsum(dY o (x W^T))                                  (recompute's y_pre)

Half dY and y_pre (float16 / bfloat16) are converted to the accumulation dtype one block at a
time (exact), so every product and sum runs in float32 (float64 for float64) without a float32
copy of dY.  The Triton twin of ``dy_row_pass`` is triton_kernels.dora_norm.dora_dy_row_pass.
"""
from __future__ import annotations

import torch

# Rows per block of :func:`dy_row_pass`: 2^18 elements of dY (1 MiB float32) stay in cache for
# the three products that read them.
_DY_BLOCK_ELEMENTS = 1 << 18
# Rows per block of :func:`colsum_product_linear`: 2^18 output elements (1 MiB float32), big
# enough for an efficient GEMM, small enough to stay in cache for the product with dY.
_LINEAR_BLOCK_ELEMENTS = 1 << 18


def dy_row_pass(dy: torch.Tensor, u: torch.Tensor, b_scaled: torch.Tensor, y_pre: torch.Tensor):
    """(dY b_scaled, u^T dY, colsum(dY o y_pre)) for dY, y_pre (N, out) in one dtype and u (N, r),
    b_scaled (out, r) in the accumulation dtype (float32, or float64 for float64 dY), in one pass
    over dY: v (N, r), P (r, out) and c (out,), all in the accumulation dtype."""
    acc = u.dtype
    n, out_features = dy.shape
    rows = max(1, _DY_BLOCK_ELEMENTS // max(out_features, 1))
    if n <= rows:  # one block: the three products directly
        dy_acc = dy if dy.dtype == acc else dy.to(acc)
        return dy_acc @ b_scaled, u.T @ dy_acc, (dy_acc * y_pre).sum(dim=0)
    block_rows = rows
    v = torch.empty(n, b_scaled.shape[1], dtype=acc, device=dy.device)
    u_t_dy = torch.zeros(u.shape[1], out_features, dtype=acc, device=dy.device)
    product = torch.empty(block_rows, out_features, dtype=acc, device=dy.device)
    dy_acc = None if dy.dtype == acc else torch.empty(block_rows, out_features, dtype=acc, device=dy.device)
    partial = torch.empty(-(-n // rows), out_features, dtype=acc, device=dy.device)
    for i, start in enumerate(range(0, n, rows)):
        dy_block = dy[start:start + rows]
        if dy_acc is not None:
            dy_block = dy_acc[: dy_block.shape[0]].copy_(dy_block)
        torch.mm(dy_block, b_scaled, out=v[start:start + rows])
        u_t_dy.addmm_(u[start:start + rows].T, dy_block)
        block = torch.mul(dy_block, y_pre[start:start + rows], out=product[: dy_block.shape[0]])
        torch.sum(block, dim=0, out=partial[i])
    return v, u_t_dy, partial.sum(dim=0)


def colsum_product_linear(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """colsum(dY o (x W^T)) for dY (N, out), x (N, in) and W (out, in) of one dtype, accumulated in
    ``acc``: x W^T is formed block of rows by block in x's dtype (a half product rounded as PEFT's
    half GEMM rounds it), never as an N x out tensor."""
    n, out_features = dy.shape
    rows = max(1, _LINEAR_BLOCK_ELEMENTS // max(out_features, 1))
    buf = torch.empty(min(rows, n), out_features, dtype=dy.dtype, device=dy.device)
    partial = torch.empty(-(-n // rows), out_features, dtype=acc, device=dy.device)
    for i, start in enumerate(range(0, n, rows)):
        block = buf[: min(rows, n - start)]
        torch.mm(x[start:start + rows], weight.T, out=block)
        if acc == dy.dtype:
            torch.sum(block.mul_(dy[start:start + rows]), dim=0, out=partial[i])
        else:
            torch.sum(block.to(acc).mul_(dy[start:start + rows]), dim=0, out=partial[i])
    return partial.sum(dim=0)
