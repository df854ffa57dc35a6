"""Philox dropout masks, regenerated from a seed wherever they are needed (never stored).

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

The same bits come from the C++ CPU op (csrc/dropout.cpp) and from the pure-torch Philox in
fastadapt.ops.dropout, so one seed gives one mask on every device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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
