"""PEFT configurations of the lowrank family's bridged methods for the model-level tests, found by
file name (fastadapt.testing.peft_configs): VARIANTS on the tiny Llama, SWEEP on tiny models of every
size.

LoRA accepts ranks above both of a layer's sizes and transformers Conv1D layers.  PiSSA / OLoRA
(catalog "pissa") factorise the base weight at init, which PEFT allows in float32 / float16 /
bfloat16 only (its sweep runs in float32), and rewrite the base weight to the residual; PEFT's
OLoRA ignores fan_in_fan_out (a Conv1D base gets factors of the wrong shape: PEFT's forward fails).
"""
import torch
from peft import LoraConfig

from fastadapt.testing import LLAMA_TARGETS, PeftVariant

VARIANTS = [
    PeftVariant("lora", "lora", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_TARGETS))),
    PeftVariant("lora_dropout", "lora", lambda: LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                           target_modules=list(LLAMA_TARGETS)), dropout=True),
    PeftVariant("lora_rslora", "lora", lambda: LoraConfig(r=8, lora_alpha=4, use_rslora=True,
                                                          target_modules=list(LLAMA_TARGETS))),
    PeftVariant("pissa", "pissa", lambda: LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                                                     target_modules=list(LLAMA_TARGETS))),
    PeftVariant("olora", "pissa", lambda: LoraConfig(r=4, lora_alpha=4, init_lora_weights="olora",
                                                     target_modules=list(LLAMA_TARGETS))),
]


def lora(t):
    return {
        "r1": LoraConfig(r=1, lora_alpha=3, **t.common),
        "r_above": LoraConfig(r=t.rank_above, **t.common),
        "dropout_rslora": LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5, use_rslora=True, **t.common),
        "bias_all": LoraConfig(r=2, bias="all", **t.common),   # lora_bias: PEFT merges it only onto a base bias
    }


def pissa(t):
    configs = {
        "pissa": LoraConfig(r=t.smallest, lora_alpha=2, init_lora_weights="pissa", **t.common),
        "pissa_niter": LoraConfig(r=1, init_lora_weights="pissa_niter_2", lora_dropout=0.3, **t.common),
    }
    if not t.fan_in_fan_out:   # PEFT's OLoRA factorises a Conv1D weight as stored, (in, out): its factors don't fit
        configs["olora"] = LoraConfig(r=t.smallest, lora_alpha=3, init_lora_weights="olora", **t.common)
    return configs


SWEEP = {"lora": lora, "pissa": pissa}
SWEEP_DTYPE = {"pissa": torch.float32}
