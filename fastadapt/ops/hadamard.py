"""hadamard family: LoHa (Hadamard product of two rank-r products) and LoKr (Kronecker product) as
fused layer ops that never materialise the delta weight or keep it for backward.

Notation: x (..., I), W (O, I) frozen, bias (O,) or None, s = alpha / r (PEFT's scaling)::

    LoHa   y = x (W + dW)^T + bias,  dW = s (w1a w1b) o (w2a w2b),  w1a, w2a (O, r), w1b, w2b (r, I)
    LoKr   y = x (W + dW)^T + bias,  dW = s kron(w1, w2),  w1 (a, c), w2 (b, d), O = a b, I = c d,
           w1 = lokr_w1 or lokr_w1_a lokr_w1_b (a, r) (r, c);  w2 = lokr_w2 or lokr_w2_a lokr_w2_b

PEFT builds dW (O x I, float32 by default) every forward, runs a second full GEMM with it and keeps
it for backward, where dY^T X, another N-long GEMM, gives its gradient.  Here:

- LoHa (fastadapt.ops.hadamard_loha): each product runs one of two ways, chosen per shape
  (``hadamard_loha.loha_plan``): "tiles", the merged weight W + dW generated where the GEMM uses
  it (on chip per tile on CUDA; one transient merged weight on CPU) and the factor gradients from
  G = dY^T X contracted at once with the rank-r factors; or "khatri_rao", the update's rank-r^2
  factors A (O, r^2), B (r^2, I), dW = s A B, and thin GEMMs of inner or outer size r^2.
- LoKr (fastadapt.ops.hadamard_lokr): reshape and matmul, y_t += s vec(w1 X_t w2^T) with X_t the
  (c, d) fold of x_t, for full and factored w1 / w2 (a factored side is formed as its small a x c or
  b x d product first); on CUDA the forward and dx generate kron(w1, w2) tiles inside the GEMM.

Every op is a torch custom op (fastadapt.ops._registry): CPU runs the torch implementations, CUDA
the Triton kernels of fastadapt.triton_kernels.hadamard (float64 always torch).  Saved for backward:
x and the parameters, bytes(x) of activations (PEFT: 1.5 x at d = 1024, its float32 dW).

Dtypes (PEFT's policy, fastadapt.ops._policy): x, W and bias share one dtype; the adapter tensors
have it too, or are float32 on a float16 / bfloat16 base (PEFT's default autocast_adapter_dtype).
The adapter's products accumulate in float32 (float64 for float64) whatever the adapter's dtype.
On a half base PEFT computes dW in float32, x dW^T in float32 and rounds base + term once; the fused
paths keep the float32 accuracy of every adapter-side product (Khatri-Rao thin GEMMs, G, the LoKr
term on CPU) and round where PEFT rounds, except that a merged weight W + dW is rounded to the half
dtype once before its GEMM (a rounding of the weight in place of PEFT's rounding of the base
output: the same size, tests/test_hadamard.py measures it against PEFT's error).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _validate
from ._policy import acc_dtype, adapter_compute_dtype
from .hadamard_loha import LohaPlan, loha_linear_op, loha_merged_weight_op, loha_plan
from .hadamard_lokr import lokr_linear_op, lokr_merged_weight_op

METHODS = ("loha", "lokr")
TRITON_METHODS = ("loha", "lokr")

__all__ = ["LohaPlan", "METHODS", "TRITON_METHODS", "check_loha_factors", "check_lokr_factors", "loha_linear",
           "loha_merged_weight", "loha_plan", "lokr_factors", "lokr_linear", "lokr_merged_weight"]

LOHA_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def _check_base(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[int, int]:
    _validate.tensor("x", x, min_ndim=1)
    _validate.tensor("weight", weight, ndim=2)
    out_features, in_features = weight.shape
    _validate.tensor("x", x, shape=(*x.shape[:-1], in_features))
    _validate.same("x", x, "weight", weight)
    if bias is not None:
        _validate.tensor("bias", bias, shape=(out_features,))
        _validate.same("x", x, "bias", bias)
    if weight.requires_grad:
        raise ValueError("weight requires grad; the fused path needs it frozen (weight.requires_grad_(False))")
    return out_features, in_features


def check_loha_factors(hada_w1_a: Tensor, hada_w1_b: Tensor, hada_w2_a: Tensor, hada_w2_b: Tensor,
                       out_features: int, in_features: int) -> int:
    """The rank r of LoHa factors w1a, w2a (out_features, r) and w1b, w2b (r, in_features); ValueError
    naming the parameter otherwise (any r >= 1: PEFT accepts r above the layer's sizes)."""
    factors = dict(zip(LOHA_FACTORS, (hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b)))
    for name, t in factors.items():
        _validate.tensor(name, t, ndim=2)
    r = hada_w1_a.shape[1]
    shapes = {"hada_w1_a": (out_features, r), "hada_w1_b": (r, in_features), "hada_w2_a": (out_features, r),
              "hada_w2_b": (r, in_features)}
    for name, shape in shapes.items():
        _validate.tensor(name, factors[name], shape=shape)
    return r


def loha_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], hada_w1_a: Tensor, hada_w1_b: Tensor,
                hada_w2_a: Tensor, hada_w2_b: Tensor, scaling: float) -> Tensor:
    """LoHa's layer as PEFT computes it, differentiable in x, bias and the four factors.

    x (..., in); weight (out, in) frozen, any strides; bias (out,) or None; hada_w1_a, hada_w2_a
    (out, r), hada_w1_b, hada_w2_b (r, in) in x's dtype or float32 on a float16 / bfloat16 x;
    scaling (alpha / r) read at call time.
    """
    out_features, in_features = _check_base(x, weight, bias)
    check_loha_factors(hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, out_features, in_features)
    adapter_compute_dtype("x", x, tuple(zip(LOHA_FACTORS, (hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b))))
    y = loha_linear_op(x.reshape(-1, in_features), weight, bias, hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b,
                       float(scaling))
    return y.reshape(*x.shape[:-1], out_features)


def loha_merged_weight(weight: Tensor, hada_w1_a: Tensor, hada_w1_b: Tensor, hada_w2_a: Tensor,
                       hada_w2_b: Tensor, scaling: float) -> Tensor:
    """W + dW (out, in) in W's dtype (dW summed onto W in the accumulation dtype): the merged layer's
    weight and the weight the "tiles" forward multiplies by (no gradient)."""
    _validate.tensor("weight", weight, ndim=2)
    factors = (hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b)
    check_loha_factors(*factors, *weight.shape)
    adapter_compute_dtype("weight", weight, tuple(zip(LOHA_FACTORS, factors)))
    with torch.no_grad():
        return loha_merged_weight_op(weight.detach(), *(f.detach() for f in factors), float(scaling))


def check_lokr_factors(out_features: int, in_features: int, **factors: Optional[Tensor]) -> None:
    """Each side given whole (``lokr_w1``, ``lokr_w2``) or as a pair (``*_a`` (rows, r), ``*_b`` (r, cols)),
    and kron(w1, w2) of shape (out_features, in_features); ValueError naming the parameter otherwise."""
    unknown = sorted(k for k, v in factors.items() if k not in LOKR_FACTORS)
    if unknown:
        raise TypeError(f"unknown LoKr factors {unknown}; valid names: {list(LOKR_FACTORS)}")
    sides = {}
    for side in ("lokr_w1", "lokr_w2"):
        whole, a, b = (factors.get(side + suffix) for suffix in ("", "_a", "_b"))
        if (whole is None) == (a is None and b is None) or (a is None) != (b is None):
            raise ValueError(f"give either {side} or both {side}_a and {side}_b")
        if whole is not None:
            _validate.tensor(side, whole, ndim=2)
            sides[side] = tuple(whole.shape)
        else:
            _validate.tensor(side + "_a", a, ndim=2)
            _validate.tensor(side + "_b", b, ndim=2)
            if b.shape[0] != a.shape[1]:
                raise ValueError(f"{side}_b has {b.shape[0]} rows but {side}_a has rank {a.shape[1]}; "
                                 f"{side}_b must be ({a.shape[1]}, columns)")
            sides[side] = (a.shape[0], b.shape[1])
    (a_rows, c_cols), (b_rows, d_cols) = sides["lokr_w1"], sides["lokr_w2"]
    if a_rows * b_rows != out_features:
        raise ValueError(f"lokr_w1 rows x lokr_w2 rows = {a_rows} x {b_rows} = {a_rows * b_rows} is not "
                         f"out_features={out_features}; their row counts must multiply to it")
    if c_cols * d_cols != in_features:
        raise ValueError(f"lokr_w1 columns x lokr_w2 columns = {c_cols} x {d_cols} = {c_cols * d_cols} is not "
                         f"in_features={in_features}; their column counts must multiply to it")


def lokr_factors(**factors: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(w1, w2): each side as given, or the product of its pair computed in the accumulation dtype
    (differentiable; the small a x c / b x d products PEFT forms too)."""
    out = []
    for side in ("lokr_w1", "lokr_w2"):
        whole = factors.get(side)
        if whole is None:
            a, b = factors[side + "_a"], factors[side + "_b"]
            acc = acc_dtype(a.dtype)
            whole = a.to(acc) @ b.to(acc)
        out.append(whole)
    return out[0], out[1]


def _lokr_operands(weight: Tensor, anchor_name: str, anchor: Tensor, factors: dict) -> tuple[Tensor, Tensor]:
    check_lokr_factors(*weight.shape, **factors)
    given = tuple((name, t) for name, t in factors.items() if t is not None)
    adapter_compute_dtype(anchor_name, anchor, given)
    w1, w2 = lokr_factors(**factors)
    # a product of half factors is formed in float32: the op then sees PEFT's mixed layout
    if w1.dtype != w2.dtype:
        w1, w2 = w1.to(torch.float32), w2.to(torch.float32)
    return w1, w2


def lokr_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], scaling: float, *,
                lokr_w1: Optional[Tensor] = None, lokr_w1_a: Optional[Tensor] = None,
                lokr_w1_b: Optional[Tensor] = None, lokr_w2: Optional[Tensor] = None,
                lokr_w2_a: Optional[Tensor] = None, lokr_w2_b: Optional[Tensor] = None) -> Tensor:
    """LoKr's layer as PEFT computes it, differentiable in x, bias and the given factors.

    x (..., in); weight (out, in) frozen, any strides; bias (out,) or None; each side of the Kronecker
    product whole (``lokr_w1`` (a, c), ``lokr_w2`` (b, d)) or factored (``lokr_w1_a`` (a, r) and
    ``lokr_w1_b`` (r, c), ...), with a b = out and c d = in, in x's dtype or float32 on a float16 /
    bfloat16 x; scaling (alpha / r) read at call time.
    """
    out_features, in_features = _check_base(x, weight, bias)
    factors = dict(lokr_w1=lokr_w1, lokr_w1_a=lokr_w1_a, lokr_w1_b=lokr_w1_b, lokr_w2=lokr_w2, lokr_w2_a=lokr_w2_a,
                   lokr_w2_b=lokr_w2_b)
    w1, w2 = _lokr_operands(weight, "x", x, factors)
    y = lokr_linear_op(x.reshape(-1, in_features), weight, bias, w1, w2, float(scaling))
    return y.reshape(*x.shape[:-1], out_features)


def lokr_merged_weight(weight: Tensor, scaling: float, **factors: Optional[Tensor]) -> Tensor:
    """W + s kron(w1, w2) (out, in) in W's dtype, summed in the accumulation dtype (no gradient)."""
    _validate.tensor("weight", weight, ndim=2)
    with torch.no_grad():
        w1, w2 = _lokr_operands(weight, "weight", weight,
                                {k: (None if v is None else v.detach()) for k, v in factors.items()})
        return lokr_merged_weight_op(weight.detach(), w1, w2, float(scaling))
