"""Butterfly family ops: chains of sparse orthogonal factors applied to activations, never a d x d.

Row-vector convention (x is (N, d), W is (out, in), y = x W^T + b):

BOFT (PEFT's layer)      y = ((x R) W^T) o s + b,   R = M_{m-1} ... M_1 M_0,  M_i = P_i B_i P_i^T,
                         B_i = blockdiag((I - S)(I + S)^{-1}), S = (A - A^T) / 2 for A in boft_R[i]
GOFT (Givens)            y = (x R^T) W^T + b,       R = G_{L-1} ... G_0, stage k rotates features
                         i and i + 2^k by goft_theta[k]: BOFT's factors with 2 x 2 blocks
HRA (PEFT's layer)       y = (x H^T) W^T + b,       H = H_1 ... H_r = I - U T U^T (compact WY form:
                         U the unit columns of hra_u, T^{-1} = I/2 + triu(U^T U, 1)); apply_GS:
                         H = I - 2 Q Q^T with Q = Gram-Schmidt(hra_u)
ETHER / ETHER+           y = (x H_in) W^T + b / ((x H_in) W^T) H_out + b, H = blockdiag(I - 2 u u^T)
                         (unit u) / blockdiag(I - u u^T + v v^T) (unit u, v)
RoAd (PEFT's layer)      y = h R^T, h = x W^T + b: each output pair (a, a + group/2) rotated and
                         scaled, y_a = f_a h_a - g_a h_b, y_b = f_b h_b + g_b h_a

Fused ops (``fastadapt::`` custom ops, each with a torch and a Triton implementation, a fake
kernel and a backward op):

``butterfly_chain`` / ``butterfly_linear`` (fastadapt.ops.butterfly_chain): a chain of butterfly
    factors runs as a few strided block-diagonal passes (fastadapt.ops.butterfly_plan), each
    ``y_g = x_g B_g`` over blocks of ``c = M H`` features; x is read once and written once per
    pass.  BOFT with b = 8 and m <= 2 (or b = 8, m = 4) is one pass: the factors are multiplied
    into that pass's c x c blocks on the parameters (``butterfly_pass_blocks``: c x d numbers),
    never on the activations.  ``butterfly_linear`` is the whole BOFT / GOFT layer: it rotates W
    instead of x when x has more rows than W (orthogonal passes), keeps x, and h = (x R) W^T
    only while boft_s trains (its gradient needs h).  Saved and gradients: that module's docstring.
``householder(x, U, K)``: z = x - ((x_j U_j) K_j) U_j^T per feature block j (one block of all
    features for HRA; ETHER's n blocks), two thin GEMMs.  Returns P = x U (N n k numbers) beside z.
    Saved: x and P.  Backward with Q = g U:  dx = g - ((g U) K^T) U^T,  dK = -P^T Q,
    dU = -(x^T (Q K^T) + g^T (P K)).
``road_rotate(h, f, g, group_size)``: RoAd's pair rotation of the base output in one pass.
    Saved: h (the base output) only.  Backward: dh_a = f_a dy_a + g_b dy_b,
    dh_b = f_b dy_b - g_a dy_a, df = sum_rows dy o h, dg_a = -sum dy_a h_b, dg_b = sum dy_b h_a.
``road_linear(x, W, b, f, g, group_size)``: RoAd's layer, h = x W^T + b and y = road_rotate(h).
    Saved: h while f or g trains (for df, dg), x only while W trains.  Backward on the torch path
    with N >= in_features never forms dh: with y = h R^T, dx = dy (R W) (the pair rotation applied
    to W's rows: out x in numbers instead of an N x out pass), dW = R^T (dy^T x),
    db = R^T sum_rows dy, and df, dg as road_rotate's; otherwise (and on the Triton path, whose
    df, dg pass writes dh) dx = dh W.

Every op computes in float32 for float16 / bfloat16 / float32 inputs (float64 in float64): the
small adapter tensors (pass blocks, U, K, f, g) come in that accumulation dtype, the activations
in any float dtype and any strides, the outputs in the activation dtype.  The layer functions
build those tensors from PEFT's parameters with differentiable torch on the parameters alone
(BOFT's blocks through fastadapt.ops.cayley).

Backends: "torch" (CPU path: batched GEMMs over the pass blocks, thin GEMMs with the rank leading
for HRA, per-block vector dots for ETHER, elementwise for RoAd over steps of 128 rows), "triton"
(fastadapt.triton_kernels.butterfly; float64 stays torch) and, for RoAd's ops on the CPU, "cpp"
(csrc/road.cpp: the rotation, and df / dg with dh, as one parallel pass each over the rows; the
torch path's bits on x86-64, its result independent of the thread count), chosen per call by the
registry (fastadapt.ops._registry).  No op reads a device value on the host.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _validate
from ._policy import acc_dtype
from ._registry import fused_op
from .butterfly_chain import butterfly_chain_op, butterfly_linear_op, check_chain, check_linear
from .butterfly_plan import ButterflyPlan, check_butterfly, pass_blocks, plan
from .cayley import cayley_packed

METHODS = ("boft", "goft", "hra", "ether", "road")
TRITON_METHODS = ("boft", "goft", "hra", "ether", "road")

__all__ = ["ROAD_VARIANTS", "ButterflyPlan", "boft_blocks", "boft_linear", "butterfly_rotate", "check_butterfly",
           "ether_factors", "ether_linear", "goft_blocks", "goft_linear", "goft_plan", "householder", "hra_factors",
           "hra_linear", "pass_blocks", "plan", "road_coefficients", "road_linear", "road_rotate", "rotate_linear"]


def _compute(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


# ----------------------------------------------------------------------------------------------
# butterfly chains (the ops live in fastadapt.ops.butterfly_chain)

def butterfly_rotate(x: Tensor, blocks: list[Tensor], chain: ButterflyPlan, *, transpose: bool = False) -> Tensor:
    """``x R`` (or ``x R^T``) for the chain R = M_{m-1} ... M_0 whose pass blocks are ``blocks``
    (from :func:`pass_blocks`).  x (..., d) any strides, any float dtype; blocks in float32
    (float64 for a float64 x).  Differentiable in x and the blocks."""
    _validate.tensor("x", x, min_ndim=1)
    if transpose:
        blocks = [B.transpose(-2, -1) for B in reversed(blocks)]
    x2d = x.reshape(-1, x.shape[-1])
    geometry = chain.geometry(transpose)
    check_chain(x2d, blocks, geometry)
    return butterfly_chain_op(x2d, blocks, geometry).view(x.shape)


def rotate_linear(x: Tensor, blocks: list[Tensor], chain: ButterflyPlan, weight: Tensor, bias: Tensor | None = None,
                  scale: Tensor | None = None, *, transpose: bool = False, orthogonal: bool = True,
                  recompute: bool = False) -> Tensor:
    """y = ((x R) W^T) o s + b (R^T with ``transpose``), the bias not scaled: BOFT's layer, GOFT's
    with s = None.  Rotates W instead of x (one pass over out x d numbers instead of N x d, and a
    backward without a pass over the activations' gradient) when ``orthogonal`` (the passes are
    rotations) and x has more rows than W.  Keeps h = (x R) W^T for backward only when s trains,
    unless ``recompute`` (backward forms h again: x alone saved, one more GEMM).
    Returns x's dtype (PEFT's BOFT rounds its float32 epilogue to it)."""
    _validate.tensor("x", x, min_ndim=1)
    if transpose:
        blocks = [B.transpose(-2, -1) for B in reversed(blocks)]
    x2d = x.reshape(-1, x.shape[-1])
    geometry = chain.geometry(transpose)
    check_linear(x2d, blocks, geometry, weight, scale, bias)
    weight_side = orthogonal and x2d.shape[0] > weight.shape[0]
    keep_pre = scale is not None and scale.requires_grad and torch.is_grad_enabled() and not recompute
    y, _ = butterfly_linear_op(x2d, blocks, geometry, weight, scale, bias, weight_side, keep_pre)
    return y.view(*x.shape[:-1], weight.shape[0]).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# householder: x - ((x U) K) U^T per feature block

def _columns_times(P: Tensor, K: Tensor, transpose: bool = False) -> Tensor:
    """P K (or P K^T) for P (M, n, k) and K (n or 1, k, k), k^2 elementwise products on the
    small (M, n) columns (a batched k x k product over M n blocks is slower on CPU)."""
    k = P.shape[-1]
    Kt = K.transpose(1, 2) if transpose else K
    return torch.stack([sum(P[..., i] * Kt[:, i, j] for i in range(k)) for j in range(k)], -1)


def _block_projections(v: Tensor, U: Tensor) -> Tensor:
    """(M, n, k): v_j . U_j per block j and column, as k vector dots (no batched GEMM: its
    skinny b x 1 products are ~10x slower than the dots on CPU)."""
    return torch.stack([torch.linalg.vecdot(v, U[:, :, j]) for j in range(U.shape[2])], -1)


def _subtract_columns(v: Tensor, C: Tensor, U: Tensor) -> Tensor:
    """v - sum_j C[..., j] U[:, :, j] per block (a new tensor)."""
    out = torch.addcmul(v, C[..., :1], U[:, :, 0], value=-1)
    for j in range(1, U.shape[2]):
        out.addcmul_(C[..., j:j + 1], U[:, :, j], value=-1)
    return out


def _householder_torch(x: Tensor, U: Tensor, K: Tensor) -> tuple[Tensor, Tensor]:
    M, d = x.shape
    n, b, k = U.shape
    xa = _compute(x, U.dtype)
    if n == 1:  # one block of all features (HRA): two thin GEMMs, the skinny side leading
        Pt = U[0].T @ xa.T                                             # (k, M): ~3x faster than x @ U
        z = torch.addmm(xa, Pt.T, K[0] @ U[0].T, alpha=-1)
        return _compute(z, x.dtype).contiguous(), Pt.T.contiguous().unsqueeze(0)
    xv = xa.unflatten(1, (n, b))
    P = _block_projections(xv, U)
    z = _subtract_columns(xv, _columns_times(P, K), U)
    return _compute(z.reshape(M, d), x.dtype).contiguous(), P.transpose(0, 1).contiguous()


def _check_householder(x: Tensor, U: Tensor, K: Tensor) -> None:
    _validate.tensor("x", x, ndim=2)
    _validate.tensor("U", U, ndim=3)
    _validate.tensor("K", K, ndim=3)
    n, b, k = U.shape
    if n * b != x.shape[1] or K.shape[1:] != (k, k) or K.shape[0] not in (1, n):
        raise ValueError(f"U {tuple(U.shape)} and K {tuple(K.shape)} do not fit x {tuple(x.shape)}: need U (n, b, k) "
                         f"with n b = {x.shape[1]} and K (n or 1, k, k)")
    for name, t in (("U", U), ("K", K)):
        if t.dtype != acc_dtype(x.dtype) or t.device != x.device:
            raise TypeError(f"{name} is {t.dtype} on {t.device}; x is {x.dtype} on {x.device}: pass {name} in "
                            f"{acc_dtype(x.dtype)} on x's device")


@fused_op("householder", autocast_keep=("U", "K"))
def householder_op(x: Tensor, U: Tensor, K: Tensor) -> tuple[Tensor, Tensor]:
    """(z, P): z = x - ((x_j U_j) K_j) U_j^T per feature block j, P = x U (n, N, k)."""
    return _householder_torch(x, U, K)


@householder_op.impl("triton")
def _(x, U, K):
    if x.dtype == torch.float64:
        return _householder_torch(x, U, K)
    from ..triton_kernels import butterfly as kernels
    return kernels.householder_forward(x, U, K)


@householder_op.fake
def _(x, U, K):
    return x.new_empty(x.shape), U.new_empty(U.shape[0], x.shape[0], U.shape[2])


def _householder_param_grads(x: Tensor, g: Tensor, U: Tensor, K: Tensor, P: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """(dU, dK) of householder from P = x U and Q = g U, both (n, M, k) (any strides):
    dK = -P^T Q,  dU = -(x^T (Q K^T) + g^T (P K)); thin GEMMs with the rank leading (n = 1) or
    per-block vector sums (n > 1)."""
    n, b, k = U.shape
    xa, ga = _compute(x, U.dtype), _compute(g, U.dtype)
    if n == 1:
        K0, Pt, Qt = K[0], P[0].T, Q[0].T                              # (k, M)
        dK = (Pt @ Qt.T).neg_().unsqueeze(0)
        dUt = torch.addmm((K0 @ Qt) @ xa, K0.T @ Pt, ga)               # K Q^T x + K^T P^T g  (k, d)
        return dUt.neg_().T.contiguous().unsqueeze(0), dK
    Pm, Qm = P.transpose(0, 1), Q.transpose(0, 1)                      # (M, n, k)
    xv, gv = xa.unflatten(1, (n, b)), ga.unflatten(1, (n, b))
    QKt, PK = _columns_times(Qm, K, transpose=True), _columns_times(Pm, K)
    dK = torch.einsum("mni,mnj->nij", Pm, Qm).neg_()
    if K.shape[0] == 1:
        dK = dK.sum(0, keepdim=True)
    dU = torch.stack([(xv * QKt[..., j:j + 1]).addcmul_(gv, PK[..., j:j + 1]).sum(0) for j in range(k)], -1)
    return dU.neg_(), dK


def _householder_backward_torch(grad: Tensor, x: Tensor, U: Tensor, K: Tensor, P: Tensor,
                                need_x: bool) -> list[Tensor]:
    n, b, k = U.shape
    M = x.shape[0]
    ga = _compute(grad, U.dtype)
    dx = x.new_empty(0)
    if n == 1:
        Q = (U[0].T @ ga.T).T.unsqueeze(0)                             # (1, M, k), the rank leading in memory
        if need_x:
            dx = _compute(torch.addmm(ga, Q[0], K[0].T @ U[0].T, alpha=-1), x.dtype).contiguous()
    else:
        gv = ga.unflatten(1, (n, b))
        Qm = _block_projections(gv, U)                                 # (M, n, k)
        Q = Qm.transpose(0, 1)
        if need_x:
            QKt = _columns_times(Qm, K, transpose=True)
            dx = _compute(_subtract_columns(gv, QKt, U).reshape(M, n * b), x.dtype).contiguous()
    return [dx, *_householder_param_grads(x, ga, U, K, P, Q)]


householder_backward_op = fused_op("householder_backward", autocast_keep=("U", "K", "P"))(_householder_backward_torch)


@householder_backward_op.impl("triton")
def _(grad, x, U, K, P, need_x):
    if x.dtype == torch.float64:
        return _householder_backward_torch(grad, x, U, K, P, need_x)
    from ..triton_kernels import butterfly as kernels
    dx, Q = kernels.householder_forward(grad, U, K.transpose(1, 2))   # dx = g - ((g U) K^T) U^T, Q = g U
    return [dx if need_x else x.new_empty(0), *_householder_param_grads(x, grad, U, K, P, Q)]


@householder_backward_op.fake
def _(grad, x, U, K, P, need_x):
    return [x.new_empty(x.shape) if need_x else x.new_empty(0), U.new_empty(U.shape), K.new_empty(K.shape)]


def _householder_setup(ctx, inputs, output):
    x, U, K = inputs
    ctx.save_for_backward(x, U, K, output[1])
    ctx.mark_non_differentiable(output[1])


def _householder_backward(ctx, grad, _grad_P):
    x, U, K, P = ctx.saved_tensors
    need_x, need_U, need_K = ctx.needs_input_grad
    if not (need_x or need_U or need_K):
        return None, None, None
    dx, dU, dK = householder_backward_op(grad, x, U, K, P, need_x)
    return (dx if need_x else None), (dU if need_U else None), (dK if need_K else None)


householder_op.autograd(_householder_backward, _householder_setup)


def _householder_example_args(n, b, k, dtype=torch.float32, seed=0):
    from ..testing import randn
    x = randn(6, n * b, dtype=dtype, seed=seed, requires_grad=True)
    U = randn(n, b, k, dtype=acc_dtype(dtype), scale=0.3, seed=seed + 1, requires_grad=True)
    K = randn(1, k, k, dtype=acc_dtype(dtype), seed=seed + 2, requires_grad=True)
    return x, U, K


@householder_op.example
def _():
    yield _householder_example_args(1, 12, 3), {}
    yield _householder_example_args(4, 3, 2, seed=4), {}


@householder_backward_op.example
def _():
    from ..testing import randn
    x, U, K = (t.detach() for t in _householder_example_args(3, 4, 2, seed=7))
    _, P = _householder_torch(x, U, K)
    yield (randn(6, 12, dtype=torch.float32, seed=11), x, U, K, P, True), {}


def householder(x: Tensor, U: Tensor, K: Tensor) -> Tensor:
    """z = x (I - U K U^T) blockwise: x (..., n b) any strides; U (n, b, k); K (n or 1, k, k), U and
    K in float32 (float64 for a float64 x).  Differentiable in x, U and K."""
    _validate.tensor("x", x, min_ndim=1)
    x2d = x.reshape(-1, x.shape[-1])
    _check_householder(x2d, U, K)
    z, _ = householder_op(x2d, U, K)
    return z.view(x.shape)


# ----------------------------------------------------------------------------------------------
# road_rotate: 2 x 2 rotation-scaling of output pairs; road_linear: the base GEMM and the rotation

# Rows per step of the torch path.  Each step's tiles (128 x out float32: 512 KiB at out = 1024)
# stay in the core's cache between the step's few elementwise ops, so h (forward) and dy, h
# (backward) are read from memory once; whole-tensor ops re-read the half-width strided temporaries
# (measured at N = 2048, out = 1024, group 64, 1 thread: forward 3.0 -> 1.7 ms, df / dg 3.4 -> 1.9 ms).
# df, dg sum per-row partials (row mod _ROAD_ROWS) over the steps; the C++ op takes the same step
# so that its sums round as these do.
_ROAD_ROWS = 128


def _road_shape(out: int, group_size: int) -> tuple[int, int, int]:
    """(groups, 2, half): a feature's index within its group split as (which half, position)."""
    return out // group_size, 2, group_size // 2


def _road_torch(h: Tensor, f: Tensor, g: Tensor, group_size: int) -> Tensor:
    M, out = h.shape
    shape = _road_shape(out, group_size)
    fv, gv = f.view(shape), g.view(shape)
    y = torch.empty(M, out, dtype=h.dtype, device=h.device)
    tile = None if h.dtype == f.dtype else torch.empty(min(M, _ROAD_ROWS), *shape, dtype=f.dtype, device=h.device)
    for start in range(0, M, _ROAD_ROWS):
        hv = h[start:start + _ROAD_ROWS].unflatten(1, shape)
        n = hv.shape[0]
        yv = y[start:start + n].view(n, *shape) if tile is None else tile[:n]
        torch.mul(hv, fv, out=yv)                                       # in f's dtype: one rounding to h's
        yv[:, :, 0].addcmul_(hv[:, :, 1], gv[:, 0], value=-1)
        yv[:, :, 1].addcmul_(hv[:, :, 0], gv[:, 1])
        if tile is not None:
            y[start:start + n].view(n, *shape).copy_(yv)
    return y


def _road_pairs(t: Tensor, f: Tensor, g: Tensor, group_size: int, transpose: bool) -> Tensor:
    """The rotation along dim 0 of t (out, k), in f's dtype: R t (transpose=False:
    t'_a = f_a t_a - g_a t_b, t'_b = f_b t_b + g_b t_a) or R^T t (t'_a = f_a t_a + g_b t_b,
    t'_b = f_b t_b - g_a t_a).  For the parameter-sized tensors of road_linear's backward."""
    shape = _road_shape(t.shape[0], group_size)
    tv = _compute(t, f.dtype).unflatten(0, shape)
    fv, gv = f.view(*shape, 1), g.view(*shape, 1)
    out = tv * fv
    if transpose:
        out[:, 0].addcmul_(tv[:, 1], gv[:, 1])
        out[:, 1].addcmul_(tv[:, 0], gv[:, 0], value=-1)
    else:
        out[:, 0].addcmul_(tv[:, 1], gv[:, 0], value=-1)
        out[:, 1].addcmul_(tv[:, 0], gv[:, 1])
    return out.flatten(0, 2)


def _check_coefficients(name: str, h: Tensor, out: int, f: Tensor, g: Tensor, group_size: int) -> None:
    """f, g (out,) in the accumulation dtype of ``h`` (the tensor called ``name``) on its device."""
    _validate.even("group_size", group_size)
    _validate.divides("group_size", group_size, out, "out_features")
    for coef, t in (("f", f), ("g", g)):
        _validate.tensor(coef, t, shape=(out,))
        if t.dtype != acc_dtype(h.dtype) or t.device != h.device:
            raise TypeError(f"{coef} is {t.dtype} on {t.device}; {name} is {h.dtype} on {h.device}: pass {coef} in "
                            f"{acc_dtype(h.dtype)} on {name}'s device")


def _check_road(h: Tensor, f: Tensor, g: Tensor, group_size: int) -> None:
    _validate.tensor("h", h, ndim=2)
    _check_coefficients("h", h, h.shape[1], f, g, group_size)


def _check_road_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], f: Tensor, g: Tensor,
                       group_size: int) -> None:
    _validate.tensor("weight", weight, ndim=2)
    _validate.same("x", x, "weight", weight)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight has in_features={weight.shape[1]} but x.shape[-1]={x.shape[1]}")
    if bias is not None:
        _validate.tensor("bias", bias, shape=(weight.shape[0],))
    _check_coefficients("x", x, weight.shape[0], f, g, group_size)


_ROAD_CPP_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _road_cpp_takes(h: Tensor, f: Tensor, g: Tensor, grad: Optional[Tensor] = None) -> bool:
    """True when csrc/road.cpp takes these tensors: CPU, h (and grad) in one of its dtypes, f and g
    in h's accumulation dtype (the op checks the same and raises; the torch path takes any mix)."""
    return (h.device.type == "cpu" and h.dtype in _ROAD_CPP_DTYPES and f.dtype == g.dtype == acc_dtype(h.dtype)
            and (grad is None or grad.dtype == h.dtype))


def _road_rotate_cpp(h: Tensor, f: Tensor, g: Tensor, group_size: int) -> Tensor:
    if not _road_cpp_takes(h, f, g):
        return _road_torch(h, f, g, group_size)
    from .. import _cpp
    _cpp.extension()   # loads csrc/, which registers torch.ops.fastadapt_cpu
    return torch.ops.fastadapt_cpu.road_rotate.default(h, f, g, group_size)


def _road_backward_cpp(grad: Tensor, h: Tensor, f: Tensor, g: Tensor, group_size: int,
                       need_h: bool) -> list[Tensor]:
    if not _road_cpp_takes(h, f, g, grad):
        return _road_backward_torch(grad, h, f, g, group_size, need_h)
    from .. import _cpp
    _cpp.extension()
    return torch.ops.fastadapt_cpu.road_rotate_backward.default(grad, h, f, g, group_size, need_h, _ROAD_ROWS)


@fused_op("road_rotate", autocast_keep=("f", "g"))
def road_rotate_op(h: Tensor, f: Tensor, g: Tensor, group_size: int) -> Tensor:
    """y_a = f_a h_a - g_a h_b, y_b = f_b h_b + g_b h_a for the pairs (a, a + group_size / 2)."""
    return _road_torch(h, f, g, group_size)


@road_rotate_op.impl("triton")
def _(h, f, g, group_size):
    if h.dtype == torch.float64:
        return _road_torch(h, f, g, group_size)
    from ..triton_kernels import butterfly as kernels
    return kernels.road_forward(h, f, g, group_size)


@road_rotate_op.impl("cpp")
def _(h, f, g, group_size):
    return _road_rotate_cpp(h, f, g, group_size)


@road_rotate_op.fake
def _(h, f, g, group_size):
    return h.new_empty(h.shape)


def _road_backward_torch(grad: Tensor, h: Tensor, f: Tensor, g: Tensor, group_size: int,
                         need_h: bool) -> list[Tensor]:
    """[dh (empty unless need_h), df, dg] of road_rotate: per step of rows, the products
    accumulate into per-row float32 partial sums (summed over rows once at the end)."""
    M, out = h.shape
    shape = _road_shape(out, group_size)
    fv, gv = f.view(shape), g.view(shape)
    rows = min(M, _ROAD_ROWS)
    df_rows = torch.zeros(rows, *shape, dtype=f.dtype, device=h.device)
    dg_rows = torch.zeros(rows, *shape, dtype=f.dtype, device=h.device)
    dh = torch.empty(M, out, dtype=h.dtype, device=h.device) if need_h else h.new_empty(0)
    tile = torch.empty(rows, *shape, dtype=f.dtype, device=h.device) if need_h and h.dtype != f.dtype else None
    for start in range(0, M, _ROAD_ROWS):
        dy, hv = grad[start:start + _ROAD_ROWS].unflatten(1, shape), h[start:start + _ROAD_ROWS].unflatten(1, shape)
        n = hv.shape[0]
        df_rows[:n].addcmul_(dy, hv)
        dg_rows[:n, :, 0].addcmul_(dy[:, :, 0], hv[:, :, 1], value=-1)
        dg_rows[:n, :, 1].addcmul_(dy[:, :, 1], hv[:, :, 0])
        if need_h:
            dhv = dh[start:start + n].view(n, *shape) if tile is None else tile[:n]
            torch.mul(dy, fv, out=dhv)
            dhv[:, :, 0].addcmul_(dy[:, :, 1], gv[:, 1])
            dhv[:, :, 1].addcmul_(dy[:, :, 0], gv[:, 0], value=-1)
            if tile is not None:
                dh[start:start + n].view(n, *shape).copy_(dhv)
    return [dh, df_rows.sum(0).view(out), dg_rows.sum(0).view(out)]


road_rotate_backward_op = fused_op("road_rotate_backward", autocast_keep=("f", "g"))(_road_backward_torch)


def _road_backward_triton(grad, h, f, g, group_size, need_h):
    if h.dtype == torch.float64:
        return _road_backward_torch(grad, h, f, g, group_size, need_h)
    from ..triton_kernels import butterfly as kernels
    dh, df, dg = kernels.road_backward(grad, h, f, g, group_size, need_h)
    return [h.new_empty(0) if dh is None else dh, df, dg]


road_rotate_backward_op.impl("triton")(_road_backward_triton)
road_rotate_backward_op.impl("cpp")(_road_backward_cpp)


@road_rotate_backward_op.fake
def _(grad, h, f, g, group_size, need_h):
    return [h.new_empty(h.shape) if need_h else h.new_empty(0), f.new_empty(f.shape), g.new_empty(g.shape)]


def _road_setup(ctx, inputs, output):
    h, f, g, group_size = inputs
    ctx.save_for_backward(h, f, g)
    ctx.group_size = group_size


def _road_backward(ctx, grad):
    h, f, g = ctx.saved_tensors
    need_h, need_f, need_g, _ = ctx.needs_input_grad
    if not (need_h or need_f or need_g):
        return None, None, None, None
    dh, df, dg = road_rotate_backward_op(grad, h, f, g, ctx.group_size, need_h)
    return (dh if need_h else None), (df if need_f else None), (dg if need_g else None), None


road_rotate_op.autograd(_road_backward, _road_setup)


@fused_op("road_linear", autocast_keep=("f", "g"))
def road_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], f: Tensor, g: Tensor,
                   group_size: int) -> tuple[Tensor, Tensor]:
    """(y, h): h = x W^T + b, y = road_rotate(h) (h returned for backward's df, dg)."""
    h = F.linear(x, weight, bias)
    return _road_torch(h, f, g, group_size), h


@road_linear_op.impl("triton")
def _(x, weight, bias, f, g, group_size):
    h = F.linear(x, weight, bias)
    if h.dtype == torch.float64:
        return _road_torch(h, f, g, group_size), h
    from ..triton_kernels import butterfly as kernels
    return kernels.road_forward(h, f, g, group_size), h


@road_linear_op.impl("cpp")
def _(x, weight, bias, f, g, group_size):
    h = F.linear(x, weight, bias)
    return _road_rotate_cpp(h, f, g, group_size), h


@road_linear_op.fake
def _(x, weight, bias, f, g, group_size):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], weight.shape[0])


def _road_linear_backward(rotate_backward, fold: bool, grad: Tensor, x: Tensor, weight: Tensor, h: Tensor, f: Tensor,
                          g: Tensor, group_size: int, need_x: bool, need_weight: bool, need_bias: bool,
                          need_coefficients: bool) -> list[Tensor]:
    """[dx, dW, db, df, dg] of road_linear (empty where not needed), with R the rotation (y = h R^T
    along the features); df, dg from dy and h through ``rotate_backward`` (road_rotate_backward's
    implementation).  ``fold`` (the torch path when in_features <= N, and any path while f and g
    are frozen): dh is never formed, dx = dy (R W) (the rotation on W's rows: out x in numbers in a
    few contiguous ops instead of an N x out pass of strided ones), dW = R^T (dy^T x),
    db = R^T sum_rows dy.  Otherwise (Triton: the df, dg kernel writes dh in the same pass over dy
    and h, and the GEMM reads dh instead of dy; R W would move as many bytes as dh at the GPU
    shapes, where out x in ~ N x out / 2) dx = dh W, dW = dh^T x, db = sum_rows dh."""
    def empty():   # a fresh one per output: a custom op's outputs must not alias each other
        return grad.new_empty(0)
    if fold or not need_coefficients:   # without the coefficients' gradients h is not saved
        dx = grad @ _road_pairs(weight, f, g, group_size, False).to(weight.dtype) if need_x else empty()
        dW = _road_pairs(grad.T @ x, f, g, group_size, True).to(weight.dtype) if need_weight else empty()
        db = (_road_pairs(grad.sum(0, dtype=f.dtype)[:, None], f, g, group_size, True)[:, 0] if need_bias
              else empty())
        df, dg = empty(), empty()
        if need_coefficients:
            _, df, dg = rotate_backward(grad, h, f, g, group_size, False)
        return [dx, dW, db, df, dg]
    dh, df, dg = rotate_backward(grad, h, f, g, group_size, True)
    return [dh @ weight if need_x else empty(), dh.T @ x if need_weight else empty(),
            dh.sum(0, dtype=f.dtype) if need_bias else empty(), df, dg]


def _road_folds(grad: Tensor, weight: Tensor) -> bool:
    """The CPU paths' choice: fold R into W when R W (out x in) is no larger than dh (N x out)."""
    return weight.shape[1] <= grad.shape[0]


@fused_op("road_linear_backward", autocast=False)
def road_linear_backward_op(grad: Tensor, x: Tensor, weight: Tensor, h: Tensor, f: Tensor, g: Tensor,
                            group_size: int, need_x: bool, need_weight: bool, need_bias: bool,
                            need_coefficients: bool) -> list[Tensor]:
    """[dx, dW, db (f's dtype), df, dg] of road_linear; x is empty unless need_weight, h unless
    need_coefficients."""
    return _road_linear_backward(_road_backward_torch, _road_folds(grad, weight), grad, x, weight, h, f, g, group_size,
                                 need_x, need_weight, need_bias, need_coefficients)


@road_linear_backward_op.impl("cpp")
def _(grad, x, weight, h, f, g, group_size, need_x, need_weight, need_bias, need_coefficients):
    return _road_linear_backward(_road_backward_cpp, _road_folds(grad, weight), grad, x, weight, h, f, g, group_size,
                                 need_x, need_weight, need_bias, need_coefficients)


@road_linear_backward_op.impl("triton")
def _(grad, x, weight, h, f, g, group_size, need_x, need_weight, need_bias, need_coefficients):
    return _road_linear_backward(_road_backward_triton, False, grad, x, weight, h, f,
                                 g, group_size, need_x, need_weight, need_bias, need_coefficients)


@road_linear_backward_op.fake
def _(grad, x, weight, h, f, g, group_size, need_x, need_weight, need_bias, need_coefficients):
    out, inp = weight.shape

    def empty():
        return grad.new_empty(0)
    return [grad.new_empty(grad.shape[0], inp) if need_x else empty(),
            weight.new_empty(out, inp) if need_weight else empty(), f.new_empty(out) if need_bias else empty(),
            f.new_empty(out) if need_coefficients else empty(), g.new_empty(out) if need_coefficients else empty()]


def _road_linear_setup(ctx, inputs, output):
    x, weight, bias, f, g, group_size = inputs
    keep_x, keep_h = weight.requires_grad, f.requires_grad or g.requires_grad
    ctx.save_for_backward(x if keep_x else None, weight, output[1] if keep_h else None, f, g)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)   # else backward receives an N x out zero gradient for h (a fill)
    ctx.group_size = group_size
    ctx.bias_dtype = None if bias is None else bias.dtype


def _road_linear_backward_autograd(ctx, grad, _grad_h):
    x, weight, h, f, g = ctx.saved_tensors
    need_x, need_weight, need_bias, need_f, need_g, _ = ctx.needs_input_grad
    need_bias = need_bias and ctx.bias_dtype is not None
    if grad is None or not (need_x or need_weight or need_bias or need_f or need_g):
        return None, None, None, None, None, None
    dx, dW, db, df, dg = road_linear_backward_op(
        grad, weight.new_empty(0) if x is None else x, weight, weight.new_empty(0) if h is None else h, f, g,
        ctx.group_size, need_x, need_weight, need_bias, need_f or need_g)
    return (dx if need_x else None, dW if need_weight else None, db.to(ctx.bias_dtype) if need_bias else None,
            df if need_f else None, dg if need_g else None, None)


road_linear_op.autograd(_road_linear_backward_autograd, _road_linear_setup)


def _road_example_args(dtype=torch.float32, seed=0):
    from ..testing import randn
    return (randn(5, 12, dtype=dtype, seed=seed, requires_grad=True),
            randn(12, dtype=acc_dtype(dtype), seed=seed + 1, requires_grad=True),
            randn(12, dtype=acc_dtype(dtype), seed=seed + 2, requires_grad=True), 6)


@road_rotate_op.example
def _():
    yield _road_example_args(), {}
    h, f, g, _ = _road_example_args(seed=3)
    yield (h.detach()[:, :8].requires_grad_(), f[:8].detach().requires_grad_(), g[:8].detach(), 4), {}


@road_rotate_backward_op.example
def _():
    from ..testing import randn
    h, f, g, gs = (t.detach() if isinstance(t, Tensor) else t for t in _road_example_args(seed=6))
    yield (randn(5, 12, dtype=torch.float32, seed=8), h, f, g, gs, True), {}


@road_linear_op.example
def _():
    from ..testing import randn
    x, f, g, gs = _road_example_args(seed=9)
    weight = randn(12, 12, dtype=torch.float32, seed=12)
    yield (x, weight, randn(12, dtype=torch.float32, seed=13, requires_grad=True), f, g, gs), {}
    yield (x.detach()[:, ::2].requires_grad_(), randn(8, 6, dtype=torch.float32, seed=14, requires_grad=True), None,
           f.detach()[:8], g.detach()[:8].requires_grad_(), 4), {}


@road_linear_backward_op.example
def _():
    from ..testing import randn
    x, f, g, gs = (t.detach() if isinstance(t, Tensor) else t for t in _road_example_args(seed=15))
    weight = randn(12, 12, dtype=torch.float32, seed=18)
    h = F.linear(x, weight)
    yield (randn(5, 12, dtype=torch.float32, seed=19), x, weight, h, f, g, gs, True, True, True, True), {}
    yield (randn(5, 12, dtype=torch.float32, seed=20), x[:0], weight, h, f, g, gs, True, False, False, True), {}


def road_rotate(h: Tensor, f: Tensor, g: Tensor, group_size: int) -> Tensor:
    """RoAd's rotation of h (..., out) with per-feature f = alpha cos(theta), g = alpha sin(theta)
    (:func:`road_coefficients`), f and g in float32 (float64 for a float64 h).  Differentiable."""
    _validate.tensor("h", h, min_ndim=1)
    h2d = h.reshape(-1, h.shape[-1])
    _check_road(h2d, f, g, group_size)
    return road_rotate_op(h2d, f, g, group_size).view(h.shape)


# ----------------------------------------------------------------------------------------------
# parameters -> the small tensors the ops take (differentiable torch on parameters only)

def boft_blocks(boft_R: Tensor) -> Tensor:
    """PEFT's BOFT blocks (I - S)(I + S)^{-1}, S = (A - A^T) / 2, for boft_R (m, n, b, b), in the
    accumulation dtype (float32; float64 for float64), through fastadapt.ops.cayley."""
    _validate.tensor("boft_R", boft_R, ndim=4)
    m, n, b, _ = boft_R.shape
    A = _compute(boft_R, acc_dtype(boft_R.dtype))
    if b == 1:  # 1 x 1 blocks: S = 0, the map is (1 - S) / (1 + S) = 1, kept on the graph (zero gradient)
        S = 0.5 * (A - A.transpose(-2, -1))
        return (1 - S) / (1 + S)
    rows, cols = torch.triu_indices(b, b, 1, device=A.device)
    packed = 0.5 * (A[..., rows, cols] - A[..., cols, rows])           # S's strict upper triangle
    return cayley_packed(packed.reshape(m * n, -1), b, transpose=True).view(m, n, b, b)


def goft_blocks(goft_theta: Tensor) -> Tensor:
    """Givens blocks [[cos, -sin], [sin, cos]] (L, d/2, 2, 2) of goft_theta (L, d/2)."""
    _validate.tensor("goft_theta", goft_theta, ndim=2)
    theta = _compute(goft_theta, acc_dtype(goft_theta.dtype))
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def hra_factors(hra_u: Tensor, apply_GS: bool) -> tuple[Tensor, Tensor]:
    """(U (1, d, r), K (1, r, r)) with x H^T = x (I - U K U^T) for PEFT's HRA:
    apply_GS=False: U = unit columns of hra_u, K = T^T, T^{-1} = I/2 + triu(U^T U, 1);
    apply_GS=True: U = Gram-Schmidt(hra_u) (PEFT's classical order), K = 2 I."""
    _validate.tensor("hra_u", hra_u, ndim=2)
    u = _compute(hra_u, acc_dtype(hra_u.dtype))
    r = u.shape[1]
    eye = torch.eye(r, dtype=u.dtype, device=u.device)
    if apply_GS:
        columns = []
        for i in range(r):
            col = u[:, i]
            for q in columns:
                col = col - (q @ col) * q
            columns.append(col / col.norm())
        return torch.stack(columns, 1).unsqueeze(0), (2 * eye).unsqueeze(0)
    U = u / u.norm(dim=0)
    T = torch.linalg.solve_triangular(torch.triu(U.T @ U, 1) + 0.5 * eye, eye, upper=True)
    return U.unsqueeze(0), T.T.unsqueeze(0)


def ether_factors(u: Tensor, v: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(U (n, b, k), K (1, k, k)) with x H = x (I - U K U^T): ETHER (v None) U = unit rows of u,
    K = 2; ETHER+ U = [unit u, unit v], K = diag(1, -1)."""
    _validate.tensor("ether_u", u, ndim=2)
    dtype = acc_dtype(u.dtype)
    units = [_compute(u, dtype)] + ([] if v is None else [_compute(v, dtype)])
    U = torch.stack([t / t.norm(dim=1, keepdim=True) for t in units], -1)
    K = torch.tensor([2.0], dtype=dtype, device=u.device) if v is None else torch.tensor([1.0, -1.0], dtype=dtype,
                                                                                          device=u.device)
    return U, torch.diag(K).unsqueeze(0)


ROAD_VARIANTS = ("road_1", "road_2", "road_4")


def road_coefficients(variant: str, group_size: int, road_theta: Tensor, road_alpha: Tensor) -> tuple[Tensor, Tensor]:
    """PEFT's per-output-feature (f, g) of RoAd in the accumulation dtype: road_1 one (theta, alpha)
    per pair, road_2 one per feature, road_4 f = alpha_1 cos(theta_1), g = alpha_2 sin(theta_2)."""
    if variant not in ROAD_VARIANTS:
        raise ValueError(f"variant={variant!r} is not a RoAd variant; valid choices: {list(ROAD_VARIANTS)}")
    dtype = acc_dtype(road_theta.dtype)
    theta, alpha = _compute(road_theta, dtype), _compute(road_alpha, dtype)
    half = group_size // 2
    if variant == "road_1":
        theta = theta.reshape(-1, 1, half).expand(-1, 2, half).reshape(-1)
        alpha = alpha.reshape(-1, 1, half).expand(-1, 2, half).reshape(-1)
    elif variant == "road_4":
        theta, alpha = theta.reshape(-1, 2, group_size), alpha.reshape(-1, 2, group_size)
        return ((alpha[:, 0] * torch.cos(theta[:, 0])).reshape(-1),
                (alpha[:, 1] * torch.sin(theta[:, 1])).reshape(-1))
    return alpha * torch.cos(theta), alpha * torch.sin(theta)


# ----------------------------------------------------------------------------------------------
# layers as functions of x and the parameters

def boft_linear(x: Tensor, boft_R: Tensor, boft_s: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                dropout=None, recompute: bool = False) -> Tensor:
    """PEFT's BOFT Linear: y = ((x R) W^T) o s + bias (bias not scaled), any n_butterfly_factor.

    dropout: PEFT's ``boft_dropout`` module (multiplicative block dropout), applied to the
    Cayley blocks as PEFT does, so its random draws are PEFT's own (identity blocks keep R
    orthogonal).  Saved: x, h = (x R) W^T when boft_s trains (2 x bytes(x) at in = out), and the
    small blocks; with ``recompute`` x and the blocks only, h formed again in backward (one more
    N x in x out GEMM: about +0.5 x the frozen layer's fwd+bwd)."""
    _validate.tensor("boft_R", boft_R, ndim=4)
    m, n, b, _ = boft_R.shape
    d = x.shape[-1]
    if n * b != d:
        raise ValueError(f"boft_R {tuple(boft_R.shape)} has {n} blocks of {b}; x has {d} features")
    blocks = boft_blocks(boft_R)
    if dropout is not None:
        blocks = dropout(blocks).to(blocks.dtype)
    chain = plan(d, b, m)
    pass_b = [_compute(B, acc_dtype(x.dtype)) for B in pass_blocks(blocks, chain)]
    return rotate_linear(x, pass_b, chain, weight, bias, boft_s.reshape(-1), recompute=recompute)


def goft_linear(x: Tensor, goft_theta: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """GOFT: y = (x R^T) W^T + bias, R = G_{L-1} ... G_0 (Givens butterflies of 2^L features)."""
    chain = goft_plan(x.shape[-1], goft_theta.shape[0])
    blocks = [_compute(B, acc_dtype(x.dtype)) for B in pass_blocks(goft_blocks(goft_theta), chain)]
    return rotate_linear(x, blocks, chain, weight, bias, transpose=True)


def goft_plan(d: int, n_stages: int) -> ButterflyPlan:
    """The chain of GOFT's ``n_stages`` Givens stages on d features (blocks of 2, pieces of 1)."""
    _validate.positive_int("n_stages", n_stages)
    return plan(d, 2, n_stages)


def hra_linear(x: Tensor, hra_u: Tensor, weight: Tensor, bias: Tensor | None = None, *,
               apply_GS: bool = False) -> Tensor:
    """PEFT's HRA Linear: y = (x H^T) W^T + bias in compact WY form (see :func:`hra_factors`)."""
    U, K = hra_factors(hra_u, apply_GS)
    return F.linear(householder(x, U, K), weight, bias)


def ether_linear(x: Tensor, ether_u: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                 ether_v: Tensor | None = None, ether_u_out: Tensor | None = None,
                 ether_v_out: Tensor | None = None) -> Tensor:
    """ETHER: y = (x H) W^T + bias; ETHER+ (ether_v given): y = ((x H+_in) W^T) H+_out + bias."""
    U, K = ether_factors(ether_u, ether_v)
    z = householder(x, U, K)
    if ether_v is None:
        return F.linear(z, weight, bias)
    U_out, K_out = ether_factors(ether_u_out, ether_v_out)
    y = householder(F.linear(z, weight), U_out, K_out)
    return y if bias is None else y + bias


def road_linear(x: Tensor, variant: str, group_size: int, road_theta: Tensor, road_alpha: Tensor,
                weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """PEFT's RoAd Linear: y = R (x W^T + bias) pairwise (the bias is rotated too)."""
    f, g = road_coefficients(variant, group_size, road_theta, road_alpha)
    _validate.tensor("x", x, min_ndim=1)
    x2d = x.reshape(-1, x.shape[-1])
    _check_road_linear(x2d, weight, bias, f, g, group_size)
    y, _ = road_linear_op(x2d, weight, bias, f, g, group_size)
    return y.view(*x.shape[:-1], weight.shape[0])

