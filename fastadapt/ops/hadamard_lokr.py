"""LoKr's fused ops on 2-D x (N, I): ``fastadapt::lokr_linear`` and its backward, never a kron(w1, w2).

Notation: W (O, I) frozen, bias (O,) or None, w1 (a, c), w2 (b, d) with O = a b, I = c d (PEFT's
factored w1 = w1_a w1_b or w2 = w2_a w2_b is formed before the op, an a x c or b x d product, so its
gradient is autograd's), s = alpha / r.  dW = s kron(w1, w2), dW[p b + q, u d + v] = s w1[p, u] w2[q, v].
Folding a row x (I,) into X (c, d), X[u, v] = x[u d + v], and a row of y (O,) into (a, b)::

    y_t  = x_t W^T + b + s vec(w1 X_t w2^T)
    dx_t = dY_t W + s vec(w1^T dY_t w2)          (dY_t folded into (a, b))
    d w1 = s sum_t (dY_t w2) X_t^T = s sum_t V_t X_t^T,       V_t = dY_t w2 (a, d)
    d w2 = s sum_t (w1^T dY_t)^T X_t = s sum_t Q_t^T X_t,      Q_t = w1^T dY_t (c, b)

The forward and dx run one of two ways, chosen per shape by :func:`lokr_plan`:

"reshape" (reshape and matmul): Z = X w2^T is one (N c, d) x (d, b) GEMM and w1 Z_t one batched
(a, c) x (c, b) product; the base GEMM takes s times that term as its beta input (y written once),
or, on a half base, the half base product is rounded where PEFT's is and the float32 term joins it
(PEFT's rounding points).  dx likewise from Q, which d w2 then reuses.  2 N (c d b + a c b) FLOPs
per direction beside the layer's 2 N O I.
"tiles" (the merged weight where the GEMM uses it): y = x (W + s kron(w1, w2))^T + b and
dx = dY (W + s kron(w1, w2)).  CPU: W + s kron(w1, w2) written through the (a, b, c, d) view of W by
one broadcast product (a transient O x I tensor, one pass); CUDA: the merged GEMM kernel
(fastadapt.triton_kernels.hadamard) generates each kron tile from two gathers on chip.
Choice: PEFT's float32 adapter on a half base runs "reshape" on every backend (PEFT's rounding
points; a merged weight rounded to the half dtype measured up to 1.6 x PEFT's gradient error on
the tiny-Llama contract, tests/test_half_precision.py); on CUDA its float32 term (cuBLAS float32;
formed in the half dtype it moved three training steps 2.2e-3 away from the CPU path's, above
twice the float16 table) joins the rounded half GEMM in the merged kernel's float32 epilogue.
Otherwise CUDA runs "tiles" and the CPU picks by cost (at
d = 1024, N = 2048 one pass over W against two thin products per token; benchmarks/NOTES.md).
d w1 and d w2 always by reshape and matmul: V = dY w2 one (t a, b) x (b, d) GEMM and sum_t V_t X_t^T
one batched product summed over the tokens; d w2 += Q^T X one (b, t c) x (t c, d) GEMM; on CPU over
chunks of tokens (no N x I temporary), on CUDA in one chunk and, for a half adapter on its half base,
in that dtype on tensor cores (float32 sums of the per-token products; PEFT's float32 adapter in
float32: its gradient's accuracy is PEFT's float32 one).

Saved for backward: x and the parameters (w1 / w2, or the a x c / b x d products formed from their
factors): bytes(x) of activations plus a c + b d elements.  Precision: the kron term and the CPU's
factor gradients accumulate in float32 (float64 for float64) from x and dY converted to it; a merged
weight W + s kron(w1, w2) is summed in float32 and rounded to W's dtype once (a weight rounding where
PEFT rounds its base product; PEFT's float32 adapter on a half base included).  On CUDA a half
adapter's factor gradients are products in its half dtype (as PEFT's half dW and its gradient are).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..testing import randn
from ._policy import HALF_DTYPES, acc_dtype, is_mixed
from ._registry import fused_op
from .hadamard_loha import CPU_PASS


MODES = ("tiles", "reshape")
# The reshape path's batched (a, c) x (c, b) products run at ~0.8 of MKL's GEMM rate on CPU (measured,
# benchmarks/NOTES.md hadamard); a merged-weight pass costs CPU_PASS multiply-adds per weight element.
CPU_RESHAPE_SLOWDOWN = 1.25


def lokr_plan(tokens: int, w1_shape: tuple, w2_shape: tuple, *, backend: str, mixed: bool) -> str:
    """"tiles" or "reshape" for the forward and dx of one call, from the sizes only (module docstring).
    ``mixed`` (PEFT's float32 adapter on a half base): "reshape" on every backend (PEFT's rounding
    points).  Otherwise ``backend`` "triton" generates the kron tiles in the GEMM (two gathers per
    weight element per token tile: always "tiles"); "torch" compares one merged-weight pass,
    2 CPU_PASS O I, with the reshaped products, CPU_RESHAPE_SLOWDOWN N (c d b + a c b)."""
    if mixed:
        return "reshape"
    if backend == "triton":
        return "tiles"
    (a, c), (b, d) = w1_shape, w2_shape
    reshape = CPU_RESHAPE_SLOWDOWN * tokens * (c * d * b + a * c * b)
    return "tiles" if 2 * CPU_PASS * a * b * c * d < reshape else "reshape"


def _compute_dtype(x: Tensor, w1: Tensor) -> torch.dtype:
    return torch.promote_types(acc_dtype(x.dtype), acc_dtype(w1.dtype))


def _plan(k: "_Kernels", a: Tensor, w1: Tensor, w2: Tensor) -> str:
    return lokr_plan(a.shape[0], tuple(w1.shape), tuple(w2.shape), backend=k.backend,
                     mixed=is_mixed(a.dtype, w1.dtype))


def merged(weight: Tensor, w1: Tensor, w2: Tensor, scaling: float, dtype: torch.dtype) -> Tensor:
    """W + scaling kron(w1, w2) (O, I) summed in the accumulation dtype through the (a, b, c, d) view
    of W by one broadcast product, rounded to ``dtype`` once."""
    acc = _compute_dtype(weight, w1)
    (a, c), (b, d) = w1.shape, w2.shape
    term = w1.to(acc)[:, None, :, None] * w2.to(acc)[None, :, None, :]
    return torch.add(weight.to(acc).reshape(a, b, c, d), term, alpha=scaling).view(a * b, c * d).to(dtype)


def kron_rows(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """(N, a b): row t is vec(w1 X_t w2^T), X_t the (c, d) fold of x's row t (all one dtype)."""
    n = x.shape[0]
    (a, c), (b, d) = w1.shape, w2.shape
    z = (x.reshape(n * c, d) @ w2.T).view(n, c, b)
    return torch.bmm(w1.expand(n, a, c), z).view(n, a * b)


def _input_grad_term(dy: Tensor, w1: Tensor, w2: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """(vec(w1^T dY_t w2) (N, I), Q) in ``acc``, with Q = w1^T dY_t (N, c, b), which d w2 reuses."""
    n = dy.shape[0]
    (a, c), (b, d) = w1.shape, w2.shape
    q = torch.bmm(w1.to(acc).T.expand(n, c, a), dy.to(acc).reshape(n, a, b))
    return (q.view(n * c, b) @ w2.to(acc)).view(n, c * d), q


def _forward_torch(x, weight, bias, w1, w2, scaling, plan):
    if plan == "tiles":
        return F.linear(x, merged(weight, w1, w2, scaling, x.dtype), bias)
    acc = _compute_dtype(x, w1)
    term = kron_rows(x.to(acc), w1.to(acc), w2.to(acc))
    if x.dtype == acc:   # the term as BLAS's beta input, the output written once
        y = term.addmm_(x, weight.T, beta=scaling)
        return y if bias is None else y.add_(bias)
    # half base: PEFT's rounded F.linear(x, W, b), the float32 term added, the sum rounded once
    return F.linear(x, weight, bias).to(acc).add_(term, alpha=scaling).to(x.dtype)


def _input_grad_torch(dy, weight, w1, w2, scaling, plan):
    """(dx, Q or None): Q = w1^T dY_t where the reshape path formed it (d w2 reuses it)."""
    if plan == "tiles":
        return dy @ merged(weight, w1, w2, scaling, dy.dtype), None
    acc = _compute_dtype(dy, w1)
    term, q = _input_grad_term(dy, w1, w2, acc)
    if dy.dtype == acc:
        return term.addmm_(dy, weight, beta=scaling), q
    return (dy @ weight).to(acc).add_(term, alpha=scaling).to(dy.dtype), q


def _forward_triton(x, weight, bias, w1, w2, scaling, plan):
    if x.dtype == torch.float64:
        return _forward_torch(x, weight, bias, w1, w2, scaling, plan)
    from ..triton_kernels import hadamard as kernels
    if plan == "tiles":          # kron(w1, w2) tiles generated inside the GEMM
        return kernels.lokr_gemm_forward(x, weight.T, w1.T, w2.T, scaling, bias=bias)
    # PEFT's float32 term (cuBLAS float32), added in float32 after the rounded base GEMM
    term = kron_rows(x.float(), w1.float(), w2.float())
    return kernels.gemm_residual_forward(x, weight.T, term, scaling, bias=bias)


def _input_grad_triton(dy, weight, w1, w2, scaling, plan):
    if dy.dtype == torch.float64:
        return _input_grad_torch(dy, weight, w1, w2, scaling, plan)
    from ..triton_kernels import hadamard as kernels
    if plan == "tiles":
        return kernels.lokr_gemm_forward(dy, weight, w1, w2, scaling), None
    term, q = _input_grad_term(dy, w1, w2, torch.float32)
    return kernels.gemm_residual_forward(dy, weight, term, scaling), q


class _Kernels(NamedTuple):
    backend: str                     # the cost model lokr_plan uses
    forward: Callable
    input_grad: Callable
    grads_in_half: bool              # the factor-gradient products in the activations' half dtype


TORCH = _Kernels("torch", _forward_torch, _input_grad_torch, False)


@functools.lru_cache(maxsize=None)
def _triton() -> _Kernels:
    return _Kernels("triton", _forward_triton, _input_grad_triton, True)


# Tokens per chunk of the factor-gradient products on CPU: 2^18 elements of x (1 MiB float32), so that
# a chunk's V, Q and batched products stay in cache and no N x I temporary is made (CUDA: one chunk).
_CHUNK_ELEMENTS = 1 << 18


def _factor_grads(dy, x, w1, w2, scaling, q, needs, in_half) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(d w1, d w2) in the accumulation dtype (module docstring); ``q`` = w1^T dY_t if already formed.
    ``in_half``: with a half adapter on its half base the products run in that dtype (tensor cores on
    CUDA) with float32 sums; PEFT's float32 adapter keeps them in float32."""
    acc = _compute_dtype(x, w1)
    work = x.dtype if in_half and x.dtype in HALF_DTYPES and w1.dtype == x.dtype else acc
    n = x.shape[0]
    (a, c), (b, d) = w1.shape, w2.shape
    w1, w2 = w1.to(work), w2.to(work)
    d_w1 = torch.zeros(a, c, dtype=acc, device=x.device) if needs[1] else None
    d_w2 = torch.zeros(b, d, dtype=acc, device=x.device) if needs[2] else None
    rows = n if x.is_cuda else max(1, min(n, _CHUNK_ELEMENTS // max(c * d, 1)))
    for start in range(0, n, max(rows, 1)):
        stop = min(n, start + rows)
        t = stop - start
        xs = x[start:stop].to(work).reshape(t, c, d)
        dys = dy[start:stop].to(work).reshape(t, a, b)
        if needs[1]:
            v = (dys.reshape(t * a, b) @ w2).view(t, a, d)
            d_w1 += torch.bmm(v, xs.transpose(1, 2)).sum(dim=0, dtype=acc)
        if needs[2]:
            qs = torch.bmm(w1.T.expand(t, c, a), dys) if q is None else q[start:stop].to(work)
            d_w2 += (qs.reshape(t * c, b).T @ xs.reshape(t * c, d)).to(acc)
    return (None if d_w1 is None else d_w1.mul_(scaling)), (None if d_w2 is None else d_w2.mul_(scaling))


def _forward(k: _Kernels, x, weight, bias, w1, w2, scaling):
    return k.forward(x, weight, bias, w1, w2, scaling, _plan(k, x, w1, w2))


def _backward(k: _Kernels, dy, x, weight, w1, w2, scaling, needs):
    out = [dy.new_empty(0) for _ in range(4)]         # distinct tensors: outputs may not alias
    q = None
    if needs[0]:
        out[0], q = k.input_grad(dy, weight, w1, w2, scaling, _plan(k, dy, w1, w2))
    if needs[1] or needs[2]:
        d_w1, d_w2 = _factor_grads(dy, x, w1, w2, scaling, q, needs, k.grads_in_half)
        if needs[1]:
            out[1] = d_w1.to(w1.dtype)
        if needs[2]:
            out[2] = d_w2.to(w2.dtype)
    if needs[3]:
        out[3] = dy.sum(dim=0)
    return out


# ----------------------------------------------------------------------------------------------
# fastadapt::lokr_linear and fastadapt::lokr_linear_backward

@fused_op("lokr_linear", autocast_keep=("w1", "w2"))
def lokr_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], w1: Tensor, w2: Tensor,
                   scaling: float) -> Tensor:
    """y = x (W + scaling kron(w1, w2))^T + bias for 2-D x (module docstring)."""
    return _forward(TORCH, x, weight, bias, w1, w2, scaling)


@lokr_linear_op.impl("triton")
def _(*args):
    return _forward(_triton(), *args)


@lokr_linear_op.fake
def _(x, weight, bias, w1, w2, scaling):
    return x.new_empty(x.shape[0], weight.shape[0])


@fused_op("lokr_linear_backward", autocast=False)
def lokr_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, w1: Tensor, w2: Tensor, scaling: float,
                            needs: list[bool]) -> list[Tensor]:
    """[dx, d w1, d w2, dbias] of ``lokr_linear`` (``needs``: which; the others are empty)."""
    return _backward(TORCH, dy, x, weight, w1, w2, scaling, needs)


@lokr_linear_backward_op.impl("triton")
def _(*args):
    return _backward(_triton(), *args)


@lokr_linear_backward_op.fake
def _(dy, x, weight, w1, w2, scaling, needs):
    likes = [t.new_empty(t.shape) if need else dy.new_empty(0) for t, need in zip((x, w1, w2), needs)]
    return likes + [dy.new_empty(dy.shape[1:]) if needs[3] else dy.new_empty(0)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, w1, w2, scaling = inputs
    ctx.save_for_backward(x, weight, w1, w2)
    ctx.scaling = scaling
    ctx.has_bias = bias is not None


def _backward_entry(ctx, dy):
    """Saved: x, W, w1, w2 (bytes(x) of activations, plus w1 / w2 where they are products of factors).
    Gradients: module docstring."""
    n = ctx.needs_input_grad
    needs = [n[0], n[3], n[4], ctx.has_bias and n[2]]
    if not any(needs):
        return (None,) * 6
    x, weight, w1, w2 = ctx.saved_tensors
    out = lokr_linear_backward_op(dy, x, weight, w1, w2, ctx.scaling, needs)
    dx, d_w1, d_w2, d_bias = (g if need else None for g, need in zip(out, needs))
    return dx, None, d_bias, d_w1, d_w2, None


lokr_linear_op.autograd(_backward_entry, _setup_context)


# ----------------------------------------------------------------------------------------------
# fastadapt::lokr_merged_weight (merge, unmerge)

@fused_op("lokr_merged_weight", autocast=False)
def lokr_merged_weight_op(weight: Tensor, w1: Tensor, w2: Tensor, scaling: float) -> Tensor:
    """W + scaling kron(w1, w2) (O, I) in W's dtype, summed in the accumulation dtype (not
    differentiable: merge and unmerge)."""
    return merged(weight, w1, w2, scaling, weight.dtype)


@lokr_merged_weight_op.fake
def _(weight, w1, w2, scaling):
    return weight.new_empty(weight.shape)


# ----------------------------------------------------------------------------------------------
# opcheck examples: float64 (a = 1: a prime out_features), float32 with strided x and no bias, a
# float32 adapter on a bfloat16 base

def _examples():
    for i, (dtype, adapter_dtype, bias, (a, b, c, d)) in enumerate([
            (torch.float64, torch.float64, True, (1, 7, 2, 3)),
            (torch.float32, torch.float32, False, (2, 3, 4, 2)),
            (torch.bfloat16, torch.float32, True, (3, 2, 2, 4))]):
        s = 10 * i
        x = randn(5, c * d, dtype=dtype, requires_grad=True, seed=s)
        if i == 1:
            x = x.detach().T.contiguous().T.requires_grad_()
        weight = randn(a * b, c * d, dtype=dtype, scale=0.4, seed=s + 1)
        bias_t = randn(a * b, dtype=dtype, requires_grad=True, seed=s + 2) if bias else None
        w1 = randn(a, c, dtype=adapter_dtype, requires_grad=True, seed=s + 3)
        w2 = randn(b, d, dtype=adapter_dtype, requires_grad=True, seed=s + 4)
        yield (x, weight, bias_t, w1, w2, 0.75), {}


def _backward_examples():
    for args, _ in _examples():
        x, weight, bias = args[:3]
        dy = randn(x.shape[0], weight.shape[0], dtype=x.dtype, seed=97)
        inputs = [t.detach() for t in (dy, x, weight, args[3], args[4])]
        yield (*inputs, args[5], [True, True, True, bias is not None]), {}
        yield (*inputs, args[5], [False, False, True, False]), {}


def _merged_examples():
    for args, _ in _examples():
        yield (args[1], args[3].detach(), args[4].detach(), args[5]), {}


lokr_linear_op.example(_examples)
lokr_linear_backward_op.example(_backward_examples)
lokr_merged_weight_op.example(_merged_examples)
