"""Dense references of the Cayley family: OFT, OFTv2, PSOFT, SSVD, AntiPaSTO (float64).

All five rotate features with a Cayley map of a skew-symmetric Q (Q^T = -Q):

    cayley(Q)        = (I + Q)(I - Q)^{-1}        orthogonal for every skew Q; cayley(-Q) = cayley(Q)^T
    neumann(Q, k)    = PEFT's k-term truncation of cayley(Q), using (I - Q)^{-1} = sum_j Q^j:
                       k = 1: I;  k = 2: I + 2Q;  k >= 3 with t = max(3, k - 1):
                       I + 2 (Q + Q^2 + ... + Q^{t-1}) + Q^t       (PEFT 0.21: k = 3 and k = 4 agree)

Q is stored packed: ``packed[..., j]`` holds the j-th strict upper-triangle entry of Q in
``torch.triu_indices(b, b, 1)`` order, and Q = U - U^T.

PEFT's two OFT conventions: ``use_cayley_neumann=True`` uses
neumann(Q, k) ~ (I + Q)(I - Q)^{-1}; ``use_cayley_neumann=False`` solves (I - Q)(I + Q)^{-1} =
cayley(-Q), the transpose.  PSOFT uses cayley(Q) in both modes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validate
from ._base import ReferenceAdapter, peft_base_layer

_F64 = torch.float64


def packed_size(block_size: int) -> int:
    """Number of strict upper-triangle entries of a ``block_size`` x ``block_size`` matrix."""
    return block_size * (block_size - 1) // 2


def skew(packed: torch.Tensor, block_size: int) -> torch.Tensor:
    """(..., b(b-1)/2) packed strict upper triangle -> (..., b, b) skew-symmetric Q = U - U^T."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=packed.device)
    upper = packed.new_zeros(*packed.shape[:-1], block_size, block_size)
    upper[..., rows, cols] = packed
    return upper - upper.transpose(-2, -1)


def cayley(Q: torch.Tensor) -> torch.Tensor:
    """Exact Cayley map (I + Q)(I - Q)^{-1} of a batch of skew matrices (..., b, b)."""
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    # R (I - Q) = I + Q  <=>  R = (I + Q)(I - Q)^{-1}
    return torch.linalg.solve(eye - Q, eye + Q, left=False)


def neumann(Q: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's truncated series for (I + Q)(I - Q)^{-1} (coefficients in the module docstring)."""
    _validate.positive_int("num_cayley_neumann_terms", terms)
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    R = eye.expand_as(Q).clone()
    if terms == 1:
        return R
    if terms == 2:
        return R + 2 * Q
    top = max(3, terms - 1)
    power = Q
    for _ in range(1, top):
        R = R + 2 * power
        power = power @ Q
    return R + power


def orthogonality_error(R: torch.Tensor) -> torch.Tensor:
    """Largest ||R^T R - I||_F over a batch of square blocks (..., b, b)."""
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    return torch.linalg.matrix_norm(R.transpose(-2, -1) @ R - eye).max()


def block_diag(blocks: torch.Tensor, count: int) -> torch.Tensor:
    """(n, b, b) blocks -> (count*b, count*b) block-diagonal matrix; n = 1 repeats one block."""
    if blocks.shape[0] == 1:
        blocks = blocks.expand(count, -1, -1)
    return torch.block_diag(*blocks.unbind(0))


class OFTReference(ReferenceAdapter):
    """OFT, weight-centric (Qiu et al. 2023, arXiv:2306.07280): W' = W R_bd^T.

    packed: (n, b(b-1)/2) with n = in_features / b blocks, or n = 1 with ``block_share``.
    R_i = neumann(Q_i, k) if ``use_cayley_neumann`` else cayley(-Q_i) (PEFT's conventions);
    R_bd = blockdiag(R_1, ..., R_{in/b}) is (in, in), and

        y = x (W R_bd^T)^T + bias = (x R_bd) W^T + bias.

    delta_weight() = W R_bd^T - W.  Shapes: x (..., in), W (out, in).
    """

    def __init__(self, weight, bias, packed: torch.Tensor, block_size: int, *,
                 use_cayley_neumann: bool = True, num_cayley_neumann_terms: int = 5,
                 block_share: bool = False):
        super().__init__(weight, bias)
        _validate.divides("oft_block_size", block_size, self.in_features)
        blocks = 1 if block_share else self.in_features // block_size
        _validate.tensor("oft_R.weight", packed, ndim=2, shape=(blocks, packed_size(block_size)))
        self.block_size = block_size
        self.block_share = block_share
        self.use_cayley_neumann = use_cayley_neumann
        self.num_cayley_neumann_terms = num_cayley_neumann_terms
        self.packed = torch.nn.Parameter(packed.detach().to(_F64).clone())

    def rotation_blocks(self) -> torch.Tensor:
        """(n, b, b) rotation blocks R_i in PEFT's convention for the chosen mode."""
        Q = skew(self.packed, self.block_size)
        if self.use_cayley_neumann:
            return neumann(Q, self.num_cayley_neumann_terms)
        return cayley(-Q)

    def rotation(self) -> torch.Tensor:
        """(in, in) block-diagonal R_bd."""
        return block_diag(self.rotation_blocks(), self.in_features // self.block_size)

    def delta_weight(self) -> torch.Tensor:
        return self.weight @ self.rotation().T - self.weight

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default"):
        module = layer.oft_R[adapter_name]
        if module.coft:
            raise ValueError("coft=True projects oft_R in place each call; the reference covers coft=False")
        base = peft_base_layer(layer)
        return cls(base.weight.to(_F64), None if base.bias is None else base.bias.to(_F64),
                   module.weight.to(_F64), module.block_size,
                   use_cayley_neumann=module.use_cayley_neumann,
                   num_cayley_neumann_terms=module.num_cayley_neumann_terms,
                   block_share=module.block_share)

    @classmethod
    def demo(cls):
        g = torch.Generator().manual_seed(0)
        return cls(torch.randn(12, 16, generator=g, dtype=_F64), torch.randn(12, generator=g, dtype=_F64),
                   0.1 * torch.randn(4, packed_size(4), generator=g, dtype=_F64), 4)


class OFTv2Reference(OFTReference):
    """OFTv2, input-centric OFT (Qiu et al. 2025, arXiv:2506.19847): the same function as OFT,

        y = (x R_bd) W^T + bias,

    computed by rotating each length-b chunk of x by its block (x_i -> x_i R_i) and never
    forming W R_bd^T: O(N d b) extra work instead of O(d_out d_in b).  PEFT's OFT layer is this form.
    """

    def forward(self, x):
        blocks = self.rotation_blocks()
        n = self.in_features // self.block_size
        chunks = x.reshape(*x.shape[:-1], n, self.block_size)
        rotated = torch.einsum("...nk,nkc->...nc", chunks, blocks.expand(n, -1, -1))
        return F.linear(rotated.reshape(x.shape), self.weight, self.bias)


def _cayley_psoft(packed, size, use_neumann, terms, eps):
    """PSOFT's R before the magnitude vectors: cayley(Q) exact, or neumann after the optional
    Frobenius projection ||Q||_F <= eps (``cayley_neumann_eps``)."""
    Q = skew(packed, size)
    if not use_neumann:
        return cayley(Q)
    if eps is not None:
        norm = torch.linalg.matrix_norm(Q)
        if torch.isfinite(norm) and norm > eps:
            Q = Q * (eps / (norm + 1e-12))
    return neumann(Q, terms)


class PSOFTReference(ReferenceAdapter):
    """PSOFT (principal-subspace orthogonal fine-tuning, arXiv:2505.11235).

    A (r, in) and B (out, r) are frozen (from the top-r SVD of W); the r x r rotation is
    R = diag(vector_b) cayley(Q) diag(vector_a) (or a dense trainable R with ``orth=False``), and

        y = x W^T + bias + scaling * ((x A^T) R^T - x A^T) B^T,   delta_weight = scaling * B (R - I) A,

    scaling = psoft_alpha / r.  Neumann mode: cayley(Q) ~ neumann(Q, k) after scaling Q down to
    Frobenius norm ``cayley_neumann_eps`` when it is larger.
    """

    def __init__(self, weight, bias, A, B, packed, *, scaling: float, vector_a=None, vector_b=None,
                 use_cayley_neumann: bool = False, num_cayley_neumann_terms: int = 5,
                 cayley_neumann_eps=None, orth: bool = True):
        super().__init__(weight, bias)
        r = A.shape[0]
        _validate.rank(r, self.in_features, self.out_features)
        _validate.tensor("A", A, shape=(r, self.in_features))
        _validate.tensor("B", B, shape=(self.out_features, r))
        _validate.tensor("psoft_R.weight", packed, shape=(packed_size(r),) if orth else (r, r))
        self.r, self.orth, self.scaling = r, orth, scaling
        self.use_cayley_neumann = use_cayley_neumann
        self.num_cayley_neumann_terms = num_cayley_neumann_terms
        self.cayley_neumann_eps = cayley_neumann_eps
        self.register_buffer("A", A.detach().to(_F64).clone())
        self.register_buffer("B", B.detach().to(_F64).clone())
        self.packed = torch.nn.Parameter(packed.detach().to(_F64).clone())
        self.vector_a = None if vector_a is None else torch.nn.Parameter(vector_a.detach().to(_F64).clone())
        self.vector_b = None if vector_b is None else torch.nn.Parameter(vector_b.detach().to(_F64).clone())

    def rotation(self) -> torch.Tensor:
        R = (_cayley_psoft(self.packed, self.r, self.use_cayley_neumann, self.num_cayley_neumann_terms,
                           self.cayley_neumann_eps) if self.orth else self.packed)
        if self.vector_b is not None:
            R = self.vector_b[:, None] * R
        if self.vector_a is not None:
            R = R * self.vector_a[None, :]
        return R

    def delta_weight(self):
        eye = torch.eye(self.r, dtype=_F64, device=self.weight.device)
        return self.scaling * self.B @ (self.rotation() - eye) @ self.A

    def forward(self, x):
        z = x @ self.A.T
        return self.base(x) + self.scaling * ((z @ self.rotation().T - z) @ self.B.T)

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default"):
        base = peft_base_layer(layer)
        module = layer.psoft_R[adapter_name]
        A, B = layer._get_psoft_ab_cache_buffers(adapter_name)
        f64 = lambda t: None if t is None else t.to(_F64)  # noqa: E731
        return cls(f64(base.weight), f64(base.bias), f64(A), f64(B), f64(module.weight),
                   scaling=layer.scaling[adapter_name], vector_a=f64(module.vector_a),
                   vector_b=f64(module.vector_b), use_cayley_neumann=module.use_cayley_neumann,
                   num_cayley_neumann_terms=int(module.num_cayley_neumann_terms),
                   cayley_neumann_eps=module.cayley_neumann_eps, orth=module.orth)

    @classmethod
    def demo(cls):
        g = torch.Generator().manual_seed(0)
        W = torch.randn(12, 16, generator=g, dtype=_F64)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        r = 4
        return cls(W, torch.randn(12, generator=g, dtype=_F64), Vh[:r], U[:, :r] * S[:r],
                   0.1 * torch.randn(packed_size(r), generator=g, dtype=_F64), scaling=1.0,
                   vector_a=1 + 0.1 * torch.randn(r, generator=g, dtype=_F64),
                   vector_b=1 + 0.1 * torch.randn(r, generator=g, dtype=_F64))


class SSVDReference(ReferenceAdapter):
    """SSVD (structured SVD-guided fine-tuning, arXiv:2509.02830): rotate the top-r right
    singular vectors and shift the top-r singular values of the frozen W.

    W = U diag(S) V^T + W_res with U (out, r), S (r,), V (in, r) the top-r SVD of W.  With
    R = cayley(alpha Q) (r x r, Q from ``packed``) and ``delta_s`` (r,):

        W' = W_res + U diag(S + alpha delta_s) R V^T
        y  = x W^T + bias + ((x V) R^T * (S + alpha delta_s) - (x V) * S) U^T

    i.e. x V -> rotate -> scale -> U^T, the low-rank path of the issue.  alpha = 1 for SSVD.
    """

    alpha_default = 1.0

    def __init__(self, weight, bias, packed, delta_s, *, r: int, alpha: float | None = None):
        super().__init__(weight, bias)
        _validate.rank(r, self.in_features, self.out_features)
        _validate.tensor("rotation", packed, shape=(packed_size(r),))
        _validate.tensor("delta_s", delta_s, shape=(r,))
        U, S, Vh = torch.linalg.svd(self.weight.to(_F64), full_matrices=False)
        self.r = r
        self.alpha = self.alpha_default if alpha is None else float(alpha)
        self.register_buffer("U", U[:, :r].contiguous())
        self.register_buffer("S", S[:r].contiguous())
        self.register_buffer("V", Vh[:r].T.contiguous())
        self.packed = torch.nn.Parameter(packed.detach().to(_F64).clone())
        self.delta_s = torch.nn.Parameter(delta_s.detach().to(_F64).clone())

    def rotation(self, alpha=None) -> torch.Tensor:
        """R(alpha) = cayley(alpha Q); R(-alpha) = R(alpha)^T = R(alpha)^{-1}."""
        alpha = self.alpha if alpha is None else alpha
        return cayley(alpha * skew(self.packed, self.r))

    def delta_weight(self, alpha=None):
        alpha = self.alpha if alpha is None else alpha
        scaled = (self.S + alpha * self.delta_s)[:, None] * self.rotation(alpha)
        return self.U @ (scaled - torch.diag(self.S)) @ self.V.T

    def merged_weight(self, alpha=None):
        return self.weight + self.delta_weight(alpha)

    def forward(self, x, alpha=None):
        alpha = self.alpha if alpha is None else alpha
        z = x @ self.V
        low = (z @ self.rotation(alpha).T) * (self.S + alpha * self.delta_s) - z * self.S
        return self.base(x) + low @ self.U.T

    @classmethod
    def demo(cls):
        g = torch.Generator().manual_seed(0)
        r = 4
        return cls(torch.randn(12, 16, generator=g, dtype=_F64), torch.randn(12, generator=g, dtype=_F64),
                   0.1 * torch.randn(packed_size(r), generator=g, dtype=_F64),
                   0.1 * torch.randn(r, generator=g, dtype=_F64), r=r)


class AntiPaSTOReference(SSVDReference):
    """AntiPaSTO (arXiv:2601.07473): the SSVD path with a signed steering strength alpha.

        W'(alpha) = W_res + U diag(S + alpha delta_s) cayley(alpha Q) V^T

    alpha is a runtime knob (``forward(x, alpha)``; a tensor of shape (batch,) steers each sample
    of a batch x (batch, ..., in) separately).  alpha = 0 is the frozen layer and
    cayley(-alpha Q) = cayley(alpha Q)^{-1}: +alpha and -alpha rotate in opposite directions.
    """

    def forward(self, x, alpha=None):
        alpha = self.alpha if alpha is None else alpha
        if not isinstance(alpha, torch.Tensor) or alpha.ndim == 0:
            return super().forward(x, float(alpha))
        _validate.tensor("alpha", alpha, ndim=1, shape=(x.shape[0],))
        return torch.stack([super(AntiPaSTOReference, self).forward(x[i], float(a)) for i, a in enumerate(alpha)])


REFERENCES = {
    "oft": OFTReference,
    "oftv2": OFTv2Reference,
    "psoft": PSOFTReference,
    "ssvd": SSVDReference,
    "antipasto": AntiPaSTOReference,
}
