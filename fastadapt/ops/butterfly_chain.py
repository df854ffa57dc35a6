"""Butterfly chains on activations: the ``butterfly_chain`` and ``butterfly_linear`` custom ops.

A chain is a list of passes (fastadapt.ops.butterfly_plan): pass k multiplies every group g of
``c = M H`` features (f = ((a M + m) L + l) H + r, g = a L + l) by its block, ``v_g <- v_g B_g``;
``C = P_0 P_1 ... P_{K-1}`` in application order.  Every algorithm here is written once over two
primitives of a backend (:class:`Passes`): ``rotate(v, B, geometry, out_dtype)`` (one pass, any
input strides and dtype, float32 / float64 blocks, fp32 accumulation) and ``grad(v, g, geometry)``
(``dB_g = v_g^T g_g`` summed over rows, in the blocks' dtype).  The torch backend runs batched
GEMMs, the triton backend fastadapt.triton_kernels.butterfly; the d x d GEMMs of
``butterfly_linear`` are torch's on every backend (cuBLAS on CUDA).

butterfly_chain(x, blocks, geometry) = x C.
    Saved: x.  Backward (any blocks): the inner passes' inputs v_k recomputed from x;
    g <- dy; for k = K-1 .. 0: dB_k = grad(v_k, g), g <- g P_k^T; dx = g.

butterfly_linear(x, blocks, geometry, W, s, b, weight_side, keep_pre) = (y, h) with
    h = (x C) W^T,  y = h o s + b  (s, b optional; h returned only with keep_pre, for ds).
    x side:      z = x C, h = z W^T.
    weight side: W_r = W C^T (the chain transposed on W's rows: out x d numbers, fewer than
                 x's when the rows N exceed out), h = x W_r^T; without keep_pre s is folded into
                 W_r and the bias into the GEMM (y straight from one GEMM).
    Saved: x, h when keep_pre (BOFT's trainable boft_s: ds = sum_rows dy o h needs it), and the
    parameters; never z, W_r or a d x d matrix.  With s trainable and keep_pre off (the recompute
    mode: saved x alone), backward forms h again by the forward's own ops (the same bits; one more
    N x d x out GEMM).
    Backward, with W_s = diag(s) W (s folded into the weight, not into an N x out dY o s):
      ds = sum_rows dy o h,  db = sum_rows dy;
      x side:      dz = dy W_s;  dx, dB as butterfly_chain's backward from dz;
                   dW = (dy o s)^T (x C) (only when W trains);
      weight side (orthogonal passes only: P_k^{-1} = P_k^T): dx = dy (W_s C^T) (one GEMM, no pass
                   over dz), and the gradient at pass k's output is dz P_{K-1}^T ... P_{k+1}^T =
                   dx P_0 ... P_k, so v and g both walk forward from (x, dx):
                   g <- dx; v <- x; for k: g <- g P_k, dB_k = grad(v, g), v <- v P_k.
                   One pass: dB_0 = grad(x, dx) B_0 (c x c products instead of rotating dx).
                   dW = ((dy o s)^T x) C (only when W trains).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _validate
from ._policy import acc_dtype
from ._registry import fused_op


def passes(geometry: list[int]) -> list[tuple[int, int, int, int]]:
    return [tuple(geometry[i:i + 4]) for i in range(0, len(geometry), 4)]


def reverse_geometry(geometry: list[int]) -> list[int]:
    return [v for p in reversed(passes(geometry)) for v in p]


def _compute(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _empty_like(t: Tensor) -> Tensor:
    return t.new_empty(0)


# ----------------------------------------------------------------------------------------------
# backends

class Passes(ABC):
    """A backend's primitives: the two of the module docstring, and BOFT's scale epilogue
    ``epilogue(h, s, b) = h o s + b`` with its gradients ``scale_grads(dy, h, need_bias) =
    (sum_rows dy o h, sum_rows dy or empty)`` (fp32 arithmetic; a float32 s on a half h rounds once, as PEFT's float32
    epilogue).  This base class is the torch implementation of the epilogue."""

    @abstractmethod
    def rotate(self, v: Tensor, B: Tensor, geometry, out_dtype: torch.dtype) -> Tensor:
        """One pass of v (N, d) with blocks B, the result in out_dtype."""

    @abstractmethod
    def grad(self, v: Tensor, g: Tensor, geometry) -> Tensor:
        """dB[g] = sum_rows v_g^T g_g, in the accumulation dtype."""

    def epilogue(self, h: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
        if scale.dtype == h.dtype and (bias is None or bias.dtype == h.dtype):
            return h * scale if bias is None else torch.addcmul(bias, h, scale)
        y = h.to(scale.dtype) * scale
        return (y if bias is None else y + bias).to(h.dtype)

    def scale_grads(self, dy: Tensor, h: Tensor, need_bias: bool) -> tuple[Tensor, Tensor]:
        acc = acc_dtype(dy.dtype)
        ds = torch.linalg.vecdot(_compute(dy, acc), _compute(h, acc), dim=0)
        return ds, dy.sum(0, dtype=acc) if need_bias else _empty_like(ds)


_GRAD_ROWS = 512  # rows per accumulation step of the block gradient (as the cayley family measured)


class TorchPasses(Passes):
    """Batched GEMMs: L = 1 passes are one bmm over contiguous blocks written through a strided view;
    L > 1 passes gather their blocks with one permuted copy each way."""

    def rotate(self, v, B, geometry, out_dtype):
        A, M, L, H = geometry
        N, d = v.shape
        c = M * H
        v = _compute(v, B.dtype)
        if L == 1:
            out = torch.empty(N, A, c, dtype=B.dtype, device=v.device)
            torch.bmm(v.unflatten(1, (A, c)).transpose(0, 1), B, out=out.transpose(0, 1))
            return _compute(out.view(N, d), out_dtype)
        grouped = v.unflatten(1, (A, M, L, H)).permute(1, 3, 0, 2, 4).reshape(A * L, N, c)
        out = torch.bmm(grouped, B).view(A, L, N, M, H).permute(2, 0, 3, 1, 4)
        return out.reshape(N, d) if out_dtype == B.dtype else out.to(out_dtype).reshape(N, d)

    def grad(self, v, g, geometry):
        A, M, L, H = geometry
        N = v.shape[0]
        c = M * H
        dtype = acc_dtype(v.dtype)
        grad = torch.zeros(A * L, c, c, dtype=dtype, device=v.device)
        for start in range(0, N, _GRAD_ROWS):
            vs = _compute(v[start:start + _GRAD_ROWS], dtype)
            gs = _compute(g[start:start + _GRAD_ROWS], dtype)
            n = vs.shape[0]
            if L == 1:
                grad.baddbmm_(vs.unflatten(1, (A, c)).permute(1, 2, 0), gs.unflatten(1, (A, c)).transpose(0, 1))
            else:
                grad.baddbmm_(vs.unflatten(1, (A, M, L, H)).permute(1, 3, 2, 4, 0).reshape(A * L, c, n),
                              gs.unflatten(1, (A, M, L, H)).permute(1, 3, 0, 2, 4).reshape(A * L, n, c))
        return grad


class TritonPasses(Passes):
    """fastadapt.triton_kernels.butterfly: one launch per pass, one per pass gradient (float64,
    which tl.dot lacks, runs the torch primitives)."""

    def rotate(self, v, B, geometry, out_dtype):
        if B.dtype == torch.float64:
            return TORCH.rotate(v, B, geometry, out_dtype)
        from ..triton_kernels import butterfly as kernels
        return kernels.butterfly_pass_forward(v, B, geometry, out_dtype)

    def grad(self, v, g, geometry):
        if v.dtype == torch.float64 or g.dtype != v.dtype:
            return TORCH.grad(v, g, geometry)
        from ..triton_kernels import butterfly as kernels
        return kernels.butterfly_pass_grad(v, g, geometry)

    def epilogue(self, h, scale, bias):
        if h.dtype == torch.float64:
            return super().epilogue(h, scale, bias)
        from ..triton_kernels import butterfly as kernels
        return kernels.scale_forward(h, scale, bias)

    def scale_grads(self, dy, h, need_bias):
        if h.dtype == torch.float64:
            return super().scale_grads(dy, h, need_bias)
        from ..triton_kernels import butterfly as kernels
        ds, db = kernels.scale_backward(dy, h)   # one pass gives both sums
        return ds, db if need_bias else _empty_like(ds)


TORCH = TorchPasses()
TRITON = TritonPasses()


# ----------------------------------------------------------------------------------------------
# algorithms, once for every backend

def chain(P: Passes, x: Tensor, blocks, geometry, out_dtype) -> Tensor:
    """x C; intermediate passes stay in the blocks' dtype."""
    v = x
    geoms = passes(geometry)
    for k, (B, geom) in enumerate(zip(blocks, geoms)):
        v = P.rotate(v, B, geom, out_dtype if k == len(geoms) - 1 else B.dtype)
    return v


def chain_transposed(P: Passes, x: Tensor, blocks, geometry, out_dtype) -> Tensor:
    """x C^T = x P_{K-1}^T ... P_0^T."""
    return chain(P, x, [B.transpose(-2, -1) for B in reversed(blocks)], reverse_geometry(geometry), out_dtype)


def chain_grads(P: Passes, x: Tensor, g: Tensor, blocks, geometry, need_x: bool):
    """(dx or None, [dB_k]) of x C for the gradient g at the output (any blocks)."""
    geoms = passes(geometry)
    inputs = [x]
    for B, geom in zip(blocks[:-1], geoms[:-1]):
        inputs.append(P.rotate(inputs[-1], B, geom, B.dtype))
    dblocks = [None] * len(blocks)
    for k in range(len(blocks) - 1, -1, -1):
        dblocks[k] = P.grad(inputs[k], g, geoms[k])
        if k or need_x:
            g = P.rotate(g, blocks[k].transpose(-2, -1), geoms[k], blocks[k].dtype if k else x.dtype)
    return (g if need_x else None), dblocks


def chain_grads_orthogonal(P: Passes, x: Tensor, dx: Tensor, blocks, geometry):
    """[dB_k] of x C from the gradient dx at the *input*, for orthogonal passes (module docstring)."""
    geoms = passes(geometry)
    if len(blocks) == 1:
        return [torch.bmm(P.grad(x, dx, geoms[0]), blocks[0])]
    dblocks = []
    v, g = x, dx
    for k, (B, geom) in enumerate(zip(blocks, geoms)):
        g = P.rotate(g, B, geom, B.dtype)
        dblocks.append(P.grad(v, g, geom))
        if k < len(blocks) - 1:
            v = P.rotate(v, B, geom, B.dtype)
    return dblocks


def _scale_rows(W: Tensor, scale: Optional[Tensor]) -> Tensor:
    """diag(s) W in W's dtype (a float32 s on a half W: the product in float32, rounded once)."""
    if scale is None:
        return W
    if scale.dtype == W.dtype:
        return W * scale[:, None]
    return (W.to(scale.dtype) * scale[:, None]).to(W.dtype)


def _pre_scale(P: Passes, x, blocks, geometry, weight, weight_side) -> Tensor:
    """h = (x C) W^T, as the forward forms it on either side."""
    if weight_side:
        return F.linear(x, chain_transposed(P, weight, blocks, geometry, weight.dtype))
    return F.linear(chain(P, x, blocks, geometry, x.dtype), weight)


def linear_forward(P: Passes, x, blocks, geometry, weight, scale, bias, weight_side, keep_pre):
    if keep_pre:
        h = _pre_scale(P, x, blocks, geometry, weight, weight_side)
        return P.epilogue(h, scale, bias), h
    if weight_side:
        Wr = chain_transposed(P, weight, blocks, geometry, weight.dtype)
        return F.linear(x, _scale_rows(Wr, scale), bias), _empty_like(x)
    z = chain(P, x, blocks, geometry, x.dtype)
    return F.linear(z, _scale_rows(weight, scale), bias), _empty_like(x)


def linear_backward(P: Passes, dy, x, blocks, geometry, weight, scale, pre, weight_side,
                    need_x, need_blocks, need_weight, need_scale, need_bias):
    if need_scale:   # pre = h, kept with keep_pre, else (the recompute mode) formed again here
        if pre.dim() != 2:
            pre = _pre_scale(P, x, blocks, geometry, weight, weight_side)
        ds, db = P.scale_grads(dy, pre, need_bias)
    else:
        ds, db = _empty_like(x), dy.sum(0, dtype=acc_dtype(dy.dtype)) if need_bias else _empty_like(x)
    Ws = _scale_rows(weight, scale)
    dx = dW = None
    dblocks = [None] * len(blocks)
    if weight_side:
        if need_x or need_blocks:
            dx = dy @ chain_transposed(P, Ws, blocks, geometry, weight.dtype)
        if need_blocks:
            dblocks = chain_grads_orthogonal(P, x, dx, blocks, geometry)
        if need_weight:
            dW = chain(P, _scale_rows(dy.T, scale) @ x, blocks, geometry, weight.dtype)
    else:
        if need_x or need_blocks:
            dx, dblocks = chain_grads(P, x, dy @ Ws, blocks, geometry, need_x)
        if need_weight:
            dW = _scale_rows(dy.T, scale) @ chain(P, x, blocks, geometry, x.dtype)
    return [dx if need_x else _empty_like(x), dW if need_weight else _empty_like(x), ds, db,
            *(dB if need_blocks else _empty_like(x) for dB in dblocks)]


# ----------------------------------------------------------------------------------------------
# checks (public functions call them before the ops)

def check_chain(x: Tensor, blocks: list[Tensor], geometry: list[int]) -> None:
    _validate.tensor("x", x, ndim=2)
    if not blocks or len(geometry) != 4 * len(blocks):
        raise ValueError(f"geometry must hold 4 numbers (A, M, L, H) per pass; got {len(geometry)} for "
                         f"{len(blocks)} pass block tensors")
    for k, (B, (A, M, L, H)) in enumerate(zip(blocks, passes(geometry))):
        _validate.tensor(f"blocks[{k}]", B, ndim=3)
        if A * M * L * H != x.shape[1] or tuple(B.shape) != (A * L, M * H, M * H):
            raise ValueError(f"blocks[{k}] has shape {tuple(B.shape)} and geometry (A, M, L, H) = {(A, M, L, H)}; "
                             f"x has {x.shape[1]} features: need A M L H = {x.shape[1]} and blocks (A L, M H, M H)")
        if B.dtype != acc_dtype(x.dtype) or B.device != x.device:
            raise TypeError(f"blocks[{k}] is {B.dtype} on {B.device}; x is {x.dtype} on {x.device}: pass blocks "
                            f"in {acc_dtype(x.dtype)} on x's device")


def check_linear(x: Tensor, blocks, geometry, weight: Tensor, scale: Optional[Tensor], bias: Optional[Tensor]):
    check_chain(x, blocks, geometry)
    _validate.tensor("weight", weight, ndim=2)
    _validate.same("x", x, "weight", weight)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight has in_features={weight.shape[1]} but x.shape[-1]={x.shape[1]}")
    for name, t in (("scale", scale), ("bias", bias)):
        if t is not None:
            _validate.tensor(name, t, shape=(weight.shape[0],))
            if t.dtype not in (x.dtype, torch.float32) or t.device != x.device:
                raise TypeError(f"{name} is {t.dtype} on {t.device}; pass it in x's dtype ({x.dtype}) or float32, "
                                "on x's device")


# ----------------------------------------------------------------------------------------------
# the ops

@fused_op("butterfly_chain")
def butterfly_chain_op(x: Tensor, blocks: list[Tensor], geometry: list[int]) -> Tensor:
    """x C for the passes ``geometry`` with pass blocks ``blocks`` (module docstring)."""
    return chain(TORCH, x, blocks, geometry, x.dtype)


@butterfly_chain_op.impl("triton")
def _(x, blocks, geometry):
    return chain(TRITON, x, blocks, geometry, x.dtype)


@butterfly_chain_op.fake
def _(x, blocks, geometry):
    return x.new_empty(x.shape)


@fused_op("butterfly_chain_backward")
def butterfly_chain_backward_op(grad: Tensor, x: Tensor, blocks: list[Tensor], geometry: list[int],
                                need_x: bool) -> list[Tensor]:
    """[dx (empty unless need_x), dB_0, ..., dB_{K-1}] of butterfly_chain."""
    dx, dblocks = chain_grads(TORCH, x, grad, blocks, geometry, need_x)
    return [_empty_like(x) if dx is None else dx, *dblocks]


@butterfly_chain_backward_op.impl("triton")
def _(grad, x, blocks, geometry, need_x):
    dx, dblocks = chain_grads(TRITON, x, grad, blocks, geometry, need_x)
    return [_empty_like(x) if dx is None else dx, *dblocks]


@butterfly_chain_backward_op.fake
def _(grad, x, blocks, geometry, need_x):
    return [x.new_empty(x.shape) if need_x else x.new_empty(0), *(B.new_empty(B.shape) for B in blocks)]


def _chain_setup(ctx, inputs, output):
    x, blocks, geometry = inputs
    ctx.save_for_backward(x, *blocks)
    ctx.geometry = geometry


def _chain_backward(ctx, grad):
    x, *blocks = ctx.saved_tensors
    need_x, need_blocks, _ = ctx.needs_input_grad
    if not need_x and not any(need_blocks):
        return None, [None] * len(blocks), None
    dx, *dblocks = butterfly_chain_backward_op(grad, x, blocks, ctx.geometry, need_x)
    return (dx if need_x else None), [dB if need else None for dB, need in zip(dblocks, need_blocks)], None


butterfly_chain_op.autograd(_chain_backward, _chain_setup)


@fused_op("butterfly_linear", autocast_keep=("scale", "bias"))
def butterfly_linear_op(x: Tensor, blocks: list[Tensor], geometry: list[int], weight: Tensor,
                        scale: Optional[Tensor], bias: Optional[Tensor], weight_side: bool,
                        keep_pre: bool) -> tuple[Tensor, Tensor]:
    """(y, h): y = ((x C) W^T) o s + b, h = (x C) W^T when keep_pre (else empty); module docstring."""
    return linear_forward(TORCH, x, blocks, geometry, weight, scale, bias, weight_side, keep_pre)


@butterfly_linear_op.impl("triton")
def _(x, blocks, geometry, weight, scale, bias, weight_side, keep_pre):
    return linear_forward(TRITON, x, blocks, geometry, weight, scale, bias, weight_side, keep_pre)


@butterfly_linear_op.fake
def _(x, blocks, geometry, weight, scale, bias, weight_side, keep_pre):
    y = x.new_empty(x.shape[0], weight.shape[0])
    return y, (x.new_empty(x.shape[0], weight.shape[0]) if keep_pre else x.new_empty(0))


@fused_op("butterfly_linear_backward", autocast=False)
def butterfly_linear_backward_op(grad: Tensor, x: Tensor, blocks: list[Tensor], geometry: list[int], weight: Tensor,
                                 scale: Optional[Tensor], pre: Tensor, weight_side: bool, need_x: bool,
                                 need_blocks: bool, need_weight: bool, need_scale: bool,
                                 need_bias: bool) -> list[Tensor]:
    """[dx, dW, ds, db, dB_0, ..., dB_{K-1}] of butterfly_linear (empty where not needed; ds and db
    in the accumulation dtype)."""
    return linear_backward(TORCH, grad, x, blocks, geometry, weight, scale, pre, weight_side,
                           need_x, need_blocks, need_weight, need_scale, need_bias)


@butterfly_linear_backward_op.impl("triton")
def _(grad, x, blocks, geometry, weight, scale, pre, weight_side, need_x, need_blocks, need_weight, need_scale,
      need_bias):
    return linear_backward(TRITON, grad, x, blocks, geometry, weight, scale, pre, weight_side,
                           need_x, need_blocks, need_weight, need_scale, need_bias)


@butterfly_linear_backward_op.fake
def _(grad, x, blocks, geometry, weight, scale, pre, weight_side, need_x, need_blocks, need_weight, need_scale,
      need_bias):
    def like(t, need):
        return t.new_empty(t.shape) if need else x.new_empty(0)
    acc = acc_dtype(grad.dtype)
    return [like(x, need_x), like(weight, need_weight),
            x.new_empty(weight.shape[0], dtype=acc) if need_scale else x.new_empty(0),
            x.new_empty(weight.shape[0], dtype=acc) if need_bias else x.new_empty(0),
            *(like(B, need_blocks) for B in blocks)]


def _linear_setup(ctx, inputs, output):
    x, blocks, geometry, weight, scale, bias, weight_side, keep_pre = inputs
    ctx.save_for_backward(x, weight, scale, output[1], *blocks)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)   # else backward receives an N x out zero gradient for h (a fill)
    ctx.geometry, ctx.weight_side, ctx.has_bias = geometry, weight_side, bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_backward(ctx, grad, _grad_pre):
    x, weight, scale, pre, *blocks = ctx.saved_tensors
    need_x, need_blocks, _, need_weight, need_scale, need_bias, _, _ = ctx.needs_input_grad
    need_blocks = any(need_blocks)
    need_bias = need_bias and ctx.has_bias
    need_scale = bool(need_scale) and scale is not None
    if grad is None or not (need_x or need_blocks or need_weight or need_scale or need_bias):
        return None, [None] * len(blocks), None, None, None, None, None, None
    dx, dW, ds, db, *dblocks = butterfly_linear_backward_op(
        grad, x, blocks, ctx.geometry, weight, scale, pre, ctx.weight_side, need_x, need_blocks, need_weight,
        need_scale, need_bias)
    return (dx if need_x else None, [dB if need_blocks else None for dB in dblocks], None,
            dW if need_weight else None, ds.to(scale.dtype) if need_scale else None,
            db.to(ctx.bias_dtype) if need_bias else None, None, None)


butterfly_linear_op.autograd(_linear_backward, _linear_setup)


# ----------------------------------------------------------------------------------------------
# opcheck examples

def _example_chain(dtype=torch.float32, seed=0):
    """(x, pass blocks, geometry) of a two-pass BOFT chain (24 features, b = 4, m = 2, passes of
    width 4: the first has L = 2)."""
    from ..testing import randn
    from .butterfly import boft_blocks
    from .butterfly_plan import pass_blocks, plan
    chain_plan = plan(24, 4, 2, max_width=4, min_width=4)
    blocks = pass_blocks(boft_blocks(randn(2, 6, 4, 4, scale=0.3, seed=seed)), chain_plan)
    blocks = [B.to(acc_dtype(dtype)).detach().requires_grad_() for B in blocks]
    return randn(5, 24, dtype=dtype, seed=seed + 1, requires_grad=True), blocks, chain_plan.geometry()


@butterfly_chain_op.example
def _():
    from ..testing import randn
    yield _example_chain(), {}
    x, _, _ = _example_chain(seed=3)   # a strided x; one pass of 6 blocks of 2
    yield (x.detach()[:, ::2].requires_grad_(), [randn(6, 2, 2, dtype=torch.float32, seed=4, requires_grad=True)],
           [6, 1, 1, 2]), {}


@butterfly_chain_backward_op.example
def _():
    from ..testing import randn
    x, blocks, geometry = _example_chain(seed=5)
    yield (randn(5, 24, dtype=torch.float32, seed=9), x.detach(), [B.detach() for B in blocks], geometry, True), {}


@butterfly_linear_op.example
def _():
    from ..testing import randn
    for weight_side, keep_pre, seed in ((False, True, 1), (True, True, 2), (True, False, 3)):
        x, blocks, geometry = _example_chain(seed=seed)
        weight = randn(7, 24, dtype=torch.float32, seed=seed + 10)
        scale = randn(7, dtype=torch.float32, seed=seed + 11, requires_grad=keep_pre)  # h is kept when s trains
        bias = randn(7, dtype=torch.float32, seed=seed + 12, requires_grad=True)
        yield (x, blocks, geometry, weight, scale, bias, weight_side, keep_pre), {}


@butterfly_linear_backward_op.example
def _():
    from ..testing import randn
    x, blocks, geometry = (t.detach() if isinstance(t, Tensor) else t for t in _example_chain(seed=7))
    blocks = [B.detach() for B in blocks]
    weight, scale = randn(7, 24, dtype=torch.float32, seed=21), randn(7, dtype=torch.float32, seed=22)
    _, pre = linear_forward(TORCH, x, blocks, geometry, weight, scale, None, False, True)
    yield (randn(5, 7, dtype=torch.float32, seed=23), x, blocks, geometry, weight, scale, pre, False,
           True, True, True, True, True), {}
