"""dora_norm family: DoRA's factored weight norm and fused DoRA / DeLoRA linear layers.

Factored norm (never forms B @ A, never a d_out x d_in temporary beyond the frozen W itself)::

    ||W + s B A||_row^2 = ||W||_row^2 + 2 s rowsum((W A^T) o B) + s^2 rowsum((B (A A^T)) o B)

||W||_row^2 is cached per weight (:class:`RowSqNormCache`): W is frozen, and the cache is
invalidated by anything that replaces or writes W through autograd-visible ops (PEFT's
merge/unmerge replace ``weight.data``; ``load_state_dict`` and ``torch.no_grad(): w.copy_``
bump the version counter).  Writes through ``weight.data.<op>_`` bypass the version counter:
call :meth:`RowSqNormCache.clear` after such a write.

Zero-norm rows: n = max(sqrt(max(n^2, 0)), NORM_EPS) with NORM_EPS = 1e-12 (the eps of
``F.normalize``).  PEFT divides by the raw norm and returns NaN on a row where W + s B A is zero
(peft#2049); every other row is identical.  The norm sums run in float32 for half inputs.

Backends: "torch" (CPU path, this file) and "triton" for the norm pieces
(``fastadapt.triton_kernels.dora_norm``), picked per call by :func:`fastadapt.backend.select`;
float64 always runs torch (tl.dot has no float64).  On the torch path the scale g = m / n is
folded into W's rows (a d_out x d_in pass, freed before the forward returns) instead of an
N x d_out pass.  On the triton backend DoRA's forward GEMM carries g, the low-rank term and the
bias in its epilogue, and dx's GEMM applies g to the dY tiles as it loads them
(``scaled_lowrank_gemm``); the skinny GEMMs (x A^T, dY B, dA, dB), dm and the dropout path
(two GEMMs with W) use torch.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _validate
from ..backend import select
from ..reference.dora import DELORA_NORM_CLAMP, check_magnitude

METHODS = ("dora", "delora")
TRITON_METHODS = ("dora", "delora")

NORM_EPS = 1e-12


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weight_row_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W_j||^2 per output row j of W (out, in), accumulated in float32 (float64 for float64)."""
    return torch.linalg.vector_norm(weight.detach(), dim=1, dtype=_acc_dtype(weight.dtype)).square()


class RowSqNormCache:
    """Caches ||W||_row^2 of one frozen weight.

    The entry is valid while W's storage is the same live storage object (a weak reference,
    so a freed storage whose address is reused does not match), at the same offset, shape,
    strides, dtype and version counter.
    """

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self._storage_ref = None
        self._key = None
        self._value = None

    @staticmethod
    def _key_of(weight: torch.Tensor):
        return (weight.storage_offset(), tuple(weight.shape), weight.stride(), weight.dtype, weight.device,
                weight._version)

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        storage = weight.untyped_storage()
        key = self._key_of(weight)
        if self._storage_ref is None or self._storage_ref() is not storage or self._key != key:
            self._value = weight_row_sq_norm(weight)
            self._storage_ref = weakref.ref(storage)
            self._key = key
        return self._value


def _norm_from_pieces(w_sq, cross, quad, scaling: float) -> torch.Tensor:
    sq = w_sq + 2.0 * scaling * cross + scaling * scaling * quad
    return sq.clamp_min(0).sqrt().clamp_min(NORM_EPS)


def _dora_norm_torch(weight, lora_A, lora_B, scaling, w_sq):
    acc = w_sq.dtype
    a, b = lora_A.to(acc), lora_B.to(acc)
    wa = (weight @ lora_A.T).to(acc)            # (out, r): W A^T, a thin GEMM
    cross = (wa * b).sum(dim=1)                 # rowsum((W A^T) o B)
    quad = ((b @ (a @ a.T)) * b).sum(dim=1)     # rowsum((B (A A^T)) o B)
    return _norm_from_pieces(w_sq, cross, quad, scaling)


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     weight_sq_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """n_j = ||W_j + s (B A)_j|| for W (out, in), A (r, in), B (out, r); detached, float32
    (float64 for float64 inputs).  ``weight_sq_norm``: cached ||W||_row^2 (computed if None)."""
    _validate.tensor("weight", weight, ndim=2)
    out_features, in_features = weight.shape
    _validate.tensor("lora_A", lora_A, ndim=2)
    _validate.rank(lora_A.shape[0], in_features, out_features)
    _validate.tensor("lora_A", lora_A, shape=(lora_A.shape[0], in_features))
    _validate.tensor("lora_B", lora_B, shape=(out_features, lora_A.shape[0]))
    _validate.same("weight", weight, "lora_A", lora_A)
    _validate.same("weight", weight, "lora_B", lora_B)
    with torch.no_grad():
        w_sq = weight_row_sq_norm(weight) if weight_sq_norm is None else weight_sq_norm
        # float64 always runs the torch path: tl.dot has no float64.
        if weight.dtype != torch.float64 and select("dora_norm", weight.device, ("torch", "triton")) == "triton":
            from ..triton_kernels.dora_norm import dora_norm_forward
            return dora_norm_forward(weight, lora_A, lora_B, float(scaling), w_sq)
        return _dora_norm_torch(weight, lora_A, lora_B, float(scaling), w_sq)


# ----------------------------------------------------------------------------------------------
# Dropout masks kept as one bit per element.

# Packing 8 mask bytes (each 0 or 1, little-endian in one int64) into one byte: byte i of v moves
# to bit 56 + i under v * sum_i 2^(56 - 7 i); every other partial product lands on a distinct bit
# outside 56..63 (8 i - 7 j = 8 i' - 7 j' forces i = i', j = j'), so no carry reaches those bits
# (the product wraps mod 2^64; >> 56 then the cast to uint8 keeps exactly bits 56..63).
_PACK_MAGIC = 0x0102040810204080
_UNPACK_TABLES: dict = {}


def _unpack_table(dtype: torch.dtype, device, p: float) -> torch.Tensor:
    """(256, 8): row k holds the 8 mask values byte k encodes (0 or nn.Dropout's 1 / (1 - p))."""
    key = (dtype, device, p)
    if key not in _UNPACK_TABLES:
        keep_value = torch.ones(1, dtype=dtype, device=device).div_(1 - p)  # bit-equal to F.dropout's
        bits = (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
        _UNPACK_TABLES[key] = bits.to(dtype) * keep_value
    return _UNPACK_TABLES[key]


def draw_dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, packed): the mask ``F.dropout(x, p, training=True)`` uses on CPU, drawn the same way
    from the default generator (``bernoulli_(1 - p)`` then ``div_(1 - p)``), so a fused forward
    and PEFT's nn.Dropout see the same mask for the same seed; and the mask packed to one bit
    per element (uint8, bytes(x) / 32 for float32 x) for backward.

    Saving 1 bit beats redrawing on CPU: ``bernoulli_`` costs ~19 ms at 2048 x 1024, packing ~1 ms
    and unpacking (a 256-row table lookup) ~0.7 ms (benchmarks/NOTES.md, dora_norm).
    """
    noise = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    noise.bernoulli_(1 - p)
    keep = noise.to(torch.uint8).reshape(-1)
    pad = (-keep.numel()) % 8
    if pad:
        keep = F.pad(keep, (0, pad))
    packed = ((keep.view(torch.int64) * _PACK_MAGIC) >> 56).to(torch.uint8)
    return noise.div_(1 - p), packed


def unpack_dropout(packed: torch.Tensor, shape, dtype: torch.dtype, p: float) -> torch.Tensor:
    """The mask of :func:`draw_dropout` again, bit for bit, from its packed bits."""
    numel = 1
    for size in shape:
        numel *= size
    table = _unpack_table(dtype, packed.device, p)
    return torch.index_select(table, 0, packed.to(torch.int32)).view(-1)[:numel].view(shape)


# ----------------------------------------------------------------------------------------------
# DoRA

@dataclass(frozen=True)
class DoraPlan:
    """Non-tensor settings of one fused DoRA call (read at call time, never cached)."""

    scaling: float
    dropout_p: float = 0.0
    recompute: bool = False
    backend: str = "torch"


class DoraLinearFunction(torch.autograd.Function):
    """Fused DoRA linear on 2-D x (N, in); PEFT's gradients (the norm n is a constant).

    Notation: W (out, in) frozen, A (r, in), B (out, r), m (out,), s scaling, n the detached norm,
    g = m / n, x_d = x * mask (mask = 1 without dropout), u = x_d A^T (N, r).

    Forward without dropout (one GEMM with W; g folded into W's rows, never into an N x out pass;
    on the triton backend g, the low-rank term and b sit in the GEMM's epilogue instead):
        y = x (g o W)^T + u (s g o B)^T + b
    Forward with dropout (PEFT corrects the base output of the un-dropped x: two GEMMs with W):
        y_pre = x_d W^T + s u B^T,     y = (x - x_d) W^T + b + g o y_pre
    Backward, with dY (N, out):
        v   = dY (s g o B)                      (N, r)
        dx  = dY (g o W) + v A                  without dropout (triton: g applied to dY tiles on load)
        dx  = dY W + mask o (dY ((g - 1) o W) + v A)       with dropout
        dA  = v^T x_d,   dB = (s g) o (dY^T u),   db = colsum(dY)
        dm  = colsum(dY o y_pre) / n
    What is saved (besides parameters):
        default, no dropout: x, u and the output y; y_pre is recovered as (y - b) / g, so
                  dm = (colsum(dY o y) - b colsum(dY)) / m.  (If some m_j == 0 the call runs
                  as ``recompute`` instead: y carries no information on that row.)
        default, dropout:   x, u, y_pre (not recoverable from y) and the 1-bit packed mask.
        recompute=True:     x, u (and the packed mask); y_pre = x_d W^T + s u B^T is recomputed
                  in backward: one more GEMM with W, about +0.5x the frozen layer's time.
    Saved bytes as a multiple of bytes(x), float32: 2 + r/in (+ 1/32 with dropout) by default,
    1 + r/in (+ 1/32) with recompute.  Because the default saves the output itself, modifying
    it in place before backward (e.g. ``nn.ReLU(inplace=True)`` right after the layer) makes
    autograd raise its "modified by an inplace operation" error; use recompute=True there.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, plan: DoraPlan):
        s = plan.scaling
        acc = weight_norm.dtype
        g = (magnitude.detach().to(acc) / weight_norm).to(x.dtype)       # (out,)
        b_scaled = lora_B * (s * g)[:, None]
        recompute = plan.recompute or bool((magnitude == 0).any())
        packed = None
        if plan.dropout_p == 0 and plan.backend == "triton":
            from ..triton_kernels.dora_norm import scaled_lowrank_gemm
            u = x @ lora_A.T
            y = scaled_lowrank_gemm(x, weight.T, u, (lora_B * s).T, out_scale=g.to(torch.float32), bias=bias)
            y_pre = None
        elif plan.dropout_p == 0:
            u = x @ lora_A.T
            y = F.linear(x, weight * g[:, None], bias)
            y.addmm_(u, b_scaled.T)
            y_pre = None
        else:
            mask, packed = draw_dropout(x, plan.dropout_p)
            x_d = x * mask
            u = x_d @ lora_A.T
            y_pre = x_d @ weight.T
            y_pre.addmm_(u, lora_B.T, alpha=s)
            y = F.linear(x - x_d, weight, bias)
            y.addcmul_(y_pre, g)
            del x_d, mask
        saved_out = None if recompute else (y if plan.dropout_p == 0 else y_pre)
        ctx.save_for_backward(x, u, weight, bias, lora_A, lora_B, magnitude, weight_norm, saved_out, packed)
        ctx.plan = plan
        ctx.recompute = recompute
        return y

    @staticmethod
    def backward(ctx, dy):
        x, u, weight, bias, lora_A, lora_B, magnitude, weight_norm, saved_out, packed = ctx.saved_tensors
        plan: DoraPlan = ctx.plan
        s = plan.scaling
        acc = weight_norm.dtype
        g = (magnitude.detach().to(acc) / weight_norm).to(x.dtype)
        v = dy @ (lora_B * (s * g)[:, None])                      # (N, r)
        mask = None if packed is None else unpack_dropout(packed, x.shape, x.dtype, plan.dropout_p)
        dx = d_a = d_b = d_m = d_bias = None
        if ctx.needs_input_grad[0]:
            if mask is None and plan.backend == "triton":
                from ..triton_kernels.dora_norm import scaled_lowrank_gemm
                dx = scaled_lowrank_gemm(dy, weight, v, lora_A, k_scale=g.to(torch.float32))
            elif mask is None:
                dx = dy @ (weight * g[:, None])
                dx.addmm_(v, lora_A)
            else:
                inner = dy @ (weight * (g - 1)[:, None])
                inner.addmm_(v, lora_A)
                dx = dy @ weight
                dx.addcmul_(inner, mask)
                del inner
        x_d = x if mask is None else x * mask
        if ctx.needs_input_grad[3]:
            d_a = v.T @ x_d
        if ctx.needs_input_grad[4]:
            d_b = ((u.T @ dy) * (s * g)).T  # u^T dY is the faster layout for BLAS (r rows)
        if ctx.needs_input_grad[5]:
            if ctx.recompute:
                y_pre = x_d @ weight.T
                y_pre.addmm_(u, lora_B.T, alpha=s)
                d_m = torch.linalg.vecdot(dy.to(acc), y_pre.to(acc), dim=0) / weight_norm
            elif mask is None:  # saved_out is y: y_pre = (y - b) / g
                dot = torch.linalg.vecdot(dy.to(acc), saved_out.to(acc), dim=0)
                if bias is not None:
                    dot = dot - bias.detach().to(acc) * dy.sum(dim=0, dtype=acc)
                d_m = dot / magnitude.detach().to(acc)
            else:  # saved_out is y_pre
                d_m = torch.linalg.vecdot(dy.to(acc), saved_out.to(acc), dim=0) / weight_norm
            d_m = d_m.to(magnitude.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            d_bias = dy.sum(dim=0)
        return dx, None, d_bias, d_a, d_b, d_m, None, None


def _check_frozen(name: str, t: torch.Tensor) -> None:
    if t.requires_grad:
        raise ValueError(f"{name} requires grad; the fused path needs it frozen ({name}.requires_grad_(False))")


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float, *, dropout_p: float = 0.0,
                recompute: bool = False, weight_sq_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DoRA's forward as PEFT computes it, differentiable in x, lora_A, lora_B, magnitude, bias.

    x (..., in); weight (out, in) frozen (pass ``weight.T`` for fan_in_fan_out storage); bias
    (out,) or None; lora_A (r, in); lora_B (out, r); magnitude (out,) = ``lora_magnitude_vector``.
    ``dropout_p > 0`` draws the dropout mask from the default generator exactly as nn.Dropout
    does on CPU (training-mode semantics; pass 0 in eval).  ``recompute``: save only x (see
    :class:`DoraLinearFunction` for what each mode saves and costs).
    """
    _validate.tensor("x", x, min_ndim=1)
    _validate.tensor("weight", weight, ndim=2)
    out_features, in_features = weight.shape
    check_magnitude(magnitude, out_features)
    _validate.tensor("x", x, shape=(*x.shape[:-1], in_features))
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("magnitude", magnitude)):
        _validate.same("x", x, name, t)
    if bias is not None:
        _validate.tensor("bias", bias, shape=(out_features,))
        _validate.same("x", x, "bias", bias)
    _check_frozen("weight", weight)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1), e.g. dropout_p=0.1")
    norm = dora_weight_norm(weight, lora_A, lora_B, scaling, weight_sq_norm)
    backend = "torch" if x.dtype == torch.float64 else select("dora_norm", x.device, ("torch", "triton"))
    plan = DoraPlan(float(scaling), float(dropout_p), bool(recompute), backend)
    x2d = x.reshape(-1, in_features)
    y = DoraLinearFunction.apply(x2d, weight, bias, lora_A, lora_B, magnitude, norm, plan)
    return y.reshape(*x.shape[:-1], out_features)


# ----------------------------------------------------------------------------------------------
# DeLoRA

def delora_component_scale(lora_A: torch.Tensor, lora_B: torch.Tensor, delora_lambda: torch.Tensor):
    """(c, a_norm, b_norm, a_live, b_live): c_i = lambda / r / (max(||A_i||, 1e-4) max(||B_:,i||, 1e-4)),
    all (r,) in float32 (float64 for float64); ``*_live`` marks norms at or above the clamp (where
    the clamp passes gradient, as torch.clamp does)."""
    acc = _acc_dtype(lora_A.dtype)
    r = lora_A.shape[0]
    a_norm = torch.linalg.vector_norm(lora_A.detach(), dim=1, dtype=acc)
    b_norm = torch.linalg.vector_norm(lora_B.detach(), dim=0, dtype=acc)
    a_live, b_live = a_norm >= DELORA_NORM_CLAMP, b_norm >= DELORA_NORM_CLAMP
    c = delora_lambda.detach().to(acc) / r / (a_norm.clamp_min(DELORA_NORM_CLAMP) * b_norm.clamp_min(DELORA_NORM_CLAMP))
    return c, a_norm, b_norm, a_live, b_live


@dataclass(frozen=True)
class DeloraPlan:
    """Non-tensor settings of one fused DeLoRA call."""

    dropout_p: float = 0.0
    backend: str = "torch"


class DeloraLinearFunction(torch.autograd.Function):
    """Fused DeLoRA linear on 2-D x (N, in), PEFT's forward and gradients.

    Notation: W (out, in) frozen, w = delora_w_norm (in,) frozen, A (r, in), B (out, r),
    lambda (1,), c_i = lambda / r / (||A_i|| ||B_:,i||) (norms clamped at 1e-4),
    A_w = A o w[None, :] (r, in), x_d = x * mask, u = x_d A_w^T (N, r):
        y = x W^T + b + (u o c) B^T
    x o w is never formed: (x o w) A^T = x (A o w)^T.  On the triton backend the low-rank term
    and the bias sit in the epilogue of the GEMM with W (``scaled_lowrank_gemm``), forward and dx
    (dx without dropout).  Backward, with dY (N, out):
        t   = dY B                     (N, r)
        dx  = dY W + mask o ((t o c) A_w)
        dc  = colsum(t o u)
        dA  = ((t o c)^T x_d) o w  +  (-dc c / ||A_i||^2) A_i       (second term where ||A_i|| >= 1e-4)
        dB  = (dY^T u) o c         +  (-dc c / ||B_:,i||^2) B_:,i   (second term where ||B_:,i|| >= 1e-4)
        dlambda = sum_i dc_i c_i / lambda, computed as sum_i dc_i / (r ||A_i|| ||B_:,i||)
    Saved (besides parameters and buffers): x, u and with dropout the 1-bit packed mask:
    1 + r/in (+ 1/32) times bytes(x) for float32 x.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, delora_lambda, w_norm, plan: DeloraPlan):
        c, *_ = delora_component_scale(lora_A, lora_B, delora_lambda)
        a_w = lora_A * w_norm
        packed = None
        if plan.dropout_p == 0:
            u = x @ a_w.T
        else:
            mask, packed = draw_dropout(x, plan.dropout_p)
            u = (x * mask) @ a_w.T
            del mask
        b_c = lora_B * c.to(lora_B.dtype)
        if plan.backend == "triton":
            from ..triton_kernels.dora_norm import scaled_lowrank_gemm
            y = scaled_lowrank_gemm(x, weight.T, u, b_c.T, bias=bias)
        else:
            y = F.linear(x, weight, bias)
            y.addmm_(u, b_c.T)
        ctx.save_for_backward(x, u, weight, bias, lora_A, lora_B, delora_lambda, w_norm, packed)
        ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, dy):
        x, u, weight, bias, lora_A, lora_B, delora_lambda, w_norm, packed = ctx.saved_tensors
        r = lora_A.shape[0]
        c, a_norm, b_norm, a_live, b_live = delora_component_scale(lora_A, lora_B, delora_lambda)
        a_w = lora_A * w_norm
        acc = c.dtype
        t = dy @ lora_B
        tc = t * c.to(t.dtype)
        mask = None if packed is None else unpack_dropout(packed, x.shape, x.dtype, ctx.plan.dropout_p)
        dx = d_bias = d_a = d_b = d_lambda = None
        if ctx.needs_input_grad[0]:
            if mask is None and ctx.plan.backend == "triton":
                from ..triton_kernels.dora_norm import scaled_lowrank_gemm
                dx = scaled_lowrank_gemm(dy, weight, tc, a_w)
            elif mask is None:
                dx = dy @ weight
                dx.addmm_(tc, a_w)
            else:
                dx = dy @ weight
                dx.addcmul_(tc @ a_w, mask)
        if bias is not None and ctx.needs_input_grad[2]:
            d_bias = dy.sum(dim=0)
        dc = torch.linalg.vecdot(t.to(acc), u.to(acc), dim=0)             # (r,), accumulated in acc
        if ctx.needs_input_grad[3]:
            x_d = x if mask is None else x * mask
            d_an = torch.where(a_live, -dc * c / a_norm.clamp_min(DELORA_NORM_CLAMP), 0)
            radial = (d_an / a_norm.clamp_min(DELORA_NORM_CLAMP))[:, None] * lora_A.to(acc)
            d_a = ((tc.T @ x_d) * w_norm + radial).to(lora_A.dtype)
        if ctx.needs_input_grad[4]:
            d_bn = torch.where(b_live, -dc * c / b_norm.clamp_min(DELORA_NORM_CLAMP), 0)
            radial = lora_B.to(acc) * (d_bn / b_norm.clamp_min(DELORA_NORM_CLAMP))
            d_b = ((u.T @ dy).T * c.to(dy.dtype) + radial).to(lora_B.dtype)
        if ctx.needs_input_grad[5]:
            inv = 1.0 / (r * a_norm.clamp_min(DELORA_NORM_CLAMP) * b_norm.clamp_min(DELORA_NORM_CLAMP))
            d_lambda = (dc * inv).sum().reshape(1).to(delora_lambda.dtype)
        return dx, None, d_bias, d_a, d_b, d_lambda, None, None


def delora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], delora_A: torch.Tensor,
                  delora_B: torch.Tensor, delora_lambda: torch.Tensor, delora_w_norm: torch.Tensor, *,
                  dropout_p: float = 0.0) -> torch.Tensor:
    """DeLoRA's forward as PEFT computes it, differentiable in x, delora_A, delora_B, delora_lambda, bias.

    x (..., in); weight (out, in) frozen; delora_A (r, in); delora_B (out, r); delora_lambda (1,);
    delora_w_norm (in,) frozen.  ``dropout_p > 0``: PEFT's module_dropout in training, the mask
    drawn from the default generator exactly as nn.Dropout does on CPU.
    """
    _validate.tensor("x", x, min_ndim=1)
    _validate.tensor("weight", weight, ndim=2)
    out_features, in_features = weight.shape
    _validate.tensor("x", x, shape=(*x.shape[:-1], in_features))
    _validate.tensor("delora_A", delora_A, ndim=2)
    r = _validate.rank(delora_A.shape[0], in_features, out_features)
    _validate.tensor("delora_A", delora_A, shape=(r, in_features))
    _validate.tensor("delora_B", delora_B, shape=(out_features, r))
    _validate.tensor("delora_lambda", delora_lambda, shape=(1,))
    _validate.tensor("delora_w_norm", delora_w_norm, shape=(in_features,))
    for name, t in (("weight", weight), ("delora_A", delora_A), ("delora_B", delora_B),
                    ("delora_lambda", delora_lambda), ("delora_w_norm", delora_w_norm)):
        _validate.same("x", x, name, t)
    if bias is not None:
        _validate.tensor("bias", bias, shape=(out_features,))
        _validate.same("x", x, "bias", bias)
    _check_frozen("weight", weight)
    _check_frozen("delora_w_norm", delora_w_norm)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1), e.g. dropout_p=0.1")
    backend = "torch" if x.dtype == torch.float64 else select("dora_norm", x.device, ("torch", "triton"))
    y = DeloraLinearFunction.apply(x.reshape(-1, in_features), weight, bias, delora_A, delora_B, delora_lambda,
                                   delora_w_norm, DeloraPlan(float(dropout_p), backend))
    return y.reshape(*x.shape[:-1], out_features)
