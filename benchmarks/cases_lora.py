"""LoRA r=16 (family lowrank): PEFT's LoRA layer, eager and torch.compile'd, vs the frozen base.

Base: a bias-free d x d nn.Linear (a transformer projection), frozen.  Adapter: PEFT LoRA
r=16, lora_alpha=32, on that layer, with lora_A and lora_B randomized (B is zero at init, which
would make the branch trivially exact).  Reference: the same PEFT layer copied to float64
(eval mode, so dropout is inactive, as in the accuracy pass of fastadapt.bench.run_cases).
"""
from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model

from fastadapt.bench import Case, CaseSetup
from fastadapt.testing import linear_model, randn, randomize_

RANK = 16


def peft_lora_layer(d: int, dtype: torch.dtype, device, *, dropout: float = 0.0):
    """PEFT's LoRA Linear wrapping a frozen, random, bias-free d x d Linear."""
    model = linear_model(d, d, bias=False, dtype=dtype).to(device)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout, target_modules=["0"])
    layer = get_peft_model(model, config).base_model.model[0]
    randomize_(layer, scale=d ** -0.5, names=["lora_A", "lora_B"])
    return layer


def _build(dropout: float):
    def build(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
        layer = peft_lora_layer(d, dtype, device, dropout=dropout)
        oracle = copy.deepcopy(layer).to(torch.float64).eval()
        return CaseSetup(x=randn(n, d, dtype=dtype, device=device), base=layer.base_layer,
                         arms={"peft": layer}, reference=oracle)
    return build


CASES = [
    Case("lora_r16", "lowrank", _build(0.0), notes="PEFT LoRA r=16 vs frozen Linear"),
    Case("lora_r16_dropout0.1", "lowrank", _build(0.1), notes="PEFT LoRA r=16, lora_dropout=0.1"),
]
