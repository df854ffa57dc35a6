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

Mixed-adapter batches (PEFT's ``adapter_names``: each row of x has its own adapter, or none).  The
rows are grouped by adapter through a permutation ``rows`` (x is never copied into adapter order)
and cut into row tiles that hold one adapter each (``segment_plan``: built on the host from the
group sizes, no device sync)::

    _segment_lowrank_kernel   u[i, :r_g]    = x[rows[i]] P_g            P_g = A_g^T (forward), s_g B_g (dx's t)
    _segment_gemm_kernel      C[rows[i]]    = x[rows[i]] Y + b + u[i] V_g   V_g = (s_g B_g)^T (y), A_g (dx)

with the factors of all adapters packed (zero-padded to the widest rank) so one launch serves every
adapter: y (and dx) in one GEMM pass with each tile's own low-rank term in its epilogue.  The rank
products run in IEEE fp32 (u and t stay float32, PEFT's float32 adapter path); ``round_lowrank``
rounds the base product and the low-rank term to the output dtype before adding them (PEFT's
``result[idx] += lora.to(result.dtype)``).  Tiles of rows without an adapter skip the low-rank dot.

SHiRA's weight gradient (``_sampled_product_kernel``): dw_k = sum_t dY[t, p_k] x[t, q_k] for its K
positions, K dot products over the tokens gathered column by column, split over token chunks whose
float32 partial sums the launcher adds: 2 N K FLOPs instead of the 2 N out in of dY^T x.

RandLoRA's scale gradients (``_randlora_scale_grad_kernel``): from dA_s (r, n, d), one read gives
dgamma[b, j] = sum_i dA_s[i, b, j] lambda[i, b] A[i, j] and dlambda[i, b] = sum_j dA_s[i, b, j] A[i, j]
gamma[b, j] (partial sums per column tile, added by the launcher).
"""
from __future__ import annotations

from typing import NamedTuple

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


# ----------------------------------------------------------------------------------------------
# Mixed-adapter batches: rows grouped by adapter, one adapter per row tile

@triton.jit
def _segment_lowrank_kernel(X, ROWS, P, C, TILE_GROUP, TILE_ROW0, TILE_ROWS, K, R_MAX,
                            stride_xm, stride_xk, stride_pg, stride_pk, stride_pr,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """C[row0 + i, :] = X[ROWS[row0 + i]] P_g for the rows of one tile (group g), fp32."""
    tile = tl.program_id(0)
    group = tl.load(TILE_GROUP + tile).to(tl.int64)
    row0 = tl.load(TILE_ROW0 + tile).to(tl.int64)
    local = tl.arange(0, BLOCK_M)
    row_ok = local < tl.load(TILE_ROWS + tile)
    rows = tl.load(ROWS + row0 + local, mask=row_ok, other=0).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R_MAX
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = ks < K
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        p = tl.load(P + group * stride_pg + ks[:, None] * stride_pk + rr[None, :] * stride_pr,
                    mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(x, p, acc, input_precision="ieee")
    tl.store(C + (row0 + local)[:, None] * R_MAX + rr[None, :], acc, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _segment_gemm_kernel(X, Y, ROWS, U, V, BIAS, C, TILE_GROUP, TILE_ROW0, TILE_ROWS, N, K, R_MAX,
                         stride_xm, stride_xk, stride_yk, stride_yn, stride_vg, stride_vr, stride_vn,
                         HAS_BIAS: tl.constexpr, ROUND_LOWRANK: tl.constexpr, IEEE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_R: tl.constexpr):
    """C[ROWS[row0 + i]] = X[ROWS[row0 + i]] Y + bias (+ U[row0 + i] V_g for a tile of group g >= 0)."""
    tile = tl.program_id(0)
    group = tl.load(TILE_GROUP + tile).to(tl.int64)
    row0 = tl.load(TILE_ROW0 + tile).to(tl.int64)
    local = tl.arange(0, BLOCK_M)
    row_ok = local < tl.load(TILE_ROWS + tile)
    rows = tl.load(ROWS + row0 + local, mask=row_ok, other=0).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = ks < K
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        y = tl.load(Y + ks[:, None] * stride_yk + cols[None, :] * stride_yn, mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        if IEEE:
            acc = tl.dot(x, y, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, y, acc)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if group >= 0:
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < R_MAX
        u = tl.load(U + (row0 + local)[:, None] * R_MAX + rr[None, :], mask=row_ok[:, None] & r_ok[None, :],
                    other=0.0)
        v = tl.load(V + group * stride_vg + rr[:, None] * stride_vr + cols[None, :] * stride_vn,
                    mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        lowrank = tl.dot(u, v, input_precision="ieee")
        if ROUND_LOWRANK:  # PEFT: result (its dtype) += lora.to(result's dtype)
            acc = acc.to(C.dtype.element_ty).to(tl.float32) + lowrank.to(C.dtype.element_ty).to(tl.float32)
        else:
            acc += lowrank
    tl.store(C + rows[:, None] * N + cols[None, :], acc.to(C.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


class SegmentPlan(NamedTuple):
    """The row tiles of a mixed batch, each within one group: adapter groups first, then the rows of
    no adapter (group -1).  tile_group / tile_row0 / tile_rows: int32 tensors (group, first position
    in ``rows``, valid rows) per tile; the first ``adapter_tiles`` tiles cover the ``adapter_rows``
    rows of the adapter groups."""

    tile_group: torch.Tensor
    tile_row0: torch.Tensor
    tile_rows: torch.Tensor
    adapter_tiles: int
    adapter_rows: int
    block_m: int


def segment_plan(counts: list[int], n_rows: int, device, block_m: int | None = None) -> SegmentPlan:
    """Row tiles of ``block_m`` rows (default 64 on CUDA, 16 elsewhere) for groups of ``counts`` rows
    (in ``rows`` order) and the n_rows - sum(counts) rows of no adapter after them; built on the
    host from the sizes alone (no device sync)."""
    block_m = block_m or (64 if torch.device(device).type == "cuda" else 16)
    check_tiles(block_m=block_m)
    if any(c < 0 for c in counts) or sum(counts) > n_rows:
        raise ValueError(f"counts={counts} must be non-negative and sum to at most the {n_rows} rows")
    tiles, row0 = [], 0
    for group, count in [*enumerate(counts), (-1, n_rows - sum(counts))]:
        tiles += [(group, row0 + start, min(block_m, count - start)) for start in range(0, count, block_m)]
        row0 += count
    adapter_tiles = sum(1 for group, _, _ in tiles if group >= 0)
    columns = [torch.tensor(column, dtype=torch.int32).to(device, non_blocking=True)
               for column in (zip(*tiles) if tiles else ([], [], []))]
    return SegmentPlan(*columns, adapter_tiles, sum(counts), block_m)


def pack_segments(mats: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The 2-D matrices ``mats`` (one per group, of one shape but for their rank side) zero-padded
    to the largest and stacked: (G, rows, cols) in ``dtype``, contiguous."""
    rows, cols = max(m.shape[0] for m in mats), max(m.shape[1] for m in mats)
    out = torch.zeros(len(mats), rows, cols, dtype=dtype, device=mats[0].device)
    for g, m in enumerate(mats):
        out[g, :m.shape[0], :m.shape[1]] = m
    return out


def _check_segment_operands(x: torch.Tensor, rows: torch.Tensor, packed: torch.Tensor, k: int) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or packed.dtype != torch.float32:
        raise TypeError(f"x is {x.dtype} and packed is {packed.dtype}; the segment kernels take float32 / float16 / "
                        "bfloat16 x and float32 packed factors")
    if x.ndim != 2 or rows.shape != (x.shape[0],) or rows.dtype != torch.int64:
        raise ValueError(f"x {tuple(x.shape)} and rows {tuple(rows.shape)} ({rows.dtype}): rows must be an int64 "
                         "permutation of x's row indices")
    if packed.ndim != 3 or packed.shape[1] != k:
        raise ValueError(f"packed has shape {tuple(packed.shape)}; expected (groups, {k}, ...)")


def segment_lowrank(x: torch.Tensor, rows: torch.Tensor, packed: torch.Tensor, plan: SegmentPlan, *,
                    block_k: int | None = None) -> torch.Tensor:
    """C (adapter_rows, r_max) float32: row i of the adapter groups is x[rows[i]] P_g with
    P_g = packed[g] (K, r_max), for x (n, K) in float32 / float16 / bfloat16 (tiles converted to
    float32 on load: an IEEE fp32 dot) and ``packed`` float32."""
    _check_segment_operands(x, rows, packed, x.shape[1])
    r_max = packed.shape[2]
    out = torch.empty(plan.adapter_rows, r_max, dtype=torch.float32, device=x.device)
    if plan.adapter_tiles:
        block_k = block_k or (32 if x.is_cuda else 16)
        check_tiles(block_k=block_k)
        _segment_lowrank_kernel[(plan.adapter_tiles,)](
            x, rows, packed, out, plan.tile_group, plan.tile_row0, plan.tile_rows, x.shape[1], r_max,
            x.stride(0), x.stride(1), packed.stride(0), packed.stride(1), packed.stride(2),
            BLOCK_M=plan.block_m, BLOCK_K=block_k, BLOCK_R=block_r(r_max))
    return out


def segment_gemm(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, u: torch.Tensor, packed: torch.Tensor,
                 plan: SegmentPlan, *, bias: torch.Tensor | None = None, round_lowrank: bool = True,
                 block_n: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """C (n, N) in x's dtype: C[rows[i]] = x[rows[i]] y + bias, plus u[i] V_g (V_g = packed[g]
    (r_max, N), float32) for the rows i of adapter group g; x (n, K) and y (K, N) of one dtype
    (float32 / float16 / bfloat16), any strides; u (adapter_rows, r_max) float32 from
    :func:`segment_lowrank`.  ``round_lowrank``: C = fl(fl(x y + b) + fl(u V_g)), PEFT's
    result[idx] += lora.to(result.dtype)."""
    check_operands("the segment GEMM", ("x", x), ("y", y), (("u", u),))
    k, n = y.shape
    _check_segment_operands(x, rows, packed.transpose(1, 2), n)
    if x.shape[1] != k or u.shape != (plan.adapter_rows, packed.shape[1]):
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, y {tuple(y.shape)}, u {tuple(u.shape)}, "
                         f"packed {tuple(packed.shape)}")
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    block_n = block_n or (64 if x.is_cuda else 16)
    block_k = block_k or (32 if x.is_cuda else 16)
    check_tiles(block_n=block_n, block_k=block_k)
    grid = (plan.tile_group.shape[0], triton.cdiv(n, block_n))
    if grid[0]:
        _segment_gemm_kernel[grid](x, y, rows, u, packed, out if bias is None else bias, out, plan.tile_group,
                                   plan.tile_row0, plan.tile_rows, n, k, packed.shape[1], x.stride(0), x.stride(1),
                                   y.stride(0), y.stride(1), packed.stride(0), packed.stride(1), packed.stride(2),
                                   HAS_BIAS=bias is not None, ROUND_LOWRANK=round_lowrank,
                                   IEEE=x.dtype == torch.float32, BLOCK_M=plan.block_m, BLOCK_N=block_n,
                                   BLOCK_K=block_k, BLOCK_R=block_r(packed.shape[1]))
    return out


# ----------------------------------------------------------------------------------------------
# SHiRA's weight gradient: K sampled dot products over the tokens, no (out, in) product

@triton.jit
def _sampled_product_kernel(DY, X, ROWS, COLS, PART, K, T, T_PER_SPLIT, stride_dyt, stride_dyo, stride_xt,
                            stride_xi, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    """PART[s, k] = sum over the tokens of split s of DY[t, ROWS[k]] X[t, COLS[k]] (fp32)."""
    pid_s = tl.program_id(1).to(tl.int64)
    ks = (tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    k_ok = ks < K
    rows = tl.load(ROWS + ks, mask=k_ok, other=0).to(tl.int64)
    cols = tl.load(COLS + ks, mask=k_ok, other=0).to(tl.int64)
    t_first = pid_s * T_PER_SPLIT
    t_end = tl.minimum(t_first + T_PER_SPLIT, T)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for t0 in range(0, T_PER_SPLIT, BLOCK_T):
        ts = t_first + t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        ok = (ts < t_end)[:, None] & k_ok[None, :]
        dy = tl.load(DY + ts[:, None] * stride_dyt + rows[None, :] * stride_dyo, mask=ok, other=0.0)
        x = tl.load(X + ts[:, None] * stride_xt + cols[None, :] * stride_xi, mask=ok, other=0.0)
        acc += tl.sum(dy.to(tl.float32) * x.to(tl.float32), axis=0)
    tl.store(PART + pid_s * K + ks, acc, mask=k_ok)


SAMPLED_TILES = {"BLOCK_K": 64, "BLOCK_T": 32}


def sampled_split(tokens: int, k: int, block_k: int, block_t: int) -> tuple[int, int]:
    """(splits, tokens per split) of the sampled product: about 264 programs (two waves of 132 SMs),
    no split shorter than 256 tokens, whole token tiles per split."""
    blocks = triton.cdiv(k, block_k)
    split = max(1, min(triton.cdiv(tokens, 256), triton.cdiv(264, max(blocks, 1))))
    per_split = triton.cdiv(triton.cdiv(tokens, split), block_t) * block_t
    return triton.cdiv(tokens, per_split), per_split


def sampled_product(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """v (K,) float32: v_k = sum_t dy[t, rows[k]] x[t, cols[k]] for dy (T, out) and x (T, in) of one
    dtype (float32 / float16 / bfloat16), any strides; rows / cols (K,) int64 in range (checked by
    the caller).  The token reduction is split in chunks whose partial sums are added here
    (deterministic)."""
    if dy.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.dtype != dy.dtype:
        raise TypeError(f"dy is {dy.dtype} and x is {x.dtype}; sampled_product takes two float32 / float16 / "
                        "bfloat16 tensors of one dtype")
    if dy.ndim != 2 or x.ndim != 2 or dy.shape[0] != x.shape[0] or rows.shape != cols.shape or rows.ndim != 1:
        raise ValueError(f"dy {tuple(dy.shape)}, x {tuple(x.shape)}, rows {tuple(rows.shape)}, cols "
                         f"{tuple(cols.shape)}: expected (T, out), (T, in) and two (K,) index vectors")
    k, tokens = rows.shape[0], x.shape[0]
    tiles = SAMPLED_TILES if x.is_cuda else {"BLOCK_K": 16, "BLOCK_T": 16}
    split, per_split = sampled_split(tokens, k, tiles["BLOCK_K"], tiles["BLOCK_T"])
    part = torch.zeros(split, k, dtype=torch.float32, device=x.device)
    if k and tokens:
        _sampled_product_kernel[(triton.cdiv(k, tiles["BLOCK_K"]), split)](
            dy, x, rows, cols, part, k, tokens, per_split, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
            **tiles)
    return part[0] if split == 1 else part.sum(dim=0)


# ----------------------------------------------------------------------------------------------
# RandLoRA: the gradients of lambda and gamma from dA_s in one read

@triton.jit
def _randlora_scale_grad_kernel(DAS, A, LAM, GAMMA, DGAMMA, DLAM_PART, R, NB, D, BLOCK_D: tl.constexpr):
    """For base b and a tile of columns j: dgamma[b, j] = sum_i (dA_s[i, b, j] lambda[i, b]) A[i, j] (i in
    order, as torch sums a leading dim) and the tile's part of dlambda[i, b] = sum_j dA_s[i, b, j] A[i, j]
    gamma[b, j] (fp32)."""
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    js = (tile * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    j_ok = js < D
    gamma = tl.load(GAMMA + b * D + js, mask=j_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(0, R):
        d = tl.load(DAS + (i * NB + b) * D + js, mask=j_ok, other=0.0)
        a = tl.load(A + i * D + js, mask=j_ok, other=0.0).to(tl.float32)
        lam = tl.load(LAM + i * NB + b).to(tl.float32)
        acc += d * lam * a
        tl.store(DLAM_PART + (tile * R + i) * NB + b, tl.sum(d * a * gamma, axis=0))
    tl.store(DGAMMA + b * D + js, acc, mask=j_ok)


def randlora_scale_grad(d_a_s: torch.Tensor, lora_A: torch.Tensor, lam: torch.Tensor,
                        gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dlambda (r, n), dgamma (n, d)) float32 from dA_s (r, n, d) float32 contiguous, A (r, 1, d),
    lambda (r, n), gamma (n, d) (float32 / float16 / bfloat16)."""
    r, nb, d = d_a_s.shape
    if d_a_s.dtype != torch.float32 or not d_a_s.is_contiguous():
        raise TypeError(f"d_a_s is {d_a_s.dtype} (contiguous: {d_a_s.is_contiguous()}); pass a contiguous float32 tensor")
    if lora_A.shape != (r, 1, d) or lam.shape != (r, nb) or gamma.shape != (nb, d):
        raise ValueError(f"shapes do not match dA_s {tuple(d_a_s.shape)}: A {tuple(lora_A.shape)}, lambda "
                         f"{tuple(lam.shape)}, gamma {tuple(gamma.shape)}")
    block_d = 128 if d_a_s.is_cuda else 16
    tiles = triton.cdiv(d, block_d)
    d_gamma = torch.empty(nb, d, dtype=torch.float32, device=d_a_s.device)
    part = torch.empty(tiles, r, nb, dtype=torch.float32, device=d_a_s.device)
    _randlora_scale_grad_kernel[(nb, tiles)](d_a_s, lora_A.contiguous(), lam.contiguous(), gamma.contiguous(), d_gamma,
                                             part, r, nb, d, BLOCK_D=block_d)
    return part.sum(dim=0), d_gamma
