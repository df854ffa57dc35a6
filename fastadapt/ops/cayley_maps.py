"""Cayley maps: packed skew parameters -> b x b rotations, the construction every Cayley-family
method shares (OFT's blocks, the r x r core of PSOFT / SSVD / AntiPaSTO).

Math (b = block size):

    Packed skew.  packed[..., j] is the j-th strict upper-triangle entry of a block in
    torch.triu_indices order and Q = U - U^T, built as one gather from cat([0, packed, -packed]).
    Its adjoint (dL/dpacked from G = dL/dQ) is G[r, c] - G[c, r] over r < c; the two maps are each
    other's adjoint, hence each other's gradient.

    Exact Cayley.  R = cayley(Q) = (I + Q)(I - Q)^{-1} = 2N - I with N = (I - Q)^{-1} (I - Q has
    symmetric part I: never singular).  dR = 2 N dQ N, so  dL/dQ = 2 N^T G N^T,  N = (R + I) / 2:
    the backward needs only R.  cayley(-Q) = cayley(Q)^T (PEFT's exact OFT convention).

    Neumann (PEFT's k-term series of (I + Q)(I - Q)^{-1}):  k = 1: I;  k = 2: I + 2Q;  k >= 3,
    t = max(3, k - 1):  R = sum_j c_j Q^j with c_0 = 1, c_j = 2 (0 < j < t), c_t = 1.
    Adjoint, P = Q^T:  dL/dQ = sum_j c_j sum_{a + c = j - 1} P^a G P^c, by a two-level Horner
    scheme  S_{t-1} = I, T_{t-1} = G;  S_a = 2I + S_{a+1} P,  T_a = G S_a + P T_{a+1};  dL/dQ = T_0.
    PEFT's default k = 5 in closed form: with S = Q^2 (symmetric) and M = 2I + 2Q + S,
    R = I + 2Q + S M (two products) and  dL/dQ = 2G + 2 S G + D Q^T + Q^T D,  D = G M^T + S G
    (four products).

Ops (``fastadapt::<name>``; the b x b work is tiny, so every op computes in its inputs' dtype with
autocast off inside: under torch.autocast R stays in the parameter's dtype, as PEFT's solve does):

    cayley_skew, cayley_skew_adjoint          packed <-> Q, each other's gradient
    cayley, cayley_backward                   exact map of Q (any leading dims); saves R
    cayley_neumann, cayley_neumann_backward   the series of Q; saves Q
    cayley_packed, cayley_packed_backward     exact map from packed (n, b(b-1)/2); saves R;
                                              triton: one launch each way (in-kernel solve)
    cayley_neumann_packed, ..._backward       the series from packed; saves packed; triton: one
                                              launch each way
Ops without a kernel of their own register the torch implementation for the triton backend too
(on CUDA it runs as cuBLAS / ATen ops).  Every series op runs the divergence monitor
(:mod:`fastadapt.ops.cayley_monitor`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..testing import randn
from . import cayley_monitor
from ._registry import fused_op


def packed_size(block_size: int) -> int:
    return block_size * (block_size - 1) // 2


def _kernels():
    from ..triton_kernels import cayley as kernels
    return kernels


def _on_triton_too(op) -> None:
    """The triton backend runs ``op``'s torch implementation (ATen on CUDA): it has no kernel of its own."""
    op.impl("triton")(op.implementations["torch"])


# ----------------------------------------------------------------------------------------------
# torch building blocks (real tensors only: index tables and identities are cached per device)

_INDEX: dict = {}


def _triangle_index(block_size: int, device) -> tuple[Tensor, Tensor]:
    """Flat positions r*b + c of the strict upper triangle (triu_indices order) and of its mirror."""
    key = ("triangle", block_size, str(device))
    if key not in _INDEX:
        rows, cols = torch.triu_indices(block_size, block_size, 1, device=device)
        _INDEX[key] = (rows * block_size + cols, cols * block_size + rows)
    return _INDEX[key]


def _skew_gather_index(block_size: int, device) -> Tensor:
    """For each of the b*b entries of Q, its position in cat([0, packed, -packed])."""
    key = ("gather", block_size, str(device))
    if key not in _INDEX:
        m = packed_size(block_size)
        upper, lower = _triangle_index(block_size, device)
        source = torch.zeros(block_size * block_size, dtype=torch.long, device=device)
        source[upper] = torch.arange(1, m + 1, device=device)
        source[lower] = torch.arange(m + 1, 2 * m + 1, device=device)
        _INDEX[key] = source
    return _INDEX[key]


def skew_torch(packed: Tensor, block_size: int) -> Tensor:
    extended = torch.cat([packed.new_zeros(*packed.shape[:-1], 1), packed, packed.neg()], -1)
    Q = extended.index_select(-1, _skew_gather_index(block_size, packed.device))
    return Q.unflatten(-1, (block_size, block_size))


def skew_adjoint_torch(grad_Q: Tensor) -> Tensor:
    b = grad_Q.shape[-1]
    upper, lower = _triangle_index(b, grad_Q.device)
    flat = grad_Q.reshape(*grad_Q.shape[:-2], b * b)
    return flat.index_select(-1, upper) - flat.index_select(-1, lower)


def eye_like(t: Tensor) -> Tensor:
    """The b x b identity in t's dtype and device (cached: callers never write to it)."""
    key = ("eye", t.shape[-1], t.dtype, str(t.device))
    if key not in _INDEX:
        _INDEX[key] = torch.eye(t.shape[-1], dtype=t.dtype, device=t.device)
    return _INDEX[key]


def inverse(M: Tensor) -> Tensor:
    """Batched inverse; half precision solves in fp32 (LAPACK has no fp16/bf16).  NaN propagates."""
    if M.dtype in (torch.float16, torch.bfloat16):
        return torch.linalg.inv_ex(M.float())[0].to(M.dtype)
    return torch.linalg.inv_ex(M)[0]


def inverse_transposed(M: Tensor) -> Tensor:
    """M^{-T}, row-major: LAPACK returns batched inverses column-major, so the transposed view of
    inv(M) is contiguous (``contiguous`` only copies where it is not)."""
    return inverse(M).transpose(-2, -1).contiguous()


def cayley_torch(Q: Tensor) -> Tensor:
    """(I + Q)(I - Q)^{-1} = 2 (I - Q)^{-1} - I, with (I - Q)^{-1} = (I + Q)^{-T} (Q skew)."""
    eye = eye_like(Q)
    return 2 * inverse_transposed(eye + Q) - eye


def cayley_adjoint(R: Tensor, grad_R: Tensor) -> Tensor:
    """dL/dQ = 2 N^T G N^T for R = cayley(Q), N = (R + I) / 2 (module docstring)."""
    twice_Nt = R.transpose(-2, -1) + eye_like(R)
    return (twice_Nt @ grad_R @ twice_Nt).mul_(0.5)


def neumann_top(terms: int) -> int:
    """The highest power t = max(3, k - 1) of PEFT's k-term series (k >= 3)."""
    return max(3, terms - 1)


class NeumannSeries:
    """PEFT's ``terms``-term series R of skew blocks Q (..., b, b), keeping the products its
    adjoint reuses: S = Q^2 (k >= 3) and, for k = 5, M = 2I + 2Q + S (R = I + 2Q + S M)."""

    def __init__(self, Q: Tensor, terms: int):
        self.Q, self.terms = Q, terms
        self.S: Optional[Tensor] = None
        self.M: Optional[Tensor] = None
        eye = eye_like(Q)
        if terms == 1:
            self.R = eye.expand_as(Q).clone()
        elif terms == 2:
            self.R = torch.add(eye, Q, alpha=2)
        elif terms == 5:
            self.S = Q @ Q
            self.M = torch.add(self.S, Q, alpha=2).add_(eye, alpha=2)
            self.R = (self.S @ self.M).add_(Q, alpha=2).add_(eye)
        else:
            self.S = Q @ Q
            R = torch.add(eye, Q, alpha=2)
            power = self.S
            for _ in range(2, neumann_top(terms)):
                R = R.add_(power, alpha=2)
                power = power @ Q
            self.R = R.add_(power)

    def adjoint(self, grad_R: Tensor) -> Tensor:
        """dL/dQ from G = dL/dR (module docstring)."""
        Q, G = self.Q, grad_R
        if self.terms == 1:
            return torch.zeros_like(G)
        if self.terms == 2:
            return 2 * G
        Qt = Q.transpose(-2, -1)
        if self.terms == 5:
            SG = self.S @ G
            D = (G @ self.M.transpose(-2, -1)).add_(SG)
            return (2 * (G + SG)).add_(D @ Qt).add_(Qt @ D)
        eye = eye_like(Q)
        horner, grad_Q = eye, G
        for _ in range(1, neumann_top(self.terms)):
            horner = (horner @ Qt).add_(eye, alpha=2)
            grad_Q = (G @ horner).add_(Qt @ grad_Q)
        return grad_Q


def neumann_series(Q: Tensor, terms: int) -> NeumannSeries:
    """The series of ``Q`` with the divergence monitor's check (the series' own S reused)."""
    series = NeumannSeries(Q, terms)
    cayley_monitor.MONITOR.check(Q, series.R, terms, series.S)
    return series


# ----------------------------------------------------------------------------------------------
# ops


@fused_op("cayley_skew", autocast_keep=("packed",))
def skew_op(packed: Tensor, block_size: int) -> Tensor:
    """(..., b(b-1)/2) -> (..., b, b) Q = U - U^T."""
    return skew_torch(packed, block_size)


@skew_op.fake
def _(packed, block_size):
    return packed.new_empty(*packed.shape[:-1], block_size, block_size)


@fused_op("cayley_skew_adjoint", autocast_keep=("grad_Q",))
def skew_adjoint_op(grad_Q: Tensor) -> Tensor:
    """(..., b, b) -> (..., b(b-1)/2): G[r, c] - G[c, r] over r < c."""
    return skew_adjoint_torch(grad_Q)


@skew_adjoint_op.fake
def _(grad_Q):
    return grad_Q.new_empty(*grad_Q.shape[:-2], packed_size(grad_Q.shape[-1]))


def _keep_block_size(ctx, inputs, output):
    ctx.block_size = inputs[0].shape[-1]


def _skew_backward(ctx, grad_Q):
    return skew_adjoint_op(grad_Q), None


def _skew_adjoint_backward(ctx, grad_packed):
    return skew_op(grad_packed, ctx.block_size)


skew_op.autograd(_skew_backward, lambda ctx, inputs, output: None)
skew_adjoint_op.autograd(_skew_adjoint_backward, _keep_block_size)
for _op in (skew_op, skew_adjoint_op):
    _on_triton_too(_op)


@skew_op.example
def _():
    yield (randn(3, packed_size(5), requires_grad=True, seed=11), 5), {}
    yield (randn(2, 2, packed_size(4), dtype=torch.float32, requires_grad=True, seed=12), 4), {}


@skew_adjoint_op.example
def _():
    yield (randn(3, 5, 5, requires_grad=True, seed=13),), {}


# -- exact map of Q ----------------------------------------------------------------------------


@fused_op("cayley", autocast_keep=("Q",))
def cayley_op(Q: Tensor) -> Tensor:
    """cayley(Q) of skew blocks (..., b, b)."""
    return cayley_torch(Q)


@cayley_op.fake
def _(Q):
    return torch.empty_like(Q)


@fused_op("cayley_backward", autocast_keep=("R", "grad_R"))
def cayley_backward_op(R: Tensor, grad_R: Tensor) -> Tensor:
    """dL/dQ = 2 N^T G N^T, N = (R + I) / 2."""
    return cayley_adjoint(R, grad_R)


@cayley_backward_op.fake
def _(R, grad_R):
    return torch.empty_like(R)


def _save_output(ctx, inputs, output):
    ctx.save_for_backward(output)


def _cayley_backward(ctx, grad_R):
    return cayley_backward_op(ctx.saved_tensors[0], grad_R)


cayley_op.autograd(_cayley_backward, _save_output)
for _op in (cayley_op, cayley_backward_op):
    _on_triton_too(_op)


@cayley_op.example
def _():
    yield (skew_torch(randn(2, packed_size(4), scale=0.3, seed=14), 4).requires_grad_(),), {}


@cayley_backward_op.example
def _():
    yield (cayley_torch(skew_torch(randn(2, packed_size(4), scale=0.3, seed=15), 4)), randn(2, 4, 4, seed=16)), {}


# -- series of Q -------------------------------------------------------------------------------


@fused_op("cayley_neumann", autocast_keep=("Q",))
def neumann_op(Q: Tensor, terms: int) -> Tensor:
    """PEFT's ``terms``-term series of skew blocks Q (..., b, b), monitored."""
    return neumann_series(Q, terms).R


@neumann_op.fake
def _(Q, terms):
    return torch.empty_like(Q)


@fused_op("cayley_neumann_backward", autocast_keep=("Q", "grad_R"))
def neumann_backward_op(Q: Tensor, grad_R: Tensor, terms: int) -> Tensor:
    """dL/dQ of the series (products recomputed from Q)."""
    return NeumannSeries(Q, terms).adjoint(grad_R)


@neumann_backward_op.fake
def _(Q, grad_R, terms):
    return torch.empty_like(Q)


def _save_q(ctx, inputs, output):
    Q, ctx.terms = inputs
    ctx.save_for_backward(Q)


def _neumann_backward(ctx, grad_R):
    return neumann_backward_op(ctx.saved_tensors[0], grad_R, ctx.terms), None


neumann_op.autograd(_neumann_backward, _save_q)
for _op in (neumann_op, neumann_backward_op):
    _on_triton_too(_op)


@neumann_op.example
def _():
    for terms in (1, 2, 4, 5):
        yield (skew_torch(randn(2, packed_size(4), scale=0.2, seed=17), 4).requires_grad_(), terms), {}


@neumann_backward_op.example
def _():
    Q = skew_torch(randn(2, packed_size(4), scale=0.2, seed=18), 4)
    for terms in (1, 2, 6, 5):
        yield (Q, randn(2, 4, 4, seed=19), terms), {}


# -- exact map from packed ---------------------------------------------------------------------


@fused_op("cayley_packed", autocast_keep=("packed",))
def cayley_packed_op(packed: Tensor, block_size: int) -> Tensor:
    """(n, b(b-1)/2) -> (n, b, b) cayley(skew(packed))."""
    return cayley_torch(skew_torch(packed, block_size))


@cayley_packed_op.impl("triton")
def _(packed, block_size):
    return _kernels().cayley_forward(packed, block_size)


@cayley_packed_op.fake
def _(packed, block_size):
    return packed.new_empty(packed.shape[0], block_size, block_size)


@fused_op("cayley_packed_backward", autocast_keep=("R", "grad_R"))
def cayley_packed_backward_op(R: Tensor, grad_R: Tensor) -> Tensor:
    """dL/dpacked (n, b(b-1)/2) of R = cayley(skew(packed)) from the saved R."""
    return skew_adjoint_torch(cayley_adjoint(R, grad_R))


@cayley_packed_backward_op.impl("triton")
def _(R, grad_R):
    return _kernels().cayley_backward(R, grad_R, R.shape[-1])


@cayley_packed_backward_op.fake
def _(R, grad_R):
    return R.new_empty(R.shape[0], packed_size(R.shape[-1]))


def _cayley_packed_backward(ctx, grad_R):
    return cayley_packed_backward_op(ctx.saved_tensors[0], grad_R), None


cayley_packed_op.autograd(_cayley_packed_backward, _save_output)


@cayley_packed_op.example
def _():
    yield (randn(3, packed_size(5), scale=0.3, requires_grad=True, seed=20), 5), {}


@cayley_packed_backward_op.example
def _():
    R = cayley_torch(skew_torch(randn(3, packed_size(5), scale=0.3, seed=21), 5))
    yield (R, randn(3, 5, 5, seed=22).transpose(-2, -1)), {}


# -- series from packed ------------------------------------------------------------------------


@fused_op("cayley_neumann_packed", autocast_keep=("packed",))
def neumann_packed_op(packed: Tensor, block_size: int, terms: int) -> Tensor:
    """(n, b(b-1)/2) -> (n, b, b): PEFT's series of skew(packed), monitored."""
    return neumann_series(skew_torch(packed, block_size), terms).R


@neumann_packed_op.impl("triton")
def _(packed, block_size, terms):
    R = _kernels().cayley_forward(packed, block_size, terms)
    cayley_monitor.MONITOR.check(lambda: skew_torch(packed, block_size), R, terms)
    return R


@neumann_packed_op.fake
def _(packed, block_size, terms):
    return packed.new_empty(packed.shape[0], block_size, block_size)


@fused_op("cayley_neumann_packed_backward", autocast_keep=("packed", "grad_R"))
def neumann_packed_backward_op(packed: Tensor, grad_R: Tensor, block_size: int, terms: int) -> Tensor:
    """dL/dpacked of the series, its products recomputed from packed."""
    return skew_adjoint_torch(NeumannSeries(skew_torch(packed, block_size), terms).adjoint(grad_R))


@neumann_packed_backward_op.impl("triton")
def _(packed, grad_R, block_size, terms):
    return _kernels().cayley_backward(packed, grad_R, block_size, terms)


@neumann_packed_backward_op.fake
def _(packed, grad_R, block_size, terms):
    return torch.empty_like(packed)


def _save_packed(ctx, inputs, output):
    packed, ctx.block_size, ctx.terms = inputs
    ctx.save_for_backward(packed)


def _neumann_packed_backward(ctx, grad_R):
    return neumann_packed_backward_op(ctx.saved_tensors[0], grad_R, ctx.block_size, ctx.terms), None, None


neumann_packed_op.autograd(_neumann_packed_backward, _save_packed)


@neumann_packed_op.example
def _():
    for terms in (1, 3, 5):
        yield (randn(3, packed_size(5), scale=0.2, requires_grad=True, seed=23), 5, terms), {}


@neumann_packed_backward_op.example
def _():
    for terms in (2, 5, 6):
        yield (randn(3, packed_size(5), scale=0.2, seed=24), randn(3, 5, 5, seed=25), 5, terms), {}
