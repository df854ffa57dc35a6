"""Cayley family (OFT b=32 / b=128, PSOFT, SSVD): fastadapt vs PEFT eager vs the frozen base.

Base: a bias-free d x d nn.Linear, frozen.  Adapters:
  oft_b{32,128}         PEFT OFT, oft_block_size=b, PEFT's default Neumann mode (5 terms);
  oft_b{32,128}_exact   the same with use_cayley_neumann=False (exact Cayley by solve);
  psoft_r32             PEFT PSOFT r=32, psoft_alpha=32, exact Cayley, magnitude vectors on;
  ssvd_r32              fastadapt's SSVDLinear r=32 (PEFT has no SSVD: no "peft" arm).
Adapter parameters are randomized (OFT/PSOFT's R start at zero = identity).  Arms: "peft"
(PEFT's layer, eager; the runner adds torch.compile of it), "fastadapt" (a copy of the same
PEFT layer patched by ``fastadapt.accelerate``; SSVD: the layer itself).  Reference: the PEFT
layer copied to float64 (SSVD: fastadapt.reference.SSVDReference).
"""
from __future__ import annotations

import copy

import torch
from peft import OFTConfig, PsoftConfig

from fastadapt.bench import Case, CaseSetup, peft_layer_case
from fastadapt.layers.cayley import SSVDLinear
from fastadapt.ops.cayley import oft_rotation_blocks, orthogonality_error
from fastadapt.reference.cayley import SSVDReference
from fastadapt.testing import linear_model, randn

RANK = 32


def _build_oft(block_size: int, neumann: bool):
    def build(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
        config = OFTConfig(oft_block_size=block_size, r=0, target_modules=["0"], use_cayley_neumann=neumann)
        setup = peft_layer_case(d, n, dtype, device, config, randomize=["oft_R"], scale=0.5 / block_size,
                                fused={"fastadapt": lambda layer: layer})
        with torch.no_grad():
            packed = setup.arms["peft"].oft_R["default"].weight.float()
            R = oft_rotation_blocks(packed, block_size, use_cayley_neumann=neumann)
        setup.metrics["orthogonality error max ||R^T R - I||_F"] = float(orthogonality_error(R))
        return setup
    return build


def _build_psoft(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
    config = PsoftConfig(r=RANK, psoft_alpha=RANK, target_modules=["0"], use_cayley_neumann=False)

    def perturb_vector_a(layer):
        layer.psoft_R["default"].vector_a.add_(0.05 * randn(RANK, dtype=dtype, device=device))

    return peft_layer_case(d, n, dtype, device, config, randomize=["psoft_R.default.weight"], scale=0.5 / RANK,
                           prepare=perturb_vector_a, fused={"fastadapt": lambda layer: layer})


def _build_ssvd(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
    # Everything on ``device`` from the start: the oracle must live where x does, and the two
    # d x d float64 SVDs (oracle and layer) run there (on a CPU they dominate the case at d = 4096).
    base = linear_model(d, d, bias=False, dtype=torch.float64)[0].to(device)
    oracle = SSVDReference(base.weight, None, 0.5 / RANK * randn(RANK * (RANK - 1) // 2, device=device),
                           0.01 * randn(RANK, device=device), r=RANK)
    layer = SSVDLinear(copy.deepcopy(base), r=RANK)
    with torch.no_grad():
        layer.ssvd_R.weight.copy_(oracle.packed)
        layer.ssvd_R.delta_s.copy_(oracle.delta_s)
    layer = layer.to(device, dtype)
    return CaseSetup(x=randn(n, d, dtype=dtype, device=device), base=layer.base_layer,
                     arms={"fastadapt": layer}, reference=oracle)


CASES = [
    Case("oft_b32", "cayley", _build_oft(32, True), notes="PEFT OFT b=32 (Neumann, 5 terms) vs fused"),
    Case("oft_b32_exact", "cayley", _build_oft(32, False), notes="OFT b=32, exact Cayley"),
    Case("oft_b128", "cayley", _build_oft(128, True), notes="PEFT OFT b=128 (Neumann, 5 terms) vs fused"),
    Case("oft_b128_exact", "cayley", _build_oft(128, False), notes="OFT b=128, exact Cayley"),
    Case("psoft_r32", "cayley", _build_psoft, notes="PEFT PSOFT r=32 (exact Cayley) vs fused"),
    Case("ssvd_r32", "cayley", _build_ssvd, notes="fastadapt SSVD r=32 (no PEFT arm)"),
]
