"""PEFT configurations of the butterfly family's bridged methods (BOFT, HRA, RoAd) for the model-level
tests, found by file name (fastadapt.testing.peft_configs): VARIANTS on the tiny Llama, SWEEP on tiny
models of every size.

PEFT's constraints shape the sweep: BOFT's block size divides every target's in_features (1 always
does; boft_block_num=1 makes one block of each layer's width, odd widths included) and
n_butterfly_factor > 1 needs in_features divisible by 2 * block_size; RoAd's group_size (even)
divides every out_features, so it needs even output widths; none of the three takes transformers
Conv1D layers.  Importing fastadapt.layers.butterfly first lets PEFT keep n_butterfly_factor > 1
without its CUDA extension.
"""
from peft import BOFTConfig, HRAConfig, RoadConfig

import fastadapt
from fastadapt.testing import LLAMA_TARGETS, PeftVariant

# PEFT keeps boft_n_butterfly_factor > 1 without its CUDA extension (the m = 2 configs below)
fastadapt.keep_boft_butterfly_factors()

VARIANTS = [
    PeftVariant("boft", "boft", lambda: BOFTConfig(boft_block_size=4, target_modules=list(LLAMA_TARGETS))),
    PeftVariant("boft_m2_dropout", "boft", lambda: BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2,
                                                              boft_dropout=0.25, target_modules=list(LLAMA_TARGETS)),
                dropout=True),
    PeftVariant("hra", "hra", lambda: HRAConfig(r=4, target_modules=list(LLAMA_TARGETS))),
    PeftVariant("hra_gs", "hra", lambda: HRAConfig(r=4, apply_GS=True, target_modules=list(LLAMA_TARGETS))),
    PeftVariant("road", "road", lambda: RoadConfig(variant="road_1", group_size=8, target_modules=list(LLAMA_TARGETS))),
    PeftVariant("road_4", "road", lambda: RoadConfig(variant="road_4", group_size=8,
                                                     target_modules=list(LLAMA_TARGETS))),
]


def boft(t):
    if t.fan_in_fan_out:
        return {}
    configs = {
        "b1": BOFTConfig(boft_block_size=1, **t.common),
        "one_block_bias": BOFTConfig(boft_block_size=0, boft_block_num=1, bias="all", **t.common),
        "dropout": BOFTConfig(boft_block_size=1, boft_dropout=0.5, **t.common),
    }
    if all(d % 4 == 0 for d in t.in_features):
        configs["m2"] = BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, **t.common)
    return configs


def hra(t):
    if t.fan_in_fan_out:
        return {}
    return {
        "r1": HRAConfig(r=1, **t.common),
        "r_above": HRAConfig(r=t.rank_above, **t.common),
        "gram_schmidt_bias": HRAConfig(r=min(t.in_features), apply_GS=True, bias="all", **t.common),
        "odd_r_random_init": HRAConfig(r=3, init_weights=False, **t.common),
    }


def road(t):
    if t.fan_in_fan_out or any(d % 2 for d in t.out_features):
        return {}
    return {variant: RoadConfig(variant=variant, group_size=2, **t.common) for variant in ("road_1", "road_2", "road_4")}


SWEEP = {"boft": boft, "hra": hra, "road": road}
