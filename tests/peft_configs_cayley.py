"""PEFT configurations of the cayley family's bridged methods (OFT, OFTv2, PSOFT) for the model-level
tests, found by file name (fastadapt.testing.peft_configs): VARIANTS on the tiny Llama, SWEEP on tiny
models of every size.

PEFT adjusts an OFT block size that does not divide in_features (with a warning), so the sweep asks
for sizes that need adjusting on purpose.  PSOFT needs r <= min(in_features, out_features) and a float32 (or half) model at init.
PEFT's OFT and PSOFT take no transformers Conv1D layers.
"""
import torch
from peft import OFTConfig, PsoftConfig

from fastadapt.testing import LLAMA_TARGETS, FallsBack, PeftVariant

VARIANTS = [
    PeftVariant("oft", "oft", lambda: OFTConfig(oft_block_size=8, r=0, target_modules=list(LLAMA_TARGETS))),
    PeftVariant("oft_exact", "oft", lambda: OFTConfig(oft_block_size=8, r=0, use_cayley_neumann=False,
                                                      target_modules=list(LLAMA_TARGETS))),
    PeftVariant("oftv2", "oftv2", lambda: OFTConfig(r=2, oft_block_size=0, target_modules=list(LLAMA_TARGETS))),
    PeftVariant("psoft", "psoft", lambda: PsoftConfig(r=4, psoft_alpha=4, target_modules=["q_proj", "v_proj"])),
    PeftVariant("psoft_neumann", "psoft", lambda: PsoftConfig(r=8, psoft_alpha=16, use_cayley_neumann=True,
                                                              target_modules=list(LLAMA_TARGETS))),
]


def oft(t):
    if t.fan_in_fan_out:
        return {}
    return {
        "b2": OFTConfig(oft_block_size=2, r=0, **t.common),
        "r_above_exact": OFTConfig(r=t.rank_above, oft_block_size=0, use_cayley_neumann=False, **t.common),
        "shared_block_bias": OFTConfig(oft_block_size=t.smallest, r=0, block_share=True, bias="all", **t.common),
        "dropout_terms3": OFTConfig(oft_block_size=3, r=0, module_dropout=0.5, num_cayley_neumann_terms=3,
                                    **t.common),
        "coft": FallsBack(OFTConfig(oft_block_size=2, r=0, coft=True, **t.common),
                          "adapter configuration has no fused path"),
    }


def psoft(t):
    if t.fan_in_fan_out:
        return {}
    return {
        "r1": PsoftConfig(r=1, psoft_alpha=3, **t.common),
        "r_min_neumann": PsoftConfig(r=t.smallest, psoft_alpha=2, use_cayley_neumann=True, **t.common),
        "plain_lowrank_svd": PsoftConfig(r=t.smallest, psoft_orth=False, psoft_mag_a=False, psoft_mag_b=False,
                                         psoft_svd="lowrank", psoft_svd_lowrank_niter=2, **t.common),
        "dropout": PsoftConfig(r=t.smallest, psoft_dropout=0.3, **t.common),
    }


SWEEP = {"oft": oft, "oftv2": oft, "psoft": psoft}
SWEEP_DTYPE = {"psoft": torch.float32}
