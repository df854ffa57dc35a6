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

DoRA's backward row pass (one read of dY, with dY (N, out), u (N, r), b_s = s g o B (out, r))::

    v = dY b_s (N, r),     P = u^T dY (r, out),     c = colsum(dY o y_pre) (out,)

One program owns BLOCK_N rows and walks out in BLOCK_O chunks: v accumulates in registers, and
each chunk's P and c for those rows go to float32 partial buffers (n_blocks, r, out) and
(n_blocks, out) that the launcher sums (deterministic, no atomics).  Mixed precision: dY and
y_pre half, u and b_s float32; the dY tile is converted to float32 on load and both dots run IEEE
fp32 (v and P float32, as PEFT's float32 adapter path computes them from dY.to(float32)).

Seeded dropout (the mask regenerated from a seed, never stored).  For a 2-D (N, d) tensor the
element (i, j) belongs to the group q = i ceil(d / 4) + floor(j / 4) (int64, a logical index:
independent of strides) at lane c = j mod 4, and::

    keep_ij = philox4x_uniform(seed, q)[c] >= p    (tl.rand4x: four float32 in [0, 1) per Philox
                                                    call, one call per 4 columns; P(keep) = 1 - p)
    mask_ij = keep_ij / (1 - p)                     (nn.Dropout's scaling: E[mask] = 1)

``seeded_dropout`` writes x_d = mask o x (and optionally x - x_d: DoRA's base correction) and
``dropout_mask_add_`` adds mask o inner to an output in place (the backward's dx term); both
regenerate the same mask from (seed, p, d).  Loads in the input dtype, fp32 arithmetic, stores in
the output dtype.  The stream is Triton's Philox, not nn.Dropout's: the same distribution, other bits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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


def _check_operands(what: str, base, partner, adapter) -> torch.dtype:
    """Dtype/device contract of the mixed-capable launchers: ``base`` = (name, tensor) in float32,
    float16 or bfloat16; ``partner`` of the same dtype and device; the ``adapter`` pairs in base's
    dtype or all float32 (PEFT's float32 adapter on a half base), on base's device.  Returns the
    adapter operands' dtype."""
    (name, t0), (pname, pt) = base, partner
    if t0.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} has dtype {t0.dtype}; {what} takes float32, float16 or bfloat16")
    if pt.dtype != t0.dtype or pt.device != t0.device:
        raise TypeError(f"{pname} is {pt.dtype} on {pt.device} but {name} is {t0.dtype} on {t0.device}; "
                        f"{what} takes {name} and {pname} of one dtype and device")
    adapter_dtype = adapter[0][1].dtype if adapter[0][1].dtype == torch.float32 else t0.dtype
    for aname, t in adapter:
        if t.dtype != adapter_dtype or t.device != t0.device:
            raise TypeError(f"{aname} is {t.dtype} on {t.device} but {name} is {t0.dtype} on {t0.device}; "
                            f"{' and '.join(a for a, _ in adapter)} take {name}'s dtype, or float32 on a "
                            f"float16 / bfloat16 {name}, on {name}'s device")
    return adapter_dtype


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
    b32 = lora_B.detach().to(torch.float32)
    quad = ((b32 @ (a32 @ a32.T)) * b32).sum(dim=1)                   # rowsum((B G) o B), (out,)
    norm = torch.empty(out_features, dtype=torch.float32, device=weight.device)
    has_wsq = w_sq is not None
    wsq_buf = w_sq.to(torch.float32).contiguous() if has_wsq else torch.empty_like(norm)
    block_m = block_m or (64 if weight.is_cuda else 16)
    block_k = block_k or (64 if weight.is_cuda else 32)
    _check_tiles(block_m=block_m, block_k=block_k)
    grid = (triton.cdiv(out_features, block_m),)
    _dora_norm_fwd_kernel[grid](
        weight, lora_A, lora_B, quad, wsq_buf, norm, out_features, in_features, r,
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        float(scaling), float(eps),
        HAS_WSQ=has_wsq, DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=br)
    return norm


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
    bias; x's dtype), stored by the same epilogue.  ``round_base`` (half x only): the base product
    B0 = x diag(k_scale) y is rounded to x's dtype before u v is added (where PEFT rounds its half
    base GEMM; see the module docstring).  ``residual`` (M, N) contiguous, any float dtype:
    C = (residual - B0) + out_scale o (B0 + u v) + bias instead, in that order in float32 (DoRA's
    mixed forward with dropout: residual = x W^T + b, B0 = fl_h(x_d W^T)).  ``bias_in_base``: the
    bias joins B0 before its rounding, C = fl(out_scale o (fl_h(x y + bias) + u v)) (DeLoRA's mixed
    forward: PEFT's F.linear(x, W, b) rounded, then the float32 low-rank term).
    """
    lowrank_dtype = _check_operands("the fused GEMM", ("x", x), ("y", y), (("u", u), ("v", v)))
    if round_base and x.dtype == torch.float32:
        raise ValueError("round_base=True rounds to a half x's dtype but x is float32; pass round_base=False")
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
                 HAS_PRE=with_pre, HAS_RES=residual is not None, ROUND_BASE=round_base,
                 BIAS_IN_BASE=bias_in_base, IEEE=x.dtype == torch.float32,
                 LOWRANK_IEEE=lowrank_dtype == torch.float32, BLOCK_R=_block_r(r))
    if x.is_cuda and block_m is None and block_n is None and block_k is None:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        _scaled_lowrank_gemm_tuned[grid](*args, **flags)
    else:
        block_m, block_n, block_k = block_m or 16, block_n or 16, block_k or 16
        _check_tiles(block_m=block_m, block_n=block_n, block_k=block_k)
        _scaled_lowrank_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            *args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return (out, pre) if with_pre else out


# ----------------------------------------------------------------------------------------------
# Seeded dropout: the mask regenerated from (seed, p, d) in every kernel that needs it.

@triton.jit
def _dropout_keep(seed, rows, col0, D, p, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """keep (BLOCK_M, BLOCK_D) for int64 ``rows`` and columns col0 + [0, BLOCK_D), col0 a multiple
    of 4: one 10-round Philox call per group of 4 columns, its four outputs interleaved to lanes."""
    groups = rows[:, None] * ((D + 3) // 4) + (col0 // 4 + tl.arange(0, BLOCK_D // 4))[None, :]
    r0, r1, r2, r3 = tl.rand4x(seed, groups)
    # join(join(r0, r2), join(r1, r3))[..., s, t] = r_{2s+t}: row-major reshape puts it at column 4k + 2s + t.
    uniform = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_D))
    return uniform >= p

@triton.jit(do_not_specialize=["seed"])
def _seeded_dropout_kernel(X, XD, XR, M, D, stride_xm, stride_xd, seed, p, keep_scale,
                           HAS_REST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    col0 = tl.program_id(1) * BLOCK_D
    cols = (col0 + tl.arange(0, BLOCK_D)).to(tl.int64)
    ok = (rows < M)[:, None] & (cols < D)[None, :]
    index = rows[:, None] * D + cols[None, :]                # x_d and x - x_d are contiguous
    keep = _dropout_keep(seed, rows, col0, D, p, BLOCK_M, BLOCK_D)
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xd, mask=ok, other=0.0).to(tl.float32)
    x_d = tl.where(keep, x * keep_scale, 0.0)
    tl.store(XD + index, x_d.to(XD.dtype.element_ty), mask=ok)
    if HAS_REST:
        tl.store(XR + index, (x - x_d).to(XR.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_add_kernel(OUT, INNER, M, D, stride_om, stride_od, stride_im, stride_id, seed, p, keep_scale,
                             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    col0 = tl.program_id(1) * BLOCK_D
    cols = (col0 + tl.arange(0, BLOCK_D)).to(tl.int64)
    ok = (rows < M)[:, None] & (cols < D)[None, :]
    keep = _dropout_keep(seed, rows, col0, D, p, BLOCK_M, BLOCK_D)
    out_ptr = OUT + rows[:, None] * stride_om + cols[None, :] * stride_od
    inner = tl.load(INNER + rows[:, None] * stride_im + cols[None, :] * stride_id, mask=ok, other=0.0)
    out = tl.load(out_ptr, mask=ok, other=0.0).to(tl.float32)
    out += tl.where(keep, inner.to(tl.float32) * keep_scale, 0.0)
    tl.store(out_ptr, out.to(OUT.dtype.element_ty), mask=ok)


# Elements per program of the elementwise dropout kernels (a (BLOCK_M, BLOCK_D) tile, both powers
# of two): 2048 compile to 62 registers for sm_90 with the default 4 warps (4096: 136).
_ELEMENTWISE_BLOCK = 2048


def _elementwise_grid(m: int, d: int) -> tuple[tuple[int, int], int, int]:
    block_d = min(max(triton.next_power_of_2(d), 4), 1024)   # >= 4: whole Philox groups per tile
    block_m = _ELEMENTWISE_BLOCK // block_d
    return (triton.cdiv(m, block_m), triton.cdiv(d, block_d)), block_m, block_d


def _check_dropout(name: str, t: torch.Tensor, seed: int, p: float) -> None:
    if t.ndim != 2:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; the dropout kernels take a 2-D (N, d) tensor")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} has dtype {t.dtype}; the dropout kernels take float32, float16 or bfloat16")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p} must be in (0, 1), e.g. p=0.1")
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed={seed} must be in [0, 2**63)")


def seeded_dropout(x: torch.Tensor, seed: int, p: float, *, with_rest: bool = False):
    """x_d = mask o x for x (N, d) with the mask of the module docstring (Philox of the seed at the
    element's logical index: any strides give the same mask).  x_d is (N, d), contiguous, in x's dtype;
    ``with_rest``: return (x_d, x - x_d) (the difference taken in float32 before rounding)."""
    _check_dropout("x", x, seed, p)
    m, d = x.shape
    x_d = torch.empty(m, d, dtype=x.dtype, device=x.device)
    rest = torch.empty_like(x_d) if with_rest else None
    grid, block_m, block_d = _elementwise_grid(m, d)
    _seeded_dropout_kernel[grid](x, x_d, x_d if rest is None else rest, m, d, x.stride(0), x.stride(1),
                                 int(seed), float(p), 1.0 / (1.0 - p),
                                 HAS_REST=with_rest, BLOCK_M=block_m, BLOCK_D=block_d)
    return (x_d, rest) if with_rest else x_d


def dropout_mask_add_(out: torch.Tensor, inner: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """out += mask o inner in place (float32 arithmetic, stored in out's dtype), with the mask of
    :func:`seeded_dropout` for the same (seed, p) and shape.  out and inner are (N, d), any strides;
    out must not overlap itself or inner.  Returns out."""
    _check_dropout("out", out, seed, p)
    _check_dropout("inner", inner, seed, p)
    if inner.shape != out.shape or inner.device != out.device:
        raise ValueError(f"inner is {tuple(inner.shape)} on {inner.device} but out is {tuple(out.shape)} on "
                         f"{out.device}; they must match")
    m, d = out.shape
    grid, block_m, block_d = _elementwise_grid(m, d)
    _dropout_mask_add_kernel[grid](out, inner, m, d, out.stride(0), out.stride(1), inner.stride(0), inner.stride(1),
                                   int(seed), float(p), 1.0 / (1.0 - p), BLOCK_M=block_m, BLOCK_D=block_d)
    return out


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
    block_m = block_m or (_block_r(m) if m <= 64 else wide)
    block_n = block_n or (_block_r(n) if n <= 64 else wide)
    # IEEE fp32 dots run on FMA units: 16-deep K tiles keep both tiles in registers (ptxas for sm_90,
    # r = 16, d = 4096: 64 (u) and 96 - 110 (dA) registers without spills; 32-deep dA needs 187,
    # 64-deep spills).
    block_k = block_k or (16 if a.is_cuda else 32)
    _check_tiles(block_m=block_m, block_n=block_n, block_k=block_k)
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
    compute = _check_operands("the row pass", ("dy", dy), ("y_pre", y_pre), (("u", u), ("b_scaled", b_scaled)))
    n, out_features = dy.shape
    r = u.shape[1]
    if u.shape[0] != n or b_scaled.shape != (out_features, r) or y_pre.shape != dy.shape:
        raise ValueError(f"shapes do not chain: dy {tuple(dy.shape)}, u {tuple(u.shape)}, "
                         f"b_scaled {tuple(b_scaled.shape)}, y_pre {tuple(y_pre.shape)}")
    # 128 x 32 tiles with 8 warps compile without spills for sm_90 (ptxas: 184 registers for
    # bf16, 144 for fp32; 128 x 64 needs 255 and spills in fp32).
    block_n = block_n or (128 if dy.is_cuda else 16)
    block_o = block_o or 32
    _check_tiles(block_n=block_n, block_o=block_o)
    n_blocks = triton.cdiv(n, block_n)
    v = torch.empty(n, r, dtype=compute, device=dy.device)
    p_part = torch.empty(n_blocks, r, out_features, dtype=torch.float32, device=dy.device)
    c_part = torch.empty(n_blocks, out_features, dtype=torch.float32, device=dy.device)
    _dora_dy_row_pass_kernel[(n_blocks,)](
        dy, u, b_scaled, y_pre, v, p_part, c_part, n, out_features, r,
        dy.stride(0), dy.stride(1), u.stride(0), u.stride(1), b_scaled.stride(0), b_scaled.stride(1),
        y_pre.stride(0), y_pre.stride(1),
        IEEE=compute == torch.float32, UPCAST=compute != dy.dtype, BLOCK_N=block_n, BLOCK_O=block_o,
        BLOCK_R=_block_r(r),
        num_warps=8 if dy.is_cuda else 4)
    return v, p_part.sum(dim=0).to(compute), c_part.sum(dim=0)
