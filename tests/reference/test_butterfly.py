"""Butterfly-family references (BOFT, GOFT, HRA, ETHER, RoAd): float64 parity with PEFT 0.21
where PEFT has the method, and the algebra each method promises (orthogonality, identity at
init, merged weight == activation-space forward, butterfly structure, input validation)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import peft
from peft.tuners.boft import layer as peft_boft_layer
from peft.tuners.road.layer import _get_delta_weight as peft_road_rotation

from fastadapt.numerics import assert_rel_close
from fastadapt.reference.butterfly import BOFT, ETHER, GOFT, HRA, REFERENCES, RoAd, butterfly_permutation, givens_pairs
from fastadapt.testing import linear_model, noncontig, randn, randomize_

F64 = torch.float64


def peft_layer(model, config):
    """PEFT model over ``model`` adapting Linear "0", and its tuner layer."""
    peft_model = peft.get_peft_model(model, config)
    return peft_model, peft_model.base_model.model[0]


def peft_merged_linear(peft_model):
    """Weight and bias of Linear "0" after PEFT's own merge (on a copy)."""
    merged = copy.deepcopy(peft_model).merge_and_unload()[0]
    return merged.weight.detach(), None if merged.bias is None else merged.bias.detach()


def assert_orthogonal(q, name):
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    assert_rel_close(q.T @ q, eye, name=f"{name}^T {name}")
    assert_rel_close(q @ q.T, eye, name=f"{name} {name}^T")


def assert_parity(ref, peft_model, x, name):
    """Reference forward and merged weight equal PEFT's layer forward and PEFT's merge."""
    with torch.no_grad():
        expected = peft_model(x)
        assert_rel_close(ref(x), expected, name=f"{name} forward")
        weight, bias = peft_merged_linear(peft_model)
        assert_rel_close(ref.merged_weight(), weight, name=f"{name} merged weight")
        if bias is not None:
            ref_bias = ref.merged_bias() if hasattr(ref, "merged_bias") else ref.bias
            assert_rel_close(ref_bias, bias, name=f"{name} merged bias")


@pytest.fixture
def no_fbd_extension(monkeypatch):
    """PEFT's BOFT without its CUDA block-diagonal extension (what every CPU run gets), without
    PEFT first trying (and failing) to compile it."""
    monkeypatch.setattr(peft_boft_layer, "get_fbd_cuda", lambda: None)


class _DenseBlockDiag:
    """Stand-in for PEFT's CUDA ``fbd_cuda`` extension: (N, D, b, b) -> (N, D b, D b) block
    diagonal, built with torch.block_diag.  With it PEFT keeps ``boft_n_butterfly_factor > 1``."""

    @staticmethod
    def forward(blocks):
        return (torch.stack([torch.block_diag(*factor) for factor in blocks]),)


@pytest.fixture
def dense_fbd_extension(monkeypatch):
    monkeypatch.setattr(peft_boft_layer, "get_fbd_cuda", lambda: _DenseBlockDiag)


# ---------------------------------------------------------------------------------------- BOFT

@pytest.mark.parametrize("d_in,d_out,block_size,bias", [(12, 7, 4, True), (15, 9, 5, False)])
def test_boft_matches_peft_m1(no_fbd_extension, d_in, d_out, block_size, bias):
    model = linear_model(d_in, d_out, bias=bias)
    peft_model, layer = peft_layer(model, peft.BOFTConfig(target_modules=["0"], boft_block_size=block_size))
    randomize_(layer, names=["boft_R"], scale=0.3)
    randomize_(layer, names=["boft_s"], scale=0.2)
    ref = BOFT.from_peft(layer)
    assert ref.n_butterfly_factor == 1
    assert_parity(ref, peft_model, randn(3, 5, d_in), "BOFT m=1")
    # The dense rotation is PEFT's butterfly_oft_mat.
    rotation, _ = layer.get_delta_weight("default")
    assert_rel_close(ref.rotation(), rotation, name="BOFT rotation")
    assert_orthogonal(ref.rotation(), "R")


@pytest.mark.parametrize("d_in,block_size,m", [(16, 2, 3), (24, 4, 2), (16, 2, 4)])
def test_boft_butterfly_factors_match_peft_extension_path(dense_fbd_extension, d_in, block_size, m):
    """m > 1 through PEFT's own permutation and product code, its CUDA block-diagonal kernel
    replaced by a dense torch stand-in."""
    model = linear_model(d_in, 11)
    peft_model, layer = peft_layer(model, peft.BOFTConfig(target_modules=["0"], boft_block_size=block_size,
                                                          boft_n_butterfly_factor=m))
    assert layer.boft_R["default"].shape[0] == m
    randomize_(layer, names=["boft_R"], scale=0.3)
    randomize_(layer, names=["boft_s"], scale=0.2)
    ref = BOFT.from_peft(layer)
    assert_parity(ref, peft_model, randn(4, d_in), f"BOFT m={m}")
    blocks = layer.cayley_batch(layer.boft_R["default"].detach().flatten(0, 1)).unflatten(0, (m, -1))
    for i, factor in enumerate(ref.factors()):
        perm = layer.boft_P[i].to(F64)
        assert_rel_close(factor, perm @ torch.block_diag(*blocks[i]) @ perm.T, name=f"M_{i}")
        assert_orthogonal(factor, f"M_{i}")
    assert_orthogonal(ref.rotation(), "R")


def test_boft_butterfly_structure():
    """m factors of b x b blocks couple exactly the features inside spans of b 2^(m-1): R is
    block diagonal with that span, and dense inside each span."""
    d_in, b, m = 24, 2, 3
    ref = BOFT(randn(5, d_in), block_size=b, n_butterfly_factor=m, boft_R=randn(m, d_in // b, b, b, scale=0.5))
    span = b * 2 ** (m - 1)
    rotation = ref.rotation()
    same_span = (torch.arange(d_in)[:, None] // span) == (torch.arange(d_in)[None, :] // span)
    assert torch.all(rotation[~same_span] == 0)
    assert torch.all(rotation[same_span].abs() > 1e-12)
    # Each factor couples every feature with exactly b features (one block after permutation).
    for factor in ref.factors():
        assert torch.all((factor.abs() > 1e-14).sum(dim=1) == b)


def test_boft_permutations_equal_peft():
    """butterfly_permutation reproduces PEFT's boft_P buffers index for index."""
    for n, b, m in [(16, 2, 4), (24, 4, 2), (32, 4, 3)]:
        n_blocks = n // b
        for i in range(m):
            perm = peft_boft_layer.BOFTLayer.block_butterfly_perm(None, n, n_blocks // 2 ** i, b // 2, m - 1)
            assert torch.equal(butterfly_permutation(n, b, i), perm), (n, b, m, i)


def test_boft_identity_at_init():
    w = randn(7, 16)
    ref = BOFT(w, block_size=4, n_butterfly_factor=2)
    assert torch.equal(ref.rotation(), torch.eye(16, dtype=F64))
    assert torch.equal(ref.merged_weight(), w)


# ---------------------------------------------------------------------------------------- HRA

@pytest.mark.filterwarnings("ignore:The symmetric initialization can NOT be performed")  # PEFT, odd r
@pytest.mark.parametrize("apply_GS", [False, True])
@pytest.mark.parametrize("r,bias", [(4, True), (3, False)])
def test_hra_matches_peft(apply_GS, r, bias):
    d_in, d_out = 13, 6
    model = linear_model(d_in, d_out, bias=bias)
    peft_model, layer = peft_layer(model, peft.HRAConfig(target_modules=["0"], r=r, apply_GS=apply_GS))
    randomize_(layer, names=["hra_u"])   # break PEFT's pairwise-identity init
    ref = HRA.from_peft(layer)
    assert_parity(ref, peft_model, randn(2, 3, d_in), f"HRA GS={apply_GS}")
    assert_rel_close(ref.rotation(), layer.get_delta_weight("default"), name="HRA H")
    assert_orthogonal(ref.rotation(), "H")


def test_hra_identity_at_init():
    # PEFT's own init (paired columns) and this reference's default init are the identity.
    model = linear_model(10, 4)
    _, layer = peft_layer(model, peft.HRAConfig(target_modules=["0"], r=6))
    eye = torch.eye(10, dtype=F64)
    assert_rel_close(HRA.from_peft(layer).rotation(), eye, name="PEFT init H")
    assert_rel_close(HRA(randn(4, 10), r=6).rotation(), eye, name="default init H")


def test_hra_gram_schmidt_is_product_of_orthonormal_reflections():
    ref = HRA(randn(4, 9), r=5, apply_GS=True, hra_u=randn(9, 5))
    q = ref.orthonormal_directions()
    assert_rel_close(q.T @ q, torch.eye(5, dtype=F64), name="Q^T Q")
    product = torch.eye(9, dtype=F64)
    for i in range(5):
        product = product @ (torch.eye(9, dtype=F64) - 2 * torch.outer(q[:, i], q[:, i]))
    assert_rel_close(ref.rotation(), product, name="I - 2QQ^T")


# ---------------------------------------------------------------------------------------- RoAd

@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
@pytest.mark.parametrize("d_out,group_size", [(12, 4), (10, 10)])
def test_road_matches_peft(variant, d_out, group_size):
    d_in = 7
    model = linear_model(d_in, d_out)
    peft_model, layer = peft_layer(model, peft.RoadConfig(target_modules=["0"], variant=variant,
                                                          group_size=group_size))
    randomize_(layer, names=["road_theta"], scale=0.7)
    randomize_(layer, names=["road_alpha"], scale=0.3)   # alpha = 1 + noise
    with torch.no_grad():
        layer.road_alpha["default"].add_(1.0)
    ref = RoAd.from_peft(layer)
    assert_parity(ref, peft_model, randn(3, 2, d_in), f"RoAd {variant}")
    assert_rel_close(ref.rotation(), peft_road_rotation(variant, group_size, layer.road_theta["default"].detach(),
                                                       layer.road_alpha["default"].detach()), name="RoAd R")


def test_road_1_unit_alpha_is_rotation_and_init_is_identity():
    w, b = randn(12, 5), randn(12)
    ref = RoAd(w, b, variant="road_1", group_size=6, road_theta=randn(6))
    assert_orthogonal(ref.rotation(), "R")
    assert_rel_close(torch.linalg.det(ref.rotation()), torch.tensor(1.0, dtype=F64), name="det R")
    init = RoAd(w, b, variant="road_4", group_size=4)
    assert torch.equal(init.rotation(), torch.eye(12, dtype=F64))


# ---------------------------------------------------------------------------------------- GOFT

def test_goft_rotation_is_product_of_givens_butterfly():
    d, block = 24, 8    # three independent butterflies of log2(8) = 3 stages
    ref = GOFT(randn(5, d), block_size=block, goft_theta=randn(3, d // 2))
    expected = torch.eye(d, dtype=F64)
    for k in range(3):
        stage = torch.eye(d, dtype=F64)
        pair = 0
        for i in range(d):
            j = i ^ (1 << k)                  # partner: flip bit k of the index within the block
            if j > i:
                c, s = torch.cos(ref.goft_theta[k, pair]), torch.sin(ref.goft_theta[k, pair])
                givens = torch.eye(d, dtype=F64)
                givens[i, i], givens[j, j], givens[j, i], givens[i, j] = c, c, s, -s
                stage = givens @ stage
                pair += 1
        assert_orthogonal(ref.stage(k), f"G_{k}")
        assert_rel_close(ref.stage(k), stage, name=f"G_{k}")
        expected = stage @ expected
    assert_rel_close(ref.rotation(), expected, name="R")
    assert_orthogonal(ref.rotation(), "R")
    # log2(block) stages reach every pair inside a block, nothing outside it.
    same_block = (torch.arange(d)[:, None] // block) == (torch.arange(d)[None, :] // block)
    assert torch.all(ref.rotation()[~same_block] == 0)
    assert torch.all(ref.rotation()[same_block].abs() > 1e-12)


def test_goft_pairs_are_disjoint_and_identity_at_init():
    for k in range(4):
        i, j = givens_pairs(16, 32, k)
        assert len(i) == 16 and torch.equal(torch.sort(torch.cat([i, j])).values, torch.arange(32))
    w = randn(3, 16)
    assert torch.equal(GOFT(w).merged_weight(), w)


# ---------------------------------------------------------------------------------------- ETHER

def test_ether_reflection_properties():
    ref = ETHER(randn(6, 12), n_blocks=3, ether_u=randn(3, 4))
    h = ref.rotation()
    assert_orthogonal(h, "H")
    assert_rel_close(h, h.T, name="H symmetric")
    assert_rel_close(h @ h, torch.eye(12, dtype=F64), name="H^2")
    assert_rel_close(torch.linalg.det(h), torch.tensor(-1.0, dtype=F64), name="det H")  # (-1)^3
    assert torch.all(h.reshape(3, 4, 3, 4)[0, :, 1:] == 0)  # block diagonal


def test_ether_plus_identity_at_init_and_rank_two_perturbation():
    w = randn(8, 12)
    init = ETHER(w, n_blocks=4, plus=True)
    assert_rel_close(init.merged_weight(), w, name="ETHER+ init W'")
    ref = ETHER(w, n_blocks=4, plus=True, ether_u=randn(4, 3), ether_v=randn(4, 3),
                ether_u_out=randn(4, 2), ether_v_out=randn(4, 2))
    blocks = (ref.rotation() - torch.eye(12, dtype=F64)).reshape(4, 3, 4, 3).diagonal(dim1=0, dim2=2)
    assert all(torch.linalg.matrix_rank(blocks[..., k]) == 2 for k in range(4))
    assert torch.linalg.matrix_rank(ref.rotation() - torch.eye(12, dtype=F64)) == 8


# ---------------------------------------------------------------------- every class: merged == forward

@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_forward_equals_merged_weight(name):
    ref = REFERENCES[name].demo()
    assert ref.weight.dtype == F64
    x = noncontig(randn(3, 5, ref.in_features))
    bias = ref.merged_bias() if hasattr(ref, "merged_bias") else ref.bias
    expected = F.linear(x, ref.weight + ref.delta_weight(), bias)
    assert_rel_close(ref(x), expected, name=f"{name} forward vs merged")
    assert ref.delta_weight().abs().max() > 1e-3   # the demo is not the identity


# ---------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("make,parameter", [
    (lambda w: BOFT(w, block_size=5), "block_size"),
    (lambda w: BOFT(w, block_size=4, n_butterfly_factor=4), "n_butterfly_factor"),
    (lambda w: BOFT(randn(6, 18), block_size=3, n_butterfly_factor=2), "block_size"),
    (lambda w: GOFT(w, block_size=6), "block_size"),
    (lambda w: GOFT(randn(6, 15)), "in_features"),
    (lambda w: HRA(w, r=0), "r"),
    (lambda w: HRA(w, r=13, apply_GS=True, hra_u=randn(12, 13)), "r"),
    (lambda w: HRA(w, r=3), "r"),
    (lambda w: HRA(w, r=2, hra_u=randn(11, 2)), "hra_u"),
    (lambda w: ETHER(w, n_blocks=5), "n_blocks"),
    (lambda w: ETHER(w, n_blocks=4, plus=True), "n_blocks"),
    (lambda w: RoAd(w, group_size=3), "group_size"),
    (lambda w: RoAd(w, group_size=4), "group_size"),
    (lambda w: RoAd(w, variant="road_3", group_size=2), "variant"),
])
def test_bad_configuration_names_parameter(make, parameter):
    w = randn(6, 12)   # out_features=6, in_features=12
    with pytest.raises(ValueError, match=parameter):
        make(w)
