"""Low-rank family kernels (LoRA and the methods built on its branch): the GEMMs the shared blocks
(triton_kernels/lowrank_gemm.py: the scaled low-rank GEMM, float32 products with an in-kernel
Philox mask) do not cover.

GEMM with a masked low-rank epilogue (LoRA's input gradient under dropout)::

    C[m, n] = sum_k X[m, k] Y[k, n]  +  mask[m, n] (sum_r U[m, r] V[r, n])

    dx = dY W + mask o (t A):  X = dY (N, out), Y = W (out, in), U = t = s dY B (N, r), V = A (r, in)

mask[m, n] = keep[m, n] / (1 - p), keep regenerated from the Philox seed at the element's logical
index (triton_kernels/dropout.py: the same bits as the forward's mask on x (N, in), on every
device), so neither x_d nor mask o (t A) is ever in memory: one pass writes dx.  fp32
accumulation; loads in the input dtype, store in the output dtype; int64 offsets; any strides.
A half X with a float32 U, V (PEFT's float32 adapter on a half base) rounds the base product to
the half dtype before the masked float32 term joins (``round_base``: PEFT's half dY W), then the
sum is rounded once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import block_r, check_operands, check_tiles
from .dropout import _dropout_keep


@triton.jit
def _masked_lowrank_tile(U, V, seed, p, keep_scale, rows, col0, cols, row_ok, col_ok, R, N,
                         stride_um, stride_ur, stride_vr, stride_vn, LOWRANK_IEEE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """mask o (U V) for one (BLOCK_M, BLOCK_N) output tile, in fp32."""
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    u = tl.load(U + rows[:, None] * stride_um + rr[None, :] * stride_ur, mask=row_ok[:, None] & r_ok[None, :],
                other=0.0)
    v = tl.load(V + rr[:, None] * stride_vr + cols[None, :] * stride_vn, mask=r_ok[:, None] & col_ok[None, :],
                other=0.0)
    if LOWRANK_IEEE:
        lowrank = tl.dot(u, v, input_precision="ieee")
    else:
        lowrank = tl.dot(u, v)
    keep = _dropout_keep(seed, rows, col0, N, p, BLOCK_M, BLOCK_N)
    return tl.where(keep, lowrank * keep_scale, 0.0)


@triton.jit(do_not_specialize=["seed"])
def _masked_lowrank_gemm_kernel(X, Y, U, V, C, M, N, K, R,
                                stride_xm, stride_xk, stride_yk, stride_yn, stride_um, stride_ur,
                                stride_vr, stride_vn, seed, p, keep_scale,
                                ROUND_BASE: tl.constexpr, IEEE: tl.constexpr, LOWRANK_IEEE: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    col0 = pid_n * BLOCK_N
    cols = (col0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < N
    # Without a rounding between them the masked low-rank tile seeds the accumulator, so the K loop
    # runs with one (BLOCK_M, BLOCK_N) fp32 tile live, as a plain GEMM; with one (PEFT's float32
    # adapter on a half base) it joins after the loop, onto the rounded base product.
    if ROUND_BASE:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = _masked_lowrank_tile(U, V, seed, p, keep_scale, rows, col0, cols, row_ok, col_ok, R, N,
                                   stride_um, stride_ur, stride_vr, stride_vn, LOWRANK_IEEE, BLOCK_M, BLOCK_N, BLOCK_R)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = ks < K
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        y = tl.load(Y + ks[:, None] * stride_yk + cols[None, :] * stride_yn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(x, y, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, y, acc)
    if ROUND_BASE:  # PEFT's half dY W, rounded before the float32 masked term joins it
        acc = acc.to(X.dtype.element_ty).to(tl.float32)
        acc += _masked_lowrank_tile(U, V, seed, p, keep_scale, rows, col0, cols, row_ok, col_ok, R, N,
                                    stride_um, stride_ur, stride_vr, stride_vn, LOWRANK_IEEE, BLOCK_M, BLOCK_N,
                                    BLOCK_R)
    tl.store(C + rows[:, None] * N + cols[None, :], acc.to(C.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# 128 x 128 tiles take BLOCK_K = 32: with 64 the float32 (IEEE) variant spills 196 B per thread on sm_90.
MASKED_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
]
# PEFT's float32 adapter on a half base keeps the masked fp32 tile beside the rounded accumulator
# after the loop: at 128 x 128 that is 4 B per thread over sm_90's 255 registers, so it tunes without it.
MASKED_GEMM_MIXED_CONFIGS = MASKED_GEMM_CONFIGS[1:]
_masked_lowrank_gemm_tuned = triton.autotune(configs=MASKED_GEMM_CONFIGS, key=["M", "N", "K"])(
    _masked_lowrank_gemm_kernel)
_masked_lowrank_gemm_mixed_tuned = triton.autotune(configs=MASKED_GEMM_MIXED_CONFIGS, key=["M", "N", "K"])(
    _masked_lowrank_gemm_kernel)


def masked_lowrank_gemm(x: torch.Tensor, y: torch.Tensor, u: torch.Tensor, v: torch.Tensor, seed: int, p: float, *,
                        block_m: int | None = None, block_n: int | None = None,
                        block_k: int | None = None) -> torch.Tensor:
    """C = x y + mask o (u v) for x (M, K), y (K, N), u (M, r), v (r, N), any strides, with the
    Philox mask of (seed, p) for an (M, N) tensor (triton_kernels/dropout.py).  x and y share one
    dtype (float32, float16, bfloat16); u and v share x's dtype or are float32 on a half x (then
    the base product is rounded to x's dtype before the masked term joins).  C is (M, N),
    contiguous, in x's dtype."""
    lowrank_dtype = check_operands("the masked low-rank GEMM", ("x", x), ("y", y), (("u", u), ("v", v)))
    m, k = x.shape
    n = y.shape[1]
    r = u.shape[1]
    if y.shape[0] != k or u.shape[0] != m or v.shape != (r, n):
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, y {tuple(y.shape)}, u {tuple(u.shape)}, "
                         f"v {tuple(v.shape)}")
    if not 0.0 < p < 1.0 or not 0 <= seed < 2 ** 63:
        raise ValueError(f"p={p}, seed={seed}: p must be in (0, 1) (e.g. p=0.1) and seed in [0, 2**63)")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    args = (x, y, u, v, out, m, n, k, r, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            u.stride(0), u.stride(1), v.stride(0), v.stride(1), int(seed), float(p), 1.0 / (1.0 - p))
    flags = dict(ROUND_BASE=x.dtype != torch.float32 and lowrank_dtype == torch.float32,
                 IEEE=x.dtype == torch.float32, LOWRANK_IEEE=lowrank_dtype == torch.float32, BLOCK_R=block_r(r))
    if x.is_cuda and block_m is None and block_n is None and block_k is None:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        tuned = _masked_lowrank_gemm_mixed_tuned if flags["ROUND_BASE"] else _masked_lowrank_gemm_tuned
        tuned[grid](*args, **flags)
    else:
        block_m, block_n, block_k = block_m or 16, block_n or 16, block_k or 16
        check_tiles(block_m=block_m, block_n=block_n, block_k=block_k)
        _masked_lowrank_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            *args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
