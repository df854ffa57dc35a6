"""Low-rank family (LoRA and the methods on its branch): fastadapt's fused path vs PEFT's layer,
eager and torch.compile'd, vs the frozen base.

Base: a bias-free d x d nn.Linear (a transformer projection), frozen.  Adapters: PEFT's, trained a
few AdamW steps from PEFT's init by fastadapt.bench.train_adapter_ (LoRA's B starts at zero, which
would make the branch trivially exact).  Arms: "peft", "fastadapt" (a copy of the same trained
layer patched by ``fastadapt.accelerate``, where the method is bridged), "lycoris" where LyCORIS
has the method (its dropout drops the adapter's output, PEFT's its input).  Reference: the same
PEFT layer copied to float64 (eval mode, so dropout is inactive).

Several adapters: "lora_r16_2adapters" has two r = 16 adapters active at once (PEFT loops over
them; the fused path runs one rank-32 branch).  "lora_r16_mixed4" is a mixed-adapter batch: the
tokens form 8 sequences, each served by one of 4 adapters (PEFT's ``adapter_names``: one sub-batch
per adapter; the fused path groups rows by adapter).
"""
from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fastadapt.bench import Adapter, Case, CaseSetup, peft_layer_case, train_adapter_
from fastadapt.bench.cases import TRAIN_EXAMPLE_SEED, config_summary
from fastadapt.bench.training import TRAIN_TOKENS
from fastadapt.peft import bridged_methods
from fastadapt.testing import linear_model, randn

RANK = 16
MIXED_ADAPTERS, MIXED_SEQUENCES = 4, 8


def _lora_config(rank: int, targets, dropout: float = 0.0) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=targets)


def _fused_arms(method: str) -> dict | None:
    return {"fastadapt": lambda layer: layer} if method in bridged_methods() else None


def _build_lora(dropout: float):
    def build(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
        return peft_layer_case(d, n, dtype, device, _lora_config(RANK, ["0"], dropout), fused=_fused_arms("lora"))
    return build


class MixedBatch(nn.Module):
    """A PEFT LoRA layer called on (n, d) tokens as ``sequences`` sequences, each with its adapter
    (``adapter_names``; PEFT's mixed-adapter batch), returning (n, d_out)."""

    def __init__(self, layer: nn.Module, names: list[str], sequences: int):
        super().__init__()
        self.layer, self.names, self.sequences = layer, names, sequences

    def forward(self, x):
        y = self.layer(x.reshape(self.sequences, -1, x.shape[-1]), adapter_names=self.names)
        return y.reshape(x.shape[0], -1)


def _several_adapters_case(d: int, n: int, dtype: torch.dtype, device, adapters: int, mixed: bool) -> CaseSetup:
    """LoRA r = 16 with ``adapters`` adapters on one layer: all active at once, or (``mixed``) a
    mixed-adapter batch of MIXED_SEQUENCES sequences cycling through them; every adapter trained."""
    import fastadapt
    names = [f"adapter{i}" for i in range(adapters)]
    config = _lora_config(RANK, ["0"])
    model = get_peft_model(linear_model(d, d, bias=False, dtype=dtype).to(device), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, _lora_config(RANK, ["0"]))
    layer = model.base_model.model[0]
    if not mixed:
        layer.set_adapter(names)
    for p_name, p in layer.named_parameters():
        p.requires_grad_("lora_" in p_name)
    sequence_names = [names[i % adapters] for i in range(MIXED_SEQUENCES)]
    wrap = (lambda module: MixedBatch(module, sequence_names, MIXED_SEQUENCES)) if mixed else (lambda module: module)
    arm = wrap(layer)
    train_adapter_(arm, randn(TRAIN_TOKENS, d, dtype=dtype, device=device, seed=TRAIN_EXAMPLE_SEED))
    arms, reports = {}, {}
    if "lora" in bridged_methods():
        patched = copy.deepcopy(layer)
        reports["fastadapt"] = fastadapt.accelerate(patched)
        arms["fastadapt"] = wrap(patched)
    arms["peft"] = arm
    return CaseSetup(x=randn(n, d, dtype=dtype, device=device), base=layer.base_layer, arms=arms,
                     reference=copy.deepcopy(arm).to(torch.float64).eval(), reports=reports,
                     config=config_summary(config) | {"method": "lora", "adapters": adapters, "mixed_batch": mixed})


def _build_several(adapters: int, mixed: bool):
    def build(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
        return _several_adapters_case(d, n, dtype, device, adapters, mixed)
    return build


CASES = [
    Case("lora_r16", "lowrank", _build_lora(0.0), notes="PEFT LoRA r=16 vs frozen Linear"),
    Case("lora_r16_dropout0.1", "lowrank", _build_lora(0.1), notes="PEFT LoRA r=16, lora_dropout=0.1"),
    Case("lora_r16_2adapters", "lowrank", _build_several(2, False),
         notes="two LoRA r=16 adapters active at once (fused: one rank-32 branch)"),
    Case("lora_r16_mixed4", "lowrank", _build_several(MIXED_ADAPTERS, True),
         notes=f"mixed-adapter batch: {MIXED_SEQUENCES} sequences over {MIXED_ADAPTERS} LoRA r=16 adapters "
               "(adapter_names)"),
]

ADAPTERS = [Adapter("lora", _lora_config, "r", sizes=tuple(range(1, 513)), default=RANK)]
