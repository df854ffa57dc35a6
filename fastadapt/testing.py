"""Helpers shared by tests and benchmarks: fresh random data, odd shapes, strided views.

Never zeros: every helper draws fresh random values from its own generator so a test that
forgets to initialise something cannot pass by accident.
"""
from __future__ import annotations

import itertools

import torch

from .numerics import assert_rel_close, rel_error, tolerance  # noqa: F401  (re-exported)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Odd shapes on purpose (Liger-style): (batch, seq, features).
ODD_SHAPES = ((9, 41, 3), (1, 7, 5), (3, 1, 11))

_counter = itertools.count(1234)


def generator(seed: int | None = None, device="cpu") -> torch.Generator:
    """A fresh generator; each call without ``seed`` gets a new one."""
    g = torch.Generator(device=device)
    g.manual_seed(next(_counter) if seed is None else seed)
    return g


def randn(*shape, dtype=torch.float64, device="cpu", scale: float = 1.0, seed: int | None = None,
          requires_grad: bool = False) -> torch.Tensor:
    """Standard normal values times ``scale`` (drawn in float64, then cast)."""
    g = generator(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    t = t.to(dtype=dtype, device=device)
    return t.requires_grad_(requires_grad)


def noncontig(x: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view equal to ``x`` (every other element of a wider buffer)."""
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide.normal_()
    view = wide[..., ::2]
    with torch.no_grad():
        view.copy_(x)
    assert not view.is_contiguous() or x.shape[-1] == 1
    return view.requires_grad_(x.requires_grad)


def linear_model(d_in: int, d_out: int, *, bias: bool = True, dtype=torch.float64,
                 seed: int | None = None, depth: int = 1) -> torch.nn.Module:
    """A small ``nn.Sequential`` of Linear layers (named "0", "2", ...) with random weights.

    Used as the base model for PEFT parity tests: target_modules=["0"] adapts the first layer.
    """
    g = generator(seed)
    layers = []
    for i in range(depth):
        lin = torch.nn.Linear(d_in if i == 0 else d_out, d_out, bias=bias)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=torch.float64) / lin.in_features ** 0.5)
            if bias:
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g, dtype=torch.float64))
        layers += [lin, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1]).to(dtype)


def randomize_(module: torch.nn.Module, *, scale: float = 0.1, seed: int | None = None,
               names=None) -> torch.nn.Module:
    """Overwrite floating-point parameters (optionally only those whose name contains one of
    ``names``) with fresh random values times ``scale``, so zero-initialised adapters (LoRA's B,
    OFT's R, ...) are not trivially identity in a parity test."""
    g = generator(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if not p.is_floating_point() or (names is not None and not any(s in n for s in names)):
                continue
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)
    return module
