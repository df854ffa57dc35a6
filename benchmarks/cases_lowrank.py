"""Low-rank family (LoRA and the methods on its branch): fastadapt's fused path vs PEFT's layer,
eager and torch.compile'd, vs the frozen base.

Base: a bias-free d x d nn.Linear (a transformer projection), frozen.  Adapters: PEFT's, trained a
few AdamW steps from PEFT's init by fastadapt.bench.train_adapter_ (LoRA's B starts at zero, which
would make the branch trivially exact).  Arms: "peft", "fastadapt" (a copy of the same trained
layer patched by ``fastadapt.accelerate``, where the method is bridged), "lycoris" where LyCORIS
has the method (its dropout drops the adapter's output, PEFT's its input).  Reference: the same
PEFT layer copied to float64 (eval mode, so dropout is inactive).

Other methods at PEFT's default size: VeRA r = 256 (shared projections), AdaLoRA init_r = 16, VB-LoRA
r = 4 (256 vectors of length 256, top-2), IA3 on the input (feedforward) and on the output, MiSS r =
64, SHiRA r = 32 (random mask), RandLoRA r = 32.

Several adapters: "lora_r16_2adapters" has two r = 16 adapters active at once (PEFT loops over
them; the fused path runs one rank-32 branch).  "lora_r16_mixed4" is a mixed-adapter batch: the
tokens form 8 sequences, each served by one of 4 adapters (PEFT's ``adapter_names``: one sub-batch
per adapter; the fused path groups rows by adapter).
"""
from __future__ import annotations

import copy
import math

import torch
from peft import AdaLoraConfig, IA3Config, LoraConfig, MissConfig, RandLoraConfig, ShiraConfig, VBLoRAConfig, \
    VeraConfig, get_peft_model
from torch import nn

from fastadapt.bench import Adapter, Case, CaseSetup, peft_layer_case, train_adapter_
from fastadapt.bench.cases import TRAIN_EXAMPLE_SEED, config_summary
from fastadapt.bench.training import TRAIN_TOKENS
from fastadapt.peft import bridged_methods
from fastadapt.testing import linear_model, randn

RANK = 16
MIXED_ADAPTERS, MIXED_SEQUENCES = 4, 8


def _lora_config(rank: int, targets, dropout: float = 0.0) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=targets)


def _fused_arms(method: str) -> dict | None:
    return {"fastadapt": lambda layer: layer} if method in bridged_methods() else None


def _build_lora(dropout: float):
    def build(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
        return peft_layer_case(d, n, dtype, device, _lora_config(RANK, ["0"], dropout), fused=_fused_arms("lora"))
    return build


class MixedBatch(nn.Module):
    """A PEFT LoRA layer called on (n, d) tokens as ``sequences`` sequences, each with its adapter
    (``adapter_names``; PEFT's mixed-adapter batch), returning (n, d_out)."""

    def __init__(self, layer: nn.Module, names: list[str], sequences: int):
        super().__init__()
        self.layer, self.names, self.sequences = layer, names, sequences

    def forward(self, x):
        y = self.layer(x.reshape(self.sequences, -1, x.shape[-1]), adapter_names=self.names)
        return y.reshape(x.shape[0], -1)


def _several_adapters_case(d: int, n: int, dtype: torch.dtype, device, adapters: int, mixed: bool) -> CaseSetup:
    """LoRA r = 16 with ``adapters`` adapters on one layer: all active at once, or (``mixed``) a
    mixed-adapter batch of MIXED_SEQUENCES sequences cycling through them; every adapter trained."""
    import fastadapt
    names = [f"adapter{i}" for i in range(adapters)]
    config = _lora_config(RANK, ["0"])
    model = get_peft_model(linear_model(d, d, bias=False, dtype=dtype).to(device), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, _lora_config(RANK, ["0"]))
    layer = model.base_model.model[0]
    if not mixed:
        layer.set_adapter(names)
    for p_name, p in layer.named_parameters():
        p.requires_grad_("lora_" in p_name)
    sequence_names = [names[i % adapters] for i in range(MIXED_SEQUENCES)]
    wrap = (lambda module: MixedBatch(module, sequence_names, MIXED_SEQUENCES)) if mixed else (lambda module: module)
    arm = wrap(layer)
    train_adapter_(arm, randn(TRAIN_TOKENS, d, dtype=dtype, device=device, seed=TRAIN_EXAMPLE_SEED))
    arms, reports = {}, {}
    if "lora" in bridged_methods():
        patched = copy.deepcopy(layer)
        reports["fastadapt"] = fastadapt.accelerate(patched)
        arms["fastadapt"] = wrap(patched)
    arms["peft"] = arm
    return CaseSetup(x=randn(n, d, dtype=dtype, device=device), base=layer.base_layer, arms=arms,
                     reference=copy.deepcopy(arm).to(torch.float64).eval(), reports=reports,
                     config=config_summary(config) | {"method": "lora", "adapters": adapters, "mixed_batch": mixed})


def _build_several(adapters: int, mixed: bool):
    def build(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
        return _several_adapters_case(d, n, dtype, device, adapters, mixed)
    return build


def _vera_config(rank: int, targets) -> VeraConfig:
    return VeraConfig(r=rank, target_modules=targets)


class _AdaLoraConfig(AdaLoraConfig):
    """AdaLoraConfig with a default total_step: fastadapt.bench.cases.config_summary compares a config
    with its class's default instance, which PEFT's AdaLoraConfig refuses to build without one."""

    def __init__(self, **kwargs):
        kwargs.setdefault("total_step", 100)
        super().__init__(**kwargs)


def _adalora_config(rank: int, targets) -> AdaLoraConfig:
    return _AdaLoraConfig(init_r=rank, target_r=rank // 2, lora_alpha=2 * rank, target_modules=targets)


def _vblora_config(rank: int, targets, vector_length: int = 256) -> VBLoRAConfig:
    return VBLoRAConfig(r=rank, num_vectors=256, vector_length=vector_length, topk=2, target_modules=targets)


def _build_vblora(rank: int):
    """VB-LoRA with vectors of length 256, or of gcd(256, d) where d is not a multiple of 256 (PEFT
    requires vector_length to divide the layer's sizes; the tests' small d)."""
    def build(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
        config = _vblora_config(rank, ["0"], math.gcd(256, d))
        return peft_layer_case(d, n, dtype, device, config, fused=_fused_arms("vblora"))
    return build


def _ia3_config(feedforward: bool):
    def config(size: int, targets) -> IA3Config:
        return IA3Config(target_modules=targets, feedforward_modules=targets if feedforward else [])
    return config


def _miss_config(rank: int, targets) -> MissConfig:
    return MissConfig(r=rank, target_modules=targets)


def _shira_config(rank: int, targets) -> ShiraConfig:
    return ShiraConfig(r=rank, target_modules=targets)


def _randlora_config(rank: int, targets) -> RandLoraConfig:
    return RandLoraConfig(r=rank, target_modules=targets)


def _build_method(method: str, config, size: int):
    def build(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
        return peft_layer_case(d, n, dtype, device, config(size, ["0"]), fused=_fused_arms(method))
    return build


CASES = [
    Case("lora_r16", "lowrank", _build_lora(0.0), notes="PEFT LoRA r=16 vs frozen Linear"),
    Case("lora_r16_dropout0.1", "lowrank", _build_lora(0.1), notes="PEFT LoRA r=16, lora_dropout=0.1"),
    Case("lora_r16_2adapters", "lowrank", _build_several(2, False),
         notes="two LoRA r=16 adapters active at once (fused: one rank-32 branch)"),
    Case("lora_r16_mixed4", "lowrank", _build_several(MIXED_ADAPTERS, True),
         notes=f"mixed-adapter batch: {MIXED_SEQUENCES} sequences over {MIXED_ADAPTERS} LoRA r=16 adapters "
               "(adapter_names)"),
    Case("vera_r256", "lowrank", _build_method("vera", _vera_config, 256), notes="PEFT VeRA r=256 (its default)"),
    Case("adalora_r16", "lowrank", _build_method("adalora", _adalora_config, 16), notes="PEFT AdaLoRA init_r=16"),
    Case("vblora_r4", "lowrank", _build_vblora(4),
         notes="PEFT VB-LoRA r=4, 256 vectors of length 256 (gcd(256, d) below), top-2"),
    Case("ia3_feedforward", "lowrank", _build_method("ia3", _ia3_config(True), 0), notes="PEFT IA3 scaling the input"),
    Case("ia3_output", "lowrank", _build_method("ia3", _ia3_config(False), 0), notes="PEFT IA3 scaling the output"),
    Case("miss_r64", "lowrank", _build_method("miss", _miss_config, 64), notes="PEFT MiSS r=64 (its default)"),
    Case("shira_r32", "lowrank", _build_method("shira", _shira_config, 32), notes="PEFT SHiRA r=32 (random mask)"),
    Case("randlora_r32", "lowrank", _build_method("randlora", _randlora_config, 32),
         notes="PEFT RandLoRA r=32 (its default; n = d / 32 bases: a full-rank update)"),
]

ADAPTERS = [
    Adapter("lora", _lora_config, "r", sizes=tuple(range(1, 513)), default=RANK),
    Adapter("vera", _vera_config, "r", sizes=tuple(range(1, 1025)), default=256),
    Adapter("adalora", _adalora_config, "r", sizes=tuple(range(2, 513)), default=16),
    Adapter("miss", _miss_config, "r", sizes=tuple(range(1, 513)), default=64),
    Adapter("shira", _shira_config, "r", sizes=tuple(range(1, 257)), default=32),
    Adapter("randlora", _randlora_config, "r", sizes=tuple(range(1, 513)), default=32),
]
