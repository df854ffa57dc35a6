"""DoRA's factored row norm in one pass over W, never forming B @ A.

For W (M, K) = (out, in), A (R, K), B (M, R), scaling s::

    n_j^2 = ||W_j||^2 + 2 s rowsum((W A^T) o B)_j + s^2 q_j,   q = rowsum((B G) o B),  G = A A^T (R, R)
    n_j   = max(sqrt(max(n_j^2, 0)), eps)

One program owns BLOCK_M rows of W: it streams W's row block in BLOCK_K chunks and
accumulates P = W_blk A^T (BLOCK_M, R) in float32 with tl.dot (IEEE fp32 for fp32 inputs, so no
tf32 rounding); optionally ||W_j||^2 from the same tiles.  The epilogue reads B's rows and q and
writes n.  W is read once; the only temporaries are (BLOCK_M, R) tiles.  R is padded to a power
of two >= 16 (tl.dot's minimum).  q (out,) costs O(out R^2 + in R^2) and is computed in float32
by the launcher (torch): in-kernel, the (BLOCK_M, R) x (R, R) IEEE product spilled 8-17 KB per
thread at R = 128 in the sm_90 compile (benchmarks/results/compile/).

DoRA's fused GEMM and the float32 products live in lowrank_gemm.py, the Philox masks in dropout.py.

DoRA's backward row pass (one read of dY, with dY (N, out), u (N, r), b_s = s g o B (out, r))::

    v = dY b_s (N, r),     P = u^T dY (r, out),     c = colsum(dY o y_pre) (out,)

One program owns BLOCK_N rows and walks out in BLOCK_O chunks: v accumulates in registers, and
each chunk's P and c for those rows go to float32 partial buffers (n_blocks, r, out) and
(n_blocks, out) that the launcher sums (deterministic, no atomics).  Mixed precision: dY and
y_pre half, u and b_s float32; the dY tile is converted to float32 on load and both dots run IEEE
fp32 (v and P float32, as PEFT's float32 adapter path computes them from dY.to(float32)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import block_r, check_operands, check_tiles


@triton.jit
def _dora_norm_fwd_kernel(W, A, B, QUAD, WSQ, OUT, M, K, R,
                          stride_wm, stride_wk, stride_ar, stride_ak, stride_bm, stride_br,
                          scaling, eps,
                          HAS_WSQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    w_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        ks64 = ks.to(tl.int64)
        w = tl.load(W + rows64[:, None] * stride_wm + ks64[None, :] * stride_wk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a_t = tl.load(A + rr[None, :] * stride_ar + ks64[:, None] * stride_ak,
                      mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(w, a_t, acc, input_precision=DOT_PRECISION)
        if not HAS_WSQ:
            wf = w.to(tl.float32)
            w_sq += tl.sum(wf * wf, axis=1)
    if HAS_WSQ:
        w_sq = tl.load(WSQ + rows, mask=row_ok, other=0.0)
    else:
        tl.store(WSQ + rows, w_sq, mask=row_ok)
    b = tl.load(B + rows64[:, None] * stride_bm + rr[None, :] * stride_br,
                mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
    cross = tl.sum(acc * b, axis=1)
    quad = tl.load(QUAD + rows, mask=row_ok, other=0.0)
    sq = w_sq + 2.0 * scaling * cross + scaling * scaling * quad
    norm = tl.maximum(tl.sqrt(tl.maximum(sq, 0.0)), eps)
    tl.store(OUT + rows, norm, mask=row_ok)


def dora_norm_forward(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                      w_sq: torch.Tensor | None = None, *, eps: float = 1e-12,
                      block_m: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """n = ||W + s B A||_row (float32) for W (out, in), A (r, in), B (out, r) of one dtype.

    ``w_sq``: cached ||W||_row^2 (float32, (out,)); when None the kernel computes it from the same
    tiles (and discards it).  float64 inputs are not supported by tl.dot: use the torch path.
    """
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"weight has dtype {weight.dtype}; the Triton norm takes float32, float16 or bfloat16")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype != weight.dtype or t.device != weight.device:
            raise TypeError(f"{name} is {t.dtype} on {t.device} but weight is {weight.dtype} on {weight.device}; "
                            "the Triton norm takes one dtype and device (tl.dot needs equal operand dtypes)")
    out_features, in_features = weight.shape
    r = lora_A.shape[0]
    br = block_r(r)
    a32 = lora_A.detach().to(torch.float32)
    b32 = lora_B.detach().to(torch.float32)
    quad = ((b32 @ (a32 @ a32.T)) * b32).sum(dim=1)                   # rowsum((B G) o B), (out,)
    norm = torch.empty(out_features, dtype=torch.float32, device=weight.device)
    has_wsq = w_sq is not None
    wsq_buf = w_sq.to(torch.float32).contiguous() if has_wsq else torch.empty_like(norm)
    block_m = block_m or (64 if weight.is_cuda else 16)
    block_k = block_k or (64 if weight.is_cuda else 32)
    check_tiles(block_m=block_m, block_k=block_k)
    grid = (triton.cdiv(out_features, block_m),)
    _dora_norm_fwd_kernel[grid](
        weight, lora_A, lora_B, quad, wsq_buf, norm, out_features, in_features, r,
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        float(scaling), float(eps),
        HAS_WSQ=has_wsq, DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=br)
    return norm


# ----------------------------------------------------------------------------------------------
# DoRA's backward row pass: v, P and dm's column sum from one read of dY.

@triton.jit
def _dora_dy_row_pass_kernel(DY, U, BS, YP, V, P_PART, C_PART, N, OUT, R,
                             stride_dn, stride_do, stride_un, stride_ur, stride_bo, stride_br,
                             stride_yn, stride_yo,
                             IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    u_t = tl.load(U + rows[None, :] * stride_un + rr[:, None] * stride_ur,
                  mask=r_ok[:, None] & row_ok[None, :], other=0.0)                 # (BLOCK_R, BLOCK_N)
    v = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for o0 in range(0, OUT, BLOCK_O):
        cols = (o0 + tl.arange(0, BLOCK_O)).to(tl.int64)
        col_ok = cols < OUT
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
    tl.store(V + rows[:, None] * R + rr[None, :], v.to(V.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])


def dora_dy_row_pass(dy: torch.Tensor, u: torch.Tensor, b_scaled: torch.Tensor, y_pre: torch.Tensor, *,
                     block_n: int | None = None, block_o: int | None = None):
    """(v, P, c) = (dY b_scaled, u^T dY, colsum(dY o y_pre)) for dY, y_pre (N, out), u (N, r) and
    b_scaled (out, r), any strides, from one read of dY.  dY and y_pre share one dtype (float32,
    float16 or bfloat16); u and b_scaled share dY's dtype, or are float32 on a half dY (PEFT's
    float32 adapter on a half base: dY converted to float32 in-kernel, IEEE fp32 dots).
    v (N, r) and P (r, out) in u's dtype, c (out,) float32; all accumulated in float32."""
    compute = check_operands("the row pass", ("dy", dy), ("y_pre", y_pre), (("u", u), ("b_scaled", b_scaled)))
    n, out_features = dy.shape
    r = u.shape[1]
    if u.shape[0] != n or b_scaled.shape != (out_features, r) or y_pre.shape != dy.shape:
        raise ValueError(f"shapes do not chain: dy {tuple(dy.shape)}, u {tuple(u.shape)}, "
                         f"b_scaled {tuple(b_scaled.shape)}, y_pre {tuple(y_pre.shape)}")
    # 128 x 32 tiles with 8 warps compile without spills for sm_90 (ptxas: 184 registers for
    # bf16, 144 for fp32; 128 x 64 needs 255 and spills in fp32).
    block_n = block_n or (128 if dy.is_cuda else 16)
    block_o = block_o or 32
    check_tiles(block_n=block_n, block_o=block_o)
    n_blocks = triton.cdiv(n, block_n)
    v = torch.empty(n, r, dtype=compute, device=dy.device)
    p_part = torch.empty(n_blocks, r, out_features, dtype=torch.float32, device=dy.device)
    c_part = torch.empty(n_blocks, out_features, dtype=torch.float32, device=dy.device)
    _dora_dy_row_pass_kernel[(n_blocks,)](
        dy, u, b_scaled, y_pre, v, p_part, c_part, n, out_features, r,
        dy.stride(0), dy.stride(1), u.stride(0), u.stride(1), b_scaled.stride(0), b_scaled.stride(1),
        y_pre.stride(0), y_pre.stride(1),
        IEEE=compute == torch.float32, UPCAST=compute != dy.dtype, BLOCK_N=block_n, BLOCK_O=block_o,
        BLOCK_R=block_r(r),
        num_warps=8 if dy.is_cuda else 4)
    return v, p_part.sum(dim=0).to(compute), c_part.sum(dim=0)
