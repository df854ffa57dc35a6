"""Cayley family ops: packed skew -> Cayley rotation, block-diagonal rotation of activations, and
the r x r rotation inside an SVD-coordinate low-rank path.  Differentiable, any leading dims.

Notation (see fastadapt.reference.cayley): Q skew (b x b), packed as its strict upper triangle;
cayley(Q) = (I + Q)(I - Q)^{-1} = 2 (I - Q)^{-1} - I.  OFT rotates features input-side,
y = (x R_bd) W^T + bias, R_bd = blockdiag(R_1, ..., R_n); PSOFT / SSVD / AntiPaSTO add
((x A^T) C^T) B^T with a small r x r core C built from a Cayley rotation.

Backends: "torch" on CPU (batched bmm over blocks writing strided output in place, batched b x b
inverses; ``oft_linear`` runs the whole OFT layer, packed parameter to output, as one autograd
Function), "triton" on CUDA (fastadapt.triton_kernels.cayley) chosen per call by
fastadapt.backend.select: there OFT's rotation blocks are one launch packed -> R and one launch
dL/dR -> dL/dpacked in both Cayley modes, and nothing in a call waits for the device (the
Neumann divergence check reads its measurements on later calls, _NeumannMonitor).
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from .. import _validate
from ..backend import select

METHODS = ("oft", "oftv2", "psoft", "ssvd", "antipasto")
TRITON_METHODS = ("oft", "oftv2", "psoft", "ssvd", "antipasto")

_IMPLEMENTED = ("torch", "triton")


def packed_size(block_size: int) -> int:
    return block_size * (block_size - 1) // 2


_FLAT_INDEX: dict = {}


def _flat_triangle_index(block_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions r*b + c of the strict upper triangle (triu_indices order) and of its mirror."""
    key = (block_size, str(device))
    if key not in _FLAT_INDEX:
        rows, cols = torch.triu_indices(block_size, block_size, 1, device=device)
        _FLAT_INDEX[key] = (rows * block_size + cols, cols * block_size + rows)
    return _FLAT_INDEX[key]


def _skew_gather_index(block_size: int, device) -> torch.Tensor:
    """For each of the b*b entries of Q, its position in cat([0, packed, -packed])."""
    key = ("gather", block_size, str(device))
    if key not in _FLAT_INDEX:
        m = packed_size(block_size)
        upper, lower = _flat_triangle_index(block_size, device)
        source = torch.zeros(block_size * block_size, dtype=torch.long, device=device)
        source[upper] = torch.arange(1, m + 1, device=device)
        source[lower] = torch.arange(m + 1, 2 * m + 1, device=device)
        _FLAT_INDEX[key] = source
    return _FLAT_INDEX[key]


def skew(packed: torch.Tensor, block_size: int) -> torch.Tensor:
    """(..., b(b-1)/2) strict upper triangle (triu_indices order) -> (..., b, b) Q = U - U^T,
    as one gather from cat([0, packed, -packed]) (about twice as fast as scattering)."""
    _validate.tensor("packed", packed, min_ndim=1)
    if packed.shape[-1] != packed_size(block_size):
        raise ValueError(f"packed has {packed.shape[-1]} entries per block; block_size={block_size} needs "
                         f"{packed_size(block_size)}")
    extended = torch.cat([packed.new_zeros(*packed.shape[:-1], 1), packed, packed.neg()], -1)
    Q = extended.index_select(-1, _skew_gather_index(block_size, packed.device))
    return Q.unflatten(-1, (block_size, block_size))


def _skew_adjoint(grad_Q: torch.Tensor) -> torch.Tensor:
    """dL/dpacked from dL/dQ (..., b, b) for Q = skew(packed): dQ[r, c] - dQ[c, r] over r < c."""
    b = grad_Q.shape[-1]
    upper, lower = _flat_triangle_index(b, grad_Q.device)
    flat = grad_Q.reshape(*grad_Q.shape[:-2], b * b)
    return flat.index_select(-1, upper) - flat.index_select(-1, lower)


class _CayleyExact(torch.autograd.Function):
    """R = cayley(Q) = 2 N - I with N = (I - Q)^{-1}, batched over leading dims.

    Forward: one batched inverse of I - Q (never singular for skew Q: eigenvalues 1 -/+ i theta).
    Saved: the output R only (the rotation that consumes R saves the same storage), since
    N = (R + I) / 2.
    Backward (Cayley derivative, no differentiation through a solve):
        dR = 2 N dQ N   =>   dL/dQ = 2 N^T (dL/dR) N^T.
    NaN in Q propagates to NaN in R (inv_ex never raises).
    """

    @staticmethod
    def forward(ctx, Q):
        eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
        R = 2 * _inverse(eye - Q) - eye
        ctx.save_for_backward(R)
        return R

    @staticmethod
    def backward(ctx, grad_R):
        (R,) = ctx.saved_tensors
        eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
        Nt = (R.transpose(-2, -1) + eye) / 2
        return 2 * (Nt @ grad_R @ Nt)


def _inverse(M: torch.Tensor) -> torch.Tensor:
    """Batched inverse; half precision solves in fp32 (LAPACK has no fp16/bf16)."""
    if M.dtype in (torch.float16, torch.bfloat16):
        return torch.linalg.inv_ex(M.float())[0].to(M.dtype)
    return torch.linalg.inv_ex(M)[0]


def cayley(Q: torch.Tensor) -> torch.Tensor:
    """Exact (I + Q)(I - Q)^{-1} of skew matrices (..., b, b); gradient by the Cayley derivative."""
    return _CayleyExact.apply(Q)


def cayley_neumann(Q: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's ``terms``-term series for (I + Q)(I - Q)^{-1}:
    1: I;  2: I + 2Q;  k >= 3, t = max(3, k - 1): I + 2(Q + ... + Q^{t-1}) + Q^t.

    The series converges only for ||Q||_2 < 1 (Q skew: eigenvalues +/- i theta).  When a block
    exceeds that, warns once per process with the measured orthogonality error ||R^T R - I||_F.
    """
    _validate.positive_int("num_cayley_neumann_terms", terms)
    R = _neumann_series(Q, terms)
    _neumann_monitor.check(Q, R, terms)
    return R


def _neumann_series(Q: torch.Tensor, terms: int) -> torch.Tensor:
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    if terms == 1:
        return eye.expand_as(Q).clone()
    if terms == 5:  # PEFT's default, two b x b products: I + 2Q + S (2I + 2Q + S), S = Q^2
        return _neumann5(Q)[0]
    R = torch.add(eye, Q, alpha=2)
    if terms > 2:
        top = max(3, terms - 1)
        power = Q @ Q
        for _ in range(2, top):
            R = torch.add(R, power, alpha=2)
            power = power @ Q
        R = R + power
    return R


def _neumann5(Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's 5-term series I + 2Q + 2Q^2 + 2Q^3 + Q^4 = I + 2Q + S M with S = Q^2 and
    M = 2I + 2Q + S; returns (R, S, M)."""
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    S = Q @ Q
    M = torch.add(S, Q, alpha=2).add_(eye, alpha=2)
    return (S @ M).add_(Q, alpha=2).add_(eye), S, M


def _neumann5_adjoint(Q: torch.Tensor, S: torch.Tensor, M: torch.Tensor, grad_R: torch.Tensor) -> torch.Tensor:
    """dL/dQ for R = I + 2Q + S M (_neumann5) given G = dL/dR, four b x b products:
    dS = G M^T + S^T G,  dL/dQ = 2 G + 2 S^T G + dS Q^T + Q^T dS."""
    St_G = S.transpose(-2, -1) @ grad_R
    dS = grad_R @ M.transpose(-2, -1) + St_G
    return (2 * (grad_R + St_G)).add_(dS @ Q.transpose(-2, -1)).add_(Q.transpose(-2, -1) @ dS)


class _NeumannPacked(torch.autograd.Function):
    """R = PEFT's Neumann series of skew(packed), saving only ``packed`` (the parameter).

    Backward recomputes the small b x b powers and differentiates the polynomial,
    dL/dQ = sum_j c_j sum_{a + c = j - 1} (Q^a)^T (dL/dR) (Q^c)^T: on the triton backend one
    launch each way (kernels.cayley_forward / cayley_backward: packed -> R, dL/dR -> dL/dpacked);
    on torch in closed form for the default 5 terms (_neumann5_adjoint), by autograd over the
    powers otherwise.
    """

    @staticmethod
    def forward(ctx, packed, block_size, terms):
        ctx.save_for_backward(packed)
        ctx.block_size, ctx.terms = block_size, terms
        ctx.triton = select("cayley.cayley", packed.device, _IMPLEMENTED) == "triton"
        if ctx.triton:
            from ..triton_kernels import cayley as kernels
            R = kernels.cayley_forward(packed, block_size, terms)
            _neumann_monitor.check(lambda: skew(packed, block_size), R, terms)
            return R
        return cayley_neumann(skew(packed, block_size), terms)

    @staticmethod
    def backward(ctx, grad_R):
        (packed,) = ctx.saved_tensors
        if ctx.triton:
            from ..triton_kernels import cayley as kernels
            return kernels.cayley_backward(packed, grad_R, ctx.block_size, ctx.terms), None, None
        if ctx.terms == 5:
            Q = skew(packed, ctx.block_size)
            _, S, M = _neumann5(Q)
            return _skew_adjoint(_neumann5_adjoint(Q, S, M, grad_R)), None, None
        if ctx.terms == 1:  # R = I does not depend on Q
            return torch.zeros_like(packed), None, None
        with torch.enable_grad():
            leaf = packed.detach().requires_grad_()
            R = _neumann_series(skew(leaf, ctx.block_size), ctx.terms)
            (grad,) = torch.autograd.grad(R, leaf, grad_R)
        return grad, None, None


class _HostReading:
    """A few device values on their way to the host without a sync.

    CUDA: copied with non_blocking=True into pinned host memory, then a CUDA event is recorded on
    the same stream; ``ready()`` is event.query() (no sync) and ``values()`` reads the host copy
    once it is.  Any other device (the CPU stand-in of the tests) copies at once and is ready.
    ``keep`` holds device tensors the reader needs when the values call for them; ``terms`` is
    the series length they were measured for."""

    def __init__(self, values: torch.Tensor, terms: int, keep: tuple = ()):
        self.terms, self.keep, self.event = terms, keep, None
        if values.device.type == "cuda":
            with torch.cuda.device(values.device):
                self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
                self.host.copy_(values, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record()
        else:
            self.host = values.to("cpu", copy=True)

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def values(self) -> list:
        return self.host.tolist()


class _NeumannMonitor:
    """The Neumann series' one-time divergence warning (issue 3): once per process, when a block
    has ||Q||_2 >= 1, warn with the measured orthogonality error max ||R^T R - I||_F.

    ||Q||_2 <= ||Q||_F and ||Q||_2 <= sqrt(||Q||_1 ||Q||_inf) = ||Q||_1 for skew Q: the exact test
    runs only when both cheap bounds reach 1.
    Direct (CPU tensors): each value is read on the host at once; the exact test is the spectral
    norm (an SVD).
    Deferred (CUDA tensors, or ``deferred=True``): no call reads a value it produced.  While no
    reading is in flight, a call queues on the device [max ||Q||_F, max ||Q||_1] and, when the
    previous reading had both >= 1, also [any block with I + Q^2 = I - Q^T Q not positive definite
    (cholesky_ex's info: ||Q||_2 >= 1), max ||R^T R - I||_F]; the values go to the host behind an
    event (_HostReading) and a later call judges them once the copy is done.  So the warning comes
    a call or more after the divergent one; its ||Q||_2 is then computed from that call's Q (one
    sync, at most once per process).
    """

    def __init__(self, deferred: bool | None = None):
        self.deferred = deferred
        self.warned = False
        self.pending: _HostReading | None = None
        self.exact_next = False

    def check(self, Q: torch.Tensor | Callable[[], torch.Tensor], R: torch.Tensor, terms: int):
        """Q: the skew blocks, or a function building them (skipped once warned)."""
        if self.warned:
            return
        deferred = R.device.type == "cuda" if self.deferred is None else self.deferred
        with torch.no_grad():
            if deferred:
                self._check_deferred(Q, R, terms)
            else:
                self._check_now(Q() if callable(Q) else Q, R, terms)

    def _check_now(self, Q, R, terms):
        if not float(torch.linalg.vector_norm(Q, dim=(-2, -1)).max()) >= 1.0:
            return
        if not float(torch.linalg.matrix_norm(Q.float(), ord=1).max()) >= 1.0:
            return
        spectral = float(torch.linalg.matrix_norm(Q.float(), ord=2).max())
        if spectral >= 1.0:
            self._warn(terms, spectral, float(orthogonality_error(R.float())))

    def _check_deferred(self, Q, R, terms):
        if self.pending is not None:
            if not self.pending.ready():
                return
            reading, self.pending = self.pending, None
            frobenius, one, *exact = reading.values()
            bounds_reached = frobenius >= 1.0 and one >= 1.0
            if bounds_reached and exact and exact[0] > 0:
                spectral = float(torch.linalg.matrix_norm(reading.keep[0].float(), ord=2).max())
                self._warn(reading.terms, spectral, exact[1])
                return
            self.exact_next = bounds_reached
        Qf = (Q() if callable(Q) else Q).float()
        values = [torch.linalg.vector_norm(Qf, dim=(-2, -1)).max(), torch.linalg.matrix_norm(Qf, ord=1).max()]
        keep = ()
        if self.exact_next:
            eye = torch.eye(Qf.shape[-1], dtype=Qf.dtype, device=Qf.device)
            info = torch.linalg.cholesky_ex(eye + Qf @ Qf).info
            values += [(info != 0).any().to(Qf.dtype), orthogonality_error(R.float())]
            keep = (Qf,)
        self.pending = _HostReading(torch.stack(values), terms, keep)

    def _warn(self, terms, spectral, error):
        self.warned = True
        warnings.warn(f"Cayley-Neumann series with num_cayley_neumann_terms={terms} diverges: ||Q||_2 = "
                      f"{spectral:.3g} >= 1, orthogonality error max ||R^T R - I||_F = {error:.3g}. "
                      "use_cayley_neumann=False computes the exact rotation at the same cost.", stacklevel=5)


_neumann_monitor = _NeumannMonitor()


def orthogonality_error(R: torch.Tensor) -> torch.Tensor:
    """max over blocks of ||R^T R - I||_F for (..., b, b) blocks (fp32 or wider)."""
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    return torch.linalg.matrix_norm(R.transpose(-2, -1) @ R - eye).max()


class _PackedCayleyTriton(torch.autograd.Function):
    """R = cayley(skew(packed)) for all blocks in one Triton launch (in-kernel solve).

    Saved: the output R (shared with the rotation that consumes it); N = (I - Q)^{-1} = (R + I) / 2.
    Backward, one launch (kernels.cayley_backward): dQ = 2 N^T dR N^T, and the packed gradient
    dQ[r, c] - dQ[c, r] over the strict upper triangle (Q = U - U^T).
    """

    @staticmethod
    def forward(ctx, packed, block_size):
        from ..triton_kernels import cayley as kernels
        R = kernels.cayley_forward(packed, block_size)
        ctx.save_for_backward(R)
        return R

    @staticmethod
    def backward(ctx, grad_R):
        from ..triton_kernels import cayley as kernels
        (R,) = ctx.saved_tensors
        return kernels.cayley_backward(R, grad_R, R.shape[-1]), None


def cayley_packed(packed: torch.Tensor, block_size: int, *, transpose: bool = False) -> torch.Tensor:
    """cayley(skew(packed)) for packed (n, b(b-1)/2), or its transpose cayley(-skew(packed)):
    one Triton launch on CUDA, a batched inverse on CPU.  The sign is applied after ``skew`` so
    that autograd keeps only the parameter itself, not a negated copy."""
    if packed.ndim == 2 and select("cayley.cayley", packed.device, _IMPLEMENTED) == "triton":
        return _PackedCayleyTriton.apply(-packed if transpose else packed, block_size)
    Q = skew(packed, block_size)
    return cayley(-Q if transpose else Q)


def oft_rotation_blocks(packed: torch.Tensor, block_size: int, *, use_cayley_neumann: bool = True,
                        num_cayley_neumann_terms: int = 5) -> torch.Tensor:
    """(n, b(b-1)/2) -> (n, b, b) rotation blocks in PEFT's OFT conventions:
    Neumann mode approximates (I + Q)(I - Q)^{-1}; exact mode is (I - Q)(I + Q)^{-1} = cayley(-Q).
    Triton backend: one launch for R and one for its packed gradient in either mode."""
    if use_cayley_neumann:
        _validate.positive_int("num_cayley_neumann_terms", num_cayley_neumann_terms)
        return _NeumannPacked.apply(packed, block_size, num_cayley_neumann_terms)
    return cayley_packed(packed, block_size, transpose=True)


# ----------------------------------------------------------------------------------------------
# block-diagonal rotation of activations


def _rotate_torch(x2d: torch.Tensor, R: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    """(M, n*b) x (n or 1, b, b) -> (M, n*b), chunk i times R_i (or R_i^T).  One bmm writing the
    (M, n, b) output through a strided (n, M, b) view: no transposed copies."""
    M, d = x2d.shape
    b = R.shape[-1]
    n = d // b
    blocks = R.transpose(-2, -1) if transpose else R
    out = torch.empty(M, n, b, dtype=x2d.dtype, device=x2d.device)
    torch.bmm(x2d.unflatten(1, (n, b)).transpose(0, 1), blocks.expand(n, b, b), out=out.transpose(0, 1))
    return out.view(M, d)


_INPLACE_ROWS = 1024  # rows per chunk: few launches, and a chunk buffer reused across the loop


def _rotate_inplace_torch(t2d: torch.Tensor, R: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    """Overwrite a contiguous (M, n*b) ``t2d`` with t2d R_bd (or t2d R_bd^T), ``_INPLACE_ROWS``
    rows at a time through one small reused buffer: no second M x d allocation (on CPU, a fresh
    large buffer costs page faults comparable to the rotation itself)."""
    M, d = t2d.shape
    b = R.shape[-1]
    n = d // b
    blocks = (R.transpose(-2, -1) if transpose else R).expand(n, b, b)
    buffer = torch.empty(min(M, _INPLACE_ROWS), n, b, dtype=t2d.dtype, device=t2d.device)
    for start in range(0, M, _INPLACE_ROWS):
        rows = t2d[start:start + _INPLACE_ROWS]
        chunk = buffer[:rows.shape[0]]
        torch.bmm(rows.unflatten(1, (n, b)).transpose(0, 1), blocks, out=chunk.transpose(0, 1))
        rows.copy_(chunk.view(rows.shape))
    return t2d


_GRAD_ROWS = 512  # rows per accumulation step of dR (measured: 512 beats 128, 256, 1024 and 2048)


def _block_grad_torch(x2d: torch.Tensor, g2d: torch.Tensor, b: int, shared: bool) -> torch.Tensor:
    """dR_i = x_i^T g_i (b x b per block), summed over blocks when R is shared; accumulated over
    ``_GRAD_ROWS``-row slices (about 15 % faster than one bmm over 2048 rows at b = 32 / 128 on
    the CPU benchmark machine)."""
    n = x2d.shape[1] // b
    grad = None
    for start in range(0, x2d.shape[0], _GRAD_ROWS):
        xs = x2d[start:start + _GRAD_ROWS].unflatten(1, (n, b)).permute(1, 2, 0)
        gs = g2d[start:start + _GRAD_ROWS].unflatten(1, (n, b)).transpose(0, 1)
        grad = torch.bmm(xs, gs) if grad is None else grad.baddbmm_(xs, gs)
    if grad is None:  # no rows
        grad = x2d.new_zeros(n, b, b)
    return grad.sum(0, keepdim=True) if shared else grad


def _rotate(x2d, R, *, transpose=False):
    if select("cayley.block_rotate", x2d.device, _IMPLEMENTED) == "triton":
        from ..triton_kernels import cayley as kernels
        return kernels.block_rotate_forward(x2d, R.transpose(-2, -1) if transpose else R)
    return _rotate_torch(x2d, R, transpose=transpose)


def _block_grad(x2d, g2d, b, shared):
    if select("cayley.block_rotate", x2d.device, _IMPLEMENTED) == "triton":
        from ..triton_kernels import cayley as kernels
        grad = kernels.block_rotate_backward_weight(x2d, g2d, b)
        return grad.sum(0, keepdim=True) if shared else grad
    return _block_grad_torch(x2d, g2d, b, shared)


def _check_blocks(x, R):
    _validate.tensor("x", x, min_ndim=1)
    _validate.tensor("R", R, ndim=3)
    _validate.same("x", x, "R", R)
    b = R.shape[-1]
    if R.shape[-2] != b:
        raise ValueError(f"R must be (n, b, b) square blocks, got shape {tuple(R.shape)}")
    _check_block_count(x, R.shape[0], b, "R")


def _check_block_count(x, num_blocks, b, name):
    _validate.divides("oft_block_size", b, x.shape[-1], "x.shape[-1]")
    n = x.shape[-1] // b
    if num_blocks not in (1, n):
        raise ValueError(f"{name} has {num_blocks} blocks; x.shape[-1]={x.shape[-1]} with block size {b} needs {n} "
                         "(or 1 shared)")


class _BlockRotate(torch.autograd.Function):
    """y = x R_bd for x (M, n*b), R (n or 1, b, b).

    Saved: x and R.  Backward: dx_i = dy_i R_i^T;  dR_i = x_i^T dy_i (summed over blocks if shared).
    """

    @staticmethod
    def forward(ctx, x2d, R):
        ctx.save_for_backward(x2d, R)
        return _rotate(x2d, R)

    @staticmethod
    def backward(ctx, dy):
        x2d, R = ctx.saved_tensors
        dx = _rotate(dy, R, transpose=True) if ctx.needs_input_grad[0] else None
        dR = _block_grad(x2d, dy, R.shape[-1], R.shape[0] == 1) if ctx.needs_input_grad[1] else None
        return dx, dR


def block_rotate(x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """y = x R_bd (OFTv2's input-centric rotation): x (..., n*b), R (n, b, b) or (1, b, b) shared."""
    _check_blocks(x, R)
    return _BlockRotate.apply(x.reshape(-1, x.shape[-1]), R).view(x.shape)


class _BlockRotateLinear(torch.autograd.Function):
    """y = (x R_bd) W^T + bias, the whole OFT layer in one Function.

    Forward rotates whichever operand is smaller: x (M rows) when M <= out_features, else the
    weight, y = x (W R_bd^T)^T (the same product; rotating W moves 2 out in bytes instead of 2 M in).
    Saved: x, R (n b^2) and W, bias (parameters): neither x R_bd nor W R_bd^T is kept.
    Backward with g = dy W (the gradient at the rotated input):
        dx = g R_bd^T,   dR_i = x_i^T g_i,   dW = dy^T (x R_bd) (recomputed, only if W trains),
        dbias = sum dy.
    When R is orthogonal (exact Cayley), fp32/fp64 and the weight side is the smaller one, g is
    never formed: dx = dy (W R_bd^T) is one GEMM with the recomputed rotated weight, and since
    g_i = dx_i R_i^{-T} = dx_i R_i,  dR_i = (x_i^T dx_i) R_i  (a b x b product per block).
    """

    @staticmethod
    def forward(ctx, x2d, R, weight, bias, orthogonal):
        ctx.save_for_backward(x2d, R, weight)
        ctx.has_bias = bias is not None
        ctx.weight_side = x2d.shape[0] > weight.shape[0]
        ctx.orthogonal = orthogonal and x2d.dtype in (torch.float32, torch.float64)
        if ctx.weight_side:
            return F.linear(x2d, _rotate(weight, R, transpose=True), bias)
        return F.linear(_rotate(x2d, R), weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x2d, R, weight = ctx.saved_tensors
        need_x, need_R, need_W, need_b, _ = ctx.needs_input_grad
        b, shared = R.shape[-1], R.shape[0] == 1
        dx = dR = None
        if ctx.weight_side and ctx.orthogonal:
            dx = dy @ _rotate(weight, R, transpose=True)
            if need_R:
                dR = _block_grad(x2d, dx, b, shared) @ R
        else:
            g = dy @ weight
            dR = _block_grad(x2d, g, b, shared) if need_R else None
            if need_x:  # g is this Function's own temporary: on CPU it becomes dx in place
                torch_path = select("cayley.block_rotate", g.device, _IMPLEMENTED) == "torch"
                dx = _rotate_inplace_torch(g, R, transpose=True) if torch_path else _rotate(g, R, transpose=True)
        dW = dy.T @ _rotate(x2d, R) if need_W else None
        db = dy.sum(0) if (need_b and ctx.has_bias) else None
        return dx if need_x else None, dR, dW, db, None


def block_rotate_linear(x: torch.Tensor, R: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None, *, orthogonal: bool = False) -> torch.Tensor:
    """OFT layer: y = (x R_bd) W^T + bias.  x (..., in), R (in/b or 1, b, b), W (out, in).

    orthogonal: R is an exact Cayley rotation (R^{-1} = R^T), which lets the backward skip one
    pass over the activations (see _BlockRotateLinear); False for the Neumann series."""
    _check_blocks(x, R)
    _validate.tensor("weight", weight, ndim=2)
    _validate.same("x", x, "weight", weight)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight has in_features={weight.shape[1]} but x.shape[-1]={x.shape[-1]}")
    y = _BlockRotateLinear.apply(x.reshape(-1, x.shape[-1]), R, weight, bias, orthogonal)
    return y.view(*x.shape[:-1], weight.shape[0])


def _symmetric_index(block_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat positions r*b + c of the upper triangle with its diagonal (r <= c), of its mirror, and
    for each of the b*b entries its position in that triangle."""
    key = ("sym", block_size, str(device))
    if key not in _FLAT_INDEX:
        rows, cols = torch.triu_indices(block_size, block_size, 0, device=device)
        upper, lower = rows * block_size + cols, cols * block_size + rows
        source = torch.empty(block_size * block_size, dtype=torch.long, device=device)
        source[upper] = torch.arange(upper.numel(), device=device)
        source[lower] = torch.arange(upper.numel(), device=device)
        _FLAT_INDEX[key] = (upper, lower, source)
    return _FLAT_INDEX[key]


def _pack_symmetric_part(R: torch.Tensor) -> torch.Tensor:
    """(n, b, b) -> (n, b(b+1)/2): the upper triangle (with diagonal) of (R + R^T) / 2."""
    b = R.shape[-1]
    upper, lower, _ = _symmetric_index(b, R.device)
    flat = R.reshape(R.shape[0], b * b)
    return (flat.index_select(1, upper) + flat.index_select(1, lower)) / 2


def _exact_from_symmetric_part(sym_packed: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """R = (I - Q)(I + Q)^{-1} from its symmetric part H = (R + R^T) / 2 with one b x b product:
    with K = (I - Q^2)^{-1} (symmetric, commutes with Q), R = (2K - I) - 2QK, so H = 2K - I and
    R = H - Q (H + I)."""
    b = Q.shape[-1]
    H = sym_packed.index_select(1, _symmetric_index(b, Q.device)[2]).view(-1, b, b)
    eye = torch.eye(b, dtype=Q.dtype, device=Q.device)
    return H - Q @ (H + eye)


def _oft_blocks(packed: torch.Tensor, block_size: int, terms: int) -> torch.Tensor:
    """PEFT's OFT rotation blocks without autograd: exact (I - Q)(I + Q)^{-1} when ``terms`` is 0,
    else the ``terms``-term Neumann series (which warns once when it diverges)."""
    Q = skew(packed, block_size)
    if terms:
        return cayley_neumann(Q, terms)
    eye = torch.eye(block_size, dtype=Q.dtype, device=Q.device)
    return 2 * _inverse(eye + Q) - eye


_KEEP_R_FRACTION = 32  # exact mode keeps R whole when it holds at most 1/32 as many numbers as x


class _OFTLinear(torch.autograd.Function):
    """The whole OFT layer on the torch path, from the packed parameter:
    y = (x R_bd) W^T + bias,  R_i = PEFT's rotation of Q_i = skew(packed_i)  (terms = 0: exact
    (I - Q)(I + Q)^{-1}; else the Neumann series).

    Saved: x and the parameters (packed, W); in exact mode also R (n b^2 numbers) when that is at
    most 1/32 of x's (b <= M / 32, e.g. b = 32 at M = 2048 tokens: 1/64), else only R's symmetric
    part packed (n b(b+1)/2 numbers; b = 128: 1/32 of bytes(x) where R would be 1/16), from
    which backward rebuilds R with one product (_exact_from_symmetric_part) instead of a second
    batched inverse.  Neumann mode keeps no R and reruns the series (a few b x b products).
    Forward rotates the smaller operand: the weight, W' = W R_bd^T (2 out in b FLOPs), when
    M > out_features, else x (2 M in b).
    Backward, G_i = dL/dR_i, with g = dy W the gradient at the rotated input (dx = g R_bd^T):
      weight side, fp32/fp64, R^{-T} at hand:  dx = dy W' (W' rebuilt: 2 out in b FLOPs instead
          of the 2 M in b of rotating g) and, with P_i = x_i^T dx_i, G_i = x_i^T g_i = P_i R_i^{-T}.
          Exact mode: R^{-T} = R, and the Cayley derivative of R = cayley(-Q) with
          N = (I + Q)^{-1} = (R + I)/2 and R N^T = N gives dL/dQ_i = -2 N_i^T P_i N_i (two b x b
          products per block).  Neumann mode: R^{-T} = (I + E + ... + E^k) R, E = I - R R^T,
          when at most _MAX_INVERSE_TERMS terms reach the dtype's rounding
          (_near_orthogonal_inverse_transpose), else as below;
      otherwise (x side, half precision, or a far-from-orthogonal Neumann R):  g = dy W,
          G_i = x_i^T g_i, dx = g R_bd^T (rotated in place);
      then dL/dQ = -2 N^T G N^T (exact) or the series' adjoint (Neumann: closed form for the
          default 5 terms, _neumann5_adjoint; autograd over the b x b powers otherwise);
      dpacked = dQ[r, c] - dQ[c, r] (r < c), summed over blocks with block_share;
      dW = dy^T (x R_bd) (only if W trains),  dbias = sum dy.
    """

    @staticmethod
    def forward(ctx, x2d, packed, weight, bias, block_size, terms):
        R = _oft_blocks(packed, block_size, terms)
        if terms:
            kept = None  # the series is rebuilt from the parameter in backward
        elif R.numel() * _KEEP_R_FRACTION <= x2d.numel():
            kept = R
        else:  # half of R's numbers, and rebuilding R costs one product instead of an inverse
            kept = _pack_symmetric_part(R)
        ctx.save_for_backward(x2d, packed, weight, kept)
        ctx.block_size, ctx.terms, ctx.has_bias = block_size, terms, bias is not None
        ctx.weight_side = x2d.shape[0] > weight.shape[0]
        if ctx.weight_side:
            return F.linear(x2d, _rotate_torch(weight, R, transpose=True), bias)
        return F.linear(_rotate_torch(x2d, R), weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x2d, packed, weight, kept = ctx.saved_tensors
        need_x, need_packed, need_W, need_b = ctx.needs_input_grad[:4]
        b, terms, shared = ctx.block_size, ctx.terms, packed.shape[0] == 1
        eye = torch.eye(b, dtype=packed.dtype, device=packed.device)
        if terms == 5:
            Q = skew(packed, b)
            R, S, M = _neumann5(Q)
        elif terms:
            with torch.enable_grad():
                leaf = packed.detach().requires_grad_()
                R_graph = _neumann_series(skew(leaf, b), terms)
            R = R_graph.detach()
        else:
            R = kept if kept.ndim == 3 else _exact_from_symmetric_part(kept, skew(packed, b))

        inverse_t = None  # R^{-T}, when dx is taken as dy W' and G from x^T dx
        if ctx.weight_side and x2d.dtype in (torch.float32, torch.float64):
            inverse_t = R if not terms else _near_orthogonal_inverse_transpose(R)
        dx = grad_R = dpacked = None
        if inverse_t is not None:
            dx = dy @ _rotate_torch(weight, R, transpose=True)
            if need_packed:
                P = _block_grad_torch(x2d, dx, b, shared)
                if terms:
                    grad_R = P @ inverse_t
                else:  # -2 N^T (P R) N^T = -2 N^T P N with 2N = R + I
                    twice_N = R + eye
                    dpacked = _skew_adjoint((twice_N.transpose(-2, -1) @ P @ twice_N).mul_(-0.5))
        else:
            g = dy @ weight
            grad_R = _block_grad_torch(x2d, g, b, shared) if need_packed else None
            if need_x:  # g is this Function's own temporary: it becomes dx in place
                dx = _rotate_inplace_torch(g, R, transpose=True)
        if grad_R is not None:  # dL/dQ from dL/dR
            if terms == 5:
                dpacked = _skew_adjoint(_neumann5_adjoint(Q, S, M, grad_R))
            elif terms == 1:  # R = I does not depend on Q
                dpacked = torch.zeros_like(packed)
            elif terms:
                (dpacked,) = torch.autograd.grad(R_graph, leaf, grad_R)
            else:  # -2 N^T G N^T with 2N = R + I
                twice_Nt = R.transpose(-2, -1) + eye
                dpacked = _skew_adjoint((twice_Nt @ grad_R @ twice_Nt).mul_(-0.5))
        return dx if need_x else None, dpacked, *_weight_grads(ctx, dy, x2d, R, need_W, need_b)


def _weight_grads(ctx, dy, x2d, R, need_W, need_b):
    """(dW, dbias, None, None) of _OFTLinear: dW = dy^T (x R_bd) only when W trains."""
    dW = dy.T @ _rotate_torch(x2d, R) if need_W else None
    db = dy.sum(0) if (need_b and ctx.has_bias) else None
    return dW, db, None, None


_MAX_INVERSE_TERMS = 4  # beyond this many terms of (I - E)^{-1}, rotating g is cheaper


def _near_orthogonal_inverse_transpose(R: torch.Tensor) -> torch.Tensor | None:
    """R^{-T} = (R R^T)^{-1} R = (I - E)^{-1} R = (I + E + ... + E^k) R + O(e^{k+1}) with
    E = I - R R^T and e = max_i ||E_i||_F: the shortest such sum whose dropped tail
    e^{k+1} / (1 - e) is below the dtype's epsilon (Horner, k + 1 b x b products), or None
    when that takes more than _MAX_INVERSE_TERMS terms.  The 5-term Neumann series at the
    benchmark's |Q| gives e ~ 1e-3 (b = 32) .. 3e-4 (b = 128): k = 2 in fp32."""
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    E = torch.baddbmm(eye.expand_as(R), R, R.transpose(-2, -1), alpha=-1)
    e = float(torch.linalg.vector_norm(E, dim=(-2, -1)).max())
    eps = torch.finfo(R.dtype).eps
    if not e < 0.5:
        return None
    terms = 1
    while e ** (terms + 1) / (1 - e) > eps:
        terms += 1
        if terms > _MAX_INVERSE_TERMS:
            return None
    X = E + eye
    for _ in range(terms - 1):
        X = torch.baddbmm(eye.expand_as(R), E, X)
    return X @ R


def oft_linear(x: torch.Tensor, packed: torch.Tensor, block_size: int, weight: torch.Tensor,
               bias: torch.Tensor | None = None, *, use_cayley_neumann: bool = True,
               num_cayley_neumann_terms: int = 5) -> torch.Tensor:
    """PEFT's OFT layer from its parameter: y = (x R_bd) W^T + bias with
    R = oft_rotation_blocks(packed, block_size, ...).  x (..., in), packed (in/b or 1, b(b-1)/2),
    W (out, in).

    Torch path (CPU): one autograd Function (_OFTLinear) that keeps only x and the parameters.
    Triton path (CUDA): the rotation blocks from one launch, then block_rotate_linear."""
    _validate.tensor("packed", packed, ndim=2)
    if use_cayley_neumann:
        _validate.positive_int("num_cayley_neumann_terms", num_cayley_neumann_terms)
    if select("cayley.block_rotate", x.device, _IMPLEMENTED) == "triton":
        R = oft_rotation_blocks(packed, block_size, use_cayley_neumann=use_cayley_neumann,
                                num_cayley_neumann_terms=num_cayley_neumann_terms)
        return block_rotate_linear(x, R, weight, bias, orthogonal=not use_cayley_neumann)
    _validate.tensor("x", x, min_ndim=1)
    if packed.shape[-1] != packed_size(block_size):
        raise ValueError(f"packed has {packed.shape[-1]} entries per block; block_size={block_size} needs "
                         f"{packed_size(block_size)}")
    _check_block_count(x, packed.shape[0], block_size, "packed")
    _validate.tensor("weight", weight, ndim=2)
    _validate.same("x", x, "weight", weight)
    _validate.same("x", x, "packed", packed)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight has in_features={weight.shape[1]} but x.shape[-1]={x.shape[-1]}")
    terms = num_cayley_neumann_terms if use_cayley_neumann else 0
    y = _OFTLinear.apply(x.reshape(-1, x.shape[-1]), packed, weight, bias, block_size, terms)
    return y.view(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------------------------
# SVD-coordinate low-rank path (PSOFT, SSVD, AntiPaSTO)


class _SVDRotationLinear(torch.autograd.Function):
    """y = x W^T + bias + ((x A^T) C_g^T) B^T with A (r, in), B (out, r) and an r x r core C
    shared (C (1, r, r)) or per sample (C (G, r, r), x grouped as (G, T, in)).

    On CUDA with a shared core, z and u come from one Triton kernel (z stays in registers
    between the two products).  Saved: z = x A^T (N x r) and the parameters; x itself only when
    A or W train (PSOFT, SSVD and AntiPaSTO freeze both, so the layer keeps N r numbers, not N d).
    With u = z C^T:
        du = dy B,  dC_g = du_g^T z_g,  dz = du C,  dx = dy W + dz A,
        dA = dz^T x,  dB = dy^T u,  dW = dy^T x,  dbias = sum dy.
    """

    @staticmethod
    def forward(ctx, x3, weight, bias, A, B, C):
        if C.shape[0] == 1 and select("cayley.svd_core", x3.device, _IMPLEMENTED) == "triton":
            from ..triton_kernels import cayley as kernels
            z, u = (t.unsqueeze(0) for t in kernels.svd_core_forward(x3[0], A, C[0]))
        else:
            z = x3 @ A.T
            u = z @ C.transpose(-2, -1)
        need_x = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        ctx.save_for_backward(x3 if need_x else None, z, weight, A, B, C)
        ctx.has_bias = bias is not None
        y = F.linear(x3, weight, bias)
        if u.shape[0] == 1:  # one shared core: 2-D GEMMs accumulate in place into the base output
            y[0].addmm_(u[0], B.T)
            return y
        return y.baddbmm_(u, B.T.expand(u.shape[0], *B.T.shape))

    @staticmethod
    def backward(ctx, dy):
        x3, z, weight, A, B, C = ctx.saved_tensors
        need_x, need_W, need_b, need_A, need_B, need_C = ctx.needs_input_grad
        du = dy @ B
        dz = du @ C
        dx = None
        if need_x:
            dx = dy @ weight
            if dz.shape[0] == 1:
                dx[0].addmm_(dz[0], A)
            else:
                dx.baddbmm_(dz, A.expand(dz.shape[0], *A.shape))
        dC = None
        if need_C:
            dC = du.transpose(-2, -1) @ z
            if C.shape[0] == 1:
                dC = dC.sum(0, keepdim=True)
        dA = (dz.transpose(-2, -1) @ x3).sum(0) if need_A else None
        dB = (dy.transpose(-2, -1) @ (z @ C.transpose(-2, -1))).sum(0) if need_B else None
        dW = (dy.transpose(-2, -1) @ x3).sum(0) if need_W else None
        db = dy.sum((0, 1)) if (need_b and ctx.has_bias) else None
        return dx, dW, db, dA, dB, dC


def svd_rotation_linear(x: torch.Tensor, weight: torch.Tensor, bias, A: torch.Tensor, B: torch.Tensor,
                        C: torch.Tensor) -> torch.Tensor:
    """y = x W^T + bias + ((x A^T) C^T) B^T.  C is (r, r), or (batch, r, r) for one core per
    sample of x (batch, ..., in) (AntiPaSTO's per-sample alpha)."""
    _validate.tensor("x", x, min_ndim=1)
    for name, t in (("weight", weight), ("A", A), ("B", B), ("C", C)):
        _validate.same("x", x, name, t)
    r = A.shape[0]
    if C.ndim == 2:
        x3, C3 = x.reshape(1, -1, x.shape[-1]), C.unsqueeze(0)
    else:
        if C.ndim != 3 or x.ndim < 2 or C.shape[0] != x.shape[0]:
            raise ValueError(f"per-sample C must be (batch, r, r) with batch = x.shape[0]; got C {tuple(C.shape)}, "
                             f"x {tuple(x.shape)}")
        x3, C3 = x.reshape(x.shape[0], -1, x.shape[-1]), C
    if C3.shape[-2:] != (r, r) or B.shape[1] != r or A.shape[1] != x.shape[-1]:
        raise ValueError(f"shapes do not chain: A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}, "
                         f"x {tuple(x.shape)}")
    y = _SVDRotationLinear.apply(x3, weight, bias, A, B, C3)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def psoft_core(packed, *, scaling: float, vector_a=None, vector_b=None, use_cayley_neumann=False,
               num_cayley_neumann_terms=5, cayley_neumann_eps=None, orth=True, size=None):
    """PSOFT's core C = scaling (R - I), R = diag(vector_b) cayley(Q) diag(vector_a) (PEFT's
    OrthLayer; Q scaled to Frobenius norm ``cayley_neumann_eps`` first in Neumann mode)."""
    if orth:
        Q = skew(packed, size)
        if use_cayley_neumann:
            if cayley_neumann_eps is not None:  # PEFT: if norm > eps: Q *= eps / (norm + 1e-12)
                norm = torch.linalg.matrix_norm(Q)  # a device-side choice: no host sync on CUDA
                shrink = torch.isfinite(norm) & (norm > cayley_neumann_eps)
                Q = Q * torch.where(shrink, cayley_neumann_eps / (norm + 1e-12), torch.ones_like(norm))
            R = cayley_neumann(Q, num_cayley_neumann_terms)
        else:
            R = cayley(Q)
    else:
        R = packed
    if vector_b is not None:
        R = vector_b[:, None] * R
    if vector_a is not None:
        R = R * vector_a[None, :]
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    return scaling * (R - eye)


def ssvd_core(packed, delta_s, S, alpha):
    """SSVD / AntiPaSTO core C = diag(S + alpha delta_s) cayley(alpha Q) - diag(S).

    alpha: a float, or a (batch,) tensor giving one core per sample -> (batch, r, r)."""
    r = S.shape[0]
    Q = skew(packed, r)
    if isinstance(alpha, torch.Tensor) and alpha.ndim == 1:
        a = alpha.to(Q.dtype)[:, None, None]
        R = cayley(a * Q)
        scale = S + alpha.to(Q.dtype)[:, None] * delta_s  # (batch, r)
        return scale[:, :, None] * R - torch.diag(S)
    alpha = float(alpha)
    return (S + alpha * delta_s)[:, None] * cayley(alpha * Q) - torch.diag(S)
