"""Hadamard/Kronecker references (LoHa, LoKr) against PEFT 0.21 in float64.

Each PEFT test builds an nn.Sequential, adapts layer "0", overwrites every adapter parameter
with random values (PEFT zero-initialises one factor), and checks the reference's forward,
delta weight and every parameter gradient against PEFT's layer (1e-10).
"""
import pytest
import torch
from peft import LoHaConfig, LoKrConfig
from peft.tuners.lokr.layer import factorization as peft_factorization

from fastadapt.numerics import assert_rel_close, rel_error
from fastadapt.reference.hadamard import LoHa, LoKr, lokr_factorization
from fastadapt.testing import ODD_SHAPES, assert_forward_is_merged, assert_matches_peft, linear_model, peft_layer, randn

LEADING = [shape[:2] for shape in ODD_SHAPES[:2]]   # (9, 41) and (1, 7)


# --- LoHa -------------------------------------------------------------------------------------
# alpha / r is exact in float32 here: PEFT rounds the LoHa scale to float32 (see the test below)
@pytest.mark.parametrize("d_in,d_out,r,alpha", [(11, 13, 3, 6.0), (17, 5, 2, 3.0), (7, 7, 7, 5.25)])
@pytest.mark.parametrize("leading", LEADING)
def test_loha_matches_peft(d_in, d_out, r, alpha, leading):
    layer = peft_layer(LoHaConfig(target_modules=["0"], r=r, alpha=alpha), d_in, d_out, ["hada_"])
    ref = LoHa.from_peft(layer)
    assert ref.scaling == alpha / r
    assert_matches_peft(ref, layer, leading)
    assert_rel_close(ref.delta_weight(), layer.get_delta_weight("default"), name="delta weight")
    assert_forward_is_merged(ref)


def test_loha_peft_rounds_scale_to_float32():
    """PEFT 0.21 passes ``torch.tensor(alpha / r)`` (float32) as the LoHa scale, so a float64
    delta carries a ~1e-8 relative error when alpha / r is not a float32 number.  The reference
    keeps the exact alpha / r; this pins the difference to exactly that rounding."""
    layer = peft_layer(LoHaConfig(target_modules=["0"], r=3, alpha=5), 11, 13, ["hada_"])
    ref = LoHa.from_peft(layer)
    peft_delta = layer.get_delta_weight("default")
    assert rel_error(ref.delta_weight(), peft_delta) > 1e-9
    rounded = torch.tensor(5 / 3, dtype=torch.float32).item()
    assert_rel_close(ref.delta_weight() * (rounded / ref.scaling), peft_delta, name="delta, fp32 scale")


def test_loha_identity_at_init_khatri_rao_and_errors():
    base = linear_model(10, 6)[0]
    ref = LoHa(base.weight, base.bias, 3, 3.0, generator=torch.Generator().manual_seed(1))
    assert ref.hada_w2_b.abs().sum() == 0 and ref.hada_w1_a.abs().sum() > 0
    x = randn(4, 10)
    assert_rel_close(ref(x), base(x), name="identity")
    demo = LoHa.demo()
    a, b = demo.khatri_rao_factors()
    assert a.shape == (demo.out_features, demo.r ** 2) and b.shape == (demo.r ** 2, demo.in_features)
    assert_rel_close(a @ b * demo.scaling, demo.delta_weight(), name="Khatri-Rao factors")
    assert_forward_is_merged(demo)
    with pytest.raises(ValueError, match="r=0"):
        LoHa(base.weight, None, 0, 1.0)
    with pytest.raises(ValueError, match=r"r=7 exceeds min\(in_features, out_features\)=6; choose r in 1..6"):
        LoHa(base.weight, None, 7, 1.0)
    with pytest.raises(ValueError, match=r"hada_w1_b has shape \(3, 6\); expected \(3, 10\)"):
        LoHa(base.weight, None, 3, 1.0, hada_w1_b=randn(3, 6))


# --- LoKr -------------------------------------------------------------------------------------
LOKR_CASES = [
    # (d_in, d_out, config kwargs): together they cover every layout PEFT picks for Linear
    (12, 10, dict(r=2)),                                           # w1 whole, w2 factored
    (15, 21, dict(r=1, decompose_both=True)),                      # both factored
    (7, 9, dict(r=3)),                                             # prime in_features -> (1, 7)
    (24, 16, dict(r=2, decompose_factor=4, decompose_both=True)),  # factor divides both
    (12, 18, dict(r=8, decompose_factor=5)),                       # factor divides neither; w2 whole
    (20, 14, dict(r=1, decompose_factor=2)),
    (16, 8, dict(r=2, decompose_both=True)),                       # r == max/2 on both sides: whole
]


@pytest.mark.parametrize("d_in,d_out,kwargs", LOKR_CASES, ids=lambda v: str(v))
def test_lokr_matches_peft(d_in, d_out, kwargs):
    layer = peft_layer(LoKrConfig(target_modules=["0"], alpha=3.0, **kwargs), d_in, d_out, ["lokr_"])
    peft_shapes = {name: tuple(getattr(layer, name)["default"].shape)
                   for name in LoKr.FACTORS if "default" in getattr(layer, name)}
    r = kwargs["r"]
    layout_kwargs = {k: v for k, v in kwargs.items() if k != "r"}
    assert LoKr.layout(d_in, d_out, r, **layout_kwargs) == peft_shapes
    ref = LoKr.from_peft(layer)
    assert ref.scaling == 3.0 / r
    assert_matches_peft(ref, layer, LEADING[0])
    assert_rel_close(ref.delta_weight(), layer.get_delta_weight("default"), name="delta weight")
    assert_forward_is_merged(ref)


def test_lokr_factorization_equals_peft():
    for dimension in range(1, 97):
        for factor in [-1, *range(1, 13)]:
            assert lokr_factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)
    assert lokr_factorization(128) == (8, 16) and lokr_factorization(127) == (1, 127)


@pytest.mark.parametrize("init_weights", [True, "lycoris", False])
def test_lokr_init_and_merge(init_weights):
    base = linear_model(12, 10)[0]
    g = torch.Generator().manual_seed(2)
    ref = LoKr.from_config(base.weight, base.bias, 2, 4.0, decompose_both=True, init_weights=init_weights,
                           generator=g)
    x = randn(5, 12)
    err = rel_error(ref(x), base(x))
    if init_weights is False:
        assert err > 1e-3, "random init should change the layer"
    else:
        assert err == 0.0, f"init_weights={init_weights!r} should start as the identity"
    assert_forward_is_merged(ref)
    assert_forward_is_merged(LoKr.demo())


def test_lokr_errors():
    w = randn(10, 12)
    with pytest.raises(ValueError, match="r=0"):
        LoKr.from_config(w, None, 0, 1.0)
    with pytest.raises(ValueError, match=r"r=11 exceeds min\(in_features, out_features\)=10"):
        LoKr.from_config(w, None, 11, 1.0)
    with pytest.raises(ValueError, match=r"decompose_factor=0 must be -1 .* or a positive integer"):
        LoKr.from_config(w, None, 2, 1.0, decompose_factor=0)
    with pytest.raises(ValueError, match="r=0"):
        LoKr(w, None, 0, 1.0, lokr_w1=randn(2, 3), lokr_w2=randn(5, 4))
    with pytest.raises(ValueError, match=r"kron\(w1 \(2, 4\), w2 \(5, 4\)\) has shape \(10, 16\)"
                                         r".*w1 \(2, 3\) and w2 \(5, 4\)"):
        LoKr(w, None, 2, 1.0, lokr_w1=randn(2, 4), lokr_w2=randn(5, 4))
    with pytest.raises(ValueError, match="give either lokr_w2 or both lokr_w2_a and lokr_w2_b"):
        LoKr(w, None, 2, 1.0, lokr_w1=randn(2, 3), lokr_w2_a=randn(5, 2))
    with pytest.raises(ValueError, match=r"lokr_w2_a has shape \(5, 3\); expected \(5, 2\)"):
        LoKr(w, None, 2, 1.0, lokr_w1=randn(2, 3), lokr_w2_a=randn(5, 3), lokr_w2_b=randn(3, 4))
