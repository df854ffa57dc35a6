"""PEFT configurations of the circulant family's bridged methods (C3A, FourierFT) for the model-level
tests, found by file name (fastadapt.testing.peft_configs): VARIANTS on the tiny Llama, SWEEP on tiny
models of every size.

C3A's block size must divide every target's in and out features (1 for the sweep's models); PEFT's C3A
takes no transformers Conv1D layers.  FourierFT's n_frequency is at most in * out of every target.
Both run their adapter path in float32 whatever the model dtype (PEFT casts the C3A kernel and x, and
builds FourierFT's dense spectrum in float32), so a float64 PEFT model carries float32 rounding: the
sweep runs them in float32 (against a float64 copy, within the table or 1.5 x PEFT's error).

The tiny-Llama C3A variant uses block_size=2: PEFT 0.21's C3A input gradient is the true one only for
b <= 2 (for larger b it is the gradient for dY reversed within each block; fastadapt returns the true
one, see fastadapt.layers.circulant), and these variants compare whole-model training with PEFT's,
where every C3A layer's input gradient feeds the adapters below it.  tests/test_circulant.py covers
b = 8 .. 256 against the float64 truth and PEFT's other gradients.
"""
import torch
from peft import C3AConfig, FourierFTConfig

from fastadapt.testing import LLAMA_TARGETS, PeftVariant

VARIANTS = [
    PeftVariant("c3a", "c3a", lambda: C3AConfig(block_size=2, target_modules=list(LLAMA_TARGETS))),
    PeftVariant("fourierft", "fourierft", lambda: FourierFTConfig(n_frequency=200, scaling=20.0,
                                                                  target_modules=list(LLAMA_TARGETS))),
]


def c3a(t):
    if t.fan_in_fan_out:
        return {}
    return {
        "b1": C3AConfig(block_size=1, **t.common),
        "b1_gaussian_bias": C3AConfig(block_size=1, init_weights="gaussian", bias="all", **t.common),
        "b1_identity_init": C3AConfig(block_size=1, init_weights=True, **t.common),
    }


def fourierft(t):
    every_location = min(i * o for i, o in zip(t.in_features, t.out_features))
    fan = {"fan_in_fan_out": t.fan_in_fan_out}
    return {
        "n1": FourierFTConfig(n_frequency=1, scaling=10.0, **fan, **t.common),
        "every_location": FourierFTConfig(n_frequency=every_location, scaling=3.0, **fan, **t.common),
        "seed_bias_zero_init": FourierFTConfig(n_frequency=2, random_loc_seed=5, bias="all", init_weights=True,
                                               **fan, **t.common),
    }


SWEEP = {"c3a": c3a, "fourierft": fourierft}
SWEEP_DTYPE = {"c3a": torch.float32, "fourierft": torch.float32}
