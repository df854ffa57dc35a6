"""DoRA and DeLoRA r=16 (family dora_norm): fastadapt's fused layers vs PEFT's, vs the frozen base.

Base: a bias-free d x d nn.Linear, frozen.  Adapters: PEFT's LoRA with use_dora=True (r=16,
lora_alpha=32; lora_B randomized, magnitude perturbed) and PEFT's DeLoRA (r=16, lambda=15,
init_weights=False).  Arms: "peft" (PEFT's layer, eager; the runner adds torch.compile of it),
"fastadapt" (a copy of the same layer patched by ``fastadapt.accelerate``) and, for DoRA,
"fastadapt_recompute" (the same with ``set_recompute``: saves only x).  Reference: the PEFT
layer copied to float64 in eval mode (dropout inactive).
"""
from __future__ import annotations

import torch
from peft import DeloraConfig, LoraConfig

from fastadapt.bench import Case, CaseSetup, peft_layer_case
from fastadapt.layers.dora import set_recompute
from fastadapt.testing import randn

RANK = 16


def _build_dora(dropout: float, autocast_adapter_dtype: bool = True):
    def build(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout, use_dora=True, target_modules=["0"])

        def perturb_magnitude(layer):
            layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.1 * randn(d, dtype=dtype, device=device))

        def recompute(layer):
            set_recompute(layer)
            return layer

        return peft_layer_case(d, n, dtype, device, config, randomize=["lora_A", "lora_B"], scale=d ** -0.5,
                               prepare=perturb_magnitude, autocast_adapter_dtype=autocast_adapter_dtype,
                               fused={"fastadapt": lambda layer: layer, "fastadapt_recompute": recompute})
    return build


def _build_delora(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
    config = DeloraConfig(r=RANK, delora_lambda=15, init_weights=False, target_modules=["0"])
    return peft_layer_case(d, n, dtype, device, config, fused={"fastadapt": lambda layer: layer})


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
