"""DoRA and DeLoRA r=16 (family dora_norm): fastadapt's fused layers vs PEFT's, vs the frozen base.

Base: a bias-free d x d nn.Linear, frozen.  Adapters: PEFT's LoRA with use_dora=True (r=16,
lora_alpha=32; lora_B randomized, magnitude perturbed) and PEFT's DeLoRA (r=16, lambda=15,
init_weights=False).  Arms: "peft" (PEFT's layer, eager; the runner adds torch.compile of it),
"fastadapt" (a copy of the same layer patched by ``fastadapt.accelerate``) and, for DoRA,
"fastadapt_recompute" (the same with ``set_recompute``: saves only x).  Reference: the PEFT
layer copied to float64 in eval mode (dropout inactive).
"""
from __future__ import annotations

import copy

import torch
from peft import DeloraConfig, LoraConfig, get_peft_model

import fastadapt
from fastadapt.bench import Case, CaseSetup
from fastadapt.layers.dora import set_recompute
from fastadapt.testing import linear_model, randn, randomize_

RANK = 16


def _peft_layer(d: int, dtype: torch.dtype, device, config):
    model = linear_model(d, d, bias=False, dtype=dtype).to(device)
    return get_peft_model(model, config).base_model.model[0]


def _accelerated(layer, *, recompute: bool = False):
    fused = copy.deepcopy(layer)
    fastadapt.accelerate(fused)
    if recompute:
        set_recompute(fused)
    return fused


def _build_dora(dropout: float):
    def build(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
        layer = _peft_layer(d, dtype, device, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout,
                                                         use_dora=True, target_modules=["0"]))
        randomize_(layer, scale=d ** -0.5, names=["lora_A", "lora_B"])
        with torch.no_grad():
            layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.1 * randn(d, dtype=dtype, device=device))
        oracle = copy.deepcopy(layer).to(torch.float64).eval()
        arms = {"fastadapt": _accelerated(layer), "fastadapt_recompute": _accelerated(layer, recompute=True),
                "peft": layer}
        return CaseSetup(x=randn(n, d, dtype=dtype, device=device), base=layer.base_layer, arms=arms,
                         reference=oracle)
    return build


def _build_delora(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
    layer = _peft_layer(d, dtype, device, DeloraConfig(r=RANK, delora_lambda=15, init_weights=False,
                                                       target_modules=["0"]))
    oracle = copy.deepcopy(layer).to(torch.float64).eval()
    return CaseSetup(x=randn(n, d, dtype=dtype, device=device), base=layer.base_layer,
                     arms={"fastadapt": _accelerated(layer), "peft": layer}, reference=oracle)


CASES = [
    Case("dora_r16", "dora_norm", _build_dora(0.0), notes="DoRA r=16: fused vs PEFT vs frozen Linear"),
    Case("dora_r16_dropout0.1", "dora_norm", _build_dora(0.1), notes="DoRA r=16, lora_dropout=0.1 (two GEMMs)"),
    Case("delora_r16", "dora_norm", _build_delora, notes="DeLoRA r=16: fused vs PEFT vs frozen Linear"),
]
