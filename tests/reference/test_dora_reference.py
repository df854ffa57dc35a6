"""DoRA and DeLoRA references equal PEFT's layers in float64: output and every gradient."""
import pytest
import torch
from peft import DeloraConfig, LoraConfig, get_peft_model
from torch import nn

from fastadapt.numerics import assert_rel_close
from fastadapt.reference.dora import DeLoRA, DoRA
from fastadapt.testing import linear_model, randn, randomize_


class FixedMaskDropout(nn.Module):
    """Stands in for PEFT's nn.Dropout with a known mask (already scaled by 1 / (1 - p))."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def dropout_mask(shape, p=0.1, seed=7):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) >= p).to(torch.float64) / (1 - p)


def dora_peft(d_in, d_out, r, bias=True, dropout=0.0):
    model = get_peft_model(linear_model(d_in, d_out, bias=bias),
                           LoraConfig(r=r, lora_alpha=2 * r, use_dora=True, target_modules=["0"],
                                      lora_dropout=dropout))
    randomize_(model, names=["lora_B"], scale=0.3)
    randomize_(model, names=["lora_magnitude_vector"], scale=1.0)
    return model, model.base_model.model[0]


def grads(out, dy, tensors):
    return torch.autograd.grad(out, tensors, dy)


@pytest.mark.parametrize("r", [4, 16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_dora_reference_equals_peft(r, bias, masked):
    d_in, d_out = 41, 37
    model, layer = dora_peft(d_in, d_out, r, bias=bias, dropout=0.1 if masked else 0.0)
    ref = DoRA.from_peft(layer)
    x = randn(3, 9, d_in, requires_grad=True)
    mask = dropout_mask(x.shape) if masked else None
    if masked:
        layer.lora_dropout["default"] = FixedMaskDropout(mask)
    model.train()
    y_peft = model(x)
    y_ref = ref(x, dropout_mask=mask)
    assert_rel_close(y_ref, y_peft, name="output")
    dy = randn(*y_peft.shape)
    peft_params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                   layer.lora_magnitude_vector["default"].weight]
    for name, g_ref, g_peft in zip(["x", "A", "B", "m"], grads(y_ref, dy, [x, ref.lora_A, ref.lora_B, ref.magnitude]),
                                   grads(y_peft, dy, peft_params)):
        assert_rel_close(g_ref, g_peft, name=name)


def test_dora_reference_merged_weight_and_fan_in_fan_out():
    from transformers.pytorch_utils import Conv1D
    base = Conv1D(nf=10, nx=12).to(torch.float64)
    randomize_(base, scale=0.5)
    model = get_peft_model(nn.Sequential(base), LoraConfig(r=4, use_dora=True, target_modules=["0"],
                                                           fan_in_fan_out=True))
    randomize_(model, names=["lora_B"], scale=0.3)
    layer = model.base_model.model[0]
    ref = DoRA.from_peft(layer)
    x = randn(5, 12)
    assert_rel_close(ref(x), model(x))
    assert_rel_close(nn.functional.linear(x, ref.merged_weight(), ref.bias), model(x))


def test_dora_reference_bad_input():
    w = randn(10, 12)
    with pytest.raises(ValueError, match="lora_magnitude_vector.*\\(9,\\).*\\(10,\\)"):
        DoRA(w, None, randn(4, 12), randn(10, 4), randn(9), 1.0)
    with pytest.raises(ValueError, match="r=11"):
        DoRA(w, None, randn(11, 12), randn(10, 11), randn(10), 1.0)


@pytest.mark.parametrize("r", [4, 16])
@pytest.mark.parametrize("masked", [False, True])
def test_delora_reference_equals_peft(r, masked):
    d_in, d_out = 41, 37
    model = get_peft_model(linear_model(d_in, d_out),
                           DeloraConfig(r=r, delora_lambda=7, init_weights=False, target_modules=["0"],
                                        module_dropout=0.1 if masked else 0.0))
    layer = model.base_model.model[0]
    ref = DeLoRA.from_peft(layer)
    x = randn(2, 7, d_in, requires_grad=True)
    mask = dropout_mask(x.shape) if masked else None
    if masked:
        layer.delora_dropout["default"] = FixedMaskDropout(mask)
    model.train()
    y_peft = model(x)
    y_ref = ref(x, dropout_mask=mask)
    assert_rel_close(y_ref, y_peft, name="output")
    if not masked:
        assert_rel_close(nn.functional.linear(x, ref.merged_weight(), ref.bias), y_peft, name="merged")
    dy = randn(*y_peft.shape)
    names = ["x", "A", "B", "lambda"]
    ref_grads = grads(y_ref, dy, [x, ref.delora_A, ref.delora_B, ref.delora_lambda])
    peft_grads = grads(y_peft, dy, [x, layer.delora_A["default"], layer.delora_B["default"],
                                    layer.delora_lambda["default"]])
    for name, g_ref, g_peft in zip(names, ref_grads, peft_grads):
        assert_rel_close(g_ref, g_peft, name=name)


def test_demo_instances_are_consistent():
    for cls in (DoRA, DeLoRA):
        ref = cls.demo()
        x = randn(3, ref.in_features)
        assert_rel_close(ref(x), nn.functional.linear(x, ref.merged_weight(), ref.bias))
