"""Helpers shared by tests and benchmarks: fresh random data, odd shapes, strided views.

Never zeros: every helper draws fresh random values from its own generator so a test that
forgets to initialise something cannot pass by accident.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

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


def peft_layer(config, d_in: int, d_out: int, adapter_params=(), *, bias: bool = True, scale: float = 0.3):
    """Layer "0" of ``linear_model(d_in, d_out)`` adapted by PEFT with ``config`` (float64), its
    parameters whose names contain one of ``adapter_params`` overwritten with random values."""
    from peft import get_peft_model
    model = get_peft_model(linear_model(d_in, d_out, bias=bias), config)
    randomize_(model, names=adapter_params, scale=scale)
    return model.base_model.model[0]


def assert_matches_peft(ref, layer, leading, adapter: str = "default") -> None:
    """Forward (contiguous and strided input), grad x and every parameter gradient of the reference
    ``ref`` equal PEFT's ``layer``; reference parameters carry PEFT's names."""
    d_in = ref.in_features
    x = randn(*leading, d_in, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out_peft, out_ref = layer(x), ref(x_ref)
    assert_rel_close(out_ref, out_peft, name="forward")
    x_strided = noncontig(randn(*leading, d_in))
    assert_rel_close(ref(x_strided), layer(x_strided), name="forward, strided x")
    grad_out = randn(*out_peft.shape)
    out_peft.backward(grad_out)
    out_ref.backward(grad_out)
    assert_rel_close(x_ref.grad, x.grad, name="grad x")
    params = list(ref.named_parameters())
    assert params, "reference has no trainable parameters"
    for name, param in params:
        assert_rel_close(param.grad, getattr(layer, name)[adapter].grad, name=f"grad {name}")


def assert_forward_is_merged(ref) -> None:
    """``ref(x) == x merged_weight()^T + merged_bias()`` on a random input."""
    x = randn(3, 5, ref.in_features)
    assert_rel_close(ref(x), F.linear(x, ref.merged_weight(), ref.merged_bias()), name="forward vs merged")


def tiny_llama(seed: int | None = None, *, dtype=torch.float64, vocab_size: int = 64,
               tie_word_embeddings: bool = False, scale: float = 0.3):
    """A LlamaForCausalLM built from a config (hidden 32, 2 layers, 4 heads, intermediate 48, eager
    attention, no cache; nothing downloaded) in eval mode, every weight redrawn times ``scale``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=vocab_size, max_position_embeddings=64,
                         tie_word_embeddings=tie_word_embeddings, use_cache=False, attn_implementation="eager")
    model = LlamaForCausalLM(config).to(dtype).eval()
    return randomize_(model, scale=scale, seed=seed)
