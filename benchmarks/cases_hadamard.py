"""LoHa r=16 and LoKr r=16, whole and decomposed (family hadamard): fastadapt vs PEFT vs the frozen base.

Base: a bias-free d x d nn.Linear, frozen.  Adapters: PEFT's LoHa (r=16, alpha=32) and LoKr (r=16,
alpha=32), each trained a few AdamW steps from PEFT's init by fastadapt.bench.train_adapter_
(hada_w2_b and lokr_w1 start at zero).  LoKr "full": PEFT's default split of d = 1024 is 32 x 32 and
r = 16 is not below 32 / 2, so w1 (32, 32) and w2 (32, 32) are whole.  LoKr "decomposed":
decompose_both with decompose_factor=16 splits 1024 = 16 x 64, w1 (16, 16) stays whole (r is not
below 16 / 2) and w2 = lokr_w2_a (64, 16) lokr_w2_b (16, 64) is factored.  Arms: "peft" (PEFT's
layer, eager; the runner adds torch.compile of it) and "fastadapt" (a copy of the same trained layer
patched by ``fastadapt.accelerate``); LyCORIS's bypass modules where installed.  Reference: the PEFT
layer copied to float64.  The ``_adapter_in_input_dtype`` case uses PEFT's autocast_adapter_dtype=
False (on GPU: half factors, half tensor-core products on the LoHa tiles; on CPU float32 as the
default case).

ADAPTERS: LoHa's parameter count 2 r (in + out) grows with r.  LoKr has no entry: its count depends
on r only through PEFT's whole-or-factored switch (r >= d / 2 makes a side whole), not monotonically.
"""
from __future__ import annotations

from peft import LoHaConfig, LoKrConfig

from fastadapt.bench import Adapter, Case, peft_case

RANK = 16


def _loha_config(rank: int, targets) -> LoHaConfig:
    return LoHaConfig(r=rank, alpha=2 * rank, target_modules=targets)


def _lokr_config(rank: int, targets, decomposed: bool = False) -> LoKrConfig:
    split = dict(decompose_both=True, decompose_factor=16) if decomposed else {}
    return LoKrConfig(r=rank, alpha=2 * rank, target_modules=targets, **split)


CASES = [
    Case("loha_r16", "hadamard", peft_case(lambda t: _loha_config(RANK, t)),
         notes="PEFT LoHa r=16 (float32 dW built every call, second GEMM, dY^T X) vs fused (merged weight, "
               "Khatri-Rao or G-tile factor gradients per shape)"),
    Case("lokr_r16", "hadamard", peft_case(lambda t: _lokr_config(RANK, t)),
         notes="PEFT LoKr r=16, whole w1 / w2 (32 x 32 each at d=1024) vs fused (reshape and matmul)"),
    Case("lokr_r16_decomposed", "hadamard", peft_case(lambda t: _lokr_config(RANK, t, decomposed=True)),
         notes="PEFT LoKr r=16, decompose_both, decompose_factor=16: w1 (16, 16), w2 = (64, 16) (16, 64)"),
    Case("loha_r16_adapter_in_input_dtype", "hadamard",
         peft_case(lambda t: _loha_config(RANK, t), autocast_adapter_dtype=False),
         notes="LoHa r=16 with autocast_adapter_dtype=False: half factors on a half base (CPU fp32: as loha_r16)"),
]

ADAPTERS = [
    Adapter("loha", _loha_config, "r", sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256), default=RANK),
]
