"""Structured references (MiSS, SHiRA, IA3, SVFT) against PEFT 0.21 in float64.

Each PEFT test builds an nn.Sequential, adapts layer "0", overwrites the adapter's
(zero- or one-initialised) parameters with random values, and checks the reference's
forward, delta weight and every parameter gradient against PEFT's layer (1e-10).
"""
import pytest
import torch
from peft import IA3Config, MissConfig, ShiraConfig

from fastadapt.numerics import assert_rel_close
from fastadapt.reference.structured import IA3, SHiRA, SVFT, MiSS, shira_random_indices, svft_pattern
from fastadapt.testing import ODD_SHAPES, assert_forward_is_merged, assert_matches_peft, linear_model, peft_layer, randn

LEADING = [shape[:2] for shape in ODD_SHAPES[:2]]   # (9, 41) and (1, 7)


# --- MiSS -------------------------------------------------------------------------------------
MISS_CASES = [
    # (config kwargs, d_in, d_out)
    (dict(r=4), 11, 13),                              # in % r != 0: PEFT pads x
    (dict(r=5), 15, 3),                               # r > out_features is allowed
    (dict(r=3, init_weights=False), 12, 7),           # random init, same "default" math
    (dict(r=3, init_weights="mini", mini_r=3), 11, 9),
    (dict(r=3, init_weights="bat"), 12, 9),           # Bone's block-affine mode
]


@pytest.mark.parametrize("kwargs,d_in,d_out", MISS_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("leading", LEADING)
def test_miss_matches_peft(kwargs, d_in, d_out, leading):
    layer = peft_layer(MissConfig(target_modules=["0"], **kwargs), d_in, d_out, ["miss_block"])
    ref = MiSS.from_peft(layer)
    init = kwargs.get("init_weights", True)
    assert ref.mode == (init if init in ("bat", "mini") else "default")
    assert_matches_peft(ref, layer, leading)
    weight = layer.get_base_layer().weight.detach().clone()
    if ref.mode == "bat":
        peft_delta = layer.get_delta_weight("default", weight)
    else:   # PEFT returns W + delta (and writes into its argument when in % r != 0)
        peft_delta = layer.get_delta_weight_miss("default", weight.clone()) - weight
    assert_rel_close(ref.delta_weight(), peft_delta, name="delta weight")
    assert_forward_is_merged(ref)


@pytest.mark.parametrize("mode", MiSS.MODES)
def test_miss_identity_at_peft_init(mode):
    d_in, d_out = 12, 9
    kwargs = dict(r=3, mini_r=3 if mode == "mini" else None, mode=mode)
    base = linear_model(d_in, d_out)[0]
    ref = MiSS(base.weight, base.bias, **kwargs)
    assert ref.miss_block.abs().sum() == 0
    x = randn(4, d_in)
    assert_rel_close(ref(x), base(x), name="identity")
    assert_forward_is_merged(MiSS.demo(mode))


def test_miss_errors():
    w = randn(9, 12)
    with pytest.raises(ValueError, match="r=0"):
        MiSS(w, None, 0)
    with pytest.raises(ValueError, match=r"r=13 exceeds in_features=12; choose r in 1..12"):
        MiSS(w, None, 13)
    with pytest.raises(ValueError, match=r"r=4 does not divide gcd\(in_features, out_features\)=3; "
                                         r"nearest valid r: \[1, 3\]"):
        MiSS(w, None, 4, mode="bat")
    with pytest.raises(ValueError, match=r"mini_r=4 does not divide out_features=9"):
        MiSS(w, None, 3, mode="mini", mini_r=4)
    with pytest.raises(ValueError, match="mini_r is required"):
        MiSS(w, None, 3, mode="mini")
    with pytest.raises(ValueError, match="mode='bone'"):
        MiSS(w, None, 3, mode="bone")
    with pytest.raises(ValueError, match=r"miss_block has shape \(9, 3\); expected \(3, 9\)"):
        MiSS(w, None, 3, miss_block=randn(9, 3))


# --- SHiRA ------------------------------------------------------------------------------------
@pytest.mark.parametrize("d_in,d_out,r,seed", [(11, 13, 2, 5), (17, 6, 1, None), (7, 9, 3, 0)])
def test_shira_matches_peft(d_in, d_out, r, seed):
    layer = peft_layer(ShiraConfig(target_modules=["0"], r=r, random_seed=seed), d_in, d_out, ["shira_weight"])
    layer.set_scale("default", 0.7)
    ref = SHiRA.from_peft(layer)
    assert ref.scaling == 0.7
    assert_matches_peft(ref, layer, LEADING[0])
    peft_delta = layer.get_delta_weight("default").to_dense()
    assert_rel_close(ref.delta_weight(), peft_delta, name="delta weight")
    # the reference draws PEFT's default random mask itself, position for position
    fresh = SHiRA(ref.weight, ref.bias, r, random_seed=seed)
    assert torch.equal(fresh.shira_indices, shira_random_indices(d_out, d_in, r, seed))
    assert torch.equal(fresh.shira_indices, layer.shira_indices["default"].long())
    assert_forward_is_merged(ref)


def test_shira_identity_at_init_and_repeated_positions():
    base = linear_model(10, 8)[0]
    ref = SHiRA(base.weight, base.bias, 2)
    x = randn(5, 10)
    assert_rel_close(ref(x), base(x), name="identity")
    # repeated positions add up (as torch.sparse_coo_tensor does in PEFT)
    k = 2 * (10 + 8)
    indices = torch.zeros(2, k, dtype=torch.long)
    indices[:, 1::2] = torch.tensor([[3], [4]])
    values = randn(k)
    dup = SHiRA(base.weight, None, 2, shira_indices=indices, shira_weight=values)
    expected = torch.zeros(8, 10, dtype=torch.float64)
    expected[0, 0], expected[3, 4] = values[0::2].sum(), values[1::2].sum()
    assert_rel_close(dup.delta_weight(), expected, name="summed duplicates")
    assert_forward_is_merged(dup)


def test_shira_errors():
    w = randn(6, 5)   # at most 30 // 11 = 2
    with pytest.raises(ValueError, match="r=0"):
        SHiRA(w, None, 0)
    with pytest.raises(ValueError, match=r"r=3 asks for .* choose r in 1..2"):
        SHiRA(w, None, 3)
    with pytest.raises(ValueError, match="shira_indices must hold rows in 0..5"):
        SHiRA(w, None, 1, shira_indices=torch.full((2, 11), 6))
    with pytest.raises(ValueError, match=r"shira_indices has shape \(2, 10\)"):
        SHiRA(w, None, 1, shira_indices=torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(TypeError, match="shira_indices must be an integer"):
        SHiRA(w, None, 1, shira_indices=torch.zeros(2, 11))


# --- IA3 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("is_feedforward", [True, False], ids=["feedforward", "output"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_ia3_matches_peft_forward_and_merge(is_feedforward, bias):
    d_in, d_out = 13, 10
    config = IA3Config(target_modules=["0"], feedforward_modules=["0"] if is_feedforward else [])
    layer = peft_layer(config, d_in, d_out, ["ia3_l"], bias=bias)
    ref = IA3.from_peft(layer)
    assert ref.is_feedforward is is_feedforward
    assert_matches_peft(ref, layer, LEADING[1])
    assert_forward_is_merged(ref)
    # PEFT merges by scaling columns (feedforward) or rows and bias (output): same weights
    layer.merge()
    base = layer.get_base_layer()
    assert_rel_close(ref.merged_weight(), base.weight, name="merged weight")
    if bias:
        assert_rel_close(ref.merged_bias(), base.bias, name="merged bias")
        assert is_feedforward or not torch.allclose(ref.merged_bias(), ref.bias)


@pytest.mark.parametrize("is_feedforward", [True, False])
def test_ia3_identity_at_init_and_errors(is_feedforward):
    base = linear_model(7, 4)[0]
    ref = IA3(base.weight, base.bias, is_feedforward=is_feedforward)
    x = randn(3, 7)
    assert_rel_close(ref(x), base(x), name="identity")
    wrong = (4, 1) if is_feedforward else (1, 7)
    with pytest.raises(ValueError, match=r"ia3_l has shape"):
        IA3(base.weight, base.bias, is_feedforward=is_feedforward, ia3_l=randn(*wrong))
    with pytest.raises(TypeError, match="is_feedforward"):
        IA3(base.weight, base.bias, is_feedforward="yes")


# --- SVFT -------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern,off_diag", [("plain", 0), ("banded", 2), ("random", 1)])
@pytest.mark.parametrize("d_in,d_out,r", [(15, 11, None), (9, 14, 5)])
def test_svft_delta_forward_and_subspace(pattern, off_diag, d_in, d_out, r):
    base = linear_model(d_in, d_out)[0]
    probe = SVFT(base.weight, base.bias, r, pattern=pattern, off_diag=off_diag, seed=3)
    k = probe.svft_indices.shape[1]
    ref = SVFT(base.weight, base.bias, r, pattern=pattern, off_diag=off_diag, seed=3, svft_m=randn(k))
    rank = min(d_in, d_out) if r is None else r
    u, s, vh = ref.svft_u, ref.svft_s, ref.svft_vh
    # the frozen factors are W's top singular triplets
    assert_rel_close(u.T @ u, torch.eye(rank, dtype=torch.float64), name="U orthonormal")
    assert_rel_close(vh @ vh.T, torch.eye(rank, dtype=torch.float64), name="V orthonormal")
    assert_rel_close(u.T @ base.weight @ vh.T, torch.diag(s), name="U^T W V = S")
    # delta = U M V^T with M built independently as a coalesced sparse matrix
    m = torch.sparse_coo_tensor(ref.svft_indices, ref.svft_m.detach(), (rank, rank)).to_dense()
    assert_rel_close(ref.delta_weight(), u @ m @ vh, name="delta = U M V^T")
    assert_rel_close(u.T @ ref.delta_weight() @ vh.T, m, name="M recovered from delta")
    assert_forward_is_merged(ref)
    # at zero coefficients the adapter is the identity
    x = randn(4, d_in)
    assert_rel_close(probe(x), base(x), name="identity")


def test_svft_patterns():
    r = 6
    assert torch.equal(svft_pattern(r, "plain"), torch.arange(r).repeat(2, 1))
    banded = svft_pattern(r, "banded", 2)
    assert banded.shape[1] == r * 5 - 2 * 3
    assert ((banded[0] - banded[1]).abs() <= 2).all()
    rand = svft_pattern(r, "random", 2, seed=7)
    assert rand.shape == banded.shape
    assert len(set(map(tuple, rand.T.tolist()))) == rand.shape[1], "random positions repeat"
    assert torch.equal(rand, svft_pattern(r, "random", 2, seed=7))
    assert not torch.equal(rand, banded)


def test_svft_errors():
    w = randn(6, 9)
    with pytest.raises(ValueError, match="r=0"):
        SVFT(w, None, 0)
    with pytest.raises(ValueError, match=r"r=7 exceeds min\(in_features, out_features\)=6"):
        SVFT(w, None, 7)
    with pytest.raises(ValueError, match="pattern='topk'"):
        SVFT(w, None, 4, pattern="topk")
    with pytest.raises(ValueError, match=r"off_diag=4 must be an integer in 0..3"):
        SVFT(w, None, 4, pattern="banded", off_diag=4)
    with pytest.raises(ValueError, match="off_diag=1 needs pattern"):
        SVFT(w, None, 4, pattern="plain", off_diag=1)
    with pytest.raises(ValueError, match=r"svft_m has shape \(3,\); expected \(4,\)"):
        SVFT(w, None, 4, svft_m=randn(3))


def test_demos_forward_is_merged():
    for ref in (SHiRA.demo(), IA3.demo(), SVFT.demo(), SVFT.demo("random")):
        assert_forward_is_merged(ref)
    output_mode = IA3.demo(is_feedforward=False)
    assert_forward_is_merged(output_mode)
