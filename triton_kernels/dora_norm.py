"""DoRA's factored row norm in one pass over W, never forming B @ A.

For W (M, K) = (out, in), A (R, K), B (M, R), scaling s::

    n_j^2 = ||W_j||^2 + 2 s rowsum((W A^T) o B)_j + s^2 q_j,   q = rowsum((B G) o B),  G = A A^T (R, R)
    n_j   = max(sqrt(max(n_j^2, 0)), eps)

One program owns BLOCK_M rows of W and one slab of its columns (split-K): it streams the slab in
BLOCK_K chunks and accumulates P = W_blk A^T (BLOCK_M, R) in float32 with tl.dot (IEEE fp32 for fp32
inputs, so no tf32 rounding); optionally ||W_j||^2 from the same tiles.  Its epilogue reads B's rows
and reduces the slab's share of the row sum, ||W_j||^2_slab + 2 s rowsum(P o B)_j (linear in P, so the
slabs add).  With one slab (out / BLOCK_M row blocks fill the SMs) it adds s^2 q (and a cached
||W||^2) and writes n; otherwise it writes the share to a float32 (splits, out) buffer and a finish
kernel sums the splits in order (deterministic, no atomics) and writes n.  Splits are chosen so the
programs fill the SMs (``fill_splits``): out = 4096 in 64-row tiles is 64 programs on a 132-SM GPU,
split 4 ways (256 programs, a 64 KiB partial buffer).  W is read once; the only temporaries are
(BLOCK_M, R) tiles.  R is padded to a power of two >= 16 (tl.dot's minimum).  q (out,) costs
O(out R^2 + in R^2) and is computed in float32 by the launcher (torch): in-kernel, the (BLOCK_M, R) x
(R, R) IEEE product spilled 8-17 KB per thread at R = 128 in the sm_90 compile
(benchmarks/results/compile/).

DoRA's fused GEMM and the float32 products live in lowrank_gemm.py, the Philox masks in dropout.py.

DoRA's backward row pass (one read of dY, with dY (N, out), u (N, r), b_s = s g o B (out, r))::

    v = dY b_s (N, r),     P = u^T dY (r, out),     c = colsum(dY o y_pre) (out,)

One program owns BLOCK_N rows and one slab of out's columns, walked in BLOCK_O chunks: v's share
accumulates in registers, and each chunk's P and c for those rows go to float32 partial buffers
(n_blocks, r, out) and (n_blocks, out) that the launcher sums (deterministic, no atomics).  With
several column slabs (when the row blocks alone do not fill the SMs: N = 8192 in 128-row tiles is 64
programs, split 4 ways on a 132-SM GPU) v is a float32 (splits, N, r) partial that the launcher sums
too; P and c are not, as each (row block, column) still belongs to one program.  Mixed precision: dY and
y_pre half, u and b_s float32; the dY tile is converted to float32 on load and both dots run IEEE
fp32 (v and P float32, as PEFT's float32 adapter path computes them from dY.to(float32)).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._tiles import block_r, check_operands, check_tiles, sm_count

FINISH_BLOCK = 1024     # rows per program of the split-K norm's finish kernel (a few KiB each)


# ----------------------------------------------------------------------------------------------
# Filling the GPU: how many ways to split work whose natural tiles are fewer than the SMs.

def fill_splits(blocks: int, sms: int, max_splits: int) -> int:
    """Ways s to split each of ``blocks`` equal, independent pieces of work so that blocks x s
    programs fill ``sms`` SMs: 1 when blocks >= sms; else the s >= cdiv(sms, blocks) (at most twice
    that, and at most ``max_splits``) that minimises the time ceil(blocks s / sms) / s of whole waves
    of 1/s-sized programs (one resident program per SM), the smallest on a tie.  64 blocks on 132
    SMs: 4 (256 programs) rather than 3 (192: a second wave of 60 programs)."""
    if blocks >= sms or max_splits <= 1:
        return 1
    least = triton.cdiv(sms, blocks)
    if least >= max_splits:
        return max_splits
    return min(range(least, min(2 * least, max_splits) + 1), key=lambda s: (triton.cdiv(blocks * s, sms) / s, s))


def split_extent(length: int, splits: int, block: int) -> tuple[int, int]:
    """(per_split, splits): ``length`` cut into ``splits`` slabs of whole ``block`` chunks (the last
    one shorter); fewer splits when the chunks run out."""
    per_split = triton.cdiv(triton.cdiv(length, max(splits, 1)), block) * block
    return per_split, max(1, triton.cdiv(length, per_split))


# ----------------------------------------------------------------------------------------------
# DoRA's factored weight norm.

@triton.jit
def _finish_norm(part, rows, row_ok, QUAD, WSQ, OUT, scaling, eps, HAS_WSQ: tl.constexpr):
    """n = max(sqrt(max(part + s^2 q (+ cached ||W||^2), 0)), eps) for ``rows``, stored to OUT."""
    sq = part + scaling * scaling * tl.load(QUAD + rows, mask=row_ok, other=0.0)
    if HAS_WSQ:
        sq += tl.load(WSQ + rows, mask=row_ok, other=0.0)
    tl.store(OUT + rows, tl.maximum(tl.sqrt(tl.maximum(sq, 0.0)), eps), mask=row_ok)


@triton.jit
def _dora_norm_fwd_kernel(W, A, B, QUAD, WSQ, OUT, M, K, R, k_per_split,
                          stride_wm, stride_wk, stride_ar, stride_ak, stride_bm, stride_br,
                          scaling, eps,
                          HAS_WSQ: tl.constexpr, FINISH: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rows pid of W and columns [split k_per_split, (split + 1) k_per_split): FINISH (one split):
    n to OUT (M,); else the slab's ||W_j||^2 (unless HAS_WSQ) + 2 s rowsum((W A^T) o B)_j to row
    ``split`` of OUT (splits, M).  WSQ is read only when HAS_WSQ."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    k_start = split * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    w_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_stop
        ks64 = ks.to(tl.int64)
        w = tl.load(W + rows64[:, None] * stride_wm + ks64[None, :] * stride_wk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a_t = tl.load(A + rr[None, :] * stride_ar + ks64[:, None] * stride_ak,
                      mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(w, a_t, acc, input_precision=DOT_PRECISION)
        if not HAS_WSQ:
            wf = w.to(tl.float32)
            w_sq += tl.sum(wf * wf, axis=1)
    b = tl.load(B + rows64[:, None] * stride_bm + rr[None, :] * stride_br,
                mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
    part = w_sq + 2.0 * scaling * tl.sum(acc * b, axis=1)
    if FINISH:
        _finish_norm(part, rows, row_ok, QUAD, WSQ, OUT, scaling, eps, HAS_WSQ)
    else:
        tl.store(OUT + split * M + rows, part, mask=row_ok)


@triton.jit
def _dora_norm_finish_kernel(PART, QUAD, WSQ, OUT, M, splits, scaling, eps,
                             HAS_WSQ: tl.constexpr, BLOCK: tl.constexpr):
    """n from the split-K partial row sums PART (splits, M), summed in split order."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < M
    part = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(0, splits):
        part += tl.load(PART + split * M + rows, mask=row_ok, other=0.0)
    _finish_norm(part, rows, row_ok, QUAD, WSQ, OUT, scaling, eps, HAS_WSQ)


def norm_tiles(device: torch.device) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K) of the norm kernel (also read by benchmarks/compile_dora_norm.py)."""
    return (64, 64) if device.type == "cuda" else (16, 32)


def dora_norm_forward(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                      w_sq: torch.Tensor | None = None, *, eps: float = 1e-12,
                      block_m: int | None = None, block_k: int | None = None,
                      splits: int | None = None) -> torch.Tensor:
    """n = ||W + s B A||_row (float32) for W (out, in), A (r, in), B (out, r) of one dtype.

    ``w_sq``: cached ||W||_row^2 (float32, (out,)); when None the kernel computes it from the same
    tiles (and discards it).  ``splits``: slabs of W's columns (default: enough that the programs
    fill the device's SMs, ``fill_splits``; 1 on a CPU tensor); more than one adds the finish
    launch.  float64 inputs are not supported by tl.dot: use the torch path.
    """
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"weight has dtype {weight.dtype}; the Triton norm takes float32, float16 or bfloat16")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype != weight.dtype or t.device != weight.device:
            raise TypeError(f"{name} is {t.dtype} on {t.device} but weight is {weight.dtype} on {weight.device}; "
                            "the Triton norm takes one dtype and device (tl.dot needs equal operand dtypes)")
    if splits is not None and splits < 1:
        raise ValueError(f"splits={splits} must be >= 1 (or None: fill the SMs), e.g. splits=2")
    out_features, in_features = weight.shape
    r = lora_A.shape[0]
    br = block_r(r)
    a32 = lora_A.detach().to(torch.float32)
    b32 = lora_B.detach().to(torch.float32)
    quad = ((b32 @ (a32 @ a32.T)) * b32).sum(dim=1)                   # rowsum((B G) o B), (out,)
    norm = torch.empty(out_features, dtype=torch.float32, device=weight.device)
    has_wsq = w_sq is not None
    wsq = w_sq.to(torch.float32).contiguous() if has_wsq else quad     # quad: a pointer never read
    default_m, default_k = norm_tiles(weight.device)
    block_m, block_k = block_m or default_m, block_k or default_k
    check_tiles(block_m=block_m, block_k=block_k)
    row_blocks = triton.cdiv(out_features, block_m)
    if splits is None:
        splits = fill_splits(row_blocks, sm_count(weight.device), triton.cdiv(in_features, block_k))
    k_per_split, splits = split_extent(in_features, splits, block_k)
    part = norm if splits == 1 else torch.empty(splits, out_features, dtype=torch.float32, device=weight.device)
    _dora_norm_fwd_kernel[(row_blocks, splits)](
        weight, lora_A, lora_B, quad, wsq, part, out_features, in_features, r, k_per_split,
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        float(scaling), float(eps),
        HAS_WSQ=has_wsq, FINISH=splits == 1, DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=br)
    if splits > 1:
        _dora_norm_finish_kernel[(triton.cdiv(out_features, FINISH_BLOCK),)](
            part, quad, wsq, norm, out_features, splits, float(scaling), float(eps),
            HAS_WSQ=has_wsq, BLOCK=FINISH_BLOCK)
    return norm


# ----------------------------------------------------------------------------------------------
# DoRA's backward row pass: v, P and dm's column sum from one read of dY.

@triton.jit
def _dora_dy_row_pass_kernel(DY, U, BS, YP, V, P_PART, C_PART, N, OUT, R, o_per_split,
                             stride_dn, stride_do, stride_un, stride_ur, stride_bo, stride_br,
                             stride_yn, stride_yo,
                             IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rows pid of dY and columns [split o_per_split, (split + 1) o_per_split): P and c of those
    columns to P_PART / C_PART (row block pid), v's share to row ``split`` of V (splits, N, R)."""
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    u_t = tl.load(U + rows[None, :] * stride_un + rr[:, None] * stride_ur,
                  mask=r_ok[:, None] & row_ok[None, :], other=0.0)                 # (BLOCK_R, BLOCK_N)
    v = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    o_start = split * o_per_split
    o_stop = tl.minimum(o_start + o_per_split, OUT)
    for o0 in range(o_start, o_stop, BLOCK_O):
        cols = o0 + tl.arange(0, BLOCK_O).to(tl.int64)
        col_ok = cols < o_stop
        ok = row_ok[:, None] & col_ok[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dn + cols[None, :] * stride_do, mask=ok, other=0.0)
        if UPCAST:  # half dY with a float32 adapter: exact conversion, float32 dots
            dy = dy.to(tl.float32)
        b_s = tl.load(BS + cols[:, None] * stride_bo + rr[None, :] * stride_br,
                      mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        if IEEE:
            v = tl.dot(dy, b_s, v, input_precision="ieee")
            p = tl.dot(u_t, dy, input_precision="ieee")
        else:
            v = tl.dot(dy, b_s, v)
            p = tl.dot(u_t, dy)
        tl.store(P_PART + (pid * R + rr[:, None]) * OUT + cols[None, :], p, mask=r_ok[:, None] & col_ok[None, :])
        y_pre = tl.load(YP + rows[:, None] * stride_yn + cols[None, :] * stride_yo, mask=ok, other=0.0)
        colsum = tl.sum(dy.to(tl.float32) * y_pre.to(tl.float32), axis=0)
        tl.store(C_PART + pid * OUT + cols, colsum, mask=col_ok)
    tl.store(V + (split * N + rows[:, None]) * R + rr[None, :], v.to(V.dtype.element_ty),
             mask=row_ok[:, None] & r_ok[None, :])


def row_pass_tiles(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_O, num_warps) of the row pass (also read by benchmarks/compile_dora_norm.py).
    128 x 32 tiles with 8 warps compile without spills for sm_90 (ptxas: 74 registers for bf16 at
    r = 16, 104 for fp32; 128 x 64 needs 255 and spills in fp32)."""
    return (128, 32, 8) if device.type == "cuda" else (16, 32, 4)


def dora_dy_row_pass(dy: torch.Tensor, u: torch.Tensor, b_scaled: torch.Tensor, y_pre: torch.Tensor, *,
                     block_n: int | None = None, block_o: int | None = None, splits: int | None = None):
    """(v, P, c) = (dY b_scaled, u^T dY, colsum(dY o y_pre)) for dY, y_pre (N, out), u (N, r) and
    b_scaled (out, r), any strides, from one read of dY.  dY and y_pre share one dtype (float32,
    float16 or bfloat16); u and b_scaled share dY's dtype, or are float32 on a half dY (PEFT's
    float32 adapter on a half base: dY converted to float32 in-kernel, IEEE fp32 dots).
    v (N, r) and P (r, out) in u's dtype, c (out,) float32; all accumulated in float32.
    ``splits``: slabs of out's columns (default: enough that the programs fill the device's SMs,
    ``fill_splits``; 1 on a CPU tensor); more than one makes v a float32 partial summed here."""
    compute = check_operands("the row pass", ("dy", dy), ("y_pre", y_pre), (("u", u), ("b_scaled", b_scaled)))
    n, out_features = dy.shape
    r = u.shape[1]
    if u.shape[0] != n or b_scaled.shape != (out_features, r) or y_pre.shape != dy.shape:
        raise ValueError(f"shapes do not chain: dy {tuple(dy.shape)}, u {tuple(u.shape)}, "
                         f"b_scaled {tuple(b_scaled.shape)}, y_pre {tuple(y_pre.shape)}")
    if splits is not None and splits < 1:
        raise ValueError(f"splits={splits} must be >= 1 (or None: fill the SMs), e.g. splits=2")
    default_n, default_o, num_warps = row_pass_tiles(dy.device)
    block_n, block_o = block_n or default_n, block_o or default_o
    check_tiles(block_n=block_n, block_o=block_o)
    n_blocks = triton.cdiv(n, block_n)
    if splits is None:
        splits = fill_splits(n_blocks, sm_count(dy.device), triton.cdiv(out_features, block_o))
    o_per_split, splits = split_extent(out_features, splits, block_o)
    v = (torch.empty(n, r, dtype=compute, device=dy.device) if splits == 1 else
         torch.empty(splits, n, r, dtype=torch.float32, device=dy.device))
    p_part = torch.empty(n_blocks, r, out_features, dtype=torch.float32, device=dy.device)
    c_part = torch.empty(n_blocks, out_features, dtype=torch.float32, device=dy.device)
    _dora_dy_row_pass_kernel[(n_blocks, splits)](
        dy, u, b_scaled, y_pre, v, p_part, c_part, n, out_features, r, o_per_split,
        dy.stride(0), dy.stride(1), u.stride(0), u.stride(1), b_scaled.stride(0), b_scaled.stride(1),
        y_pre.stride(0), y_pre.stride(1),
        IEEE=compute == torch.float32, UPCAST=compute != dy.dtype, BLOCK_N=block_n, BLOCK_O=block_o,
        BLOCK_R=block_r(r), num_warps=num_warps)
    if splits > 1:
        v = v.sum(dim=0).to(compute)
    return v, p_part.sum(dim=0).to(compute), c_part.sum(dim=0)
