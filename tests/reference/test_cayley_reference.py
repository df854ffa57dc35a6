"""Cayley-family references (float64) against PEFT's OFT and PSOFT layers and their own algebra."""
import pytest
import torch
from peft import OFTConfig, PsoftConfig, get_peft_model

from fastadapt.numerics import assert_rel_close
from fastadapt.reference import cayley as ref
from fastadapt.testing import linear_model, randn, randomize_

F64 = torch.float64


def peft_oft(d_in, d_out, block_size, *, neumann, block_share=False, terms=5, scale=0.1):
    config = OFTConfig(oft_block_size=block_size, r=0, target_modules=["0"], use_cayley_neumann=neumann,
                       num_cayley_neumann_terms=terms, block_share=block_share)
    model = get_peft_model(linear_model(d_in, d_out, dtype=F64), config)
    randomize_(model, scale=scale, names=["oft_R"])
    return model, model.base_model.model[0]


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("neumann", [True, False])
@pytest.mark.parametrize("block_share", [False, True])
def test_oft_reference_equals_peft(block_size, neumann, block_share):
    d_in, d_out = 4 * block_size, 37
    model, layer = peft_oft(d_in, d_out, block_size, neumann=neumann, block_share=block_share)
    x = randn(3, 5, d_in)
    expected = model(x)
    for cls in (ref.OFTReference, ref.OFTv2Reference):
        reference = cls.from_peft(layer)
        assert_rel_close(reference(x), expected, name=f"{cls.__name__} output")
    merged = layer.get_base_layer().weight @ layer.get_delta_weight("default").T
    assert_rel_close(reference.merged_weight(), merged, name="merged weight")


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 6])
def test_oft_neumann_term_counts_equal_peft(terms):
    model, layer = peft_oft(24, 10, 8, neumann=True, terms=terms)
    x = randn(7, 24)
    assert_rel_close(ref.OFTReference.from_peft(layer)(x), model(x), name=f"terms={terms}")


def test_peft_cayley_conventions_are_transposes():
    Q = ref.skew(randn(5, ref.packed_size(8), scale=0.05), 8)
    R = ref.cayley(Q)
    assert_rel_close(ref.cayley(-Q), R.transpose(-2, -1), name="cayley(-Q) = cayley(Q)^T")
    assert ref.orthogonality_error(R) < 1e-12
    # The Neumann series converges to the exact map as terms grow (|Q| small).
    assert_rel_close(ref.neumann(Q, 40), R, name="neumann(40)")
    assert ref.orthogonality_error(ref.neumann(Q, 5)) > 1e-10  # truncation is not exactly orthogonal


@pytest.mark.parametrize("neumann", [False, True])
@pytest.mark.parametrize("mags", [False, True])
def test_psoft_reference_equals_peft(neumann, mags):
    config = PsoftConfig(r=6, target_modules=["0"], psoft_alpha=12, use_cayley_neumann=neumann,
                         psoft_mag_a=mags, psoft_mag_b=mags, init_weights=False,
                         cayley_neumann_eps=0.5 if neumann else None)
    # PEFT builds A, B by SVD only in fp32/fp16/bf16: build in fp32, then move everything to float64
    model = get_peft_model(linear_model(20, 17, dtype=torch.float32), config).to(F64)
    randomize_(model, scale=0.3, names=["psoft_R.default.weight"])
    if mags:
        randomize_(model, scale=0.2, names=["vector_"])
    layer = model.base_model.model[0]
    x = randn(4, 3, 20)
    reference = ref.PSOFTReference.from_peft(layer)
    assert_rel_close(reference(x), model(x), name="psoft output")
    assert_rel_close(reference.delta_weight(), layer.get_delta_weight("default"), name="psoft delta")


@pytest.mark.parametrize("cls", [ref.OFTReference, ref.OFTv2Reference, ref.PSOFTReference,
                                 ref.SSVDReference, ref.AntiPaSTOReference])
def test_forward_equals_merged_weight(cls):
    reference = cls.demo()
    with torch.no_grad():  # demo parameters are small; make the rotation substantial
        reference.packed.mul_(5)
    x = randn(6, reference.in_features)
    dense = torch.nn.functional.linear(x, reference.merged_weight(), reference.bias)
    assert_rel_close(reference(x), dense, name=cls.__name__)


def test_ssvd_at_zero_is_frozen_and_rotation_only_changes_singular_subspace():
    reference = ref.SSVDReference.demo()
    x = randn(5, reference.in_features)
    assert_rel_close(reference(x, alpha=0.0), reference.base(x), name="alpha=0")
    with torch.no_grad():
        reference.delta_s.zero_()
    # with delta_s = 0, W' keeps W's singular values (U, V orthonormal, R orthogonal)
    assert_rel_close(torch.linalg.svdvals(reference.merged_weight()), torch.linalg.svdvals(reference.weight),
                     name="singular values")


def test_antipasto_negative_alpha_inverts_rotation_and_per_sample_alpha():
    reference = ref.AntiPaSTOReference.demo()
    R_plus, R_minus = reference.rotation(0.7), reference.rotation(-0.7)
    assert_rel_close(R_minus @ R_plus, torch.eye(reference.r, dtype=F64), name="R(-a) R(a)")
    x = randn(3, 4, reference.in_features)
    alpha = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    per_sample = reference(x, alpha)
    for i in range(3):
        assert_rel_close(per_sample[i], reference(x[i], float(alpha[i])), name=f"sample {i}")


def test_bad_block_size_names_parameter_and_divisors():
    W = randn(8, 30)
    with pytest.raises(ValueError, match=r"oft_block_size=8 .*\[6, 10\]"):
        ref.OFTReference(W, None, randn(3, ref.packed_size(8)), 8)
    with pytest.raises(ValueError, match="r=9"):
        ref.SSVDReference(W, None, randn(ref.packed_size(9)), randn(9), r=9)
