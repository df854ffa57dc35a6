"""Dense references of the low-rank-product methods: LoRA (with PiSSA / OLoRA init), VeRA,
AdaLoRA, RandLoRA and VB-LoRA.

Every method here adds a product of thin matrices to a frozen linear map::

    y = x W^T + b + x dW^T,        dW = (out_features, in_features)

and differs only in how the thin factors are built.  Each class stores the factors under
PEFT's names, computes in float64, and reproduces PEFT 0.21's ``get_delta_weight`` and
forward (eval mode: dropout is the identity).  ``from_peft(layer, adapter_name)`` copies a
PEFT tuner layer's factors and reads its config (scaling, fan_in_fan_out, shared bases).

Shapes: ``x`` (..., in_features); ``W`` (out_features, in_features), stored as PyTorch's
nn.Linear does even where PEFT's layer keeps it transposed (``fan_in_fan_out=True``, e.g. a
transformers Conv1D): ``from_peft`` transposes it back.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validate
from ..testing import generator
from ._base import ReferenceAdapter, demo_linear, peft_weight_and_bias

# AdaLoRA divides by (ranknum + 1e-5) in PEFT's forward and get_delta_weight.
ADALORA_RANKNUM_EPS = 1e-5


def _f64(name: str, t) -> torch.Tensor:
    """``t`` checked as a floating-point tensor, detached and copied to float64."""
    return _validate.tensor(name, t).detach().to(torch.float64).clone()


def _shape(name: str, t: torch.Tensor, shape) -> None:
    _validate.tensor(name, t, shape=shape)


# ---------------------------------------------------------------------------------------------
# LoRA, and the PiSSA / OLoRA initialisations
# ---------------------------------------------------------------------------------------------

def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """LoRA's scale s: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA
    (Kalajdzievski 2023, arXiv:2312.03732)."""
    _validate.positive_int("r", r)
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRA(ReferenceAdapter):
    """LoRA (Hu et al. 2021, arXiv:2106.09685).

        dW = s * B @ A
        y  = x W^T + b + s * (x A^T) B^T

    ``lora_A``: (r, in_features); ``lora_B``: (out_features, r); ``scaling`` s is
    ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA, see :func:`lora_scaling`).
    1 <= r <= min(in_features, out_features).  PEFT initialises B = 0, so dW = 0 at init.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                 lora_B: torch.Tensor, scaling: float):
        weight = _f64("weight", weight)
        super().__init__(weight, None if bias is None else _f64("bias", bias))
        _validate.tensor("lora_A", lora_A, ndim=2)
        r = _validate.rank(lora_A.shape[0], self.in_features, self.out_features, name="r")
        _shape("lora_A", lora_A, (r, self.in_features))
        _shape("lora_B", lora_B, (self.out_features, r))
        self.r = r
        self.scaling = float(scaling)
        self.lora_A = nn.Parameter(_f64("lora_A", lora_A))
        self.lora_B = nn.Parameter(_f64("lora_B", lora_B))

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        return self.base(x) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default"):
        """Copy a PEFT ``lora.Linear`` adapter (vanilla LoRA: no DoRA or other variant, no
        ``lora_bias``); ``scaling`` is read from the layer, so ``set_scale`` is honoured."""
        if adapter_name in getattr(layer, "lora_variant", {}):
            variant = type(layer.lora_variant[adapter_name]).__name__
            raise ValueError(f"adapter_name={adapter_name!r} uses the LoRA variant {variant}; "
                             "use that variant's reference (e.g. 'dora')")
        if layer.lora_bias.get(adapter_name, False):
            raise ValueError(f"adapter_name={adapter_name!r} has lora_bias=True, which this reference "
                             "does not model; use lora_bias=False")
        weight, bias = peft_weight_and_bias(layer)
        return cls(weight, bias, layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight,
                   layer.scaling[adapter_name])

    @classmethod
    def demo(cls, d_in: int = 24, d_out: int = 40, r: int = 4, lora_alpha: float = 8.0,
             seed: int | None = None):
        """A random instance with a nonzero B (unlike PEFT's init) so dW != 0."""
        g = generator(seed)
        weight, bias = demo_linear(d_in, d_out, g)
        lora_A = torch.randn(r, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in)
        lora_B = torch.randn(d_out, r, generator=g, dtype=torch.float64) * 0.1
        return cls(weight, bias, lora_A, lora_B, lora_scaling(lora_alpha, r))


def _init_compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """PEFT runs the PiSSA / OLoRA factorisations in float32; float64 stays float64."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def pissa_init(weight: torch.Tensor, r: int, niter: int | None = None,
               scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA initialisation (Meng et al. 2024, arXiv:2404.02948), as PEFT's ``pissa_init``.

    With W = U diag(S) V^T (``weight`` (out_features, in_features)) and the top r triplets::

        A = diag(sqrt(S_r / s)) V_r^T          (r, in_features)
        B = U_r diag(sqrt(S_r / s))            (out_features, r)
        W_res = W - s * B @ A                  (the new frozen base weight)

    so ``W_res + s * B @ A == W``.  ``niter=None`` uses the full SVD (PEFT's
    ``init_lora_weights="pissa"``); an integer uses ``torch.svd_lowrank(W, r, niter)``
    (``"pissa_niter_<niter>"``), which draws from the global RNG.  Runs in float32 like PEFT
    (float64 for a float64 ``weight``); returns ``(lora_A, lora_B, residual_weight)`` in that
    dtype.  PEFT applies this to the (out, in) weight, i.e. after undoing fan_in_fan_out.
    """
    _validate.tensor("weight", weight, ndim=2)
    _validate.rank(r, weight.shape[1], weight.shape[0], name="r")
    w = weight.detach().to(_init_compute_dtype(weight))
    if niter is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        U_r, S_r, Vh_r = U[:, :r], S[:r], Vh[:r]
    else:
        _validate.positive_int("niter", niter)
        U_r, S_r, V_r = torch.svd_lowrank(w, r, niter=niter)
        Vh_r = V_r.t()
    S_r = S_r / scaling
    lora_A = torch.diag(torch.sqrt(S_r)) @ Vh_r
    lora_B = U_r @ torch.diag(torch.sqrt(S_r))
    residual = w - scaling * lora_B @ lora_A
    return lora_A, lora_B, residual


def olora_init(weight: torch.Tensor, r: int,
               scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLoRA initialisation (Buyukakyuz 2024, arXiv:2406.01775), as PEFT's ``olora_init``.

    With the reduced QR factorisation W = Q R (``weight`` (out_features, in_features))::

        B = Q[:, :r]             (out_features, r), orthonormal columns
        A = R[:r]                (r, in_features), upper trapezoidal
        W_res = W - s * B @ A

    Unlike PiSSA the factors are not divided by s, so ``W_res + s * B @ A == W`` holds but
    ``B @ A`` alone is the rank-r QR truncation only for s = 1.  Runs in float32 like PEFT
    (float64 for a float64 ``weight``); returns ``(lora_A, lora_B, residual_weight)``.
    PEFT factorises the weight as stored, ignoring fan_in_fan_out.
    """
    _validate.tensor("weight", weight, ndim=2)
    _validate.rank(r, weight.shape[1], weight.shape[0], name="r")
    w = weight.detach().to(_init_compute_dtype(weight))
    Q, R = torch.linalg.qr(w)
    lora_B, lora_A = Q[:, :r], R[:r]
    residual = w - scaling * lora_B @ lora_A
    return lora_A, lora_B, residual


class PiSSA(LoRA):
    """LoRA whose factors start at the principal singular triplets of W (arXiv:2404.02948).

    The adapter is plain LoRA (same ``delta_weight`` and ``forward``: see :class:`LoRA`); what
    differs is the start: :meth:`from_weight` splits the original weight W into a residual
    base ``W_res = W - s * B @ A`` and factors from :func:`pissa_init` (or :func:`olora_init`
    with ``init="olora"``), so ``merged_weight() == W`` at init.  ``from_peft`` reads a PEFT
    layer built with ``init_lora_weights="pissa"`` (its base weight is already the residual).
    """

    INITS = ("pissa", "olora")

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, r: int,
                    lora_alpha: float = 8.0, *, use_rslora: bool = False, init: str = "pissa",
                    niter: int | None = None):
        """Split ``weight`` (out_features, in_features) into residual base + PiSSA/OLoRA adapter."""
        if init not in cls.INITS:
            raise ValueError(f"init={init!r} is not a valid choice; valid choices: {list(cls.INITS)}")
        if init == "olora" and niter is not None:
            raise ValueError(f"niter={niter!r} applies only to init='pissa'; "
                             "use niter=None with init='olora'")
        scaling = lora_scaling(lora_alpha, r, use_rslora)
        w = _f64("weight", weight)
        if init == "pissa":
            lora_A, lora_B, residual = pissa_init(w, r, niter=niter, scaling=scaling)
        else:
            lora_A, lora_B, residual = olora_init(w, r, scaling=scaling)
        return cls(residual, bias, lora_A, lora_B, scaling)

    @classmethod
    def demo(cls, d_in: int = 24, d_out: int = 40, r: int = 4, lora_alpha: float = 8.0,
             seed: int | None = None):
        """A random weight split by PiSSA init; B is then perturbed so dW moves off the init."""
        g = generator(seed)
        weight, bias = demo_linear(d_in, d_out, g)
        ref = cls.from_weight(weight, bias, r, lora_alpha)
        with torch.no_grad():
            ref.lora_B.add_(0.01 * torch.randn(d_out, r, generator=g, dtype=torch.float64))
        return ref


# ---------------------------------------------------------------------------------------------
# VeRA
# ---------------------------------------------------------------------------------------------

class VeRA(ReferenceAdapter):
    """VeRA (Kopiczko et al. 2023, arXiv:2310.11454).

        dW = (lambda_b[:, None] * B) @ (lambda_d[:, None] * A) = diag(lambda_b) B diag(lambda_d) A
        y  = x W^T + b + lambda_b * ((lambda_d * (x A^T)) B^T)

    ``vera_A`` (r, >= in_features) and ``vera_B`` (>= out_features, r) are frozen random
    projections shared by every adapted layer, sized for the largest layer; each layer uses
    ``vera_A[:, :in_features]`` and ``vera_B[:out_features, :]`` (PEFT's slicing).  Trainable:
    ``vera_lambda_d`` (r,) and ``vera_lambda_b`` (out_features,).  No scaling factor.  PEFT
    initialises lambda_b = 0 (dW = 0) and lambda_d = d_initial.  r may exceed
    min(in_features, out_features): the paper uses r up to 1024 on 768-wide layers.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, vera_A: torch.Tensor,
                 vera_B: torch.Tensor, vera_lambda_d: torch.Tensor, vera_lambda_b: torch.Tensor):
        weight = _f64("weight", weight)
        super().__init__(weight, None if bias is None else _f64("bias", bias))
        _validate.tensor("vera_lambda_d", vera_lambda_d, ndim=1)
        r = _validate.positive_int("r", vera_lambda_d.shape[0])
        _validate.tensor("vera_A", vera_A, ndim=2)
        _validate.tensor("vera_B", vera_B, ndim=2)
        if vera_A.shape[0] != r or vera_A.shape[1] < self.in_features:
            raise ValueError(f"vera_A has shape {tuple(vera_A.shape)}; expected (r={r}, n) with "
                             f"n >= in_features={self.in_features}")
        if vera_B.shape[1] != r or vera_B.shape[0] < self.out_features:
            raise ValueError(f"vera_B has shape {tuple(vera_B.shape)}; expected (n, r={r}) with "
                             f"n >= out_features={self.out_features}")
        _shape("vera_lambda_b", vera_lambda_b, (self.out_features,))
        self.r = r
        self.register_buffer("vera_A", _f64("vera_A", vera_A[:, :self.in_features]))
        self.register_buffer("vera_B", _f64("vera_B", vera_B[:self.out_features, :]))
        self.vera_lambda_d = nn.Parameter(_f64("vera_lambda_d", vera_lambda_d))
        self.vera_lambda_b = nn.Parameter(_f64("vera_lambda_b", vera_lambda_b))

    def delta_weight(self) -> torch.Tensor:
        return (self.vera_lambda_b[:, None] * self.vera_B) @ (self.vera_lambda_d[:, None] * self.vera_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        hidden = self.vera_lambda_d * F.linear(x, self.vera_A)
        return self.base(x) + self.vera_lambda_b * F.linear(hidden, self.vera_B)

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default"):
        """Copy a PEFT ``vera.Linear`` adapter with its (unsliced) shared projections."""
        weight, bias = peft_weight_and_bias(layer)
        return cls(weight, bias, layer.vera_A[adapter_name], layer.vera_B[adapter_name],
                   layer.vera_lambda_d[adapter_name], layer.vera_lambda_b[adapter_name])

    @classmethod
    def demo(cls, d_in: int = 24, d_out: int = 40, r: int = 8, seed: int | None = None):
        """Random shared projections (sized larger than the layer, as when shared) and lambdas."""
        g = generator(seed)
        weight, bias = demo_linear(d_in, d_out, g)
        vera_A = torch.randn(r, d_in + 3, generator=g, dtype=torch.float64) / math.sqrt(d_in)
        vera_B = torch.randn(d_out + 5, r, generator=g, dtype=torch.float64) / math.sqrt(r)
        lambda_d = torch.randn(r, generator=g, dtype=torch.float64)
        lambda_b = 0.1 * torch.randn(d_out, generator=g, dtype=torch.float64)
        return cls(weight, bias, vera_A, vera_B, lambda_d, lambda_b)


# ---------------------------------------------------------------------------------------------
# AdaLoRA
# ---------------------------------------------------------------------------------------------

def adalora_scaling(lora_alpha: float, r: int) -> float:
    """AdaLoRA's scale as PEFT sets it: ``lora_alpha`` itself (not alpha / r), or ``r`` when
    ``lora_alpha <= 0``.  The division by the rank happens in the forward via ``ranknum``."""
    return lora_alpha if lora_alpha > 0 else float(r)


class AdaLoRA(ReferenceAdapter):
    """AdaLoRA (Zhang et al. 2023, arXiv:2303.10512): LoRA in SVD form, P diag(Lambda) Q.

        dW = B @ (A * E) * scaling / (ranknum + 1e-5)
        y  = x W^T + b + (x (A * E)^T B^T) * scaling / (ranknum + 1e-5)

    ``lora_A`` (r, in_features): right singular vectors Q; ``lora_E`` (r, 1): singular values
    Lambda (PEFT initialises them to 0, so dW = 0 at init; its rank allocator prunes by
    zeroing entries); ``lora_B`` (out_features, r): left singular vectors P.  ``scaling`` is
    ``lora_alpha`` (see :func:`adalora_scaling`); ``ranknum`` is the initial rank r as a
    float (PEFT keeps it fixed while pruning).  PEFT also allows r = 0 (an empty adapter);
    this reference requires 1 <= r <= min(in_features, out_features).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                 lora_E: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 ranknum: float | None = None):
        weight = _f64("weight", weight)
        super().__init__(weight, None if bias is None else _f64("bias", bias))
        _validate.tensor("lora_A", lora_A, ndim=2)
        r = _validate.rank(lora_A.shape[0], self.in_features, self.out_features, name="r")
        _shape("lora_A", lora_A, (r, self.in_features))
        _shape("lora_E", lora_E, (r, 1))
        _shape("lora_B", lora_B, (self.out_features, r))
        self.r = r
        self.scaling = float(scaling)
        self.ranknum = float(r) if ranknum is None else float(ranknum)
        self.lora_A = nn.Parameter(_f64("lora_A", lora_A))
        self.lora_E = nn.Parameter(_f64("lora_E", lora_E))
        self.lora_B = nn.Parameter(_f64("lora_B", lora_B))

    @property
    def factor(self) -> float:
        """``scaling / (ranknum + 1e-5)``, the scalar in front of B (A * E)."""
        return self.scaling / (self.ranknum + ADALORA_RANKNUM_EPS)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        return self.base(x) + (x @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.factor

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default"):
        """Copy a PEFT ``adalora.SVDLinear`` adapter, its scaling and its ranknum."""
        weight, bias = peft_weight_and_bias(layer)
        return cls(weight, bias, layer.lora_A[adapter_name], layer.lora_E[adapter_name],
                   layer.lora_B[adapter_name], layer.scaling[adapter_name],
                   layer.ranknum[adapter_name].item())

    @classmethod
    def demo(cls, d_in: int = 24, d_out: int = 40, r: int = 6, lora_alpha: float = 8.0,
             seed: int | None = None):
        g = generator(seed)
        weight, bias = demo_linear(d_in, d_out, g)
        lora_A = torch.randn(r, d_in, generator=g, dtype=torch.float64) * 0.1
        lora_E = torch.randn(r, 1, generator=g, dtype=torch.float64)
        lora_B = torch.randn(d_out, r, generator=g, dtype=torch.float64) * 0.1
        return cls(weight, bias, lora_A, lora_E, lora_B, adalora_scaling(lora_alpha, r))


# ---------------------------------------------------------------------------------------------
# RandLoRA
# ---------------------------------------------------------------------------------------------

def randlora_num_bases(r: int, d_in: int, d_out: int) -> int:
    """Number of rank-r random bases RandLoRA sums so the update can reach full rank:
    ``ceil(min(d_in, d_out) / r)``."""
    return math.ceil(min(d_in, d_out) / r)


class RandLoRA(ReferenceAdapter):
    """RandLoRA (Albert et al. 2025, arXiv:2502.00987): a full-rank update from n = ceil(d / r)
    frozen random rank-r bases, each scaled by trainable diagonal matrices.

    With d = min(in_features, out_features), D = max(in_features, out_features):

        A_s[i, j, :] = lambda[i, j] * A[i, j, :] * gamma[j, :]           (r, n, d)
        M = B.flatten(1) @ A_s.flatten(0, 1)                             (D, d)
        dW = scaling * M      if in_features <= out_features  (d = in)
        dW = scaling * M^T    otherwise                        (d = out)
        y  = x W^T + b + x dW^T

    ``randlora_A`` (r, 1 or >= n, >= d) and ``randlora_B`` (>= D, >= n, r) are frozen random
    bases shared by every adapted layer; PEFT slices ``A[:, :n, :d]`` and ``B[:D, :n, :]``
    (its A has a single base, broadcast over the n bases).  Trainable: ``randlora_lambda``
    (r, n) and ``randlora_gamma`` (n, d).  ``scaling = randlora_alpha / r``.

    Flattening pairs column ``k`` of ``B.flatten(1)`` (base ``k // r``, rank ``k % r``) with row
    ``k`` of ``A_s.flatten(0, 1)`` (rank ``k // n``, base ``k % n``): base j of B does not meet
    base j of A_s.  That is PEFT 0.21's computation (the bases are i.i.d. random, so the
    method's expressiveness is the same); this reference reproduces it exactly.
    PEFT initialises lambda = 0 (dW = 0) and gamma = 1 / max(gamma.shape).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, randlora_A: torch.Tensor,
                 randlora_B: torch.Tensor, randlora_lambda: torch.Tensor,
                 randlora_gamma: torch.Tensor, scaling: float):
        weight = _f64("weight", weight)
        super().__init__(weight, None if bias is None else _f64("bias", bias))
        d_min, d_max = min(self.in_features, self.out_features), max(self.in_features, self.out_features)
        _validate.tensor("randlora_lambda", randlora_lambda, ndim=2)
        r = _validate.rank(randlora_lambda.shape[0], self.in_features, self.out_features, name="r")
        n = randlora_num_bases(r, self.in_features, self.out_features)
        _shape("randlora_lambda", randlora_lambda, (r, n))
        _shape("randlora_gamma", randlora_gamma, (n, d_min))
        _validate.tensor("randlora_A", randlora_A, ndim=3)
        _validate.tensor("randlora_B", randlora_B, ndim=3)
        a_r, a_n, a_d = randlora_A.shape
        if a_r != r or not (a_n == 1 or a_n >= n) or a_d < d_min:
            raise ValueError(f"randlora_A has shape {tuple(randlora_A.shape)}; expected (r={r}, 1 or >= "
                             f"num_bases={n}, >= min(in_features, out_features)={d_min})")
        b_d, b_n, b_r = randlora_B.shape
        if b_r != r or b_n < n or b_d < d_max:
            raise ValueError(f"randlora_B has shape {tuple(randlora_B.shape)}; expected (>= max(in_features, "
                             f"out_features)={d_max}, >= num_bases={n}, r={r})")
        self.r, self.num_bases, self.scaling = r, n, float(scaling)
        self.register_buffer("randlora_A", _f64("randlora_A", randlora_A[:, :n, :d_min]))
        self.register_buffer("randlora_B", _f64("randlora_B", randlora_B[:d_max, :n, :]))
        self.randlora_lambda = nn.Parameter(_f64("randlora_lambda", randlora_lambda))
        self.randlora_gamma = nn.Parameter(_f64("randlora_gamma", randlora_gamma))

    def update_matrix(self) -> torch.Tensor:
        """M = B.flatten(1) @ (lambda[:, :, None] * A * gamma[None]).flatten(0, 1): (D, d)."""
        scaled_A = self.randlora_lambda[:, :, None] * self.randlora_A * self.randlora_gamma[None]
        return self.randlora_B.flatten(1) @ scaled_A.flatten(0, 1)

    def delta_weight(self) -> torch.Tensor:
        M = self.update_matrix()
        return self.scaling * (M if self.in_features <= self.out_features else M.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        return self.base(x) + F.linear(x, self.delta_weight())

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default"):
        """Copy a PEFT ``randlora.Linear`` adapter with its (unsliced) shared bases."""
        weight, bias = peft_weight_and_bias(layer)
        return cls(weight, bias, layer.randlora_A[adapter_name], layer.randlora_B[adapter_name],
                   layer.randlora_lambda[adapter_name], layer.randlora_gamma[adapter_name],
                   layer.scaling[adapter_name])

    @classmethod
    def demo(cls, d_in: int = 24, d_out: int = 40, r: int = 5, randlora_alpha: float = 10.0,
             seed: int | None = None):
        g = generator(seed)
        weight, bias = demo_linear(d_in, d_out, g)
        n = randlora_num_bases(r, d_in, d_out)
        d_min, d_max = min(d_in, d_out), max(d_in, d_out)
        randlora_A = torch.randn(r, 1, d_min, generator=g, dtype=torch.float64)
        randlora_B = torch.randn(d_max, n, r, generator=g, dtype=torch.float64)
        randlora_lambda = torch.randn(r, n, generator=g, dtype=torch.float64)
        randlora_gamma = torch.randn(n, d_min, generator=g, dtype=torch.float64) / d_max
        return cls(weight, bias, randlora_A, randlora_B, randlora_lambda, randlora_gamma,
                   randlora_alpha / r)


# ---------------------------------------------------------------------------------------------
# VB-LoRA
# ---------------------------------------------------------------------------------------------

class VBLoRA(ReferenceAdapter):
    """VB-LoRA (Li et al. 2024, arXiv:2405.15179): LoRA factors assembled from a shared vector
    bank by top-k softmax mixtures.

    Bank ``vblora_vector_bank`` (num_vectors, L).  Each length-L sub-vector of A and B is

        v = sum_{t in topk(z)} softmax(z_topk)_t * bank[t]      (z: that sub-vector's logits)

    ``vblora_logits_A`` (r, in_features / L, num_vectors) gives A (r, in_features) by
    concatenating the sub-vectors of each row; ``vblora_logits_B`` (out_features / L, r,
    num_vectors) gives sub-vectors (out/L, r, L), transposed to (out/L, L, r) and reshaped to
    B (out_features, r).  No scaling:

        dW = B @ A,        y = x W^T + b + (x A^T) B^T

    L must divide in_features and out_features; 1 <= topk <= num_vectors.  The bank is
    trainable and shared by every adapted layer.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 vblora_vector_bank: torch.Tensor, vblora_logits_A: torch.Tensor,
                 vblora_logits_B: torch.Tensor, topk: int):
        weight = _f64("weight", weight)
        super().__init__(weight, None if bias is None else _f64("bias", bias))
        _validate.tensor("vblora_vector_bank", vblora_vector_bank, ndim=2)
        num_vectors, vector_length = vblora_vector_bank.shape
        _validate.divides("vector_length", vector_length, self.in_features, "in_features")
        _validate.divides("vector_length", vector_length, self.out_features, "out_features")
        _validate.positive_int("topk", topk)
        if topk > num_vectors:
            raise ValueError(f"topk={topk} exceeds num_vectors={num_vectors}; "
                             f"choose topk in 1..{num_vectors}")
        _validate.tensor("vblora_logits_A", vblora_logits_A, ndim=3)
        r = _validate.rank(vblora_logits_A.shape[0], self.in_features, self.out_features, name="r")
        _shape("vblora_logits_A", vblora_logits_A, (r, self.in_features // vector_length, num_vectors))
        _shape("vblora_logits_B", vblora_logits_B, (self.out_features // vector_length, r, num_vectors))
        self.r, self.topk, self.vector_length = r, topk, vector_length
        self.vblora_vector_bank = nn.Parameter(_f64("vblora_vector_bank", vblora_vector_bank))
        self.vblora_logits_A = nn.Parameter(_f64("vblora_logits_A", vblora_logits_A))
        self.vblora_logits_B = nn.Parameter(_f64("vblora_logits_B", vblora_logits_B))

    def mix(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., num_vectors) logits -> (..., L): the softmax over the top-k logits mixing
        the corresponding bank vectors."""
        top_logits, indices = logits.topk(self.topk, dim=-1)
        weights = torch.softmax(top_logits, dim=-1)
        return (weights.unsqueeze(-1) * self.vblora_vector_bank[indices]).sum(-2)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, in_features), B (out_features, r)) assembled from the bank."""
        A = self.mix(self.vblora_logits_A).reshape(self.r, self.in_features)
        B = self.mix(self.vblora_logits_B).transpose(1, 2).reshape(self.out_features, self.r)
        return A, B

    def delta_weight(self) -> torch.Tensor:
        A, B = self.lora_factors()
        return B @ A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        A, B = self.lora_factors()
        return self.base(x) + F.linear(F.linear(x, A), B)

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default"):
        """Copy a PEFT ``vblora.Linear`` adapter and the shared vector bank (full logits: a
        checkpoint saved with ``save_only_topk_weights`` must be loaded through PEFT first)."""
        weight, bias = peft_weight_and_bias(layer)
        return cls(weight, bias, layer.vblora_vector_bank[adapter_name],
                   layer.vblora_logits_A[adapter_name], layer.vblora_logits_B[adapter_name],
                   layer.topk[adapter_name])

    @classmethod
    def demo(cls, d_in: int = 24, d_out: int = 40, r: int = 4, num_vectors: int = 16,
             vector_length: int = 8, topk: int = 2, seed: int | None = None):
        g = generator(seed)
        weight, bias = demo_linear(d_in, d_out, g)
        bank = torch.rand(num_vectors, vector_length, generator=g, dtype=torch.float64) * 0.04 - 0.02
        logits_A = torch.randn(r, d_in // vector_length, num_vectors, generator=g, dtype=torch.float64)
        logits_B = torch.randn(d_out // vector_length, r, num_vectors, generator=g, dtype=torch.float64)
        return cls(weight, bias, bank, logits_A, logits_B, topk)


REFERENCES = {
    "lora": LoRA,
    "pissa": PiSSA,
    "vera": VeRA,
    "adalora": AdaLoRA,
    "randlora": RandLoRA,
    "vblora": VBLoRA,
}
