"""LoHa's fused ops on 2-D x (N, I): ``fastadapt::loha_linear`` and its backward, never an O x I delta.

Notation: W (O, I) frozen, bias (O,) or None, w1a, w2a (O, r), w1b, w2b (r, I), s = alpha / r::

    y = x (W + dW)^T + bias,   dW = s (w1a w1b) o (w2a w2b)

Two ways to each product, chosen per shape by :func:`loha_plan` (the same algebra on every backend):

"tiles" (the weight generated where it is used).  Forward y = x (W + s P1 o P2)^T + b and input
gradient dx = dY (W + s P1 o P2), P1 = w1a w1b, P2 = w2a w2b.  CPU: W + s P1 o P2 is built in the
accumulation dtype, rounded to W's dtype once and multiplied (a transient O x I merged weight: two
rank-r products and one pass; freed before the op returns).  CUDA: the merged GEMM kernel
(fastadapt.triton_kernels.hadamard) generates each weight tile from the rank-r factors on chip.
Factor gradients from G = dY^T X (O x I; dL/d(dW) = G)::

    d w1a = s (G o P2) w1b^T,  d w1b = s w1a^T (G o P2),  d w2a = s (G o P1) w2b^T,  d w2b = s w2a^T (G o P1)

CPU: G whole (one N-long GEMM) and four rank-r contractions; CUDA: each G tile contracted as soon as
it is complete (``_loha_factor_grads_bwd_kernel``), G never stored.

"khatri_rao" (the update's rank-r^2 factors).  dW = s A B with the row-wise Khatri-Rao products
A[o, (k, l)] = w1a[o, k] w2a[o, l] (O, r^2), B[(k, l), i] = w1b[k, i] w2b[l, i] (r^2, I)::

    y  = x W^T + b + s u A^T,          u = x B^T (N, r^2)
    dx = dY W + s v B,                 v = dY A (N, r^2)
    M_A = dY^T u (O, r^2),  M_B = v^T x (r^2, I)
    d w1a[o, k] = s sum_l M_A[o, (k, l)] w2a[o, l],   d w2a[o, l] = s sum_k M_A[o, (k, l)] w1a[o, k]
    d w1b[k, i] = s sum_l M_B[(k, l), i] w2b[l, i],   d w2b[l, i] = s sum_k M_B[(k, l), i] w1b[k, i]

Four thin GEMMs (inner or outer size r^2) instead of the N-long dY^T X GEMM: 4 N r^2 (I + O) FLOPs
against 2 N O I, the better choice while about 2 r^2 (I + O) < O I (r < sqrt(d) / 2 for a square
layer); the tiles' forward costs two rank-r products per weight (CPU: once per call; CUDA: per token
tile) against 2 N r^2 (I + O) for the Khatri-Rao forward.  :func:`loha_plan` has the cost model and
its measured constants (benchmarks/NOTES.md, hadamard).

Saved for backward: x and the parameters (bytes(x) of activations); u, v, G and the merged weight
are recomputed.  Precision: the adapter's products accumulate in float32 (float64 for float64); on a
half base with PEFT's float32 adapter the Khatri-Rao thin GEMMs and G run in float32 on half values
(no half rounding of u, v or G), and the Khatri-Rao term joins the half base product after its
rounding (PEFT's rounding points); the merged weight is rounded to the half dtype once (a weight
rounding where PEFT rounds its base product; see fastadapt.ops.hadamard for the contract).  A half
adapter on its half base runs the Khatri-Rao thin GEMMs on CUDA in that dtype (tensor cores, each
product rounded to it, as PEFT rounds its half dW and G); on CPU in float32.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ..testing import randn
from . import _lowrank_gemm as gemm
from ._policy import acc_dtype
from ._registry import fused_op

MODES = ("tiles", "khatri_rao")


@dataclass(frozen=True)
class LohaPlan:
    """How each product of one LoHa call runs: "tiles" or "khatri_rao" (module docstring)."""

    forward: str
    input_grad: str
    factor_grads: str


# Cost model, in units of one fused multiply-add at the rate of the layer's own GEMM.
# CPU (MKL, measured single-threaded at d = 1024, N = 2048, benchmarks/NOTES.md hadamard): thin GEMMs
# down to an inner or outer size of 16 run at the square GEMM's rate; an elementwise pass over a
# float32 tensor (a merged weight, or the Khatri-Rao term BLAS accumulates onto) costs as much as
# ~12 multiply-adds per element (memory bound).
CPU_PASS = 12.0
# CUDA (H200, model; no GPU measurement yet): tensor cores run half dots ~15x faster than the
# CUDA-core IEEE fp32 dots (989 vs 67 TFLOP/s dense); the merged GEMM regenerates each weight tile
# for every BLOCK_M = 128 tokens; the rank-r products pad r to a tile of at least 16.
CUDA_FP32_SLOWDOWN = 15.0
CUDA_BLOCK_M = 128
# Dtype layouts (fastadapt.ops._policy): one float32 / float64 dtype, a half adapter on its half base,
# or PEFT's float32 adapter on a half base.
LAYOUTS = ("float", "half", "mixed")


def layout_of(x: Tensor, adapter: Tensor) -> str:
    if x.dtype not in (torch.float16, torch.bfloat16):
        return "float"
    return "half" if adapter.dtype == x.dtype else "mixed"


def _block_r(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def loha_plan(tokens: int, in_features: int, out_features: int, r: int, *, backend: str, layout: str) -> LohaPlan:
    """The cheaper way ("tiles" or "khatri_rao") for the forward, dx and the factor gradients of one
    call, from the sizes only (no tensor is read).  ``backend``: "torch" (CPU costs) or "triton"
    (CUDA costs); ``layout``: one of LAYOUTS (on CUDA: which products run on tensor cores).

    Costs (multiply-adds at the rate of the layer's GEMM; CPU: every GEMM at one rate plus
    ``CPU_PASS`` per element of a memory-bound pass; CUDA: float32 products run
    ``CUDA_FP32_SLOWDOWN`` x slower than half tensor-core dots -- the whole layer for a float32 base,
    the Khatri-Rao thin GEMMs and the tiles' contractions for PEFT's float32 adapter on a half base --
    and the tiles' rank-r products are redone per BLOCK_M tokens):

        forward, tiles:   CPU 2 O I r + 3 CPU_PASS O I       CUDA 2 N O I R / BLOCK_M
        forward, KR:      N r^2 (I + O)  (+ CPU_PASS N O: the term's own pass on CPU)
        factors, tiles:   N O I + 6 O I r (+ 4 CPU_PASS O I on CPU)
        factors, KR:      2 N r^2 (I + O)
        dx: as the forward, except that with Khatri-Rao factor gradients v = dY A is already there
            and dx's Khatri-Rao term costs N r^2 I (+ CPU_PASS N I).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; valid choices: {list(LAYOUTS)}")
    n, i, o = tokens, in_features, out_features
    r2 = r * r
    if backend == "torch":
        thin, out_pass = 1.0, CPU_PASS
        tiles_weight = 2.0 * o * i * r + 3 * CPU_PASS * o * i
        tiles_factors = n * o * i + 6.0 * o * i * r + 4 * CPU_PASS * o * i
    else:
        main = CUDA_FP32_SLOWDOWN if layout == "float" else 1.0
        thin, out_pass = (1.0 if layout == "half" else CUDA_FP32_SLOWDOWN), 0.0
        tiles_weight = 2.0 * n * o * i * _block_r(r) / CUDA_BLOCK_M * main
        tiles_factors = n * o * i * main + 6.0 * o * i * r * (main if layout == "half" else CUDA_FP32_SLOWDOWN)
    kr_forward = n * r2 * (i + o) * thin + out_pass * n * o
    factor_grads = "khatri_rao" if 2.0 * n * r2 * (i + o) * thin < tiles_factors else "tiles"
    kr_input_grad = n * r2 * (i if factor_grads == "khatri_rao" else i + o) * thin + out_pass * n * i
    return LohaPlan(forward="khatri_rao" if kr_forward < tiles_weight else "tiles",
                    input_grad="khatri_rao" if kr_input_grad < tiles_weight else "tiles",
                    factor_grads=factor_grads)


def _plan(kernels: "_Kernels", x: Tensor, weight: Tensor, w1a: Tensor) -> LohaPlan:
    return loha_plan(x.shape[0], weight.shape[1], weight.shape[0], w1a.shape[1], backend=kernels.backend,
                     layout=layout_of(x, w1a))


# ----------------------------------------------------------------------------------------------
# kernel sets: one body per op, run with the torch set (CPU) or the Triton set (CUDA)

def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    out = acc_dtype(tensors[0].dtype)
    for t in tensors[1:]:
        out = torch.promote_types(out, acc_dtype(t.dtype))
    return out


def merged(y: Tensor, l1: Tensor, r1: Tensor, l2: Tensor, r2: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """y + scale (l1 r1) o (l2 r2), summed in the accumulation dtype and rounded to ``dtype`` once; built
    in y's memory order (a transposed view of W, the forward's W^T, as the transpose of W's merge: a
    pass that reads y across its rows costs 5-8x a row-order pass on CPU)."""
    if y.stride(0) == 1 and y.stride(1) != 1:
        return merged(y.T, r1.T, l1.T, r2.T, l2.T, scale, dtype).T
    acc = _compute_dtype(y, l1)
    p1 = l1.to(acc) @ r1.to(acc)
    p2 = l2.to(acc) @ r2.to(acc)
    return torch.addcmul(y.to(acc), p1, p2, value=scale).to(dtype)


def merged_gemm_torch(a: Tensor, y: Tensor, l1: Tensor, r1: Tensor, l2: Tensor, r2: Tensor, scale: float,
                      bias: Optional[Tensor] = None) -> Tensor:
    """a (y + scale (l1 r1) o (l2 r2)) + bias with the merged (K, N) weight in a's dtype (the torch
    twin of triton_kernels.hadamard.loha_gemm_forward; a transient K x N tensor)."""
    weight = merged(y, l1, r1, l2, r2, scale, a.dtype)
    return a @ weight if bias is None else torch.addmm(bias, a, weight)


def factor_grads_tiles_torch(dy: Tensor, x: Tensor, w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor,
                             scale: float) -> list[Tensor]:
    """[d w1a, d w1b, d w2a, d w2b] in the accumulation dtype from G = dY^T X (module docstring)."""
    acc = _compute_dtype(x, w1a)
    g = gemm.acc_matmul(dy.T, x)
    if scale != 1.0:
        g.mul_(scale)
    w1a, w1b, w2a, w2b = (f.to(acc) for f in (w1a, w1b, w2a, w2b))
    weighted = (w2a @ w2b).mul_(g)                      # s G o P2
    d_1a, d_1b = weighted @ w1b.T, w1a.T @ weighted
    torch.mm(w1a, w1b, out=weighted).mul_(g)             # s G o P1
    return [d_1a, d_1b, weighted @ w2b.T, w2a.T @ weighted]


def _triton_merged_gemm(a, y, l1, r1, l2, r2, scale, bias=None):
    if a.dtype == torch.float64:
        return merged_gemm_torch(a, y, l1, r1, l2, r2, scale, bias)
    from ..triton_kernels import hadamard as kernels
    return kernels.loha_gemm_forward(a, y, l1, r1, l2, r2, scale, bias=bias)


def _torch_thin_matmuls(dtype: Optional[torch.dtype]) -> Callable:
    """The Khatri-Rao thin GEMMs on CPU: always in the accumulation dtype (float32 / float64)."""
    return gemm.acc_matmul


def _triton_thin_matmuls(dtype: Optional[torch.dtype]) -> Callable:
    """The Khatri-Rao thin GEMMs on CUDA.  ``dtype``: the half dtype of a half adapter on its half base:
    tensor-core products in it (cuBLAS), each product rounded to it as PEFT's half dW and G are; None
    (float32 layers, PEFT's float32 adapter on a half base): IEEE float32 products, half tiles
    converted on load (fastadapt.ops._lowrank_gemm)."""
    if dtype is not None:
        return lambda a, b: (a.to(dtype) @ b.to(dtype)).float()
    return gemm.triton().acc_matmul


def _triton_factor_grads_tiles(dy, x, w1a, w1b, w2a, w2b, scale):
    if x.dtype == torch.float64:
        return factor_grads_tiles_torch(dy, x, w1a, w1b, w2a, w2b, scale)
    from ..triton_kernels import hadamard as kernels
    return kernels.loha_factor_grads_backward(dy, x, w1a, w1b, w2a, w2b, scale)


class _Kernels(NamedTuple):
    backend: str                     # the cost model loha_plan uses
    merged_gemm: Callable
    factor_grads_tiles: Callable
    thin_matmuls: Callable           # thin_matmuls(half dtype or None) -> the Khatri-Rao products' matmul


TORCH = _Kernels("torch", merged_gemm_torch, factor_grads_tiles_torch, _torch_thin_matmuls)


@functools.lru_cache(maxsize=None)
def _triton() -> _Kernels:
    return _Kernels("triton", _triton_merged_gemm, _triton_factor_grads_tiles, _triton_thin_matmuls)


# ----------------------------------------------------------------------------------------------
# the op bodies

def khatri_rao_factors(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor,
                       dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A (O, r^2) and B (r^2, I) in ``dtype`` with (w1a w1b) o (w2a w2b) = A B."""
    w1a, w1b, w2a, w2b = (f.to(dtype) for f in (w1a, w1b, w2a, w2b))
    a = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1)
    b = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])
    return a, b


def _thin(k: _Kernels, x: Tensor, w1a: Tensor) -> Callable:
    return k.thin_matmuls(x.dtype if layout_of(x, w1a) == "half" else None)


def add_to_base(a: Tensor, y: Tensor, term: Tensor, bias: Optional[Tensor]) -> Tensor:
    """a y (+ bias) + term: BLAS accumulates the base product onto the term when ``a`` has its dtype;
    on a half ``a`` the base product is rounded where PEFT's half GEMM rounds it, the term (float32)
    joins and the sum is rounded once."""
    if a.dtype == term.dtype:
        out = term.addmm_(a, y)
        return out if bias is None else out.add_(bias)
    base = a @ y if bias is None else torch.addmm(bias, a, y)
    return base.to(term.dtype).add_(term).to(a.dtype)


def _forward(k: _Kernels, x, weight, bias, w1a, w1b, w2a, w2b, scaling):
    if _plan(k, x, weight, w1a).forward == "tiles":
        return k.merged_gemm(x, weight.T, w1b.T, w1a.T, w2b.T, w2a.T, scaling, bias)
    thin = _thin(k, x, w1a)
    a_kr, b_kr = khatri_rao_factors(w1a, w1b, w2a, w2b, _compute_dtype(x, w1a))
    term = thin(thin(x, b_kr.T), a_kr.T.mul(scaling))           # s (x B^T) A^T
    return add_to_base(x, weight.T, term, bias)


def _contract_khatri_rao(m_a: Tensor, m_b: Tensor, w1a, w1b, w2a, w2b, scaling) -> list[Tensor]:
    """The factor gradients from M_A = dY^T u (O, r^2) and M_B = v^T x (r^2, I) (module docstring)."""
    o, r = w1a.shape
    m_a, m_b = m_a.view(o, r, r), m_b.view(r, r, -1)
    w1a, w1b, w2a, w2b = (f.to(m_a.dtype) for f in (w1a, w1b, w2a, w2b))
    return [(m_a * w2a[:, None, :]).sum(2).mul_(scaling), (m_b * w2b[None]).sum(1).mul_(scaling),
            (m_a * w1a[:, :, None]).sum(1).mul_(scaling), (m_b * w1b[:, None]).sum(0).mul_(scaling)]


def _backward(k: _Kernels, dy, x, weight, w1a, w1b, w2a, w2b, scaling, needs):
    plan = _plan(k, x, weight, w1a)
    thin = _thin(k, x, w1a)
    factors = (w1a, w1b, w2a, w2b)
    out = [dy.new_empty(0) for _ in range(6)]         # distinct tensors: outputs may not alias
    v = a_kr = b_kr = None
    if plan.factor_grads == "khatri_rao" or plan.input_grad == "khatri_rao":
        a_kr, b_kr = khatri_rao_factors(*factors, _compute_dtype(x, w1a))
    if any(needs[1:5]):
        if plan.factor_grads == "khatri_rao":
            u = thin(x, b_kr.T)                         # (N, r^2)
            v = thin(dy, a_kr)                          # (N, r^2)
            grads = _contract_khatri_rao(thin(dy.T, u), thin(v.T, x), *factors, scaling)
        else:
            grads = k.factor_grads_tiles(dy, x, *factors, scaling)
        for j, (g, f) in enumerate(zip(grads, factors), start=1):
            if needs[j]:
                out[j] = g.to(f.dtype)
    if needs[0]:
        if plan.input_grad == "tiles":
            out[0] = k.merged_gemm(dy, weight, w1a, w1b, w2a, w2b, scaling)
        else:
            v = thin(dy, a_kr) if v is None else v
            out[0] = add_to_base(dy, weight, thin(v, b_kr.mul(scaling)), None)
    if needs[5]:
        out[5] = dy.sum(dim=0)
    return out


# ----------------------------------------------------------------------------------------------
# fastadapt::loha_linear and fastadapt::loha_linear_backward

_ADAPTER = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@fused_op("loha_linear", autocast_keep=_ADAPTER)
def loha_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], hada_w1_a: Tensor, hada_w1_b: Tensor,
                   hada_w2_a: Tensor, hada_w2_b: Tensor, scaling: float) -> Tensor:
    """y = x (W + dW)^T + bias, dW = scaling (w1a w1b) o (w2a w2b), for 2-D x (module docstring)."""
    return _forward(TORCH, x, weight, bias, hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, scaling)


@loha_linear_op.impl("triton")
def _(*args):
    return _forward(_triton(), *args)


@loha_linear_op.fake
def _(x, weight, bias, hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, scaling):
    return x.new_empty(x.shape[0], weight.shape[0])


@fused_op("loha_linear_backward", autocast=False)
def loha_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, hada_w1_a: Tensor, hada_w1_b: Tensor,
                            hada_w2_a: Tensor, hada_w2_b: Tensor, scaling: float, needs: list[bool]) -> list[Tensor]:
    """[dx, d w1a, d w1b, d w2a, d w2b, dbias] of ``loha_linear`` (``needs``: which; the others are empty)."""
    return _backward(TORCH, dy, x, weight, hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, scaling, needs)


@loha_linear_backward_op.impl("triton")
def _(*args):
    return _backward(_triton(), *args)


@loha_linear_backward_op.fake
def _(dy, x, weight, hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, scaling, needs):
    likes = (x, hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b)
    shapes = [t.new_empty(t.shape) if need else dy.new_empty(0) for t, need in zip(likes, needs)]
    return shapes + [dy.new_empty(dy.shape[1:]) if needs[5] else dy.new_empty(0)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, w1a, w1b, w2a, w2b, scaling = inputs
    ctx.save_for_backward(x, weight, w1a, w1b, w2a, w2b)
    ctx.scaling = scaling
    ctx.has_bias = bias is not None


def _backward_entry(ctx, dy):
    """Saved: x, W and the four factors (bytes(x) of activations).  Gradients: module docstring."""
    n = ctx.needs_input_grad
    needs = [n[0], n[3], n[4], n[5], n[6], ctx.has_bias and n[2]]
    if not any(needs):
        return (None,) * 8
    x, weight, w1a, w1b, w2a, w2b = ctx.saved_tensors
    out = loha_linear_backward_op(dy, x, weight, w1a, w1b, w2a, w2b, ctx.scaling, needs)
    dx, d_1a, d_1b, d_2a, d_2b, d_bias = (g if need else None for g, need in zip(out, needs))
    return dx, None, d_bias, d_1a, d_1b, d_2a, d_2b, None


loha_linear_op.autograd(_backward_entry, _setup_context)


# ----------------------------------------------------------------------------------------------
# fastadapt::loha_merged_weight (merge, unmerge)

@fused_op("loha_merged_weight", autocast=False)
def loha_merged_weight_op(weight: Tensor, hada_w1_a: Tensor, hada_w1_b: Tensor, hada_w2_a: Tensor,
                          hada_w2_b: Tensor, scaling: float) -> Tensor:
    """W + scaling (w1a w1b) o (w2a w2b) (O, I) in W's dtype, summed in the accumulation dtype (not
    differentiable: merge and unmerge)."""
    return merged(weight, hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, scaling, weight.dtype)


@loha_merged_weight_op.fake
def _(weight, hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, scaling):
    return weight.new_empty(weight.shape)


# ----------------------------------------------------------------------------------------------
# opcheck examples: float64, float32 with strided x and no bias, a float32 adapter on a bfloat16 base

def _examples():
    for i, (dtype, adapter_dtype, bias, r) in enumerate([(torch.float64, torch.float64, True, 3),
                                                         (torch.float32, torch.float32, False, 2),
                                                         (torch.bfloat16, torch.float32, True, 4)]):
        s = 10 * i
        x = randn(5, 7, dtype=dtype, requires_grad=True, seed=s)
        if i == 1:
            x = x.detach().T.contiguous().T.requires_grad_()
        weight = randn(6, 7, dtype=dtype, scale=0.4, seed=s + 1)
        b = randn(6, dtype=dtype, requires_grad=True, seed=s + 2) if bias else None
        factors = [randn(*shape, dtype=adapter_dtype, scale=0.5, requires_grad=True, seed=s + 3 + j)
                   for j, shape in enumerate([(6, r), (r, 7), (6, r), (r, 7)])]
        yield (x, weight, b, *factors, 1.5), {}


def _backward_examples():
    for args, _ in _examples():
        x, weight, bias = args[:3]
        dy = randn(x.shape[0], weight.shape[0], dtype=x.dtype, seed=98)
        inputs = [t.detach() for t in (dy, x, weight, *args[3:7])]
        yield (*inputs, args[7], [True, True, True, True, True, bias is not None]), {}
        yield (*inputs, args[7], [False, True, False, False, True, False]), {}


def _merged_examples():
    for args, _ in _examples():
        yield (args[1], *(t.detach() for t in args[3:7]), args[7]), {}


loha_linear_op.example(_examples)
loha_linear_backward_op.example(_backward_examples)
loha_merged_weight_op.example(_merged_examples)
