"""Circulant family kernels: C3A's block-circulant and FourierFT's sparse spectral change of weight.

Math (W (O, I) frozen, x (N, I), dY (N, O); all DFTs with e^{-2 pi i f j / n}):

    C3A (block size b, kernel K (O/b, I/b, b), scale 1/I):
        dW[m b + k, n b + j] = K[m, n, (j - k) mod b] / I,    y = x (W + dW)^T + bias.
    ``_c3a_weight_fwd_kernel`` writes W_eff = W + dW tile by tile: each (BLOCK_O, BLOCK_I) tile of W
    is loaded, the circulant entries are gathered from K on chip (K is d^2 / b elements: it stays in
    L1/L2) and added in fp32, and the sum is stored once in W's dtype.  The layer GEMMs then use
    W_eff: y = x W_eff^T + bias and dx = dY W_eff (the same kernel again in backward).
    The kernel gradient is a sum of dY^T X along circulant diagonals,
        dK[m, n, s] = (1/I) sum_t sum_k dY[t, m b + k] x[t, n b + (k + s) mod b],
    which a block DFT diagonalises: with Dhat = DFT_b(dY_m) and Xhat = DFT_b(x_n) per token,
        DFT_b(dK[m, n, :])[f] = (1/I) sum_t conj(Dhat[t, m, f]) Xhat[t, n, f],
    so no O x I product is formed.  ``_block_dft_fwd_kernel`` computes the real and imaginary
    parts as matmuls with cos / sin tables (FFT as matmul, on tensor cores),
        A_c[f, i, t] = sum_j a[t, i b + j] cos(2 pi f j / b),   A_s[f, i, t] = sum_j a[t, i b + j] sin(...),
    for f = 0 .. b/2 (a real signal's spectrum), frequency-major so that each frequency is a
    contiguous (blocks, tokens) matrix; then ``_c3a_bwd_kernel`` contracts over tokens per frequency,
        Re S_f = D_c X_c^T + D_s X_s^T,   Im S_f = D_s X_c^T - D_c X_s^T     (conj(D_c - i D_s)(X_c - i X_s)),
    four tl.dot per token tile, split over tokens into fp32 partial sums that the caller adds; the
    inverse real DFT of S (O/b x I/b x (b/2 + 1), tiny) gives dK.  FLOPs: 2 x 2 N d (b + 2) for the
    two block DFTs and 4 N d^2 / b for the contraction, against 2 N d^2 for the dY^T X GEMM that
    an on-chip b x b tile per block pair would need (benchmarks/NOTES.md, circulant).

    FourierFT (n coefficients c_k at (u_k, v_k), scaling s):
        dW[o, i] = s Re(ifft2(S))[o, i] = (s / (O I)) sum_k c_k cos(2 pi (u_k o / O + v_k i / I))
                 = (s / (O I)) sum_k c_k (cos_O[u_k o] cos_I[v_k i] - sin_O[u_k o] sin_I[v_k i]),
    with cos_n[r] = cos(2 pi (r mod n) / n) read from a length-n table (the integer product u_k o is
    reduced mod O before it becomes an angle, so angles stay exact for any size).
    ``_fourierft_weight_fwd_kernel`` writes W_eff = W + dW tile by tile: per chunk of BLOCK_K
    coefficients it gathers the (BLOCK_O, BLOCK_K) and (BLOCK_K, BLOCK_I) cos / sin factors on
    chip and adds two tl.dot to the tile's fp32 accumulator; no complex and no O x I temporary
    besides W_eff itself.  The coefficient gradient needs only row DFTs:
        dc_k = (s / (O I)) Re sum_t DY[t, u_k] X[t, v_k],   DY = fft(dY) rows, X = fft(x) rows,
    where a real row's DFT at u > O/2 is conj(DY[t, O - u]).  With the rfft bins u'_k, v'_k
    (u' = u or O - u) and P_k = sum_t Re DY[t, u'_k] Re X[t, v'_k], Q_k = sum_t Im DY[t, u'_k] Im X[t, v'_k],
        dc_k = (s / (O I)) (P_k + sign_k Q_k),   sign_k = -1 if both or neither of u_k, v_k were
                                                  conjugated (Re(a b) = Re a Re b - Im a Im b), else +1.
    ``_fourierft_bwd_kernel`` gathers the bins column by column and accumulates P and Q over its
    token slice (fp32 partial sums per split); the caller forms dc.

Every kernel loads in the input dtype, accumulates in fp32 and stores in the output dtype; offsets
are int64; activations may have any strides, small parameters and tables are contiguous.
float32 tl.dot runs input_precision="ieee" (the fp32 row of the tolerance table); a float32
adapter on a half base computes its spectra in float32 too (IEEE dots on tiles converted on load).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._tiles import block_r, check_tiles

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# C3A

@triton.jit
def _c3a_weight_fwd_kernel(W, K, OUT, O, I, B, NB_IN, stride_wo, stride_wi, scale,
                           BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)).to(tl.int64)
    ok = (rows < O)[:, None] & (cols < I)[None, :]
    w = tl.load(W + rows[:, None] * stride_wo + cols[None, :] * stride_wi, mask=ok, other=0.0).to(tl.float32)
    shift = ((cols % B)[None, :] - (rows % B)[:, None] + B) % B            # (j - k) mod b
    k_index = ((rows // B)[:, None] * NB_IN + (cols // B)[None, :]) * B + shift
    k = tl.load(K + k_index, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * I + cols[None, :], (w + scale * k).to(OUT.dtype.element_ty), mask=ok)


def c3a_weight_forward(weight: torch.Tensor, c3a_kernel: torch.Tensor, *, block_o: int = 64,
                       block_i: int = 64) -> torch.Tensor:
    """W_eff = W + dW (O, I), contiguous, in W's dtype: the block-circulant dW generated tile by tile
    from ``c3a_kernel`` (O/b, I/b, b) contiguous, in W's dtype or float32 (PEFT's float32 adapter on
    a half W); W any strides (pass ``weight.T`` for fan_in_fan_out storage)."""
    _check_weight("weight", weight)
    o, i = weight.shape
    _check_adapter("c3a_kernel", c3a_kernel, weight, ndim=3)
    m, n, b = c3a_kernel.shape
    if m * b != o or n * b != i:
        raise ValueError(f"c3a_kernel {tuple(c3a_kernel.shape)} does not tile weight {tuple(weight.shape)}: "
                         f"expected ({o} / b, {i} / b, b)")
    check_tiles(block_o=block_o, block_i=block_i)
    out = torch.empty(o, i, dtype=weight.dtype, device=weight.device)
    grid = (triton.cdiv(o, block_o), triton.cdiv(i, block_i))
    _c3a_weight_fwd_kernel[grid](weight, c3a_kernel, out, o, i, b, n, weight.stride(0), weight.stride(1), 1.0 / i,
                                 BLOCK_O=block_o, BLOCK_I=block_i)
    return out


@triton.jit
def _block_dft_fwd_kernel(A, TAB, OUT, N, NB, B, NF, stride_at, stride_ad,
                          IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr,
                          BLOCK_F: tl.constexpr):
    pid_t = tl.program_id(0)
    blk = tl.program_id(1).to(tl.int64)
    pid_f = tl.program_id(2)
    ts = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    fs = (pid_f * BLOCK_F + tl.arange(0, BLOCK_F)).to(tl.int64)
    t_ok = ts < N
    f_ok = fs < NF
    acc_c = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
    for j0 in range(0, B, BLOCK_J):
        js = (j0 + tl.arange(0, BLOCK_J)).to(tl.int64)
        j_ok = js < B
        a = tl.load(A + ts[:, None] * stride_at + (blk * B + js)[None, :] * stride_ad,
                    mask=t_ok[:, None] & j_ok[None, :], other=0.0)
        tab_ok = j_ok[:, None] & f_ok[None, :]
        cos = tl.load(TAB + js[:, None] * NF + fs[None, :], mask=tab_ok, other=0.0)
        sin = tl.load(TAB + (B + js)[:, None] * NF + fs[None, :], mask=tab_ok, other=0.0)
        if IEEE:
            a = a.to(tl.float32)
            acc_c = tl.dot(a, cos, acc_c, input_precision="ieee")
            acc_s = tl.dot(a, sin, acc_s, input_precision="ieee")
        else:
            acc_c = tl.dot(a, cos.to(a.dtype), acc_c)
            acc_s = tl.dot(a, sin.to(a.dtype), acc_s)
    # OUT (2, NF, NB, N): frequency-major, tokens contiguous
    out_ok = t_ok[:, None] & f_ok[None, :]
    base = (fs[None, :] * NB + blk) * N + ts[:, None]
    tl.store(OUT + base, acc_c.to(OUT.dtype.element_ty), mask=out_ok)
    tl.store(OUT + NF * NB * N + base, acc_s.to(OUT.dtype.element_ty), mask=out_ok)


@functools.lru_cache(maxsize=64)
def dft_table(n: int, device: torch.device) -> torch.Tensor:
    """(2, n, n // 2 + 1) float32: cos and sin of 2 pi (j f mod n) / n, rounded from float64."""
    jf = torch.outer(torch.arange(n), torch.arange(n // 2 + 1)) % n
    angle = (2 * math.pi / n) * jf.to(torch.float64)
    return torch.stack([torch.cos(angle), torch.sin(angle)]).to(torch.float32).to(device)


def block_dft_tiles(block_size: int, ieee: bool, cuda: bool) -> dict:
    """Tiles of ``_block_dft_fwd_kernel``: 64 tokens (16 in the interpreter) x up to 64 frequencies;
    the reduction over the block's b entries in 64-wide steps, 16-wide for IEEE fp32 dots (FMA units:
    both operand tiles stay in registers)."""
    return dict(BLOCK_T=64 if cuda else 16, BLOCK_J=16 if ieee and cuda else min(64, block_r(block_size)),
                BLOCK_F=min(64, block_r(block_size // 2 + 1)))


def block_dft_forward(a: torch.Tensor, block_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Real and imaginary parts of the DFT of every length-b block of every row of ``a`` (N, d):
    (2, b/2 + 1, d / b, N) in ``out_dtype`` (float32, or ``a``'s half dtype for half dots):
    [0, f, i, t] = sum_j a[t, i b + j] cos(2 pi f j / b), [1] the same with sin (= -imaginary part)."""
    _check_weight("a", a)
    if out_dtype not in (torch.float32, a.dtype):
        raise TypeError(f"out_dtype={out_dtype}; block_dft_forward stores float32 or a's dtype {a.dtype}")
    n_rows, d = a.shape
    b = block_size
    if d % b:
        raise ValueError(f"block_size={b} does not divide a's {d} columns")
    nb, nf = d // b, b // 2 + 1
    ieee = out_dtype == torch.float32
    tiles = block_dft_tiles(b, ieee, a.is_cuda)
    out = torch.empty(2, nf, nb, n_rows, dtype=out_dtype, device=a.device)
    grid = (triton.cdiv(n_rows, tiles["BLOCK_T"]), nb, triton.cdiv(nf, tiles["BLOCK_F"]))
    _block_dft_fwd_kernel[grid](a, dft_table(b, a.device), out, n_rows, nb, b, nf, a.stride(0), a.stride(1),
                                IEEE=ieee, **tiles)
    return out


@triton.jit
def _c3a_bwd_kernel(DF, XF, PART, N, MO, MI, NF, T_PER_SPLIT,
                    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    f = tl.program_id(0).to(tl.int64)
    tiles_n = tl.cdiv(MI, BLOCK_N)
    pid_m = tl.program_id(1) // tiles_n
    pid_n = tl.program_id(1) % tiles_n
    split = tl.program_id(2).to(tl.int64)
    ms = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    ns = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = ms < MO
    n_ok = ns < MI
    d_cos = DF + (f * MO + ms[:, None]) * N          # (BLOCK_M, .) rows of D_c at frequency f
    d_sin = d_cos + NF * MO * N
    x_cos = XF + (f * MI + ns[None, :]) * N          # (., BLOCK_N) columns of X_c^T
    x_sin = x_cos + NF * MI * N
    re = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    im = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_first = split * T_PER_SPLIT
    t_end = tl.minimum(t_first + T_PER_SPLIT, N)
    for t0 in range(0, T_PER_SPLIT, BLOCK_T):
        ts = t_first + t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        t_ok = ts < t_end
        d_mask = m_ok[:, None] & t_ok[None, :]
        x_mask = t_ok[:, None] & n_ok[None, :]
        dc = tl.load(d_cos + ts[None, :], mask=d_mask, other=0.0)
        ds = tl.load(d_sin + ts[None, :], mask=d_mask, other=0.0)
        xc = tl.load(x_cos + ts[:, None], mask=x_mask, other=0.0)
        xs = tl.load(x_sin + ts[:, None], mask=x_mask, other=0.0)
        if IEEE:
            re = tl.dot(dc, xc, re, input_precision="ieee")
            re = tl.dot(ds, xs, re, input_precision="ieee")
            im = tl.dot(ds, xc, im, input_precision="ieee")
            im = tl.dot(-dc, xs, im, input_precision="ieee")
        else:
            re = tl.dot(dc, xc, re)
            re = tl.dot(ds, xs, re)
            im = tl.dot(ds, xc, im)
            im = tl.dot(-dc, xs, im)
    out = PART + ((split * 2 * NF + f) * MO + ms[:, None]) * MI + ns[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    tl.store(out, re, mask=ok)
    tl.store(out + NF * MO * MI, im, mask=ok)


def c3a_bwd_tiles(blocks_out: int, blocks_in: int, ieee: bool, cuda: bool) -> dict:
    """Tiles of ``_c3a_bwd_kernel``: up to 64 x 64 block pairs per program; 64 tokens per step with
    half dots, 16 with IEEE fp32 dots and 8 warps (two 64 x 64 fp32 accumulators: ptxas for sm_90
    spills 4 KB per thread at 64 tokens and 4 warps); 16 tokens in the interpreter."""
    block_m, block_n = min(64, block_r(blocks_out)), min(64, block_r(blocks_in))
    wide = ieee and block_m * block_n >= 64 * 64
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_T=64 if cuda and not ieee else 16,
                num_warps=8 if wide else 4)


def c3a_backward_spectrum(dy_spec: torch.Tensor, x_spec: torch.Tensor, *, split: int | None = None) -> torch.Tensor:
    """S (2, b/2 + 1, O / b, I / b) float32, real and imaginary part of
    sum_t conj(DFT(dY_m))[t, f] DFT(x_n)[t, f] from the :func:`block_dft_forward` spectra of dY and x
    (one dtype).  The token sum is split in chunks whose float32 partial sums are added here."""
    if dy_spec.dtype != x_spec.dtype or dy_spec.device != x_spec.device:
        raise TypeError(f"dy_spec is {dy_spec.dtype} on {dy_spec.device} but x_spec is {x_spec.dtype} on "
                        f"{x_spec.device}; both come from block_dft_forward with one out_dtype")
    _, nf, mo, n_rows = dy_spec.shape
    _, nf_x, mi, n_rows_x = x_spec.shape
    if (nf, n_rows) != (nf_x, n_rows_x):
        raise ValueError(f"spectra of different block sizes or token counts: {tuple(dy_spec.shape)}, "
                         f"{tuple(x_spec.shape)}")
    ieee = dy_spec.dtype == torch.float32
    config = c3a_bwd_tiles(mo, mi, ieee, dy_spec.is_cuda)
    tiles = triton.cdiv(mo, config["BLOCK_M"]) * triton.cdiv(mi, config["BLOCK_N"])
    split, t_per_split = token_split(n_rows, nf * tiles, config["BLOCK_T"], split)
    part = torch.empty(split, 2, nf, mo, mi, dtype=torch.float32, device=dy_spec.device)
    _c3a_bwd_kernel[(nf, tiles, split)](dy_spec, x_spec, part, n_rows, mo, mi, nf, t_per_split, IEEE=ieee, **config)
    return part[0] if split == 1 else part.sum(dim=0)


def token_split(n_rows: int, programs: int, block_t: int, split: int | None = None) -> tuple[int, int]:
    """(splits, tokens per split) of a reduction over ``n_rows`` tokens beside ``programs`` other
    programs: by default about 512 programs in all, no slice shorter than 256 tokens; slices are
    whole BLOCK_T steps."""
    if split is None:
        split = max(1, min(triton.cdiv(n_rows, 256), triton.cdiv(512, programs)))
    if split < 1:
        raise ValueError(f"split={split} must be >= 1, e.g. split=1")
    t_per_split = triton.cdiv(triton.cdiv(n_rows, split), block_t) * block_t
    return triton.cdiv(n_rows, t_per_split), t_per_split


# ----------------------------------------------------------------------------------------------
# FourierFT

@triton.jit
def _fourierft_weight_fwd_kernel(W, U, V, C, TAB_O, TAB_I, OUT, O, I, NFREQ, stride_wo, stride_wi, scale,
                                 IEEE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                                 BLOCK_K: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)).to(tl.int64)
    row_ok = rows < O
    col_ok = cols < I
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for k0 in range(0, NFREQ, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < NFREQ
        u = tl.load(U + ks, mask=k_ok, other=0).to(tl.int64)
        v = tl.load(V + ks, mask=k_ok, other=0).to(tl.int64)
        c = tl.load(C + ks, mask=k_ok, other=0.0).to(tl.float32)
        angle_o = (rows[:, None] * u[None, :]) % O                     # (BLOCK_O, BLOCK_K)
        cos_o = tl.load(TAB_O + angle_o) * c[None, :]
        sin_o = tl.load(TAB_O + O + angle_o) * c[None, :]
        angle_i = (v[:, None] * cols[None, :]) % I                     # (BLOCK_K, BLOCK_I)
        cos_i = tl.load(TAB_I + angle_i)
        sin_i = tl.load(TAB_I + I + angle_i)
        if IEEE:
            acc = tl.dot(cos_o, cos_i, acc, input_precision="ieee")
            acc = tl.dot(-sin_o, sin_i, acc, input_precision="ieee")
        else:
            acc = tl.dot(cos_o.to(W.dtype.element_ty), cos_i.to(W.dtype.element_ty), acc)
            acc = tl.dot((-sin_o).to(W.dtype.element_ty), sin_i.to(W.dtype.element_ty), acc)
    ok = row_ok[:, None] & col_ok[None, :]
    w = tl.load(W + rows[:, None] * stride_wo + cols[None, :] * stride_wi, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * I + cols[None, :], (w + scale * acc).to(OUT.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=64)
def trig_table(n: int, device: torch.device) -> torch.Tensor:
    """(2, n) float32: cos and sin of 2 pi r / n for r = 0 .. n - 1, rounded from float64."""
    angle = (2 * math.pi / n) * torch.arange(n, dtype=torch.float64)
    return torch.stack([torch.cos(angle), torch.sin(angle)]).to(torch.float32).to(device)


def fourierft_weight_tiles(ieee: bool, cuda: bool) -> dict:
    """Tiles of ``_fourierft_weight_fwd_kernel``: 64 x 64 weight tiles and 32 coefficients per step
    with half dots; 32 x 32 and 16 with IEEE fp32 dots (ptxas for sm_90: 255 registers, 4 B spill;
    64 x 64 tiles spill 2-10 KB per thread at 16 or 32 coefficients, 4 or 8 warps); 32 x 32 x 16 in
    the interpreter."""
    if ieee or not cuda:
        return dict(BLOCK_O=32, BLOCK_I=32, BLOCK_K=16)
    return dict(BLOCK_O=64, BLOCK_I=64, BLOCK_K=32)


def fourierft_weight_forward(weight: torch.Tensor, spectrum: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                             scaling: float) -> torch.Tensor:
    """W_eff = W + scaling Re(ifft2(S)) (O, I), contiguous, in W's dtype, for the sparse spectrum S
    with ``spectrum[k]`` at (``rows[k]``, ``cols[k]``) (int32 / int64, contiguous); ``spectrum`` in W's
    dtype or float32 on a half W.  float32 W: IEEE fp32 dots; a half W: the cos / sin factors rounded
    to W's dtype for tensor-core dots (their error stays below W_eff's own rounding to that dtype)."""
    _check_weight("weight", weight)
    o, i = weight.shape
    _check_adapter("spectrum", spectrum, weight, ndim=1)
    n = spectrum.shape[0]
    for name, t in (("rows", rows), ("cols", cols)):
        if t.shape != (n,) or t.dtype not in (torch.int32, torch.int64) or t.device != weight.device \
                or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int32 / int64 ({n},) tensor on {weight.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    ieee = weight.dtype == torch.float32
    tiles = fourierft_weight_tiles(ieee, weight.is_cuda)
    out = torch.empty(o, i, dtype=weight.dtype, device=weight.device)
    grid = (triton.cdiv(o, tiles["BLOCK_O"]), triton.cdiv(i, tiles["BLOCK_I"]))
    _fourierft_weight_fwd_kernel[grid](weight, rows, cols, spectrum, trig_table(o, weight.device),
                                       trig_table(i, weight.device), out, o, i, n, weight.stride(0),
                                       weight.stride(1), float(scaling) / (o * i), IEEE=ieee, **tiles)
    return out


@triton.jit
def _fourierft_bwd_kernel(DY, X, UCOL, VCOL, PART, N, NFREQ, stride_dyt, stride_xt, T_PER_SPLIT,
                          BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1).to(tl.int64)
    k_ok = ks < NFREQ
    u = tl.load(UCOL + ks, mask=k_ok, other=0).to(tl.int64) * 2      # (re, im) pairs
    v = tl.load(VCOL + ks, mask=k_ok, other=0).to(tl.int64) * 2
    p = tl.zeros((BLOCK_K,), dtype=tl.float32)
    q = tl.zeros((BLOCK_K,), dtype=tl.float32)
    t_first = split * T_PER_SPLIT
    t_end = tl.minimum(t_first + T_PER_SPLIT, N)
    for t0 in range(0, T_PER_SPLIT, BLOCK_T):
        ts = t_first + t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        ok = (ts < t_end)[:, None] & k_ok[None, :]
        dy_at = DY + ts[:, None] * stride_dyt + u[None, :]
        x_at = X + ts[:, None] * stride_xt + v[None, :]
        dy_re = tl.load(dy_at, mask=ok, other=0.0)
        dy_im = tl.load(dy_at + 1, mask=ok, other=0.0)
        x_re = tl.load(x_at, mask=ok, other=0.0)
        x_im = tl.load(x_at + 1, mask=ok, other=0.0)
        p += tl.sum(dy_re * x_re, axis=0)
        q += tl.sum(dy_im * x_im, axis=0)
    out = PART + split * 2 * NFREQ + ks
    tl.store(out, p, mask=k_ok)
    tl.store(out + NFREQ, q, mask=k_ok)


FOURIERFT_BWD_TILES = dict(BLOCK_T=64, BLOCK_K=32)     # fourierft_backward_products on CUDA (16 tokens elsewhere)


def fourierft_backward_products(dy_spec: torch.Tensor, x_spec: torch.Tensor, dy_bins: torch.Tensor,
                                x_bins: torch.Tensor, *, split: int | None = None) -> torch.Tensor:
    """(2, n) float32: [sum_t Re DY[t, dy_bins[k]] Re X[t, x_bins[k]], the same with Im Im] for the
    row spectra ``dy_spec`` (N, O//2 + 1, 2) and ``x_spec`` (N, I//2 + 1, 2), float32 ``view_as_real``
    of rfft outputs with contiguous (re, im) pairs, and int32 / int64 bins (n,).  The token sum is split
    in chunks whose partial sums are added here (deterministic)."""
    for name, t in (("dy_spec", dy_spec), ("x_spec", x_spec)):
        if t.dtype != torch.float32 or t.ndim != 3 or t.shape[2] != 2 or t.stride(2) != 1 or t.stride(1) != 2:
            raise ValueError(f"{name} must be a float32 (N, bins, 2) view_as_real of an rfft output, got "
                             f"{t.dtype} {tuple(t.shape)} strides {t.stride()}")
    n_rows = dy_spec.shape[0]
    if x_spec.shape[0] != n_rows:
        raise ValueError(f"dy_spec has {n_rows} rows but x_spec has {x_spec.shape[0]}")
    n = dy_bins.shape[0]
    if x_bins.shape != (n,) or not dy_bins.is_contiguous() or not x_bins.is_contiguous():
        raise ValueError(f"dy_bins and x_bins must be contiguous ({n},) tensors, got {tuple(x_bins.shape)}")
    tiles = dict(FOURIERFT_BWD_TILES, BLOCK_T=FOURIERFT_BWD_TILES["BLOCK_T"] if dy_spec.is_cuda else 16)
    blocks = triton.cdiv(n, tiles["BLOCK_K"])
    split, t_per_split = token_split(n_rows, blocks, tiles["BLOCK_T"], split)
    part = torch.empty(split, 2, n, dtype=torch.float32, device=dy_spec.device)
    _fourierft_bwd_kernel[(blocks, split)](dy_spec, x_spec, dy_bins, x_bins, part, n_rows, n, dy_spec.stride(0),
                                           x_spec.stride(0), t_per_split, **tiles)
    return part[0] if split == 1 else part.sum(dim=0)


# ----------------------------------------------------------------------------------------------
# checks

def _check_weight(name: str, t: torch.Tensor) -> None:
    if t.ndim != 2 or t.dtype not in FLOATS:
        raise TypeError(f"{name} is a {t.ndim}-D {t.dtype} tensor; the circulant kernels take 2-D float32, "
                        "float16 or bfloat16")


def _check_adapter(name: str, t: torch.Tensor, weight: torch.Tensor, *, ndim: int) -> None:
    if t.ndim != ndim or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {ndim}-D tensor, got shape {tuple(t.shape)} "
                         f"strides {t.stride()}")
    mixed = t.dtype == torch.float32 and weight.dtype in HALF
    if t.device != weight.device or not (t.dtype == weight.dtype or mixed):
        raise TypeError(f"{name} is {t.dtype} on {t.device} but weight is {weight.dtype} on {weight.device}; "
                        f"{name} takes weight's dtype, or float32 on a float16 / bfloat16 weight, on weight's device")
