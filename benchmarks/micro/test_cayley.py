"""Cayley family microbenchmarks: packed -> rotation blocks (the layers: test_layers.py).

rotation: packed (d/b, b(b-1)/2) -> R (d/b, b, b), forward and forward+backward, for b in
{16, 32, 128} (tiny scale: 16) and both of PEFT's modes (Neumann, 5 terms; exact Cayley):
fastadapt.ops.cayley.oft_rotation_blocks vs the torch reference (fastadapt.reference.cayley: skew,
then the series or a dense solve) vs PEFT's OFTRotationModule._cayley_batch.
"""
import pytest
import torch
from peft import OFTConfig, get_peft_model

from fastadapt.bench.micro import forward_backward, forward_only, micro_scale, run
from fastadapt.bench.training import train_adapter_
from fastadapt.ops.cayley import oft_rotation_blocks
from fastadapt.reference import cayley as ref
from fastadapt.testing import linear_model, randn

BLOCKS = (16,) if micro_scale() == "tiny" else (16, 32, 128)
MODES = {"neumann": True, "exact": False}


def _torch_rotation(packed, b, neumann):
    Q = ref.skew(packed, b)
    return ref.neumann(Q, 5) if neumann else ref.cayley(-Q)


def _oft_layer(d, dtype, device, b, neumann):
    config = OFTConfig(oft_block_size=b, r=0, target_modules=["0"], use_cayley_neumann=neumann)
    layer = get_peft_model(linear_model(d, d, bias=False, dtype=dtype), config).base_model.model[0].to(device)
    return train_adapter_(layer, randn(64, d, dtype=dtype, device=device, seed=1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("b", BLOCKS)
@pytest.mark.parametrize("arm", ["fastadapt", "torch", "peft"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_rotation(benchmark, device, shape, arm, b, mode, pass_):
    d, _, dtype = shape
    neumann = MODES[mode]
    layer = _oft_layer(d, torch.float32, device, b, neumann)  # PEFT keeps the rotation in float32
    packed = layer.oft_R["default"].weight
    fn = {"fastadapt": lambda: oft_rotation_blocks(packed, b, use_cayley_neumann=neumann),
          "torch": lambda: _torch_rotation(packed, b, neumann),
          "peft": lambda: layer.oft_R["default"]._cayley_batch(packed, b, neumann, 5)}[arm]
    call = forward_only(fn) if pass_ == "fwd" else forward_backward(fn, [packed])
    run(benchmark, call, group=f"rotation b={b} {mode} {pass_} (d={d})", device=device)
