"""Cayley family: ops (torch path, Triton in the interpreter), layers, PEFT bridge parity.

Every comparison is a relative Frobenius error against a float64 reference or PEFT's own layer,
within fastadapt.numerics' one tolerance table.
"""
import copy
import dataclasses
import re
import warnings

import pytest
import torch
from peft import OFTConfig, PsoftConfig, get_peft_model

import fastadapt
from fastadapt.layers import cayley as layers
from fastadapt.numerics import assert_rel_close, rel_error
from fastadapt.ops import cayley as ops
from fastadapt.ops import cayley_maps, cayley_monitor, cayley_oft, cayley_rotate
from fastadapt.reference import cayley as ref
from fastadapt.testing import (DTYPES, assert_fused_equals_peft_under_autocast, linear_model, noncontig, randn,
                               randomize_)

F32, F64 = torch.float32, torch.float64


# ----------------------------------------------------------------------------- helpers


def _grads(model, x, params):
    """Output, dL/dx and dL/dparams for L = <y, fixed random cotangent>."""
    x = x.detach().clone().requires_grad_()
    y = model(x)
    cotangent = randn(*y.shape, dtype=y.dtype, device=y.device, seed=7)
    grads = torch.autograd.grad(y, [x, *params], cotangent)
    return y.detach(), grads


def _compare_accelerated(model, x, params, names):
    """PEFT's forward vs fastadapt.accelerate's: output and every listed gradient."""
    expected, expected_grads = _grads(model, x, params)
    report = fastadapt.accelerate(model)
    try:
        actual, actual_grads = _grads(model, x, params)
        assert report.fused_calls == 1 and not report.fallbacks, str(report)
    finally:
        fastadapt.revert(model)
    assert_rel_close(actual, expected, name="output")
    for name, a, e in zip(["x", *names], actual_grads, expected_grads):
        assert_rel_close(a, e, name=f"d{name}")


# ----------------------------------------------------------------------------- Cayley maps


@pytest.mark.parametrize("block_size", [2, 8, 17])
def test_cayley_exact_and_neumann_equal_reference_and_gradcheck(block_size):
    packed = randn(3, ops.packed_size(block_size), scale=0.3 / block_size)
    Q = ops.skew(packed, block_size)
    assert_rel_close(Q, ref.skew(packed, block_size), name="skew")
    assert_rel_close(ops.cayley(Q), ref.cayley(Q), name="exact")
    assert_rel_close(ops.cayley_neumann(Q, 5), ref.neumann(Q, 5), name="neumann")
    assert float(ops.orthogonality_error(ops.cayley(Q))) < 1e-12
    leaf = packed[:2].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda p: ops.cayley(ops.skew(p, block_size)), (leaf,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda p: ops.cayley_neumann(ops.skew(p, block_size), 4), (leaf,), fast_mode=True)


def test_skew_adjoint_and_ssvd_core_gradcheck_float64():
    """The skew map's adjoint (its own gradient is skew), and the SSVD / AntiPaSTO core for a float,
    a 0-d and a per-sample alpha."""
    grad_Q = randn(2, 5, 5, requires_grad=True, seed=190)
    assert torch.autograd.gradcheck(cayley_maps.skew_adjoint_op, (grad_Q,))
    packed = randn(ops.packed_size(4), scale=0.3, requires_grad=True, seed=191)
    delta_s, S = randn(4, scale=0.1, requires_grad=True, seed=192), randn(4, seed=193).abs()
    for alpha in (0.7, torch.tensor(-1.3, dtype=F64), torch.tensor([0.5, -2.0], dtype=F64)):
        assert torch.autograd.gradcheck(lambda p, ds: ops.ssvd_core(p, ds, S, alpha), (packed, delta_s))


def test_exact_cayley_stays_orthogonal_where_neumann_does_not():
    Q = ops.skew(randn(4, ops.packed_size(16), scale=0.15), 16)  # ||Q||_2 around 0.5-1
    exact = float(ops.orthogonality_error(ops.cayley(Q.float())))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        neumann = float(ops.orthogonality_error(ops.cayley_neumann(Q.float(), 5)))
    assert exact < 1e-5 < neumann


# ----------------------------------------------------------------------------- OFT


def _peft_oft(d_in, d_out, block_size, *, neumann, block_share, dtype=F32):
    config = OFTConfig(oft_block_size=block_size, r=0, target_modules=["0"], use_cayley_neumann=neumann,
                       block_share=block_share)
    model = get_peft_model(linear_model(d_in, d_out, dtype=dtype), config)
    randomize_(model, scale=0.5 / block_size, names=["oft_R"])
    return model, model.base_model.model[0]


@pytest.mark.parametrize("block_size", [8, 16, 32, 64])
@pytest.mark.parametrize("neumann", [True, False])
@pytest.mark.parametrize("block_share", [False, True])
def test_oft_bridge_equals_peft_output_and_gradients(block_size, neumann, block_share):
    model, layer = _peft_oft(2 * block_size, 19, block_size, neumann=neumann, block_share=block_share)
    layer.train()  # PEFT 0.21's OFT Linear never applies module dropout: training mode is served too
    x = randn(3, 5, 2 * block_size, dtype=F32)
    _compare_accelerated(model, x, [layer.oft_R["default"].weight], ["oft_R.weight"])


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("neumann", [True, False])
@pytest.mark.parametrize("block_share", [False, True])
def test_oft_bridge_weight_side_equals_peft(block_size, neumann, block_share):
    """More rows than out_features: the fused Function rotates W instead of x, and in exact mode
    takes dR from x^T dx (R^{-T} = R); the 5-term Neumann gradient is the closed-form adjoint."""
    model, layer = _peft_oft(2 * block_size, 11, block_size, neumann=neumann, block_share=block_share)
    x = randn(4, 16, 2 * block_size, dtype=F32)  # 64 rows > 11 outputs
    _compare_accelerated(model, x, [layer.oft_R["default"].weight], ["oft_R.weight"])


def test_oft_bridge_non_contiguous_input_and_coft_falls_back():
    model, layer = _peft_oft(48, 7, 16, neumann=False, block_share=False)
    _compare_accelerated(model, noncontig(randn(2, 9, 48, dtype=F32)), [layer.oft_R["default"].weight],
                         ["oft_R.weight"])
    layer.oft_R["default"].coft = True
    report = fastadapt.accelerate(model)
    model(randn(2, 48, dtype=F32))
    fastadapt.revert(model)
    assert report.fused_calls == 0 and sum(report.fallbacks.values()) == 1


def test_oft_bridge_half_base_with_fp32_adapter_equals_peft():
    """PEFT's default autocast_adapter_dtype keeps oft_R in fp32 under a bf16 base: x is rotated in
    fp32, cast back, then the bf16 base runs."""
    config = OFTConfig(oft_block_size=8, r=0, target_modules=["0"], use_cayley_neumann=False)
    model = get_peft_model(linear_model(24, 10, dtype=torch.bfloat16), config)
    layer = model.base_model.model[0]
    assert layer.oft_R["default"].weight.dtype == F32
    randomize_(model, scale=0.05, names=["oft_R"])
    _compare_accelerated(model, randn(4, 24, dtype=torch.bfloat16), [layer.oft_R["default"].weight],
                         ["oft_R.weight"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neumann", [True, False])
def test_oft_layer_every_dtype_odd_shape_against_float64_reference(dtype, neumann):
    d_in, d_out, b = 44, 13, 4  # 11 blocks, odd output size
    base = linear_model(d_in, d_out, dtype=F64)[0]
    layer = layers.OFTLinear(base, oft_block_size=b, use_cayley_neumann=neumann)
    randomize_(layer, scale=0.2, names=["oft_R"])
    reference = ref.OFTv2Reference(base.weight, base.bias, layer.oft_R.weight, b, use_cayley_neumann=neumann)
    x = randn(9, 41, d_in)
    expected = reference(x)
    cotangent = randn(*expected.shape)
    expected_grads = torch.autograd.grad(expected, [reference.packed], cotangent)
    layer = layer.to(dtype)
    xd = noncontig(x.to(dtype)).requires_grad_()
    y = layer(xd)
    dx, dR = torch.autograd.grad(y, [xd, layer.oft_R.weight], cotangent.to(dtype))
    scale = 1.0 if dtype == F32 else 2.0  # half I/O: rounding of x, R and y each
    assert_rel_close(y, expected, dtype, scale=scale, name="y")
    x64 = x.clone().requires_grad_()
    (dx_expected,) = torch.autograd.grad(reference(x64), [x64], cotangent)
    assert_rel_close(dx, dx_expected, dtype, scale=scale, name="dx")
    assert_rel_close(dR, expected_grads[0], dtype, scale=4 * scale, name="doft_R (sum over 369 tokens)")


def test_oft_ops_gradcheck_float64():
    x = randn(2, 3, 12, requires_grad=True)
    R = ops.cayley(ops.skew(randn(3, ops.packed_size(4), scale=0.3), 4)).detach().requires_grad_()
    W, bias = randn(5, 12, requires_grad=True), randn(5, requires_grad=True)
    assert torch.autograd.gradcheck(ops.block_rotate, (x, R))
    assert torch.autograd.gradcheck(ops.block_rotate_linear, (x, R, W, bias))
    shared = R[:1].detach().requires_grad_()
    assert torch.autograd.gradcheck(ops.block_rotate_linear, (x, shared, W, None))
    # exact Cayley R is orthogonal: the weight-side backward (rows 6 > out 5) uses R^{-T} = R
    packed_exact = randn(3, ops.packed_size(4), scale=0.3, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda xx, p, w: ops.block_rotate_linear(xx, ops.oft_rotation_blocks(p, 4, use_cayley_neumann=False), w, bias,
                                                 orthogonal=True), (x, packed_exact, W))
    packed = randn(3, ops.packed_size(4), scale=0.3, requires_grad=True)
    for neumann in (True, False):
        assert torch.autograd.gradcheck(
            lambda p: ops.oft_rotation_blocks(p, 4, use_cayley_neumann=neumann, num_cayley_neumann_terms=6), (packed,))


@pytest.mark.parametrize("rows", [6, 4])  # 6 > out = 5: W is rotated; 4 rows: x is rotated
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("terms", [0, 5, 4, 1])  # 0: exact Cayley; 5: closed-form Neumann adjoint
def test_oft_linear_gradcheck_float64(rows, shared, terms):
    x = randn(2, rows // 2, 12, requires_grad=True)
    packed = randn(1 if shared else 3, ops.packed_size(4), scale=0.3, requires_grad=True)
    W, bias = randn(5, 12, requires_grad=True), randn(5, requires_grad=True)

    def layer(xx, p, w, bb):
        return ops.oft_linear(xx, p, 4, w, bb, use_cayley_neumann=terms > 0, num_cayley_neumann_terms=max(terms, 1))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ||Q||_2 may reach 1 for the 1-term series
        assert torch.autograd.gradcheck(layer, (x, packed, W, bias))
        assert torch.autograd.gradcheck(
            lambda p: ops.oft_rotation_blocks(p, 4, use_cayley_neumann=terms > 0,
                                              num_cayley_neumann_terms=max(terms, 1)), (packed,))


@pytest.mark.parametrize("terms", [5, 4])
def test_oft_linear_near_orthogonal_neumann_backward_gradcheck_float64(terms, monkeypatch):
    """Small |Q|: the Neumann R is orthogonal to within float64 rounding after a few terms of
    (I - E)^{-1}, so the weight-side backward takes G = (x^T dx) R^{-T} instead of rotating g
    (18 rows, 5 outputs, b = 4: up to (18 - 5) / 4 - 2 terms pay for themselves)."""
    packed = randn(3, ops.packed_size(4), scale=1e-3, requires_grad=True, seed=101)
    R = ops.oft_rotation_blocks(packed.detach(), 4, num_cayley_neumann_terms=terms)
    inverse_t = cayley_oft._near_orthogonal_inverse_transpose(R, cayley_oft.MAX_INVERSE_TERMS)
    assert inverse_t is not None
    assert_rel_close(inverse_t, torch.linalg.inv(R).transpose(-2, -1), name="R^{-T}")
    assert cayley_oft._near_orthogonal_inverse_transpose(R, 0) is None
    taken = []
    original = cayley_oft._TORCH.inverse_transpose
    monkeypatch.setattr(cayley_oft, "_TORCH", dataclasses.replace(
        cayley_oft._TORCH, inverse_transpose=lambda R, k: taken.append(original(R, k)) or taken[-1]))
    x, W = randn(2, 9, 12, requires_grad=True, seed=102), randn(5, 12, requires_grad=True, seed=103)
    assert torch.autograd.gradcheck(
        lambda xx, p, w: ops.oft_linear(xx, p, 4, w, None, num_cayley_neumann_terms=terms), (x, packed, W))
    assert taken and all(t is not None for t in taken), "the weight-side Neumann backward did not run"


def test_neumann_inverse_transpose_only_where_it_pays():
    """k + 2 b x b products against the (M - out) x d x b rotation they save: b = 256 at the CPU
    benchmark shape (M = 2048, out = 1024) affords one term, b <= 128 the maximum, M <= out none."""
    def affordable(rows, out, b):
        return cayley_oft._affordable_inverse_terms(torch.empty(rows, 1), torch.empty(out, 1), b)
    assert affordable(2048, 1024, 256) == 1
    assert affordable(2048, 1024, 128) == cayley_oft.MAX_INVERSE_TERMS
    assert affordable(1024, 1024, 16) < 1


@pytest.mark.parametrize("rows", [6, 4])
def test_oft_exact_backward_from_the_symmetric_part_gradcheck_float64(rows, monkeypatch):
    """Where R would be too large to keep, exact mode keeps H = (R + R^T) / 2 and rebuilds
    R = H - Q (H + I) in the backward (forced here at a gradcheck size)."""
    monkeypatch.setattr(cayley_oft, "KEEP_R_NUMBERS", 0)
    monkeypatch.setattr(cayley_oft, "KEEP_R_FRACTION", 10 ** 9)
    x = randn(2, rows // 2, 12, requires_grad=True, seed=106)
    packed = randn(3, ops.packed_size(4), scale=0.3, requires_grad=True, seed=107)
    W, bias = randn(5, 12, requires_grad=True, seed=108), randn(5, requires_grad=True, seed=109)
    _, kept = cayley_oft.oft_linear_exact_op(x.reshape(-1, 12), packed, W, bias, 4)
    assert kept.shape == (3, 4 * 5 // 2)
    assert torch.autograd.gradcheck(
        lambda xx, p, w, bb: ops.oft_linear(xx, p, 4, w, bb, use_cayley_neumann=False), (x, packed, W, bias))


@pytest.mark.parametrize("neumann", [True, False])
def test_oft_layer_at_block_128_keeps_no_rotation_stack(neumann):
    """b = 128: one R stack would be 128 / rows = 1/16 of bytes(x); the layer keeps x and, in exact
    mode, only R's symmetric part (b(b+1)/2 per block)."""
    layer = layers.OFTLinear(linear_model(256, 64, dtype=F32)[0], oft_block_size=128, use_cayley_neumann=neumann)
    randomize_(layer, scale=0.5 / 128, names=["oft_R"])
    x = randn(2048, 256, dtype=F32, requires_grad=True)
    symmetric_part = 0 if neumann else 2 * (128 * 129 // 2) / (2048 * 256)
    assert _saved_ratio(layer, x) == pytest.approx(1.0 + symmetric_part, abs=1e-9)


def test_oft_layer_saves_only_x():
    layer = layers.OFTLinear(linear_model(64, 48, dtype=F32)[0], oft_block_size=8)
    randomize_(layer, scale=0.05, names=["oft_R"])
    x = randn(4096, 64, dtype=F32, requires_grad=True)  # R_bd stacks are tiny beside x
    ratio = _saved_ratio(layer, x)
    assert ratio <= 1.05, f"saved {ratio:.3f} x bytes(x)"


@pytest.mark.parametrize("dtype, adapter_dtype", [(F64, F64), (torch.bfloat16, F32)])
def test_chunked_rotations_over_several_row_chunks(dtype, adapter_dtype):
    """M > ROTATE_ROWS (odd last chunk): the in-place rotation of the x-side backward, and the
    mixed layout's rotation (half rows rotated in float32, rounded once)."""
    rows = 2 * cayley_rotate.ROTATE_ROWS + 77
    x = randn(rows, 24, seed=104)
    R = ref.cayley(ref.skew(randn(3, ops.packed_size(8), scale=0.2, seed=105), 8))
    expected = torch.einsum("mnk,nck->mnc", x.to(dtype).double().unflatten(1, (3, 8)), R.to(adapter_dtype).double())
    rotated = cayley_rotate.rotate_(x.to(dtype), R.to(adapter_dtype), transpose=True)
    assert rotated.dtype == dtype
    assert_rel_close(rotated, expected.flatten(1), dtype, name="x R_bd^T in place")
    expected = torch.einsum("mnk,nkc->mnc", x.to(dtype).double().unflatten(1, (3, 8)), R.to(adapter_dtype).double())
    assert_rel_close(cayley_rotate.rotate(noncontig(x.to(dtype)), R.to(adapter_dtype)), expected.flatten(1), dtype,
                     name="x R_bd")


def _saved_ratio(layer, x):
    """Bytes of the storages autograd saves (parameters and buffers excluded) / bytes(x)."""
    params = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(saved.values()) / (x.numel() * x.element_size())


def test_psoft_and_ssvd_layers_save_only_n_by_r():
    x = randn(2048, 64, dtype=F32, requires_grad=True)
    for layer in (layers.PSOFTLinear(linear_model(64, 48, dtype=F32)[0], r=4),
                  layers.SSVDLinear(linear_model(64, 48, dtype=F32)[0], r=4)):
        ratio = _saved_ratio(layer, x)
        assert ratio <= 4 / 64 + 0.01, f"{type(layer).__name__} saved {ratio:.3f} x bytes(x)"


@pytest.mark.parametrize("neumann", [True, False])
@pytest.mark.parametrize("block_share", [False, True])
def test_oft_merge_unmerge(neumann, block_share):
    base = linear_model(48, 20, dtype=F32)[0]
    original = base.weight.detach().clone()
    layer = layers.OFTLinear(base, oft_block_size=16, use_cayley_neumann=neumann, block_share=block_share)
    randomize_(layer, scale=0.05, names=["oft_R"])
    x = randn(7, 48, dtype=F32)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert_rel_close(layer(x), unmerged, name="merged output")
        layer.unmerge()
    assert_rel_close(base.weight, original, name="unmerged weight")


def test_oft_layer_equals_peft_merge():
    model, peft_layer = _peft_oft(32, 9, 8, neumann=True, block_share=False)
    layer = layers.OFTLinear(torch.nn.Linear(32, 9), oft_block_size=8)
    layer.load_state_dict({"base_layer.weight": peft_layer.get_base_layer().weight,
                           "base_layer.bias": peft_layer.get_base_layer().bias,
                           "oft_R.weight": peft_layer.oft_R["default"].weight})
    x = randn(4, 32, dtype=F32)
    with torch.no_grad():
        assert_rel_close(layer(x), model(x), name="fastadapt OFTLinear vs PEFT")
        peft_layer.merge()
        layer.merge()
    assert_rel_close(layer.base_layer.weight, peft_layer.get_base_layer().weight, name="merged weight")


def test_oft_bad_block_size_names_parameter_and_nearest_divisors():
    with pytest.raises(ValueError, match=r"oft_block_size=8 does not divide in_features=30.*\[6, 10\]"):
        layers.OFTLinear(torch.nn.Linear(30, 4), oft_block_size=8)


@pytest.mark.parametrize("neumann", [True, False])
def test_oft_nan_in_q_gives_nan_out(neumann):
    layer = layers.OFTLinear(torch.nn.Linear(16, 4), oft_block_size=8, use_cayley_neumann=neumann)
    with torch.no_grad():
        layer.oft_R.weight.normal_().mul_(0.05)
        layer.oft_R.weight[0, 3] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = layer(randn(3, 16, dtype=F32))
    assert torch.isnan(y).any()


@pytest.fixture
def fresh_monitor():
    """The process-wide Neumann monitor, reset before and after the test."""
    cayley_monitor.MONITOR.reset()
    yield cayley_monitor.MONITOR
    cayley_monitor.MONITOR.reset()


def test_divergent_neumann_warns_once_with_orthogonality_error(fresh_monitor):
    layer = layers.OFTLinear(torch.nn.Linear(16, 4), oft_block_size=8)
    with torch.no_grad():
        layer.oft_R.weight.copy_(randn(*layer.oft_R.weight.shape, seed=110))  # ||Q||_2 > 1
    R = ref.neumann(ref.skew(layer.oft_R.weight.detach(), 8), 5)
    expected_error = float(ref.orthogonality_error(R))
    with pytest.warns(UserWarning, match=r"diverges.*orthogonality error") as record:
        layer(randn(2, 16, dtype=F32, seed=111))
    assert abs(_warned_error(record) - expected_error) <= 1e-2 * expected_error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(randn(2, 16, dtype=F32, seed=112))  # second call: no warning


def _divergence_case(scale, block_size=16, seed=113):
    """Q (3, b, b) and its 5-term series (R, and S = Q^2 as the series computes it)."""
    Q = ops.skew(randn(3, ops.packed_size(block_size), scale=scale, dtype=F32, seed=seed), block_size)
    return Q, cayley_maps.NeumannSeries(Q, 5)


def _warned_error(record):
    return float(re.search(r"\|\|R\^T R - I\|\|_F = ([0-9.]+(?:e[+-]\d+)?)\.", str(record[0].message))[1])


def test_deferred_divergence_check_reads_values_on_later_calls():
    """The CUDA branch of the Neumann check, with a CPU stand-in for the pinned copy: a call never
    reads what it measured.  Call 1 queues ||Q||_F (level 0), call 2 judges it and queues the S
    bounds (level 1), call 3 judges those and queues the exact test (cholesky_ex of I + S) with the
    orthogonality error, call 4 warns once with call 3's measurements."""
    monitor = cayley_monitor.NeumannMonitor(deferred=True)
    Q, series = _divergence_case(1.0)
    Q2, series2 = _divergence_case(1.1, seed=114)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.check(Q, series.R, 5)
        assert monitor.level == 0 and len(monitor.pending.values()) == 1
        monitor.check(lambda: Q, series.R, 5, series.S)
        assert monitor.level == 1 and len(monitor.pending.values()) == 2
        monitor.check(lambda: Q2, series2.R, 5)   # no S given: the monitor squares Q itself
        assert monitor.level == 2 and len(monitor.pending.values()) == 2
    with pytest.warns(UserWarning, match=r"num_cayley_neumann_terms=5 diverges") as record:
        monitor.check(Q, series.R, 5)
    expected = float(ref.orthogonality_error(series2.R.double()))
    assert abs(_warned_error(record) - expected) <= 1e-2 * expected
    spectral = float(re.search(r"\|\|Q\|\|_2 = ([0-9.]+)", str(record[0].message))[1])
    assert abs(spectral - float(torch.linalg.matrix_norm(Q2.double(), ord=2).max())) <= 1e-2 * spectral
    built = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.check(lambda: built.append(1) or Q, series.R, 5)  # warned: nothing measured, Q not even built
    assert not built
    single = cayley_monitor.NeumannMonitor(deferred=True)  # PSOFT's core: one r x r Q, no batch dim
    with pytest.warns(UserWarning, match="diverges"):
        for _ in range(4):
            single.check(Q2[0], series2.R[0], 5)


def test_deferred_divergence_check_waits_for_the_copy(monkeypatch):
    """While the copy's event is not done, calls neither judge the reading nor queue another."""
    monitor = cayley_monitor.NeumannMonitor(deferred=True)
    Q, series = _divergence_case(1.0)
    monitor.check(Q, series.R, 5)
    first = monitor.pending
    monkeypatch.setattr(cayley_monitor.HostReading, "ready", lambda self: False)
    for _ in range(3):
        monitor.check(Q, series.R, 5)
    assert monitor.pending is first and monitor.level == 0 and not monitor.warned


def test_divergence_check_silent_below_the_spectral_threshold():
    """b = 64: ||Q||_F, ||S||_F and ||S||_1 above 1 but ||Q||_2 < 1, so the exact test runs and
    stays quiet, deferred (levels 0 -> 1 -> 2 -> 0) and direct (CPU)."""
    Q, series = _divergence_case(0.05, block_size=64)
    S = series.S
    assert float(torch.linalg.matrix_norm(Q, ord=2).max()) < 1
    assert 1 <= float(torch.linalg.matrix_norm(S).max()) and 1 <= float(torch.linalg.matrix_norm(S, ord=1).max())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor = cayley_monitor.NeumannMonitor(deferred=True)
        levels = []
        for _ in range(4):
            monitor.check(Q, series.R, 5, S)
            levels.append(monitor.level)
        assert levels == [0, 1, 2, 0] and not monitor.warned
        direct = cayley_monitor.NeumannMonitor(deferred=False)
        direct.check(Q, series.R, 5, S)
        assert not direct.warned and direct.pending is None  # direct mode keeps nothing


def test_divergence_check_of_trained_blocks_costs_no_cubic_work(monkeypatch):
    """A trained adapter at b = 256 (entries ~5e-3): ||Q||_F > 1 leaves the question open, the
    series' own S settles it (||Q||_2^2 <= ||S||_F < 1): no Cholesky, no SVD, no product."""
    Q, series = _divergence_case(5e-3, block_size=256)
    assert float(torch.linalg.matrix_norm(Q).max()) > 1 > float(torch.linalg.matrix_norm(series.S).max())

    def cubic(*args):
        raise AssertionError("the monitor ran an O(b^3) test the bounds had settled")
    monkeypatch.setattr(cayley_monitor, "_not_contracting", cubic)
    for deferred in (False, True):
        monitor = cayley_monitor.NeumannMonitor(deferred=deferred)
        for _ in range(4):
            monitor.check(Q, series.R, 5, series.S)
        assert not monitor.warned and monitor.level in (0, 1)


def test_psoft_neumann_projection_without_host_branch():
    """cayley_neumann_eps scales Q to Frobenius norm eps as PEFT does (a device-side choice):
    values and gradient equal PEFT's branchy formula on both sides of the threshold."""
    for scale in (0.3, 0.01):  # ||Q||_F above and below eps = 0.5
        packed = randn(ops.packed_size(6), scale=scale, requires_grad=True)
        core = ops.psoft_core(packed, scaling=1.3, use_cayley_neumann=True, cayley_neumann_eps=0.5, size=6)
        Q = ref.skew(packed, 6)
        norm = torch.linalg.matrix_norm(Q)
        if norm > 0.5:
            Q = Q * (0.5 / (norm + 1e-12))
        expected = 1.3 * (ref.neumann(Q, 5) - torch.eye(6, dtype=F64))
        assert_rel_close(core, expected, name=f"core (scale {scale})")
        cotangent = randn(6, 6)
        assert_rel_close(torch.autograd.grad(core, packed, cotangent)[0],
                         torch.autograd.grad(expected, packed, cotangent)[0], name=f"dpacked (scale {scale})")


# ----------------------------------------------------------------------------- PSOFT


def _peft_psoft(neumann, mags, dtype=F32):
    config = PsoftConfig(r=6, target_modules=["0"], psoft_alpha=12, use_cayley_neumann=neumann,
                         psoft_mag_a=mags, psoft_mag_b=mags, init_weights=False,
                         cayley_neumann_eps=0.5 if neumann else None)
    model = get_peft_model(linear_model(21, 17, dtype=dtype), config)
    randomize_(model, scale=0.3, names=["psoft_R.default.weight"])
    if mags:
        randomize_(model, scale=0.2, names=["vector_"])
    return model, model.base_model.model[0]


@pytest.mark.parametrize("neumann", [False, True])
@pytest.mark.parametrize("mags", [False, True])
def test_psoft_bridge_equals_peft_output_and_gradients(neumann, mags):
    model, layer = _peft_psoft(neumann, mags)
    module = layer.psoft_R["default"]
    params = [module.weight] + ([module.vector_a, module.vector_b] if mags else [])
    layer.scaling["default"] = 1.7  # read at call time
    _compare_accelerated(model, randn(3, 5, 21, dtype=F32), params,
                         ["psoft_R.weight", "vector_a", "vector_b"][: len(params)])


def test_psoft_dropout_in_training_falls_back():
    config = PsoftConfig(r=4, target_modules=["0"], psoft_dropout=0.1)
    model = get_peft_model(linear_model(12, 8, dtype=F32), config)
    report = fastadapt.accelerate(model)
    model.train()
    model(randn(2, 12, dtype=F32))
    model.eval()
    model(randn(2, 12, dtype=F32))
    fastadapt.revert(model)
    assert report.fallbacks["psoft_dropout > 0 in training"] == 1 and report.fused_calls == 1


def test_psoft_layer_against_reference_and_merge():
    base = linear_model(21, 17, dtype=F64)[0]
    layer = layers.PSOFTLinear(base, r=5, psoft_alpha=10)
    randomize_(layer, scale=0.3, names=["psoft_R.weight"])
    randomize_(layer, scale=0.1, names=["vector_"])
    with torch.no_grad():
        layer.psoft_R.vector_a.add_(1)
        layer.psoft_R.vector_b.add_(1)
    reference = psoft_reference(layer)
    x = randn(3, 7, 21)
    assert_rel_close(layer(x), reference(x), name="psoft layer vs reference")
    assert torch.autograd.gradcheck(lambda p: ops.psoft_core(p, scaling=2.0, size=5),
                                    (layer.psoft_R.weight.detach().clone().requires_grad_(),))
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert_rel_close(layer(x), unmerged, name="merged")
        layer.unmerge()
        assert_rel_close(layer(x), unmerged, name="unmerged")


def psoft_reference(layer):
    """The float64 PSOFT reference of a fastadapt PSOFTLinear (its frozen base, A, B and parameters)."""
    base = layer.base_layer
    return ref.PSOFTReference(base.weight, base.bias, layer.psoft_A, layer.psoft_B, layer.psoft_R.weight,
                              scaling=layer.scaling, vector_a=layer.psoft_R.vector_a,
                              vector_b=layer.psoft_R.vector_b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_psoft_layer_every_dtype_odd_shape(dtype):
    base = linear_model(41, 19, dtype=F64)[0]
    layer = layers.PSOFTLinear(base, r=7, psoft_alpha=14)
    randomize_(layer, scale=0.3, names=["psoft_R.weight"])
    reference = psoft_reference(layer)
    x = randn(9, 13, 41)
    with torch.no_grad():
        expected = reference(x)
        layer = layer.to(dtype)
        assert_rel_close(layer(noncontig(x.to(dtype))), expected, dtype, scale=1.0 if dtype == F32 else 2.0,
                         name="y")


# ----------------------------------------------------------------------------- SSVD / AntiPaSTO


def test_ssvd_layer_output_and_gradients_against_reference():
    base = linear_model(24, 18, dtype=F64)[0]
    layer = layers.SSVDLinear(base, r=6)
    randomize_(layer, scale=0.2, names=["ssvd_R"])
    reference = ref.SSVDReference(base.weight, base.bias, layer.ssvd_R.weight, layer.ssvd_R.delta_s, r=6)
    x = randn(4, 5, 24)
    y, (_, g_packed, g_s) = _grads(layer, x, [layer.ssvd_R.weight, layer.ssvd_R.delta_s])
    y_ref, (_, g_packed_ref, g_s_ref) = _grads(reference, x, [reference.packed, reference.delta_s])
    assert_rel_close(y, y_ref, name="y")
    assert_rel_close(g_packed, g_packed_ref, name="d rotation")
    assert_rel_close(g_s, g_s_ref, name="d delta_s")


def test_antipasto_alpha_knob_per_sample_and_inverse():
    base = linear_model(20, 11, dtype=F64)[0]
    layer = layers.AntiPaSTOLinear(base, r=4)
    randomize_(layer, scale=0.3, names=["ssvd_R"])
    reference = ref.AntiPaSTOReference(base.weight, base.bias, layer.ssvd_R.weight, layer.ssvd_R.delta_s, r=4)
    x = randn(3, 6, 20)
    alpha = torch.tensor([0.5, -1.5, 2.0], dtype=F64)
    assert_rel_close(layer(x, alpha), reference(x, alpha), name="per-sample alpha")
    assert_rel_close(layer(x, -0.8), reference(x, -0.8), name="alpha=-0.8")
    assert_rel_close(layer(x, 0.0), base(x), name="alpha=0 is the frozen layer")
    R_plus = ops.cayley(0.8 * ops.skew(layer.ssvd_R.weight, 4))
    R_minus = ops.cayley(-0.8 * ops.skew(layer.ssvd_R.weight, 4))
    assert_rel_close(R_minus @ R_plus, torch.eye(4, dtype=F64), name="R(-a) R(a) = I")
    xs = randn(3, 2, 20, requires_grad=True)
    C = ops.ssvd_core(layer.ssvd_R.weight, layer.ssvd_R.delta_s, layer.ssvd_S, alpha).detach().requires_grad_()
    assert torch.autograd.gradcheck(ops.svd_rotation_linear,
                                    (xs, base.weight, base.bias, layer.ssvd_Vh, layer.ssvd_U, C))
    shared, A, B = C[0].detach().requires_grad_(), randn(4, 20, requires_grad=True), randn(11, 4, requires_grad=True)
    W, bias = base.weight.detach().requires_grad_(), base.bias.detach().requires_grad_()
    assert torch.autograd.gradcheck(ops.svd_rotation_linear, (xs, W, bias, A, B, shared))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ssvd_every_dtype_and_merge(dtype):
    base = linear_model(40, 24, dtype=F64)[0]
    layer = layers.SSVDLinear(base, r=8)
    randomize_(layer, scale=0.2, names=["ssvd_R"])
    x = randn(9, 41, 40)
    with torch.no_grad():
        expected = layer(x)
        layer.to(dtype)
        scale = 1.0 if dtype == F32 else 2.0
        assert_rel_close(layer(x.to(dtype)), expected, dtype, scale=scale, name="y")
        if dtype == F32:
            layer.merge()
            assert_rel_close(layer(x.to(dtype)), expected, dtype, name="merged")
            layer.unmerge()
            assert_rel_close(layer(x.to(dtype)), expected, dtype, name="unmerged")


@pytest.mark.parametrize("make", [
    pytest.param(lambda base: layers.OFTLinear(base, oft_block_size=8), id="OFT"),
    pytest.param(lambda base: layers.OFTLinear(base, oft_block_size=8, use_cayley_neumann=False), id="OFT-exact"),
    pytest.param(lambda base: layers.PSOFTLinear(base, r=4), id="PSOFT"),
    pytest.param(lambda base: layers.AntiPaSTOLinear(base, r=4), id="AntiPaSTO"),
])
@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16), (16,)])
def test_layers_take_empty_batches_and_1d_inputs(make, shape):
    """x of shape (0, in), (batch, 0, in) or (in,): PEFT's output shape, gradients of x's shape."""
    layer = make(linear_model(16, 12, dtype=F32, seed=180)[0])
    randomize_(layer, scale=0.05, names=["oft_R", "psoft_R.weight", "ssvd_R"], seed=181)
    x = randn(*shape, dtype=F32, requires_grad=True, seed=182)
    y = layer(x)
    assert y.shape == (*shape[:-1], 12)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert dx.shape == x.shape
    if x.ndim == 1:
        assert_rel_close(y, layer(x.unsqueeze(0))[0], name="1-D x against the same row in a batch")


def test_methods_report_cayley_family():
    support = fastadapt.methods()
    for name in ("oft", "oftv2", "psoft", "ssvd", "antipasto"):
        assert support[name].reference and support[name].cpu and support[name].triton
    assert support["oft"].peft_bridge and support["oftv2"].peft_bridge and support["psoft"].peft_bridge
    model, _ = _peft_oft(16, 4, 8, neumann=False, block_share=False)
    assert fastadapt.accelerate(model, methods=["oftv2"]).num_patched == 1
    fastadapt.revert(model)


# ----------------------------------------------------------------------------- torch.compile


def _peft_config(case):
    """PEFT configs of the compile / autocast / half-precision tests."""
    return {
        "oft_neumann": lambda: OFTConfig(oft_block_size=8, r=0, target_modules=["0"]),
        "oft_exact": lambda: OFTConfig(oft_block_size=8, r=0, target_modules=["0"], use_cayley_neumann=False),
        "psoft": lambda: PsoftConfig(r=6, target_modules=["0"], psoft_alpha=12, init_weights=False),
        "psoft_neumann": lambda: PsoftConfig(r=6, target_modules=["0"], psoft_alpha=12, init_weights=False,
                                             use_cayley_neumann=True, cayley_neumann_eps=0.5),
    }[case]()


def _adapter_params(layer):
    return [p for n, p in layer.named_parameters() if p.requires_grad and "base_layer" not in n]


def _peft_model(case, d_in, d_out, dtype, seed, **kwargs):
    model = get_peft_model(linear_model(d_in, d_out, dtype=dtype, seed=seed), _peft_config(case), **kwargs)
    randomize_(model, scale=0.1, names=["oft_R", "psoft_R.default.weight"], seed=seed + 1)
    randomize_(model, scale=0.05, names=["vector_"], seed=seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vector_" in name:
                p.add_(1.0)
    return model, model.base_model.model[0]


@pytest.fixture
def fresh_compile():
    """torch.compile without its on-disk caches (their keys cover neither a custom op's
    implementation nor its fake or autograd formula: a graph cached from another version of an op
    would be replayed), dynamo reset before and after."""
    torch._dynamo.reset()
    with torch._functorch.config.patch(enable_autograd_cache=False), \
            torch._inductor.config.patch(fx_graph_cache=False):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not fastadapt.backend.triton_available(), reason="triton is not installed"))])
@pytest.mark.parametrize("case", ["oft_neumann", "oft_exact", "psoft"])
def test_accelerated_layer_compiles_fullgraph_and_equals_eager(case, backend, monkeypatch, fresh_compile):
    """torch.compile(fullgraph=True) of a PEFT model whose layer accelerate patched: no graph
    break (every fused op is one custom op; no host read outside op implementations), and the
    compiled output and gradients equal eager's (rows 40 > out 12: OFT rotates W)."""
    monkeypatch.setenv("FASTADAPT_BACKEND", backend)
    model, layer = _peft_model(case, 32, 12, F32, seed=120)
    params = _adapter_params(layer)
    x = randn(4, 10, 32, dtype=F32, seed=123)
    report = fastadapt.accelerate(model)
    try:
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0
        assert any("torch.ops.fastadapt." in graph.code for graph in explanation.graphs), "no fused op traced"
        expected, expected_grads = _grads(model, x, params)
        torch._dynamo.reset()
        actual, actual_grads = _grads(torch.compile(model, fullgraph=True), x, params)
        assert report.fused_calls and not report.fallbacks, str(report)
    finally:
        fastadapt.revert(model)
        torch._dynamo.reset()
    assert_rel_close(actual, expected, name="compiled output")
    for i, (a, e) in enumerate(zip(actual_grads, expected_grads)):
        assert_rel_close(a, e, name=f"compiled gradient {i}")


@pytest.mark.parametrize("make", [
    pytest.param(lambda base: layers.OFTLinear(base, oft_block_size=8), id="OFTLinear"),
    pytest.param(lambda base: layers.OFTLinear(base, oft_block_size=8, use_cayley_neumann=False), id="OFTLinear-exact"),
    pytest.param(lambda base: layers.PSOFTLinear(base, r=6, use_cayley_neumann=True, cayley_neumann_eps=0.5),
                 id="PSOFTLinear-neumann"),
    pytest.param(lambda base: layers.SSVDLinear(base, r=6), id="SSVDLinear"),
])
def test_fastadapt_layers_compile_fullgraph_and_equal_eager(make, fresh_compile):
    layer = make(linear_model(32, 12, dtype=F32, seed=124)[0])
    randomize_(layer, scale=0.05, names=["oft_R", "psoft_R.weight", "ssvd_R"], seed=125)
    params = _adapter_params(layer)
    x = randn(3, 7, 32, dtype=F32, seed=126)
    torch._dynamo.reset()
    try:
        assert torch._dynamo.explain(layer)(x).graph_break_count == 0
        expected, expected_grads = _grads(layer, x, params)
        torch._dynamo.reset()
        actual, actual_grads = _grads(torch.compile(layer, fullgraph=True), x, params)
    finally:
        torch._dynamo.reset()
    assert_rel_close(actual, expected, name="compiled output")
    for i, (a, e) in enumerate(zip(actual_grads, expected_grads)):
        assert_rel_close(a, e, name=f"compiled gradient {i}")


def test_antipasto_per_sample_alpha_compiles_fullgraph(fresh_compile):
    """A (batch,) alpha tensor (and a 0-d one) stays on the device: no host read, no graph break."""
    layer = layers.AntiPaSTOLinear(linear_model(20, 11, dtype=F32, seed=127)[0], r=4)
    randomize_(layer, scale=0.3, names=["ssvd_R"], seed=128)
    x = randn(3, 6, 20, dtype=F32, seed=129)
    for alpha in (torch.tensor([0.5, -1.5, 2.0]), torch.tensor(0.7)):
        torch._dynamo.reset()
        try:
            assert torch._dynamo.explain(layer)(x, alpha).graph_break_count == 0
            compiled = torch.compile(layer, fullgraph=True)(x, alpha)
        finally:
            torch._dynamo.reset()
        assert_rel_close(compiled, layer(x, alpha), name=f"alpha {tuple(alpha.shape)}")


# ----------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["oft_neumann", "oft_exact", "psoft", "psoft_neumann"])
def test_autocast_runs_fused_with_peft_semantics(case, autocast_dtype):
    """Under torch.autocast (what Trainer's bf16=True / fp16=True does) on a float32 model the
    bridge serves every call fused and equals PEFT under the same autocast: the same output dtype
    (OFT: x's, float32; PSOFT: the autocast dtype), output and every gradient within the autocast
    dtype's row of the table.  PEFT builds R in float32 (its exact solve is not autocast; its
    Neumann powers are, which fastadapt keeps in float32) and runs the rotation / adapter products
    and the base GEMM in the autocast dtype."""
    model, layer = _peft_model(case, 48, 40, F32, seed=130)
    params = _adapter_params(layer)
    x = randn(7, 9, 48, dtype=F32, seed=133)
    assert_fused_equals_peft_under_autocast(model, params, x, autocast_dtype, cotangent_seed=134)


def test_autocast_oft_op_keeps_its_float32_parameter():
    """Inside oft_linear under autocast: x and W in the autocast dtype, packed (and so R and its
    gradient) in float32; the output in the autocast dtype."""
    x, W = randn(6, 16, dtype=F32, seed=135), randn(5, 16, dtype=F32, seed=136)
    packed = randn(2, ops.packed_size(8), dtype=F32, scale=0.05, requires_grad=True, seed=137)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.oft_linear(x, packed, 8, W, None)
    assert y.dtype == torch.bfloat16
    (grad,) = torch.autograd.grad(y.float().sum(), [packed])
    assert grad.dtype == F32
    expected = ref.OFTv2Reference(W.double(), None, packed.detach().double(), 8)(x.double())
    assert_rel_close(y, expected, torch.bfloat16, scale=2.0, name="y (x, W and y rounded to bf16)")


# ----------------------------------------------------------------------------- half precision


def _float64_truth(model, x_batches):
    """Output, dx and every adapter gradient of a float64 copy of ``model`` per batch."""
    reference = copy.deepcopy(model).double()
    return [_grads_of(reference, reference.base_model.model[0], x, seed=140 + i) for i, x in enumerate(x_batches)]


def _mean_errors(model, layer, x_batches, truth, dtype):
    """Mean over batches of the relative errors of (output, dx, adapter gradients) against ``truth``."""
    errors = [[rel_error(a.double(), e) for a, e in zip(_grads_of(model, layer, x.to(dtype), seed=140 + i), want)]
              for i, (x, want) in enumerate(zip(x_batches, truth))]
    return torch.tensor(errors).mean(0)


def _grads_of(model, layer, x, seed):
    x = x.clone().requires_grad_()
    y = model(x)
    params = _adapter_params(layer)
    return (y, *torch.autograd.grad(y, [x, *params], randn(*y.shape, seed=seed).to(y.dtype)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
@pytest.mark.parametrize("case", ["psoft", "psoft_neumann", "oft_exact", "oft_neumann"])
def test_half_base_runs_fused_and_is_no_less_accurate_than_peft(case, autocast_adapter_dtype, dtype):
    """A float16 / bfloat16 model with PEFT's defaults (float32 adapter; PSOFT's A and B are
    float32 either way) and with autocast_adapter_dtype=False: every call fused (no dtype
    fallback), and over 3 batches each output's and gradient's mean relative error against a
    float64 copy of the model is at most 1.5x PEFT's own."""
    model, layer = _peft_model(case, 40, 24, dtype, seed=150, autocast_adapter_dtype=autocast_adapter_dtype)
    batches = [randn(3, 7, 40, seed=151 + i) for i in range(3)]
    truth = _float64_truth(model, batches)
    peft_errors = _mean_errors(model, layer, batches, truth, dtype)
    report = fastadapt.accelerate(model)
    try:
        fused_errors = _mean_errors(model, layer, batches, truth, dtype)
    finally:
        fastadapt.revert(model)
    assert report.fused_calls == len(batches) and not report.fallbacks, str(report)
    names = ["output", "dx", *[n for n, p in layer.named_parameters() if p.requires_grad]]
    for name, fused, peft in zip(names, fused_errors.tolist(), peft_errors.tolist()):
        assert fused <= 1.5 * peft, f"{name}: error {fused:.2e} against PEFT's {peft:.2e}"


@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_ssvd_and_antipasto_on_a_half_base(dtype, autocast_adapter_dtype):
    """SSVD / AntiPaSTO on a float16 / bfloat16 base: float32 SVD factors, float32 parameters
    (or the base dtype with autocast_adapter_dtype=False), the adapter path in float32 rounded
    once; output and gradients against the float64 layer within the dtype's row (I/O rounding x2)."""
    base = linear_model(40, 24, dtype=F64, seed=160)[0].to(dtype)
    layer = layers.AntiPaSTOLinear(base, r=6, autocast_adapter_dtype=autocast_adapter_dtype)
    adapter_dtype = F32 if autocast_adapter_dtype else dtype
    assert layer.ssvd_Vh.dtype == F32 and layer.ssvd_R.weight.dtype == adapter_dtype
    randomize_(layer, scale=0.2, names=["ssvd_R"], seed=161)
    reference = copy.deepcopy(layer).double()
    x = randn(3, 7, 40, seed=162)
    for alpha in (1.0, torch.tensor([0.5, -1.0, 2.0])):
        got = _layer_grads(layer, x.to(dtype), alpha)
        want = _layer_grads(reference, x, alpha.double() if isinstance(alpha, torch.Tensor) else alpha)
        for name, a, e in zip(["y", "dx", "d ssvd_R.weight", "d delta_s"], got, want):
            assert a.dtype == (dtype if name in ("y", "dx") else adapter_dtype)
            assert_rel_close(a, e, dtype, scale=2.0, name=f"{name} (alpha {alpha})")


def _layer_grads(layer, x, alpha):
    x = x.clone().requires_grad_()
    y = layer(x, alpha)
    cotangent = randn(*y.shape, seed=163).to(y.dtype)
    grads = torch.autograd.grad(y, [x, layer.ssvd_R.weight, layer.ssvd_R.delta_s], cotangent)
    return (y, *grads)


# ----------------------------------------------------------------------------- Triton kernels
# On CPU these run in the interpreter (tests/conftest.py); shapes are tiny but legal when compiled.

triton_missing = pytest.mark.skipif(not fastadapt.backend.triton_available(), reason="triton is not installed")
INTERPRETED = fastadapt.backend.interpreter_mode()
# Every kernel in fp32, fp16 and bf16; bf16 only compiled (the interpreter has no bf16 arithmetic).
KERNEL_DTYPES = [F32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    INTERPRETED, reason="the Triton interpreter has no bf16 arithmetic"))]
# Small blocks, and the benchmark's b = 32 and 128 (128 x 128 register tiles when compiled).
KERNEL_BLOCKS = [4, 16, 32, 128]


def _half_scale(dtype):
    """Half I/O rounds the inputs and the output once each: twice the dtype's bound."""
    return 1.0 if dtype == F32 else 2.0


@triton_missing
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("block_size", [2, 5, 16, 128])
def test_triton_cayley_kernel_exact_and_neumann(block_size, dtype, device):
    """Loads in packed's dtype, eliminates / sums the series in fp32, stores in packed's dtype;
    the reference sees the same rounded packed values."""
    from fastadapt.triton_kernels import cayley as kernels
    packed = randn(3, ops.packed_size(block_size), scale=0.4 / block_size).to(dtype)
    Q = ref.skew(packed.double(), block_size)
    R = kernels.cayley_forward(packed.to(device), block_size)
    assert R.dtype == dtype
    assert_rel_close(R, ref.cayley(Q), dtype, scale=_half_scale(dtype), name="exact R")
    for terms in (1, 2, 3, 5):
        R = kernels.cayley_forward(packed.to(device), block_size, terms)
        assert_rel_close(R, ref.neumann(Q, terms), dtype, scale=_half_scale(dtype), name=f"neumann {terms}")


@triton_missing
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's numpy max over NaN
@pytest.mark.parametrize("solver", ["elimination", "newton_schulz"])
def test_triton_cayley_kernel_nan_in_q_gives_nan_out(solver, device):
    from fastadapt.triton_kernels import cayley as kernels
    packed = randn(2, ops.packed_size(8), scale=0.05, dtype=F32).to(device)
    packed[1, 3] = float("nan")
    R = kernels.cayley_forward(packed, 8, solver=solver)
    assert torch.isnan(R[1]).any() and torch.isfinite(R[0]).all()


# b = 128 with the elimination solver costs ~1.5 s per call in the interpreter: one case.
SOLVER_CASES = [(2, 0.5), (5, 3.0), (16, 0.02), (16, 10.0), (32, 1.0), (64, 10.0), (128, 1.0)]


@triton_missing
@pytest.mark.parametrize("block_size, entry_scale", SOLVER_CASES)
def test_triton_exact_cayley_solvers_equal_float64_reference(block_size, entry_scale, device):
    """Elimination and Newton-Schulz from small to large |Q| (entries ~ entry_scale: at b = 64 and
    entries ~10, ||Q||_2 ~ 160 and Newton-Schulz runs ~20 iterations).  Newton-Schulz keeps fp32
    accuracy (~3e-7) and R^T R = I for every |Q|; elimination's rounding grows with
    cond(I - Q) = sqrt(1 + ||Q||_2^2): measured 4e-6 .. 8e-6 (orthogonality 1e-4) at b = 64 with
    entries ~10, so there it is held to 3x the fp32 bound."""
    from fastadapt.triton_kernels import cayley as kernels
    packed = randn(3, ops.packed_size(block_size), scale=entry_scale, dtype=F32)
    expected = ref.cayley(ref.skew(packed.double(), block_size))
    R = kernels.cayley_forward(packed.to(device), block_size, solver="newton_schulz")
    assert_rel_close(R, expected, F32, name="newton_schulz R")
    assert float(ref.orthogonality_error(R.double().cpu())) < 1e-5 * block_size ** 0.5
    R = kernels.cayley_forward(packed.to(device), block_size, solver="elimination")
    assert_rel_close(R, expected, F32, scale=3.0 if entry_scale > 1 else 1.0, name="elimination R")


@triton_missing
def test_triton_newton_schulz_converges_for_huge_q(device):
    """Entries ~1e3 at b = 128 (||Q||_2 ~ 2e4, lam ~ 1e9): the tracked bound keeps its precision
    (1 - alpha rounds to 1 in fp32) and the iteration still reaches fp32 accuracy."""
    from fastadapt.triton_kernels import cayley as kernels
    packed = randn(2, ops.packed_size(128), scale=1e3, dtype=F32)
    R = kernels.cayley_forward(packed.to(device), 128, solver="newton_schulz")
    assert_rel_close(R, ref.cayley(ref.skew(packed.double(), 128)), F32, name="R")


@triton_missing
def test_triton_cayley_kernel_rejects_unknown_solver(device):
    from fastadapt.triton_kernels import cayley as kernels
    with pytest.raises(ValueError, match=r"solver='lu'.*elimination.*newton_schulz"):
        kernels.cayley_forward(randn(2, 6, dtype=F32).to(device), 4, solver="lu")


@triton_missing
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("block_size", [2, 5, 16, 32])
def test_triton_cayley_backward_kernel_equals_float64_autograd(block_size, dtype, device):
    """dL/dpacked in one launch: exact mode from R (Cayley derivative), Neumann mode from packed
    (k = 1, 2; Horner adjoint for k = 3, 6; closed form for PEFT's k = 5), against float64 autograd
    through the reference; grad_R a transposed (non-contiguous) view."""
    from fastadapt.triton_kernels import cayley as kernels
    packed = randn(3, ops.packed_size(block_size), scale=0.4 / block_size ** 0.5).to(dtype)
    grad_R = randn(3, block_size, block_size).to(dtype).transpose(-2, -1)
    scale = _half_scale(dtype)
    leaf = packed.double().requires_grad_()
    R64 = ref.cayley(ref.skew(leaf, block_size))
    (expected,) = torch.autograd.grad(R64, leaf, grad_R.double())
    actual = kernels.cayley_backward(R64.detach().to(device, dtype), grad_R.to(device), block_size)
    assert actual.dtype == dtype
    assert_rel_close(actual, expected, dtype, scale=2 * scale, name="exact dpacked")
    for terms in (1, 2, 3, 5, 6):
        actual = kernels.cayley_backward(packed.to(device), grad_R.to(device), block_size, terms)
        if terms == 1:
            assert not actual.any(), "R = I does not depend on Q"
            continue
        (expected,) = torch.autograd.grad(ref.neumann(ref.skew(leaf, block_size), terms), leaf, grad_R.double())
        assert_rel_close(actual, expected, dtype, scale=scale, name=f"neumann {terms} dpacked")


@triton_missing
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("block_size", KERNEL_BLOCKS)
def test_triton_block_rotate_kernels_strided_and_shared(dtype, block_size, device):
    from fastadapt.triton_kernels import cayley as kernels
    M, d = 37, 2 * block_size if block_size > 4 else 12
    n = d // block_size
    x = noncontig(randn(M, d)).to(device)
    g = randn(M, d).to(device)
    R = ref.cayley(ref.skew(randn(n, ops.packed_size(block_size), scale=0.3), block_size)).to(device)
    expected_y = torch.einsum("mnk,nkc->mnc", x.unflatten(1, (n, block_size)), R).flatten(1)
    expected_dR = torch.einsum("mnk,mnc->nkc", x.unflatten(1, (n, block_size)), g.unflatten(1, (n, block_size)))
    scale = _half_scale(dtype)
    xd, gd, Rd = noncontig(x.to(dtype)), g.to(dtype), R.to(dtype)
    assert_rel_close(kernels.block_rotate_forward(xd, Rd), expected_y, dtype, scale=scale, name="y")
    expected_t = torch.einsum("mnk,nck->mnc", x.unflatten(1, (n, block_size)), R).flatten(1)
    assert_rel_close(kernels.block_rotate_forward(xd, Rd.transpose(-2, -1)), expected_t, dtype, scale=scale,
                     name="y with R^T (dx)")
    assert_rel_close(kernels.block_rotate_backward_weight(xd, gd, block_size, splits=2), expected_dR, dtype,
                     scale=scale, name="dR")
    shared = R[:1]
    expected_shared = torch.einsum("mnk,kc->mnc", x.unflatten(1, (n, block_size)), shared[0]).flatten(1)
    assert_rel_close(kernels.block_rotate_forward(xd, shared.to(dtype)), expected_shared, dtype, scale=scale,
                     name="shared")


# (x dtype, adapter dtype): one dtype, and PEFT's float32 adapter on a half base
LAYOUTS = [(F32, F32), (torch.float16, torch.float16), (torch.float16, F32),
           *(pytest.param(torch.bfloat16, a, marks=pytest.mark.skipif(
               INTERPRETED, reason="the Triton interpreter has no bf16 arithmetic")) for a in (torch.bfloat16, F32))]


def _layer_in_layout(make, d_in, d_out, dtype, adapter_dtype, device, seed, names):
    """(layer on ``device`` in the layout, its float64 twin): a float32 adapter is built on the
    half base (fastadapt's layers follow PEFT's dtype rule); one dtype is the float64 layer cast."""
    base = linear_model(d_in, d_out, dtype=F64, seed=seed)[0]
    if adapter_dtype != dtype:
        layer = make(base.to(dtype))
        randomize_(layer, scale=0.05, names=names, seed=seed + 1)
        return layer.to(device), copy.deepcopy(layer).double()
    layer = make(base)
    randomize_(layer, scale=0.05, names=names, seed=seed + 1)
    twin = copy.deepcopy(layer)
    return layer.to(device, dtype), twin


@triton_missing
@pytest.mark.parametrize("dtype, adapter_dtype", LAYOUTS)
@pytest.mark.parametrize("neumann", [False, True])
def test_triton_backend_oft_layer_output_and_gradients(neumann, dtype, adapter_dtype, monkeypatch, device):
    from fastadapt.triton_kernels import cayley as kernels
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    launches = []
    for name in ("cayley_forward", "cayley_backward", "block_rotate_forward", "block_rotate_backward_weight"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name, **k: launches.append(_n) or _f(*a, **k))
    layer, twin = _layer_in_layout(lambda base: layers.OFTLinear(base, oft_block_size=16, use_cayley_neumann=neumann),
                                   32, 16, dtype, adapter_dtype, device, seed=170, names=["oft_R"])
    assert layer.oft_R.weight.dtype == adapter_dtype
    base = twin.base_layer
    reference = ref.OFTv2Reference(base.weight, base.bias, twin.oft_R.weight, 16, use_cayley_neumann=neumann)
    x = randn(2, 9, 32, seed=172)
    y_ref, (dx_ref, dR_ref) = _grads(reference, x, [reference.packed])
    y, (dx, dR) = _grads(layer, x.to(device, dtype), [layer.oft_R.weight])
    scale = _half_scale(dtype)
    assert y.dtype == dx.dtype == dtype and dR.dtype == adapter_dtype
    assert_rel_close(y, y_ref, dtype, scale=scale, name="y")
    assert_rel_close(dx, dx_ref, dtype, scale=scale, name="dx")
    assert_rel_close(dR, dR_ref, dtype, scale=2.0 * scale, name="doft_R")
    # packed -> R and dL/dR -> dL/dpacked are one launch each; Neumann mode keeps no R and reruns
    # its series (a few tile products) in the backward, exact mode keeps R (or its symmetric part)
    expected = ["cayley_backward", "cayley_forward"] + (["cayley_forward"] if neumann else [])
    assert sorted(n for n in launches if n.startswith("cayley")) == expected
    assert {"block_rotate_forward", "block_rotate_backward_weight"} <= set(launches)


HALF_KERNEL_DTYPES = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    INTERPRETED, reason="the Triton interpreter has no bf16 arithmetic"))]


@triton_missing
@pytest.mark.parametrize("dtype", HALF_KERNEL_DTYPES)
def test_triton_float32_adapter_on_half_x_is_a_float32_product(dtype, device):
    """PEFT's float32 R / A on a half x: the kernels split the float32 operand into two half ones
    (two tensor-core products).  svd_core's z = x A^T (stored in float32) meets the fp32 row; the
    rotation's half output is the float64 product rounded once (an R rounded to the half dtype
    would change the rounding of most entries)."""
    from fastadapt.triton_kernels import cayley as kernels
    x = randn(37, 64, seed=200).to(dtype)
    A, C = randn(24, 64, scale=0.2, seed=201), randn(24, 24, scale=0.2, seed=202)
    z, u = kernels.svd_core_forward(x.to(device), A.float().to(device), C.float().to(device))
    assert z.dtype == u.dtype == F32
    assert_rel_close(z, x.double() @ A.float().double().T, F32, scale=2.0, name="z")
    assert_rel_close(u, x.double() @ A.float().double().T @ C.float().double().T, F32, scale=2.0, name="u")
    R = ref.cayley(ref.skew(randn(4, ops.packed_size(16), scale=0.1, seed=203), 16)).float()
    y = kernels.block_rotate_forward(x.to(device), R.to(device))
    exact = torch.einsum("mnk,nkc->mnc", x.double().unflatten(1, (4, 16)), R.double()).flatten(1).to(dtype)
    mismatched = (y.cpu() != exact).double().mean()
    assert mismatched < 0.02, f"{float(mismatched):.1%} of the outputs round differently from the float64 product"


@triton_missing
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("r", [5, 100])  # one column chunk of C^T, and four (BLOCK_R = 128, 16 rows per program)
def test_triton_svd_core_kernel_strided(dtype, device, r):
    from fastadapt.triton_kernels import cayley as kernels
    x, A, C = randn(37, 40), randn(r, 40, scale=0.2), randn(r, r, scale=r ** -0.5)
    z, u = kernels.svd_core_forward(noncontig(x.to(device, dtype)), A.to(device, dtype), C.to(device, dtype))
    scale = 1.0 if dtype == F32 else 2.0
    assert_rel_close(z, x @ A.T, dtype, scale=scale, name="z")
    assert_rel_close(u, x @ A.T @ C.T, dtype, scale=scale, name="u")


@triton_missing
@pytest.mark.parametrize("dtype, adapter_dtype", LAYOUTS)
def test_triton_backend_psoft_layer_output_and_gradients(dtype, adapter_dtype, monkeypatch, device):
    from fastadapt.triton_kernels import cayley as kernels
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    launches = []
    original = kernels.svd_core_forward
    monkeypatch.setattr(kernels, "svd_core_forward", lambda *a: launches.append(1) or original(*a))
    layer, twin = _layer_in_layout(lambda base: layers.PSOFTLinear(base, r=6, psoft_alpha=12), 40, 24, dtype,
                                   adapter_dtype, device, seed=175, names=["psoft_R.weight"])
    assert layer.psoft_A.dtype == layer.psoft_R.weight.dtype == adapter_dtype
    reference = psoft_reference(twin)
    x = randn(3, 11, 40, seed=177)
    y_ref, (dx_ref, dR_ref) = _grads(reference, x, [reference.packed])
    y, (dx, dR) = _grads(layer, x.to(device, dtype), [layer.psoft_R.weight])
    assert launches, "the Triton SVD-core kernel did not run"
    scale = _half_scale(dtype)
    assert y.dtype == dx.dtype == dtype and dR.dtype == adapter_dtype
    assert_rel_close(y, y_ref, dtype, scale=scale, name="y")
    assert_rel_close(dx, dx_ref, dtype, scale=scale, name="dx")
    assert_rel_close(dR, dR_ref, dtype, scale=2.0 * scale, name="dpsoft_R")
