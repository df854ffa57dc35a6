"""The OFT / OFTv2 layer from its parameter, one op per Cayley mode:

    y = (x R_bd) W^T + bias,   R_i = PEFT's rotation of Q_i = skew(packed_i)
        exact   (use_cayley_neumann=False):  R = (I - Q)(I + Q)^{-1} = cayley(-Q)
        Neumann (use_cayley_neumann=True):   R = PEFT's k-term series of (I + Q)(I - Q)^{-1}

x (M, in), packed (in/b or 1 shared, b(b-1)/2), W (out, in).

Forward rotates the smaller operand (fastadapt.ops.cayley_rotate): W' = W R_bd^T when M > out,
else x.  Backward, with G_i = dL/dR_i and g = dy W the gradient at the rotated input:

    weight side (M > out, fp32 / fp64) with R^{-T} at hand:  dx = dy W' (W' rebuilt: 2 out d b
        FLOPs instead of rotating the M x d gradient) and, with P_i = x_i^T dx_i,
        G_i = x_i^T g_i = P_i R_i^{-T}.
        Exact: R^{-T} = R, and with N = (I + Q)^{-1} = (R + I) / 2 and R N^T = N,
        dL/dQ_i = -2 N_i^T P_i N_i (two b x b products per block).
        Neumann: R^{-T} = (I + E + ... + E^k) R with E = I - R R^T when k terms reach the dtype's
        rounding and their k + 2 b x b products (2 d b^2 (k + 2) FLOPs) cost less than the
        rotation of the gradient they replace (2 d b (M - out) FLOPs): k + 2 < (M - out) / b, and
        k <= MAX_INVERSE_TERMS (torch backend only: deciding k reads ||E||_F on the host);
    otherwise (x side, half precision, a far-from-orthogonal Neumann R):  g = dy W,
        G_i = x_i^T g_i,  dx = g R_bd^T (rotated in place on the torch backend);
    then dL/dQ = -2 N^T G N^T (exact) or the series' adjoint (Neumann, fastadapt.ops.cayley_maps);
    dpacked = dQ[r, c] - dQ[c, r] (r < c), summed over blocks when shared;
    dW = dy^T (x R_bd) (only if W trains),  dbias = sum dy.

Saved: x and the parameters (packed, W); exact mode also R (n b^2 numbers) when that is at most
1/KEEP_R_FRACTION of x's numbers (b <= M / 32, e.g. b = 32 at M = 2048: 1/64) or at most
KEEP_R_NUMBERS (a small layer, where rebuilding R costs more host time than its bytes are worth),
else only R's symmetric part H = (R + R^T) / 2 packed (n b(b+1)/2 numbers), from which the backward rebuilds
R with one product instead of a second batched inverse: with K = (I - Q^2)^{-1} (symmetric,
commutes with Q), R = (2K - I) - 2QK, so H = 2K - I and R = H - Q (H + I).  Neumann mode keeps no
R and reruns the series (a few b x b products).

Mixed precision (PEFT's float32 oft_R on a half base, and torch.autocast, which casts x, W and
bias to the autocast dtype and keeps packed): R in float32, the rotations of activations and of W
in float32 rounded once to the half dtype (PEFT rotates x in float32 and rounds it before the
half base GEMM), dR accumulated in float32; the half layout takes the x-side backward.

Ops: oft_linear_exact -> (y, kept), oft_linear_exact_backward, oft_linear_neumann -> y,
oft_linear_neumann_backward; each with a torch and a triton implementation that share the
algorithm above and differ in their building blocks (:class:`_Kernels`): torch bmm / LAPACK on
the torch backend, the Triton kernels of fastadapt.triton_kernels.cayley (packed -> R and
dL/dR -> dL/dpacked one launch each) on the triton backend, which never reads a device value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..testing import randn
from . import cayley_monitor
from ._registry import fused_op
from .cayley_maps import (NeumannSeries, eye_like, inverse_transposed, neumann_series, packed_size,
                          skew_adjoint_torch, skew_torch)
from .cayley_rotate import block_grad, rotate, rotate_

KEEP_R_FRACTION = 32    # exact mode keeps R whole when it holds at most 1/32 as many numbers as x,
KEEP_R_NUMBERS = 1 << 14  # or at most this many (64 KiB in fp32)
MAX_INVERSE_TERMS = 4   # beyond this many terms of (I - E)^{-1}, rotating g is cheaper


# ----------------------------------------------------------------------------------------------
# building blocks per backend


@dataclass(frozen=True)
class _Kernels:
    """What the OFT algorithm needs from a backend."""
    rotate: Callable                 # (t, R, transpose=False) -> t R_bd, a new tensor in t's dtype
    rotate_: Callable                # the same, overwriting t where the backend can
    block_grad: Callable             # (x, g, b, shared, dtype) -> dR_i = x_i^T g_i
    exact_blocks: Callable           # (packed, b) -> R = cayley(-skew(packed))
    exact_dpacked: Callable          # (R, G) -> dL/dpacked of R = cayley(-skew(packed)) for G = dL/dR
    exact_dpacked_weight_side: Callable  # (R, P) -> the same for G = P R (P = x^T dx)
    neumann: Callable                # (packed, b, terms, monitored) -> (R, adjoint: G -> dL/dpacked)
    inverse_transpose: Callable      # (R, max_terms) -> R^{-T}, or None where it needs more terms


def _exact_blocks_torch(packed: Tensor, block_size: int) -> Tensor:
    """(I - Q)(I + Q)^{-1} = 2 (I + Q)^{-1} - I, with (I + Q)^{-1} = (I - Q)^{-T} (Q skew)."""
    Q = skew_torch(packed, block_size)
    eye = eye_like(Q)
    return 2 * inverse_transposed(eye - Q) - eye


def _exact_dpacked_torch(R: Tensor, grad_R: Tensor) -> Tensor:
    """-2 N^T G N^T with 2N = R + I (module docstring)."""
    twice_Nt = R.transpose(-2, -1) + eye_like(R)
    return skew_adjoint_torch((twice_Nt @ grad_R @ twice_Nt).mul_(-0.5))


def _exact_dpacked_weight_side_torch(R: Tensor, P: Tensor) -> Tensor:
    """-2 N^T (P R) N^T = -2 N^T P N with 2N = R + I: two products."""
    twice_N = R + eye_like(R)
    return skew_adjoint_torch((twice_N.transpose(-2, -1) @ P @ twice_N).mul_(-0.5))


def _neumann_torch(packed: Tensor, block_size: int, terms: int, monitored: bool):
    Q = skew_torch(packed, block_size)
    series = neumann_series(Q, terms) if monitored else NeumannSeries(Q, terms)
    return series.R, lambda grad_R: skew_adjoint_torch(series.adjoint(grad_R))


def _near_orthogonal_inverse_transpose(R: Tensor, max_terms: int) -> Optional[Tensor]:
    """R^{-T} = (R R^T)^{-1} R = (I - E)^{-1} R = (I + E + ... + E^k) R + O(e^{k+1}) with
    E = I - R R^T and e = max_i ||E_i||_F: the shortest such sum whose dropped tail
    e^{k+1} / (1 - e) is below the dtype's epsilon (Horner, k + 1 b x b products), or None
    when that takes more than ``max_terms`` terms."""
    if max_terms < 1:
        return None
    eye = eye_like(R)
    E = torch.baddbmm(eye.expand_as(R), R, R.transpose(-2, -1), alpha=-1)
    e = float(torch.linalg.vector_norm(E, dim=(-2, -1)).max())
    eps = torch.finfo(R.dtype).eps
    if not e < 0.5:
        return None
    terms = 1
    while e ** (terms + 1) / (1 - e) > eps:
        terms += 1
        if terms > max_terms:
            return None
    X = E + eye
    for _ in range(terms - 1):
        X = torch.baddbmm(eye.expand_as(R), E, X)
    return X @ R


_TORCH = _Kernels(
    rotate=rotate, rotate_=rotate_, block_grad=block_grad,
    exact_blocks=_exact_blocks_torch, exact_dpacked=_exact_dpacked_torch,
    exact_dpacked_weight_side=_exact_dpacked_weight_side_torch,
    neumann=_neumann_torch, inverse_transpose=_near_orthogonal_inverse_transpose)


def _triton_kernels() -> _Kernels:
    from ..triton_kernels import cayley as kernels

    def rotate_triton(t, R, transpose=False):
        return kernels.block_rotate_forward(t, R.transpose(-2, -1) if transpose else R)

    def block_grad_triton(x2d, g2d, block_size, shared, dtype):
        grad = kernels.block_rotate_backward_weight(x2d, g2d, block_size, out_dtype=dtype)
        return grad.sum(0, keepdim=True) if shared else grad

    def exact_dpacked(R, grad_R):  # the kernel differentiates cayley(Q') with Q' = -Q
        return kernels.cayley_backward(R, grad_R, R.shape[-1]).neg_()

    def neumann(packed, block_size, terms, monitored):
        R = kernels.cayley_forward(packed, block_size, terms)
        if monitored:
            cayley_monitor.MONITOR.check(lambda: skew_torch(packed, block_size), R, terms)
        return R, lambda grad_R: kernels.cayley_backward(packed, grad_R, block_size, terms)

    return _Kernels(
        rotate=rotate_triton, rotate_=rotate_triton, block_grad=block_grad_triton,
        exact_blocks=lambda packed, block_size: kernels.cayley_forward(packed.neg(), block_size),
        exact_dpacked=exact_dpacked,
        exact_dpacked_weight_side=lambda R, P: exact_dpacked(R, P @ R),
        neumann=neumann, inverse_transpose=lambda R, max_terms: None)


# ----------------------------------------------------------------------------------------------
# the algorithm (module docstring), once for both backends


def _weight_side(x2d: Tensor, weight: Tensor) -> bool:
    return x2d.shape[0] > weight.shape[0]


def _rotated_product(K: _Kernels, x2d, R, weight, bias):
    if _weight_side(x2d, weight):
        return F.linear(x2d, K.rotate(weight, R, transpose=True), bias)
    return F.linear(K.rotate(x2d, R), weight, bias)


def _keeps_whole_r(x2d: Tensor, packed: Tensor, block_size: int) -> bool:
    numbers = packed.shape[0] * block_size * block_size
    return numbers <= KEEP_R_NUMBERS or numbers * KEEP_R_FRACTION <= x2d.shape[0] * x2d.shape[1]


_SYMMETRIC_INDEX: dict = {}


def _symmetric_index(block_size: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Flat positions r*b + c of the upper triangle with its diagonal (r <= c), of its mirror, and
    for each of the b*b entries its position in that triangle (cached per device)."""
    key = (block_size, str(device))
    if key not in _SYMMETRIC_INDEX:
        rows, cols = torch.triu_indices(block_size, block_size, 0, device=device)
        upper, lower = rows * block_size + cols, cols * block_size + rows
        source = torch.empty(block_size * block_size, dtype=torch.long, device=device)
        source[upper] = torch.arange(upper.numel(), device=device)
        source[lower] = torch.arange(upper.numel(), device=device)
        _SYMMETRIC_INDEX[key] = (upper, lower, source)
    return _SYMMETRIC_INDEX[key]


def _pack_symmetric_part(R: Tensor) -> Tensor:
    """(n, b, b) -> (n, b(b+1)/2): the upper triangle (with diagonal) of (R + R^T) / 2."""
    b = R.shape[-1]
    upper, lower, _ = _symmetric_index(b, R.device)
    flat = R.reshape(R.shape[0], b * b)
    return (flat.index_select(1, upper) + flat.index_select(1, lower)) / 2


def _exact_from_symmetric_part(sym_packed: Tensor, packed: Tensor, block_size: int) -> Tensor:
    """R = H - Q (H + I) from H = (R + R^T) / 2 (module docstring): one b x b product."""
    Q = skew_torch(packed, block_size)
    H = sym_packed.index_select(1, _symmetric_index(block_size, Q.device)[2]).view(-1, block_size, block_size)
    return H - Q @ (H + eye_like(Q))


def _exact_forward(K: _Kernels, x2d, packed, weight, bias, block_size):
    R = K.exact_blocks(packed, block_size)
    kept = R if _keeps_whole_r(x2d, packed, block_size) else _pack_symmetric_part(R)
    return _rotated_product(K, x2d, R, weight, bias), kept


def _x_side_backward(K: _Kernels, dy, x2d, R, weight, need_x, need_packed, dpacked_of):
    """g = dy W, G = x^T g -> dpacked_of(G), dx = g R_bd^T (g is this call's own: rotated in place)."""
    g = dy @ weight
    dpacked = dpacked_of(K.block_grad(x2d, g, R.shape[-1], R.shape[0] == 1, R.dtype)) if need_packed else None
    dx = K.rotate_(g, R, transpose=True) if need_x else None
    return dx, dpacked


def _weight_grad(K: _Kernels, dy, x2d, R, need_weight):
    return dy.T @ K.rotate(x2d, R) if need_weight else None


def _exact_backward(K: _Kernels, dy, x2d, packed, weight, kept, block_size, need_x, need_packed, need_weight):
    R = kept if kept.ndim == 3 else _exact_from_symmetric_part(kept, packed, block_size)
    if _weight_side(x2d, weight) and x2d.dtype == R.dtype and x2d.dtype in (torch.float32, torch.float64):
        dx = dy @ K.rotate(weight, R, transpose=True)
        dpacked = None
        if need_packed:
            P = K.block_grad(x2d, dx, block_size, R.shape[0] == 1, R.dtype)
            dpacked = K.exact_dpacked_weight_side(R, P)
    else:
        dx, dpacked = _x_side_backward(K, dy, x2d, R, weight, need_x, need_packed,
                                       lambda G: K.exact_dpacked(R, G))
    return dx, dpacked, _weight_grad(K, dy, x2d, R, need_weight)


def _affordable_inverse_terms(x2d: Tensor, weight: Tensor, block_size: int) -> int:
    """Terms k of (I - E)^{-1} whose k + 2 b x b products cost less than the gradient rotation
    they replace: k + 2 < (M - out) / b (module docstring), at most MAX_INVERSE_TERMS."""
    return min(MAX_INVERSE_TERMS, -(-(x2d.shape[0] - weight.shape[0]) // block_size) - 3)


def _neumann_backward(K: _Kernels, dy, x2d, packed, weight, block_size, terms, need_x, need_packed, need_weight):
    R, adjoint = K.neumann(packed, block_size, terms, False)
    inverse_t = None
    if _weight_side(x2d, weight) and x2d.dtype == R.dtype and x2d.dtype in (torch.float32, torch.float64):
        inverse_t = K.inverse_transpose(R, _affordable_inverse_terms(x2d, weight, block_size))
    if inverse_t is not None:
        dx = dy @ K.rotate(weight, R, transpose=True)
        dpacked = None
        if need_packed:
            dpacked = adjoint(K.block_grad(x2d, dx, block_size, R.shape[0] == 1, R.dtype) @ inverse_t)
    else:
        dx, dpacked = _x_side_backward(K, dy, x2d, R, weight, need_x, need_packed, adjoint)
    return dx, dpacked, _weight_grad(K, dy, x2d, R, need_weight)


def _requested(flags, values) -> list[Tensor]:
    return [v for flag, v in zip(flags, values) if flag]


def _unpack(flags, outputs) -> list:
    it = iter(outputs)
    return [next(it) if flag else None for flag in flags]


# ----------------------------------------------------------------------------------------------
# ops: exact mode


@fused_op("oft_linear_exact", autocast_keep=("packed",))
def oft_linear_exact_op(x2d: Tensor, packed: Tensor, weight: Tensor, bias: Optional[Tensor],
                        block_size: int) -> tuple[Tensor, Tensor]:
    """(y, kept): y = (x R_bd) W^T + bias with R = cayley(-skew(packed)); kept = R or its
    packed symmetric part (for the backward)."""
    return _exact_forward(_TORCH, x2d, packed, weight, bias, block_size)


@oft_linear_exact_op.impl("triton")
def _(x2d, packed, weight, bias, block_size):
    return _exact_forward(_triton_kernels(), x2d, packed, weight, bias, block_size)


@oft_linear_exact_op.fake
def _(x2d, packed, weight, bias, block_size):
    n, b = packed.shape[0], block_size
    kept = (packed.new_empty(n, b, b) if _keeps_whole_r(x2d, packed, b) else packed.new_empty(n, b * (b + 1) // 2))
    return x2d.new_empty(x2d.shape[0], weight.shape[0]), kept


@fused_op("oft_linear_exact_backward", autocast_keep=("dy", "x2d", "packed", "weight", "kept"))
def oft_linear_exact_backward_op(dy: Tensor, x2d: Tensor, packed: Tensor, weight: Tensor, kept: Tensor,
                                 block_size: int, need_x: bool, need_packed: bool,
                                 need_weight: bool) -> list[Tensor]:
    """[dx, dpacked, dW], each only where its flag is set."""
    flags = (need_x, need_packed, need_weight)
    return _requested(flags, _exact_backward(_TORCH, dy, x2d, packed, weight, kept, block_size, *flags))


@oft_linear_exact_backward_op.impl("triton")
def _(dy, x2d, packed, weight, kept, block_size, need_x, need_packed, need_weight):
    flags = (need_x, need_packed, need_weight)
    return _requested(flags, _exact_backward(_triton_kernels(), dy, x2d, packed, weight, kept, block_size, *flags))


def _backward_fake(dy, x2d, packed, weight, need_x, need_packed, need_weight):
    return _requested((need_x, need_packed, need_weight),
                      (torch.empty_like(x2d), torch.empty_like(packed), torch.empty_like(weight)))


@oft_linear_exact_backward_op.fake
def _(dy, x2d, packed, weight, kept, block_size, need_x, need_packed, need_weight):
    return _backward_fake(dy, x2d, packed, weight, need_x, need_packed, need_weight)


def _setup(ctx, inputs, output, extra):
    """Save x and the parameters (and ``extra``: exact mode's kept R); remember the flags."""
    x2d, packed, weight, bias, *args = inputs
    ctx.save_for_backward(x2d, packed, weight, *extra)
    ctx.args, ctx.has_bias = args, bias is not None


def _exact_setup(ctx, inputs, output):
    _setup(ctx, inputs, output, (output[1],))
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _bias_grad(ctx, dy):
    return dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None


def _exact_autograd_backward(ctx, dy, _):
    if dy is None:
        return None, None, None, None, None
    x2d, packed, weight, kept = ctx.saved_tensors
    flags = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    grads = oft_linear_exact_backward_op(dy, x2d, packed, weight, kept, *ctx.args, *flags) if any(flags) else []
    dx, dpacked, dW = _unpack(flags, grads)
    return dx, dpacked, dW, _bias_grad(ctx, dy), None


oft_linear_exact_op.autograd(_exact_autograd_backward, _exact_setup)


def _oft_examples(terms: Optional[int]):
    """OFT layers with x rotated (4 rows < 5 outputs) and W rotated (9 rows), blocks of 4,
    per-block and shared parameters; and the mixed layout (bf16 x and W, fp32 packed)."""
    W, bias = randn(5, 12, requires_grad=True, seed=50), randn(5, requires_grad=True, seed=51)
    extra = () if terms is None else (terms,)
    for rows in (4, 9):
        x = randn(rows, 12, requires_grad=True, seed=52 + rows)
        for n in (3, 1):
            packed = randn(n, packed_size(4), scale=0.3, requires_grad=True, seed=60 + n)
            yield (x, packed, W, bias if n == 3 else None, 4, *extra), {}
    half = torch.bfloat16
    yield (randn(9, 12, dtype=half, requires_grad=True, seed=70), randn(3, 6, dtype=torch.float32, scale=0.3,
           requires_grad=True, seed=71), W.detach().to(half), None, 4, *extra), {}


@oft_linear_exact_op.example
def _():
    yield from _oft_examples(None)


def _backward_examples():
    """(dy, x, packed, W) of OFT layers with blocks of 4 and 5 outputs: x rotated (4 rows), W
    rotated (9 rows), and the mixed layout (bf16 dy, x and W, fp32 packed)."""
    W, packed = randn(5, 12, seed=72), randn(3, packed_size(4), scale=0.3, seed=73)
    for rows in (4, 9):
        yield randn(rows, 5, seed=74), randn(rows, 12, seed=75), packed, W
    half = torch.bfloat16
    yield randn(9, 5, dtype=half, seed=76), randn(9, 12, dtype=half, seed=77), packed.float(), W.to(half)


_EXAMPLE_FLAGS = ((True, True, False), (False, True, True))  # (need_x, need_packed, need_weight)


@oft_linear_exact_backward_op.example
def _():
    for dy, x, packed, W in _backward_examples():
        kept = _exact_forward(_TORCH, x, packed, W, None, 4)[1]
        for flags in _EXAMPLE_FLAGS:
            yield (dy, x, packed, W, kept, 4, *flags), {}


# ----------------------------------------------------------------------------------------------
# ops: Neumann mode


@fused_op("oft_linear_neumann", autocast_keep=("packed",))
def oft_linear_neumann_op(x2d: Tensor, packed: Tensor, weight: Tensor, bias: Optional[Tensor],
                          block_size: int, terms: int) -> Tensor:
    """y = (x R_bd) W^T + bias with R = PEFT's ``terms``-term series of skew(packed), monitored."""
    R, _ = _TORCH.neumann(packed, block_size, terms, True)
    return _rotated_product(_TORCH, x2d, R, weight, bias)


@oft_linear_neumann_op.impl("triton")
def _(x2d, packed, weight, bias, block_size, terms):
    K = _triton_kernels()
    R, _ = K.neumann(packed, block_size, terms, True)
    return _rotated_product(K, x2d, R, weight, bias)


@oft_linear_neumann_op.fake
def _(x2d, packed, weight, bias, block_size, terms):
    return x2d.new_empty(x2d.shape[0], weight.shape[0])


@fused_op("oft_linear_neumann_backward", autocast_keep=("dy", "x2d", "packed", "weight"))
def oft_linear_neumann_backward_op(dy: Tensor, x2d: Tensor, packed: Tensor, weight: Tensor, block_size: int,
                                   terms: int, need_x: bool, need_packed: bool, need_weight: bool) -> list[Tensor]:
    """[dx, dpacked, dW], each only where its flag is set (the series recomputed from packed)."""
    flags = (need_x, need_packed, need_weight)
    return _requested(flags, _neumann_backward(_TORCH, dy, x2d, packed, weight, block_size, terms, *flags))


@oft_linear_neumann_backward_op.impl("triton")
def _(dy, x2d, packed, weight, block_size, terms, need_x, need_packed, need_weight):
    flags = (need_x, need_packed, need_weight)
    return _requested(flags, _neumann_backward(_triton_kernels(), dy, x2d, packed, weight, block_size, terms,
                                               *flags))


@oft_linear_neumann_backward_op.fake
def _(dy, x2d, packed, weight, block_size, terms, need_x, need_packed, need_weight):
    return _backward_fake(dy, x2d, packed, weight, need_x, need_packed, need_weight)


def _neumann_autograd_backward(ctx, dy):
    x2d, packed, weight = ctx.saved_tensors
    flags = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    grads = oft_linear_neumann_backward_op(dy, x2d, packed, weight, *ctx.args, *flags) if any(flags) else []
    dx, dpacked, dW = _unpack(flags, grads)
    return dx, dpacked, dW, _bias_grad(ctx, dy), None, None


def _neumann_setup(ctx, inputs, output):
    _setup(ctx, inputs, output, ())


oft_linear_neumann_op.autograd(_neumann_autograd_backward, _neumann_setup)


@oft_linear_neumann_op.example
def _():
    for terms in (5, 3):
        yield from _oft_examples(terms)


@oft_linear_neumann_backward_op.example
def _():
    for dy, x, packed, W in _backward_examples():
        for terms in (5, 6):
            for flags in _EXAMPLE_FLAGS:
                yield (dy, x, packed, W, 4, terms, *flags), {}
