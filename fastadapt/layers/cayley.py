"""Cayley-family layers (OFT, PSOFT, SSVD, AntiPaSTO) with PEFT parameter names, and the PEFT bridge.

Each layer wraps a frozen nn.Linear ``base_layer`` and runs fastadapt.ops.cayley:

    OFTLinear        y = (x R_bd) W^T + b             oft_R.weight (n, b(b-1)/2), PEFT's conventions
    PSOFTLinear      y = x W^T + b + s ((xA^T)R^T - xA^T) B^T     psoft_R.weight / vector_a / vector_b
    SSVDLinear       y = x W^T + b + ((xV) R^T (S + dS) - (xV) S) U^T    ssvd_R.weight, ssvd_R.delta_s
    AntiPaSTOLinear  SSVD with R = cayley(alpha Q), S + alpha dS; alpha a float or a per-sample tensor

``merge()`` folds the adapter into base_layer.weight and ``unmerge()`` restores it (exact up to
rounding: OFT unmerges by solving with R_bd, the others subtract the same delta).

Dtypes follow PEFT's defaults: on a float16 / bfloat16 base the adapter parameters are float32
(``autocast_adapter_dtype=True``) or in the base dtype (False), and the frozen SVD factors of
PSOFT / SSVD / AntiPaSTO are float32 either way (PEFT keeps PSOFT's A and B in float32).  The
cores are computed in the factors' dtype, so the adapter path runs in float32 on a half base
and its sum with the half base output is rounded once (fastadapt.ops.cayley_svd).

PEFT_BRIDGE serves peft.tuners.oft.layer.Linear and peft.tuners.psoft.layer.Linear.  PEFT 0.21's
OFT Linear.forward never applies its ``oft_dropout`` (multiplicative block dropout), so the fused
OFT forward equals PEFT's in training too; coft=True (an in-place projection of oft_R every call)
is not served.  PSOFT's input dropout (nn.Dropout on x) runs PEFT's forward while training.
Calls below the measured crossover (``BridgeEntry.min_macs``) run :func:`oft_small_forward` /
:func:`psoft_small_forward`: PEFT's own ops in PEFT's order without PEFT's per-call Python (PSOFT's
dropout included), so PEFT's numbers bit for bit.
Under torch.autocast both run fused with PEFT's semantics: OFT keeps R in oft_R's dtype, rotates
and runs the base product in the autocast dtype and returns x's dtype; PSOFT runs every product
in the autocast dtype and returns it (fastadapt.ops.cayley).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _validate
from ..ops import _policy
from ..ops import cayley as ops
from ..peft import BridgeEntry, hookless, peft_forward
from ._lean import cast_input, run, submodule


def _frozen_linear(base_layer) -> nn.Linear:
    if not isinstance(base_layer, nn.Linear):
        raise TypeError(f"base_layer must be nn.Linear, got {type(base_layer).__name__}")
    base_layer.requires_grad_(False)
    return base_layer


def _adapter_dtype(base_dtype: torch.dtype, autocast_adapter_dtype: bool) -> torch.dtype:
    """PEFT's rule: float32 adapter parameters on a float16 / bfloat16 base unless switched off."""
    return torch.float32 if autocast_adapter_dtype and base_dtype in _policy.HALF_DTYPES else base_dtype


def _factor_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Frozen SVD factors: float32 on a half base (as PEFT keeps PSOFT's A and B)."""
    return torch.float32 if base_dtype in _policy.HALF_DTYPES else base_dtype


class _Packed(nn.Module):
    """Holds ``weight`` (and optional extra parameters) so state-dict keys read like PEFT's."""

    def __init__(self, weight: torch.Tensor, **extra):
        super().__init__()
        self.weight = nn.Parameter(weight)
        for name, value in extra.items():
            setattr(self, name, None if value is None else nn.Parameter(value))


class OFTLinear(nn.Module):
    """OFT / OFTv2 on an nn.Linear: y = (x R_bd) W^T + bias (input-centric; PEFT's OFT layer).

    oft_block_size b (or r = number of blocks; give one, PEFT's rule) must divide in_features;
    ``oft_R.weight`` is (in/b, b(b-1)/2), or (1, ...) with ``block_share``; float32 on a half base
    unless ``autocast_adapter_dtype=False`` (PEFT's rule).
    use_cayley_neumann=True: R_i = PEFT's series for (I+Q)(I-Q)^{-1};  False: exact (I-Q)(I+Q)^{-1}.
    """

    def __init__(self, base_layer: nn.Linear, oft_block_size: int = 0, r: int = 0, *,
                 use_cayley_neumann: bool = True, num_cayley_neumann_terms: int = 5,
                 block_share: bool = False, autocast_adapter_dtype: bool = True):
        super().__init__()
        self.base_layer = _frozen_linear(base_layer)
        d = base_layer.in_features
        if (oft_block_size == 0) == (r == 0):
            raise ValueError(f"give exactly one of oft_block_size or r (got oft_block_size={oft_block_size}, r={r})")
        if oft_block_size:
            _validate.divides("oft_block_size", oft_block_size, d)
        else:
            _validate.divides("r", r, d)
            oft_block_size = d // r
        self.oft_block_size = oft_block_size
        self.r = d // oft_block_size
        self.use_cayley_neumann = use_cayley_neumann
        self.num_cayley_neumann_terms = _validate.positive_int("num_cayley_neumann_terms", num_cayley_neumann_terms)
        self.block_share = block_share
        w = base_layer.weight
        self.oft_R = _Packed(torch.zeros(1 if block_share else self.r, ops.packed_size(oft_block_size),
                                         dtype=_adapter_dtype(w.dtype, autocast_adapter_dtype), device=w.device))
        self.merged = False

    def rotation_blocks(self) -> torch.Tensor:
        return ops.oft_rotation_blocks(self.oft_R.weight, self.oft_block_size,
                                       use_cayley_neumann=self.use_cayley_neumann,
                                       num_cayley_neumann_terms=self.num_cayley_neumann_terms)

    def orthogonality_error(self) -> float:
        """max_i ||R_i^T R_i - I||_F of the current rotation (0 up to rounding in exact mode)."""
        with torch.no_grad():
            return float(ops.orthogonality_error(self.rotation_blocks().float()))

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        return ops.oft_linear(x, self.oft_R.weight, self.oft_block_size, self.base_layer.weight, self.base_layer.bias,
                              use_cayley_neumann=self.use_cayley_neumann,
                              num_cayley_neumann_terms=self.num_cayley_neumann_terms)

    @torch.no_grad()
    def merge(self):
        """W <- W R_bd^T (so that x W'^T = (x R_bd) W^T)."""
        if not self.merged:
            W = self.base_layer.weight
            W.copy_(ops.block_rotate(W, self.rotation_blocks().transpose(-2, -1)))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W <- W' R_bd^{-T}, one b x b solve per block (exact also for the non-orthogonal Neumann R)."""
        if self.merged:
            W = self.base_layer.weight
            R = self.rotation_blocks().expand(self.r, -1, -1)
            chunks = W.unflatten(1, (self.r, self.oft_block_size)).transpose(0, 1).to(R.dtype)  # (n, out, b)
            W.copy_(torch.linalg.solve(R.transpose(-2, -1), chunks, left=False).transpose(0, 1).flatten(1))
            self.merged = False


class _AdditiveMerge(nn.Module):
    """merge / unmerge for layers whose change of W is the additive ``delta_weight()``."""

    merged = False

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base_layer.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base_layer.weight.sub_(self.delta_weight())
            self.merged = False


class PSOFTLinear(_AdditiveMerge):
    """PSOFT on an nn.Linear (PEFT's names and psoft_init):  A = V_r^T (r, in), B = U_r S_r / scaling
    (out, r) from the SVD of W, scaling = psoft_alpha / r, and

        y = x W^T + bias + scaling ((x A^T) R^T - x A^T) B^T,  R = diag(vector_b) cayley(Q) diag(vector_a).
    """

    def __init__(self, base_layer: nn.Linear, r: int, psoft_alpha: float | None = None, *,
                 use_cayley_neumann: bool = False, num_cayley_neumann_terms: int = 5,
                 cayley_neumann_eps: float | None = None, psoft_mag_a: bool = True, psoft_mag_b: bool = True,
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        self.base_layer = _frozen_linear(base_layer)
        _validate.rank(r, base_layer.in_features, base_layer.out_features)
        self.r = r
        self.psoft_alpha = r if psoft_alpha is None else psoft_alpha
        self.scaling = self.psoft_alpha / r
        self.use_cayley_neumann = use_cayley_neumann
        self.num_cayley_neumann_terms = num_cayley_neumann_terms
        self.cayley_neumann_eps = cayley_neumann_eps
        W = base_layer.weight
        U, S, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)
        factor = _factor_dtype(W.dtype)
        self.register_buffer("psoft_A", Vh[:r].to(factor).contiguous())
        self.register_buffer("psoft_B", (U[:, :r] * (S[:r] / self.scaling)).to(factor).contiguous())
        dtype = _adapter_dtype(W.dtype, autocast_adapter_dtype)
        ones = torch.ones(r, dtype=dtype, device=W.device)
        self.psoft_R = _Packed(torch.zeros(ops.packed_size(r), dtype=dtype, device=W.device),
                               vector_a=ones.clone() if psoft_mag_a else None,
                               vector_b=ones.clone() if psoft_mag_b else None)
        self.merged = False

    def core(self) -> torch.Tensor:
        """C = scaling (R - I) in the factors' dtype, read at call time."""
        return _psoft_core(self.psoft_R, self.psoft_A.dtype, scaling=self.scaling,
                           use_cayley_neumann=self.use_cayley_neumann,
                           num_cayley_neumann_terms=self.num_cayley_neumann_terms,
                           cayley_neumann_eps=self.cayley_neumann_eps, size=self.r)

    def delta_weight(self):
        return (self.psoft_B @ self.core() @ self.psoft_A).to(self.base_layer.weight.dtype)

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        return ops.svd_rotation_linear(x, self.base_layer.weight, self.base_layer.bias, self.psoft_A,
                                       self.psoft_B, self.core())


class SSVDLinear(_AdditiveMerge):
    """SSVD on an nn.Linear (arXiv:2509.02830): buffers ssvd_U (out, r), ssvd_S (r,), ssvd_Vh = V^T (r, in)
    from the top-r SVD of W; trainable ssvd_R.weight (packed skew Q) and ssvd_R.delta_s (r,);

        y = x W^T + bias + ((x V) R^T (S + alpha delta_s) - (x V) S) U^T,   R = cayley(alpha Q).

    ``alpha`` (1 for SSVD) is read at every call.  On a half base the factors are float32 and so
    are the parameters unless ``autocast_adapter_dtype=False``.
    """

    def __init__(self, base_layer: nn.Linear, r: int, *, alpha: float = 1.0, autocast_adapter_dtype: bool = True):
        super().__init__()
        self.base_layer = _frozen_linear(base_layer)
        _validate.rank(r, base_layer.in_features, base_layer.out_features)
        self.r = r
        self.alpha = alpha
        W = base_layer.weight
        U, S, Vh = torch.linalg.svd(W.detach().double(), full_matrices=False)
        factor = _factor_dtype(W.dtype)
        self.register_buffer("ssvd_U", U[:, :r].to(factor).contiguous())
        self.register_buffer("ssvd_S", S[:r].to(factor).contiguous())
        self.register_buffer("ssvd_Vh", Vh[:r].to(factor).contiguous())  # V^T (r, in)
        dtype = _adapter_dtype(W.dtype, autocast_adapter_dtype)
        self.ssvd_R = _Packed(torch.zeros(ops.packed_size(r), dtype=dtype, device=W.device),
                              delta_s=torch.zeros(r, dtype=dtype, device=W.device))
        self.merged = False

    def core(self, alpha=None) -> torch.Tensor:
        """C in the factors' dtype (the parameters cast to it), alpha read at call time."""
        alpha = self.alpha if alpha is None else alpha
        dtype = self.ssvd_Vh.dtype
        return ops.ssvd_core(self.ssvd_R.weight.to(dtype), self.ssvd_R.delta_s.to(dtype), self.ssvd_S, alpha)

    def delta_weight(self, alpha=None):
        return (self.ssvd_U @ self.core(alpha) @ self.ssvd_Vh).to(self.base_layer.weight.dtype)

    def forward(self, x, alpha=None):
        if self.merged:
            if alpha is not None:
                raise ValueError("alpha cannot change on a merged layer; unmerge() first")
            return self.base_layer(x)
        return ops.svd_rotation_linear(x, self.base_layer.weight, self.base_layer.bias, self.ssvd_Vh,
                                       self.ssvd_U, self.core(alpha))


class AntiPaSTOLinear(SSVDLinear):
    """AntiPaSTO (arXiv:2601.07473): SSVDLinear with a signed steering strength.

    ``forward(x, alpha)`` with alpha a float, or a (batch,) tensor steering each sample of x
    (batch, ..., in) separately; cayley(-alpha Q) = cayley(alpha Q)^{-1}, alpha = 0 is the frozen layer.
    """


# ----------------------------------------------------------------------------------------------
# PEFT bridge


def _oft_applies(layer, adapter):
    return adapter in layer.oft_R and not layer.oft_R[adapter].coft


def _autocast(x) -> bool:
    return torch.is_autocast_enabled(x.device.type)


def _dtype_reason(layer, x, base, adapter_tensors):
    """None when the call's dtypes run fused (one dtype, PEFT's float32 adapter on a half base, or
    anything under autocast, whose casts the ops apply themselves), else the policy's reason."""
    if x.dtype == base.weight.dtype and all(t.dtype == x.dtype for t in adapter_tensors):
        return None  # the common case, decided without building the policy's sets
    if _autocast(x):
        return None
    return _policy.fallback_reason(layer, x, [base.weight, base.bias], adapter_tensors, casts_x=True)


def _oft_check(layer, adapter, x):
    module = layer.oft_R[adapter]
    if x.ndim < 1 or x.shape[-1] != module.in_features:
        return "input feature size does not match the layer"
    return _dtype_reason(layer, x, layer.get_base_layer(), [module.weight])


def _oft_forward(layer, adapter, x):
    """PEFT OFT Linear: x -> cast to oft_R dtype -> x R_bd -> cast back -> base_layer -> x's dtype,
    as one op (same dtype, float32 oft_R on a half base, or under autocast).  The bridge's check
    and PEFT's layer make the arguments valid: the op is called without re-checking them."""
    module = layer.oft_R[adapter]
    base = layer.get_base_layer()
    terms = module.num_cayley_neumann_terms if module.use_cayley_neumann else 0
    y = ops.fused_oft_linear(x, module.weight, module.block_size, base.weight, base.bias, terms)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _oft_rotation(module, weight, block_size: int) -> torch.Tensor:
    """PEFT's ``OFTRotationModule._cayley_batch(weight, ...)`` inline, the same ops: the skew blocks
    Q (zeros, upper triangle set from oft_R, Q - Q^T), then R = I + 2Q + 2Q^2 + ... + Q^(t-1) (t
    Neumann terms, in place as PEFT adds them) or the exact R = (I - Q)(I + Q)^-1 by a solve with a
    float32-default identity, in oft_R's dtype."""
    blocks = weight.shape[0]
    skew = torch.zeros(blocks, block_size, block_size, device=weight.device, dtype=weight.dtype)
    skew[:, module._buffers["rows"], module._buffers["cols"]] = weight
    skew = skew - skew.transpose(-2, -1)
    if module.use_cayley_neumann:
        terms = module.num_cayley_neumann_terms
        rotation = torch.eye(block_size, device=weight.device, dtype=weight.dtype).repeat(blocks, 1, 1)
        if terms > 1:
            rotation.add_(skew, alpha=2.0)
            if terms > 2:
                power = torch.bmm(skew, skew)
                rotation.add_(power, alpha=2.0)
                for _ in range(3, terms - 1):
                    power = torch.bmm(power, skew)
                    rotation.add_(power, alpha=2.0)
                rotation.add_(torch.bmm(power, skew))
    else:
        eye = torch.eye(block_size, device=weight.device).unsqueeze(0).expand(blocks, block_size, block_size)
        rotation = torch.linalg.solve(eye + skew, eye - skew, left=False)
    return rotation if rotation.dtype == weight.dtype else rotation.to(weight.dtype)


def oft_small_forward(layer, adapter, x):
    """PEFT's OFT ``Linear.forward`` for one adapter, for small calls, as the same ops (fastadapt.peft:
    ``BridgeEntry.small_forward``): x in oft_R's dtype, R = PEFT's Cayley blocks (:func:`_oft_rotation`:
    Neumann series or the exact solve), x rotated block by block (einsum), back to x's dtype,
    base_layer, x's dtype.  PEFT's forward for coft (an in-place projection of oft_R), a 4-D x
    (PEFT unfolds it as a convolution's input) or a module with hooks."""
    module, base = submodule(layer, "oft_R", adapter), layer._modules["base_layer"]
    if module.coft or x.ndim == 4 or not hookless(base, module):
        return peft_forward(layer, x)
    weight = module._parameters["weight"]
    previous_dtype = x.dtype
    required_dtype = previous_dtype   # oft_R's: x's dtype after the layer's input cast
    if previous_dtype != weight.dtype:
        if layer.cast_input_dtype_enabled:
            required_dtype = weight.dtype
        x = x.to(weight.dtype)
    block_size = module.block_size
    rotation = _oft_rotation(module, weight, block_size)
    rank = module.in_features // block_size if module.block_share else module.r
    if module.block_share:
        rotation = rotation.repeat(rank, 1, 1)
    shape = x.shape
    x = torch.einsum("...rk,rkc->...rc", x.reshape(*shape[:-1], rank, block_size), rotation).reshape(shape)
    # PEFT's casts, written as tests: Tensor.to(dtype) returns the tensor itself where it has that dtype
    if x.dtype != required_dtype:
        x = x.to(required_dtype)
    if x.dtype != previous_dtype:
        x = x.to(previous_dtype)
    result = run(base, x)
    return result if result.dtype == previous_dtype else result.to(previous_dtype)


def _psoft_check(layer, adapter, x):
    dropout = layer.psoft_dropout[adapter]
    if layer.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
        return "psoft_dropout > 0 in training"
    return _dtype_reason(layer, x, layer.get_base_layer(), layer._get_psoft_ab_cache_buffers(adapter))


def _psoft_core(module, dtype, **kwargs) -> torch.Tensor:
    """PSOFT's core from an OrthLayer-like module's parameters, computed in ``dtype`` (the A / B
    factors' dtype: PEFT runs the adapter path there, e.g. float32 with bfloat16 psoft_R)."""
    def cast(t):
        return None if t is None else t.to(dtype)
    return ops.psoft_core(cast(module.weight), vector_a=cast(module.vector_a), vector_b=cast(module.vector_b),
                          **kwargs)


def _psoft_forward(layer, adapter, x):
    """PEFT PSOFT Linear: base(x) + scaling ((x A^T) R^T - x A^T) B^T, scaling read now."""
    module = layer.psoft_R[adapter]
    A, B = layer._get_psoft_ab_cache_buffers(adapter)
    base = layer.get_base_layer()
    C = _psoft_core(module, A.dtype, scaling=layer.scaling[adapter], use_cayley_neumann=module.use_cayley_neumann,
                    num_cayley_neumann_terms=int(module.num_cayley_neumann_terms),
                    cayley_neumann_eps=module.cayley_neumann_eps, orth=module.orth, size=module.size)
    return ops.svd_rotation_linear(x, base.weight, base.bias, A.to(x.device), B.to(x.device), C)


def psoft_small_forward(layer, adapter, x):
    """PEFT's PSOFT ``Linear.forward`` for one adapter, for small calls, as the same ops
    (fastadapt.peft: ``BridgeEntry.small_forward``): result = base(x); x' = dropout(x in A's dtype);
    xa = x' A^T; xr = xa R^T (OrthLayer: R = PEFT's ``get_matrix()``, the product in float32 for a
    half x on CPU); result + ((xr - xa) B^T) scaling, in the base output's dtype.  PEFT's forward
    where a module has hooks."""
    base, dropout = layer._modules["base_layer"], submodule(layer, "psoft_dropout", adapter)
    orth = submodule(layer, "psoft_R", adapter)
    if not hookless(base, dropout, orth):
        return peft_forward(layer, x)
    factor_a = layer._modules["_psoft_A_cache"]._buffers[adapter]
    factor_b = layer._modules["_psoft_B_cache"]._buffers[adapter]
    result = run(base, x)
    result_dtype = result.dtype
    # PEFT's casts, written as tests: Tensor.to(...) returns the tensor itself where nothing changes
    x = cast_input(layer, x, factor_a.dtype)
    x = run(dropout, x)
    device, dtype = x.device, x.dtype
    if factor_a.dtype != dtype or factor_a.device != device:
        factor_a = factor_a.to(device=device, dtype=dtype)
    if factor_b.dtype != dtype or factor_b.device != device:
        factor_b = factor_b.to(device=device, dtype=dtype)
    xa = x @ factor_a.t()
    rotation = orth.get_matrix()
    compute_dtype = torch.float32 if xa.device.type == "cpu" and xa.dtype in _policy.HALF_DTYPES else xa.dtype
    xr = (xa if xa.dtype == compute_dtype else xa.to(compute_dtype)) @ (
        rotation if rotation.dtype == compute_dtype else rotation.to(compute_dtype)).t()
    if xr.dtype != xa.dtype:
        xr = xr.to(xa.dtype)
    result = result + (((xr - xa) @ factor_b.t()) * layer.scaling[adapter])
    return result if result.dtype == result_dtype else result.to(result_dtype)


# Each forward reproduces PEFT's under torch.autocast (tests/test_cayley.py: autocast section).
PEFT_BRIDGE = [
    BridgeEntry(peft_class="peft.tuners.oft.layer.Linear", method="oft", forward=_oft_forward,
                applies=_oft_applies, check=_oft_check, autocast=True, min_macs={"cpu": 1 << 30},
                small_forward=oft_small_forward),
    # PEFT 0.21's OFT layer is the input-centric OFTv2: the same entry serves methods=["oftv2"].
    BridgeEntry(peft_class="peft.tuners.oft.layer.Linear", method="oftv2", forward=_oft_forward,
                applies=_oft_applies, check=_oft_check, autocast=True, min_macs={"cpu": 1 << 30},
                small_forward=oft_small_forward),
    BridgeEntry(peft_class="peft.tuners.psoft.layer.Linear", method="psoft", forward=_psoft_forward,
                applies=lambda layer, adapter: adapter in layer.psoft_R, check=_psoft_check, autocast=True,
                min_macs={"cpu": 1 << 30}, small_forward=psoft_small_forward),
]

__all__ = ["AntiPaSTOLinear", "OFTLinear", "PEFT_BRIDGE", "PSOFTLinear", "SSVDLinear"]
