"""dora_norm family microbenchmarks: DoRA's weight norm ||W + s B A||_row (the layers: test_layers.py).

weight_norm, forward only (DoRA detaches it): fastadapt.ops.dora_norm.dora_weight_norm (factored:
||W||^2 cached, never forming B A) vs the torch reference (forming W + s B A, row norms) vs PEFT's
DoraLinearLayer.get_weight_norm after its get_lora_weight (what PEFT's forward calls), for r in
{16, 64} (tiny scale: 8).
"""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from fastadapt.bench.micro import forward_only, micro_scale, run
from fastadapt.bench.training import train_adapter_
from fastadapt.ops.dora_norm import dora_weight_norm, weight_row_sq_norm
from fastadapt.testing import linear_model, randn

RANKS = (8,) if micro_scale() == "tiny" else (16, 64)


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("arm", ["fastadapt", "torch", "peft"])
def test_weight_norm(benchmark, device, shape, arm, r):
    d, _, dtype = shape
    config = LoraConfig(r=r, lora_alpha=2 * r, use_dora=True, target_modules=["0"])
    layer = get_peft_model(linear_model(d, d, bias=False, dtype=dtype), config).base_model.model[0].to(device)
    train_adapter_(layer, randn(64, d, dtype=dtype, device=device, seed=1))
    W = layer.base_layer.weight
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scaling = layer.scaling["default"]
    w_sq = weight_row_sq_norm(W)
    dora = layer.lora_magnitude_vector["default"]

    def peft_norm():
        lora_weight = dora.get_lora_weight(layer.lora_A["default"], layer.lora_B["default"])
        return dora.get_weight_norm(W, lora_weight.to(W.dtype), scaling)

    fn = {"fastadapt": lambda: dora_weight_norm(W, A, B, scaling, w_sq),
          "torch": lambda: torch.linalg.vector_norm(W + scaling * (B @ A).to(W.dtype), dim=1),
          "peft": peft_norm}[arm]
    run(benchmark, forward_only(fn), group=f"weight_norm r={r} (d={d}, {str(dtype)[6:]})", device=device)
