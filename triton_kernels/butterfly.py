"""Triton kernels of the butterfly family: strided block-diagonal passes, compact-WY reflections, RoAd.

Butterfly pass (BOFT, GOFT; fastadapt.ops.butterfly_plan).  Features f = ((a M + m) L + l) H + r;
group g = a L + l owns the c = M H features of local index j = m H + r, and

    y[:, f(g, j')] = sum_j x[:, f(g, j)] B[g, j, j']          (row vectors, one c x c block per group)

A program holds a (BLOCK_M rows, BLOCK_K local columns) tile of one group's x and a
(BLOCK_K, BLOCK_N) tile of its block: x is read once and y written once per pass.  Column offsets
are computed from (a, l, j), so the permutations of the butterfly never move data.  B is float32;
a float32 x runs an IEEE fp32 tl.dot; a float16 / bfloat16 x runs two tensor-core dots with B
split as B_hi + B_lo (B_hi = B rounded to x's dtype, B_lo its rounded remainder), which keeps B to
~16 bits of mantissa instead of rounding it to x's 8 or 11.  fp32 accumulation, y in ``out_dtype``.
Gradient of the blocks: dB[g] = sum over rows of x_g^T dy_g, a (BLOCK_K, BLOCK_N) fp32 tile per
program accumulated over a split of the rows; the launcher adds the splits' partial sums
(deterministic).  Grid (row tiles, groups, column tiles) and (groups, tile pairs, row splits).

Compact-WY reflections (HRA, ETHER).  Per feature block j (b features, U_j (b, k), K_j (k, k)):

    P = x_j U_j (fp32 over b),   z_j = x_j - (P K_j) U_j^T

one program per (row tile, block): the first sweep over the block's columns accumulates P, the
second writes z (x's second read is an L2 hit for the usual block sizes); P is stored too (N n k
numbers, what backward needs).  k is padded to a tile of 16.  The input gradient is the same
kernel with K^T (dx = g - ((g U) K^T) U^T, Q = g U).

BOFT's scale epilogue.  y = h o s + b in fp32 with one rounding (a float32 boft_s on a half base:
PEFT's float32 epilogue), and backward's ds = sum_rows dy o h and db = sum_rows dy from one read of
dy and h (fp32 partial sums per row split).

RoAd.  Output pairs (a, a + group/2) in groups of ``group``: y_a = f_a h_a - g_a h_b,
y_b = f_b h_b + g_b h_a, one elementwise pass over (row tile, half-group columns).  Backward reads
dy and the base output h once: dh_a = f_a dy_a + g_b dy_b, dh_b = f_b dy_b - g_a dy_a, and the
column sums df = sum dy o h, dg_a = -sum dy_a h_b, dg_b = sum dy_b h_a as fp32 partial sums per
row split (the launcher adds them).

All offsets are int64; activations take any strides; the small operands (blocks, U, K, f, g) are
float32.  The interpreter runs fixed small tiles.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._tiles import block_r, sm_count

HALF = (torch.float16, torch.bfloat16)


@triton.jit
def _pass_columns(group, j, M, L, H):
    """Feature index of local column j of group g = a L + l."""
    a = group // L
    l = group % L
    return ((a * M + j // H) * L + l) * H + j % H


@triton.jit
def _butterfly_pass_fwd_kernel(x_ptr, b_ptr, y_ptr, N, c, M, L, H,
                               stride_xm, stride_xk, stride_bg, stride_bj, stride_bk, stride_ym,
                               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                               SPLIT_B: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1).to(tl.int64)
    pid_n = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    out_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    out_ok = out_j < c
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, c, BLOCK_K):
        in_j = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        in_ok = in_j < c
        cols = _pass_columns(group, in_j, M, L, H)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_ok[:, None] & in_ok[None, :], other=0.0)
        B = tl.load(b_ptr + group * stride_bg + in_j[:, None] * stride_bj + out_j[None, :] * stride_bk,
                    mask=in_ok[:, None] & out_ok[None, :], other=0.0)
        if SPLIT_B:
            B_hi = B.to(x.dtype)
            B_lo = (B - B_hi.to(tl.float32)).to(x.dtype)
            acc += tl.dot(x, B_hi)
            acc += tl.dot(x, B_lo)
        else:
            acc += tl.dot(x.to(tl.float32), B, input_precision="ieee")
    cols = _pass_columns(group, out_j, M, L, H)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & out_ok[None, :])


@triton.jit
def _butterfly_pass_bwd_blocks_kernel(x_ptr, g_ptr, part_ptr, N, c, M, L, H, rows_per_split, n_tiles_n,
                                      stride_xm, stride_xk, stride_gm, stride_gk, stride_ps, stride_pg,
                                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                                      HALF_DOT: tl.constexpr):
    """partial[split, g, j, j'] = sum over the split's rows of x[:, f(g, j)] g[:, f(g, j')] (fp32)."""
    group = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    in_j = (tile // n_tiles_n) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    out_j = (tile % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    in_ok = in_j < c
    out_ok = out_j < c
    in_cols = _pass_columns(group, in_j, M, L, H)
    out_cols = _pass_columns(group, out_j, M, L, H)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, N)
    for m0 in range(start, stop, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < stop
        x = tl.load(x_ptr + rows[:, None] * stride_xm + in_cols[None, :] * stride_xk,
                    mask=row_ok[:, None] & in_ok[None, :], other=0.0)
        g = tl.load(g_ptr + rows[:, None] * stride_gm + out_cols[None, :] * stride_gk,
                    mask=row_ok[:, None] & out_ok[None, :], other=0.0)
        if HALF_DOT:  # products of two half values are exact in fp32
            acc += tl.dot(tl.trans(x), g)
        else:
            acc += tl.dot(tl.trans(x.to(tl.float32)), g.to(tl.float32), input_precision="ieee")
    tl.store(part_ptr + split * stride_ps + group * stride_pg + in_j[:, None] * c + out_j[None, :], acc,
             mask=in_ok[:, None] & out_ok[None, :])


@triton.jit
def _householder_fwd_kernel(x_ptr, u_ptr, k_ptr, z_ptr, p_ptr, N, b, k,
                            stride_xm, stride_xk, stride_un, stride_ub, stride_uk, stride_kn, stride_ki, stride_kj,
                            stride_zm, stride_pn, stride_pm,
                            BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr):
    """P = x_j U_j and z_j = x_j - (P K_j) U_j^T for a tile of rows and feature block j."""
    pid_m = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    ranks = tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < N
    rank_ok = ranks < k
    P = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for c0 in range(0, b, BLOCK_B):
        cols = c0 + tl.arange(0, BLOCK_B).to(tl.int64)
        col_ok = cols < b
        x = tl.load(x_ptr + rows[:, None] * stride_xm + (block * b + cols)[None, :] * stride_xk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        U = tl.load(u_ptr + block * stride_un + cols[:, None] * stride_ub + ranks[None, :] * stride_uk,
                    mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        P += tl.dot(x.to(tl.float32), U, input_precision="ieee")
    tl.store(p_ptr + block * stride_pn + rows[:, None] * stride_pm + ranks[None, :], P,
             mask=row_ok[:, None] & rank_ok[None, :])
    K = tl.load(k_ptr + block * stride_kn + ranks[:, None] * stride_ki + ranks[None, :] * stride_kj,
                mask=rank_ok[:, None] & rank_ok[None, :], other=0.0)
    PK = tl.dot(P, K, input_precision="ieee")
    for c0 in range(0, b, BLOCK_B):
        cols = c0 + tl.arange(0, BLOCK_B).to(tl.int64)
        col_ok = cols < b
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + (block * b + cols)[None, :] * stride_xk, mask=mask, other=0.0)
        Ut = tl.load(u_ptr + block * stride_un + cols[None, :] * stride_ub + ranks[:, None] * stride_uk,
                     mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        z = x.to(tl.float32) - tl.dot(PK, Ut, input_precision="ieee")
        tl.store(z_ptr + rows[:, None] * stride_zm + (block * b + cols)[None, :], z.to(z_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _road_fwd_kernel(h_ptr, f_ptr, g_ptr, y_ptr, N, half, stride_hm, stride_hk, stride_ym,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """y_a = f_a h_a - g_a h_b, y_b = f_b h_b + g_b h_a for a row tile and a column chunk of one group."""
    pid_m = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    within = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    col_a = group * 2 * half + within
    col_b = col_a + half
    ok = within < half
    mask = (rows < N)[:, None] & ok[None, :]
    ha = tl.load(h_ptr + rows[:, None] * stride_hm + col_a[None, :] * stride_hk, mask=mask, other=0.0).to(tl.float32)
    hb = tl.load(h_ptr + rows[:, None] * stride_hm + col_b[None, :] * stride_hk, mask=mask, other=0.0).to(tl.float32)
    fa = tl.load(f_ptr + col_a, mask=ok, other=0.0)[None, :]
    fb = tl.load(f_ptr + col_b, mask=ok, other=0.0)[None, :]
    ga = tl.load(g_ptr + col_a, mask=ok, other=0.0)[None, :]
    gb = tl.load(g_ptr + col_b, mask=ok, other=0.0)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + col_a[None, :], (fa * ha - ga * hb).to(y_ptr.dtype.element_ty),
             mask=mask)
    tl.store(y_ptr + rows[:, None] * stride_ym + col_b[None, :], (fb * hb + gb * ha).to(y_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _road_bwd_kernel(dy_ptr, h_ptr, f_ptr, g_ptr, dh_ptr, part_ptr, N, half, out, rows_per_split,
                     stride_dym, stride_dyk, stride_hm, stride_hk, stride_dhm, stride_ps,
                     NEED_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """dh (if NEED_H) for a split of the rows and a column chunk of one group, and the split's
    partial sums of df (row 0 of the partial) and dg (row 1)."""
    group = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    within = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    col_a = group * 2 * half + within
    col_b = col_a + half
    ok = within < half
    fa = tl.load(f_ptr + col_a, mask=ok, other=0.0)[None, :]
    fb = tl.load(f_ptr + col_b, mask=ok, other=0.0)[None, :]
    ga = tl.load(g_ptr + col_a, mask=ok, other=0.0)[None, :]
    gb = tl.load(g_ptr + col_b, mask=ok, other=0.0)[None, :]
    df_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    df_b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dg_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dg_b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, N)
    for m0 in range(start, stop, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask = (rows < stop)[:, None] & ok[None, :]
        dya = tl.load(dy_ptr + rows[:, None] * stride_dym + col_a[None, :] * stride_dyk, mask=mask,
                      other=0.0).to(tl.float32)
        dyb = tl.load(dy_ptr + rows[:, None] * stride_dym + col_b[None, :] * stride_dyk, mask=mask,
                      other=0.0).to(tl.float32)
        ha = tl.load(h_ptr + rows[:, None] * stride_hm + col_a[None, :] * stride_hk, mask=mask,
                     other=0.0).to(tl.float32)
        hb = tl.load(h_ptr + rows[:, None] * stride_hm + col_b[None, :] * stride_hk, mask=mask,
                     other=0.0).to(tl.float32)
        df_a += tl.sum(dya * ha, 0)
        df_b += tl.sum(dyb * hb, 0)
        dg_a -= tl.sum(dya * hb, 0)
        dg_b += tl.sum(dyb * ha, 0)
        if NEED_H:
            tl.store(dh_ptr + rows[:, None] * stride_dhm + col_a[None, :],
                     (fa * dya + gb * dyb).to(dh_ptr.dtype.element_ty), mask=mask)
            tl.store(dh_ptr + rows[:, None] * stride_dhm + col_b[None, :],
                     (fb * dyb - ga * dya).to(dh_ptr.dtype.element_ty), mask=mask)
    base = part_ptr + split * stride_ps
    tl.store(base + col_a, df_a, mask=ok)
    tl.store(base + col_b, df_b, mask=ok)
    tl.store(base + out + col_a, dg_a, mask=ok)
    tl.store(base + out + col_b, dg_b, mask=ok)


@triton.jit
def _scale_fwd_kernel(h_ptr, s_ptr, b_ptr, y_ptr, N, out, stride_hm, stride_hk, stride_ym,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = h o s + b (fp32 arithmetic, one rounding to y's dtype): BOFT's boft_s epilogue."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    col_ok = cols < out
    mask = (rows < N)[:, None] & col_ok[None, :]
    h = tl.load(h_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_hk, mask=mask, other=0.0).to(tl.float32)
    y = h * tl.load(s_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_bwd_kernel(dy_ptr, h_ptr, part_ptr, N, out, rows_per_split, stride_dym, stride_dyk, stride_hm,
                      stride_hk, stride_ps, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per split of the rows, fp32 partial sums of ds = sum dy o h (partial row 0) and db = sum dy (row 1)."""
    pid_c = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    col_ok = cols < out
    ds = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, N)
    for m0 in range(start, stop, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask = (rows < stop)[:, None] & col_ok[None, :]
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyk, mask=mask,
                     other=0.0).to(tl.float32)
        h = tl.load(h_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_hk, mask=mask, other=0.0).to(tl.float32)
        ds += tl.sum(dy * h, 0)
        db += tl.sum(dy, 0)
    tl.store(part_ptr + split * stride_ps + cols, ds, mask=col_ok)
    tl.store(part_ptr + split * stride_ps + out + cols, db, mask=col_ok)


# ----------------------------------------------------------------------------------------------
# launchers

def _check_small(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.dtype != torch.float32 or t.device != like.device:
        raise TypeError(f"{name} is {t.dtype} on {t.device}; the kernels take it in float32 on {like.device}")


def _check_activation(name: str, t: torch.Tensor) -> None:
    if t.ndim != 2 or t.dtype not in (torch.float32, *HALF):
        raise TypeError(f"{name} is a {t.ndim}-D {t.dtype} tensor; the kernels take 2-D float32, float16 or bfloat16")


def pass_tiles(c: int, half: bool, interpreted: bool = False, *, reduction: bool = False) -> dict:
    """Tile sizes of a pass of width c (shared with benchmarks/compile_butterfly.py): a column tile
    of c padded to a power of two >= 16, at most 64 (wider blocks loop over K and launch column
    tiles); 64 rows, except 64-wide fp32 tiles (IEEE dots keep both operands in registers): 16 rows
    for the pass, 32 for the block-gradient ``reduction`` (the sizes at which ptxas for sm_90 does not
    spill; 32 / 16 rows spill 12 / 16 B per thread); 16 rows in the interpreter."""
    block = min(64, block_r(c))
    if interpreted:
        block_m = 16
    elif block == 64 and not half:
        block_m = 32 if reduction else 16
    else:
        block_m = 64
    return {"BLOCK_M": block_m, "BLOCK_K": block, "BLOCK_N": block, "num_warps": 4}


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def row_splits(N: int, block_m: int, programs: int, splits: int | None = None) -> tuple[int, int]:
    """(splits, rows_per_split) of a reduction over N rows by ``programs`` programs per split:
    about 256 programs in all, no split shorter than 4 row tiles; rows_per_split a multiple of block_m."""
    if splits is None:
        splits = max(1, min(triton.cdiv(N, 4 * block_m), triton.cdiv(256, programs)))
    rows_per_split = triton.cdiv(triton.cdiv(max(N, 1), splits), block_m) * block_m
    return max(1, triton.cdiv(N, rows_per_split)), rows_per_split


def butterfly_pass_forward(x: torch.Tensor, blocks: torch.Tensor, geometry, out_dtype: torch.dtype) -> torch.Tensor:
    """y = one butterfly pass of x (N, d) (any strides) with blocks (A L, c, c) float32 (any strides:
    a transposed view applies the transposed pass), geometry (A, M, L, H); y contiguous in out_dtype."""
    _check_activation("x", x)
    _check_small("blocks", blocks, x)
    A, M, L, H = geometry
    N, d = x.shape
    c = M * H
    if A * M * L * H != d or tuple(blocks.shape) != (A * L, c, c):
        raise ValueError(f"blocks {tuple(blocks.shape)} and geometry {tuple(geometry)} do not tile x {tuple(x.shape)}")
    y = torch.empty(N, d, dtype=out_dtype, device=x.device)
    tiles = pass_tiles(c, x.dtype in HALF, _interpreted(x))
    grid = (triton.cdiv(N, tiles["BLOCK_M"]), A * L, triton.cdiv(c, tiles["BLOCK_N"]))
    _butterfly_pass_fwd_kernel[grid](x, blocks, y, N, c, M, L, H, x.stride(0), x.stride(1),
                                     blocks.stride(0), blocks.stride(1), blocks.stride(2), y.stride(0),
                                     SPLIT_B=x.dtype in HALF, **tiles)
    return y


def butterfly_pass_grad(x: torch.Tensor, g: torch.Tensor, geometry, splits: int | None = None) -> torch.Tensor:
    """dB (A L, c, c) float32 with dB[g] = sum_rows x_g^T g_g for x, g (N, d) of one dtype, any strides."""
    _check_activation("x", x)
    if g.shape != x.shape or g.dtype != x.dtype or g.device != x.device:
        raise TypeError(f"g is {g.dtype} {tuple(g.shape)} on {g.device} but x is {x.dtype} {tuple(x.shape)} on "
                        f"{x.device}; they must match")
    A, M, L, H = geometry
    N = x.shape[0]
    c = M * H
    groups = A * L
    tiles = pass_tiles(c, x.dtype in HALF, _interpreted(x), reduction=True)
    n_tiles = triton.cdiv(c, tiles["BLOCK_N"])
    splits, rows_per_split = row_splits(N, tiles["BLOCK_M"], groups * n_tiles * n_tiles, splits)
    partial = torch.zeros(splits, groups, c, c, dtype=torch.float32, device=x.device)
    _butterfly_pass_bwd_blocks_kernel[(groups, n_tiles * n_tiles, splits)](
        x, g, partial, N, c, M, L, H, rows_per_split, n_tiles, x.stride(0), x.stride(1), g.stride(0), g.stride(1),
        partial.stride(0), partial.stride(1), HALF_DOT=x.dtype in HALF, **tiles)
    return partial.sum(0)


def householder_tiles(b: int, k: int, interpreted: bool = False, *, rows: int = 0, blocks: int = 1,
                      sms: int = 1) -> dict:
    """Tiles of the compact-WY kernel (shared with benchmarks/compile_butterfly.py): the rank padded
    to a power of two >= 16, column chunks of up to 64 features; 64 rows per program, halved (to
    no fewer than 16) while the launch of ``rows`` rows x ``blocks`` feature blocks would start
    fewer programs than the GPU's ``sms`` (HRA's one block at N = 8192: 128 programs of 64 rows
    would leave 4 of the H200's 132 SMs idle for the whole pass; 32 rows give 256); 16 rows in the
    interpreter."""
    block_m = 64
    while block_m > 16 and triton.cdiv(rows, block_m) * blocks < sms:
        block_m //= 2
    return {"BLOCK_M": 16 if interpreted else block_m, "BLOCK_B": min(64, block_r(b)), "BLOCK_R": block_r(k),
            "num_warps": 4}


def householder_forward(x: torch.Tensor, U: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, P): z = x - ((x_j U_j) K_j) U_j^T per block j, P = x U (n, N, k) float32; x (N, n b) any
    strides, U (n, b, k) and K (n or 1, k, k) float32 (a transposed view of K gives the input
    gradient's K^T).  z contiguous in x's dtype."""
    _check_activation("x", x)
    _check_small("U", U, x)
    _check_small("K", K, x)
    n, b, k = U.shape
    N = x.shape[0]
    if n * b != x.shape[1] or K.shape[1:] != (k, k) or K.shape[0] not in (1, n):
        raise ValueError(f"U {tuple(U.shape)} and K {tuple(K.shape)} do not fit x {tuple(x.shape)}")
    z = torch.empty(N, n * b, dtype=x.dtype, device=x.device)
    P = torch.empty(n, N, k, dtype=torch.float32, device=x.device)
    tiles = householder_tiles(b, k, _interpreted(x), rows=N, blocks=n, sms=sm_count(x.device))
    _householder_fwd_kernel[(triton.cdiv(N, tiles["BLOCK_M"]), n)](
        x, U, K, z, P, N, b, k, x.stride(0), x.stride(1), U.stride(0), U.stride(1), U.stride(2),
        0 if K.shape[0] == 1 else K.stride(0), K.stride(1), K.stride(2), z.stride(0), P.stride(0), P.stride(1),
        **tiles)
    return z, P


def road_tiles(half: int, interpreted: bool = False) -> dict:
    """Tiles of the RoAd kernels (shared with benchmarks/compile_butterfly.py)."""
    return {"BLOCK_M": 16 if interpreted else 32, "BLOCK_C": min(128, triton.next_power_of_2(half)),
            "num_warps": 4}


def road_forward(h: torch.Tensor, f: torch.Tensor, g: torch.Tensor, group_size: int) -> torch.Tensor:
    """y = RoAd's pair rotation of h (N, out) (any strides) with f, g (out,) float32; y contiguous in h's dtype."""
    _check_activation("h", h)
    _check_small("f", f, h)
    _check_small("g", g, h)
    N, out = h.shape
    half = group_size // 2
    if group_size % 2 or out % group_size or f.shape != (out,) or g.shape != (out,):
        raise ValueError(f"group_size={group_size}, f {tuple(f.shape)}, g {tuple(g.shape)} do not fit h {tuple(h.shape)}")
    y = torch.empty(N, out, dtype=h.dtype, device=h.device)
    tiles = road_tiles(half, _interpreted(h))
    grid = (triton.cdiv(N, tiles["BLOCK_M"]), out // group_size, triton.cdiv(half, tiles["BLOCK_C"]))
    _road_fwd_kernel[grid](h, f, g, y, N, half, h.stride(0), h.stride(1), y.stride(0), **tiles)
    return y


def road_backward(dy: torch.Tensor, h: torch.Tensor, f: torch.Tensor, g: torch.Tensor, group_size: int,
                  need_h: bool, splits: int | None = None):
    """(dh or None, df, dg) of road_forward; dy and h any strides; df, dg float32 (out,)."""
    _check_activation("h", h)
    if dy.shape != h.shape or dy.device != h.device:
        raise ValueError(f"dy {tuple(dy.shape)} on {dy.device} does not match h {tuple(h.shape)} on {h.device}")
    N, out = h.shape
    half = group_size // 2
    tiles = road_tiles(half, _interpreted(h))
    n_chunks = triton.cdiv(half, tiles["BLOCK_C"])
    groups = out // group_size
    splits, rows_per_split = row_splits(N, tiles["BLOCK_M"], groups * n_chunks, splits)
    dh = torch.empty(N, out, dtype=h.dtype, device=h.device) if need_h else h.new_empty(0)
    partial = torch.zeros(splits, 2, out, dtype=torch.float32, device=h.device)
    _road_bwd_kernel[(groups, n_chunks, splits)](
        dy, h, f, g, dh, partial, N, half, out, rows_per_split, dy.stride(0), dy.stride(1), h.stride(0), h.stride(1),
        dh.stride(0) if need_h else 0, partial.stride(0), NEED_H=need_h, **tiles)
    return (dh if need_h else None), partial[:, 0].sum(0), partial[:, 1].sum(0)


def scale_tiles(interpreted: bool = False) -> dict:
    """Tiles of the scale epilogue kernels (shared with benchmarks/compile_butterfly.py)."""
    return {"BLOCK_M": 16 if interpreted else 32, "BLOCK_C": 128, "num_warps": 4}


def scale_forward(h: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = h o s + b in fp32, rounded once to h's dtype; h (N, out) any strides, s and b (out,) any float dtype."""
    _check_activation("h", h)
    N, out = h.shape
    if scale.shape != (out,) or (bias is not None and bias.shape != (out,)):
        raise ValueError(f"scale {tuple(scale.shape)} / bias do not fit h {tuple(h.shape)}")
    y = torch.empty(N, out, dtype=h.dtype, device=h.device)
    tiles = scale_tiles(_interpreted(h))
    grid = (triton.cdiv(N, tiles["BLOCK_M"]), triton.cdiv(out, tiles["BLOCK_C"]))
    _scale_fwd_kernel[grid](h, scale, scale if bias is None else bias, y, N, out, h.stride(0), h.stride(1),
                            y.stride(0), HAS_BIAS=bias is not None, **tiles)
    return y


def scale_backward(dy: torch.Tensor, h: torch.Tensor, splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ds, db) float32 (out,): ds = sum_rows dy o h, db = sum_rows dy, one read of dy and h."""
    _check_activation("h", h)
    if dy.shape != h.shape or dy.device != h.device:
        raise ValueError(f"dy {tuple(dy.shape)} on {dy.device} does not match h {tuple(h.shape)} on {h.device}")
    N, out = h.shape
    tiles = scale_tiles(_interpreted(h))
    n_chunks = triton.cdiv(out, tiles["BLOCK_C"])
    splits, rows_per_split = row_splits(N, tiles["BLOCK_M"], n_chunks, splits)
    partial = torch.zeros(splits, 2, out, dtype=torch.float32, device=h.device)
    _scale_bwd_kernel[(n_chunks, splits)](dy, h, partial, N, out, rows_per_split, dy.stride(0), dy.stride(1),
                                          h.stride(0), h.stride(1), partial.stride(0), **tiles)
    return partial[:, 0].sum(0), partial[:, 1].sum(0)
