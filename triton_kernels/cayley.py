"""Cayley family kernels: packed skew -> Cayley rotation, and block-diagonal rotation of activations.

Math (b = block size, n = number of blocks, M = rows of the flattened input):

    Packed skew.  packed[i, j] is the j-th strict upper-triangle entry of block i in
    torch.triu_indices order: entry (r, c), r < c, sits at j = r b - r (r + 1) / 2 + (c - r - 1);
    Q = U - U^T.

    Exact Cayley.  N = (I - Q)^{-1},  R = (I + Q)(I - Q)^{-1} = 2 N - I.  One program per
    block holds (B, B) fp32 register tiles (B = next power of two >= max(b, 16); the padding
    starts as identity, stays decoupled from the b x b block and is masked out on store).  Two
    solvers (constexpr SOLVER):
      elimination (default): I - Q has symmetric part I (Q is skew), so it is positive real:
        Gauss-Jordan without pivoting exists and has bounded growth.  Eigenvalues 1 -/+ i theta
        have modulus >= 1, so ||N||_2 <= 1 and cond(I - Q) = sqrt(1 + ||Q||_2^2).  b sequential
        rank-1 updates of the tile.  Its rounding grows with that condition number: measured
        ~2e-7 relative to float64 for ||Q||_2 < 1, 4e-6 .. 8e-6 (orthogonality error ~1e-4) at
        b = 64 with entries ~10 (||Q||_2 ~ 160), where Newton-Schulz stays at ~3e-7.
      Newton-Schulz (matmul only): A = I - Q is normal and A^T A = (I + Q)(I - Q) = I - Q^2 is
        SPD with eigenvalues 1 + theta^2 in [1, 1 + lam], lam = min(||Q^2||_1, ||Q||_F^2) >=
        ||Q||_2^2 (Q^2 symmetric: ||Q^2||_2 <= ||Q^2||_1).  X_0 = alpha A^T, alpha = 2 / (2 + lam),
        X_{k+1} = X_k (2 I - A X_k).  The residual E_k = I - A X_k obeys E_{k+1} = E_k^2 and
        ||E_0||_2 = max |1 - alpha (1 + theta^2)| <= rho = lam / (2 + lam) < 1, so
        ||N - X_k||_2 <= ||N||_2 ||E_k||_2 <= rho^(2^k).  The kernel tracks that bound per block
        (d = 1 - e while e > 1/2, where d_{k+1} = d_k (2 - d_k) keeps precision for huge lam; then
        e_{k+1} = e_k^2) and stops once e <= 2^-24 (fp32 rounding): about
        log2(lam / 2) + log2(ln 2^24) + 1 ~ log2(lam) + 4 iterations, two tl.dot each (the first
        reuses A X_0 = alpha (I - Q^2)).  E.g. ||Q||_2 ~ 0.5: 3 iterations; entries ~1 at b=128
        (lam ~ 1.2e3): 14; entries ~10 (lam ~ 1.2e5): 20-21 (newton_schulz_steps).  A runtime loop of at most
        NS_MAX_ITERS = 48 steps covers lam < 2^44; NaN in Q gives e = NaN, no step, NaN out.
    The backward uses the Cayley derivative (dR = 2 N dQ N):  dL/dQ = 2 N^T (dL/dR) N^T with
    N = (R + I) / 2 from the saved R, then the skew adjoint into the packed layout,
    dL/dpacked[j] = dQ[r, c] - dQ[c, r] for the j-th upper entry (r, c): one program per block.

    Neumann.  PEFT's k-term series: k = 1: I;  k = 2: I + 2Q;  k >= 3, t = max(3, k - 1):
    R = sum_j c_j Q^j with c_0 = 1, c_j = 2 (0 < j < t), c_t = 1; powers by tl.dot in fp32.
    Backward (from packed, powers recomputed): with P = Q^T = -Q and G = dL/dR,
        dL/dQ = sum_j c_j sum_{a + c = j - 1} P^a G P^c = T_0,   by a two-level Horner scheme
        S_{t-1} = I,  T_{t-1} = G;   S_a = c_{a+1} I + S_{a+1} P,  T_a = G S_a + P T_{a+1}
    (3 tl.dot per step, t - 1 steps), then the same skew adjoint.  PEFT's default k = 5 runs in
    closed form instead (5 tl.dot rather than 9): R = I + 2Q + S M with S = Q^2 = P^2 (symmetric)
    and M = 2I + 2Q + S, so with D = G M^T + S G:  dL/dQ = 2 G + 2 S G + D P + P D.

    Block rotation (OFTv2, input-centric).  y[m, i b + c] = sum_k x[m, i b + k] R_i[k, c], i.e.
    y = x R_bd.  Forward loads an (BLOCK_M, B) tile of x and R_i, one tl.dot with fp32
    accumulation, stores in the output dtype.  dx = dy R_bd^T is the same kernel on the transposed
    view of R (strides only).  dR_i = sum_m x[m, i]^T dy[m, i]: grid (n, SPLIT_M), each program
    accumulates its slice of rows in fp32 into a partial (SPLIT_M, n, b, b) buffer that the
    launcher sums.  All offsets are int64; x may have any strides.

    SVD-coordinate core (PSOFT / SSVD / AntiPaSTO).  For A (r, in) and an r x r core C:
    z = x A^T and u = z C^T per tile of BLOCK_M rows, z accumulated in fp32 over the input
    features and multiplied by C^T before it leaves the program, so the only writes are z and u
    (N x r each; z is what the backward needs for dC).  The output y = x W^T + bias + u B^T is
    then one GEMM plus one rank-r update into the same buffer: no N x d temporary.

    Float32 adapter on a half x (PEFT's default on a bf16 / fp16 base: R or A in float32).  PEFT
    multiplies in float32.  An IEEE fp32 tl.dot runs on CUDA cores (~1/15 of the tensor-core
    rate), so the float32 operand F is split in registers, F = F_hi + F_lo with F_hi = fl_h(F)
    and F_lo = fl_h(F - F_hi), and x F = x F_hi + x F_lo: two half tensor-core products
    accumulated in fp32.  x is exact in its half dtype, every product is exact in fp32, and
    F_hi + F_lo carries 2p bits of F (p = 8 for bf16, 11 for fp16): a relative error of
    2^-17 / 2^-23 per term, far below the half rounding of the output that follows.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl


ELIMINATION, NEWTON_SCHULZ = 0, 1
EXACT_SOLVERS = {"elimination": ELIMINATION, "newton_schulz": NEWTON_SCHULZ}
DEFAULT_EXACT_SOLVER = "elimination"  # until a GPU measurement (benchmarks/cayley_solvers.py) says otherwise
NS_MAX_ITERS = 48
NS_TOL = 2.0 ** -24


@triton.jit
def _skew_tile(packed_ptr, b, rows, cols):
    """(BLOCK, BLOCK) fp32 Q = U - U^T of one block from its packed triangle (zero padding)."""
    inside = (rows < b) & (cols < b)
    lo = tl.minimum(rows, cols)
    hi = tl.maximum(rows, cols)
    index = lo * b - lo * (lo + 1) // 2 + (hi - lo - 1)
    values = tl.load(packed_ptr + index, mask=inside & (rows != cols), other=0.0).to(tl.float32)
    return tl.where(rows < cols, values, -values)


@triton.jit
def _cayley_fwd_kernel(packed_ptr, r_ptr, b, stride_pn, stride_rn,
                       BLOCK: tl.constexpr, NEUMANN_TERMS: tl.constexpr, NEUMANN_TOP: tl.constexpr,
                       SOLVER: tl.constexpr, NS_MAX_ITERS: tl.constexpr, NS_TOL: tl.constexpr):
    """One program per block: packed -> Q -> R (exact by elimination or Newton-Schulz, or the
    Neumann series)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    inside = (rows < b) & (cols < b)
    Q = _skew_tile(packed_ptr + pid * stride_pn, b, rows, cols)
    eye = tl.where(rows == cols, 1.0, 0.0)
    if NEUMANN_TERMS == 0:
        if SOLVER == 1:  # NEWTON_SCHULZ
            # Newton-Schulz for N = (I - Q)^{-1} (module docstring): X <- X (2I - A X), A X_0 = alpha (I - Q^2).
            Q2 = tl.dot(Q, Q, input_precision="ieee")
            lam = tl.minimum(tl.max(tl.sum(tl.abs(Q2), axis=0), axis=0), tl.sum(tl.sum(Q * Q, axis=1), axis=0))
            alpha = 2.0 / (2.0 + lam)
            A = eye - Q
            X = alpha * (eye + Q)
            AX = alpha * (eye - Q2)
            bound = lam / (2.0 + lam)   # >= ||E_k||_2
            gap = alpha                 # 1 - bound, kept separately while bound rounds to 1
            for _ in range(0, NS_MAX_ITERS):
                if bound > NS_TOL:
                    X = 2.0 * X - tl.dot(X, AX, input_precision="ieee")
                    if bound > 0.5:
                        gap = gap * (2.0 - gap)
                        bound = 1.0 - gap
                    else:
                        bound = bound * bound
                        gap = 1.0 - bound
                    if bound > NS_TOL:
                        AX = tl.dot(A, X, input_precision="ieee")
            R = 2.0 * X - eye
        else:  # ELIMINATION
            # Gauss-Jordan on [I - Q | I] without pivoting; padding rows/cols stay identity.
            A = eye - Q
            N = eye
            for k in range(0, b):
                row_a = tl.sum(tl.where(rows == k, A, 0.0), axis=0)      # (BLOCK,) row k of A
                row_n = tl.sum(tl.where(rows == k, N, 0.0), axis=0)
                pivot = tl.sum(tl.where(tl.arange(0, BLOCK) == k, row_a, 0.0), axis=0)
                row_a = row_a / pivot
                row_n = row_n / pivot
                col_k = tl.sum(tl.where(cols == k, A, 0.0), axis=1)      # (BLOCK,) column k of A
                factor = tl.where(tl.arange(0, BLOCK) == k, 0.0, col_k)[:, None]
                A = tl.where(rows == k, row_a[None, :], A - factor * row_a[None, :])
                N = tl.where(rows == k, row_n[None, :], N - factor * row_n[None, :])
            R = 2.0 * N - eye
    else:
        R = eye
        if NEUMANN_TERMS == 2:
            R = eye + 2.0 * Q
        elif NEUMANN_TERMS > 2:
            power = Q
            for _ in tl.static_range(1, NEUMANN_TOP):
                R = R + 2.0 * power
                power = tl.dot(power, Q, input_precision="ieee")
            R = R + power
    tl.store(r_ptr + pid * stride_rn + rows * b + cols, R.to(r_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _cayley_bwd_kernel(src_ptr, g_ptr, out_ptr, b, stride_sn, stride_gn, stride_gr, stride_gc, stride_on,
                       BLOCK: tl.constexpr, NEUMANN_TERMS: tl.constexpr, NEUMANN_TOP: tl.constexpr):
    """One program per block: G = dL/dR -> dL/dQ (Cayley derivative from the saved R, or the Neumann
    adjoint from packed) -> dL/dpacked[j] = dQ[r, c] - dQ[c, r] over the strict upper triangle."""
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    inside = (rows < b) & (cols < b)
    G = tl.load(g_ptr + pid * stride_gn + rows * stride_gr + cols * stride_gc, mask=inside, other=0.0).to(tl.float32)
    eye = tl.where(rows == cols, 1.0, 0.0)
    if NEUMANN_TERMS == 0:
        # src is R (contiguous b x b blocks); N^T = (R^T + I) / 2, dQ = 2 N^T G N^T
        Rt = tl.load(src_ptr + pid * stride_sn + cols * b + rows, mask=inside, other=0.0).to(tl.float32)
        Nt = 0.5 * (Rt + eye)
        dQ = 2.0 * tl.dot(tl.dot(Nt, G, input_precision="ieee"), Nt, input_precision="ieee")
    elif NEUMANN_TERMS == 1:  # R = I
        dQ = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    elif NEUMANN_TERMS == 2:  # R = I + 2Q
        dQ = 2.0 * G
    elif NEUMANN_TERMS == 5:  # PEFT's default in closed form, 5 tl.dot (module docstring)
        P = -_skew_tile(src_ptr + pid * stride_sn, b, rows, cols)
        S = tl.dot(P, P, input_precision="ieee")
        SG = tl.dot(S, G, input_precision="ieee")
        D = tl.dot(G, 2.0 * eye + 2.0 * P + S, input_precision="ieee") + SG
        dQ = 2.0 * (G + SG) + tl.dot(D, P, input_precision="ieee") + tl.dot(P, D, input_precision="ieee")
    else:
        # src is packed; P = Q^T = -Q; two-level Horner over a = t-1 .. 0 (module docstring)
        P = -_skew_tile(src_ptr + pid * stride_sn, b, rows, cols)
        S = eye
        dQ = G
        for _ in tl.static_range(1, NEUMANN_TOP):
            S = 2.0 * eye + tl.dot(S, P, input_precision="ieee")
            dQ = tl.dot(G, S, input_precision="ieee") + tl.dot(P, dQ, input_precision="ieee")
    packed_grad = dQ - tl.trans(dQ)
    index = rows * b - rows * (rows + 1) // 2 + (cols - rows - 1)
    tl.store(out_ptr + pid * stride_on + index, packed_grad.to(out_ptr.dtype.element_ty),
             mask=(rows < cols) & (cols < b))


@triton.jit
def _block_rotate_fwd_kernel(x_ptr, r_ptr, y_ptr, M, b,
                             stride_xm, stride_xk, stride_rn, stride_rk, stride_rc, stride_ym,
                             BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
                             SPLIT: tl.constexpr = False):
    """y[m, i b:(i+1) b] = x[m, i b:(i+1) b] @ R_i for a tile of BLOCK_M rows and block i.  IEEE:
    float32 x and R, an IEEE float32 product; SPLIT: a float32 R on a half x (PEFT's float32
    adapter), R = R_hi + R_lo in x's dtype and two half tensor-core products (module docstring);
    else one product in x's half dtype."""
    pid_m = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_k = tl.arange(0, BLOCK)
    col = block * b + offs_k
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :] * stride_xk,
                mask=(offs_m[:, None] < M) & (offs_k[None, :] < b), other=0.0)
    R = tl.load(r_ptr + block * stride_rn + offs_k[:, None] * stride_rk + offs_k[None, :] * stride_rc,
                mask=(offs_k[:, None] < b) & (offs_k[None, :] < b), other=0.0)
    if IEEE:
        acc = tl.dot(x, R, input_precision="ieee")
    elif SPLIT:
        R_hi = R.to(x.dtype)
        acc = tl.dot(x, (R - R_hi.to(tl.float32)).to(x.dtype))
        acc = tl.dot(x, R_hi, acc)
    else:
        acc = tl.dot(x, R.to(x.dtype))
    tl.store(y_ptr + offs_m[:, None] * stride_ym + col[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < b))


@triton.jit
def _block_rotate_bwd_weight_kernel(x_ptr, g_ptr, part_ptr, M, b, rows_per_split,
                                    stride_xm, stride_xk, stride_gm, stride_gk, stride_ps, stride_pn,
                                    BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr):
    """partial[s, i] = sum over this split's rows m of x[m, block i]^T g[m, block i] (fp32)."""
    block = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK)
    col = block * b + offs_k
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, M)
    for m0 in range(start, stop, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask = (offs_m[:, None] < stop) & (offs_k[None, :] < b)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :] * stride_xk, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + col[None, :] * stride_gk, mask=mask, other=0.0)
        if IEEE:
            acc += tl.dot(tl.trans(x), g, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(x), g)
    rows = offs_k[:, None]
    cols = offs_k[None, :]
    tl.store(part_ptr + split * stride_ps + block * stride_pn + rows * b + cols, acc,
             mask=(rows < b) & (cols < b))


@triton.jit
def _svd_core_fwd_kernel(x_ptr, a_ptr, c_ptr, z_ptr, u_ptr, M, K, r,
                         stride_xm, stride_xk, stride_ar, stride_ak, stride_ci, stride_cj, stride_zm,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
                         CORE_CHUNK: tl.constexpr, SPLIT: tl.constexpr = False):
    """z = x A^T (fp32 over K) and u = z C^T for BLOCK_M rows; u by CORE_CHUNK columns at a time
    (C^T loaded per column chunk: a whole (BLOCK_R, BLOCK_R) fp32 IEEE product at BLOCK_R = 128
    spilled ~14-18 KB per thread in the sm_90 compile).  IEEE: float32 x and A, IEEE products;
    SPLIT: a float32 A on a half x (PEFT's float32 adapter), A = A_hi + A_lo in x's dtype, two
    half tensor-core products; else x A^T in x's half dtype.  u = z C^T is IEEE fp32 on the fp32 z."""
    pid = tl.program_id(0).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    z = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        at = tl.load(a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                     mask=(offs_k[:, None] < K) & (offs_r[None, :] < r), other=0.0)
        if IEEE:
            z += tl.dot(x, at, input_precision="ieee")
        elif SPLIT:
            at_hi = at.to(x.dtype)
            z = tl.dot(x, (at - at_hi.to(tl.float32)).to(x.dtype), z)
            z = tl.dot(x, at_hi, z)
        else:
            z += tl.dot(x, at.to(x.dtype))
    mask = (offs_m[:, None] < M) & (offs_r[None, :] < r)
    tl.store(z_ptr + offs_m[:, None] * stride_zm + offs_r[None, :], z.to(z_ptr.dtype.element_ty), mask=mask)
    for j0 in tl.static_range(0, BLOCK_R, CORE_CHUNK):
        offs_j = j0 + tl.arange(0, CORE_CHUNK)
        # C^T[i, j] = C[j, i]
        ct = tl.load(c_ptr + offs_r[:, None] * stride_cj + offs_j[None, :] * stride_ci,
                     mask=(offs_r[:, None] < r) & (offs_j[None, :] < r), other=0.0).to(tl.float32)
        u = tl.dot(z, ct, input_precision="ieee")
        tl.store(u_ptr + offs_m[:, None] * stride_zm + offs_j[None, :], u.to(u_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_j[None, :] < r))


# ----------------------------------------------------------------------------------------------
# launchers


def _block_width(b: int) -> int:
    return max(16, triton.next_power_of_2(b))


def _tile_warps(block: int) -> int:
    """Warps for a program holding (block, block) fp32 register tiles: 4 up to 32 x 32, else 8
    (a 128 x 128 tile is then 64 registers per thread instead of 128)."""
    return 4 if block <= 32 else 8


def _check_packed(packed: torch.Tensor, block_size: int, neumann_terms: int):
    if packed.ndim != 2 or packed.shape[1] != block_size * (block_size - 1) // 2:
        raise ValueError(f"packed must be (n, {block_size * (block_size - 1) // 2}), got {tuple(packed.shape)}")
    if neumann_terms < 0:
        raise ValueError(f"neumann_terms={neumann_terms} must be >= 0 (0 = exact)")


def cayley_forward(packed: torch.Tensor, block_size: int, neumann_terms: int = 0,
                   solver: str = DEFAULT_EXACT_SOLVER):
    """(n, b(b-1)/2) packed -> R (n, b, b) in packed's dtype: cayley(Q) (``neumann_terms=0``, by
    ``solver`` "elimination" or "newton_schulz") or PEFT's ``neumann_terms``-term series."""
    _check_packed(packed, block_size, neumann_terms)
    if solver not in EXACT_SOLVERS:
        raise ValueError(f"solver={solver!r} is not an exact Cayley solver; valid choices: {list(EXACT_SOLVERS)}")
    packed = packed.contiguous()
    n = packed.shape[0]
    R = torch.empty(n, block_size, block_size, dtype=packed.dtype, device=packed.device)
    BLOCK = _block_width(block_size)
    _cayley_fwd_kernel[(n,)](packed, R, block_size, packed.stride(0), R.stride(0),
                             BLOCK=BLOCK, NEUMANN_TERMS=neumann_terms, NEUMANN_TOP=max(3, neumann_terms - 1),
                             SOLVER=EXACT_SOLVERS[solver], NS_MAX_ITERS=NS_MAX_ITERS, NS_TOL=NS_TOL,
                             num_warps=_tile_warps(BLOCK))
    return R


def newton_schulz_steps(lam: float) -> int:
    """Iterations the Newton-Schulz solver runs for a block with lam = min(||Q^2||_1, ||Q||_F^2):
    the kernel's bound recurrence, in fp32 as in the kernel."""
    lam = np.float32(lam)
    bound, gap = lam / (np.float32(2) + lam), np.float32(2) / (np.float32(2) + lam)
    steps = 0
    while steps < NS_MAX_ITERS and bound > NS_TOL:
        if bound > 0.5:
            gap = gap * (np.float32(2) - gap)
            bound = np.float32(1) - gap
        else:
            bound = bound * bound
            gap = np.float32(1) - bound
        steps += 1
    return steps


def cayley_backward(R_or_packed: torch.Tensor, grad_R: torch.Tensor, block_size: int,
                    neumann_terms: int = 0) -> torch.Tensor:
    """dL/dpacked (n, b(b-1)/2) from grad_R = dL/dR (n, b, b, any strides), in one launch.

    Exact mode (``neumann_terms=0``): ``R_or_packed`` is the forward's R = cayley(Q) (n, b, b) and
    dL/dQ = 2 N^T G N^T with N = (R + I) / 2.  Neumann mode: ``R_or_packed`` is packed and the
    series' adjoint is recomputed from it.  Returned in ``R_or_packed``'s dtype (fp32 inside)."""
    if neumann_terms == 0:
        if R_or_packed.shape[1:] != (block_size, block_size) or R_or_packed.ndim != 3:
            raise ValueError(f"exact mode needs R (n, {block_size}, {block_size}), got {tuple(R_or_packed.shape)}")
    else:
        _check_packed(R_or_packed, block_size, neumann_terms)
    n = R_or_packed.shape[0]
    if grad_R.shape != (n, block_size, block_size):
        raise ValueError(f"grad_R must be ({n}, {block_size}, {block_size}), got {tuple(grad_R.shape)}")
    src = R_or_packed.contiguous()
    out = torch.empty(n, block_size * (block_size - 1) // 2, dtype=src.dtype, device=src.device)
    BLOCK = _block_width(block_size)
    _cayley_bwd_kernel[(n,)](src, grad_R, out, block_size, src.stride(0), *grad_R.stride(), out.stride(0),
                             BLOCK=BLOCK, NEUMANN_TERMS=neumann_terms, NEUMANN_TOP=max(3, neumann_terms - 1),
                             num_warps=_tile_warps(BLOCK))
    return out


def _check_adapter_dtype(what: str, x: torch.Tensor, adapter_name: str, adapter: torch.Tensor) -> bool:
    """``adapter`` in x's dtype, or float32 on a half x (PEFT's float32 adapter); True for the
    latter, whose products run split (SPLIT: two half products of x with adapter_hi, adapter_lo)."""
    if adapter.dtype != x.dtype and not (adapter.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        raise TypeError(f"{adapter_name} is {adapter.dtype} but x is {x.dtype}; {what} takes {adapter_name} in x's "
                        "dtype, or float32 on a float16 / bfloat16 x")
    return adapter.dtype != x.dtype


def block_rotate_forward(x2d: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """y = x R_bd: x (M, n b) any strides, R (n or 1, b, b) any strides (a transposed view gives
    x R_bd^T), R in x's dtype or float32 on a half x (then R = R_hi + R_lo, two half products).
    Returns a contiguous (M, n b) tensor in x's dtype."""
    M, d = x2d.shape
    b = R.shape[-1]
    n = d // b
    if R.shape[-2] != b or d % b or R.shape[0] not in (1, n):
        raise ValueError(f"R {tuple(R.shape)} does not tile x {tuple(x2d.shape)}")
    split = _check_adapter_dtype("block_rotate_forward", x2d, "R", R)
    y = torch.empty(M, d, dtype=x2d.dtype, device=x2d.device)
    BLOCK = _block_width(b)
    BLOCK_M = 16 if BLOCK >= 128 else 64
    grid = (triton.cdiv(M, BLOCK_M), n)
    _block_rotate_fwd_kernel[grid](x2d, R, y, M, b, x2d.stride(0), x2d.stride(1),
                                   0 if R.shape[0] == 1 else R.stride(0), R.stride(1), R.stride(2), y.stride(0),
                                   BLOCK_M=BLOCK_M, BLOCK=BLOCK, IEEE=x2d.dtype == torch.float32,
                                   SPLIT=split)
    return y


def block_rotate_backward_weight(x2d: torch.Tensor, g2d: torch.Tensor, block_size: int,
                                 splits: int | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """dR (n, b, b) with dR_i = x_i^T g_i, fp32 accumulation, returned in ``out_dtype`` (default
    x's dtype; float32 for PEFT's float32 adapter on a half x)."""
    if x2d.shape != g2d.shape:
        raise ValueError(f"x {tuple(x2d.shape)} and g {tuple(g2d.shape)} must match")
    if x2d.dtype != g2d.dtype:
        raise TypeError(f"x is {x2d.dtype} but g is {g2d.dtype}; tl.dot needs one dtype")
    M, d = x2d.shape
    n = d // block_size
    BLOCK = _block_width(block_size)
    BLOCK_M = 16 if BLOCK >= 128 else 32
    if splits is None:
        splits = max(1, min(triton.cdiv(M, 4 * BLOCK_M), triton.cdiv(256, n)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), BLOCK_M) * BLOCK_M
    splits = triton.cdiv(M, rows_per_split) if M else 1
    partial = torch.zeros(splits, n, block_size, block_size, dtype=torch.float32, device=x2d.device)
    _block_rotate_bwd_weight_kernel[(n, splits)](
        x2d, g2d, partial, M, block_size, rows_per_split, x2d.stride(0), x2d.stride(1),
        g2d.stride(0), g2d.stride(1), partial.stride(0), partial.stride(1),
        BLOCK_M=BLOCK_M, BLOCK=BLOCK, IEEE=x2d.dtype == torch.float32, num_warps=_tile_warps(BLOCK))
    return partial.sum(0).to(out_dtype or x2d.dtype)


def svd_core_forward(x2d: torch.Tensor, A: torch.Tensor, C: torch.Tensor):
    """(z, u) = (x A^T, x A^T C^T) for x (M, in) any strides, A (r, in), C (r, r) in A's dtype;
    both (M, r) in A's dtype (x's, or float32 on a half x: PEFT's float32 adapter), z accumulated
    in fp32 and multiplied by C^T without a round trip to memory."""
    M, K = x2d.shape
    r = A.shape[0]
    if A.shape[1] != K or C.shape != (r, r):
        raise ValueError(f"A {tuple(A.shape)} and C {tuple(C.shape)} do not chain with x {tuple(x2d.shape)}")
    split = _check_adapter_dtype("svd_core_forward", x2d, "A", A)
    if C.dtype != A.dtype:
        raise TypeError(f"C is {C.dtype} but A is {A.dtype}; svd_core_forward takes A and C of one dtype")
    z = torch.empty(M, r, dtype=A.dtype, device=x2d.device)
    u = torch.empty_like(z)
    tiles = svd_core_tiles(r)
    _svd_core_fwd_kernel[(triton.cdiv(M, tiles["BLOCK_M"]),)](
        x2d, A, C, z, u, M, K, r, x2d.stride(0), x2d.stride(1), A.stride(0), A.stride(1),
        C.stride(0), C.stride(1), z.stride(0), IEEE=x2d.dtype == torch.float32, SPLIT=split, **tiles)
    return z, u


def svd_core_tiles(r: int) -> dict:
    """The svd_core kernel's tile sizes for rank r (also read by benchmarks/compile_report.py).
    At r > 64, 16 rows per program: the sm_90 compile spills 0.2-0.3 KB per thread there against
    3-7 KB with 32 rows (A is then read from L2 twice as often: 1 MiB per program at d = 4096)."""
    block_r = max(16, triton.next_power_of_2(r))
    return dict(BLOCK_M=16 if block_r >= 128 else 64, BLOCK_K=32, BLOCK_R=block_r, CORE_CHUNK=min(block_r, 32))
