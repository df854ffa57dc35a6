"""DoRA's fused linear ops (PEFT's ``lora.Linear`` with ``use_dora``), on 2-D x (N, in).

Notation: W (out, in) frozen, A = lora_A (r, in), B = lora_B (out, r), m (out,) the magnitude,
s the scaling, n (out,) the detached norm ||W + s B A||_row (``fastadapt::dora_weight_norm``),
g = m / n, x_d = mask o x (dropout), u = x_d A^T (N, r).  Two ops, one per algorithm:

``fastadapt::dora_linear`` (no dropout):
    y_pre = x W^T + s u B^T,     y = g o y_pre + b
``fastadapt::dora_linear_dropout`` (PEFT corrects the base output of the un-dropped x: two GEMMs
with W):
    y_pre = x_d W^T + s u B^T,   y = x W^T + b + (g - 1) o x_d W^T + g o s u B^T
each with its backward op (dY (N, out)):
    v   = dY (s g o B)                                   (N, r)
    dx  = v A + dY (g o W)                               no dropout
    dx  = dY W + mask o (v A + dY ((g - 1) o W))         dropout
    dA  = v^T x_d,    P = u^T dY (r, out),    dB = (s g) o P^T,    db = colsum(dY)
    dm  = colsum(dY o y_pre) / n                          (n is a constant, as in PEFT)
v, P and dm's column sum come from one read of dY (``row_pass``: the CPU row-block loop, or one
Triton kernel; the cpp backend below: one pass over dY for the thin products and the sum).

Saved for backward (besides parameters, buffers and the norm): x, u and y_pre: 2 + r/in times
bytes(x) for float32 x, u (N, r) being float32 on a half x.  ``recompute=True`` saves x and u
only (1 + r/in) and backward recomputes y_pre's column sum from x W^T in row blocks (one more
GEMM with W), its low-rank half from P: colsum(dY o s u B^T)_j = s sum_k B_jk P_kj.  With
dropout the mask is not saved: a Philox seed (a CPU scalar) regenerates it, or nn.Dropout's bits
(1 bit per element, 1/32 of bytes(x) for float32) are kept; on float32 / float64 the op keeps x_d
instead of x (the same bytes: dA and recompute read it, only dx regenerates the mask), on a half
base x itself (dA = v^T (mask o fl32(x)), exact, as PEFT's float32 x_d).  Gradients are never
written into saved tensors; y_pre being saved (not the output), the output may be modified in
place.

Precision.  float32 / float64 run in their own dtype.  A float16 / bfloat16 base (x, W, b) keeps
the adapter path in float32 whatever the adapter's dtype (PEFT's default float32 adapter, or one
in the base dtype): u, v, P, g and the sums are float32, every GEMM with W runs in the half dtype
and is rounded where PEFT's half GEMM rounds it, then the float32 low-rank term joins and the
output is rounded once (fl_h: rounding to the half dtype, fl32: exact conversion):
    y  = fl_h(g o (fl32(fl_h(x W^T)) + s u B^T) + b),    y_pre saved as fl_h of its float32 value
    dx = fl_h(fl32(fl_h(fl_h(fl32(dY) o g) W)) + v A)
with dropout (half):
    u  = (mask o fl32(x)) A^T,    B0 = fl32(fl_h(fl_h(mask o x) W^T))
    y  = fl_h((fl32(fl_h(x W^T + b)) - B0) + g o (B0 + s u B^T))
    dx = fl_h(fl32(fl_h(dY W)) + mask o (fl32(fl_h(fl_h(fl32(dY) o (g - 1)) W)) + v A))
On float32 / float64 the dropout forward takes the cheaper y = x W^T + b + s u B^T + (g - 1) o y_pre
(no x - x_d tensor, no residual pass).  g is never folded into a half W.

Backends.  Each op's body is written once against a kernel set (``DoraKernels``): the torch set
(CPU: BLAS with the base GEMM accumulating onto the low-rank term, the row-block loop of
dora_norm_rows) and the Triton set (the fused GEMM with g, the bias and y_pre in its epilogue;
float32 products of half tiles converted on load with the Philox mask applied in-kernel; the row
pass kernel), registered as the op's "torch" and "triton" implementations.  No call on the
triton backend synchronizes with the device.

``dora_linear_backward``'s "cpp" backend (CPU) runs the thin products in csrc/lora.cpp, LoRA's
pass over 128-row chunks given B' = s g o B and scaling 1: v = dY B' (as its t), v A, dA = v^T x,
P^T = (u^T dY)^T and, with y_pre saved, colsum(dY o y_pre) from the same chunk of dY while it sits
in L2 (partials summed in a fixed chunk order: the bits do not depend on the thread count); then
dx = (v A) + dY (g o W) by one addmm_ into that buffer (W's rows scaled once, as the torch set's
k_scale), dB = (s g) o P^T.  Recompute: the colsum from x W^T in row blocks plus s sum_k B_jk P_kj,
as the torch set.  It takes float32 / float64 in one dtype with rank >= 2 on an AVX-512 CPU; the
rest (half dtypes, rank 1, column-strided views, no compiler) runs the torch body, as does the
dropout op.  Saved tensors are the same.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..testing import randn
from . import _lowrank_gemm as gemm
from ._lowrank_gemm import cast
from ._dropout_mask import DropoutMask
from ._policy import HALF_DTYPES, acc_dtype
from ._registry import fused_op
from .dora_norm_rows import colsum_product_linear, dy_row_pass


class DoraKernels(NamedTuple):
    """One backend's primitives for DoRA: the shared GEMM set and DoRA's row pass over dY."""

    gemm: gemm.Kernels
    row_pass: Callable


def _triton_row_pass(dy, u, b_scaled, y_pre):
    if dy.dtype == torch.float64:
        return dy_row_pass(dy, u, b_scaled, y_pre)
    from ..triton_kernels import dora_norm as kernels
    return kernels.dora_dy_row_pass(dy, u, b_scaled, y_pre)


TORCH = DoraKernels(gemm.TORCH, dy_row_pass)


@functools.lru_cache(maxsize=None)
def _triton() -> DoraKernels:
    return DoraKernels(gemm.triton(), _triton_row_pass)


# Adapter tensors stay as they are under torch.autocast: the ops take x, W and b in the autocast
# dtype with a float32 adapter, as PEFT's default float32 adapter on a half base.
_AUTOCAST_KEEP = ("lora_A", "lora_B", "magnitude", "norm")


# ----------------------------------------------------------------------------------------------
# Bodies (k: the kernel set)

def _forward(k: DoraKernels, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, recompute):
    g = cast(magnitude, norm.dtype) / norm                               # acc dtype: float32 / float64
    u = k.gemm.acc_matmul(x, lora_A.T)                                # x A^T
    b_s = (cast(lora_B, norm.dtype) * scaling).T
    out = k.gemm.lowrank_gemm(x, weight.T, u, b_s, out_scale=g, bias=bias, with_pre=not recompute,
                              round_base=True)
    return [out, u] if recompute else [out[0], u, out[1]]


def _forward_dropout(k: DoraKernels, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, recompute, p,
                     seed, bits):
    mask = DropoutMask(p, seed, bits, lora_A.dtype)                  # PEFT drops x cast to the adapter dtype
    g = cast(magnitude, norm.dtype) / norm
    b_s = (cast(lora_B, norm.dtype) * scaling).T
    if x.dtype in HALF_DTYPES:  # PEFT's rounding points: the residual epilogue; x kept, the mask regenerated
        u = k.gemm.acc_matmul(x, lora_A.T, mask_a=mask)              # (mask o fl32(x)) A^T
        out = k.gemm.lowrank_gemm(mask.apply(x), weight.T, u, b_s, out_scale=g, with_pre=not recompute,
                                  round_base=True, residual=F.linear(x, weight, bias))
        return [out, u] if recompute else [out[0], u, out[1]]
    x_d = mask.apply(x)                                               # kept for backward instead of x
    u = k.gemm.acc_matmul(x_d, lora_A.T)
    y_pre = k.gemm.lowrank_gemm(x_d, weight.T, u, b_s)                # x_d W^T + s u B^T
    y = k.gemm.lowrank_gemm(x, weight.T, u, b_s, bias=bias).addcmul_(y_pre, g - 1)  # x W^T + b + s u B^T + (g-1) o y_pre
    return [y, u, x_d] if recompute else [y, u, y_pre, x_d]


def _dy_pass(k: DoraKernels, dy, u, lora_B, s_g, scaling, y_pre, x_or_dropped, weight):
    """(v, P, colsum(dY o y_pre)) from one read of dY; recompute (y_pre None): x W^T in row
    blocks for the colsum, its low-rank half s sum_k B_jk P_kj."""
    b_s = cast(lora_B, s_g.dtype) * s_g[:, None]
    if y_pre is not None:
        return k.row_pass(dy, u, b_s, y_pre)
    v = k.gemm.acc_matmul(dy, b_s)
    u_t_dy = k.gemm.acc_matmul(u.T, dy)
    dot = colsum_product_linear(dy, x_or_dropped(), weight, s_g.dtype)
    return v, u_t_dy, dot + scaling * (cast(lora_B, s_g.dtype) * u_t_dy.T).sum(dim=1)


def _param_grads(k: DoraKernels, needs, dy, x, v, u_t_dy, dot, lora_A, lora_B, magnitude, norm, s_g, mask=None):
    """[dA, dB, dm, db] (empty where not needed; dA from x and the mask)."""
    d_a = cast(k.gemm.acc_matmul(v.T, x, mask_b=mask), lora_A.dtype) if needs[1] else dy.new_empty(0)
    return _grads_given_d_a(needs, dy, d_a, u_t_dy.T, dot, lora_B, magnitude, norm, s_g)


def _grads_given_d_a(needs, dy, d_a, p_t, dot, lora_B, magnitude, norm, s_g):
    """[dA, dB, dm, db] from dA, P^T (out, r) and the colsum (empty where not needed)."""
    empty = dy.new_empty   # a distinct tensor per output: outputs may not alias
    d_b = cast(p_t * s_g[:, None], lora_B.dtype).contiguous() if needs[2] else empty(0)
    d_m = cast(dot / norm, magnitude.dtype) if needs[3] else empty(0)
    d_bias = dy.sum(dim=0) if needs[4] else empty(0)
    return [d_a, d_b, d_m, d_bias]


def _backward(k: DoraKernels, dy, x, weight, bias, lora_A, lora_B, magnitude, norm, u, y_pre, scaling, needs):
    g = cast(magnitude, norm.dtype) / norm
    s_g = scaling * g
    v, u_t_dy, dot = _dy_pass(k, dy, u, lora_B, s_g, scaling, y_pre, lambda: x, weight)
    dx = (k.gemm.lowrank_gemm(dy, weight, v, cast(lora_A, norm.dtype), k_scale=g, round_base=True)  # v A + dY (g o W)
          if needs[0] else dy.new_empty(0))
    return [dx, *_param_grads(k, needs, dy, x, v, u_t_dy, dot, lora_A, lora_B, magnitude, norm, s_g)]


def _backward_dropout(k: DoraKernels, dy, x, weight, bias, lora_A, lora_B, magnitude, norm, u, y_pre, scaling,
                      p, seed, bits, dropped, needs):
    """``dropped``: x is x_d already (float32 / float64); otherwise the mask is applied to x again."""
    mask = DropoutMask(p, seed, bits, lora_A.dtype)
    g = cast(magnitude, norm.dtype) / norm
    s_g = scaling * g
    v, u_t_dy, dot = _dy_pass(k, dy, u, lora_B, s_g, scaling, y_pre, lambda: x if dropped else mask.apply(x), weight)
    dx = dy.new_empty(0)
    if needs[0]:  # dY W + mask o (v A + dY ((g - 1) o W)), the inner term in the accumulation dtype
        inner = k.gemm.lowrank_gemm(dy, weight, v, cast(lora_A, norm.dtype), k_scale=g - 1, round_base=True,
                                    out_dtype=norm.dtype)
        dx = mask.add_(dy @ weight, inner)
        del inner
    return [dx, *_param_grads(k, needs, dy, x, v, u_t_dy, dot, lora_A, lora_B, magnitude, norm, s_g,
                              None if dropped else mask)]


# ----------------------------------------------------------------------------------------------
# fastadapt::dora_linear

@fused_op("dora_linear", autocast_keep=_AUTOCAST_KEEP)
def dora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                   magnitude: Tensor, norm: Tensor, scaling: float, recompute: bool) -> list[Tensor]:
    """[y, u, y_pre] ([y, u] with recompute) of DoRA without dropout (module docstring)."""
    return _forward(TORCH, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, recompute)


@dora_linear_op.impl("triton")
def _(*args):
    return _forward(_triton(), *args)


def _forward_fake(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, recompute):
    n, out_features, r = x.shape[0], weight.shape[0], lora_A.shape[0]
    y = x.new_empty(n, out_features)
    u = x.new_empty(n, r, dtype=torch.promote_types(acc_dtype(x.dtype), acc_dtype(lora_A.dtype)))
    return [y, u] if recompute else [y, u, x.new_empty(n, out_features)]


dora_linear_op.fake(_forward_fake)


@fused_op("dora_linear_backward", autocast=False)
def dora_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                            lora_B: Tensor, magnitude: Tensor, norm: Tensor, u: Tensor, y_pre: Optional[Tensor],
                            scaling: float, needs: list[bool]) -> list[Tensor]:
    """[dx, dA, dB, dm, db] of ``dora_linear`` (``needs``: which of them; the others are empty)."""
    return _backward(TORCH, dy, x, weight, bias, lora_A, lora_B, magnitude, norm, u, y_pre, scaling, needs)


@dora_linear_backward_op.impl("triton")
def _(*args):
    return _backward(_triton(), *args)


# Rows per chunk of the C++ pass (csrc/lora.cpp): dY, x and y_pre panels of 128 rows sit in L2.
_CPP_CHUNK_ROWS = 128


def _cpp_serves(dy, x, weight, lora_A, lora_B, magnitude, norm, u, y_pre, needs) -> bool:
    """True when csrc/lora.cpp takes this backward (``gemm.thin_pass_takes``, y_pre a row tensor
    too): dx, dA, dB or dm wanted."""
    pre = () if y_pre is None else (y_pre,)
    return any(needs[:4]) and gemm.thin_pass_takes(lora_A.shape[0], (dy, x, *pre),
                                                  (weight, lora_A, lora_B, magnitude, norm, u))


@dora_linear_backward_op.impl("cpp")
def _(dy, x, weight, bias, lora_A, lora_B, magnitude, norm, u, y_pre, scaling, needs):
    if not _cpp_serves(dy, x, weight, lora_A, lora_B, magnitude, norm, u, y_pre, needs):
        return _backward(TORCH, dy, x, weight, bias, lora_A, lora_B, magnitude, norm, u, y_pre, scaling, needs)
    g = magnitude / norm
    s_g = scaling * g
    recompute_dot = needs[3] and y_pre is None   # the colsum's low-rank half from P
    dx, d_a, p_t, dot = torch.ops.fastadapt_cpu.lora_backward_thin(
        dy, x, u, lora_B * s_g[:, None], lora_A, 1.0, needs[0], needs[1], needs[2] or recompute_dot,
        _CPP_CHUNK_ROWS, y_pre if needs[3] else None)
    if needs[0]:
        dx.addmm_(dy, weight * g[:, None])   # dY (g o W) onto v A (beta = 1), as the torch set's lowrank_gemm
    if recompute_dot:
        dot = colsum_product_linear(dy, x, weight, dy.dtype) + scaling * (lora_B * p_t).sum(dim=1)
    return [dx, *_grads_given_d_a(needs, dy, d_a, p_t, dot, lora_B, magnitude, norm, s_g)]


def _backward_fake(dy, x, weight, bias, lora_A, lora_B, magnitude, norm, u, y_pre, scaling, *rest):
    needs = rest[-1]
    shapes = [(x, x.shape), (lora_A, lora_A.shape), (lora_B, lora_B.shape), (magnitude, magnitude.shape),
              (dy, dy.shape[1:])]
    return [like.new_empty(shape) if need else dy.new_empty(0) for (like, shape), need in zip(shapes, needs)]


dora_linear_backward_op.fake(_backward_fake)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, recompute = inputs
    _, u, *pre = output
    ctx.mark_non_differentiable(u, *pre)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, bias, lora_A, lora_B, magnitude, norm, u, pre[0] if pre else None)
    ctx.scaling = scaling


def _needs(ctx) -> list[bool]:
    """needs_input_grad in the backward ops' order: x, lora_A, lora_B, magnitude, bias."""
    n = ctx.needs_input_grad
    return [n[0], n[3], n[4], n[5], n[2]]


def _grads_for_inputs(grads, needs, extra_inputs: int):
    dx, d_a, d_b, d_m, d_bias = (g if need else None for g, need in zip(grads, needs))
    return (dx, None, d_bias, d_a, d_b, d_m, None, None, None, *(None,) * extra_inputs)


def _backward_entry(ctx, grads):
    dy, needs = grads[0], _needs(ctx)
    if dy is None or not any(needs):
        return (None,) * 9
    x, weight, bias, lora_A, lora_B, magnitude, norm, u, y_pre = ctx.saved_tensors
    out = dora_linear_backward_op(dy, x, weight, bias, lora_A, lora_B, magnitude, norm, u, y_pre, ctx.scaling,
                                  needs)
    return _grads_for_inputs(out, needs, 0)


dora_linear_op.autograd(_backward_entry, _setup_context)


# ----------------------------------------------------------------------------------------------
# fastadapt::dora_linear_dropout

@fused_op("dora_linear_dropout", autocast_keep=_AUTOCAST_KEEP)
def dora_linear_dropout_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                           magnitude: Tensor, norm: Tensor, scaling: float, recompute: bool, p: float,
                           seed: Optional[Tensor], bits: Optional[Tensor]) -> list[Tensor]:
    """[y, u, y_pre] ([y, u] with recompute), then x_d on float32 / float64 (kept for backward
    instead of x), of DoRA with dropout p; the mask: Philox of ``seed`` or nn.Dropout's ``bits``
    drawn on x cast to the adapter dtype (module docstring)."""
    return _forward_dropout(TORCH, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, recompute, p, seed,
                            bits)


@dora_linear_dropout_op.impl("triton")
def _(*args):
    return _forward_dropout(_triton(), *args)


@dora_linear_dropout_op.fake
def _(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, recompute, p, seed, bits):
    out = _forward_fake(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, recompute)
    return out if x.dtype in HALF_DTYPES else [*out, torch.empty_like(x, memory_format=torch.contiguous_format)]


@fused_op("dora_linear_dropout_backward", autocast=False)
def dora_linear_dropout_backward_op(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                                    lora_B: Tensor, magnitude: Tensor, norm: Tensor, u: Tensor,
                                    y_pre: Optional[Tensor], scaling: float, p: float, seed: Optional[Tensor],
                                    bits: Optional[Tensor], dropped: bool, needs: list[bool]) -> list[Tensor]:
    """[dx, dA, dB, dm, db] of ``dora_linear_dropout`` (the mask regenerated from the seed or unpacked;
    ``dropped``: ``x`` is the forward's x_d)."""
    return _backward_dropout(TORCH, dy, x, weight, bias, lora_A, lora_B, magnitude, norm, u, y_pre, scaling, p,
                             seed, bits, dropped, needs)


@dora_linear_dropout_backward_op.impl("triton")
def _(*args):
    return _backward_dropout(_triton(), *args)


dora_linear_dropout_backward_op.fake(_backward_fake)


def _setup_context_dropout(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, recompute, p, seed, bits = inputs
    _, u, *rest = output                        # [y_pre] unless recompute, then [x_d] on float32 / float64
    ctx.dropped = x.dtype not in HALF_DTYPES
    ctx.mark_non_differentiable(u, *rest)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(rest[-1] if ctx.dropped else x, weight, bias, lora_A, lora_B, magnitude, norm, u,
                          None if recompute else rest[0], seed, bits)
    ctx.scaling, ctx.p = scaling, p


def _backward_dropout_entry(ctx, grads):
    dy, needs = grads[0], _needs(ctx)
    if dy is None or not any(needs):
        return (None,) * 12
    x, weight, bias, lora_A, lora_B, magnitude, norm, u, y_pre, seed, bits = ctx.saved_tensors
    out = dora_linear_dropout_backward_op(dy, x, weight, bias, lora_A, lora_B, magnitude, norm, u, y_pre,
                                          ctx.scaling, ctx.p, seed, bits, ctx.dropped, needs)
    return _grads_for_inputs(out, needs, 3)


dora_linear_dropout_op.autograd(_backward_dropout_entry, _setup_context_dropout)


# ----------------------------------------------------------------------------------------------
# opcheck examples: float64, float32 (recompute, strided x), and a float32 adapter on a bfloat16
# base; dropout with a Philox seed and with nn.Dropout's bits.

def _example_inputs(dtype, adapter_dtype, *, n=5, d_in=7, d_out=6, r=3, bias=True, grad=True, seed=0):
    x = randn(n, d_in, dtype=dtype, requires_grad=grad, seed=seed)
    weight = randn(d_out, d_in, dtype=dtype, scale=0.4, seed=seed + 1)
    b = randn(d_out, dtype=dtype, requires_grad=grad, seed=seed + 2) if bias else None
    lora_A = randn(r, d_in, dtype=adapter_dtype, scale=0.4, requires_grad=grad, seed=seed + 3)
    lora_B = randn(d_out, r, dtype=adapter_dtype, scale=0.4, requires_grad=grad, seed=seed + 4)
    magnitude = randn(d_out, dtype=adapter_dtype, requires_grad=grad, seed=seed + 5)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    norm = randn(d_out, dtype=acc, seed=seed + 6).abs() + 0.5
    return x, weight, b, lora_A, lora_B, magnitude, norm


def _examples(dropout: bool):
    from .dropout import draw_dropout
    for i, (dtype, adapter_dtype, recompute, bias) in enumerate(
            [(torch.float64, torch.float64, False, True), (torch.float32, torch.float32, True, False),
             (torch.bfloat16, torch.float32, False, True)]):
        x, *rest = _example_inputs(dtype, adapter_dtype, bias=bias, seed=10 * i)
        if i == 1:
            x = x.detach().T.contiguous().T.requires_grad_()  # strided x
        args = (x, *rest, 1.5, recompute)
        if not dropout:
            yield args, {}
            continue
        yield (*args, 0.25, torch.tensor(1234 + i), None), {}
        torch.manual_seed(i)
        yield (*args, 0.25, None, draw_dropout(x.detach().to(adapter_dtype), 0.25)[1]), {}


def _backward_examples(dropout: bool):
    for (x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, recompute, *mask), _ in _examples(dropout):
        forward = dora_linear_dropout_op if dropout else dora_linear_op
        with torch.no_grad():
            _, u, *rest = forward(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, recompute, *mask)
        dropped = dropout and x.dtype not in HALF_DTYPES
        kept = rest[-1] if dropped else x
        dy = randn(x.shape[0], weight.shape[0], dtype=x.dtype, seed=99)
        inputs = [t.detach() if isinstance(t, torch.Tensor) else t
                  for t in (dy, kept, weight, bias, lora_A, lora_B, magnitude, norm, u,
                            None if recompute else rest[0], scaling)]
        flags = [dropped] if dropout else []
        yield (*inputs, *mask, *flags, [True, True, True, True, bias is not None]), {}
        yield (*inputs, *mask, *flags, [False, True, False, True, False]), {}


dora_linear_op.example(lambda: _examples(False))
dora_linear_dropout_op.example(lambda: _examples(True))
dora_linear_backward_op.example(lambda: _backward_examples(False))
dora_linear_dropout_backward_op.example(lambda: _backward_examples(True))
