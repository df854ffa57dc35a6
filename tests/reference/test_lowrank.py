"""The low-rank-product references (LoRA, PiSSA/OLoRA init, VeRA, AdaLoRA, RandLoRA, VB-LoRA)
against PEFT 0.21 in float64, plus the properties each method promises."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import AdaLoraConfig, LoraConfig, RandLoraConfig, VBLoRAConfig, VeraConfig, get_peft_model
from transformers.pytorch_utils import Conv1D

from fastadapt.numerics import assert_rel_close, rel_error
from fastadapt.reference import lowrank
from fastadapt.reference.lowrank import (REFERENCES, AdaLoRA, LoRA, PiSSA, RandLoRA, VBLoRA, VeRA,
                                         lora_scaling, olora_init, pissa_init)
from fastadapt.testing import linear_model, noncontig, randn, randomize_

F64 = torch.float64

# name -> (PEFT config class, its arguments, reference class, substrings of the adapter
# parameters to randomize)
PEFT_CASES = {
    "lora": (LoraConfig, dict(r=4, lora_alpha=8), LoRA, ["lora_"]),
    "rslora": (LoraConfig, dict(r=4, lora_alpha=8, use_rslora=True), LoRA, ["lora_"]),
    "vera": (VeraConfig, dict(r=8), VeRA, ["vera_lambda"]),
    "adalora": (AdaLoraConfig, dict(init_r=6, lora_alpha=8, total_step=10), AdaLoRA,
                ["lora_A", "lora_B", "lora_E"]),
    "randlora": (RandLoraConfig, dict(r=5, randlora_alpha=10), RandLoRA, ["randlora_"]),
    "vblora": (VBLoRAConfig, dict(r=4, num_vectors=16, vector_length=8, topk=2), VBLoRA, ["vblora_"]),
}


def peft_config(case: str, target_modules=("0", "2"), **extra):
    config_cls, kwargs, _, _ = PEFT_CASES[case]
    return config_cls(target_modules=list(target_modules), **kwargs, **extra)


# (in_features, out_features) of layer "0"; layer "2" maps out -> out.  Both orientations, so
# the shared projections (VeRA, RandLoRA) are sliced and RandLoRA takes both of its branches.
SHAPES = ((24, 40), (40, 24))


def peft_model(config, d_in: int, d_out: int, dtype=F64):
    return get_peft_model(linear_model(d_in, d_out, depth=2, dtype=dtype), config).eval()


def layer_of(model, name: str = "0"):
    return model.base_model.model[int(name)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}to{s[1]}")
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_matches_peft(case, shape):
    """Forward and get_delta_weight of every adapted layer equal PEFT's in float64."""
    _, _, ref_cls, names = PEFT_CASES[case]
    model = peft_model(peft_config(case), *shape)
    for name in ("0", "2"):
        layer = layer_of(model, name)
        randomize_(layer, names=names, scale=0.5)
        ref = ref_cls.from_peft(layer, "default")
        x = randn(3, 5, layer.in_features)
        with torch.no_grad():
            expected_y = layer(x)
            expected_dw = layer.get_delta_weight("default")
            y = ref(x)
            dw = ref.delta_weight()
            assert rel_error(expected_y, layer.get_base_layer()(x)) > 1e-3, "adapter has no effect"
            assert_rel_close(y, expected_y, name=f"{case} layer {name} forward")
            assert_rel_close(dw, expected_dw, name=f"{case} layer {name} delta_weight")
            assert_rel_close(ref(noncontig(x)), expected_y, name=f"{case} non-contiguous x")


@pytest.mark.parametrize("case", ["lora", "vera", "adalora", "randlora"])
def test_identity_at_peft_init(case):
    """Methods whose PEFT init is the identity (B = 0, lambda_b = 0, E = 0, lambda = 0)
    give dW == 0 and forward == base exactly."""
    ref_cls = PEFT_CASES[case][2]
    layer = layer_of(peft_model(peft_config(case), 24, 40))
    ref = ref_cls.from_peft(layer)
    x = randn(3, 5, 24)
    with torch.no_grad():
        assert torch.equal(ref.delta_weight(), torch.zeros(40, 24, dtype=F64))
        assert torch.equal(ref(x), ref.base(x))


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_demo_forward_equals_merged_weight(name):
    """forward(x) == x (W + dW)^T + b, on each class's demo() (a nonzero adapter)."""
    ref = REFERENCES[name].demo()
    x = randn(3, 5, ref.in_features)
    with torch.no_grad():
        assert rel_error(ref.delta_weight(), torch.zeros_like(ref.weight)) > 0
        assert ref.delta_weight().dtype == F64
        assert_rel_close(ref(x), F.linear(x, ref.merged_weight(), ref.bias), name=f"{name} merged")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}to{s[1]}")
@pytest.mark.parametrize("case", ["lora", "vera", "adalora", "randlora", "vblora"])
def test_fan_in_fan_out_matches_peft(case, shape):
    """A Conv1D base (weight stored (in, out)) with fan_in_fan_out=True: the reference holds
    W as (out, in), and its delta is PEFT's transposed."""
    d_in, d_out = shape
    _, _, ref_cls, names = PEFT_CASES[case]
    base = torch.nn.Sequential(Conv1D(d_out, d_in)).to(F64)
    randomize_(base, scale=0.2)
    model = get_peft_model(base, peft_config(case, ["0"], fan_in_fan_out=True)).eval()
    layer = layer_of(model)
    randomize_(layer, names=names, scale=0.5)
    ref = ref_cls.from_peft(layer)
    assert ref.weight.shape == (d_out, d_in)
    x = randn(3, 5, d_in)
    with torch.no_grad():
        assert_rel_close(ref(x), layer(x), name=f"{case} fan_in_fan_out forward")
        assert_rel_close(ref.delta_weight().T, layer.get_delta_weight("default"),
                         name=f"{case} fan_in_fan_out delta")


def test_rslora_scaling():
    """rsLoRA scales by alpha / sqrt(r), plain LoRA by alpha / r; both as PEFT sets them."""
    assert lora_scaling(8, 4) == 2.0
    assert lora_scaling(8, 4, use_rslora=True) == 4.0
    for use_rslora, expected in ((False, 2.0), (True, 4.0)):
        config = LoraConfig(target_modules=["0"], r=4, lora_alpha=8, use_rslora=use_rslora)
        layer = layer_of(peft_model(config, 24, 40))
        assert layer.scaling["default"] == expected
        assert LoRA.from_peft(layer).scaling == expected


def test_adalora_scaling_is_alpha():
    """AdaLoRA's scaling is lora_alpha (not alpha / r); the 1/r comes from ranknum."""
    layer = layer_of(peft_model(peft_config("adalora"), 24, 40))
    ref = AdaLoRA.from_peft(layer)
    assert ref.scaling == 8.0 and ref.ranknum == 6.0
    assert lowrank.adalora_scaling(8, 6) == 8.0 and lowrank.adalora_scaling(0, 6) == 6.0


# --------------------------------------------------------------------------------------------
# PiSSA / OLoRA initialisations
# --------------------------------------------------------------------------------------------

def test_pissa_init_matches_peft_config():
    """init_lora_weights="pissa" (full SVD, float32 as PEFT requires): same factors and
    residual as pissa_init; the PEFT layer then reads back as a PiSSA reference in float64."""
    original = linear_model(24, 40, dtype=torch.float32, seed=11)
    weight = original[0].weight.detach().clone()
    model = get_peft_model(original, LoraConfig(target_modules=["0"], r=4, lora_alpha=8,
                                                init_lora_weights="pissa"))
    layer = layer_of(model)
    lora_A, lora_B, residual = pissa_init(weight, 4, scaling=2.0)
    assert lora_A.dtype == torch.float32
    assert_rel_close(lora_A, layer.lora_A["default"].weight, name="pissa lora_A")
    assert_rel_close(lora_B, layer.lora_B["default"].weight, name="pissa lora_B")
    assert_rel_close(residual, layer.get_base_layer().weight, name="pissa residual")

    model.double()
    ref = PiSSA.from_peft(layer)
    assert isinstance(ref, PiSSA)
    x = randn(3, 5, 24)
    with torch.no_grad():
        assert_rel_close(ref(x), layer(x), name="pissa forward")
        assert_rel_close(ref.merged_weight(), weight.double(), torch.float32, name="pissa W_res + dW")


def test_pissa_niter_matches_peft():
    """The svd_lowrank path ("pissa_niter_2"): same global seed, same factors as PEFT."""
    layer = layer_of(get_peft_model(linear_model(24, 40, dtype=torch.float32),
                                    LoraConfig(target_modules=["0"], r=4, lora_alpha=8)))
    weight = layer.get_base_layer().weight.detach().clone()
    torch.manual_seed(123)
    layer.pissa_init("default", "pissa_niter_2")
    torch.manual_seed(123)
    lora_A, lora_B, residual = pissa_init(weight, 4, niter=2, scaling=2.0)
    assert_rel_close(lora_A, layer.lora_A["default"].weight, name="pissa_niter lora_A")
    assert_rel_close(lora_B, layer.lora_B["default"].weight, name="pissa_niter lora_B")
    assert_rel_close(residual, layer.get_base_layer().weight, name="pissa_niter residual")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}to{s[1]}")
def test_olora_init_matches_peft(shape):
    """init_lora_weights="olora" (QR, float32): same factors and residual as olora_init."""
    original = linear_model(*shape, dtype=torch.float32, seed=12)
    weight = original[0].weight.detach().clone()
    model = get_peft_model(original, LoraConfig(target_modules=["0"], r=4, lora_alpha=8,
                                                init_lora_weights="olora"))
    layer = layer_of(model)
    lora_A, lora_B, residual = olora_init(weight, 4, scaling=2.0)
    assert_rel_close(lora_A, layer.lora_A["default"].weight, name="olora lora_A")
    assert_rel_close(lora_B, layer.lora_B["default"].weight, name="olora lora_B")
    assert_rel_close(residual, layer.get_base_layer().weight, name="olora residual")


def test_pissa_fan_in_fan_out_matches_peft():
    """PiSSA on a Conv1D (fan_in_fan_out=True) factorises the (out, in) weight."""
    base = torch.nn.Sequential(Conv1D(40, 24))
    randomize_(base, scale=0.2)
    weight_in_out = base[0].weight.detach().clone()
    model = get_peft_model(base, LoraConfig(target_modules=["0"], r=4, lora_alpha=8, fan_in_fan_out=True,
                                            init_lora_weights="pissa"))
    layer = layer_of(model)
    lora_A, lora_B, residual = pissa_init(weight_in_out.T, 4, scaling=2.0)
    assert_rel_close(lora_A, layer.lora_A["default"].weight, name="pissa Conv1D lora_A")
    assert_rel_close(residual.T, layer.get_base_layer().weight, name="pissa Conv1D residual")
    model.double()
    ref = PiSSA.from_peft(layer)
    x = randn(3, 5, 24)
    with torch.no_grad():
        assert_rel_close(ref(x), layer(x), name="pissa Conv1D forward")


@pytest.mark.parametrize("init, niter", [("pissa", None), ("pissa", 3), ("olora", None)])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_from_weight_reproduces_original_weight(init, niter, use_rslora):
    """Residual base + adapter == the original W (float64, 1e-10), for every init."""
    weight, bias = randn(40, 24), randn(40)
    ref = PiSSA.from_weight(weight, bias, 5, 6.0, use_rslora=use_rslora, init=init, niter=niter)
    assert ref.scaling == lora_scaling(6.0, 5, use_rslora)
    x = randn(3, 5, 24)
    with torch.no_grad():
        assert_rel_close(ref.merged_weight(), weight, name=f"{init} W_res + dW")
        assert_rel_close(ref(x), F.linear(x, weight, bias), name=f"{init} forward at init")
        assert rel_error(ref.weight, weight) > 1e-2, "the residual should differ from W"


def test_pissa_adapter_is_principal_part():
    """With the full SVD, s * B @ A is the rank-r truncated SVD of W."""
    weight = randn(40, 24)
    ref = PiSSA.from_weight(weight, None, 5, 8.0)
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    with torch.no_grad():
        truncated_svd = U[:, :5] @ torch.diag(S[:5]) @ Vh[:5]
        assert_rel_close(ref.delta_weight(), truncated_svd, name="pissa principal part")


# --------------------------------------------------------------------------------------------
# Bad inputs: ValueError naming the parameter
# --------------------------------------------------------------------------------------------

W = randn(40, 24)  # (out, in): min(in, out) = 24


def _lora(r):
    return LoRA(W, None, randn(r, 24), randn(40, r), 1.0)


BAD_INPUTS = {
    "lora r=0": (lambda: _lora(0), "r=0"),
    "lora r>min": (lambda: _lora(25), r"r=25 .*1\.\.24"),
    "lora_B shape": (lambda: LoRA(W, None, randn(4, 24), randn(24, 4), 1.0), "lora_B"),
    "lora weight ndim": (lambda: LoRA(randn(40), None, randn(4, 24), randn(40, 4), 1.0), "weight"),
    "pissa_init r=0": (lambda: pissa_init(W, 0), "r=0"),
    "pissa_init r>min": (lambda: pissa_init(W, 30), r"r=30 .*1\.\.24"),
    "pissa_init niter": (lambda: pissa_init(W, 4, niter=0), "niter=0"),
    "olora_init r>min": (lambda: olora_init(W, 30), "r=30"),
    "pissa init choice": (lambda: PiSSA.from_weight(W, None, 4, init="qr"), "init='qr'"),
    "olora with niter": (lambda: PiSSA.from_weight(W, None, 4, init="olora", niter=2), "niter=2"),
    "vera r=0": (lambda: VeRA(W, None, randn(0, 24), randn(40, 0), randn(0), randn(40)), "r=0"),
    "vera_A narrow": (lambda: VeRA(W, None, randn(8, 20), randn(40, 8), randn(8), randn(40)), "vera_A"),
    "vera_B short": (lambda: VeRA(W, None, randn(8, 24), randn(30, 8), randn(8), randn(40)), "vera_B"),
    "vera_lambda_b": (lambda: VeRA(W, None, randn(8, 24), randn(40, 8), randn(8), randn(24)),
                      "vera_lambda_b"),
    "adalora r>min": (lambda: AdaLoRA(W, None, randn(25, 24), randn(25, 1), randn(40, 25), 8.0), "r=25"),
    "adalora_E": (lambda: AdaLoRA(W, None, randn(4, 24), randn(4), randn(40, 4), 8.0), "lora_E"),
    "randlora r>min": (lambda: RandLoRA(W, None, randn(25, 1, 24), randn(40, 1, 25), randn(25, 1),
                                        randn(1, 24), 1.0), "r=25"),
    "randlora_lambda": (lambda: RandLoRA(W, None, randn(5, 1, 24), randn(40, 5, 5), randn(5, 4),
                                         randn(5, 24), 1.0), "randlora_lambda"),
    "randlora_B": (lambda: RandLoRA(W, None, randn(5, 1, 24), randn(30, 5, 5), randn(5, 5),
                                    randn(5, 24), 1.0), "randlora_B"),
    "vblora vector_length": (lambda: VBLoRA(W, None, randn(16, 7), randn(4, 3, 16), randn(5, 4, 16), 2),
                             "vector_length=7"),
    "vblora topk>num_vectors": (lambda: VBLoRA(W, None, randn(16, 8), randn(4, 3, 16), randn(5, 4, 16), 17),
                                "topk=17"),
    "vblora topk=0": (lambda: VBLoRA(W, None, randn(16, 8), randn(4, 3, 16), randn(5, 4, 16), 0), "topk=0"),
    "vblora_logits_B": (lambda: VBLoRA(W, None, randn(16, 8), randn(4, 3, 16), randn(4, 4, 16), 2),
                        "vblora_logits_B"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise(case):
    build, match = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=match):
        build()


def test_from_peft_rejects_what_it_does_not_model():
    """DoRA (a LoRA variant) and lora_bias are refused by name, not silently dropped."""
    dora = layer_of(peft_model(LoraConfig(target_modules=["0"], r=4, use_dora=True), 24, 40))
    with pytest.raises(ValueError, match="adapter_name='default'.*DoraLinearVariant"):
        LoRA.from_peft(dora)
    biased = layer_of(peft_model(LoraConfig(target_modules=["0"], r=4, lora_bias=True), 24, 40))
    with pytest.raises(ValueError, match="lora_bias"):
        LoRA.from_peft(biased)


def test_rank_above_min_is_allowed_for_vera():
    """VeRA's paper uses r > d (shared projections): r=32 on a 24-wide layer matches PEFT."""
    layer = layer_of(peft_model(VeraConfig(target_modules=["0"], r=32), 24, 40))
    randomize_(layer, names=["vera_lambda"], scale=0.5)
    ref = VeRA.from_peft(layer)
    x = randn(3, 5, 24)
    with torch.no_grad():
        assert_rel_close(ref(x), layer(x), name="vera r>d forward")
    assert ref.r == 32
