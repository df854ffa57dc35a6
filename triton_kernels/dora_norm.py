"""DoRA's factored row norm in one pass over W, never forming B @ A.

For W (M, K) = (out, in), A (R, K), B (M, R), scaling s::

    n_j^2 = ||W_j||^2 + 2 s rowsum((W A^T) o B)_j + s^2 rowsum((B G) o B)_j,   G = A A^T (R, R)
    n_j   = max(sqrt(max(n_j^2, 0)), eps)

One program owns BLOCK_M rows of W: it streams W's row block in BLOCK_K chunks and
accumulates P = W_blk A^T (BLOCK_M, R) in float32 with tl.dot (IEEE fp32 for fp32 inputs, so no
tf32 rounding); optionally ||W_j||^2 from the same tiles.  The epilogue reads B's rows and the
tiny G (computed in torch, float32) and writes n.  W is read once; the only temporaries are
(BLOCK_M, R) tiles.  R is padded to a power of two >= 16 (tl.dot's minimum).

Fused scaled low-rank GEMM (DoRA's forward and its dx), one kernel for both::

    C[m, n] = so[n] * ( sum_k X[m, k] sk[k] Y[k, n]  +  sum_r U[m, r] V[r, n] )  +  bias[n]

    forward: X = x (N, in), Y = W^T (strides only), U = x A^T (N, r), V = (s B)^T, so = g = m / n
             -> y = g o (x W^T + s u B^T) + b: the DoRA scale and the bias in the epilogue, the
             low-rank term as one more tl.dot on the same accumulator (no N x out pass).
    dx:      X = dY (N, out), sk = g (applied to the dY tile as it is loaded), Y = W (out, in),
             U = dY (s g o B) (N, r), V = A -> dx = dY (g o W) + v A.

Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)); fp32 accumulation; loads in the input dtype, store in
the output dtype; int64 offsets.  fp32 inputs run tl.dot with input_precision="ieee" (no tf32
rounding, like torch's default fp32 matmul on CUDA), so fp32 meets the fp32 tolerance on GPUs as
in the interpreter.  All four operands share one dtype (tl.dot takes one dtype).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dora_norm_fwd_kernel(W, A, B, G, WSQ, OUT, M, K, R,
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
    g = tl.load(G + rr[:, None] * BLOCK_R + rr[None, :])
    cross = tl.sum(acc * b, axis=1)
    quad = tl.sum(tl.dot(b, g, input_precision="ieee") * b, axis=1)
    sq = w_sq + 2.0 * scaling * cross + scaling * scaling * quad
    norm = tl.maximum(tl.sqrt(tl.maximum(sq, 0.0)), eps)
    tl.store(OUT + rows, norm, mask=row_ok)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _check_tiles(**tiles) -> None:
    """Tile sizes compile only as powers of two >= 16 (tl.arange sizes, tl.dot's minimum)."""
    for name, value in tiles.items():
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name}={value} must be a power of two >= 16, e.g. {name}=32")


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
    br = _block_r(r)
    a32 = lora_A.detach().to(torch.float32)
    gram = torch.zeros(br, br, dtype=torch.float32, device=weight.device)
    gram[:r, :r] = a32 @ a32.T
    norm = torch.empty(out_features, dtype=torch.float32, device=weight.device)
    has_wsq = w_sq is not None
    wsq_buf = w_sq.to(torch.float32).contiguous() if has_wsq else torch.empty_like(norm)
    block_m = block_m or (64 if weight.is_cuda else 16)
    block_k = block_k or (64 if weight.is_cuda else 32)
    _check_tiles(block_m=block_m, block_k=block_k)
    grid = (triton.cdiv(out_features, block_m),)
    _dora_norm_fwd_kernel[grid](
        weight, lora_A, lora_B, gram, wsq_buf, norm, out_features, in_features, r,
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        float(scaling), float(eps),
        HAS_WSQ=has_wsq, DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=br)
    return norm


@triton.jit
def _scaled_lowrank_gemm_kernel(X, Y, U, V, SK, SO, BIAS, C, M, N, K, R,
                                stride_xm, stride_xk, stride_yk, stride_yn, stride_um, stride_ur,
                                stride_vr, stride_vn, stride_cm, stride_cn,
                                HAS_SK: tl.constexpr, HAS_SO: tl.constexpr, HAS_BIAS: tl.constexpr,
                                IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = ks < K
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_SK:
            sk = tl.load(SK + ks, mask=k_ok, other=0.0)
            x = (x.to(tl.float32) * sk[None, :]).to(Y.dtype.element_ty)
        y = tl.load(Y + ks[:, None] * stride_yk + cols[None, :] * stride_yn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(x, y, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, y, acc)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    u = tl.load(U + rows[:, None] * stride_um + rr[None, :] * stride_ur,
                mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    v = tl.load(V + rr[:, None] * stride_vr + cols[None, :] * stride_vn,
                mask=r_ok[:, None] & col_ok[None, :], other=0.0)
    if IEEE:
        acc = tl.dot(u, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(u, v, acc)
    if HAS_SO:
        acc = acc * tl.load(SO + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(C + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(C.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
]
# Compiled GPUs pick a tile by timing (keyed on the problem size); the interpreter runs the
# plain kernel with the launcher's (or the caller's) small tiles.
_scaled_lowrank_gemm_tuned = triton.autotune(configs=_GEMM_CONFIGS, key=["M", "N", "K"])(_scaled_lowrank_gemm_kernel)


def scaled_lowrank_gemm(x: torch.Tensor, y: torch.Tensor, u: torch.Tensor, v: torch.Tensor, *,
                        k_scale: torch.Tensor | None = None, out_scale: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None, block_m: int | None = None,
                        block_n: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """C = out_scale o (x diag(k_scale) y + u v) + bias for x (M, K), y (K, N), u (M, r), v (r, N).

    Any strides (pass W.T for y).  ``k_scale`` (K,) and ``out_scale`` (N,) are float32; ``bias``
    (N,) in any float dtype.  x, y, u and v share one dtype (float32, float16 or bfloat16).
    C is (M, N), contiguous, in x's dtype.
    """
    for name, t in (("y", y), ("u", u), ("v", v)):
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}; "
                            "the fused GEMM takes one dtype and device")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x has dtype {x.dtype}; the fused GEMM takes float32, float16 or bfloat16")
    m, k = x.shape
    n = y.shape[1]
    r = u.shape[1]
    if y.shape[0] != k or u.shape[0] != m or v.shape != (r, n):
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, y {tuple(y.shape)}, u {tuple(u.shape)}, "
                         f"v {tuple(v.shape)}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    dummy = out  # never read when the matching HAS_* flag is off
    args = (x, y, u, v, dummy if k_scale is None else k_scale, dummy if out_scale is None else out_scale,
            dummy if bias is None else bias, out, m, n, k, r,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), u.stride(0), u.stride(1),
            v.stride(0), v.stride(1), out.stride(0), out.stride(1))
    flags = dict(HAS_SK=k_scale is not None, HAS_SO=out_scale is not None, HAS_BIAS=bias is not None,
                 IEEE=x.dtype == torch.float32, BLOCK_R=_block_r(r))
    if x.is_cuda and block_m is None and block_n is None and block_k is None:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        _scaled_lowrank_gemm_tuned[grid](*args, **flags)
        return out
    block_m, block_n, block_k = block_m or 16, block_n or 16, block_k or 16
    _check_tiles(block_m=block_m, block_n=block_n, block_k=block_k)
    _scaled_lowrank_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        *args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
