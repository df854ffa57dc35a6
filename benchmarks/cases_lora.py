"""LoRA r=16 (family lowrank): PEFT's LoRA layer, eager and torch.compile'd, vs the frozen base.

Base: a bias-free d x d nn.Linear (a transformer projection), frozen.  Adapter: PEFT LoRA
r=16, lora_alpha=32, on that layer, with lora_A and lora_B randomized (B is zero at init, which
would make the branch trivially exact).  Reference: the same PEFT layer copied to float64
(eval mode, so dropout is inactive, as in the accuracy pass of fastadapt.bench.run_cases).
"""
from __future__ import annotations

import torch
from peft import LoraConfig

from fastadapt.bench import Case, CaseSetup, peft_layer_case

RANK = 16


def _build(dropout: float):
    def build(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout, target_modules=["0"])
        return peft_layer_case(d, n, dtype, device, config, randomize=["lora_A", "lora_B"], scale=d ** -0.5)
    return build


CASES = [
    Case("lora_r16", "lowrank", _build(0.0), notes="PEFT LoRA r=16 vs frozen Linear"),
    Case("lora_r16_dropout0.1", "lowrank", _build(0.1), notes="PEFT LoRA r=16, lora_dropout=0.1"),
]
