"""Butterfly-family layers (BOFT, GOFT, HRA, ETHER, RoAd) with PEFT's parameter names, and the PEFT bridge.

Each layer wraps a frozen nn.Linear ``base_layer`` and runs fastadapt.ops.butterfly:

    BOFTLinear   y = ((x R) W^T) o s + b     boft_R (m, n_blocks, b, b), boft_s (out, 1); any m on any device
    GOFTLinear   y = (x R^T) W^T + b         goft_theta (log2(block_size), in / 2): Givens butterflies
    HRALinear    y = (x H^T) W^T + b         hra_u (in, r), apply_GS; H in compact WY form
    ETHERLinear  y = (x H) W^T + b           ether_u (n_blocks, in / n_blocks); plus=True adds ether_v and
                 ETHER+: ((x H+) W^T) H+_out + b    ether_u_out, ether_v_out (n_blocks, out / n_blocks)
    RoAdLinear   y = R (x W^T + b)           road_theta, road_alpha; variant road_1 / road_2 / road_4, group_size

``merge()`` folds the adapter into base_layer.weight (RoAd: and the bias) and ``unmerge()``
restores it: BOFT, GOFT, HRA and ETHER rotate back with the transposed chain (their factors are
orthogonal; HRA with apply_GS as PEFT does), ETHER+ and RoAd apply the exact inverse (Woodbury
on ETHER+'s rank-2 blocks, the inverse 2 x 2 pairs for RoAd).

PEFT_BRIDGE serves ``peft.tuners.boft.layer.Linear``, ``peft.tuners.hra.layer.HRALinear`` and
``peft.tuners.road.layer.Linear`` on an nn.Linear base.  PEFT's options: BOFT's ``boft_dropout``
(multiplicative block dropout) is PEFT's own module applied to the fused path's Cayley blocks,
so training draws PEFT's random numbers and masks; PEFT's Conv2d layers (BOFT, HRA) are other
classes and stay PEFT's; several active adapters, RoAd's mixed-adapter batches (adapter_names),
merged layers and a quantized or Conv1D base run PEFT's forward (the bridge's common reasons);
calls under torch.autocast run fused with PEFT's semantics (the ops cast x and W to the autocast
dtype and keep the small adapter tensors in float32; BOFT and HRA return x's dtype, RoAd the
base output's, as PEFT);
dtypes outside PEFT's adapter dtype policy (fastadapt.ops._policy) run PEFT's forward, which
then does whatever PEFT does with them.  BOFT and RoAd calls below the method's crossover
(``BridgeEntry.min_macs``) run PEFT's own ops without PEFT's per-call Python
(``boft_small_forward``, ``road_small_forward``): PEFT's numbers, random draws and autograd graph.

BOFT with n_butterfly_factor > 1.  Without its CUDA block-diagonal extension PEFT builds every
BOFT layer with one factor whatever the config says (with a warning), so a checkpoint trained
with m > 1 on a GPU does not load on such a machine.  :func:`keep_boft_butterfly_factors` gives
PEFT a torch stand-in for that extension (exact, any device), so PEFT models created after the
call keep m, load m > 1 checkpoints anywhere, and ``accelerate`` runs them fused.  It changes
PEFT's behaviour for the whole process, so nothing calls it on import: a user opts in
(``fastadapt.keep_boft_butterfly_factors()``); a checkpoint PEFT wrote without the extension
(m forced to 1 while its config says m) then no longer matches the model its config builds.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import _validate
from ..ops import butterfly as ops
from ..ops._policy import acc_dtype, fallback_reason, is_mixed
from ..peft import BridgeEntry, hookless, peft_forward
from ._lean import cast_input, peft_module, run, submodule
from ._modes import set_mode


def _frozen_linear(base_layer) -> nn.Linear:
    if not isinstance(base_layer, nn.Linear):
        raise TypeError(f"base_layer must be nn.Linear, got {type(base_layer).__name__}")
    base_layer.requires_grad_(False)
    return base_layer


def _param(shape, fill: float, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.full(shape, fill, dtype=like.dtype, device=like.device))


class _Merge(nn.Module):
    """merge / unmerge through ``_merged_weight`` and ``_unmerged_weight`` (bias: ``_merged_bias``)."""

    merged = False

    def _merged_bias(self, bias):
        return bias

    def _unmerged_bias(self, bias):
        return bias

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            base = self.base_layer
            base.weight.copy_(self._merged_weight(base.weight))
            if base.bias is not None:
                base.bias.copy_(self._merged_bias(base.bias))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            base = self.base_layer
            base.weight.copy_(self._unmerged_weight(base.weight))
            if base.bias is not None:
                base.bias.copy_(self._unmerged_bias(base.bias))
            self.merged = False


# ----------------------------------------------------------------------------------------------
# BOFT

class BOFTLinear(_Merge):
    """BOFT on an nn.Linear with PEFT's parameters and conventions (peft.tuners.boft.layer.Linear).

    Give ``boft_block_size`` or ``boft_block_num`` (the other 0, PEFT's rule).  ``boft_R``
    (m, n_blocks, b, b) holds one b x b matrix A per block and factor; the block rotation is
    (I - S)(I + S)^{-1}, S = (A - A^T) / 2.  ``boft_s`` (out, 1) scales the output rows; the bias
    is not scaled.  ValueError at construction when in_features is not divisible by
    b * 2^(m - 1) (m = boft_n_butterfly_factor), naming the valid m.
    """

    def __init__(self, base_layer: nn.Linear, boft_block_size: int = 4, boft_block_num: int = 0,
                 boft_n_butterfly_factor: int = 1):
        super().__init__()
        self.base_layer = _frozen_linear(base_layer)
        d = base_layer.in_features
        if (boft_block_size == 0) == (boft_block_num == 0):
            raise ValueError("give exactly one of boft_block_size or boft_block_num (got "
                             f"boft_block_size={boft_block_size}, boft_block_num={boft_block_num})")
        if boft_block_num:
            _validate.divides("boft_block_num", boft_block_num, d)
            boft_block_size = d // boft_block_num
        ops.check_butterfly(d, boft_block_size, boft_n_butterfly_factor)
        self.boft_block_size = boft_block_size
        self.boft_block_num = d // boft_block_size
        self.boft_n_butterfly_factor = boft_n_butterfly_factor
        w = base_layer.weight
        self.boft_R = _param((boft_n_butterfly_factor, self.boft_block_num, boft_block_size, boft_block_size), 0.0, w)
        self.boft_s = _param((base_layer.out_features, 1), 1.0, w)

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        return ops.boft_linear(x, self.boft_R, self.boft_s, self.base_layer.weight, self.base_layer.bias)

    def _rotate(self, W, transpose):
        blocks = ops.boft_blocks(self.boft_R).to(acc_dtype(W.dtype))
        chain = ops.plan(W.shape[1], self.boft_block_size, self.boft_n_butterfly_factor)
        return ops.butterfly_rotate(W, ops.pass_blocks(blocks, chain), chain, transpose=transpose)

    def _merged_weight(self, W):
        """W' = diag(s) W R^T."""
        return self._rotate(W, True) * self.boft_s

    def _unmerged_weight(self, W):
        """W = diag(1/s) W' R (R orthogonal)."""
        return self._rotate(W / self.boft_s, False)


# ----------------------------------------------------------------------------------------------
# GOFT

class GOFTLinear(_Merge):
    """GOFT (arXiv:2404.04316) on an nn.Linear: ``goft_theta`` (L, in / 2), L = log2(block_size);
    stage k rotates features i and i + 2^k inside each block by its angle (theta = 0: identity).
    ``block_size`` (default in_features) must be a power of two dividing in_features."""

    def __init__(self, base_layer: nn.Linear, block_size: Optional[int] = None):
        super().__init__()
        self.base_layer = _frozen_linear(base_layer)
        d = base_layer.in_features
        block_size = d if block_size is None else block_size
        _validate.divides("block_size", block_size, d)
        if block_size < 2 or block_size & (block_size - 1):
            powers = [2 ** k for k in range(1, d.bit_length()) if d % 2 ** k == 0]
            raise ValueError(f"block_size={block_size} must be a power of two >= 2 dividing in_features={d}; "
                             f"valid choices: {powers or 'none (in_features is odd: Givens rotations pair features)'}")
        self.block_size = block_size
        self.goft_theta = _param((block_size.bit_length() - 1, d // 2), 0.0, base_layer.weight)

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        return ops.goft_linear(x, self.goft_theta, self.base_layer.weight, self.base_layer.bias)

    def _rotate(self, W, transpose):
        chain = ops.goft_plan(W.shape[1], self.goft_theta.shape[0])
        blocks = ops.goft_blocks(self.goft_theta).to(acc_dtype(W.dtype))
        return ops.butterfly_rotate(W, ops.pass_blocks(blocks, chain), chain, transpose=transpose)

    def _merged_weight(self, W):
        """W' = W R."""
        return self._rotate(W, False)

    def _unmerged_weight(self, W):
        return self._rotate(W, True)


# ----------------------------------------------------------------------------------------------
# HRA

class HRALinear(_Merge):
    """HRA on an nn.Linear with PEFT's parameters (peft.tuners.hra.layer.HRALinear): ``hra_u``
    (in, r), column i the normal of reflection i; H = H_1 ... H_r (or I - 2 Q Q^T with
    ``apply_GS``).  ``init_weights=True`` repeats each random column twice (PEFT's init: the
    identity for even r)."""

    def __init__(self, base_layer: nn.Linear, r: int = 8, apply_GS: bool = False, init_weights: bool = True):
        super().__init__()
        self.base_layer = _frozen_linear(base_layer)
        d = base_layer.in_features
        _validate.positive_int("r", r)
        if apply_GS and r > d:
            raise ValueError(f"r={r} exceeds in_features={d}: Gram-Schmidt (apply_GS=True) needs r in 1..{d}")
        self.r, self.apply_GS = r, apply_GS
        w = base_layer.weight
        u = torch.empty(d, r // 2 if (init_weights and r % 2 == 0) else r, dtype=w.dtype, device=w.device)
        nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        self.hra_u = nn.Parameter(torch.repeat_interleave(u, 2, dim=1) if u.shape[1] != r else u)

    def factors(self, dtype):
        U, K = ops.hra_factors(self.hra_u, self.apply_GS)
        return U.to(dtype), K.to(dtype)

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        return ops.hra_linear(x, self.hra_u, self.base_layer.weight, self.base_layer.bias, apply_GS=self.apply_GS)

    def _merged_weight(self, W):
        """W' = W H = W (I - U K^T U^T)."""
        U, K = self.factors(acc_dtype(W.dtype))
        return ops.householder(W, U, K.transpose(-2, -1))

    def _unmerged_weight(self, W):
        """W = W' H^T (H orthogonal; with apply_GS, PEFT's own unmerge assumes the same)."""
        U, K = self.factors(acc_dtype(W.dtype))
        return ops.householder(W, U, K)


# ----------------------------------------------------------------------------------------------
# ETHER

def _woodbury_inverse(U: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """K' with (I - U K U^T)^{-1} = I - U K' U^T per block: K' = (U^T U - K^{-1})^{-1}."""
    gram = U.transpose(-2, -1) @ U
    return torch.linalg.inv(gram - torch.linalg.inv(K))


class ETHERLinear(_Merge):
    """ETHER / ETHER+ (arXiv:2405.20271) on an nn.Linear; not in PEFT.

    ETHER: ``ether_u`` (n_blocks, in / n_blocks), H = blockdiag(I - 2 u u^T / |u|^2) (never the
    identity).  ETHER+ (``plus=True``): also ``ether_v`` and the output side ``ether_u_out``,
    ``ether_v_out`` (n_blocks, out / n_blocks), H+ = blockdiag(I - u u^T / |u|^2 + v v^T / |v|^2);
    v = u (the init) is the identity.
    """

    def __init__(self, base_layer: nn.Linear, n_blocks: int = 1, plus: bool = False):
        super().__init__()
        self.base_layer = _frozen_linear(base_layer)
        _validate.divides("n_blocks", n_blocks, base_layer.in_features)
        if plus:
            _validate.divides("n_blocks", n_blocks, base_layer.out_features, "out_features")
        self.n_blocks, self.plus = n_blocks, plus
        w = base_layer.weight

        def draw(features):
            return nn.Parameter(torch.randn(n_blocks, features // n_blocks, dtype=w.dtype, device=w.device))

        self.ether_u = draw(base_layer.in_features)
        if plus:
            self.ether_v = nn.Parameter(self.ether_u.detach().clone())
            self.ether_u_out = draw(base_layer.out_features)
            self.ether_v_out = nn.Parameter(self.ether_u_out.detach().clone())

    def _sides(self):
        if not self.plus:
            return ops.ether_factors(self.ether_u), None
        return ops.ether_factors(self.ether_u, self.ether_v), ops.ether_factors(self.ether_u_out, self.ether_v_out)

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        base = self.base_layer
        if not self.plus:
            return ops.ether_linear(x, self.ether_u, base.weight, base.bias)
        return ops.ether_linear(x, self.ether_u, base.weight, base.bias, ether_v=self.ether_v,
                                ether_u_out=self.ether_u_out, ether_v_out=self.ether_v_out)

    def _transform(self, W, inverse):
        (U, K), out_side = self._sides()
        dtype = acc_dtype(W.dtype)
        U, K = U.to(dtype), K.to(dtype)
        if inverse and self.plus:
            K = _woodbury_inverse(U, K)
        W = ops.householder(W, U, K)                  # W H_in (H symmetric)
        if out_side is not None:
            U_out, K_out = (t.to(dtype) for t in out_side)
            if inverse:
                K_out = _woodbury_inverse(U_out, K_out)
            W = ops.householder(W.T, U_out, K_out).T  # H_out W
        return W

    def _merged_weight(self, W):
        """W' = H_out W H_in."""
        return self._transform(W, False)

    def _unmerged_weight(self, W):
        """ETHER: H is an involution; ETHER+: the Woodbury inverse of each rank-2 block."""
        return self._transform(W, True)


# ----------------------------------------------------------------------------------------------
# RoAd

def _road_inverse(f: torch.Tensor, g: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(f', g') of R^{-1}: per pair [[f_a, -g_a], [g_b, f_b]]^{-1} = [[f_b, g_a], [-g_b, f_a]] / det."""
    fv, gv = f.view(-1, 2, group_size // 2), g.view(-1, 2, group_size // 2)
    det = fv[:, 0] * fv[:, 1] + gv[:, 0] * gv[:, 1]
    f_inv = torch.stack([fv[:, 1], fv[:, 0]], 1) / det[:, None]
    return f_inv.reshape(-1), (-gv / det[:, None]).reshape(-1)


class RoAdLinear(_Merge):
    """RoAd on an nn.Linear with PEFT's parameters (peft.tuners.road.layer.Linear): output
    feature a (first half of each group of ``group_size``) is paired with a + group_size / 2;
    ``road_theta``, ``road_alpha`` have out / 2 (road_1), out (road_2) or 2 out (road_4) entries.
    ValueError at construction for an odd group_size or one not dividing out_features."""

    def __init__(self, base_layer: nn.Linear, variant: str = "road_1", group_size: int = 64):
        super().__init__()
        self.base_layer = _frozen_linear(base_layer)
        if variant not in ops.ROAD_VARIANTS:
            raise ValueError(f"variant={variant!r} is not a RoAd variant; valid choices: {list(ops.ROAD_VARIANTS)}")
        _validate.even("group_size", group_size)
        _validate.divides("group_size", group_size, base_layer.out_features, "out_features")
        self.variant, self.group_size = variant, group_size
        size = base_layer.out_features * {"road_1": 1, "road_2": 2, "road_4": 4}[variant] // 2
        self.road_theta = _param((size,), 0.0, base_layer.weight)
        self.road_alpha = _param((size,), 1.0, base_layer.weight)

    def coefficients(self, dtype):
        f, g = ops.road_coefficients(self.variant, self.group_size, self.road_theta, self.road_alpha)
        return f.to(dtype), g.to(dtype)

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        return ops.road_linear(x, self.variant, self.group_size, self.road_theta, self.road_alpha,
                               self.base_layer.weight, self.base_layer.bias)

    def _rotate(self, t, inverse):
        """R t along the output features (t: W (out, in) or bias (out,))."""
        f, g = self.coefficients(acc_dtype(t.dtype))
        if inverse:
            f, g = _road_inverse(f, g, self.group_size)
        rows = t.T if t.ndim == 2 else t[None]
        rotated = ops.road_rotate(rows, f, g, self.group_size)
        return rotated.T if t.ndim == 2 else rotated[0]

    def _merged_weight(self, W):
        return self._rotate(W, False)

    def _unmerged_weight(self, W):
        return self._rotate(W, True)

    def _merged_bias(self, bias):
        return self._rotate(bias, False)

    def _unmerged_bias(self, bias):
        return self._rotate(bias, True)


# ----------------------------------------------------------------------------------------------
# PEFT: m > 1 everywhere

class TorchBlockDiagonal:
    """Torch stand-in for PEFT's ``fbd_cuda`` extension on any device: ``forward(blocks)`` with
    blocks (N, D, b, b) returns [(N, D b, D b) block-diagonal], ``backward(grad, blocks)`` returns
    [the diagonal b x b blocks of grad].  Exact; dense like PEFT's own math (only PEFT's forward,
    merge and unmerge use it: the fused path never builds a d x d matrix)."""

    @staticmethod
    def forward(blocks):
        N, D, b, _ = blocks.shape
        dense = torch.diag_embed(blocks.permute(0, 2, 3, 1))           # (N, b, b, D, D)
        return [dense.permute(0, 3, 1, 4, 2).reshape(N, D * b, D * b)]

    @staticmethod
    def backward(grad, blocks):
        N, D, b, _ = blocks.shape
        diagonal = grad.reshape(N, D, b, D, b).diagonal(dim1=1, dim2=3)  # (N, b, b, D)
        return [diagonal.permute(0, 3, 1, 2).contiguous()]


def keep_boft_butterfly_factors() -> None:
    """Give PEFT's BOFT :class:`TorchBlockDiagonal` in place of its CUDA extension, so PEFT builds
    layers created after this call with the configured boft_n_butterfly_factor on any machine
    (instead of forcing 1 where the extension does not build).  Process-wide; see the module
    docstring for what it means for checkpoints written without it."""
    try:
        from peft.tuners.boft import layer as boft_layer
    except ImportError:  # PEFT is optional
        return
    boft_layer.get_fbd_cuda = lambda: TorchBlockDiagonal


# ----------------------------------------------------------------------------------------------
# PEFT bridge

def _features_reason(layer, x) -> Optional[str]:
    if x.ndim < 1 or x.shape[-1] != layer.in_features:
        return "input feature size does not match the layer"
    return None


def boft_check(layer, adapter: str, x) -> Optional[str]:
    base = layer.get_base_layer()
    if x.dtype != base.weight.dtype and not _validate.autocast_casts(x, base.weight):
        return f"x is {x.dtype} but the base weight is {base.weight.dtype} (PEFT's BOFT runs the base in x's dtype)"
    return (_features_reason(layer, x)
            or fallback_reason(layer, x, (base.weight, base.bias), (layer.boft_R[adapter], layer.boft_s[adapter]),
                               casts_x=False))


_BOFT_RECOMPUTE_ATTR = "_fastadapt_boft_recompute"


def boft_forward(layer, adapter: str, x):
    """PEFT's BOFT Linear.forward for one active adapter, fused; ``boft_dropout`` is PEFT's module.
    Saves x and h = (x R) W^T while boft_s trains; x alone after :func:`set_boft_recompute`."""
    base = layer.get_base_layer()
    out = ops.boft_linear(x, layer.boft_R[adapter], layer.boft_s[adapter], base.weight, base.bias,
                          dropout=layer.boft_dropout[adapter],
                          recompute=layer.__dict__.get(_BOFT_RECOMPUTE_ATTR, False))
    return out.to(x.dtype)  # PEFT's output dtype, also under torch.autocast


def set_boft_recompute(model: nn.Module, recompute: bool = True) -> int:
    """Make the fused BOFT forward of every BOFT layer in ``model`` save x alone (``recompute``: h =
    (x R) W^T formed again in backward for boft_s's gradient, one more GEMM, about +0.5 x the frozen
    layer's fwd+bwd) or x and h (default: 2 x bytes(x) at in = out); returns the number of layers set."""
    return set_mode(model, peft_module("boft").BOFTLayer, _BOFT_RECOMPUTE_ATTR, bool(recompute))



def boft_small_forward(layer, adapter: str, x):
    """PEFT's BOFT ``Linear.forward`` for one active adapter, for small calls (fastadapt.peft:
    ``BridgeEntry.small_forward``): the Cayley blocks of boft_R, PEFT's block dropout, the block
    diagonal (PEFT's CUDA extension's autograd function where the layer has it, else block_diag),
    the permutation products, x @ R through the base layer, the output rows scaled around the bias,
    as PEFT's ops.  PEFT's forward where a module has hooks."""
    base, dropout = layer._modules["base_layer"], submodule(layer, "boft_dropout", adapter)
    if not hookless(base, dropout):
        return peft_forward(layer, x)
    previous_dtype = x.dtype
    boft_R = layer._modules["boft_R"]._parameters[adapter]
    boft_s = layer._modules["boft_s"]._parameters[adapter]
    state = layer.__dict__
    boft_rotation = torch.eye(state["in_features"], device=x.device, dtype=previous_dtype)
    boft_scale = torch.ones((int(state["out_features"]), 1), device=x.device, dtype=previous_dtype)
    N, D, H, _ = boft_R.shape
    blocks = dropout.forward(layer.cayley_batch(boft_R.view(N * D, H, H)).view(N, D, H, H))
    if state["fbd_cuda_available"]:
        block_diagonal = peft_module("boft").FastBlockDiag.apply(blocks)
    else:
        block_diagonal = torch.block_diag(*torch.unbind(blocks.squeeze(0))).unsqueeze(0)
    boft_P = layer._buffers["boft_P"].to(x)
    block_diagonal = block_diagonal.to(x)
    butterflies = torch.bmm(boft_P, torch.bmm(block_diagonal, boft_P.permute(0, 2, 1)))
    rotation = butterflies[0]
    for i in range(1, butterflies.shape[0]):
        rotation = butterflies[i] @ rotation
    boft_rotation = rotation @ boft_rotation
    boft_scale = boft_s * boft_scale
    result = run(base, x @ boft_rotation.to(previous_dtype))
    bias = base.bias
    if bias is not None:
        result = result - bias
    result = result * boft_scale.squeeze(-1)
    if bias is not None:
        result = result + bias
    return result.to(previous_dtype)


def hra_check(layer, adapter: str, x) -> Optional[str]:
    base = layer.get_base_layer()
    return (_features_reason(layer, x)
            or fallback_reason(layer, x, (base.weight, base.bias), (layer.hra_u[adapter],), casts_x=True))


def hra_forward(layer, adapter: str, x):
    """PEFT's HRALinear.forward for one active adapter, fused.  A float32 hra_u on a half base
    runs as PEFT does: x, W and the bias in float32, the output rounded to x's dtype once (as
    PEFT, the output is in x's dtype also under autocast)."""
    base = layer.get_base_layer()
    u = layer.hra_u[adapter]
    apply_GS = layer.hra_apply_GS[adapter]
    if is_mixed(x.dtype, u.dtype):
        bias = None if base.bias is None else base.bias.float()
        return ops.hra_linear(x.float(), u, base.weight.float(), bias, apply_GS=apply_GS).to(x.dtype)
    return ops.hra_linear(x, u, base.weight, base.bias, apply_GS=apply_GS).to(x.dtype)


def road_check(layer, adapter: str, x) -> Optional[str]:
    base = layer.get_base_layer()
    return (_features_reason(layer, x)
            or fallback_reason(layer, x, (base.weight, base.bias), (layer.road_theta[adapter], layer.road_alpha[adapter]),
                               casts_x=False))


def road_forward(layer, adapter: str, x):
    """PEFT's RoAd Linear.forward for one active adapter, fused (the rotation in the adapter's
    dtype, float32 on a half base, then rounded to the base output's dtype, as PEFT)."""
    base = layer.get_base_layer()
    return ops.road_linear(x, str(layer.variant[adapter]), layer.group_size[adapter], layer.road_theta[adapter],
                           layer.road_alpha[adapter], base.weight, base.bias)


def road_small_forward(layer, adapter: str, x):
    """PEFT's RoAd ``Linear.forward`` for one active adapter, for small calls (fastadapt.peft:
    ``BridgeEntry.small_forward``): the base output, cast to the adapter's dtype as PEFT casts it,
    rotated by PEFT's ``_apply_road``, back in the base output's dtype.  PEFT's forward where the
    base layer has hooks."""
    base = layer._modules["base_layer"]
    if not hookless(base):
        return peft_forward(layer, x)
    result = run(base, x)
    result_dtype = result.dtype
    road_theta = layer._modules["road_theta"]._parameters[adapter]
    result = cast_input(layer, result, road_theta.dtype)
    state = layer.__dict__
    result = peft_module("road")._apply_road(state["variant"][adapter], state["group_size"][adapter], road_theta,
                                              layer._modules["road_alpha"]._parameters[adapter], result)
    return result.to(result_dtype)


PEFT_BRIDGE = [
    BridgeEntry(peft_class="peft.tuners.boft.layer.Linear", method="boft", forward=boft_forward,
                applies=lambda layer, a: a in layer.boft_R, check=boft_check, autocast=True,
                min_macs={"cpu": 4 << 20}, small_forward=boft_small_forward),
    BridgeEntry(peft_class="peft.tuners.hra.layer.HRALinear", method="hra", forward=hra_forward,
                applies=lambda layer, a: a in layer.hra_u, check=hra_check, autocast=True),
    BridgeEntry(peft_class="peft.tuners.road.layer.Linear", method="road", forward=road_forward,
                applies=lambda layer, a: a in layer.road_theta, check=road_check, autocast=True,
                min_macs={"cpu": 400 << 20}, small_forward=road_small_forward),
]

__all__ = ["BOFTLinear", "ETHERLinear", "GOFTLinear", "HRALinear", "PEFT_BRIDGE", "RoAdLinear", "TorchBlockDiagonal",
           "keep_boft_butterfly_factors", "set_boft_recompute"]
