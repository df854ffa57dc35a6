"""Hadamard family kernels: LoHa's and LoKr's change of weight generated tile by tile inside the GEMM,
and LoHa's factor gradients from dY^T X tiles contracted on chip.  No delta weight is written.

Math (W (O, I) frozen, x (N, I), dY (N, O), s the adapter's scaling):

    LoHa   dW = s (w1a w1b) o (w2a w2b),   w1a, w2a (O, r), w1b, w2b (r, I)
    LoKr   dW = s kron(w1, w2),             w1 (a, c), w2 (b, d), O = a b, I = c d,
           dW[p b + q, u d + v] = s w1[p, u] w2[q, v]

``_merged_gemm_fwd_kernel`` computes, for an (M, K) activation A and a (K, N) view Y of W,

    C = A (Y + s D) + bias,     D (K, N) generated on chip, per (BLOCK_K, BLOCK_N) tile:
        Hadamard:  D = (L1 R1) o (L2 R2),      L (K, r), R (r, N): two rank-r tl.dot per tile
        Kronecker: D[k, n] = K1[k // DK, n // DN] K2[k % DK, n % DN]  (two gathers, one product)

or no D at all, with a float32 residual term joined after the base product is rounded to A's dtype
(``gemm_residual_forward``: PEFT's rounding points for LoKr's float32 adapter on a half base, its
term formed outside by two thin reshaped products), so
y = x W^T + b + x dW^T (A = x, Y = W^T, L = w1b^T, R = w1a^T; K1 = w1^T, K2 = w2^T) and
dx = dY W + dY dW (A = dY, Y = W, L = w1a, R = w1b; K1 = w1, K2 = w2) are one kernel with the
roles given by strides.  Each tile of W + s D is formed in float32 and rounded to A's dtype for the
main tl.dot (tensor cores for half A); its rank-r products run in A's dtype too (IEEE fp32 for a
float32 A), a float32 adapter on a half base included: W + s D is rounded to the half dtype anyway,
the factors' own rounding (one unit of the half dtype on D, not on W) sits below it.  Cost on top of
the plain GEMM: LoHa 2 * BLOCK_R / BLOCK_M tensor-core FLOPs per GEMM FLOP (every M tile regenerates
its weight tiles), LoKr two gathers and a multiply per weight element per M tile.

``_loha_factor_grads_bwd_kernel`` computes LoHa's four factor gradients without storing G or dW.
With G = dY^T X (O, I) = dL/d(dW), P1 = w1a w1b, P2 = w2a w2b:

    d w1a = s (G o P2) w1b^T,   d w1b = s w1a^T (G o P2),
    d w2a = s (G o P1) w2b^T,   d w2b = s w2a^T (G o P1).

One program owns an (BLOCK_O, BLOCK_I) tile: it accumulates its G tile over all N tokens (tl.dot in
the input dtype, float32 accumulator: the products of half values are exact, as PEFT's float32 G),
builds its P1 / P2 tiles, and contracts G o P with the factor tiles at once (IEEE fp32 dots, done once
per tile, not per token).  The (BLOCK_O, r) and (r, BLOCK_I) results are partial sums over the other
tile index, written to float32 buffers (nI, O, r) and (nO, r, I) that the launcher adds
(deterministic, no atomics).  FLOPs: 2 N O I (tensor cores) + 12 O I r (fp32, independent of N).

The other way to LoHa's gradients, the Khatri-Rao factors (rank r^2) and four thin GEMMs, needs no
kernel of its own (fastadapt.ops.hadamard_loha); which way runs is decided per shape there.

Every kernel loads in the input dtype, accumulates in fp32 and stores in the output dtype; offsets
are int64; activations and W may have any strides, the small factors any strides too.  float32
tl.dot runs input_precision="ieee" (the fp32 row of the tolerance table).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import block_r, check_operands, check_tiles

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# Rank chunk of the on-chip rank-r products: r above it runs in chunks (the R tiles are reloaded from
# L1/L2, they are r x BLOCK_N elements).
MAX_BLOCK_R = 32


# ----------------------------------------------------------------------------------------------
# C = A (Y + s D) + bias with D generated on chip

@triton.jit
def _merged_gemm_fwd_kernel(A, Y, L1, R1, L2, R2, BIAS, RES, C, M, N, K, RANK, DK, DN, scale,
                            stride_am, stride_ak, stride_yk, stride_yn,
                            stride_l1k, stride_l1r, stride_r1r, stride_r1n,
                            stride_l2k, stride_l2r, stride_r2r, stride_r2n, stride_cm, stride_cn,
                            GENERATOR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                            IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    # GENERATOR 1 (Hadamard): L1, R1, L2, R2 as named.  2 (Kronecker): L1 is K1 with strides
    # (stride_l1k, stride_l1r) over (k // DK, n // DN), L2 is K2 with (stride_l2k, stride_l2r) over
    # (k % DK, n % DN); R1, R2 unused.  0: Y as it is.  HAS_RES: the base product (bias inside) is
    # rounded to A's dtype, then scale * RES (float32, (M, N) contiguous) joins it in float32.
    # int64 offsets into the activations and W; the factors (at most O x I / 4 elements for LoKr,
    # (O + I) r for LoHa) are addressed in int32, which keeps the kron gathers' index math small.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols32 = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = cols32.to(tl.int64)
    row_ok = rows < M
    col_ok = cols32 < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks32 = k0 + tl.arange(0, BLOCK_K)
        ks = ks32.to(tl.int64)
        k_ok = ks32 < K
        tile_ok = k_ok[:, None] & col_ok[None, :]
        a = tl.load(A + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(Y + ks[:, None] * stride_yk + cols[None, :] * stride_yn, mask=tile_ok, other=0.0)
        if GENERATOR == 2:
            k1 = tl.load(L1 + (ks32 // DK)[:, None] * stride_l1k + (cols32 // DN)[None, :] * stride_l1r,
                         mask=tile_ok, other=0.0).to(tl.float32)
            k2 = tl.load(L2 + (ks32 % DK)[:, None] * stride_l2k + (cols32 % DN)[None, :] * stride_l2r,
                         mask=tile_ok, other=0.0).to(tl.float32)
            w = (w.to(tl.float32) + scale * (k1 * k2)).to(A.dtype.element_ty)
        elif GENERATOR == 1:
            p1 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
            p2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
            for r0 in range(0, RANK, BLOCK_R):
                rr = r0 + tl.arange(0, BLOCK_R)
                r_ok = rr < RANK
                left_ok = k_ok[:, None] & r_ok[None, :]
                right_ok = r_ok[:, None] & col_ok[None, :]
                l1 = tl.load(L1 + ks32[:, None] * stride_l1k + rr[None, :] * stride_l1r, mask=left_ok, other=0.0)
                r1 = tl.load(R1 + rr[:, None] * stride_r1r + cols32[None, :] * stride_r1n, mask=right_ok, other=0.0)
                l2 = tl.load(L2 + ks32[:, None] * stride_l2k + rr[None, :] * stride_l2r, mask=left_ok, other=0.0)
                r2 = tl.load(R2 + rr[:, None] * stride_r2r + cols32[None, :] * stride_r2n, mask=right_ok, other=0.0)
                if IEEE:
                    p1 = tl.dot(l1.to(tl.float32), r1.to(tl.float32), p1, input_precision="ieee")
                    p2 = tl.dot(l2.to(tl.float32), r2.to(tl.float32), p2, input_precision="ieee")
                else:
                    p1 = tl.dot(l1.to(A.dtype.element_ty), r1.to(A.dtype.element_ty), p1)
                    p2 = tl.dot(l2.to(A.dtype.element_ty), r2.to(A.dtype.element_ty), p2)
            w = (w.to(tl.float32) + scale * (p1 * p2)).to(A.dtype.element_ty)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:  # PEFT's rounded half base product, then its float32 term
        res = tl.load(RES + rows[:, None] * N + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc = acc.to(A.dtype.element_ty).to(tl.float32) + scale * res
    tl.store(C + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(C.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# BLOCK_M is the reuse of each generated weight tile: the half configs keep it at 128 or 256 (LoHa's
# rank-r products cost 2 BLOCK_R / BLOCK_M of the main dot) and BLOCK_K at 32 (two fp32 product tiles,
# the weight tile and the accumulator share the registers).  IEEE fp32 dots (a float32 layer) hold
# their operands in registers: 64 x 64 tiles (sm_90, ptxas: 128 x 128 spills 1.6-1.9 KB per thread
# with the kron gathers, 64 x 128 at 4 warps 0.3 KB).
MERGED_GEMM_CONFIGS = {
    "half": [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    ],
    "float32": [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    ],
}
_merged_gemm_tuned = {precision: triton.autotune(configs=configs, key=["M", "N", "K", "RANK", "GENERATOR"])(
    _merged_gemm_fwd_kernel) for precision, configs in MERGED_GEMM_CONFIGS.items()}
# The interpreter's tiles (small, legal when compiled).
INTERPRETER_TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}


def _check_2d(name: str, t: torch.Tensor, shape: tuple) -> None:
    if t.ndim != 2 or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")


NO_TERM, HADAMARD, KRONECKER = 0, 1, 2


def _launch_merged_gemm(a, y, factors, scale, bias, residual, out_dtype, generator, rank, dk, dn, tiles):
    m, k = a.shape
    n = y.shape[1]
    l1, r1, l2, r2 = factors
    out = torch.empty(m, n, dtype=out_dtype or a.dtype, device=a.device)
    args = (a, y, l1, r1, l2, r2, out if bias is None else bias, out if residual is None else residual, out,
            m, n, k, rank, dk, dn, float(scale),
            a.stride(0), a.stride(1), y.stride(0), y.stride(1), l1.stride(0), l1.stride(1), r1.stride(0),
            r1.stride(1), l2.stride(0), l2.stride(1), r2.stride(0), r2.stride(1), out.stride(0), out.stride(1))
    flags = dict(GENERATOR=generator, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
                 IEEE=a.dtype == torch.float32,
                 BLOCK_R=min(block_r(rank), MAX_BLOCK_R))
    if a.is_cuda and not tiles:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        _merged_gemm_tuned["float32" if flags["IEEE"] else "half"][grid](*args, **flags)
    else:
        tiles = {**INTERPRETER_TILES, **tiles}
        check_tiles(**{key.lower(): value for key, value in tiles.items()})
        _merged_gemm_fwd_kernel[(triton.cdiv(m, tiles["BLOCK_M"]), triton.cdiv(n, tiles["BLOCK_N"]))](
            *args, **flags, **tiles)
    return out


def loha_gemm_forward(a: torch.Tensor, y: torch.Tensor, l1: torch.Tensor, r1: torch.Tensor, l2: torch.Tensor,
                      r2: torch.Tensor, scale: float, *, bias: torch.Tensor | None = None,
                      out_dtype: torch.dtype | None = None, **tiles) -> torch.Tensor:
    """C = a (y + scale (l1 r1) o (l2 r2)) + bias, (M, N) contiguous in ``out_dtype`` (default a's).

    a (M, K) and y (K, N) of one dtype (float32, float16, bfloat16), any strides (pass W.T for
    the forward, W for dx); l1, l2 (K, r) and r1, r2 (r, N) in a's dtype or all float32 (PEFT's
    float32 adapter on a half base), any strides; bias (N,) any float dtype.  ``tiles``: BLOCK_M /
    BLOCK_N / BLOCK_K for a fixed launch (the interpreter's small tiles by default off CUDA).
    """
    check_operands("loha_gemm_forward", ("a", a), ("y", y), (("l1", l1), ("r1", r1), ("l2", l2), ("r2", r2)))
    m, k = a.shape
    n = y.shape[1]
    rank = l1.shape[1]
    _check_2d("y", y, (k, n))
    for name, t, shape in (("l1", l1, (k, rank)), ("l2", l2, (k, rank)), ("r1", r1, (rank, n)),
                           ("r2", r2, (rank, n))):
        _check_2d(name, t, shape)
    return _launch_merged_gemm(a, y, (l1, r1, l2, r2), scale, bias, None, out_dtype, HADAMARD, rank, 1, 1, tiles)


def lokr_gemm_forward(a: torch.Tensor, y: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, scale: float, *,
                      bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                      **tiles) -> torch.Tensor:
    """C = a (y + scale kron(k1, k2)) + bias, (M, N) contiguous in ``out_dtype`` (default a's).

    a (M, K) and y (K, N) as in :func:`loha_gemm_forward`; k1 (K / dk, N / dn) and k2 (dk, dn) in a's
    dtype or both float32, any strides (the forward passes w1.T and w2.T, dx w1 and w2).
    """
    check_operands("lokr_gemm_forward", ("a", a), ("y", y), (("k1", k1), ("k2", k2)))
    m, k = a.shape
    n = y.shape[1]
    _check_2d("y", y, (k, n))
    if k1.ndim != 2 or k2.ndim != 2 or k1.shape[0] * k2.shape[0] != k or k1.shape[1] * k2.shape[1] != n:
        raise ValueError(f"kron(k1 {tuple(k1.shape)}, k2 {tuple(k2.shape)}) does not have y's shape ({k}, {n})")
    dk, dn = k2.shape
    return _launch_merged_gemm(a, y, (k1, k1, k2, k2), scale, bias, None, out_dtype, KRONECKER, 1, dk, dn, tiles)


def gemm_residual_forward(a: torch.Tensor, y: torch.Tensor, residual: torch.Tensor, scale: float, *,
                          bias: torch.Tensor | None = None, **tiles) -> torch.Tensor:
    """C = fl(fl_a(a y + bias) + scale residual): the base product rounded to a's dtype where PEFT's
    half F.linear rounds it, then a float32 (M, N) contiguous ``residual`` (an adapter term PEFT
    computes in float32) added in float32 and the sum rounded once; (M, N) contiguous in a's dtype.
    a (M, K) and y (K, N) of one dtype, any strides."""
    if residual.dtype != torch.float32 or not residual.is_contiguous():
        raise TypeError(f"residual is a {residual.dtype} tensor (contiguous: {residual.is_contiguous()}); "
                        "gemm_residual_forward takes a contiguous float32 residual")
    check_operands("gemm_residual_forward", ("a", a), ("y", y), (("residual", residual),))
    m, k = a.shape
    n = y.shape[1]
    _check_2d("y", y, (k, n))
    _check_2d("residual", residual, (m, n))
    return _launch_merged_gemm(a, y, (y, y, y, y), scale, bias, residual, None, NO_TERM, 1, 1, 1, tiles)


# ----------------------------------------------------------------------------------------------
# LoHa factor gradients from G = dY^T X tiles

@triton.jit
def _contract_with_factor_pair(g, rows, cols, row_ok, col_ok, pid_o, pid_i, O, I, RANK,
                               OWN_A, OWN_B, OTHER_A, OTHER_B, OUT_A, OUT_B,
                               s_own_ao, s_own_ar, s_own_br, s_own_bi, s_oth_ao, s_oth_ar, s_oth_br, s_oth_bi,
                               BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr):
    """OUT_A[pid_i] = (g o P_other) OWN_B^T and OUT_B[pid_o] = OWN_A^T (g o P_other) on this tile, with
    P_other = OTHER_A OTHER_B built here (IEEE fp32 dots)."""
    other = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for r0 in range(0, RANK, BLOCK_R):
        rr = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        r_ok = rr < RANK
        fa = tl.load(OTHER_A + rows[:, None] * s_oth_ao + rr[None, :] * s_oth_ar,
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        fb = tl.load(OTHER_B + rr[:, None] * s_oth_br + cols[None, :] * s_oth_bi,
                     mask=r_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        other = tl.dot(fa, fb, other, input_precision="ieee")
    weighted = g * other
    for r0 in range(0, RANK, BLOCK_R):
        rr = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        r_ok = rr < RANK
        fa = tl.load(OWN_A + rows[:, None] * s_own_ao + rr[None, :] * s_own_ar,
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        fb = tl.load(OWN_B + rr[:, None] * s_own_br + cols[None, :] * s_own_bi,
                     mask=r_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        d_a = tl.dot(weighted, tl.trans(fb), input_precision="ieee")      # (BLOCK_O, BLOCK_R)
        d_b = tl.dot(tl.trans(fa), weighted, input_precision="ieee")      # (BLOCK_R, BLOCK_I)
        tl.store(OUT_A + (pid_i * O + rows[:, None]) * RANK + rr[None, :], d_a, mask=row_ok[:, None] & r_ok[None, :])
        tl.store(OUT_B + (pid_o * RANK + rr[:, None]) * I + cols[None, :], d_b, mask=r_ok[:, None] & col_ok[None, :])


@triton.jit
def _loha_factor_grads_bwd_kernel(DY, X, W1A, W1B, W2A, W2B, D1A, D1B, D2A, D2B, T, O, I, RANK, scale,
                                  stride_dt, stride_do, stride_xt, stride_xi,
                                  stride_1a_o, stride_1a_r, stride_1b_r, stride_1b_i,
                                  stride_2a_o, stride_2a_r, stride_2b_r, stride_2b_i,
                                  IEEE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                                  BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    rows = (pid_o * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
    cols = (pid_i * BLOCK_I + tl.arange(0, BLOCK_I)).to(tl.int64)
    row_ok = rows < O
    col_ok = cols < I
    g = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        ts = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        t_ok = ts < T
        dy_t = tl.load(DY + ts[None, :] * stride_dt + rows[:, None] * stride_do, mask=row_ok[:, None] & t_ok[None, :],
                       other=0.0)
        x = tl.load(X + ts[:, None] * stride_xt + cols[None, :] * stride_xi, mask=t_ok[:, None] & col_ok[None, :],
                    other=0.0)
        if IEEE:
            g = tl.dot(dy_t, x, g, input_precision="ieee")
        else:
            g = tl.dot(dy_t, x, g)
    g = g * scale
    # d w1a, d w1b from s G o P2, then d w2a, d w2b from s G o P1: one product tile alive at a time.
    _contract_with_factor_pair(g, rows, cols, row_ok, col_ok, pid_o, pid_i, O, I, RANK, W1A, W1B, W2A, W2B, D1A, D1B,
                               stride_1a_o, stride_1a_r, stride_1b_r, stride_1b_i,
                               stride_2a_o, stride_2a_r, stride_2b_r, stride_2b_i, BLOCK_O, BLOCK_I, BLOCK_R)
    _contract_with_factor_pair(g, rows, cols, row_ok, col_ok, pid_o, pid_i, O, I, RANK, W2A, W2B, W1A, W1B, D2A, D2B,
                               stride_2a_o, stride_2a_r, stride_2b_r, stride_2b_i,
                               stride_1a_o, stride_1a_r, stride_1b_r, stride_1b_i, BLOCK_O, BLOCK_I, BLOCK_R)


# One program per (BLOCK_O, BLOCK_I) tile of G: the token loop is the GEMM's K loop.  64 x 64 keeps G,
# one product tile and the contraction operands in registers at 8 warps.
FACTOR_GRADS_TILES_CUDA = {"BLOCK_O": 64, "BLOCK_I": 64, "BLOCK_T": 32, "num_warps": 8, "num_stages": 3}
FACTOR_GRADS_TILES_INTERPRETER = {"BLOCK_O": 16, "BLOCK_I": 16, "BLOCK_T": 16}


def loha_factor_grads_backward(dy: torch.Tensor, x: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor,
                               w2a: torch.Tensor, w2b: torch.Tensor, scale: float, **tiles) -> list[torch.Tensor]:
    """[d w1a, d w1b, d w2a, d w2b] (float32, the factors' shapes) of LoHa's dW = scale (w1a w1b) o (w2a w2b)
    for dY (N, O) and x (N, I) of one dtype, any strides; the factors in that dtype or all float32.
    ``tiles``: BLOCK_O / BLOCK_I / BLOCK_T (and num_warps) for a fixed launch."""
    check_operands("loha_factor_grads_backward", ("x", x), ("dy", dy), (("w1a", w1a), ("w1b", w1b), ("w2a", w2a),
                                                                         ("w2b", w2b)))
    t, o = dy.shape
    i = x.shape[1]
    rank = w1a.shape[1]
    _check_2d("x", x, (t, i))
    for name, f, shape in (("w1a", w1a, (o, rank)), ("w2a", w2a, (o, rank)), ("w1b", w1b, (rank, i)),
                           ("w2b", w2b, (rank, i))):
        _check_2d(name, f, shape)
    config = dict(FACTOR_GRADS_TILES_CUDA if dy.is_cuda else FACTOR_GRADS_TILES_INTERPRETER)
    config.update(tiles)
    check_tiles(block_o=config["BLOCK_O"], block_i=config["BLOCK_I"], block_t=config["BLOCK_T"])
    n_o, n_i = triton.cdiv(o, config["BLOCK_O"]), triton.cdiv(i, config["BLOCK_I"])
    d_1a, d_2a = (torch.empty(n_i, o, rank, dtype=torch.float32, device=x.device) for _ in range(2))
    d_1b, d_2b = (torch.empty(n_o, rank, i, dtype=torch.float32, device=x.device) for _ in range(2))
    _loha_factor_grads_bwd_kernel[(n_o, n_i)](
        dy, x, w1a, w1b, w2a, w2b, d_1a, d_1b, d_2a, d_2b, t, o, i, rank, float(scale),
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), w1a.stride(0), w1a.stride(1), w1b.stride(0),
        w1b.stride(1), w2a.stride(0), w2a.stride(1), w2b.stride(0), w2b.stride(1),
        IEEE=x.dtype == torch.float32, BLOCK_R=min(block_r(rank), MAX_BLOCK_R), **config)
    return [p[0] if p.shape[0] == 1 else p.sum(dim=0) for p in (d_1a, d_1b, d_2a, d_2b)]
