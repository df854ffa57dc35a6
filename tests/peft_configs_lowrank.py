"""PEFT configurations of the lowrank family's bridged methods for the model-level tests, found by
file name (fastadapt.testing.peft_configs): VARIANTS on the tiny Llama, SWEEP on tiny models of every
size.

LoRA accepts ranks above both of a layer's sizes and transformers Conv1D layers, as do VeRA, AdaLoRA
and RandLoRA; PEFT's MiSS and SHiRA take nn.Linear layers only, SHiRA needs r (in + out) <= in out and
VB-LoRA a vector length dividing both sizes; MiSS's "bat" mode runs PEFT's forward.  PiSSA / OLoRA
(catalog "pissa") factorise the base weight at init, which PEFT allows in float32 / float16 /
bfloat16 only (its sweep runs in float32), and rewrite the base weight to the residual; PEFT's
OLoRA ignores fan_in_fan_out (a Conv1D base gets factors of the wrong shape: PEFT's forward fails).
"""
import torch
from peft import AdaLoraConfig, IA3Config, LoraConfig, MissConfig, RandLoraConfig, ShiraConfig, VBLoRAConfig, VeraConfig

from fastadapt.testing import LLAMA_TARGETS, FallsBack, PeftVariant

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
    PeftVariant("vera", "vera", lambda: VeraConfig(r=8, target_modules=list(LLAMA_TARGETS))),
    PeftVariant("vera_dropout", "vera", lambda: VeraConfig(r=8, vera_dropout=0.1, target_modules=list(LLAMA_TARGETS)),
                dropout=True),
    PeftVariant("adalora", "adalora", lambda: AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10,
                                                            target_modules=list(LLAMA_TARGETS))),
    PeftVariant("vblora", "vblora", lambda: VBLoRAConfig(r=4, vector_length=8, num_vectors=16, topk=2,
                                                         target_modules=list(LLAMA_TARGETS))),
    PeftVariant("ia3", "ia3", lambda: IA3Config(target_modules=list(LLAMA_TARGETS), feedforward_modules=["down_proj"])),
    PeftVariant("miss", "miss", lambda: MissConfig(r=4, target_modules=list(LLAMA_TARGETS))),
    PeftVariant("miss_dropout", "miss", lambda: MissConfig(r=4, miss_dropout=0.1, target_modules=list(LLAMA_TARGETS)),
                dropout=True),
    PeftVariant("shira", "shira", lambda: ShiraConfig(r=2, target_modules=list(LLAMA_TARGETS))),
    PeftVariant("randlora", "randlora", lambda: RandLoraConfig(r=8, target_modules=list(LLAMA_TARGETS))),
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


def vera(t):
    return {
        "r1": VeraConfig(r=1, **t.common),
        "r_above": VeraConfig(r=t.rank_above, d_initial=0.5, **t.common),
        "dropout_bias": VeraConfig(r=2, vera_dropout=0.5, bias="all", **t.common),
    }


def adalora(t):
    return {
        "r1": AdaLoraConfig(init_r=1, target_r=1, lora_alpha=3, total_step=10, **t.common),
        "r_above": AdaLoraConfig(init_r=t.rank_above, target_r=2, total_step=10, **t.common),
        "dropout_bias": AdaLoraConfig(init_r=2, target_r=1, lora_dropout=0.5, bias="all", total_step=10, **t.common),
    }


def vblora(t):
    return {
        "r1": VBLoRAConfig(r=1, vector_length=1, num_vectors=4, topk=2, **t.common),
        "r_above_dropout": VBLoRAConfig(r=t.rank_above, vector_length=1, num_vectors=6, topk=3, vblora_dropout=0.5,
                                        **t.common),
    }


def ia3(t):
    return {
        "output": IA3Config(feedforward_modules=[], **t.common),
        "feedforward": IA3Config(feedforward_modules=list(t.names), **t.common),
        "first_feedforward": IA3Config(feedforward_modules=[t.names[0]], **t.common),
    }


def miss(t):
    if t.fan_in_fan_out:   # PEFT's MiSS takes nn.Linear layers only
        return {}
    smallest_in = min(t.in_features)
    return {
        "r1": MissConfig(r=1, **t.common),
        "r_in_dropout": MissConfig(r=smallest_in, miss_dropout=0.5, **t.common),
        "mini": MissConfig(r=smallest_in, init_weights="mini", mini_r=1, **t.common),
        "bat": FallsBack(MissConfig(r=1, init_weights="bat", **t.common), "adapter configuration has no fused path"),
    }


def shira(t):
    room = min(i * o // (i + o) for i, o in zip(t.in_features, t.out_features))
    if t.fan_in_fan_out or room < 1:   # PEFT's SHiRA: nn.Linear layers, r (in + out) <= in out
        return {}
    return {"r1": ShiraConfig(r=1, **t.common), "r_max": ShiraConfig(r=room, **t.common)}


def randlora(t):
    return {
        "r1": RandLoraConfig(r=1, **t.common),
        "r_above": RandLoraConfig(r=t.rank_above, randlora_alpha=3, **t.common),
        "dropout_sparse": RandLoraConfig(r=2, randlora_dropout=0.5, sparse=True, bias="all", **t.common),
    }


SWEEP = {"lora": lora, "pissa": pissa, "vera": vera, "adalora": adalora, "vblora": vblora, "ia3": ia3, "miss": miss,
         "shira": shira, "randlora": randlora}
SWEEP_DTYPE = {"pissa": torch.float32}
