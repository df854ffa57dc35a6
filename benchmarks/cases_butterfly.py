"""Butterfly family (BOFT, GOFT, HRA, ETHER, RoAd): fastadapt vs PEFT eager vs the frozen base.

Base: a bias-free d x d nn.Linear, frozen.  Adapters, each trained a few AdamW steps from its
init by fastadapt.bench.train_adapter_:
  boft_b8_m1, boft_b8_m2   PEFT BOFT, boft_block_size=8, boft_n_butterfly_factor 1 / 2 (m = 2 runs
                           PEFT's own math through fastadapt's torch block-diagonal stand-in for its
                           CUDA extension; without it PEFT would silently use m = 1);
  hra_r8, hra_r8_gs        PEFT HRA r=8 (Householder product / Gram-Schmidt);
  road_1, road_4           PEFT RoAd, group_size=64;
  goft                     fastadapt GOFTLinear, block_size = d (log2(d) Givens stages; not in PEFT);
  ether_n32, ether_plus_n32  fastadapt ETHERLinear with 32 blocks (not in PEFT).
Arms: "peft" (PEFT's layer, eager; the runner adds torch.compile of it) and "fastadapt" (a copy of
the trained PEFT layer patched by ``fastadapt.accelerate``, or the fastadapt layer itself);
boft_b8_m1 also "fastadapt_recompute" (``set_boft_recompute``: x alone saved, h formed again).
Reference: the PEFT layer copied to float64 (GOFT, ETHER: fastadapt.reference.butterfly of the
trained parameters).
"""
from __future__ import annotations

import copy

import torch
from peft import BOFTConfig, HRAConfig, RoadConfig

import fastadapt
from fastadapt.bench import Adapter, Case, CaseSetup, peft_layer_case, train_adapter_
from fastadapt.layers.butterfly import ETHERLinear, GOFTLinear, set_boft_recompute
from fastadapt.reference import butterfly as reference
from fastadapt.testing import linear_model, randn

# the boft_b8_m2 case: PEFT keeps boft_n_butterfly_factor = 2 without its CUDA extension
fastadapt.keep_boft_butterfly_factors()

BOFT_BLOCK = 8
HRA_RANK = 8
ROAD_GROUP = 64
ETHER_BLOCKS = 32


def _boft_config(m: int, targets, block_size: int = BOFT_BLOCK) -> BOFTConfig:
    return BOFTConfig(boft_block_size=block_size, boft_n_butterfly_factor=m, target_modules=targets)


def _hra_config(rank: int, targets, apply_GS: bool = False) -> HRAConfig:
    return HRAConfig(r=rank, apply_GS=apply_GS, target_modules=targets)


def _road_config(variant: str, targets, group_size: int = ROAD_GROUP) -> RoadConfig:
    return RoadConfig(variant=variant, group_size=group_size, target_modules=targets)


def _boft_recompute(layer):
    set_boft_recompute(layer)
    return layer


def _peft_case(make_config, **more_fused):
    def build(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
        return peft_layer_case(d, n, dtype, device, make_config(["0"]),
                               fused={"fastadapt": lambda layer: layer, **more_fused})
    return build


def _fastadapt_only(make_layer, make_reference, config: dict):
    """A fastadapt layer (no PEFT arm) on a bias-free d x d base, trained in float64; the float64
    oracle from its trained parameters."""
    def build(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
        base = linear_model(d, d, bias=False, dtype=torch.float64)[0].to(device)
        layer = make_layer(copy.deepcopy(base))
        train_adapter_(layer, randn(256, d, device=device, seed=1))
        oracle = make_reference(base.weight.detach(), layer)
        layer = layer.to(device, dtype)
        return CaseSetup(x=randn(n, d, dtype=dtype, device=device), base=layer.base_layer,
                         arms={"fastadapt": layer}, reference=oracle, config=config)
    return build


def _goft_reference(weight, layer):
    return reference.GOFT(weight, block_size=layer.block_size, goft_theta=layer.goft_theta.detach())


def _ether_reference(weight, layer):
    extra = {}
    if layer.plus:
        extra = {k: getattr(layer, k).detach() for k in ("ether_v", "ether_u_out", "ether_v_out")}
    return reference.ETHER(weight, n_blocks=layer.n_blocks, plus=layer.plus, ether_u=layer.ether_u.detach(), **extra)


CASES = [
    Case("boft_b8_m1", "butterfly", _peft_case(lambda t: _boft_config(1, t), fastadapt_recompute=_boft_recompute),
         notes="PEFT BOFT b=8, one factor, vs fused (and fused saving x alone)"),
    Case("boft_b8_m2", "butterfly", _peft_case(lambda t: _boft_config(2, t)),
         notes="PEFT BOFT b=8, two butterfly factors, vs fused"),
    Case("goft", "butterfly", _fastadapt_only(GOFTLinear, _goft_reference, {"layer": "GOFTLinear"}),
         notes="fastadapt GOFT, log2(d) Givens stages (no PEFT arm)"),
    Case("hra_r8", "butterfly", _peft_case(lambda t: _hra_config(HRA_RANK, t)),
         notes="PEFT HRA r=8 vs fused (compact WY)"),
    Case("hra_r8_gs", "butterfly", _peft_case(lambda t: _hra_config(HRA_RANK, t, apply_GS=True)),
         notes="PEFT HRA r=8 apply_GS vs fused"),
    Case("ether_n32", "butterfly",
         _fastadapt_only(lambda base: ETHERLinear(base, n_blocks=ETHER_BLOCKS), _ether_reference,
                         {"layer": "ETHERLinear", "n_blocks": ETHER_BLOCKS}),
         notes="fastadapt ETHER, 32 blocks (no PEFT arm)"),
    Case("ether_plus_n32", "butterfly",
         _fastadapt_only(lambda base: ETHERLinear(base, n_blocks=ETHER_BLOCKS, plus=True), _ether_reference,
                         {"layer": "ETHERLinear", "n_blocks": ETHER_BLOCKS, "plus": True}),
         notes="fastadapt ETHER+, 32 blocks, both sides (no PEFT arm)"),
    Case("road_1", "butterfly", _peft_case(lambda t: _road_config("road_1", t)),
         notes="PEFT RoAd road_1, group 64, vs fused"),
    Case("road_4", "butterfly", _peft_case(lambda t: _road_config("road_4", t)),
         notes="PEFT RoAd road_4, group 64, vs fused"),
]

ADAPTERS = [
    Adapter("boft", lambda b, targets: _boft_config(1, targets, block_size=b), "boft_block_size",
            sizes=(2, 4, 8, 16, 32, 64, 128), default=BOFT_BLOCK),
    Adapter("hra", _hra_config, "r", sizes=(2, 4, 8, 16, 32, 64), default=HRA_RANK),
    Adapter("road", lambda g, targets: _road_config("road_1", targets, group_size=g), "group_size",
            sizes=(2, 4, 8, 16, 32, 64, 128), default=ROAD_GROUP),
]
