"""PEFT configurations of the hadamard family's bridged methods (LoHa, LoKr) for the model-level tests,
found by file name (fastadapt.testing.peft_configs): VARIANTS on the tiny Llama, SWEEP on tiny models of
every size.

PEFT's LoHa and LoKr take nn.Linear (and Conv) bases, no transformers Conv1D: no fan_in_fan_out
configurations; and PEFT 0.21 rejects these adapters beside the sweep's modules_to_save (its TypeError:
"modules_to_save cannot be applied to modules of type ParameterDict"): none for that model either.
PEFT accepts r above the layer's sizes for both.  LoKr's layout follows from r, decompose_both and
decompose_factor (PEFT's rule); at the sweep's sizes (1 to 6 features) w1 stays whole and w2 is
factored for small r.  LoHa's rank_dropout runs fused in training (PEFT's own draw); module_dropout,
and LoKr's rank_dropout, fall back to PEFT's forward in training only.
"""
from peft import LoHaConfig, LoKrConfig

from fastadapt.testing import LLAMA_TARGETS, PeftVariant

VARIANTS = [
    PeftVariant("loha", "loha", lambda: LoHaConfig(r=4, alpha=8, target_modules=list(LLAMA_TARGETS))),
    PeftVariant("loha_rank_dropout", "loha", lambda: LoHaConfig(r=4, alpha=8, rank_dropout=0.25,
                                                                target_modules=list(LLAMA_TARGETS)), dropout=True),
    PeftVariant("lokr", "lokr", lambda: LoKrConfig(r=4, alpha=8, target_modules=list(LLAMA_TARGETS))),
    # 32 = 4 x 8, 48 = 6 x 8: r = 2 < 8 / 2 factors w2 (lokr_w2_a, lokr_w2_b), w1 stays whole
    PeftVariant("lokr_factored", "lokr", lambda: LoKrConfig(r=2, alpha=4, init_weights=False,
                                                            target_modules=list(LLAMA_TARGETS))),
]


def _unsupported(t) -> bool:
    return t.fan_in_fan_out or t.modules_to_save is not None


def loha(t):
    if _unsupported(t):
        return {}
    return {
        "r1": LoHaConfig(r=1, alpha=3, **t.common),
        "r_above_random_init": LoHaConfig(r=t.rank_above, alpha=4, init_weights=False, **t.common),
        "rank_dropout": LoHaConfig(r=2, alpha=2, rank_dropout=0.5, **t.common),
        "module_dropout": LoHaConfig(r=2, module_dropout=0.5, **t.common),
        "patterns": LoHaConfig(r=2, rank_pattern={t.names[0]: 3}, alpha_pattern={t.names[0]: 5}, **t.common),
    }


def lokr(t):
    if _unsupported(t):
        return {}
    return {
        "r1": LoKrConfig(r=1, alpha=3, **t.common),
        "r_above": LoKrConfig(r=t.rank_above, alpha=4, **t.common),
        "decompose_both_factor": LoKrConfig(r=1, decompose_both=True, decompose_factor=2, **t.common),
        "lycoris_init": LoKrConfig(r=2, init_weights="lycoris", **t.common),
        "dropouts": LoKrConfig(r=2, rank_dropout=0.5, rank_dropout_scale=True, module_dropout=0.2, **t.common),
    }


SWEEP = {"loha": loha, "lokr": lokr}
