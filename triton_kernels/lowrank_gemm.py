"""Fused scaled low-rank GEMM and float32 products of half operands: the GEMMs that carry an
adapter's low-rank branch (DoRA, DeLoRA; LoRA and the other low-rank methods build on them).

Fused scaled low-rank GEMM (DoRA's forward and its dx), one kernel for both::

    C[m, n] = so[n] * ( sum_k X[m, k] sk[k] Y[k, n]  +  sum_r U[m, r] V[r, n] )  +  bias[n]

    forward: X = x (N, in), Y = W^T (strides only), U = x A^T (N, r), V = (s B)^T, so = g = m / n
             -> y = g o (x W^T + s u B^T) + b: the DoRA scale and the bias in the epilogue, the
             low-rank term as one more tl.dot on the same accumulator (no N x out pass).
    dx:      X = dY (N, out), sk = g (applied to the dY tile as it is loaded), Y = W (out, in),
             U = dY (s g o B) (N, r), V = A -> dx = dY (g o W) + v A.

    pre (optional second output): C_pre = sum_k X sk Y + U V, the accumulator before so and bias
             (DoRA's y_pre, which dm needs), stored by the same epilogue: y and y_pre from one pass.

Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)); fp32 accumulation; loads in the input dtype, store in
the output dtype; int64 offsets.  fp32 inputs run tl.dot with input_precision="ieee" (no tf32
rounding, like torch's default fp32 matmul on CUDA), so fp32 meets the fp32 tolerance on GPUs as
in the interpreter.  X and Y share one dtype, U and V share one dtype (each tl.dot takes one).

Mixed precision (PEFT's default float32 adapter on a float16 / bfloat16 base): X and Y half, U and
V float32, and ``round_base`` rounds the base product to the half dtype before the low-rank term
is added, where PEFT's F.linear(x, W) (forward) and (dY o g).to(half) @ W (dx) round it::

    acc = fl32(fl_h(sum_k X sk Y)) + U V      (U V an IEEE fp32 tl.dot; sk rounds X sk to half on load)

then the epilogue as above (C_pre and C rounded to the half dtype once each).  With dropout the
forward adds a residual R = fl_h(x W^T + b) (torch's half GEMM) and X = fl_h(mask o x)::

    C = fl_h((R - B0) + so o (B0 + U V)),    B0 = fl32(fl_h(X Y))     (PEFT's y = base - base_d + g y_pre)

and dx's inner term v A + fl32(fl_h(fl_h(dY o (g - 1)) W)) leaves the GEMM in float32 (``out_dtype``)
for ``dropout_mask_add_``.  DeLoRA's mixed forward rounds fl_h(x W^T + b), the bias inside
(``bias_in_base``), before its float32 low-rank term joins.

float32 products of half and float32 operands (``float32_matmul``)::

    C = fl32(a) fl32(b)     a (M, K), b (K, N), each tile converted to float32 as it is loaded

IEEE fp32 tl.dot, no float32 copy of a half operand in memory.  For DoRA's mixed path:
u = x A^T (a = x, b = A^T: a row-block grid) and dA = v^T x (a = v^T, b = x: the reduction over
the N tokens split in chunks whose float32 partial sums the launcher adds, deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import block_r, check_operands, check_tiles
from .dropout import _check_dropout, _dropout_keep


@triton.jit
def _scaled_lowrank_gemm_kernel(X, Y, U, V, SK, SO, BIAS, RES, C, PRE, M, N, K, R,
                                stride_xm, stride_xk, stride_yk, stride_yn, stride_um, stride_ur,
                                stride_vr, stride_vn, stride_cm, stride_cn,
                                HAS_SK: tl.constexpr, HAS_SO: tl.constexpr, HAS_BIAS: tl.constexpr,
                                HAS_PRE: tl.constexpr, HAS_RES: tl.constexpr, ROUND_BASE: tl.constexpr,
                                BIAS_IN_BASE: tl.constexpr, IEEE: tl.constexpr, LOWRANK_IEEE: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
    if HAS_BIAS and BIAS_IN_BASE:
        acc = acc + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ROUND_BASE:  # PEFT's half base product, rounded before the float32 low-rank term joins it
        acc = acc.to(X.dtype.element_ty).to(tl.float32)
    if HAS_RES:
        base = acc
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    u = tl.load(U + rows[:, None] * stride_um + rr[None, :] * stride_ur,
                mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    v = tl.load(V + rr[:, None] * stride_vr + cols[None, :] * stride_vn,
                mask=r_ok[:, None] & col_ok[None, :], other=0.0)
    if LOWRANK_IEEE:
        acc = tl.dot(u, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(u, v, acc)
    if HAS_PRE:  # C, PRE and RES are all (M, N) contiguous: one set of strides
        tl.store(PRE + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(PRE.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])
    if HAS_SO:
        acc = acc * tl.load(SO + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_RES:
        res = tl.load(RES + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
                      mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc = (res - base) + acc
    if HAS_BIAS and not BIAS_IN_BASE:
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
                        bias: torch.Tensor | None = None, with_pre: bool = False, round_base: bool = False,
                        residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                        bias_in_base: bool = False, block_m: int | None = None, block_n: int | None = None,
                        block_k: int | None = None):
    """C = out_scale o (x diag(k_scale) y + u v) + bias for x (M, K), y (K, N), u (M, r), v (r, N).

    Any strides (pass W.T for y).  ``k_scale`` (K,) and ``out_scale`` (N,) are float32; ``bias``
    (N,) in any float dtype.  x and y share one dtype (float32, float16 or bfloat16); u and v share
    x's dtype, or are float32 on a float16 / bfloat16 x (PEFT's float32 adapter on a half base:
    an IEEE fp32 low-rank dot).  C is (M, N), contiguous, in ``out_dtype`` (default x's dtype).
    ``with_pre``: return (C, C_pre) with C_pre = x diag(k_scale) y + u v (before out_scale and
    bias; x's dtype), stored by the same epilogue.  ``round_base``: the base product
    B0 = x diag(k_scale) y is rounded to x's dtype before u v is added (where PEFT rounds its half
    base GEMM; see the module docstring; a no-op for float32 x).  ``residual`` (M, N) contiguous, any float dtype:
    C = (residual - B0) + out_scale o (B0 + u v) + bias instead, in that order in float32 (DoRA's
    mixed forward with dropout: residual = x W^T + b, B0 = fl_h(x_d W^T)).  ``bias_in_base``: the
    bias joins B0 before its rounding, C = fl(out_scale o (fl_h(x y + bias) + u v)) (DeLoRA's mixed
    forward: PEFT's F.linear(x, W, b) rounded, then the float32 low-rank term).
    """
    lowrank_dtype = check_operands("the fused GEMM", ("x", x), ("y", y), (("u", u), ("v", v)))
    m, k = x.shape
    n = y.shape[1]
    r = u.shape[1]
    if y.shape[0] != k or u.shape[0] != m or v.shape != (r, n):
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, y {tuple(y.shape)}, u {tuple(u.shape)}, "
                         f"v {tuple(v.shape)}")
    if residual is not None and (residual.shape != (m, n) or not residual.is_contiguous()
                                 or residual.device != x.device):
        raise ValueError(f"residual is {tuple(residual.shape)} on {residual.device} (contiguous: "
                         f"{residual.is_contiguous()}); it must be a contiguous ({m}, {n}) tensor on {x.device}")
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    pre = torch.empty(m, n, dtype=x.dtype, device=x.device) if with_pre else None
    dummy = out  # never read (or written) when the matching HAS_* flag is off
    args = (x, y, u, v, dummy if k_scale is None else k_scale, dummy if out_scale is None else out_scale,
            dummy if bias is None else bias, dummy if residual is None else residual, out,
            dummy if pre is None else pre, m, n, k, r,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), u.stride(0), u.stride(1),
            v.stride(0), v.stride(1), out.stride(0), out.stride(1))
    flags = dict(HAS_SK=k_scale is not None, HAS_SO=out_scale is not None, HAS_BIAS=bias is not None,
                 HAS_PRE=with_pre, HAS_RES=residual is not None, ROUND_BASE=round_base and x.dtype != torch.float32,
                 BIAS_IN_BASE=bias_in_base, IEEE=x.dtype == torch.float32,
                 LOWRANK_IEEE=lowrank_dtype == torch.float32, BLOCK_R=block_r(r))
    if x.is_cuda and block_m is None and block_n is None and block_k is None:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        _scaled_lowrank_gemm_tuned[grid](*args, **flags)
    else:
        block_m, block_n, block_k = block_m or 16, block_n or 16, block_k or 16
        check_tiles(block_m=block_m, block_n=block_n, block_k=block_k)
        _scaled_lowrank_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            *args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return (out, pre) if with_pre else out


# ----------------------------------------------------------------------------------------------
# float32 products of half and float32 operands: u = x A^T and dA = v^T x on the mixed path.

@triton.jit(do_not_specialize=["seed"])
def _float32_matmul_kernel(A, B, C_PART, M, N, K, K_PER_SPLIT,
                           stride_am, stride_ak, stride_bk, stride_bn, seed, p, keep_scale,
                           DROPOUT_A: tl.constexpr, DROPOUT_B: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2).to(tl.int64)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < N
    k_first = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_first + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        ks = k_first + k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = ks < k_end
        a = tl.load(A + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if DROPOUT_A:  # a is the (M, K) tensor the mask belongs to
            keep = _dropout_keep(seed, rows, k_first + k0, K, p, BLOCK_M, BLOCK_K)
            a = tl.where(keep, a * keep_scale, 0.0)
        b = tl.load(B + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if DROPOUT_B:  # b is the (K, N) tensor the mask belongs to
            keep = _dropout_keep(seed, ks, pid_n * BLOCK_N, N, p, BLOCK_K, BLOCK_N)
            b = tl.where(keep, b * keep_scale, 0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    tl.store(C_PART + (pid_s * M + rows[:, None]) * N + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


def float32_matmul(a: torch.Tensor, b: torch.Tensor, *, dropout: tuple[str, int, float] | None = None,
                   split_k: int | None = None, block_m: int | None = None, block_n: int | None = None,
                   block_k: int | None = None) -> torch.Tensor:
    """C = a.float() @ b.float() (M, N), float32, for a (M, K) and b (K, N) each float32, float16
    or bfloat16, any strides: every tile converted to float32 on load (no float32 copy of a half
    operand), IEEE fp32 tl.dot.  ``split_k``: the reduction over K split in that many chunks whose
    float32 partial sums are added here (deterministic); by default enough chunks for about 256
    programs (dA = v^T x: few output tiles, K = tokens), none shorter than 512.  Tiles default to
    the skinny side padded to a power of two >= 16 and 64 (CUDA) or 16 elsewhere; BLOCK_K 16 (CUDA)
    or 32 (interpreter).
    ``dropout`` = (operand, seed, p), operand "a" or "b": that operand is replaced by mask o operand
    (float32, before the product) with the mask :func:`seeded_dropout` gives a tensor of its shape
    for (seed, p): u = (mask o x) A^T and dA = v^T (mask o x) without x_d in memory."""
    for name, t in (("a", a), ("b", b)):
        if t.ndim != 2 or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} is a {t.ndim}-D {t.dtype} tensor; float32_matmul takes 2-D float32, "
                            "float16 or bfloat16 tensors")
    if b.device != a.device:
        raise ValueError(f"b is on {b.device} but a is on {a.device}; move one to match")
    m, k = a.shape
    if b.shape[0] != k:
        raise ValueError(f"shapes do not chain: a {tuple(a.shape)}, b {tuple(b.shape)}")
    n = b.shape[1]
    wide = 64 if a.is_cuda else 16
    block_m = block_m or (block_r(m) if m <= 64 else wide)
    block_n = block_n or (block_r(n) if n <= 64 else wide)
    # IEEE fp32 dots run on FMA units: 16-deep K tiles keep both tiles in registers (ptxas for sm_90,
    # r = 16, d = 4096: 64 (u) and 96 - 110 (dA) registers without spills; 32-deep dA needs 187,
    # 64-deep spills).
    block_k = block_k or (16 if a.is_cuda else 32)
    check_tiles(block_m=block_m, block_n=block_n, block_k=block_k)
    masked, seed, p = dropout if dropout is not None else (None, 0, 0.5)
    if dropout is not None:
        if masked not in ("a", "b"):
            raise ValueError(f"dropout names operand {masked!r}; valid choices: 'a', 'b'")
        _check_dropout(masked, a if masked == "a" else b, seed, p)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    if split_k is None:  # about 256 programs or more, no chunk shorter than 512
        split_k = max(1, min(triton.cdiv(k, 512), triton.cdiv(256, max(tiles, 1))))
    if split_k < 1:
        raise ValueError(f"split_k={split_k} must be >= 1, e.g. split_k=1")
    k_per_split = max(1, triton.cdiv(triton.cdiv(k, split_k), block_k)) * block_k   # whole K tiles per chunk
    split_k = max(1, triton.cdiv(k, k_per_split))
    part = torch.empty(split_k, m, n, dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    _float32_matmul_kernel[grid](a, b, part, m, n, k, k_per_split,
                                 a.stride(0), a.stride(1), b.stride(0), b.stride(1), int(seed), float(p),
                                 1.0 / (1.0 - p), DROPOUT_A=masked == "a", DROPOUT_B=masked == "b",
                                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return part[0] if split_k == 1 else part.sum(dim=0)
