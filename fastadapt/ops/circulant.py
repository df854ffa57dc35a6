"""circulant family: C3A (block-circulant change of weight) and FourierFT (sparse spectral change of
weight), merged into the layer GEMM, with gradients from block / row DFTs instead of a dY^T X GEMM.

Notation: x (N, I), W (O, I) frozen, dY (N, O), bias (O,) or None.

C3A (block size b, kernel K = ``c3a_kernel`` (O/b, I/b, b)), as PEFT 0.21::

    dW[m b + k, n b + j] = K[m, n, (j - k) mod b] / I       (b x b circulant blocks)
    y  = x (W + dW)^T + bias
    dx = dY (W + dW)
    dK[m, n, s] = (1/I) sum_t sum_k dY[t, m b + k] x[t, n b + (k + s) mod b]
                = irfft_b( sum_t conj(rfft_b(dY_m))[t] rfft_b(x_n)[t] ) / I     (per block pair m, n)

FourierFT (n coefficients c = ``fourierft_spectrum`` at (u_k, v_k) = ``indices``, scaling s)::

    dW[o, i] = s Re(ifft2(S))[o, i] = (s / (O I)) sum_k c_k cos(2 pi (u_k o / O + v_k i / I))
    y  = x (W + dW)^T + bias,     dx = dY (W + dW)
    dc_k = (s / (O I)) Re sum_t DY[t, u_k] X[t, v_k],    DY = fft(dY) rows (length O), X = fft(x) rows

Both forwards build W_eff = W + dW (an O x I temporary freed before the op returns) and run one GEMM
with it; backward builds it again for dx.  So the frozen layer's two GEMMs are the only GEMMs: the
parameter gradients come from DFTs of dY and x (O(N d log b) / O(N d log d)) and a contraction of
their spectra, never from the N-long dY^T X GEMM (2 N O I FLOPs) that PEFT's backward runs.

What each path does (the choice per op is the registration's, :func:`fastadapt.backend.select`):

- torch (CPU): C3A's dW by one row gather from a strided view of K; dK from ``torch.fft.rfft`` of
  256-row chunks of x and dY, one batched complex product per chunk accumulated per frequency,
  one ``irfft`` (measured against FFT-as-matmul and against the dY^T X GEMM with diagonal sums:
  benchmarks/NOTES.md, circulant).  FourierFT's dW by ``irfft2`` of the Hermitian fold
  (S + S*) / 2 of the sparse spectrum (half a spectrum, real output; the same Re(ifft2(S)), half
  the work of PEFT's complex ifft2); dc from ``rfft`` rows of x and dY, gathered at the touched
  bins, their products accumulated per token slot of a chunk and summed over the slots once.
- triton (CUDA): ``fastadapt.triton_kernels.circulant``: dW generated tile by tile and added to W on
  chip (C3A: gathered from K; FourierFT: cos / sin factors from tables and two tl.dot per chunk of
  coefficients), the C3A block DFTs as tl.dot with cos / sin tables and the per-frequency
  contraction as tl.dot over token tiles, the FourierFT bin gather-and-reduce over tokens (its row
  FFTs by ``torch.fft.rfft``).  float64 runs the torch path (tl.dot has no float64).

Dtypes (PEFT's policy, :mod:`fastadapt.ops._policy`): x, W and bias share one dtype; the adapter
parameter has that dtype or is float32 on a float16 / bfloat16 base (PEFT's default).  W_eff is
computed in float32 (float64 for float64) and rounded to W's dtype once, so the GEMMs run in the
base dtype; every DFT and contraction accumulates in float32 (float64 for float64).  A half
adapter on a half base (``autocast_adapter_dtype=False``) keeps the Triton path's C3A spectra in the
half dtype (tensor-core dots, float32 accumulation); a float32 adapter keeps them in float32.

What the autograd functions save: x and the parameters (W, K or the spectrum and indices); no
O x I tensor survives a forward.  Saved activations = bytes(x).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _validate
from ..testing import randn
from ._policy import acc_dtype, adapter_compute_dtype
from ._registry import fused_op

METHODS = ("c3a", "fourierft")
TRITON_METHODS = ("c3a", "fourierft")

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Tokens per chunk of the CPU DFT passes: 2^18 elements of the wider of x and dY (1 MiB float32), so a
# chunk's spectra stay in cache for the product that reads them.
_CHUNK_ELEMENTS = 1 << 18


def _chunk_rows(n_rows: int, width: int) -> int:
    return max(1, min(n_rows, _CHUNK_ELEMENTS // max(width, 1)))


def _complex_dtype(real: torch.dtype) -> torch.dtype:
    return torch.complex128 if real == torch.float64 else torch.complex64


def _kernels():
    from ..triton_kernels import circulant
    return circulant


def _triton_serves(*tensors: Tensor) -> bool:
    """The Triton kernels take float32 / float16 / bfloat16 (tl.dot has no float64)."""
    return all(t.dtype in _TRITON_DTYPES for t in tensors)


def _merge_into(delta: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """W + alpha delta for a fresh ``delta`` in the accumulation dtype, computed in place in it (no other
    O x I allocation) and rounded to W's dtype once."""
    return delta.mul_(alpha).add_(weight).to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# C3A

@functools.lru_cache(maxsize=64)
def _negated(b: int, device: torch.device) -> Tensor:
    """(-k) mod b for k = 0 .. b - 1."""
    return (-torch.arange(b, device=device)) % b


def _c3a_weight_torch(weight: Tensor, c3a_kernel: Tensor) -> Tensor:
    """W + dW in W's dtype, dW gathered in one pass: a strided (Hankel) view of the doubled kernel,
    H[m, k, n, j] = K[m, n, (k + j) mod b], with its rows k taken in the order (-k) mod b gives
    K[m, n, (j - k) mod b] in the (O, I) layout (a row gather: contiguous b-long runs)."""
    m, n, b = c3a_kernel.shape
    acc = acc_dtype(weight.dtype)
    doubled = torch.cat([c3a_kernel, c3a_kernel], dim=-1).to(acc)
    hankel = doubled.as_strided((m, b, n, b), (n * 2 * b, 1, 2 * b, 1))
    delta = hankel[:, _negated(b, c3a_kernel.device)].view(m * b, n * b)      # a fresh (O, I) tensor
    return _merge_into(delta, weight, 1.0 / (n * b))


def _c3a_weight(weight: Tensor, c3a_kernel: Tensor, backend: str) -> Tensor:
    if backend == "triton" and _triton_serves(weight, c3a_kernel):
        return _kernels().c3a_weight_forward(weight, c3a_kernel)
    return _c3a_weight_torch(weight, c3a_kernel)


@fused_op("c3a_merged_weight", autocast=False)
def c3a_merged_weight_op(weight: Tensor, c3a_kernel: Tensor) -> Tensor:
    """W + dW (O, I) in W's dtype (not differentiable: merge, and dx in backward)."""
    return _c3a_weight_torch(weight, c3a_kernel)


@c3a_merged_weight_op.impl("triton")
def _(weight, c3a_kernel):
    return _c3a_weight(weight, c3a_kernel, "triton")


@c3a_merged_weight_op.fake
def _(weight, c3a_kernel):
    return weight.new_empty(weight.shape)


@c3a_merged_weight_op.example
def _():
    yield (randn(12, 8, dtype=torch.float32, seed=1), randn(3, 2, 4, dtype=torch.float32, seed=2)), {}
    yield (randn(6, 9, dtype=torch.bfloat16, seed=3), randn(2, 3, 3, dtype=torch.float32, seed=4)), {}


@fused_op("c3a_linear", autocast_keep=("c3a_kernel",))
def c3a_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], c3a_kernel: Tensor) -> Tensor:
    """y = x (W + dW)^T + bias for 2-D x (see the module docstring)."""
    return F.linear(x, _c3a_weight_torch(weight, c3a_kernel), bias)


@c3a_linear_op.impl("triton")
def _(x, weight, bias, c3a_kernel):
    return F.linear(x, _c3a_weight(weight, c3a_kernel, "triton"), bias)


@c3a_linear_op.fake
def _(x, weight, bias, c3a_kernel):
    return x.new_empty(x.shape[0], weight.shape[0])


def _c3a_kernel_grad_torch(dy: Tensor, x: Tensor, c3a_kernel: Tensor) -> Tensor:
    m, n, b = c3a_kernel.shape
    real = acc_dtype(x.dtype)
    spectrum = torch.zeros(b // 2 + 1, m, n, dtype=_complex_dtype(real), device=x.device)
    rows = _chunk_rows(x.shape[0], max(m, n) * b)
    for start in range(0, x.shape[0], rows):
        x_hat = torch.fft.rfft(x[start:start + rows].to(real).reshape(-1, n, b))        # (t, n, f)
        dy_hat = torch.fft.rfft(dy[start:start + rows].to(real).reshape(-1, m, b))      # (t, m, f)
        # operands laid out (f, m, t) / (f, t, n) with the conjugate applied: baddbmm on the lazy
        # conj view of a permuted rfft output takes ~2.5x longer than these copies and the product
        spectrum.baddbmm_(dy_hat.conj_physical().permute(2, 1, 0).contiguous(),         # (f, m, n)
                          x_hat.permute(2, 0, 1).contiguous())
    return _kernel_from_spectrum(spectrum.permute(1, 2, 0), b, n * b).to(c3a_kernel.dtype)


def _kernel_from_spectrum(spectrum: Tensor, b: int, in_features: int) -> Tensor:
    """dK (m, n, b) from its per-block-pair spectrum (m, n, b // 2 + 1) (a real signal's half)."""
    return torch.fft.irfft(spectrum, n=b) / in_features


@fused_op("c3a_kernel_grad", autocast=False)
def c3a_kernel_grad_op(dy: Tensor, x: Tensor, c3a_kernel: Tensor) -> Tensor:
    """dL/dK (shape and dtype of ``c3a_kernel``) for 2-D dY (N, O) and x (N, I)."""
    return _c3a_kernel_grad_torch(dy, x, c3a_kernel)


@c3a_kernel_grad_op.impl("triton")
def _(dy, x, c3a_kernel):
    if not _triton_serves(dy, x, c3a_kernel):
        return _c3a_kernel_grad_torch(dy, x, c3a_kernel)
    kernels = _kernels()
    m, n, b = c3a_kernel.shape
    spec_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    parts = kernels.c3a_backward_spectrum(kernels.block_dft_forward(dy, b, spec_dtype),
                                          kernels.block_dft_forward(x, b, spec_dtype))
    spectrum = torch.complex(parts[0], parts[1]).permute(1, 2, 0)
    return _kernel_from_spectrum(spectrum, b, n * b).to(c3a_kernel.dtype)


@c3a_kernel_grad_op.fake
def _(dy, x, c3a_kernel):
    return c3a_kernel.new_empty(c3a_kernel.shape)


def _c3a_setup(ctx, inputs, output):
    x, weight, bias, c3a_kernel = inputs
    ctx.save_for_backward(x, weight, c3a_kernel)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _c3a_backward(ctx, dy):
    """Saved: x, W, K (parameters) -- bytes(x) of activations.  dx = dY (W + dW) with W + dW built
    again; dK from block DFTs of dY and x (:func:`c3a_kernel_grad_op`); dbias = colsum(dY)."""
    x, weight, c3a_kernel = ctx.saved_tensors
    dx = d_bias = d_kernel = None
    if ctx.needs_input_grad[0]:
        dx = dy @ c3a_merged_weight_op(weight, c3a_kernel)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        d_bias = dy.sum(dim=0, dtype=acc_dtype(dy.dtype)).to(ctx.bias_dtype)
    if ctx.needs_input_grad[3]:
        d_kernel = c3a_kernel_grad_op(dy, x, c3a_kernel)
    return dx, None, d_bias, d_kernel


c3a_linear_op.autograd(_c3a_backward, _c3a_setup)


@c3a_linear_op.example
def _():
    yield (randn(5, 8, dtype=torch.float32, requires_grad=True, seed=1), randn(12, 8, dtype=torch.float32, seed=2),
           randn(12, dtype=torch.float32, requires_grad=True, seed=3),
           randn(3, 2, 4, dtype=torch.float32, requires_grad=True, seed=4)), {}
    yield (randn(7, 9, dtype=torch.float64, requires_grad=True, seed=5), randn(6, 9, dtype=torch.float64, seed=6), None,
           randn(2, 3, 3, dtype=torch.float64, requires_grad=True, seed=7)), {}
    yield (randn(4, 8, dtype=torch.bfloat16, requires_grad=True, seed=8), randn(4, 8, dtype=torch.bfloat16, seed=9),
           None, randn(1, 2, 4, dtype=torch.float32, requires_grad=True, seed=10)), {}


@c3a_kernel_grad_op.example
def _():
    yield (randn(5, 12, dtype=torch.float32, seed=11), randn(5, 8, dtype=torch.float32, seed=12),
           randn(3, 2, 4, dtype=torch.float32, seed=13)), {}


def _check_frozen(name: str, t: Tensor) -> None:
    if t.requires_grad:
        raise ValueError(f"{name} requires grad; the fused path needs it frozen ({name}.requires_grad_(False))")


def _check_base(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[int, int]:
    _validate.tensor("x", x, min_ndim=1)
    _validate.tensor("weight", weight, ndim=2)
    out_features, in_features = weight.shape
    _validate.tensor("x", x, shape=(*x.shape[:-1], in_features))
    _validate.same("x", x, "weight", weight)
    if bias is not None:
        _validate.tensor("bias", bias, shape=(out_features,))
        _validate.same("x", x, "bias", bias)
    _check_frozen("weight", weight)
    return out_features, in_features


def check_c3a_kernel(c3a_kernel: Tensor, out_features: int, in_features: int) -> int:
    """The block size b of a ``c3a_kernel`` of shape (out_features / b, in_features / b, b); ValueError
    naming the parameter otherwise."""
    _validate.tensor("c3a_kernel", c3a_kernel, ndim=3)
    b = c3a_kernel.shape[-1]
    _validate.divides("block_size", b, in_features)
    _validate.divides("block_size", b, out_features, "out_features")
    _validate.tensor("c3a_kernel", c3a_kernel, shape=(out_features // b, in_features // b, b))
    return b


def c3a_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], c3a_kernel: Tensor) -> Tensor:
    """C3A's layer as PEFT computes it, differentiable in x, bias and c3a_kernel.

    x (..., in); weight (out, in) frozen (any strides); bias (out,) or None; c3a_kernel
    (out / b, in / b, b) in x's dtype or float32 on a float16 / bfloat16 x (PEFT's default).
    """
    out_features, in_features = _check_base(x, weight, bias)
    check_c3a_kernel(c3a_kernel, out_features, in_features)
    adapter_compute_dtype("x", x, (("c3a_kernel", c3a_kernel),))
    y = c3a_linear_op(x.reshape(-1, in_features), weight, bias, c3a_kernel.contiguous())
    return y.reshape(*x.shape[:-1], out_features)


def c3a_merged_weight(weight: Tensor, c3a_kernel: Tensor) -> Tensor:
    """W + dW (out, in) in W's dtype: the weight of the merged layer (no gradient)."""
    _validate.tensor("weight", weight, ndim=2)
    check_c3a_kernel(c3a_kernel, *weight.shape)
    adapter_compute_dtype("weight", weight, (("c3a_kernel", c3a_kernel),))
    with torch.no_grad():
        return c3a_merged_weight_op(weight.detach(), c3a_kernel.detach().contiguous())


# ----------------------------------------------------------------------------------------------
# FourierFT

def _fold_positions(indices: Tensor, out_features: int, in_features: int) -> Tensor:
    """Flat positions (2n,) in an (out, in // 2 + 1) half spectrum (+ one discard slot at the end) of
    the Hermitian fold (S + S*) / 2, S*[u, v] = conj(S[-u, -v]): coefficient k lands at (u_k, v_k)
    and at (-u_k, -v_k) mod the sizes, each with c_k / 2, where that column is kept (v <= in / 2)."""
    half = in_features // 2 + 1
    u, v = indices[0], indices[1]
    u_neg, v_neg = (-u) % out_features, (-v) % in_features
    discard = out_features * half
    return torch.cat([torch.where(v < half, u * half + v, discard),
                      torch.where(v_neg < half, u_neg * half + v_neg, discard)])


def _fourierft_delta_torch(spectrum: Tensor, indices: Tensor, out_features: int, in_features: int,
                           real: torch.dtype) -> Tensor:
    """Re(ifft2(S)) (out, in) in ``real`` via irfft2 of the Hermitian fold (no complex out x in array)."""
    half = in_features // 2 + 1
    folded = torch.zeros(out_features * half + 1, dtype=_complex_dtype(real), device=spectrum.device)
    values = (spectrum.to(real) * 0.5).repeat(2).to(folded.dtype)
    folded.index_add_(0, _fold_positions(indices, out_features, in_features), values)
    return torch.fft.irfft2(folded[:-1].view(out_features, half), s=(out_features, in_features))


def _fourierft_weight_torch(weight: Tensor, spectrum: Tensor, indices: Tensor, scaling: float) -> Tensor:
    out_features, in_features = weight.shape
    delta = _fourierft_delta_torch(spectrum, indices, out_features, in_features, acc_dtype(weight.dtype))
    return _merge_into(delta, weight, scaling)


def _fourierft_weight(weight: Tensor, spectrum: Tensor, indices: Tensor, scaling: float, backend: str) -> Tensor:
    if backend == "triton" and _triton_serves(weight, spectrum):
        return _kernels().fourierft_weight_forward(weight, spectrum, indices[0], indices[1], scaling)
    return _fourierft_weight_torch(weight, spectrum, indices, scaling)


@fused_op("fourierft_merged_weight", autocast=False)
def fourierft_merged_weight_op(weight: Tensor, spectrum: Tensor, indices: Tensor, scaling: float) -> Tensor:
    """W + scaling Re(ifft2(S)) (O, I) in W's dtype (not differentiable: merge, and dx in backward)."""
    return _fourierft_weight_torch(weight, spectrum, indices, scaling)


@fourierft_merged_weight_op.impl("triton")
def _(weight, spectrum, indices, scaling):
    return _fourierft_weight(weight, spectrum, indices, scaling, "triton")


@fourierft_merged_weight_op.fake
def _(weight, spectrum, indices, scaling):
    return weight.new_empty(weight.shape)


@fourierft_merged_weight_op.example
def _():
    yield (randn(6, 10, dtype=torch.float32, seed=21), randn(7, dtype=torch.float32, seed=22),
           _example_indices(6, 10, 7), 3.0), {}


@fused_op("fourierft_linear", autocast_keep=("spectrum",))
def fourierft_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], spectrum: Tensor, indices: Tensor,
                        scaling: float) -> Tensor:
    """y = x (W + dW)^T + bias for 2-D x (see the module docstring)."""
    return F.linear(x, _fourierft_weight_torch(weight, spectrum, indices, scaling), bias)


@fourierft_linear_op.impl("triton")
def _(x, weight, bias, spectrum, indices, scaling):
    return F.linear(x, _fourierft_weight(weight, spectrum, indices, scaling, "triton"), bias)


@fourierft_linear_op.fake
def _(x, weight, bias, spectrum, indices, scaling):
    return x.new_empty(x.shape[0], weight.shape[0])


def _rfft_bins(index: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(bin, conjugated): a real row's DFT at ``index`` is its rfft at ``bin``, conjugated where ``index > n / 2``."""
    conjugated = index > n // 2
    return torch.where(conjugated, n - index, index), conjugated


def _spectrum_grad_plan(indices: Tensor, out_features: int, in_features: int):
    """rfft bins of dY and x for every coefficient, and the sign of the Im Im term of Re(DY X)."""
    dy_bins, dy_conj = _rfft_bins(indices[0], out_features)
    x_bins, x_conj = _rfft_bins(indices[1], in_features)
    return dy_bins, x_bins, torch.where(dy_conj == x_conj, -1.0, 1.0)


def _gather_bins(spectrum: Tensor, bins: Tensor) -> Tensor:
    """``view_as_real(spectrum[:, bins])`` (rows, n, 2) for a complex (rows, n_bins) ``spectrum``: one
    torch.gather of whole complex elements (complex64 moved as float64; 3-6x faster than index_select
    or a gather of the (re, im) pairs on CPU)."""
    packed = spectrum.view(torch.float64) if spectrum.dtype == torch.complex64 else spectrum
    gathered = torch.gather(packed, 1, bins.expand(spectrum.shape[0], -1))
    return torch.view_as_real(gathered.view(spectrum.dtype))


def _fourierft_spectrum_grad_torch(dy: Tensor, x: Tensor, spectrum: Tensor, indices: Tensor, scaling: float) -> Tensor:
    out_features, in_features = dy.shape[1], x.shape[1]
    real = acc_dtype(x.dtype)
    dy_bins, x_bins, sign = _spectrum_grad_plan(indices, out_features, in_features)
    rows = _chunk_rows(x.shape[0], max(out_features, in_features))
    # Per token slot of a chunk: (Re Re, Im Im) products summed over chunks, one addcmul_ per chunk
    # (not a mul, a sum and an add: fewer passes and fewer parallel regions), reduced over slots once.
    slots = torch.zeros(rows, spectrum.shape[0], 2, dtype=real, device=x.device)
    for start in range(0, x.shape[0], rows):
        dy_hat = _gather_bins(torch.fft.rfft(dy[start:start + rows].to(real)), dy_bins)   # (t, n, 2)
        x_hat = _gather_bins(torch.fft.rfft(x[start:start + rows].to(real)), x_bins)
        slots[:dy_hat.shape[0]].addcmul_(dy_hat, x_hat)
        del dy_hat, x_hat   # freed before the next chunk's pair is gathered (lower peak)
    products = slots.sum(dim=0)                                                  # (sum Re Re, sum Im Im)
    grad = (products[:, 0] + sign.to(real) * products[:, 1]) * (scaling / (out_features * in_features))
    return grad.to(spectrum.dtype)


@fused_op("fourierft_spectrum_grad", autocast=False)
def fourierft_spectrum_grad_op(dy: Tensor, x: Tensor, spectrum: Tensor, indices: Tensor, scaling: float) -> Tensor:
    """dL/dc (shape and dtype of ``spectrum``) for 2-D dY (N, O) and x (N, I)."""
    return _fourierft_spectrum_grad_torch(dy, x, spectrum, indices, scaling)


@fourierft_spectrum_grad_op.impl("triton")
def _(dy, x, spectrum, indices, scaling):
    if not _triton_serves(dy, x, spectrum):
        return _fourierft_spectrum_grad_torch(dy, x, spectrum, indices, scaling)
    out_features, in_features = dy.shape[1], x.shape[1]
    dy_bins, x_bins, sign = _spectrum_grad_plan(indices, out_features, in_features)
    products = _kernels().fourierft_backward_products(torch.view_as_real(torch.fft.rfft(dy.float())),
                                                      torch.view_as_real(torch.fft.rfft(x.float())), dy_bins, x_bins)
    grad = (products[0] + sign * products[1]) * (scaling / (out_features * in_features))
    return grad.to(spectrum.dtype)


@fourierft_spectrum_grad_op.fake
def _(dy, x, spectrum, indices, scaling):
    return spectrum.new_empty(spectrum.shape)


def _fourierft_setup(ctx, inputs, output):
    x, weight, bias, spectrum, indices, scaling = inputs
    ctx.save_for_backward(x, weight, spectrum, indices)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.scaling = scaling


def _fourierft_backward(ctx, dy):
    """Saved: x, W, the spectrum and its indices -- bytes(x) of activations.  dx = dY (W + dW) with
    W + dW built again; dc from row DFTs of dY and x (:func:`fourierft_spectrum_grad_op`)."""
    x, weight, spectrum, indices = ctx.saved_tensors
    dx = d_bias = d_spectrum = None
    if ctx.needs_input_grad[0]:
        dx = dy @ fourierft_merged_weight_op(weight, spectrum, indices, ctx.scaling)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        d_bias = dy.sum(dim=0, dtype=acc_dtype(dy.dtype)).to(ctx.bias_dtype)
    if ctx.needs_input_grad[3]:
        d_spectrum = fourierft_spectrum_grad_op(dy, x, spectrum, indices, ctx.scaling)
    return dx, None, d_bias, d_spectrum, None, None


fourierft_linear_op.autograd(_fourierft_backward, _fourierft_setup)


def _example_indices(out_features: int, in_features: int, n: int, seed: int = 777) -> Tensor:
    from ..reference.circulant import spectrum_indices
    return spectrum_indices(out_features, in_features, n, seed)


@fourierft_linear_op.example
def _():
    yield (randn(5, 10, dtype=torch.float32, requires_grad=True, seed=23), randn(6, 10, dtype=torch.float32, seed=24),
           randn(6, dtype=torch.float32, requires_grad=True, seed=25),
           randn(7, dtype=torch.float32, requires_grad=True, seed=26), _example_indices(6, 10, 7), 3.0), {}
    yield (randn(4, 9, dtype=torch.float64, requires_grad=True, seed=27), randn(5, 9, dtype=torch.float64, seed=28),
           None, randn(11, dtype=torch.float64, requires_grad=True, seed=29), _example_indices(5, 9, 11, 3), 0.5), {}


@fourierft_spectrum_grad_op.example
def _():
    yield (randn(5, 6, dtype=torch.float32, seed=30), randn(5, 10, dtype=torch.float32, seed=31),
           randn(7, dtype=torch.float32, seed=32), _example_indices(6, 10, 7), 3.0), {}


def check_fourierft(spectrum: Tensor, indices: Tensor, out_features: int, in_features: int) -> int:
    """n_frequency of a (n,) ``spectrum`` with (2, n) int64 ``indices`` inside (out_features, in_features);
    ValueError naming the parameter otherwise (indices are checked by shape and dtype, not by value:
    reading them would synchronise a GPU)."""
    _validate.tensor("fourierft_spectrum", spectrum, ndim=1)
    n = spectrum.shape[0]
    top = out_features * in_features
    if n > top:
        raise ValueError(f"n_frequency={n} exceeds out_features * in_features={top}; choose n_frequency in 1..{top}")
    if not isinstance(indices, Tensor) or indices.dtype != torch.int64 or tuple(indices.shape) != (2, n):
        raise ValueError(f"indices must be a (2, {n}) int64 tensor of (row, column) locations, got "
                         f"{getattr(indices, 'dtype', type(indices))} {tuple(getattr(indices, 'shape', ()))}")
    if indices.device != spectrum.device:
        raise ValueError(f"indices are on {indices.device} but fourierft_spectrum is on {spectrum.device}; move them")
    return n


def fourierft_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], fourierft_spectrum: Tensor, indices: Tensor,
                     scaling: float) -> Tensor:
    """FourierFT's layer as PEFT computes it, differentiable in x, bias and fourierft_spectrum.

    x (..., in); weight (out, in) frozen (pass ``weight.T`` for fan_in_fan_out storage); bias (out,)
    or None; fourierft_spectrum (n,) in x's dtype or float32 on a float16 / bfloat16 x; indices
    (2, n) int64 (row, column) locations on x's device; scaling read at call time.
    """
    out_features, in_features = _check_base(x, weight, bias)
    check_fourierft(fourierft_spectrum, indices, out_features, in_features)
    adapter_compute_dtype("x", x, (("fourierft_spectrum", fourierft_spectrum),))
    y = fourierft_linear_op(x.reshape(-1, in_features), weight, bias, fourierft_spectrum, indices.contiguous(),
                            float(scaling))
    return y.reshape(*x.shape[:-1], out_features)


def fourierft_merged_weight(weight: Tensor, fourierft_spectrum: Tensor, indices: Tensor, scaling: float) -> Tensor:
    """W + scaling Re(ifft2(S)) (out, in) in W's dtype: the weight of the merged layer (no gradient)."""
    _validate.tensor("weight", weight, ndim=2)
    check_fourierft(fourierft_spectrum, indices, *weight.shape)
    adapter_compute_dtype("weight", weight, (("fourierft_spectrum", fourierft_spectrum),))
    with torch.no_grad():
        return fourierft_merged_weight_op(weight.detach(), fourierft_spectrum.detach(), indices.contiguous(),
                                          float(scaling))
