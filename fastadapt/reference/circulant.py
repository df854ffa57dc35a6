"""Dense references of the circulant / spectral family: C3A and FourierFT.

Both methods define the change of weight through a Fourier transform.  The references build
that change with explicit real matrices (circulant blocks, cosine and sine DFT matrices) in
float64, so they read as the math and do not share code with PEFT's FFT calls; the tests prove
them equal to PEFT's FFT formulas.
"""
from __future__ import annotations

import math

import torch

from .. import _validate
from ._base import ReferenceAdapter, peft_weight_and_bias

_DEMO_SEED = 20240719


def circulant_block(kernel: torch.Tensor) -> torch.Tensor:
    """The b x b matrix ``C[k, j] = kernel[(j - k) mod b]`` for a kernel vector of length b.

    Row ``k`` is the kernel rotated left by ``k``: ``(C x)[k] = sum_t kernel[t] x[(k + t) mod b]``
    (circular cross-correlation), which is what PEFT's ``fft(ifft(x) * fft(w)).real`` computes.
    """
    b = kernel.shape[-1]
    k = torch.arange(b)
    return kernel[..., (k[None, :] - k[:, None]) % b]


class C3A(ReferenceAdapter):
    """C3A: circular convolution adaptation (Chen et al., arXiv:2407.19342), as PEFT 0.21.

    Parameter ``c3a_kernel`` (out_features / b, in_features / b, b).  The change of weight is a
    block matrix of circulant b x b blocks, divided by in_features::

        dW[m b + k, n b + j] = c3a_kernel[m, n, (j - k) mod b] / in_features
        y = x (W + dW)^T + bias

    The default (zero) kernel gives ``dW = 0``; PEFT's own default init is random
    (``init_weights="xavier_uniform"``), so a fresh PEFT C3A is not the identity.  PEFT keeps the
    kernel and the FFTs in float32 whatever the model dtype; this reference is float64.
    """

    def __init__(self, weight, bias=None, *, block_size: int, c3a_kernel: torch.Tensor | None = None):
        super().__init__(weight, bias)
        _validate.divides("block_size", block_size, self.in_features)
        _validate.divides("block_size", block_size, self.out_features, "out_features")
        self.block_size = block_size
        shape = (self.out_features // block_size, self.in_features // block_size, block_size)
        if c3a_kernel is None:
            c3a_kernel = torch.zeros(shape, dtype=self.weight.dtype)
        else:
            _validate.tensor("c3a_kernel", c3a_kernel, shape=shape)
        self.c3a_kernel = torch.nn.Parameter(c3a_kernel.detach().clone().to(self.weight.dtype))

    def delta_weight(self) -> torch.Tensor:
        blocks = circulant_block(self.c3a_kernel)                 # (out/b, in/b, b, b)
        dense = blocks.permute(0, 2, 1, 3).reshape(self.out_features, self.in_features)
        return dense / self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Activation space, no dense ``dW``: per block pair, a circular cross-correlation
        ``z_m[k] = sum_n sum_t c3a_kernel[m, n, t] x_n[(k + t) mod b] / in_features``."""
        b = self.block_size
        x_blocks = x.unflatten(-1, (self.in_features // b, b))          # (..., n, b)
        k, t = torch.arange(b)[:, None], torch.arange(b)[None, :]
        shifted = x_blocks[..., (k + t) % b]                             # (..., n, b_k, b_t)
        z = torch.einsum("...nkt,mnt->...mk", shifted, self.c3a_kernel).flatten(-2)
        return self.base(x) + z / self.in_features

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default") -> "C3A":
        weight, bias = peft_weight_and_bias(layer)
        return cls(weight, bias, block_size=layer.block_size[adapter_name],
                   c3a_kernel=layer.c3a_kernel[adapter_name].detach().to(torch.float64))

    @classmethod
    def demo(cls) -> "C3A":
        g = torch.Generator().manual_seed(_DEMO_SEED)
        weight = torch.randn(12, 16, generator=g, dtype=torch.float64) / 4
        bias = torch.randn(12, generator=g, dtype=torch.float64)
        return cls(weight, bias, block_size=4, c3a_kernel=torch.randn(3, 4, 4, generator=g, dtype=torch.float64))


def spectrum_indices(out_features: int, in_features: int, n_frequency: int, random_loc_seed: int) -> torch.Tensor:
    """FourierFT's spectrum locations (2, n_frequency): (row, column) of the first ``n_frequency``
    entries of ``randperm(out * in)`` drawn from a CPU generator seeded with ``random_loc_seed``.
    Regenerated from the seed (PEFT does not store them in checkpoints)."""
    flat = torch.randperm(out_features * in_features,
                          generator=torch.Generator().manual_seed(random_loc_seed))[:n_frequency]
    return torch.stack([flat // in_features, flat % in_features])


def dft_cos_sin(n: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos(2 pi j k / n)`` and ``sin(2 pi j k / n)`` (n x n), with ``j k`` reduced mod ``n``
    before scaling so the angles stay exact for large ``n``."""
    jk = torch.outer(torch.arange(n), torch.arange(n)) % n
    angle = (2 * math.pi / n) * jk.to(torch.float64)
    return torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)


class FourierFT(ReferenceAdapter):
    """FourierFT: fine-tuning in the Fourier domain (Gao et al., arXiv:2405.03003), as PEFT 0.21.

    Parameter ``fourierft_spectrum`` (n_frequency,): values of a sparse out x in spectrum ``S`` at
    :func:`spectrum_indices`.  The change of weight is the real part of its 2-D inverse DFT::

        dW = scaling * Re(ifft2(S)) = scaling / (out in) * (C_out S C_in - S_out S S_in)

    with ``C_n[j, k] = cos(2 pi j k / n)``, ``S_n[j, k] = sin(2 pi j k / n)`` (``ifft2(S) =
    Omega_out S Omega_in / (out in)`` with ``Omega_n = C_n + i S_n``).  ``y = x (W + dW)^T + b``.
    The default (zero) spectrum gives ``dW = 0`` (PEFT's init_weights=True; its default,
    init_weights=False, draws the spectrum from N(0, 1)).  PEFT computes the
    inverse FFT in float32 whatever the model dtype; this reference is float64.  nn.Linear only
    (PEFT's ``fan_in_fan_out`` for Conv1D is a transpose of the same ``dW``).
    """

    def __init__(self, weight, bias=None, *, n_frequency: int = 1000, scaling: float = 150.0,
                 random_loc_seed: int = 777, fourierft_spectrum: torch.Tensor | None = None):
        super().__init__(weight, bias)
        _validate.positive_int("n_frequency", n_frequency)
        top = self.out_features * self.in_features
        if n_frequency > top:
            raise ValueError(f"n_frequency={n_frequency} exceeds out_features * in_features={top}; "
                             f"choose n_frequency in 1..{top}")
        self.n_frequency, self.scaling, self.random_loc_seed = n_frequency, scaling, random_loc_seed
        if fourierft_spectrum is None:
            fourierft_spectrum = torch.zeros(n_frequency, dtype=self.weight.dtype)
        else:
            _validate.tensor("fourierft_spectrum", fourierft_spectrum, shape=(n_frequency,))
        self.fourierft_spectrum = torch.nn.Parameter(fourierft_spectrum.detach().clone().to(self.weight.dtype))
        self.register_buffer("indices", spectrum_indices(self.out_features, self.in_features, n_frequency,
                                                         random_loc_seed), persistent=False)

    def dense_spectrum(self) -> torch.Tensor:
        """``S`` (out_features, in_features): the spectrum values at their locations, zero elsewhere."""
        s = torch.zeros(self.out_features, self.in_features, dtype=self.weight.dtype, device=self.weight.device)
        return s.index_put((self.indices[0], self.indices[1]), self.fourierft_spectrum)

    def delta_weight(self) -> torch.Tensor:
        s = self.dense_spectrum()
        cos_out, sin_out = dft_cos_sin(self.out_features, s.dtype)
        cos_in, sin_in = dft_cos_sin(self.in_features, s.dtype)
        real = cos_out @ s @ cos_in - sin_out @ s @ sin_in
        return real * (self.scaling / (self.out_features * self.in_features))

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default") -> "FourierFT":
        weight, bias = peft_weight_and_bias(layer)
        return cls(weight, bias, n_frequency=layer.fourierft_n_frequency[adapter_name],
                   scaling=layer.fourierft_scaling[adapter_name],
                   random_loc_seed=layer.fourierft_random_loc_seed[adapter_name],
                   fourierft_spectrum=layer.fourierft_spectrum[adapter_name].detach().to(torch.float64))

    @classmethod
    def demo(cls) -> "FourierFT":
        g = torch.Generator().manual_seed(_DEMO_SEED)
        weight = torch.randn(12, 16, generator=g, dtype=torch.float64) / 4
        bias = torch.randn(12, generator=g, dtype=torch.float64)
        return cls(weight, bias, n_frequency=40, scaling=10.0,
                   fourierft_spectrum=torch.randn(40, generator=g, dtype=torch.float64))


REFERENCES = {"c3a": C3A, "fourierft": FourierFT}
