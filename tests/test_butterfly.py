"""Butterfly family (BOFT, GOFT, HRA, ETHER, RoAd): ops (torch path, Triton in the interpreter),
layers, merge / unmerge, PEFT bridge parity (BOFT any m, HRA, RoAd), checkpoints, compile.

Every comparison is a relative Frobenius error against a float64 reference or PEFT's own layer,
within fastadapt.numerics' one tolerance table.  PEFT's BOFT with n_butterfly_factor > 1 runs its
own math with fastadapt's torch block-diagonal stand-in for its CUDA extension (installed per
test below, as fastadapt.keep_boft_butterfly_factors() does), which the reference tests check
against a dense one.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from peft import BOFTConfig, HRAConfig, PeftModel, RoadConfig, get_peft_model

import fastadapt
from fastadapt.bench import saved_activation_ratio
from fastadapt.layers import butterfly as layers
from fastadapt.numerics import assert_rel_close, rel_error
from fastadapt.ops import butterfly as ops
from fastadapt.reference import butterfly as ref
from fastadapt.testing import (DTYPES, assert_fused_equals_peft_under_autocast, linear_model, noncontig, randn,
                               randomize_)


@pytest.fixture(autouse=True)
def peft_keeps_butterfly_factors(monkeypatch):
    """PEFT builds BOFT with the configured n_butterfly_factor (its CUDA extension's stand-in)."""
    from peft.tuners.boft import layer as peft_boft_layer
    monkeypatch.setattr(peft_boft_layer, "get_fbd_cuda", lambda: layers.TorchBlockDiagonal)

F32, F64 = torch.float32, torch.float64


# ----------------------------------------------------------------------------- helpers


def _grads(fn, x, params, seed=7):
    """Output, dL/dx and dL/dparams for L = <y, fixed random cotangent>."""
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    cotangent = randn(*y.shape, dtype=y.dtype, device=y.device, seed=seed)
    return y.detach(), torch.autograd.grad(y, [x, *params], cotangent)


def _peft(config, d_in, d_out, names, *, dtype=F64, bias=True, scale=0.3, **kwargs):
    model = get_peft_model(linear_model(d_in, d_out, dtype=dtype, bias=bias), config, **kwargs)
    layer = model.base_model.model[0]
    randomize_(layer, names=names, scale=scale)
    return model, layer


def _compare_accelerated(model, x, *, scale=1.0, train=False):
    """PEFT's forward vs fastadapt.accelerate's: output, dx and every trainable parameter's gradient,
    each call from the same RNG state (BOFT's block dropout then draws the same blocks)."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.train(train)
    torch.manual_seed(3)
    expected, expected_grads = _grads(model, x, params)
    report = fastadapt.accelerate(model)
    try:
        torch.manual_seed(3)
        actual, actual_grads = _grads(model, x, params)
        assert report.fused_calls == 1 and not report.fallbacks, str(report)
    finally:
        fastadapt.revert(model)
    dtype = x.dtype
    assert_rel_close(actual, expected, dtype, scale=scale, name="output")
    for i, (a, e) in enumerate(zip(actual_grads, expected_grads)):
        assert_rel_close(a, e, dtype, scale=scale, name=f"gradient {i}")


# ----------------------------------------------------------------------------- geometry and bad input


@pytest.mark.parametrize("d,b,m", [(16, 2, 4), (24, 4, 2), (48, 6, 3), (12, 3, 1), (128, 2, 7), (64, 8, 3)])
def test_chain_plan_equals_dense_butterfly_product(d, b, m):
    """The passes (with the factors multiplied into c x c blocks, widened to >= 16 features)
    reproduce x R for the reference's dense R, for every grouping the width limit allows."""
    boft = ref.BOFT(randn(3, d), block_size=b, n_butterfly_factor=m, boft_R=randn(m, d // b, b, b, scale=0.3))
    blocks = ref.boft_cayley(boft.boft_R.detach())
    x = randn(5, d)
    for max_width in (b, 16, 64):
        chain = ops.plan(d, b, m, max_width=max_width)
        assert sorted(i for p in chain.passes for i in p.factors) == list(range(m))
        pass_b = ops.pass_blocks(blocks, chain)
        assert_rel_close(ops.butterfly_rotate(x, pass_b, chain), x @ boft.rotation(), name=f"x R, width {max_width}")
        assert_rel_close(ops.butterfly_rotate(x, pass_b, chain, transpose=True), x @ boft.rotation().T, name="x R^T")


def test_bad_configurations_raise_at_construction_naming_the_parameter():
    with pytest.raises(ValueError, match=r"n_butterfly_factor=3 needs in_features=24 .* 16; valid n_butterfly_factor: 1\.\.2"):
        layers.BOFTLinear(torch.nn.Linear(24, 5), boft_block_size=4, boft_n_butterfly_factor=3)
    with pytest.raises(ValueError, match=r"block_size=5 does not divide in_features=24"):
        layers.BOFTLinear(torch.nn.Linear(24, 5), boft_block_size=5)
    with pytest.raises(ValueError, match=r"block_size=3 must be even for n_butterfly_factor=2"):
        layers.BOFTLinear(torch.nn.Linear(24, 5), boft_block_size=3, boft_n_butterfly_factor=2)
    with pytest.raises(ValueError, match=r"exactly one of boft_block_size or boft_block_num"):
        layers.BOFTLinear(torch.nn.Linear(24, 5), boft_block_size=4, boft_block_num=6)
    with pytest.raises(ValueError, match=r"block_size=15 must be a power of two .* in_features=15; valid choices: none"):
        layers.GOFTLinear(torch.nn.Linear(15, 5))
    with pytest.raises(ValueError, match=r"block_size=12 must be a power of two .* valid choices: \[2, 4\]"):
        layers.GOFTLinear(torch.nn.Linear(12, 5), block_size=12)
    with pytest.raises(ValueError, match=r"group_size=3 must be even"):
        layers.RoAdLinear(torch.nn.Linear(6, 12), group_size=3)
    with pytest.raises(ValueError, match=r"group_size=4 does not divide out_features=6"):
        layers.RoAdLinear(torch.nn.Linear(6, 6), group_size=4)
    with pytest.raises(ValueError, match=r"variant='road_3'.*road_1"):
        layers.RoAdLinear(torch.nn.Linear(6, 8), variant="road_3", group_size=4)
    with pytest.raises(ValueError, match=r"r=9 exceeds in_features=8"):
        layers.HRALinear(torch.nn.Linear(8, 3), r=9, apply_GS=True)
    with pytest.raises(ValueError, match=r"n_blocks=3 does not divide out_features=4"):
        layers.ETHERLinear(torch.nn.Linear(6, 4), n_blocks=3, plus=True)
    with pytest.raises(TypeError, match=r"blocks\[0\] is torch.float64 .* pass blocks in torch.float32"):
        chain = ops.plan(8, 4, 1)
        ops.butterfly_rotate(randn(2, 8, dtype=F32), ops.pass_blocks(ops.boft_blocks(randn(1, 2, 4, 4)), chain), chain)


def test_nan_in_parameters_propagates():
    layer = layers.BOFTLinear(linear_model(16, 4, dtype=F32)[0], boft_block_size=4, boft_n_butterfly_factor=2)
    with torch.no_grad():
        layer.boft_R[0, 1, 0, 2] = float("nan")
    y = layer(randn(3, 16, dtype=F32))
    assert torch.isnan(y).any()
    road = layers.RoAdLinear(linear_model(6, 8, dtype=F32)[0], group_size=4)
    with torch.no_grad():
        road.road_theta[0] = float("nan")
    assert torch.isnan(road(randn(3, 6, dtype=F32))).any()


# ----------------------------------------------------------------------------- ops: gradcheck, dtypes, strides


def test_ops_gradcheck_float64():
    chain = ops.plan(24, 4, 2, max_width=4, min_width=4)   # two passes, one with L = 2
    blocks = [B.detach().requires_grad_() for B in ops.pass_blocks(ops.boft_blocks(randn(2, 6, 4, 4, scale=0.3)), chain)]
    x = randn(5, 24, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *b: ops.butterfly_rotate(x, list(b), chain), (x, *blocks))
    assert torch.autograd.gradcheck(lambda x, *b: ops.butterfly_rotate(x, list(b), chain, transpose=True), (x, *blocks))
    U, K = randn(3, 4, 2, requires_grad=True), randn(1, 2, 2, requires_grad=True)
    x12 = randn(5, 12, requires_grad=True)
    assert torch.autograd.gradcheck(ops.householder, (x12, U, K))
    assert torch.autograd.gradcheck(ops.householder, (x12, U, randn(3, 2, 2, requires_grad=True)))
    assert torch.autograd.gradcheck(ops.householder, (x12, randn(1, 12, 3, requires_grad=True),
                                                      randn(1, 3, 3, requires_grad=True)))
    f, g = randn(12, requires_grad=True), randn(12, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, f, g: ops.road_rotate(h, f, g, 6), (x12, f, g))


@pytest.mark.parametrize("rows", [7, 3])   # 7 > out = 5: W is rotated (orthogonal backward); 3: x is rotated
@pytest.mark.parametrize("m", [1, 2, 4])
def test_rotate_linear_gradcheck_float64(rows, m):
    """BOFT's and GOFT's fused linear op, every input differentiable (the base weight too)."""
    d, b = 16, 2
    R = randn(m, d // b, b, b, scale=0.3, requires_grad=True)
    s = (1 + randn(5, 1, scale=0.1)).requires_grad_()
    W, bias = randn(5, d, requires_grad=True), randn(5, requires_grad=True)
    x = randn(rows, d, requires_grad=True)
    assert torch.autograd.gradcheck(ops.boft_linear, (x, R, s, W, bias), fast_mode=True)
    assert torch.autograd.gradcheck(lambda *args: ops.boft_linear(*args, recompute=True), (x, R, s, W, bias),
                                    fast_mode=True)
    theta = randn(m, d // 2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, t, W: ops.goft_linear(x, t, W), (x, theta, W), fast_mode=True)


def _road_linear(x, W, b, f, g):
    return ops.road_linear_op(x, W, b, f, g, 4)[0]


@pytest.mark.parametrize("backend,rows", [("torch", 7), ("torch", 13), ("triton", 13)])
@pytest.mark.parametrize("trains", ["everything", "coefficients", "base"])
def test_road_linear_gradcheck_float64(trains, backend, rows, monkeypatch):
    """RoAd's fused linear op over several row steps of the torch path (steps of 3), a strided x;
    the coefficients trainable (h saved), the base trainable (x saved), or both.  torch with
    13 rows >= 10 in_features, or f, g frozen: dx = dy (R W), dW = R^T dy^T x, db = R^T sum_rows dy;
    torch with 7 rows and triton (float64 runs its torch primitives) while f, g train: dh formed,
    dx = dh W, dW = dh^T x, db = sum_rows dh."""
    monkeypatch.setenv("FASTADAPT_BACKEND", backend)
    monkeypatch.setattr(ops, "_ROAD_ROWS", 3)
    base, coefficients = trains != "coefficients", trains != "base"
    x = noncontig(randn(rows, 10, seed=1)).requires_grad_()
    W, b = randn(12, 10, seed=2, requires_grad=base), randn(12, seed=3, requires_grad=base)
    f, g = randn(12, seed=4, requires_grad=coefficients), randn(12, seed=5, requires_grad=coefficients)
    assert torch.autograd.gradcheck(_road_linear, (x, W, b, f, g))
    assert torch.autograd.gradcheck(lambda x, W, f, g: _road_linear(x, W, None, f, g), (x, W, f, g))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("rows", [11, 19])   # 11 < 16 in_features: dh formed; 19: R W
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_road_linear_half_base_over_row_steps_against_float64(dtype, rows, backend, monkeypatch):
    """A half base with float32 f, g: the torch path's float32 tiles (rounded once into h's dtype
    per step of 4 rows, a short last step) or the C++ passes (float32 arithmetic, df / dg partials
    over the same steps; the torch path where csrc/ does not build), and the gradients against
    float64 of the same inputs."""
    monkeypatch.setenv("FASTADAPT_BACKEND", backend)
    monkeypatch.setattr(ops, "_ROAD_ROWS", 4)
    x, W, b = randn(rows, 16, seed=6).to(dtype), randn(8, 16, seed=7).to(dtype), randn(8, seed=8).to(dtype)
    f, g = randn(8, seed=9, dtype=F32), randn(8, seed=10, dtype=F32)
    params = [W.requires_grad_(), b.requires_grad_(), f.requires_grad_(), g.requires_grad_()]
    y, grads = _grads(lambda x: _road_linear(x, W, b, f, g), x, params)
    params64 = [t.detach().double().requires_grad_() for t in params]
    y64, grads64 = _grads(lambda x: ref_road(F.linear(x, *params64[:2]), *params64[2:], 4), x.double(), params64)
    assert y.dtype == dtype
    assert_rel_close(y, y64, dtype, scale=2.0, name="y")
    for name, a, e in zip(("x", "W", "b", "f", "g"), grads, grads64):
        assert_rel_close(a, e, dtype, scale=2.0, name=f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_layers_every_dtype_odd_shape_non_contiguous_against_float64_reference(dtype):
    """(9, 41, d) inputs through a strided view, the layers cast to ``dtype``: output within the
    table (half I/O rounds inputs and output once each: twice the bound)."""
    scale = 1.0 if dtype == F32 else 2.0
    x = randn(9, 41, 48)
    base = linear_model(48, 24, dtype=F64)[0]
    cases = {
        "boft m=2": (layers.BOFTLinear(copy.deepcopy(base), boft_block_size=4, boft_n_butterfly_factor=2),
                     lambda l: ref.BOFT(base.weight, base.bias, block_size=4, n_butterfly_factor=2,
                                        boft_R=l.boft_R.detach(), boft_s=l.boft_s.detach())),
        "goft": (layers.GOFTLinear(copy.deepcopy(base), block_size=16),
                 lambda l: ref.GOFT(base.weight, base.bias, block_size=16, goft_theta=l.goft_theta.detach())),
        "hra": (layers.HRALinear(copy.deepcopy(base), r=5),
                lambda l: ref.HRA(base.weight, base.bias, r=5, hra_u=l.hra_u.detach())),
        "ether+": (layers.ETHERLinear(copy.deepcopy(base), n_blocks=4, plus=True),
                   lambda l: ref.ETHER(base.weight, base.bias, n_blocks=4, plus=True, ether_u=l.ether_u.detach(),
                                       ether_v=l.ether_v.detach(), ether_u_out=l.ether_u_out.detach(),
                                       ether_v_out=l.ether_v_out.detach())),
        "road_4": (layers.RoAdLinear(copy.deepcopy(base), variant="road_4", group_size=6),
                   lambda l: ref.RoAd(base.weight, base.bias, variant="road_4", group_size=6,
                                      road_theta=l.road_theta.detach(), road_alpha=l.road_alpha.detach())),
    }
    for name, (layer, make_reference) in cases.items():
        for p in layer.parameters():
            if p.requires_grad:
                with torch.no_grad():
                    p.add_(randn(*p.shape, scale=0.2))
        expected = make_reference(layer)(x)
        layer = layer.to(dtype)
        with torch.no_grad():
            y = layer(noncontig(x.to(dtype)))
        assert y.dtype == dtype
        assert_rel_close(y, expected, dtype, scale=scale, name=name)


def test_boft_layer_gradients_against_reference_and_both_sides():
    """Output and gradients (x, boft_R, boft_s) of the fused layer equal autograd through the dense
    float64 reference, rotating x (4 rows) and rotating W (40 rows > 6 outputs)."""
    for rows in (4, 40):
        base = linear_model(32, 6, dtype=F64)[0]
        layer = layers.BOFTLinear(base, boft_block_size=4, boft_n_butterfly_factor=3)
        randomize_(layer, names=["boft_R"], scale=0.3)
        with torch.no_grad():
            layer.boft_s.add_(randn(6, 1, scale=0.1))
        oracle = ref.BOFT(base.weight, base.bias, block_size=4, n_butterfly_factor=3, boft_R=layer.boft_R.detach(),
                          boft_s=layer.boft_s.detach())
        x = randn(rows, 32)
        y, grads = _grads(layer, x, [layer.boft_R, layer.boft_s])
        y_ref, grads_ref = _grads(oracle, x, [oracle.boft_R, oracle.boft_s])
        assert_rel_close(y, y_ref, name=f"y rows={rows}")
        for name, a, e in zip(("x", "boft_R", "boft_s"), grads, grads_ref):
            assert_rel_close(a, e, name=f"d{name} rows={rows}")


# ----------------------------------------------------------------------------- memory


def test_saved_activations():
    """x only for HRA, ETHER, GOFT and BOFT with a frozen boft_s; the base output only for RoAd; x
    and h = (x R) W^T for BOFT with a trainable boft_s (its gradient sum_rows dy o h needs h).
    Plus small tensors: N x r projections (HRA), the c x c pass blocks and the autograd graph
    that builds them from the parameters (d c numbers each: c / N of bytes(x), 1.6 % here)."""
    base = linear_model(256, 256, dtype=F32)[0]
    x = randn(1024, 256, dtype=F32)   # HRA's N x r projections are r / d = 3 % of bytes(x)
    boft = layers.BOFTLinear(copy.deepcopy(base), boft_block_size=8, boft_n_butterfly_factor=2)
    assert 2.0 < saved_activation_ratio(boft, x) < 2.1
    boft.boft_s.requires_grad_(False)
    assert saved_activation_ratio(boft, x) < 1.1
    for layer in (layers.HRALinear(copy.deepcopy(base), r=8), layers.ETHERLinear(copy.deepcopy(base), n_blocks=4),
                  layers.GOFTLinear(copy.deepcopy(base)), layers.RoAdLinear(copy.deepcopy(base), group_size=16)):
        assert saved_activation_ratio(layer, x) < 1.1, type(layer).__name__


# ----------------------------------------------------------------------------- merge / unmerge


@pytest.mark.parametrize("make", [
    lambda base: layers.BOFTLinear(base, boft_block_size=4, boft_n_butterfly_factor=3),
    lambda base: layers.GOFTLinear(base),
    lambda base: layers.HRALinear(base, r=6),
    lambda base: layers.HRALinear(base, r=6, apply_GS=True),
    lambda base: layers.ETHERLinear(base, n_blocks=8),
    lambda base: layers.ETHERLinear(base, n_blocks=4, plus=True),
    lambda base: layers.RoAdLinear(base, variant="road_2", group_size=8),
], ids=["boft", "goft", "hra", "hra_gs", "ether", "ether_plus", "road_2"])
def test_merge_unmerge_exact(make):
    base = linear_model(32, 16, dtype=F32)[0]
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    layer = make(base)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(randn(*p.shape, scale=0.2, dtype=F32))
    x = randn(5, 32, dtype=F32)
    with torch.no_grad():
        expected = layer(x)
        layer.merge()
        assert_rel_close(layer(x), expected, name="merged forward")
        layer.unmerge()
        assert_rel_close(layer.base_layer.weight, weight, name="unmerged weight")
        assert_rel_close(layer.base_layer.bias, bias, name="unmerged bias")
        assert_rel_close(layer(x), expected, name="unmerged forward")


# ----------------------------------------------------------------------------- PEFT bridge


@pytest.mark.parametrize("b", [4, 8, 16])
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("rows", [6, 96])   # x rotated / W rotated (96 rows > 24 outputs)
def test_boft_bridge_equals_peft(m, b, rows):
    """Output and every gradient equal PEFT's BOFT, whose m > 1 math runs through the torch
    block-diagonal stand-in (PEFT keeps m: boft_R has m factors)."""
    d_in = b * 2 ** (m - 1) * 2
    model, layer = _peft(BOFTConfig(target_modules=["0"], boft_block_size=b, boft_n_butterfly_factor=m), d_in, 24,
                         ["boft_R"], scale=0.1)
    assert layer.boft_R["default"].shape == (m, d_in // b, b, b)
    with torch.no_grad():
        layer.boft_s["default"].add_(randn(24, 1, scale=0.1))
    _compare_accelerated(model, randn(2, rows // 2, d_in))


@pytest.mark.parametrize("rows", [6, 96])   # x rotated / W rotated
def test_boft_recompute_saves_x_alone_and_equals_peft(rows):
    """set_boft_recompute: h = (x R) W^T formed again in backward for boft_s's gradient, so the
    fused layer saves bytes(x) less (h) and still gives PEFT's output and gradients,
    on either side of the rotation (s then folds into the GEMM's weight, as with a frozen boft_s)."""
    d_in = 32
    model, layer = _peft(BOFTConfig(target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=2), d_in, d_in,
                         ["boft_R"], dtype=torch.float32, scale=0.1)
    with torch.no_grad():
        layer.boft_s["default"].add_(randn(d_in, 1, scale=0.1, dtype=torch.float32))
    params = [p for p in model.parameters() if p.requires_grad]
    x = randn(rows, d_in, dtype=torch.float32)
    expected, expected_grads = _grads(model, x, params)
    fastadapt.accelerate(model, min_macs=0)
    kept_saved = saved_activation_ratio(model, x)
    assert layers.set_boft_recompute(model) == 1
    actual, actual_grads = _grads(model, x, params)
    assert_rel_close(actual, expected, name="output")
    for name, a, e in zip(("x", "boft_R", "boft_s"), actual_grads, expected_grads):
        assert_rel_close(a, e, name=f"d{name}")
    recompute_saved = saved_activation_ratio(model, x)
    assert kept_saved - recompute_saved == pytest.approx(1.0)   # h (N x out = bytes(x)) no longer saved
    assert layers.set_boft_recompute(model, False) == 1
    assert saved_activation_ratio(model, x) == kept_saved


def test_boft_bridge_block_dropout_in_training_equals_peft():
    """PEFT's multiplicative block dropout module runs on the fused path's blocks: same draws."""
    model, _ = _peft(BOFTConfig(target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=2, boft_dropout=0.5),
                     16, 24, ["boft_R"])
    _compare_accelerated(model, randn(3, 16), train=True)


def test_boft_m2_checkpoint_loads_and_gives_peft_outputs(tmp_path):
    """A checkpoint saved with boft_n_butterfly_factor=2 loads into a fresh PEFT model on CPU with
    both factors, and the accelerated model gives the saving model's outputs."""
    model, _ = _peft(BOFTConfig(target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=2), 16, 8,
                     ["boft_R", "boft_s"], scale=0.2)
    model.save_pretrained(tmp_path)
    x = randn(5, 16)
    with torch.no_grad():
        expected = model(x)
    loaded = PeftModel.from_pretrained(linear_model(16, 8, dtype=F64), tmp_path)
    with torch.no_grad():
        base_weight = model.base_model.model[0].base_layer.weight
        loaded.base_model.model[0].base_layer.weight.copy_(base_weight)
        loaded.base_model.model[0].base_layer.bias.copy_(model.base_model.model[0].base_layer.bias)
    layer = loaded.base_model.model[0]
    assert layer.boft_R["default"].shape[0] == 2
    report = fastadapt.accelerate(loaded)
    with torch.no_grad():
        assert_rel_close(loaded(x), expected, name="loaded, accelerated")
    assert report.fused_calls == 1, str(report)


@pytest.mark.filterwarnings("ignore:The symmetric initialization can NOT be performed")  # PEFT, odd r
@pytest.mark.parametrize("apply_GS", [False, True])
@pytest.mark.parametrize("r,rows", [(4, 6), (3, 30), (8, 6)])
def test_hra_bridge_equals_peft(apply_GS, r, rows):
    model, _ = _peft(HRAConfig(target_modules=["0"], r=r, apply_GS=apply_GS), 13, 9, ["hra_u"], scale=1.0)
    _compare_accelerated(model, randn(rows, 13))


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
@pytest.mark.parametrize("group_size", [4, 12])
def test_road_bridge_equals_peft(variant, group_size):
    model, layer = _peft(RoadConfig(target_modules=["0"], variant=variant, group_size=group_size), 7, 24,
                         ["road_theta", "road_alpha"], scale=0.5)
    with torch.no_grad():
        layer.road_alpha["default"].add_(1.0)
    _compare_accelerated(model, noncontig(randn(3, 5, 7)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_half_base_as_accurate_as_peft(dtype, autocast_adapter_dtype):
    """A half base with PEFT's float32 adapters (autocast_adapter_dtype=True) or adapters in the
    base dtype: fused output and gradients within 1.5x PEFT's own error against float64."""
    configs = [(BOFTConfig(target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=2), ["boft_R"]),
               (HRAConfig(target_modules=["0"], r=4), ["hra_u"]),
               (RoadConfig(target_modules=["0"], variant="road_2", group_size=4), ["road_theta"])]
    for config, names in configs:
        model, _ = _peft(config, 32, 16, names, dtype=F64, scale=0.2)
        truth = copy.deepcopy(model)
        model = model.to(dtype)
        if autocast_adapter_dtype:  # PEFT's default: adapters back to float32 on a half base
            for name, p in model.named_parameters():
                if any(n in name for n in ("boft_", "hra_", "road_")):
                    p.data = p.data.float()
        params = [p for p in model.parameters() if p.requires_grad]
        x = randn(40, 32)
        y_true, g_true = _grads(truth, x, [p for p in truth.parameters() if p.requires_grad])
        y_peft, g_peft = _grads(model, x.to(dtype), params)
        report = fastadapt.accelerate(model)
        y, g = _grads(model, x.to(dtype), params)
        fastadapt.revert(model)
        assert report.fused_calls == 1 and not report.fallbacks, str(report)
        for name, a, p, t in zip(["y", "dx", *range(len(params))], (y, *g), (y_peft, *g_peft), (y_true, *g_true)):
            err, peft_err = rel_error(a, t), rel_error(p, t)
            assert err <= max(1.5 * peft_err, 1e-6), f"{type(config).__name__} {name}: {err:.2e} vs PEFT {peft_err:.2e}"


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["boft", "hra", "road"])
def test_autocast_runs_fused_with_peft_semantics(method, autocast_dtype):
    """Under torch.autocast on a float32 model the bridge serves every call fused and equals PEFT
    under the same autocast: PEFT's output dtype (BOFT, HRA: x's; RoAd: the base output's), output
    and every gradient within the autocast dtype's row of the table."""
    config, names = {"boft": (BOFTConfig(target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=2),
                              ["boft_R"]),
                     "hra": (HRAConfig(target_modules=["0"], r=4), ["hra_u"]),
                     "road": (RoadConfig(target_modules=["0"], variant="road_1", group_size=4), ["road_theta"])}[method]
    model, _ = _peft(config, 32, 16, names, dtype=F32, scale=0.2)
    params = [p for p in model.parameters() if p.requires_grad]
    x = randn(24, 32, dtype=F32)   # 24 rows > 16 outputs: BOFT rotates W
    assert_fused_equals_peft_under_autocast(model, params, x, autocast_dtype, cotangent_seed=5)


def test_bridge_fallbacks_and_skips():
    """Several active adapters and RoAd's mixed-adapter batches run PEFT's forward with a reason;
    PEFT's Conv2d BOFT is another class and is not patched."""
    model, _ = _peft(RoadConfig(target_modules=["0"], group_size=4), 6, 8, ["road_theta"])
    model.eval()   # PEFT takes adapter_names in eval mode only
    x = randn(2, 6)
    report = fastadapt.accelerate(model)
    with torch.no_grad():
        expected = model(x, adapter_names=["default", "__base__"])
    assert any("adapter_names" in reason for reason in report.fallbacks), str(report)
    fastadapt.revert(model)
    conv = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1)).double()
    conv_model = get_peft_model(conv, BOFTConfig(target_modules=["0"], boft_block_size=2))
    report = fastadapt.accelerate(conv_model)
    assert report.num_patched == 0 and "peft.tuners.boft.layer.Conv2d" in report.skipped
    assert expected.shape == (2, 8)


def test_compiles_without_graph_breaks():
    """An accelerated PEFT model of each bridged method and the fastadapt-only layers trace whole
    (torch._dynamo.explain); BOFT (butterfly_linear, pass blocks) and ETHER+ (householder on both
    sides) also compile with inductor, fullgraph, and give eager's gradient."""
    models = {"boft": _peft(BOFTConfig(target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=2), 16, 8,
                            ["boft_R"], dtype=F32)[0],
              "hra": _peft(HRAConfig(target_modules=["0"], r=4), 16, 8, ["hra_u"], dtype=F32)[0],
              "road": _peft(RoadConfig(target_modules=["0"], group_size=4), 16, 8, ["road_theta"], dtype=F32)[0]}
    for model in models.values():
        fastadapt.accelerate(model)
    base = linear_model(16, 8, dtype=F32)[0]
    models["goft"] = layers.GOFTLinear(copy.deepcopy(base))
    models["ether+"] = layers.ETHERLinear(copy.deepcopy(base), n_blocks=4, plus=True)
    x = randn(12, 16, dtype=F32, requires_grad=True)
    for name, model in models.items():
        def step(x):
            return model(x).square().sum()
        torch._dynamo.reset()
        assert torch._dynamo.explain(step)(x).graph_break_count == 0, name
        if name in ("boft", "ether+"):
            torch._dynamo.reset()
            (dx,) = torch.autograd.grad(torch.compile(step, fullgraph=True)(x), x)
            (dx_eager,) = torch.autograd.grad(step(x), x)
            assert_rel_close(dx, dx_eager, name=f"compiled dx {name}")


def test_methods_report_butterfly_family():
    support = fastadapt.methods()
    for name in ("boft", "goft", "hra", "ether", "road"):
        assert support[name].reference and support[name].cpu and support[name].triton, name
    for name in ("boft", "hra", "road"):
        assert support[name].peft_bridge, name


# ----------------------------------------------------------------------------- Triton kernels
# On CPU these run in the interpreter (tests/conftest.py); shapes are small but legal when compiled.

triton_missing = pytest.mark.skipif(not fastadapt.backend.triton_available(), reason="triton is not installed")
INTERPRETED = fastadapt.backend.interpreter_mode()
# Every kernel in fp32, fp16 and bf16; bf16 only compiled (the interpreter has no bf16 arithmetic).
KERNEL_DTYPES = [F32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    INTERPRETED, reason="the Triton interpreter has no bf16 arithmetic"))]


def _half_scale(dtype):
    """Half I/O rounds the inputs and the output once each: twice the dtype's bound."""
    return 1.0 if dtype == F32 else 2.0


def _pass_reference(x, B, geometry):
    A, M, L, H = geometry
    v = x.reshape(x.shape[0], A, M, L, H).permute(0, 1, 3, 2, 4).reshape(x.shape[0], A * L, M * H)
    y = torch.einsum("ngc,gce->nge", v, B)
    return y.reshape(x.shape[0], A, L, M, H).permute(0, 1, 3, 2, 4).reshape(x.shape)


def _pass_grad_reference(x, g, geometry):
    A, M, L, H = geometry
    def grouped(t):
        return t.reshape(t.shape[0], A, M, L, H).permute(0, 1, 3, 2, 4).reshape(t.shape[0], A * L, M * H)
    return torch.einsum("ngc,nge->gce", grouped(x), grouped(g))


# (A, M, L, H): contiguous blocks of 16; a butterfly pass with L = 4; blocks of 6 (padded to 16);
# blocks of 128 (two column tiles, two K steps); pieces of one feature with L = 8 (GOFT-like).
PASS_GEOMETRIES = [(3, 2, 1, 8), (2, 4, 4, 2), (5, 2, 1, 3), (1, 2, 1, 64), (2, 4, 8, 1)]


@triton_missing
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("geometry", PASS_GEOMETRIES, ids=str)
def test_triton_pass_kernels_strided_against_float64(dtype, geometry, device):
    from fastadapt.triton_kernels import butterfly as kernels
    A, M, L, H = geometry
    d, c = A * M * L * H, M * H
    x = noncontig(randn(37, d)).to(dtype)
    g = randn(37, d).to(dtype)
    B = randn(A * L, c, c, scale=c ** -0.5)
    scale = _half_scale(dtype)
    y = kernels.butterfly_pass_forward(x.to(device), B.float().to(device), geometry, dtype)
    assert y.dtype == dtype and y.is_contiguous()
    assert_rel_close(y, _pass_reference(x.double(), B, geometry), dtype, scale=scale, name="y")
    yt = kernels.butterfly_pass_forward(x.to(device), B.float().to(device).transpose(-2, -1), geometry, F32)
    assert_rel_close(yt, _pass_reference(x.double(), B.transpose(-2, -1), geometry), dtype, scale=scale,
                     name="y with B^T, float32 out")
    dB = kernels.butterfly_pass_grad(x.to(device), g.to(device), geometry, splits=2)
    assert_rel_close(dB, _pass_grad_reference(x.double(), g.double(), geometry), F32, name="dB")


@triton_missing
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("n,b,k,shared", [(1, 80, 8, True), (4, 6, 2, True), (3, 16, 1, False)])
def test_triton_householder_kernel_against_float64(dtype, n, b, k, shared, device):
    from fastadapt.triton_kernels import butterfly as kernels
    x = noncontig(randn(21, n * b)).to(dtype)
    U = randn(n, b, k, scale=b ** -0.5)
    K = randn(1 if shared else n, k, k)
    z, P = kernels.householder_forward(x.to(device), U.float().to(device), K.float().to(device))
    xb = x.double().reshape(21, n, b)
    P64 = torch.einsum("mnb,nbk->nmk", xb, U)
    z64 = xb - torch.einsum("nmk,nkj,nbj->mnb", P64, K.expand(n, k, k), U)
    assert z.dtype == dtype
    assert_rel_close(z, z64.reshape(21, n * b), dtype, scale=_half_scale(dtype), name="z")
    assert_rel_close(P, P64, F32, scale=_half_scale(dtype), name="P")


@triton_missing
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("group_size", [2, 12, 300])   # half = 150: two column chunks
def test_triton_road_kernels_against_float64(dtype, group_size, device):
    from fastadapt.triton_kernels import butterfly as kernels
    out = 2 * group_size
    h, dy = noncontig(randn(19, out)).to(dtype), randn(19, out).to(dtype)
    f, g = randn(out), randn(out)
    h64, dy64 = h.double().requires_grad_(), dy.double()
    f64, g64 = f.clone().requires_grad_(), g.clone().requires_grad_()
    y64 = ref_road(h64, f64, g64, group_size)
    dh64, df64, dg64 = torch.autograd.grad(y64, [h64, f64, g64], dy64)
    y = kernels.road_forward(h.to(device), f.float().to(device), g.float().to(device), group_size)
    scale = _half_scale(dtype)
    assert_rel_close(y, y64, dtype, scale=scale, name="y")
    dh, df, dg = kernels.road_backward(dy.to(device), h.to(device), f.float().to(device), g.float().to(device),
                                       group_size, True, splits=2)
    assert_rel_close(dh, dh64, dtype, scale=scale, name="dh")
    assert_rel_close(df, df64, F32, name="df")
    assert_rel_close(dg, dg64, F32, name="dg")
    assert kernels.road_backward(dy.to(device), h.to(device), f.float().to(device), g.float().to(device),
                                 group_size, False)[0] is None


@triton_missing
def test_householder_rows_per_program_fill_the_sms():
    """64 rows per program unless that starts fewer programs than the GPU has SMs: HRA's single
    block at N = 8192 on 132 SMs takes 32 rows (256 programs, not 128), ETHER's 32 blocks keep 64,
    a short input stops at 16; the interpreter always runs 16."""
    from fastadapt.triton_kernels import butterfly as kernels
    rows_per_program = {(rows, blocks): kernels.householder_tiles(64, 8, rows=rows, blocks=blocks, sms=132)["BLOCK_M"]
                        for rows, blocks in ((8192, 1), (8192, 32), (100, 1), (8448, 1))}
    assert rows_per_program == {(8192, 1): 32, (8192, 32): 64, (100, 1): 16, (8448, 1): 64}
    assert kernels.householder_tiles(64, 8, True, rows=8192, sms=132)["BLOCK_M"] == 16


def ref_road(h, f, g, group_size):
    """RoAd's rotation written out pairwise (float64 oracle of the kernels)."""
    half = group_size // 2
    hv = h.reshape(h.shape[0], -1, 2, half)
    fv, gv = f.reshape(-1, 2, half), g.reshape(-1, 2, half)
    ya = fv[:, 0] * hv[:, :, 0] - gv[:, 0] * hv[:, :, 1]
    yb = fv[:, 1] * hv[:, :, 1] + gv[:, 1] * hv[:, :, 0]
    return torch.stack([ya, yb], 2).reshape(h.shape)


@triton_missing
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_triton_scale_kernels_against_float64(dtype, bias, device):
    """BOFT's epilogue y = h o s + b (float32 s and b on any h: one rounding) and (ds, db)."""
    from fastadapt.triton_kernels import butterfly as kernels
    h, dy = noncontig(randn(37, 150)).to(dtype), randn(37, 150).to(dtype)
    s, b = randn(150, dtype=F32), randn(150, dtype=F32) if bias else None
    y = kernels.scale_forward(h.to(device), s.to(device), None if b is None else b.to(device))
    expected = h.double() * s.double() + (0 if b is None else b.double())
    assert y.dtype == dtype
    assert_rel_close(y, expected, dtype, name="y")
    ds, db = kernels.scale_backward(dy.to(device), h.to(device), splits=2)
    assert_rel_close(ds, (dy.double() * h.double()).sum(0), F32, name="ds")
    assert_rel_close(db, dy.double().sum(0), F32, name="db")


@triton_missing
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_triton_backend_layers_output_and_gradients(dtype, monkeypatch, device):
    """FASTADAPT_BACKEND=triton: every fused op of BOFT (x side and W side), GOFT, HRA, ETHER+ and
    RoAd runs its Triton kernels; outputs and gradients within the table against float64."""
    from fastadapt.triton_kernels import butterfly as kernels
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    launches = set()
    names = ("butterfly_pass_forward", "butterfly_pass_grad", "householder_forward", "road_forward", "road_backward",
             "scale_forward", "scale_backward")
    for name in names:
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name, **k: launches.add(_n) or _f(*a, **k))
    base = linear_model(32, 16, dtype=F64)[0]
    made = [layers.BOFTLinear(copy.deepcopy(base), boft_block_size=4, boft_n_butterfly_factor=3),
            layers.GOFTLinear(copy.deepcopy(base)), layers.HRALinear(copy.deepcopy(base), r=5),
            layers.ETHERLinear(copy.deepcopy(base), n_blocks=4, plus=True),
            layers.RoAdLinear(copy.deepcopy(base), variant="road_4", group_size=8)]
    scale = 2.0 if dtype == F32 else 4.0   # a chain of products, each rounding x's dtype
    for layer in made:
        with torch.no_grad():
            for p in layer.parameters():
                if p.requires_grad:
                    p.add_(randn(*p.shape, scale=0.2))
        params = [p for p in layer.parameters() if p.requires_grad]
        # BOFT: x rotated (12 rows < 16 outputs) and W rotated (40 rows); the others: one size.
        for rows in ((12, 40) if isinstance(layer, layers.BOFTLinear) else (40,)):
            x = randn(rows, 32)
            monkeypatch.setenv("FASTADAPT_BACKEND", "torch")
            y64, g64 = _grads(layer, x, params)
            monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
            fused = copy.deepcopy(layer).to(device, dtype)
            y, g = _grads(fused, x.to(device, dtype), [p for p in fused.parameters() if p.requires_grad])
            name = type(layer).__name__
            assert_rel_close(y, y64, dtype, scale=scale, name=f"{name} y rows={rows}")
            for i, (a, e) in enumerate(zip(g, g64)):
                assert_rel_close(a, e, dtype, scale=scale, name=f"{name} gradient {i} rows={rows}")
    assert launches == set(names)


def test_keep_boft_butterfly_factors_is_opt_in(monkeypatch):
    """Importing fastadapt's butterfly layers leaves PEFT's extension loader alone (a fresh
    process); the public call installs the stand-in, and PEFT then keeps the configured m."""
    import subprocess
    import sys
    probe = ("import fastadapt, fastadapt.layers.butterfly; from peft.tuners.boft import layer; "
             "fastadapt.methods(); print(layer.get_fbd_cuda.__module__)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "peft.tuners.boft.layer"
    from peft.tuners.boft import layer as peft_boft_layer
    monkeypatch.setattr(peft_boft_layer, "get_fbd_cuda", lambda: None)   # PEFT without its extension
    fastadapt.keep_boft_butterfly_factors()
    assert peft_boft_layer.get_fbd_cuda() is layers.TorchBlockDiagonal
    model = get_peft_model(linear_model(16, 8), BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2,
                                                           target_modules=["0"]))
    assert model.base_model.model[0].boft_R["default"].shape[0] == 2
