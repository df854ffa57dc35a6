"""Dense references: Hadamard- and Kronecker-product updates (LyCORIS LoHa and LoKr).

Both build a high-rank ``Delta W`` (out x in) from few parameters, PEFT 0.21 semantics for
``nn.Linear`` (the conv variants and ``use_effective_conv2d`` do not apply to Linear layers).
Parameter names follow PEFT (``hada_w1_a``, ``lokr_w1``, ...) so tests can pair every gradient
with PEFT's.  Adapter values are ``nn.Parameter``; ``from_peft`` copies into float64.
Rank / module dropout are training-time perturbations and not part of the oracle.
"""
from __future__ import annotations

import math

import torch

from .. import _validate
from ._base import ReferenceAdapter, checked_parameter, float64, peft_base_layer


def _kaiming(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """PEFT's ``kaiming_uniform_(a=sqrt(5))`` for a 2-D (rows, fan_in) tensor: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(shape[1])
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    return ((2 * u - 1) * bound).to(dtype=like.dtype, device=like.device)


# ---------------------------------------------------------------------------------------------
# LoHa
# ---------------------------------------------------------------------------------------------
class LoHa(ReferenceAdapter):
    r"""LoHa: low-rank Hadamard product (FedPara, arXiv:2108.06098; LyCORIS; PEFT ``loha``).

    .. math:: \Delta W = s\,(W_{1a} W_{1b}) \odot (W_{2a} W_{2b}), \qquad s = \alpha / r

    Shapes: ``hada_w1_a``, ``hada_w2_a`` (out, r); ``hada_w1_b``, ``hada_w2_b`` (r, in).
    The update has rank up to r^2.  Activation space (Khatri-Rao form, never out x in):
    with the row-wise Kronecker products

    .. math:: A = [W_{1a}[o,k]\, W_{2a}[o,l]]_{o,(k,l)} \;(out, r^2), \qquad
              B = [W_{1b}[k,i]\, W_{2b}[l,i]]_{(k,l),i} \;(r^2, in)

    :math:`\Delta W = s A B` and :math:`y = x W^T + b + s\,(x B^T) A^T`.
    PEFT's default initialisation (kaiming-uniform, ``hada_w2_b = 0``) is the identity.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, r: int, alpha: float, *,
                 hada_w1_a: torch.Tensor | None = None, hada_w1_b: torch.Tensor | None = None,
                 hada_w2_a: torch.Tensor | None = None, hada_w2_b: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
        super().__init__(weight, bias)
        d_out, d_in = self.weight.shape
        _validate.rank(r, d_in, d_out)
        self.r, self.alpha = r, alpha
        given = {"hada_w1_a": hada_w1_a, "hada_w1_b": hada_w1_b, "hada_w2_a": hada_w2_a, "hada_w2_b": hada_w2_b}
        shapes = {"hada_w1_a": (d_out, r), "hada_w1_b": (r, d_in), "hada_w2_a": (d_out, r), "hada_w2_b": (r, d_in)}
        for name, shape in shapes.items():
            value = given[name]
            if value is None:   # PEFT init_weights=True
                value = (torch.zeros(shape, dtype=self.weight.dtype, device=self.weight.device)
                         if name == "hada_w2_b" else _kaiming(shape, self.weight, generator))
            setattr(self, name, checked_parameter(name, value, shape, self.weight))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def delta_weight(self) -> torch.Tensor:
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling

    def khatri_rao_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (out, r^2) and B (r^2, in) with ``delta_weight() == scaling * A @ B``."""
        a = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).reshape(self.out_features, -1)
        b = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(-1, self.in_features)
        return a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.khatri_rao_factors()
        return self.base(x) + (x @ b.T) @ a.T * self.scaling

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default") -> "LoHa":
        if adapter_name in layer.hada_t1:
            raise ValueError("LoHa reference covers nn.Linear only; this layer uses the conv CP form (hada_t1)")
        base = peft_base_layer(layer)
        return cls(float64(base.weight), float64(base.bias), layer.r[adapter_name], layer.alpha[adapter_name],
                   **{name: float64(getattr(layer, name)[adapter_name])
                      for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")})

    @classmethod
    def demo(cls) -> "LoHa":
        g = torch.Generator().manual_seed(0)
        d_out, d_in, r = 13, 10, 3
        w = lambda *s: 0.3 * torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        return cls(torch.randn(d_out, d_in, generator=g, dtype=torch.float64),
                   torch.randn(d_out, generator=g, dtype=torch.float64), r, 6.0,
                   hada_w1_a=w(d_out, r), hada_w1_b=w(r, d_in), hada_w2_a=w(d_out, r), hada_w2_b=w(r, d_in))


# ---------------------------------------------------------------------------------------------
# LoKr
# ---------------------------------------------------------------------------------------------
def lokr_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into (m, n), m * n = dimension, as PEFT 0.21's LoKr does.

    A positive ``factor`` that divides ``dimension`` gives (factor, dimension / factor) as is
    (not reordered).  Otherwise the divisors m = 2, 3, ... of ``dimension`` are walked upwards
    while m < dimension / m held for the previous one and m <= ``factor`` (no bound for
    ``factor=-1``); the last one taken, m, gives (min, max) of (m, dimension / m).  So -1 gives
    the pair nearest the square root (12 -> (3, 4)), and a prime gives (1, dimension).
    """
    _validate.positive_int("dimension", dimension)
    if isinstance(factor, bool) or not isinstance(factor, int) or not (factor == -1 or factor > 0):
        raise ValueError(f"decompose_factor={factor!r} must be -1 (near square root) or a positive integer, e.g. 4")
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m = 1
    for candidate in _validate.divisors(dimension)[1:]:
        if m >= dimension // m or candidate > bound:
            break
        m = candidate
    n = dimension // m
    return min(m, n), max(m, n)


class LoKr(ReferenceAdapter):
    r"""LoKr: low-rank Kronecker product (LyCORIS, arXiv:2309.14859; PEFT ``lokr``).

    .. math:: \Delta W = s\,(W_1 \otimes W_2), \qquad s = \alpha / r

    with out = a b and in = c d, ``W_1`` (a, c), ``W_2`` (b, d); either factor is stored whole
    (``lokr_w1``, ``lokr_w2``) or as a rank-r product (``lokr_w1_a`` (a, r) @ ``lokr_w1_b``
    (r, c), ``lokr_w2_a`` (b, r) @ ``lokr_w2_b`` (r, d)).  The stored tensors define the layout.
    Activation space, never forming an out x in matrix: fold x (..., in) into X (..., c, d), then

    .. math:: y = x W^T + b + s\,\operatorname{vec}(W_1 X W_2^T) \quad (\ldots, a, b) \to (\ldots, out)

    since :math:`(W_1 \otimes W_2)_{(p b + q),(u d + v)} = W_1[p,u]\, W_2[q,v]`.
    :meth:`from_config` chooses the layout and initialisation exactly as PEFT's
    ``update_layer`` does from ``r``, ``decompose_both`` and ``decompose_factor``.
    """

    FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, r: int, alpha: float, **factors):
        super().__init__(weight, bias)
        d_out, d_in = self.weight.shape
        _validate.positive_int("r", r)
        unknown = set(factors) - set(self.FACTORS)
        if unknown:
            raise TypeError(f"unknown LoKr factors {sorted(unknown)}; valid names: {list(self.FACTORS)}")
        self.r, self.alpha = r, alpha
        sides = {}
        for side in ("lokr_w1", "lokr_w2"):
            whole, a, b = (factors.get(side + suffix) for suffix in ("", "_a", "_b"))
            if (whole is None) == (a is None or b is None) or (a is None) != (b is None):
                raise ValueError(f"give either {side} or both {side}_a and {side}_b")
            if whole is not None:
                _validate.tensor(side, whole, ndim=2)
                sides[side] = tuple(whole.shape)
                setattr(self, side, checked_parameter(side, whole, whole.shape, self.weight))
            else:
                _validate.tensor(side + "_a", a, ndim=2)
                rows = a.shape[0]
                _validate.tensor(side + "_b", b, ndim=2)
                cols = b.shape[1]
                setattr(self, side + "_a", checked_parameter(side + "_a", a, (rows, r), self.weight))
                setattr(self, side + "_b", checked_parameter(side + "_b", b, (r, cols), self.weight))
                sides[side] = (rows, cols)
        (a_rows, c_cols), (b_rows, d_cols) = sides["lokr_w1"], sides["lokr_w2"]
        if a_rows * b_rows != d_out or c_cols * d_cols != d_in:
            (out_l, out_k), (in_m, in_n) = lokr_factorization(d_out), lokr_factorization(d_in)
            raise ValueError(
                f"kron(w1 {sides['lokr_w1']}, w2 {sides['lokr_w2']}) has shape ({a_rows * b_rows}, {c_cols * d_cols}), "
                f"not the weight's ({d_out}, {d_in}); e.g. w1 {(out_l, in_m)} and w2 {(out_k, in_n)}")
        self.w1_shape, self.w2_shape = sides["lokr_w1"], sides["lokr_w2"]

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def _factor(self, side: str) -> torch.Tensor:
        if hasattr(self, side):
            return getattr(self, side)
        return getattr(self, side + "_a") @ getattr(self, side + "_b")

    def w1(self) -> torch.Tensor:
        return self._factor("lokr_w1")

    def w2(self) -> torch.Tensor:
        return self._factor("lokr_w2")

    def delta_weight(self) -> torch.Tensor:
        return torch.kron(self.w1(), self.w2()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        folded = x.reshape(*x.shape[:-1], self.w1_shape[1], self.w2_shape[1])    # (..., c, d)
        mixed = self.w1() @ folded @ self.w2().T                                 # (..., a, b)
        return self.base(x) + mixed.reshape(*x.shape[:-1], self.out_features) * self.scaling

    @classmethod
    def layout(cls, d_in: int, d_out: int, r: int, *, decompose_both: bool = False,
               decompose_factor: int = -1) -> dict[str, tuple[int, int]]:
        """PEFT's parameter shapes for an nn.Linear(d_in, d_out): name -> shape."""
        _validate.positive_int("r", r)
        in_m, in_n = lokr_factorization(d_in, decompose_factor)
        out_l, out_k = lokr_factorization(d_out, decompose_factor)
        shapes = {}
        if decompose_both and r < max(out_l, in_m) / 2:
            shapes.update(lokr_w1_a=(out_l, r), lokr_w1_b=(r, in_m))
        else:
            shapes.update(lokr_w1=(out_l, in_m))
        if r < max(out_k, in_n) / 2:
            shapes.update(lokr_w2_a=(out_k, r), lokr_w2_b=(r, in_n))
        else:
            shapes.update(lokr_w2=(out_k, in_n))
        return shapes

    @classmethod
    def from_config(cls, weight: torch.Tensor, bias: torch.Tensor | None, r: int, alpha: float, *,
                    decompose_both: bool = False, decompose_factor: int = -1, init_weights: bool | str = True,
                    generator: torch.Generator | None = None) -> "LoKr":
        """A new adapter laid out and initialised as PEFT's ``LoKrConfig`` would make it.

        ``init_weights=True``: w1 (or w1_a) zero, the rest kaiming-uniform: the identity.
        ``"lycoris"``: w2 (or w2_b) zero, the rest kaiming-uniform: the identity.
        ``False``: everything kaiming-uniform.  r must be in 1..min(in, out).
        """
        d_out, d_in = weight.shape
        _validate.rank(r, d_in, d_out)
        if init_weights not in (True, False, "lycoris"):
            raise ValueError(f"init_weights={init_weights!r}; valid choices: [True, False, 'lycoris']")
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}[init_weights]
        factors = {name: (torch.zeros(shape, dtype=weight.dtype, device=weight.device) if name in zero
                          else _kaiming(shape, weight, generator))
                   for name, shape in cls.layout(d_in, d_out, r, decompose_both=decompose_both,
                                                 decompose_factor=decompose_factor).items()}
        return cls(weight, bias, r, alpha, **factors)

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default") -> "LoKr":
        if adapter_name in layer.lokr_t2:
            raise ValueError("LoKr reference covers nn.Linear only; this layer uses the conv CP form (lokr_t2)")
        base = peft_base_layer(layer)
        factors = {name: float64(getattr(layer, name)[adapter_name])
                   for name in cls.FACTORS if adapter_name in getattr(layer, name)}
        return cls(float64(base.weight), float64(base.bias), layer.r[adapter_name], layer.alpha[adapter_name],
                   **factors)

    @classmethod
    def demo(cls) -> "LoKr":
        g = torch.Generator().manual_seed(0)
        d_out, d_in = 12, 15
        return cls.from_config(torch.randn(d_out, d_in, generator=g, dtype=torch.float64),
                               torch.randn(d_out, generator=g, dtype=torch.float64), 2, 4.0,
                               decompose_both=True, init_weights=False, generator=g)


REFERENCES = {"loha": LoHa, "lokr": LoKr}
