"""Cayley family (OFT b = 16..256 in both modes, PSOFT, SSVD): fastadapt vs PEFT vs the frozen base.

Base: a bias-free d x d nn.Linear, frozen.  Adapters, each trained a few AdamW steps from its
init by fastadapt.bench.train_adapter_ (OFT's and PSOFT's Q start at zero: the identity):
  oft_b{16,32,64,128,256}        PEFT OFT, oft_block_size=b, PEFT's default Neumann mode (5 terms);
  oft_b{...}_exact               the same with use_cayley_neumann=False (exact Cayley by solve);
  psoft_r32                      PEFT PSOFT r=32, psoft_alpha=32, exact Cayley, magnitude vectors on;
  ssvd_r32                       fastadapt's SSVDLinear r=32 (PEFT has no SSVD: no "peft" arm).
oft_b32 comes first: PEFT's default block size, OFT's representative in ``fastadapt bench --quick``.
Arms: "peft" (PEFT's layer, eager; the runner adds torch.compile of it), "fastadapt" (a copy of
the same trained PEFT layer patched by ``fastadapt.accelerate``; SSVD: the layer itself),
"lycoris" (LyCORIS's DiagOFT in bypass mode, where installed and b <= sqrt(d)).  Reference: the
PEFT layer copied to float64 (SSVD: fastadapt.reference.SSVDReference of the trained parameters).
"""
from __future__ import annotations

import copy

import torch
from peft import OFTConfig, PsoftConfig

from fastadapt.bench import TRAIN_TOKENS, Adapter, Case, CaseSetup, peft_layer_case, train_adapter_
from fastadapt.layers.cayley import SSVDLinear
from fastadapt.ops.cayley import oft_rotation_blocks, orthogonality_error
from fastadapt.reference.cayley import SSVDReference
from fastadapt.testing import linear_model, randn

RANK = 32
BLOCK_SIZES = (32, 16, 64, 128, 256)


def _oft_config(block_size: int, targets, neumann: bool = True) -> OFTConfig:
    return OFTConfig(oft_block_size=block_size, r=0, target_modules=targets, use_cayley_neumann=neumann)


def _psoft_config(rank: int, targets) -> PsoftConfig:
    return PsoftConfig(r=rank, psoft_alpha=rank, target_modules=targets, use_cayley_neumann=False)


def _build_oft(block_size: int, neumann: bool):
    def build(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
        setup = peft_layer_case(d, n, dtype, device, _oft_config(block_size, ["0"], neumann),
                                fused={"fastadapt": lambda layer: layer})
        with torch.no_grad():
            packed = setup.arms["peft"].oft_R["default"].weight.float()
            R = oft_rotation_blocks(packed, block_size, use_cayley_neumann=neumann)
        setup.metrics["orthogonality error max ||R^T R - I||_F"] = float(orthogonality_error(R))
        return setup
    return build


def _build_psoft(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
    return peft_layer_case(d, n, dtype, device, _psoft_config(RANK, ["0"]), fused={"fastadapt": lambda layer: layer})


def _build_ssvd(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
    # Built and trained in float64 on ``device`` (the oracle must live where x does, and the
    # layer's d x d float64 SVD runs there), then the layer is cast to the benchmark dtype.
    base = linear_model(d, d, bias=False, dtype=torch.float64)[0].to(device)
    layer = SSVDLinear(copy.deepcopy(base), r=RANK)
    train_adapter_(layer, randn(TRAIN_TOKENS, d, device=device, seed=1))
    oracle = SSVDReference(base.weight, None, layer.ssvd_R.weight.detach(), layer.ssvd_R.delta_s.detach(), r=RANK)
    layer = layer.to(device, dtype)
    return CaseSetup(x=randn(n, d, dtype=dtype, device=device), base=layer.base_layer,
                     arms={"fastadapt": layer}, reference=oracle, config={"layer": "SSVDLinear", "r": RANK})


CASES = [
    *(Case(f"oft_b{b}{suffix}", "cayley", _build_oft(b, neumann),
           notes=f"PEFT OFT b={b} ({'Neumann, 5 terms' if neumann else 'exact Cayley'}) vs fused")
      for b in BLOCK_SIZES for suffix, neumann in (("", True), ("_exact", False))),
    Case("psoft_r32", "cayley", _build_psoft, notes="PEFT PSOFT r=32 (exact Cayley) vs fused"),
    Case("ssvd_r32", "cayley", _build_ssvd, notes="fastadapt SSVD r=32 (no PEFT arm)"),
]

ADAPTERS = [
    Adapter("oft", _oft_config, "oft_block_size", sizes=(2, 4, 8, 16, 32, 64, 128, 256, 512), default=32),
    Adapter("psoft", _psoft_config, "r", sizes=tuple(range(1, 513)), default=RANK),
]
