"""LoRA r=16 (family lowrank): PEFT's LoRA layer, eager and torch.compile'd, vs the frozen base.

Base: a bias-free d x d nn.Linear (a transformer projection), frozen.  Adapter: PEFT LoRA r=16,
lora_alpha=32, trained a few AdamW steps from PEFT's init by fastadapt.bench.train_adapter_ (B
starts at zero, which would make the branch trivially exact).  Arms: "peft", "fastadapt" once
``fastadapt.accelerate`` bridges LoRA (found in the live bridge registry), "lycoris" (LyCORIS's
LoCon in bypass mode, where installed; its dropout drops the adapter's output, PEFT's its input).
Reference: the same PEFT layer copied to float64 (eval mode, so dropout is inactive, as in the
accuracy pass of fastadapt.bench.run_cases).
"""
from __future__ import annotations

import torch
from peft import LoraConfig

from fastadapt.bench import Adapter, Case, CaseSetup, peft_layer_case
from fastadapt.peft import bridged_methods

RANK = 16


def _lora_config(rank: int, targets, dropout: float = 0.0) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=targets)


def _build(dropout: float):
    def build(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
        fused = {"fastadapt": lambda layer: layer} if "lora" in bridged_methods() else None
        return peft_layer_case(d, n, dtype, device, _lora_config(RANK, ["0"], dropout), fused=fused)
    return build


CASES = [
    Case("lora_r16", "lowrank", _build(0.0), notes="PEFT LoRA r=16 vs frozen Linear"),
    Case("lora_r16_dropout0.1", "lowrank", _build(0.1), notes="PEFT LoRA r=16, lora_dropout=0.1"),
]

ADAPTERS = [Adapter("lora", _lora_config, "r", sizes=tuple(range(1, 513)), default=RANK)]
