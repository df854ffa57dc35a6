"""DoRA and DeLoRA r=16 (family dora_norm): fastadapt's fused layers vs PEFT's, vs the frozen base.

Base: a bias-free d x d nn.Linear, frozen.  Adapters: PEFT's LoRA with use_dora=True (r=16,
lora_alpha=32) and PEFT's DeLoRA (r=16, lambda=15), each trained a few AdamW steps from PEFT's
init by fastadapt.bench.train_adapter_ (lora_B starts at zero).  Arms: "peft" (PEFT's layer,
eager; the runner adds torch.compile of it), "fastadapt" (a copy of the same trained layer
patched by ``fastadapt.accelerate``) and, for DoRA, "fastadapt_recompute" (the same with
``set_recompute``: saves only x).  Reference: the PEFT layer copied to float64 in eval mode
(dropout inactive).  LyCORIS's bypass mode has no DoRA: no peer arm here.
"""
from __future__ import annotations

import torch
from peft import DeloraConfig, LoraConfig

from fastadapt.bench import Adapter, Case, CaseSetup, peft_layer_case
from fastadapt.layers.dora import set_recompute

RANK = 16


def _dora_config(rank: int, targets, dropout: float = 0.0) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, use_dora=True, target_modules=targets)


def _delora_config(rank: int, targets) -> DeloraConfig:
    return DeloraConfig(r=rank, delora_lambda=15, target_modules=targets)


def _recompute(layer):
    set_recompute(layer)
    return layer


def _build_dora(dropout: float, autocast_adapter_dtype: bool = True):
    def build(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
        return peft_layer_case(d, n, dtype, device, _dora_config(RANK, ["0"], dropout),
                               autocast_adapter_dtype=autocast_adapter_dtype,
                               fused={"fastadapt": lambda layer: layer, "fastadapt_recompute": _recompute})
    return build


def _build_delora(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
    return peft_layer_case(d, n, dtype, device, _delora_config(RANK, ["0"]), fused={"fastadapt": lambda layer: layer})


CASES = [
    Case("dora_r16", "dora_norm", _build_dora(0.0), notes="DoRA r=16: fused vs PEFT vs frozen Linear"),
    Case("dora_r16_dropout0.1", "dora_norm", _build_dora(0.1), notes="DoRA r=16, lora_dropout=0.1 (two GEMMs)"),
    Case("dora_r16_adapter_in_input_dtype", "dora_norm", _build_dora(0.0, autocast_adapter_dtype=False),
         notes="DoRA r=16 with PEFT's autocast_adapter_dtype=False: on a half base the adapter stays in the "
               "input dtype, which runs the Triton kernels on GPU (the default keeps fp32 adapters: torch path)"),
    Case("dora_r16_dropout0.1_adapter_in_input_dtype", "dora_norm", _build_dora(0.1, autocast_adapter_dtype=False),
         notes="DoRA r=16, lora_dropout=0.1, adapter in the input dtype: on GPU the Triton path with the mask "
               "regenerated in-kernel from a seed (on CPU the same as dora_r16_dropout0.1 in fp32)"),
    Case("delora_r16", "dora_norm", _build_delora, notes="DeLoRA r=16: fused vs PEFT vs frozen Linear"),
]

ADAPTERS = [
    Adapter("dora", _dora_config, "r", sizes=tuple(range(1, 513)), default=RANK),
    Adapter("delora", _delora_config, "r", sizes=tuple(range(1, 513)), default=RANK),
]
