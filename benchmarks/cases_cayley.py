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
from peft import OFTConfig, PsoftConfig, get_peft_model

import fastadapt
from fastadapt.bench import Case, CaseSetup
from fastadapt.layers.cayley import SSVDLinear
from fastadapt.ops.cayley import oft_rotation_blocks, orthogonality_error
from fastadapt.reference.cayley import SSVDReference
from fastadapt.testing import linear_model, randn, randomize_

RANK = 32


def _peft_layer(d: int, dtype: torch.dtype, device, config):
    model = linear_model(d, d, bias=False, dtype=dtype).to(device)
    return get_peft_model(model, config).base_model.model[0]


def _accelerated(layer):
    fused = copy.deepcopy(layer)
    report = fastadapt.accelerate(fused)
    if report.num_patched != 1:
        raise RuntimeError(f"fastadapt did not patch the layer:\n{report}")
    return fused


def _build_oft(block_size: int, neumann: bool):
    def build(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
        layer = _peft_layer(d, dtype, device, OFTConfig(oft_block_size=block_size, r=0, target_modules=["0"],
                                                        use_cayley_neumann=neumann))
        randomize_(layer, scale=0.5 / block_size, names=["oft_R"])
        oracle = copy.deepcopy(layer).to(torch.float64).eval()
        with torch.no_grad():
            R = oft_rotation_blocks(layer.oft_R["default"].weight.float(), block_size, use_cayley_neumann=neumann)
        return CaseSetup(x=randn(n, d, dtype=dtype, device=device), base=layer.base_layer,
                         arms={"fastadapt": _accelerated(layer), "peft": layer}, reference=oracle,
                         metrics={"orthogonality error max ||R^T R - I||_F": float(orthogonality_error(R))})
    return build


def _build_psoft(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
    layer = _peft_layer(d, dtype, device, PsoftConfig(r=RANK, psoft_alpha=RANK, target_modules=["0"],
                                                      use_cayley_neumann=False))
    randomize_(layer, scale=0.5 / RANK, names=["psoft_R.default.weight"])
    with torch.no_grad():
        layer.psoft_R["default"].vector_a.add_(0.05 * randn(RANK, dtype=dtype, device=device))
    oracle = copy.deepcopy(layer).to(torch.float64).eval()
    return CaseSetup(x=randn(n, d, dtype=dtype, device=device), base=layer.base_layer,
                     arms={"fastadapt": _accelerated(layer), "peft": layer}, reference=oracle)


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
