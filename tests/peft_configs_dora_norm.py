"""PEFT configurations of the dora_norm family's bridged methods (DoRA, DeLoRA) for the model-level
tests, found by file name (fastadapt.testing.peft_configs): VARIANTS on the tiny Llama, SWEEP on tiny
models of every size (PEFT accepts ranks above min(in_features, out_features) for both; its DeLoRA
takes no transformers Conv1D layers)."""
from peft import DeloraConfig, LoraConfig

from fastadapt.testing import LLAMA_TARGETS, PeftVariant

VARIANTS = [
    PeftVariant("dora", "dora", lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                   target_modules=list(LLAMA_TARGETS))),
    PeftVariant("dora_dropout", "dora", lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, lora_dropout=0.1,
                                                           target_modules=list(LLAMA_TARGETS)), dropout=True),
    PeftVariant("delora", "delora", lambda: DeloraConfig(r=4, delora_lambda=5, init_weights=False,
                                                         target_modules=list(LLAMA_TARGETS))),
]


def dora(t):
    return {
        "r1": LoraConfig(r=1, lora_alpha=3, use_dora=True, **t.common),
        "r_above": LoraConfig(r=t.rank_above, use_dora=True, **t.common),
        "dropout_rslora": LoraConfig(r=2, lora_alpha=4, use_dora=True, lora_dropout=0.5, use_rslora=True,
                                     **t.common),
        "bias_all": LoraConfig(r=2, use_dora=True, bias="all", **t.common),
    }


def delora(t):
    if t.fan_in_fan_out:
        return {}
    return {
        "r1": DeloraConfig(r=1, delora_lambda=3, init_weights=False, **t.common),
        "r_above": DeloraConfig(r=t.rank_above, delora_lambda=5, **t.common),
        "dropout_bias": DeloraConfig(r=2, module_dropout=0.5, bias="all", **t.common),
    }


SWEEP = {"dora": dora, "delora": delora}
