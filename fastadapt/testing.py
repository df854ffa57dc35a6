"""Helpers shared by tests and benchmarks: fresh random data, odd shapes, strided views, and the
PEFT configurations each kernel family gives the model-level tests.

Never zeros: every helper draws fresh random values from its own generator so a test that
forgets to initialise something cannot pass by accident.

Seeds.  A call without ``seed=`` takes the next seed of the current stream.  tests/conftest.py
restarts the stream at the start of every test from :func:`seed_for` of the test's node id (and
seeds torch's default generator, which PEFT's initialisers and nn.Dropout draw from, the same
way), so a test's data is a function of the test alone, never of which tests ran before it in
the same process or xdist worker.  Outside pytest the stream starts at 0.

PEFT configurations by file name.  Each kernel family with PEFT_BRIDGE entries adds
``tests/peft_configs_<family>.py`` defining
    VARIANTS: list[PeftVariant]      configurations for the tiny Llama (end-to-end training,
                                     torch.compile, the half-precision accuracy contract)
    SWEEP:    dict[method, generator]  generator(targets: Targets) -> {name: config or FallsBack}:
                                     configurations for tiny models of every size (test_peft_sweep),
                                     in float64 unless SWEEP_DTYPE[method] names another dtype
                                     (PSOFT's init takes float32 at most)
found by :func:`peft_configs`; a bridged method missing from either fails those tests.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .numerics import assert_rel_close, rel_error, tolerance  # noqa: F401  (re-exported)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Odd shapes on purpose (Liger-style): (batch, seq, features).
ODD_SHAPES = ((9, 41, 3), (1, 7, 5), (3, 1, 11))

_seeds = itertools.count(0)


def seed_for(name: str) -> int:
    """A seed in [0, 2**31) that depends on ``name`` only (stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") >> 1


def reset_seeds(base: int) -> None:
    """Restart the default-seed stream: the n-th call without ``seed=`` from now on uses base + n."""
    global _seeds
    _seeds = itertools.count(base)


def generator(seed: int | None = None, device="cpu") -> torch.Generator:
    """A fresh generator seeded with ``seed``, or with the stream's next seed (see the module doc)."""
    g = torch.Generator(device=device)
    g.manual_seed(next(_seeds) if seed is None else seed)
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
    assert not view.is_contiguous() or x.shape[-1] == 1 or x.numel() == 0
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


def perturb_(module: torch.nn.Module, *, scale: float = 0.1, seed: int | None = None) -> torch.nn.Module:
    """Add fresh random values times ``scale`` to every trainable floating-point parameter: adapters
    a few optimizer steps away from their init (LoRA's B and OFT's R are zero there, which hides
    errors), whatever the method calls its parameters."""
    g = generator(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad and p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)
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


def output_and_grads(model, x: torch.Tensor, cotangent: torch.Tensor, seed: int = 0) -> tuple:
    """``model(x)`` (detached) and the gradients of <model(x), cotangent> with respect to x and every
    parameter of ``model`` that requires grad, in that order; torch's generator seeded with
    ``seed`` first (the same dropout masks for two models called alike)."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    y = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    return y.detach(), *torch.autograd.grad(y, [x, *params], cotangent)


def assert_fused_as_accurate_as_peft(model, model64, x: torch.Tensor, cotangent: torch.Tensor,
                                     dtype: torch.dtype) -> None:
    """A copy of ``model`` under ``fastadapt.accelerate`` runs fused (one call, no fallback), and its
    output and every gradient (:func:`output_and_grads`) are as close to ``model64``'s (the same
    model in float64) as PEFT's own: relative error <= max(table, 1.5 x PEFT's)."""
    import copy

    import fastadapt
    peft = output_and_grads(model, x, cotangent)
    fused_model = copy.deepcopy(model)
    report = fastadapt.accelerate(fused_model)
    fused = output_and_grads(fused_model, x, cotangent)
    assert report.fused_calls == 1 and not report.fallbacks, str(report)
    truth = output_and_grads(model64, x.to(torch.float64), cotangent.to(torch.float64))
    for i, (f, p, t) in enumerate(zip(fused, peft, truth)):
        err, peft_err = rel_error(f, t), rel_error(p, t)
        assert err <= max(tolerance(dtype), 1.5 * peft_err), f"{i}: {err:.3e} vs PEFT's {peft_err:.3e}"


def assert_fused_equals_peft_under_autocast(model, params, x: torch.Tensor, autocast_dtype: torch.dtype,
                                            cotangent_seed: int) -> None:
    """A float32 PEFT ``model`` (one adapted layer) called under ``torch.autocast`` on x's device,
    first as PEFT, then under ``fastadapt.accelerate`` (reverted after): one fused call, no
    fallback, PEFT's output dtype, and the output and the gradients with respect to x and
    ``params`` (same dtypes) within the autocast dtype's row of the table."""
    import fastadapt

    def run():
        xx = x.clone().requires_grad_()
        with torch.autocast(x.device.type, dtype=autocast_dtype):
            y = model(xx)
        return y, torch.autograd.grad(y, [xx, *params], randn(*y.shape, seed=cotangent_seed).to(y.dtype))

    expected, expected_grads = run()
    report = fastadapt.accelerate(model)
    try:
        actual, actual_grads = run()
    finally:
        fastadapt.revert(model)
    assert report.fused_calls == 1 and not report.fallbacks, str(report)
    assert actual.dtype == expected.dtype
    assert_rel_close(actual, expected, autocast_dtype, name="output")
    for i, (a, e) in enumerate(zip(actual_grads, expected_grads)):
        assert a.dtype == e.dtype
        assert_rel_close(a, e, autocast_dtype, name=f"gradient {i} (x, then the adapter's)")


def assert_forward_is_merged(ref) -> None:
    """``ref(x) == x merged_weight()^T + merged_bias()`` on a random input."""
    x = randn(3, 5, ref.in_features)
    assert_rel_close(ref(x), F.linear(x, ref.merged_weight(), ref.merged_bias()), name="forward vs merged")


def tiny_llama(seed: int | None = None, *, dtype=torch.float64, vocab_size: int = 64,
               tie_word_embeddings: bool = False, scale: float = 0.3, layers: int = 2):
    """A LlamaForCausalLM built from a config (hidden 32, ``layers`` decoder layers, 4 heads,
    intermediate 48, eager attention, no cache; nothing downloaded) in eval mode, every weight
    redrawn times ``scale``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=vocab_size, max_position_embeddings=64,
                         tie_word_embeddings=tie_word_embeddings, use_cache=False, attn_implementation="eager")
    model = LlamaForCausalLM(config).to(dtype).eval()
    return randomize_(model, scale=scale, seed=seed)


@contextlib.contextmanager
def triton_launches():
    """Within the block, record the name of every Triton kernel launched (compiled or interpreted),
    whichever module launches it; yields the list of names."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    launched: list[str] = []
    originals = {cls: cls.run for cls in (InterpretedFunction, JITFunction)}

    def recorder(run):
        def counted(self, *args, **kwargs):
            launched.append(self.fn.__name__)
            return run(self, *args, **kwargs)
        return counted

    try:
        for cls, run in originals.items():
            cls.run = recorder(run)
        yield launched
    finally:
        for cls, run in originals.items():
            cls.run = run


# ----------------------------------------------------------------------------------------------
# PEFT configurations of the bridged methods, one file per kernel family (see the module doc)

LLAMA_TARGETS = ("q_proj", "v_proj", "down_proj")  # tiny_llama: 32 -> 32, 32 -> 32, 48 -> 32


@dataclass(frozen=True)
class Targets:
    """The layers a sweep configuration adapts, as its generator sees them.

    names: target_modules; in_features / out_features: of each target (1 and 2 units occur);
    fan_in_fan_out: the targets are transformers Conv1D layers (weight stored (in, out));
    modules_to_save: extra modules PEFT trains and saves whole, or None.
    ``common`` holds the keyword arguments every PEFT config takes for these.
    """

    names: tuple[str, ...]
    in_features: tuple[int, ...]
    out_features: tuple[int, ...]
    fan_in_fan_out: bool = False
    modules_to_save: Optional[tuple[str, ...]] = None

    @property
    def smallest(self) -> int:
        return min(self.in_features + self.out_features)

    @property
    def rank_above(self) -> int:
        """A rank above every target's in_features and out_features (PEFT's LoRA accepts it)."""
        return max(self.in_features + self.out_features) + 1

    @property
    def common(self) -> dict:
        extra = {} if self.modules_to_save is None else {"modules_to_save": list(self.modules_to_save)}
        return {"target_modules": list(self.names), **extra}


class FallsBack(NamedTuple):
    """A sweep configuration the fused path does not serve: every call runs PEFT's forward, and the
    report counts it under a reason containing ``reason``."""

    config: object
    reason: str


@dataclass(frozen=True)
class PeftVariant:
    """One PEFT configuration of a bridged method for the tiny Llama (targets among LLAMA_TARGETS).

    name: test id ("oft_exact"); method: the bridged method it exercises (``accelerate(methods=
    [method])``); config: () -> a fresh PEFT config; dropout: the config drops inputs in training
    (tests then also compare training-mode calls, with the same masks).
    """

    name: str
    method: str
    config: Callable
    dropout: bool = False


@dataclass
class PeftConfigs:
    """Every family's configurations: variant name -> PeftVariant, method -> sweep generator (and
    its dtype where not float64)."""

    variants: dict = field(default_factory=dict)
    sweeps: dict = field(default_factory=dict)
    sweep_dtypes: dict = field(default_factory=dict)
    files: list = field(default_factory=list)

    def methods_without_variants(self, methods) -> set:
        return set(methods) - {v.method for v in self.variants.values()}


def _load(path: Path):
    name = f"fastadapt_test_configs.{path.stem}"
    module = sys.modules.get(name)
    if module is None or Path(module.__file__).resolve() != path.resolve():
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return module


def peft_configs(folder) -> PeftConfigs:
    """VARIANTS and SWEEP of every ``folder/peft_configs_*.py``; ValueError on a name defined twice."""
    found = PeftConfigs()
    for path in sorted(Path(folder).glob("peft_configs_*.py")):
        module = _load(path)
        found.files.append(path.name)
        for variant in getattr(module, "VARIANTS", ()):
            if variant.name in found.variants:
                raise ValueError(f"variant {variant.name!r} defined twice (second in {path.name})")
            found.variants[variant.name] = variant
        for method, make in getattr(module, "SWEEP", {}).items():
            if method in found.sweeps:
                raise ValueError(f"sweep of {method!r} defined twice (second in {path.name})")
            found.sweeps[method] = make
        found.sweep_dtypes.update(getattr(module, "SWEEP_DTYPE", {}))
    return found
