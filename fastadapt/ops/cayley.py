"""Cayley family ops: packed skew -> Cayley rotation, block-diagonal rotation of activations, and
the r x r rotation inside an SVD-coordinate low-rank path.  Differentiable, any leading dims.

Notation (see fastadapt.reference.cayley): Q skew (b x b), packed as its strict upper triangle;
cayley(Q) = (I + Q)(I - Q)^{-1} = 2 (I - Q)^{-1} - I.  OFT rotates features input-side,
y = (x R_bd) W^T + bias, R_bd = blockdiag(R_1, ..., R_n); PSOFT / SSVD / AntiPaSTO add
((x A^T) C^T) B^T with a small r x r core C built from a Cayley rotation.

The public functions below check their arguments and call the family's custom ops (each
``fastadapt::<name>``, with its implementations per backend, fake kernel, gradients and opcheck
examples beside it):

    fastadapt.ops.cayley_maps     packed -> Q -> R, exact and Neumann (b x b work)
    fastadapt.ops.cayley_monitor  the Neumann series' divergence warning (no per-call SVD)
    fastadapt.ops.cayley_rotate   block-diagonal rotation x R_bd and the OFT layer around a given R
    fastadapt.ops.cayley_oft      the OFT layer from its parameter, one op per Cayley mode
    fastadapt.ops.cayley_svd      y = x W^T + bias + ((x A^T) C^T) B^T (PSOFT, SSVD, AntiPaSTO)

Backends: "torch" on CPU, "triton" on CUDA (fastadapt.triton_kernels.cayley), chosen in each op's
registration by fastadapt.backend.select; nothing in a call waits for the device on CUDA.  Dtypes:
one dtype throughout, or PEFT's float32 adapter on a float16 / bfloat16 base (fastadapt.ops._policy);
under torch.autocast the layer ops cast activations and weights to the autocast dtype (the OFT op
keeps its float32 parameter) and the b x b construction stays in the parameter's dtype.
"""
from __future__ import annotations

import math

import torch

from .. import _validate
from . import _policy
from .cayley_maps import cayley_op, cayley_packed_op, neumann_op, neumann_packed_op, packed_size, skew_op
from .cayley_monitor import orthogonality_error
from .cayley_oft import oft_linear_exact_op, oft_linear_neumann_op
from .cayley_rotate import block_rotate_linear_op, block_rotate_op
from .cayley_svd import svd_rotation_linear_op

METHODS = ("oft", "oftv2", "psoft", "ssvd", "antipasto")
TRITON_METHODS = ("oft", "oftv2", "psoft", "ssvd", "antipasto")

__all__ = ["METHODS", "TRITON_METHODS", "block_rotate", "block_rotate_linear", "cayley", "cayley_neumann",
           "cayley_packed", "fused_oft_linear", "oft_linear", "oft_rotation_blocks", "orthogonality_error",
           "packed_size", "psoft_core", "skew", "ssvd_core", "svd_rotation_linear"]


# ----------------------------------------------------------------------------------------------
# argument checks


def _check_packed(packed: torch.Tensor, block_size: int, name: str = "packed") -> None:
    _validate.tensor(name, packed, min_ndim=1)
    _validate.positive_int("block_size", block_size)
    if packed.shape[-1] != packed_size(block_size):
        raise ValueError(f"{name} has {packed.shape[-1]} entries per block; block_size={block_size} needs "
                         f"{packed_size(block_size)}")


def _check_terms(use_cayley_neumann: bool, terms: int) -> int:
    """The series length, or 0 for the exact map."""
    return _validate.positive_int("num_cayley_neumann_terms", terms) if use_cayley_neumann else 0


def _check_block_count(x, num_blocks, b, name):
    _validate.divides("oft_block_size", b, x.shape[-1], "x.shape[-1]")
    n = x.shape[-1] // b
    if num_blocks not in (1, n):
        raise ValueError(f"{name} has {num_blocks} blocks; x.shape[-1]={x.shape[-1]} with block size {b} needs {n} "
                         "(or 1 shared)")


def _check_blocks(x, R):
    _validate.tensor("x", x, min_ndim=1)
    _validate.tensor("R", R, ndim=3)
    b = R.shape[-1]
    if R.shape[-2] != b:
        raise ValueError(f"R must be (n, b, b) square blocks, got shape {tuple(R.shape)}")
    _check_block_count(x, R.shape[0], b, "R")


def _check_layer_dtypes(x, weight, bias, adapter) -> None:
    """x, W and bias share a dtype and device; the adapter tensors ((name, tensor) pairs) are in
    that dtype or float32 on a half x (fastadapt.ops._policy).  Under torch.autocast the ops cast
    x, W and bias to the autocast dtype themselves: only devices are checked then."""
    autocast = torch.is_autocast_enabled(x.device.type)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if autocast:
            if t.device != x.device:
                raise ValueError(f"x is on {x.device} but {name} is on {t.device}; move one to match")
        else:
            _validate.same("x", x, name, t)
    if not autocast:
        _policy.adapter_compute_dtype("x", x, adapter)


# ----------------------------------------------------------------------------------------------
# Cayley maps


def skew(packed: torch.Tensor, block_size: int) -> torch.Tensor:
    """(..., b(b-1)/2) strict upper triangle (triu_indices order) -> (..., b, b) Q = U - U^T."""
    _check_packed(packed, block_size)
    return skew_op(packed, block_size)


def cayley(Q: torch.Tensor) -> torch.Tensor:
    """Exact (I + Q)(I - Q)^{-1} of skew matrices (..., b, b); gradient by the Cayley derivative.
    NaN in Q propagates to NaN in R."""
    _validate.tensor("Q", Q, min_ndim=2)
    return cayley_op(Q)


def cayley_neumann(Q: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's ``terms``-term series for (I + Q)(I - Q)^{-1}:
    1: I;  2: I + 2Q;  k >= 3, t = max(3, k - 1): I + 2(Q + ... + Q^{t-1}) + Q^t.

    The series converges only for ||Q||_2 < 1 (Q skew: eigenvalues +/- i theta).  When a block
    exceeds that, warns once per process with the measured orthogonality error ||R^T R - I||_F
    (fastadapt.ops.cayley_monitor)."""
    _validate.tensor("Q", Q, min_ndim=2)
    return neumann_op(Q, _validate.positive_int("num_cayley_neumann_terms", terms))


def cayley_packed(packed: torch.Tensor, block_size: int, *, transpose: bool = False) -> torch.Tensor:
    """cayley(skew(packed)) for packed (..., b(b-1)/2), or its transpose cayley(-skew(packed)):
    one Triton launch on CUDA (each way), a batched inverse on CPU.  Autograd keeps R only."""
    _check_packed(packed, block_size)
    flat = packed.reshape(-1, packed.shape[-1])
    R = cayley_packed_op(flat.neg() if transpose else flat, block_size)
    return R.view(*packed.shape[:-1], block_size, block_size)


def oft_rotation_blocks(packed: torch.Tensor, block_size: int, *, use_cayley_neumann: bool = True,
                        num_cayley_neumann_terms: int = 5) -> torch.Tensor:
    """(n, b(b-1)/2) -> (n, b, b) rotation blocks in PEFT's OFT conventions:
    Neumann mode approximates (I + Q)(I - Q)^{-1}; exact mode is (I - Q)(I + Q)^{-1} = cayley(-Q).
    Triton backend: one launch for R and one for its packed gradient in either mode."""
    _validate.tensor("packed", packed, ndim=2)
    terms = _check_terms(use_cayley_neumann, num_cayley_neumann_terms)
    if terms:
        _check_packed(packed, block_size)
        return neumann_packed_op(packed, block_size, terms)
    return cayley_packed(packed, block_size, transpose=True)


# ----------------------------------------------------------------------------------------------
# block-diagonal rotation and the OFT layer


def block_rotate(x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """y = x R_bd (OFTv2's input-centric rotation): x (..., n*b), R (n, b, b) or (1, b, b) shared.
    R may be float32 on a half x (rotated in float32, rounded once)."""
    _check_blocks(x, R)
    return block_rotate_op(x.reshape(-1, x.shape[-1]), R).view(x.shape)


def block_rotate_linear(x: torch.Tensor, R: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None, *, orthogonal: bool = False) -> torch.Tensor:
    """OFT layer: y = (x R_bd) W^T + bias.  x (..., in), R (in/b or 1, b, b), W (out, in).

    orthogonal: R is an exact Cayley rotation (R^{-1} = R^T), which lets the backward skip one
    pass over the activations (fastadapt.ops.cayley_rotate); False for the Neumann series."""
    _check_blocks(x, R)
    _validate.tensor("weight", weight, ndim=2)
    _check_layer_dtypes(x, weight, bias, [("R", R)])
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight has in_features={weight.shape[1]} but x.shape[-1]={x.shape[-1]}")
    y = block_rotate_linear_op(x.reshape(-1, x.shape[-1]), R, weight, bias, orthogonal)
    return y.view(*x.shape[:-1], weight.shape[0])


def oft_linear(x: torch.Tensor, packed: torch.Tensor, block_size: int, weight: torch.Tensor,
               bias: torch.Tensor | None = None, *, use_cayley_neumann: bool = True,
               num_cayley_neumann_terms: int = 5) -> torch.Tensor:
    """PEFT's OFT layer from its parameter: y = (x R_bd) W^T + bias with
    R = oft_rotation_blocks(packed, block_size, ...).  x (..., in), packed (in/b or 1, b(b-1)/2),
    W (out, in); packed in x's dtype or float32 on a half x.  One op per Cayley mode
    (fastadapt.ops.cayley_oft): it keeps x and the parameters (exact mode: R or its symmetric part)."""
    _validate.tensor("x", x, min_ndim=1)
    _validate.tensor("packed", packed, ndim=2)
    _check_packed(packed, block_size)
    terms = _check_terms(use_cayley_neumann, num_cayley_neumann_terms)
    _check_block_count(x, packed.shape[0], block_size, "packed")
    _validate.tensor("weight", weight, ndim=2)
    _check_layer_dtypes(x, weight, bias, [("packed", packed)])
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight has in_features={weight.shape[1]} but x.shape[-1]={x.shape[-1]}")
    return fused_oft_linear(x, packed, block_size, weight, bias, terms)


def fused_oft_linear(x: torch.Tensor, packed: torch.Tensor, block_size: int, weight: torch.Tensor,
                     bias: torch.Tensor | None, terms: int) -> torch.Tensor:
    """The op call behind :func:`oft_linear` (``terms`` = 0: exact), without its argument checks:
    for callers whose arguments are valid by construction (the PEFT bridge: PEFT's layer fixes the
    shapes and the bridge's check the dtypes), where those checks would be per-call host time."""
    x2d = x.reshape(-1, x.shape[-1])
    if terms:
        y = oft_linear_neumann_op(x2d, packed, weight, bias, block_size, terms)
    else:
        y, _ = oft_linear_exact_op(x2d, packed, weight, bias, block_size)
    return y.view(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------------------------
# SVD-coordinate low-rank path (PSOFT, SSVD, AntiPaSTO)


def svd_rotation_linear(x: torch.Tensor, weight: torch.Tensor, bias, A: torch.Tensor, B: torch.Tensor,
                        C: torch.Tensor) -> torch.Tensor:
    """y = x W^T + bias + ((x A^T) C^T) B^T.  C is (r, r), or (batch, r, r) for one core per
    sample of x (batch, ..., in) (AntiPaSTO's per-sample alpha).  A, B and C in x's dtype, or
    float32 on a half x (PEFT's float32 adapter: the adapter path in float32, rounded once)."""
    _validate.tensor("x", x, min_ndim=1)
    _validate.tensor("weight", weight, ndim=2)
    _check_layer_dtypes(x, weight, bias, [("A", A), ("B", B), ("C", C)])
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
    y, _ = svd_rotation_linear_op(x3, weight, bias, A, B, C3)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _rank_of(packed: torch.Tensor) -> int:
    """r with r (r - 1) / 2 = packed.shape[-1]."""
    r = (1 + math.isqrt(1 + 8 * packed.shape[-1])) // 2
    if packed_size(r) != packed.shape[-1]:
        raise ValueError(f"packed has {packed.shape[-1]} entries, not r(r-1)/2 for any r; pass size=r")
    return r


def psoft_core(packed, *, scaling: float, vector_a=None, vector_b=None, use_cayley_neumann=False,
               num_cayley_neumann_terms=5, cayley_neumann_eps=None, orth=True, size=None):
    """PSOFT's core C = scaling (R - I), R = diag(vector_b) cayley(Q) diag(vector_a) (PEFT's
    OrthLayer; in Neumann mode Q is first scaled to Frobenius norm ``cayley_neumann_eps`` when it
    exceeds it, a device-side choice: ||Q||_F = sqrt(2) ||packed||, and skew(s p) = s skew(p)).
    ``orth=False``: R = packed, a full r x r matrix.  Computed in packed's dtype."""
    if orth:
        size = _rank_of(packed) if size is None else size
        _check_packed(packed, size)
        flat = packed.reshape(1, -1)
        if use_cayley_neumann:
            terms = _validate.positive_int("num_cayley_neumann_terms", num_cayley_neumann_terms)
            if cayley_neumann_eps is not None:  # PEFT: if norm > eps: Q *= eps / (norm + 1e-12)
                norm = math.sqrt(2) * torch.linalg.vector_norm(flat)
                shrink = torch.isfinite(norm) & (norm > cayley_neumann_eps)
                flat = flat * torch.where(shrink, cayley_neumann_eps / (norm + 1e-12), torch.ones_like(norm))
            R = neumann_packed_op(flat, size, terms)[0]
        else:
            R = cayley_packed_op(flat, size)[0]
    else:
        R = packed
    if vector_b is not None:
        R = vector_b[:, None] * R
    if vector_a is not None:
        R = R * vector_a[None, :]
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    return scaling * (R - eye)


def ssvd_core(packed, delta_s, S, alpha):
    """SSVD / AntiPaSTO core C = diag(S + alpha delta_s) cayley(alpha Q) - diag(S), computed in
    packed's dtype (skew(alpha p) = alpha skew(p): the Cayley map runs on the scaled parameter).

    alpha: a float or a 0-d tensor, or a (batch,) tensor giving one core per sample -> (batch, r, r)."""
    r = S.shape[0]
    _check_packed(packed, r)
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(packed.dtype)
        if alpha.ndim == 1:
            R = cayley_packed_op(alpha[:, None] * packed, r)
            scale = S + alpha[:, None] * delta_s  # (batch, r)
            return scale[:, :, None] * R - torch.diag(S)
    R = cayley_packed_op((alpha * packed).unsqueeze(0), r)[0]
    return (S + alpha * delta_s)[:, None] * R - torch.diag(S)
