"""Dense references of the butterfly family: BOFT, GOFT, HRA, ETHER, RoAd.

Every method here multiplies the frozen weight by a structured orthogonal (or, for RoAd and
ETHER+, rotation-scaling) matrix instead of adding a low-rank term.  The references build that
matrix densely, in float64, in the paper's notation; the fast path applies the same factors to
activations without ever forming them.

Conventions (torch layout, ``W`` is (out_features, in_features), ``y = x W^T + b``):

- input side, ``W' = W R`` (equivalently ``y = (x R^T) W^T + b``): GOFT, HRA, ETHER;
  BOFT as PEFT writes it, ``W' = diag(s) W R^T`` (PEFT rotates ``x @ R``);
- output side, ``W' = R W`` and ``b' = R b``: RoAd (PEFT rotates the base output);
- both sides, ``W' = H_out W H_in``: ETHER+.

Each class offers ``rotation()`` (the dense factor), ``delta_weight() = W' - W`` and ``forward``
in activation space; ``from_peft`` copies PEFT's parameters (as float64) where PEFT has the
method.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .. import _validate
from ._base import ReferenceAdapter, demo_linear, peft_weight_and_bias
from .cayley import cayley

_DEMO_SEED = 20240531


def _demo_generator() -> torch.Generator:
    return torch.Generator().manual_seed(_DEMO_SEED)


def _parameter(value: torch.Tensor | None, default: torch.Tensor, name: str) -> nn.Parameter:
    """``value`` (checked against ``default``'s shape, cast to its dtype) or ``default``."""
    if value is None:
        return nn.Parameter(default)
    _validate.tensor(name, value, shape=default.shape)
    return nn.Parameter(value.detach().clone().to(default.dtype))


def boft_cayley(params: torch.Tensor) -> torch.Tensor:
    """Cayley map of a batch of square matrices, as PEFT's BOFT: ``Q = (I - S)(I + S)^{-1}``
    with ``S = (A - A^T) / 2`` the skew-symmetric part of ``A`` (shape (..., b, b)), i.e.
    :func:`fastadapt.reference.cayley.cayley` of ``-S``.

    ``Q`` is orthogonal with det +1 for every skew ``S``; ``A = 0`` gives ``Q = I``.
    """
    return cayley(-0.5 * (params - params.transpose(-1, -2)))


def butterfly_permutation(n: int, block_size: int, factor: int) -> torch.Tensor:
    """Index vector ``p`` of BOFT's ``factor``-th butterfly permutation (PEFT's ``boft_P[factor]``
    is ``I[p]``, i.e. ``(P v)[k] = v[p[k]]``).

    The features are cut into chunks of ``c = block_size * 2^factor``; each chunk is cut into
    ``2^(factor+1)`` pieces of ``block_size / 2`` and the pieces are reordered evens first, then
    odds (0, 2, 4, ..., 1, 3, 5, ...).  So after conjugation with ``P`` a block of the
    block-diagonal factor couples two half-blocks that lie ``c / 2`` apart: the butterfly.
    Factor 0 is the identity.
    """
    if factor == 0:
        return torch.arange(n)
    half = block_size // 2
    chunk = block_size * 2 ** factor
    pieces = chunk // half
    order = list(range(0, pieces, 2)) + list(range(1, pieces, 2))
    within = torch.cat([torch.arange(q * half, (q + 1) * half) for q in order])
    return torch.cat([start + within for start in range(0, n, chunk)])


class BOFT(ReferenceAdapter):
    """BOFT: butterfly orthogonal fine-tuning (Liu et al., arXiv:2311.06243), as PEFT 0.21.

    Parameters (PEFT's names): ``boft_R`` (m, n_blocks, b, b) with ``n_blocks * b = in_features``
    and ``m = n_butterfly_factor``; ``boft_s`` (out_features, 1).

    Each factor ``i`` is a block-diagonal rotation ``B_i = blockdiag(boft_cayley(boft_R[i, k]))``
    conjugated by the butterfly permutation ``P_i`` (:func:`butterfly_permutation`)::

        R = M_{m-1} ... M_1 M_0,   M_i = P_i B_i P_i^T            (in_features x in_features)
        y = ((x R) W^T) * s + b    i.e.   W' = diag(s) W R^T       (bias is not scaled)

    ``R`` is orthogonal; ``boft_R = 0``, ``boft_s = 1`` is the identity.  ``m = 1`` is block OFT.
    PEFT forces ``m = 1`` without its CUDA extension; this reference builds any ``m`` in torch.
    """

    def __init__(self, weight, bias=None, *, block_size: int, n_butterfly_factor: int = 1,
                 boft_R: torch.Tensor | None = None, boft_s: torch.Tensor | None = None):
        super().__init__(weight, bias)
        d_in = self.in_features
        _validate.divides("block_size", block_size, d_in)
        _validate.positive_int("n_butterfly_factor", n_butterfly_factor)
        if n_butterfly_factor > 1:
            _validate.even("block_size", block_size)
            span = block_size * 2 ** (n_butterfly_factor - 1)
            if d_in % span:
                top = max(k for k in range(1, n_butterfly_factor) if d_in % (block_size * 2 ** (k - 1)) == 0)
                raise ValueError(
                    f"n_butterfly_factor={n_butterfly_factor} needs in_features={d_in} divisible by "
                    f"block_size * 2^(n_butterfly_factor - 1) = {span}; choose n_butterfly_factor in 1..{top}")
        self.block_size = block_size
        self.n_butterfly_factor = n_butterfly_factor
        n_blocks = d_in // block_size
        dtype = self.weight.dtype
        self.boft_R = _parameter(boft_R, torch.zeros(n_butterfly_factor, n_blocks, block_size, block_size,
                                                     dtype=dtype), "boft_R")
        self.boft_s = _parameter(boft_s, torch.ones(self.out_features, 1, dtype=dtype), "boft_s")

    def factors(self) -> list[torch.Tensor]:
        """The dense butterfly factors ``M_i = P_i B_i P_i^T``, i = 0..m-1."""
        blocks = boft_cayley(self.boft_R)                      # (m, n_blocks, b, b)
        result = []
        for i in range(self.n_butterfly_factor):
            block_diag = torch.block_diag(*blocks[i])
            p = butterfly_permutation(self.in_features, self.block_size, i).to(self.weight.device)
            result.append(block_diag[p][:, p])           # P B P^T with P = I[p]
        return result

    def rotation(self) -> torch.Tensor:
        """``R = M_{m-1} ... M_0`` (in_features x in_features), applied as ``x @ R``."""
        rotation = torch.eye(self.in_features, dtype=self.weight.dtype, device=self.weight.device)
        for factor in self.factors():
            rotation = factor @ rotation
        return rotation

    def merged_weight(self) -> torch.Tensor:
        return self.boft_s * (self.weight @ self.rotation().T)

    def delta_weight(self) -> torch.Tensor:
        return self.merged_weight() - self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x @ self.rotation(), self.weight) * self.boft_s.squeeze(-1)
        return y if self.bias is None else y + self.bias

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default") -> "BOFT":
        weight, bias = peft_weight_and_bias(layer)
        boft_R = layer.boft_R[adapter_name].detach().to(torch.float64)
        return cls(weight, bias, block_size=layer.boft_block_size[adapter_name],
                   n_butterfly_factor=boft_R.shape[0], boft_R=boft_R,
                   boft_s=layer.boft_s[adapter_name].detach().to(torch.float64))

    @classmethod
    def demo(cls) -> "BOFT":
        g = _demo_generator()
        weight, bias = demo_linear(16, 12, g)
        return cls(weight, bias, block_size=4, n_butterfly_factor=2,
                   boft_R=0.1 * torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64),
                   boft_s=1 + 0.1 * torch.randn(12, 1, generator=g, dtype=torch.float64))


def givens_pairs(block_size: int, n_features: int, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n_features / 2`` disjoint index pairs (i, j) rotated by GOFT stage ``stage``.

    Within every block of ``block_size`` (a power of two) features, index ``i`` with bit
    ``stage`` clear is paired with ``j = i + 2^stage`` (the radix-2 FFT butterfly).  Pairs are
    listed by increasing ``i``; that order indexes ``goft_theta[stage]``.
    """
    i = torch.arange(n_features)
    first = i[(i % block_size) & (1 << stage) == 0]
    return first, first + (1 << stage)


class GOFT(ReferenceAdapter):
    """GOFT: orthogonal fine-tuning by Givens rotations (Ma et al., arXiv:2404.04316).

    Parameter: ``goft_theta`` (L, in_features / 2) with ``L = log2(block_size)`` stages; not in
    PEFT.  Stage ``k`` is ``in_features / 2`` disjoint 2x2 Givens rotations of the pairs from
    :func:`givens_pairs` (features ``i`` and ``i + 2^k`` inside each block)::

        G_k[i, i] = G_k[j, j] = cos(theta),  G_k[j, i] = sin(theta),  G_k[i, j] = -sin(theta)
        R = G_{L-1} ... G_1 G_0,           W' = W R,     y = (x R^T) W^T + b

    ``L = log2(d)`` stages of ``d / 2`` rotations reach every pair of features (the paper's
    O(d)-parameter butterfly of Givens rotations).  ``block_size`` (default ``in_features``, a
    power of two) lets any ``in_features = n * 2^L`` use ``n`` independent butterflies.
    ``theta = 0`` is the identity.  The paper's quasi-orthogonal scaling (qGOFT) is not included.
    """

    def __init__(self, weight, bias=None, *, block_size: int | None = None,
                 goft_theta: torch.Tensor | None = None):
        super().__init__(weight, bias)
        d_in = self.in_features
        block_size = d_in if block_size is None else block_size
        _validate.divides("block_size", block_size, d_in)
        if block_size < 2 or block_size & (block_size - 1):
            powers = [2 ** k for k in range(1, d_in.bit_length()) if d_in % 2 ** k == 0]
            raise ValueError(f"block_size={block_size} must be a power of two >= 2 dividing "
                             f"in_features={d_in}; valid choices: {powers or 'none (in_features is odd)'}")
        self.block_size = block_size
        self.n_stages = block_size.bit_length() - 1
        self.goft_theta = _parameter(goft_theta, torch.zeros(self.n_stages, d_in // 2, dtype=self.weight.dtype),
                                     "goft_theta")

    def stage(self, k: int) -> torch.Tensor:
        """Dense ``G_k`` (in_features x in_features)."""
        i, j = givens_pairs(self.block_size, self.in_features, k)
        c, s = torch.cos(self.goft_theta[k]), torch.sin(self.goft_theta[k])
        g = torch.zeros(self.in_features, self.in_features, dtype=self.weight.dtype, device=self.weight.device)
        g[i, i], g[j, j], g[j, i], g[i, j] = c, c, s, -s
        return g

    def rotation(self) -> torch.Tensor:
        rotation = torch.eye(self.in_features, dtype=self.weight.dtype, device=self.weight.device)
        for k in range(self.n_stages):
            rotation = self.stage(k) @ rotation
        return rotation

    def merged_weight(self) -> torch.Tensor:
        return self.weight @ self.rotation()

    def delta_weight(self) -> torch.Tensor:
        return self.merged_weight() - self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the stages pairwise to ``x`` (no dense matrix): ``x <- G_k x`` per stage."""
        for k in range(self.n_stages):
            i, j = givens_pairs(self.block_size, self.in_features, k)
            c, s = torch.cos(self.goft_theta[k]), torch.sin(self.goft_theta[k])
            xi, xj = x[..., i], x[..., j]
            x = x.clone()
            x[..., i] = c * xi - s * xj
            x[..., j] = s * xi + c * xj
        return F.linear(x, self.weight, self.bias)

    @classmethod
    def demo(cls) -> "GOFT":
        g = _demo_generator()
        weight, bias = demo_linear(16, 12, g)
        return cls(weight, bias, goft_theta=0.3 * torch.randn(4, 8, generator=g, dtype=torch.float64))


class HRA(ReferenceAdapter):
    """HRA: Householder reflection adaptation (Yuan et al., arXiv:2405.17484), as PEFT 0.21.

    Parameter: ``hra_u`` (in_features, r), column ``u_i`` the normal of reflection ``i``.

    ``apply_GS=False``:  ``H = H_1 H_2 ... H_r``, ``H_i = I - 2 u_i u_i^T / ||u_i||^2``;
    ``apply_GS=True``:   Gram-Schmidt ``u_1..u_r -> q_1..q_r`` (orthonormal), ``H = I - 2 Q Q^T``.

        W' = W H,    y = x H^T W^T + b                      (H is orthogonal)

    PEFT's default init repeats each random column twice (r even), so ``H_{2k-1} H_{2k} = I``
    and the adapter starts at the identity; this constructor does the same when ``hra_u`` is None.
    """

    def __init__(self, weight, bias=None, *, r: int = 8, apply_GS: bool = False,
                 hra_u: torch.Tensor | None = None, seed: int = 0):
        super().__init__(weight, bias)
        d_in = self.in_features
        _validate.positive_int("r", r)
        if apply_GS and r > d_in:
            raise ValueError(f"r={r} exceeds in_features={d_in}: Gram-Schmidt (apply_GS=True) needs r in 1..{d_in}")
        self.r, self.apply_GS = r, apply_GS
        if hra_u is None:
            if r % 2:
                raise ValueError(f"r={r} is odd: the identity init pairs reflections; pass hra_u or choose r={r + 1}")
            g = torch.Generator().manual_seed(seed)
            hra_u = torch.repeat_interleave(torch.randn(d_in, r // 2, generator=g, dtype=torch.float64), 2, dim=1)
        else:
            _validate.tensor("hra_u", hra_u, shape=(d_in, r))
        self.hra_u = nn.Parameter(hra_u.detach().clone().to(self.weight.dtype))

    def orthonormal_directions(self) -> torch.Tensor:
        """Classical Gram-Schmidt of the columns of ``hra_u`` (in_features, r), in order."""
        columns = []
        for i in range(self.r):
            u = self.hra_u[:, i]
            for q in columns:
                u = u - (q @ u) * q
            columns.append(u / u.norm())
        return torch.stack(columns, dim=1)

    def rotation(self) -> torch.Tensor:
        """``H`` (in_features x in_features), orthogonal."""
        eye = torch.eye(self.in_features, dtype=self.weight.dtype, device=self.weight.device)
        if self.apply_GS:
            q = self.orthonormal_directions()
            return eye - 2 * q @ q.T
        h = eye
        for i in range(self.r):
            u = self.hra_u[:, i] / self.hra_u[:, i].norm()
            h = h @ (eye - 2 * torch.outer(u, u))
        return h

    def merged_weight(self) -> torch.Tensor:
        return self.weight @ self.rotation()

    def delta_weight(self) -> torch.Tensor:
        return self.merged_weight() - self.weight

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default") -> "HRA":
        weight, bias = peft_weight_and_bias(layer)
        return cls(weight, bias, r=layer.hra_r[adapter_name], apply_GS=layer.hra_apply_GS[adapter_name],
                   hra_u=layer.hra_u[adapter_name].detach().to(torch.float64))

    @classmethod
    def demo(cls) -> "HRA":
        g = _demo_generator()
        weight, bias = demo_linear(16, 12, g)
        return cls(weight, bias, r=4, hra_u=torch.randn(16, 4, generator=g, dtype=torch.float64))


def _block_reflection(u: torch.Tensor) -> torch.Tensor:
    """``blockdiag(I - 2 u_k u_k^T / ||u_k||^2)`` for rows ``u_k`` of ``u`` (n_blocks, b)."""
    n_blocks, b = u.shape
    unit = u / u.norm(dim=1, keepdim=True)
    eye = torch.eye(b, dtype=u.dtype, device=u.device)
    return torch.block_diag(*(eye - 2 * torch.outer(unit[k], unit[k]) for k in range(n_blocks)))


def _block_plus(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``blockdiag(I - u_k u_k^T / ||u_k||^2 + v_k v_k^T / ||v_k||^2)`` (ETHER+'s ``H+``)."""
    n_blocks, b = u.shape
    uu, vv = u / u.norm(dim=1, keepdim=True), v / v.norm(dim=1, keepdim=True)
    eye = torch.eye(b, dtype=u.dtype, device=u.device)
    return torch.block_diag(*(eye - torch.outer(uu[k], uu[k]) + torch.outer(vv[k], vv[k])
                              for k in range(n_blocks)))


class ETHER(ReferenceAdapter):
    """ETHER and ETHER+: fine-tuning with hyperplane reflections (Bini et al., arXiv:2405.20271).
    Not in PEFT.

    ETHER (``plus=False``), parameter ``ether_u`` (n_blocks, in_features / n_blocks)::

        H = blockdiag(I - 2 u_k u_k^T / ||u_k||^2),    W' = W H,    y = x H W^T + b

    ``H`` is a symmetric orthogonal involution (``H^2 = I``) with one eigenvalue -1 per block, so
    ``||W' - W||`` is bounded by construction; ETHER is never the identity (``H != I``).

    ETHER+ (``plus=True``), parameters ``ether_u, ether_v`` (n_blocks, in_features / n_blocks) for
    the input side and ``ether_u_out, ether_v_out`` (n_blocks, out_features / n_blocks) for the
    output side::

        H+ = blockdiag(I - u_k u_k^T / ||u_k||^2 + v_k v_k^T / ||v_k||^2)
        W' = H+_out W H+_in

    ``H+`` is not orthogonal in general; ``u_k = v_k`` gives ``H+ = I`` (the default init), and
    ``H+ - I`` has rank <= 2 per block.  Side convention: the paper writes ``H W`` with ``W``
    stored (in, out) as OFT does; in torch's (out, in) layout that is ``W H`` (input side).
    """

    def __init__(self, weight, bias=None, *, n_blocks: int = 1, plus: bool = False,
                 ether_u: torch.Tensor | None = None, ether_v: torch.Tensor | None = None,
                 ether_u_out: torch.Tensor | None = None, ether_v_out: torch.Tensor | None = None,
                 seed: int = 0):
        super().__init__(weight, bias)
        _validate.divides("n_blocks", n_blocks, self.in_features)
        if plus:
            _validate.divides("n_blocks", n_blocks, self.out_features, "out_features")
        elif ether_v is not None or ether_u_out is not None or ether_v_out is not None:
            raise ValueError("ether_v, ether_u_out and ether_v_out belong to ETHER+; pass plus=True or drop them")
        self.n_blocks, self.plus = n_blocks, plus
        g = torch.Generator().manual_seed(seed)
        dtype = self.weight.dtype

        def draw(features):
            return torch.randn(n_blocks, features // n_blocks, generator=g, dtype=torch.float64).to(dtype)

        self.ether_u = _parameter(ether_u, draw(self.in_features), "ether_u")
        if plus:
            self.ether_v = _parameter(ether_v, self.ether_u.detach().clone(), "ether_v")
            self.ether_u_out = _parameter(ether_u_out, draw(self.out_features), "ether_u_out")
            self.ether_v_out = _parameter(ether_v_out, self.ether_u_out.detach().clone(), "ether_v_out")

    def rotation(self) -> torch.Tensor:
        """The input-side factor: ``H`` (ETHER) or ``H+_in`` (ETHER+)."""
        if self.plus:
            return _block_plus(self.ether_u, self.ether_v)
        return _block_reflection(self.ether_u)

    def output_rotation(self) -> torch.Tensor:
        """ETHER+'s output-side factor ``H+_out``; the identity for ETHER."""
        if self.plus:
            return _block_plus(self.ether_u_out, self.ether_v_out)
        return torch.eye(self.out_features, dtype=self.weight.dtype, device=self.weight.device)

    def merged_weight(self) -> torch.Tensor:
        return self.output_rotation() @ self.weight @ self.rotation()

    def delta_weight(self) -> torch.Tensor:
        return self.merged_weight() - self.weight

    @classmethod
    def demo(cls) -> "ETHER":
        g = _demo_generator()
        weight, bias = demo_linear(16, 12, g)
        ether = cls(weight, bias, n_blocks=4, plus=True)
        with torch.no_grad():
            ether.ether_v.add_(0.1 * torch.randn(4, 4, generator=g, dtype=torch.float64))
            ether.ether_v_out.add_(0.1 * torch.randn(4, 3, generator=g, dtype=torch.float64))
        return ether


ROAD_VARIANTS = {"road_1": 0.5, "road_2": 1, "road_4": 2}  # parameters per output feature


class RoAd(ReferenceAdapter):
    """RoAd: 2x2 rotation-scaling of output pairs (Liao et al., arXiv:2409.00119), as PEFT 0.21.

    Output features are cut into groups of ``group_size``; inside a group, feature ``a`` (first
    half) is paired with ``b = a + group_size / 2``.  With per-feature ``f = alpha cos(theta)``
    and ``g = alpha sin(theta)`` the base output ``h = x W^T + b`` becomes::

        y[a] = f[a] h[a] - g[a] h[b]
        y[b] = f[b] h[b] + g[b] h[a]          i.e.  y = R h,   W' = R W,   b' = R b

    Parameters ``road_theta``, ``road_alpha`` of length ``out/2`` (road_1: one angle and scale per
    pair, shared by ``a`` and ``b``), ``out`` (road_2: one per feature) or ``2 out`` (road_4:
    per group, the first ``group_size`` entries drive ``f`` and the next ``group_size`` drive
    ``g``, ``f = alpha_1 cos(theta_1)``, ``g = alpha_2 sin(theta_2)``).  ``theta = 0, alpha = 1``
    is the identity; road_1 with ``alpha = 1`` is a rotation.  The bias is rotated too: use
    :meth:`merged_bias` with :meth:`merged_weight`.
    """

    def __init__(self, weight, bias=None, *, variant: str = "road_1", group_size: int = 64,
                 road_theta: torch.Tensor | None = None, road_alpha: torch.Tensor | None = None):
        super().__init__(weight, bias)
        if variant not in ROAD_VARIANTS:
            raise ValueError(f"variant={variant!r} is not a RoAd variant; valid choices: {list(ROAD_VARIANTS)}")
        _validate.even("group_size", group_size)
        _validate.divides("group_size", group_size, self.out_features, "out_features")
        self.variant, self.group_size = variant, group_size
        size = int(self.out_features * ROAD_VARIANTS[variant])
        dtype = self.weight.dtype
        self.road_theta = _parameter(road_theta, torch.zeros(size, dtype=dtype), "road_theta")
        self.road_alpha = _parameter(road_alpha, torch.ones(size, dtype=dtype), "road_alpha")

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-output-feature ``(f, g)``, each of length out_features."""
        half = self.group_size // 2
        theta, alpha = self.road_theta, self.road_alpha
        if self.variant == "road_1":   # one (theta, alpha) per pair: repeat for both halves
            theta = theta.reshape(-1, 1, half).expand(-1, 2, half).reshape(-1)
            alpha = alpha.reshape(-1, 1, half).expand(-1, 2, half).reshape(-1)
        if self.variant == "road_4":
            theta = theta.reshape(-1, 2, self.group_size)
            alpha = alpha.reshape(-1, 2, self.group_size)
            return ((alpha[:, 0] * torch.cos(theta[:, 0])).reshape(-1),
                    (alpha[:, 1] * torch.sin(theta[:, 1])).reshape(-1))
        return alpha * torch.cos(theta), alpha * torch.sin(theta)

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices ``(a, b)`` of the paired output features."""
        a = torch.arange(self.out_features).reshape(-1, 2, self.group_size // 2)[:, 0].reshape(-1)
        return a, a + self.group_size // 2

    def rotation(self) -> torch.Tensor:
        """Dense ``R`` (out_features x out_features)."""
        f, g = self.coefficients()
        a, b = self.pairs()
        r = torch.diag(f)
        r[a, b] = -g[a]
        r[b, a] = g[b]
        return r

    def merged_weight(self) -> torch.Tensor:
        return self.rotation() @ self.weight

    def merged_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.rotation() @ self.bias

    def delta_weight(self) -> torch.Tensor:
        return self.merged_weight() - self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pairwise on the base output (no dense ``R``)."""
        h = self.base(x)
        f, g = self.coefficients()
        a, b = self.pairs()
        y = h * f
        y[..., a] -= g[a] * h[..., b]
        y[..., b] += g[b] * h[..., a]
        return y

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default") -> "RoAd":
        weight, bias = peft_weight_and_bias(layer)
        return cls(weight, bias, variant=str(layer.variant[adapter_name]), group_size=layer.group_size[adapter_name],
                   road_theta=layer.road_theta[adapter_name].detach().to(torch.float64),
                   road_alpha=layer.road_alpha[adapter_name].detach().to(torch.float64))

    @classmethod
    def demo(cls) -> "RoAd":
        """Without a bias: RoAd rotates the bias too (``merged_bias``), which a caller that pairs
        ``merged_weight`` with the frozen ``bias`` would miss."""
        g = _demo_generator()
        weight, _ = demo_linear(16, 12, g)
        return cls(weight, None, variant="road_2", group_size=4,
                   road_theta=0.5 * torch.randn(12, generator=g, dtype=torch.float64),
                   road_alpha=1 + 0.2 * torch.randn(12, generator=g, dtype=torch.float64))


REFERENCES = {"boft": BOFT, "goft": GOFT, "hra": HRA, "ether": ETHER, "road": RoAd}
