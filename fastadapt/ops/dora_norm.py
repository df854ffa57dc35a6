"""dora_norm family: DoRA's factored weight norm and fused DoRA / DeLoRA linear layers.

Factored norm (never forms B @ A, never a d_out x d_in temporary beyond the frozen W itself)::

    ||W + s B A||_row^2 = ||W||_row^2 + 2 s rowsum((W A^T) o B) + s^2 rowsum((B (A A^T)) o B)

n = max(sqrt(max(n^2, 0)), NORM_EPS) with NORM_EPS = 1e-12 (the eps of ``F.normalize``): PEFT
divides by the raw norm and returns NaN on a row where W + s B A is zero (peft#2049); every other
row is identical.  The sums run in float32 for half inputs (float64 for float64).  ||W||_row^2 is
cached per frozen weight inside the op (:data:`WEIGHT_SQ_NORMS`, a :class:`RowSqNormCache`): an
entry is valid while W is the same live storage at the same offset, shape, strides, dtype and
version counter, so PEFT's merge/unmerge (which replace ``weight.data``), ``load_state_dict`` and
``torch.no_grad(): w.copy_`` invalidate it.  Writes through ``weight.data.<op>_`` bypass the
version counter: call ``WEIGHT_SQ_NORMS.clear()`` after such a write.

The family's ops (``torch.library`` custom ops, see fastadapt.ops._registry), each with a torch
(CPU) and a Triton implementation chosen by the registration, a fake kernel and autograd:

    fastadapt::dora_weight_norm          n (out,), detached; the Triton norm kernel reads W once
    fastadapt::dora_linear               DoRA without dropout          (dora_norm_dora)
    fastadapt::dora_linear_dropout       DoRA with dropout: two GEMMs with W, as PEFT
    fastadapt::delora_linear             DeLoRA, with or without dropout (dora_norm_delora)
and the backward op of each linear op.  Their docstrings give the gradient formulas, what is saved
and the roundings on a half base (the adapter path runs float32 there, the GEMMs with W in the
half dtype, rounded where PEFT rounds them).

Dropout masks come from one of two streams, chosen per call (``dropout_stream``):
"philox" (default): one int64 seed per call (from CPU's default generator, drawn by an op: no
device sync, reproducible under ``torch.manual_seed``, the same under torch.compile); the mask is
Philox(seed, element index) (fastadapt.ops.dropout),
the same bits on CPU (C++) and CUDA (Triton), regenerated in backward and never stored;
nn.Dropout's distribution and 1 / (1 - p) scaling, not its bits.  "torch": nn.Dropout's own draw
from the default generator (bit-identical to PEFT's nn.Dropout on CPU), kept as 1 bit per element
for backward.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from .. import _validate
from ..reference.dora import check_magnitude
from ..testing import randn
from ._dropout_mask import draw_dropout_seed
from ._lowrank_gemm import cast
from ._policy import acc_dtype, adapter_compute_dtype
from ._registry import fused_op
from .dora_norm_delora import delora_component_scale, delora_linear_op
from .dora_norm_dora import dora_linear_dropout_op, dora_linear_op
from .dropout import draw_dropout

METHODS = ("dora", "delora")
TRITON_METHODS = ("dora", "delora")

NORM_EPS = 1e-12
DROPOUT_STREAMS = ("philox", "torch")

__all__ = ["METHODS", "TRITON_METHODS", "NORM_EPS", "DROPOUT_STREAMS", "RowSqNormCache", "WEIGHT_SQ_NORMS",
           "weight_row_sq_norm", "dora_weight_norm", "dora_linear", "delora_linear", "delora_component_scale"]


# ----------------------------------------------------------------------------------------------
# The factored norm

def weight_row_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W_j||^2 per output row j of W (out, in), accumulated in float32 (float64 for float64)."""
    return torch.linalg.vector_norm(weight.detach(), dim=1, dtype=acc_dtype(weight.dtype)).square()


class RowSqNormCache:
    """Caches ||W||_row^2 of frozen weights.

    One entry per live storage (a weak reference: a freed storage whose address is reused does not
    match) and (offset, shape, strides, dtype, device, version counter); entries of an older
    version are dropped when the weight changes.  Inference tensors (no version counter) are not
    cached.
    """

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self._entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.is_inference():
            return weight_row_sq_norm(weight)
        version = weight._version
        key = (weight.storage_offset(), tuple(weight.shape), weight.stride(), weight.dtype, weight.device, version)
        entries = self._entries.setdefault(weight.untyped_storage(), {})
        value = entries.get(key)
        if value is None:
            for stale in [k for k in entries if k[-1] != version]:
                del entries[stale]
            value = entries[key] = weight_row_sq_norm(weight)
        return value


WEIGHT_SQ_NORMS = RowSqNormCache()

# Rows of a half-precision W converted to float32 per block in W A^T for a float32 adapter
# (2^20 elements: a 4 MiB float32 block, never a whole d_out x d_in copy).
_UPCAST_BLOCK_ELEMENTS = 1 << 20


def _weight_times_a_t(weight: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """W A^T (out, r) in A's dtype; a half W with a float32 A is converted exactly, block of rows by block."""
    if weight.dtype == lora_A.dtype:
        return weight @ lora_A.T
    rows = max(1, _UPCAST_BLOCK_ELEMENTS // weight.shape[1])
    return torch.cat([block.to(lora_A.dtype) @ lora_A.T for block in weight.split(rows)])


@fused_op("dora_weight_norm", autocast=False)
def dora_weight_norm_op(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                        weight_sq_norm: Optional[Tensor]) -> Tensor:
    """n = ||W + s B A||_row (out,) in the accumulation dtype; ||W||_row^2 from ``weight_sq_norm``
    or the cache.  No gradient (pass detached A and B): the norm is a constant, as in PEFT."""
    w_sq = WEIGHT_SQ_NORMS.get(weight) if weight_sq_norm is None else weight_sq_norm
    acc = w_sq.dtype
    a, b = cast(lora_A, acc), cast(lora_B, acc)
    # n^2 = ||W||^2 + s rowsum((2 W A^T + s B (A A^T)) o B), W A^T and B (A A^T) both (out, r)
    t = torch.addmm(cast(_weight_times_a_t(weight, lora_A), acc), b, a @ a.T, beta=2.0, alpha=scaling)
    sq = torch.add(w_sq, (t * b).sum(dim=1), alpha=scaling)
    return sq.clamp_min_(0).sqrt_().clamp_min_(NORM_EPS)


@dora_weight_norm_op.impl("triton")
def _(weight, lora_A, lora_B, scaling, weight_sq_norm):
    if weight.dtype == torch.float64 or lora_A.dtype != weight.dtype:   # tl.dot: one dtype, no float64
        return dora_weight_norm_op.implementations["torch"](weight, lora_A, lora_B, scaling, weight_sq_norm)
    from ..triton_kernels import dora_norm as kernels
    w_sq = WEIGHT_SQ_NORMS.get(weight) if weight_sq_norm is None else weight_sq_norm
    return kernels.dora_norm_forward(weight, lora_A, lora_B, scaling, w_sq, eps=NORM_EPS)


@dora_weight_norm_op.fake
def _(weight, lora_A, lora_B, scaling, weight_sq_norm):
    return weight.new_empty(weight.shape[0], dtype=acc_dtype(weight.dtype))


@dora_weight_norm_op.example
def _():
    for dtype, adapter_dtype in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                                 (torch.bfloat16, torch.float32)):
        weight = randn(9, 12, dtype=dtype, seed=1)
        lora_A, lora_B = randn(3, 12, dtype=adapter_dtype, seed=2), randn(9, 3, dtype=adapter_dtype, seed=3)
        yield (weight, lora_A, lora_B, 1.5, None), {}
        yield (weight.T.contiguous().T, lora_A, lora_B, 0.5, weight_row_sq_norm(weight)), {}


def _check_lora(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    _validate.tensor("weight", weight, ndim=2)
    out_features, in_features = weight.shape
    _validate.tensor("lora_A", lora_A, ndim=2)
    _validate.positive_int("r", lora_A.shape[0])  # PEFT accepts r above min(in_features, out_features): so do we
    _validate.tensor("lora_A", lora_A, shape=(lora_A.shape[0], in_features))
    _validate.tensor("lora_B", lora_B, shape=(out_features, lora_A.shape[0]))


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     weight_sq_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """n_j = ||W_j + s (B A)_j|| for W (out, in), A (r, in), B (out, r); detached, float32
    (float64 for float64 inputs).  ``weight_sq_norm``: ||W||_row^2 (from the cache if None)."""
    _check_lora(weight, lora_A, lora_B)
    adapter_compute_dtype("weight", weight, (("lora_A", lora_A), ("lora_B", lora_B)))  # validates
    return dora_weight_norm_op(weight.detach(), lora_A.detach(), lora_B.detach(), float(scaling), weight_sq_norm)


# ----------------------------------------------------------------------------------------------
# Fused layers

def _check_dropout(dropout_p: float, dropout_stream: str) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1), e.g. dropout_p=0.1")
    if dropout_stream not in DROPOUT_STREAMS:
        raise ValueError(f"dropout_stream={dropout_stream!r} is not a mask stream; valid choices: "
                         f"{list(DROPOUT_STREAMS)}")


def _mask_inputs(x: torch.Tensor, p: float, stream: str, dtype: torch.dtype):
    """(seed, bits) of one call's mask: a Philox seed, or nn.Dropout's bits drawn on x's shape in
    ``dtype`` (the dtype PEFT's dropout sees)."""
    if stream == "philox":
        return draw_dropout_seed(), None
    like = x if x.dtype == dtype else torch.empty((), dtype=dtype, device=x.device).expand(x.shape)
    return None, draw_dropout(like, p)[1]


def _check_frozen(name: str, t: torch.Tensor) -> None:
    if t.requires_grad:
        raise ValueError(f"{name} requires grad; the fused path needs it frozen ({name}.requires_grad_(False))")


def _check_base(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[int, int]:
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


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float, *, dropout_p: float = 0.0,
                recompute: bool = False, weight_sq_norm: Optional[torch.Tensor] = None,
                dropout_stream: str = "philox") -> torch.Tensor:
    """DoRA's forward as PEFT computes it, differentiable in x, lora_A, lora_B, magnitude, bias.

    x (..., in); weight (out, in) frozen (pass ``weight.T`` for fan_in_fan_out storage); bias
    (out,) or None; lora_A (r, in); lora_B (out, r); magnitude (out,) = ``lora_magnitude_vector``.
    lora_A, lora_B and magnitude share x's dtype, or are float32 on a float16 / bfloat16 x and W
    (PEFT's default autocast_adapter_dtype).  ``dropout_p > 0``: training-mode dropout (pass 0 in
    eval) with the mask from ``dropout_stream`` ("philox" or "torch", see the module docstring).
    ``recompute``: save x and u only, not y_pre (one more GEMM with W in backward).
    ``weight_sq_norm``: ||W||_row^2 (from the cache if None).  Under ``torch.autocast`` x, W and b
    run in the autocast dtype with the adapter as it is (the output in the autocast dtype, as
    PEFT's lora.Linear).
    """
    out_features, in_features = _check_base(x, weight, bias)
    check_magnitude(magnitude, out_features)
    _check_lora(weight, lora_A, lora_B)
    adapter_compute_dtype("x", x, (("lora_A", lora_A), ("lora_B", lora_B), ("magnitude", magnitude)))  # validates
    _check_dropout(dropout_p, dropout_stream)
    norm = dora_weight_norm_op(weight.detach(), lora_A.detach(), lora_B.detach(), float(scaling), weight_sq_norm)
    x2d = x.reshape(-1, in_features)
    args = (x2d, weight, bias, lora_A, lora_B, magnitude, norm, float(scaling), bool(recompute))
    if dropout_p == 0:
        y = dora_linear_op(*args)[0]
    else:  # PEFT drops x cast to the adapter dtype
        y = dora_linear_dropout_op(*args, float(dropout_p), *_mask_inputs(x2d, dropout_p, dropout_stream,
                                                                         lora_A.dtype))[0]
    return y.reshape(*x.shape[:-1], out_features)


def delora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], delora_A: torch.Tensor,
                  delora_B: torch.Tensor, delora_lambda: torch.Tensor, delora_w_norm: torch.Tensor, *,
                  dropout_p: float = 0.0, dropout_stream: str = "philox") -> torch.Tensor:
    """DeLoRA's forward as PEFT computes it, differentiable in x, delora_A, delora_B, delora_lambda, bias.

    x (..., in); weight (out, in) frozen; delora_A (r, in); delora_B (out, r); delora_lambda (1,);
    delora_w_norm (in,) frozen; the four adapter tensors share x's dtype or are float32 on a
    float16 / bfloat16 x (PEFT's default autocast_adapter_dtype).  ``dropout_p > 0``: PEFT's
    module_dropout in training, the mask from ``dropout_stream`` ("philox" or "torch", see the
    module docstring).  The output has x's dtype, also under ``torch.autocast`` (where x, W and b
    run in the autocast dtype), as PEFT's DeloraLinear returns it.
    """
    out_features, in_features = _check_base(x, weight, bias)
    _validate.tensor("delora_A", delora_A, ndim=2)
    r = _validate.positive_int("r", delora_A.shape[0])  # any r, as PEFT
    _validate.tensor("delora_A", delora_A, shape=(r, in_features))
    _validate.tensor("delora_B", delora_B, shape=(out_features, r))
    _validate.tensor("delora_lambda", delora_lambda, shape=(1,))
    _validate.tensor("delora_w_norm", delora_w_norm, shape=(in_features,))
    adapter_compute_dtype("x", x, (("delora_A", delora_A), ("delora_B", delora_B),  # validates
                                   ("delora_lambda", delora_lambda), ("delora_w_norm", delora_w_norm)))
    _check_frozen("delora_w_norm", delora_w_norm)
    _check_dropout(dropout_p, dropout_stream)
    x2d = x.reshape(-1, in_features)
    seed, bits = _mask_inputs(x2d, dropout_p, dropout_stream, x.dtype) if dropout_p > 0 else (None, None)
    y = delora_linear_op(x2d, weight, bias, delora_A, delora_B, delora_lambda, delora_w_norm, float(dropout_p),
                         seed, bits)[0]
    return y.reshape(*x.shape[:-1], out_features).to(x.dtype)
