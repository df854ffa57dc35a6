"""dora_norm family: factored norm, fused DoRA / DeLoRA Functions, the PEFT bridge entries.

PEFT parity runs in float64 through ``fastadapt.accelerate`` (outputs and every gradient, r in
{4, 16, 64}, with and without bias, dropout 0 and 0.1 with the same seed on both sides); on the
triton backend (forced here, the interpreter on CPU) dropout 0.1 against PEFT whose dropout module
multiplies by the same fixed Philox mask.
"""
import copy

import pytest
import torch
from peft import DeloraConfig, LoraConfig, get_peft_model
from torch import nn

import fastadapt
from fastadapt.layers import dora as dora_layers
from fastadapt.numerics import assert_rel_close, rel_error
from fastadapt.ops import dora_norm as ops
from fastadapt.reference.dora import DeLoRA, DoRA
from fastadapt.testing import DTYPES, linear_model, noncontig, randn, randomize_

D_IN, D_OUT = 97, 83


def dora_model(r, *, bias=True, dropout=0.0, dtype=torch.float64, d_in=D_IN, d_out=D_OUT, autocast=True):
    model = get_peft_model(linear_model(d_in, d_out, bias=bias, dtype=dtype),
                           LoraConfig(r=r, lora_alpha=3 * r, use_dora=True, target_modules=["0"],
                                      lora_dropout=dropout), autocast_adapter_dtype=autocast)
    randomize_(model, names=["lora_B"], scale=0.3)
    randomize_(model, names=["lora_magnitude_vector"], scale=1.0)
    return model, model.base_model.model[0]


def delora_model(r, *, bias=True, dropout=0.0, dtype=torch.float64, autocast=True):
    model = get_peft_model(linear_model(D_IN, D_OUT, bias=bias, dtype=dtype),
                           DeloraConfig(r=r, delora_lambda=5, init_weights=False, target_modules=["0"],
                                        module_dropout=dropout), autocast_adapter_dtype=autocast)
    return model, model.base_model.model[0]


def run(model, params, x, dy, seed=11):
    torch.manual_seed(seed)
    y = model(x)
    return [y, *torch.autograd.grad(y, [x, *params], dy)]


def dora_params(layer):
    return [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
            layer.lora_magnitude_vector["default"].weight]


def delora_params(layer):
    return [layer.delora_A["default"], layer.delora_B["default"], layer.delora_lambda["default"]]


def assert_all_close(actual, expected, names):
    for name, a, e in zip(names, actual, expected):
        assert_rel_close(a, e, name=name)


# ------------------------------------------------------------------------------------------ norm

@pytest.mark.parametrize("dtype", (torch.float64, *DTYPES))
def test_factored_norm_matches_dense_norm(dtype):
    ref = DoRA(randn(37, 45), None, randn(5, 45, scale=0.3), randn(37, 5, scale=0.3), randn(37), 1.7)
    cast = [t.to(dtype) for t in (ref.weight, ref.lora_A, ref.lora_B)]
    norm = ops.dora_weight_norm(*cast, ref.scaling)
    assert_rel_close(norm, ref.weight_norm(), dtype)


def test_weight_sq_norm_cache_invalidates():
    w = nn.Parameter(randn(9, 7), requires_grad=False)
    cache = ops.RowSqNormCache()
    first = cache.get(w)
    assert cache.get(w) is first
    with torch.no_grad():
        w.mul_(2)
    assert_rel_close(cache.get(w), 4 * first)
    w.data = randn(9, 7)  # what PEFT's DoRA merge / unmerge do
    assert_rel_close(cache.get(w), w.detach().square().sum(1))


def test_zero_norm_row_is_finite():
    """W_j = 0 and B_j = 0 (LoRA's B init): PEFT divides 0 by 0; the eps (1e-12) keeps it finite."""
    model, layer = dora_model(4)
    base = layer.get_base_layer()
    with torch.no_grad():
        base.weight[3].zero_()
        layer.lora_B["default"].weight[3].zero_()
        layer.lora_magnitude_vector["default"].weight[3] = 0.0
    x, dy = randn(5, D_IN, requires_grad=True), randn(5, D_OUT)
    expected = run(model, dora_params(layer), x, dy)
    assert torch.isnan(expected[0][:, 3]).all()  # PEFT's behaviour (peft#2049)
    fastadapt.accelerate(model)
    got = run(model, dora_params(layer), x, dy)
    assert all(torch.isfinite(g).all() for g in got)
    keep = [i for i in range(D_OUT) if i != 3]
    assert_rel_close(got[0][:, keep], expected[0][:, keep], name="output")
    assert_rel_close(got[0][:, 3], base.bias[3].expand(5), name="zero row")


@pytest.mark.parametrize("shape", [(3, 7, 5), (16, 8)])
def test_dropout_mask_is_nn_dropouts_and_packs_to_bits(shape):
    x = randn(*shape, dtype=torch.float32)
    torch.manual_seed(5)
    expected = torch.nn.functional.dropout(x, 0.3, training=True)
    torch.manual_seed(5)
    mask, packed = ops.draw_dropout(x, 0.3)
    assert torch.equal(x * mask, expected)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-x.numel() // 8)
    assert torch.equal(ops.unpack_dropout(packed, x.shape, x.dtype, 0.3), mask)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_blocked_colsum_products(monkeypatch, dtype):
    """The backward's row-blocked reductions (4 rows here: 23 rows = 5 full blocks and a partial
    one): colsum(a o b) and colsum(dY o (x W^T)) equal float64; and every gradient of both DoRA
    modes through the blocked paths (dy_row_pass: v, u^T dY and dm's colsum) equals the reference's."""
    for name in ("_COLSUM_BLOCK_ELEMENTS", "_LINEAR_BLOCK_ELEMENTS", "_DY_BLOCK_ELEMENTS"):
        monkeypatch.setattr(ops, name, 4 * 13)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    a, b, x, w = (randn(*shape).to(dtype) for shape in ((23, 13), (23, 13), (23, 9), (13, 9)))
    a64, b64, x64, w64 = (t.double() for t in (a, b, x, w))
    assert_rel_close(ops.colsum_product(a, b, acc), (a64 * b64).sum(0), acc, name="colsum(a o b)")
    linear_tol = dtype if dtype == torch.bfloat16 else acc  # a half GEMM rounds its output
    assert_rel_close(ops.colsum_product_linear(a, x, w, acc), (a64 * (x64 @ w64.T)).sum(0), linear_tol,
                     name="colsum(dY o x W^T)")
    if dtype != torch.float64:
        return
    ref = DoRA(randn(13, 9), randn(13), randn(3, 9, scale=0.3), randn(13, 3, scale=0.3), randn(13), 1.3)
    x_in, dy = randn(23, 9, requires_grad=True), randn(23, 13)
    y_ref = ref(x_in)
    expected = torch.autograd.grad(y_ref, [x_in, ref.lora_A, ref.lora_B, ref.magnitude], dy)
    for recompute in (False, True):
        params = [t.detach().clone().requires_grad_() for t in (ref.lora_A, ref.lora_B, ref.magnitude)]
        y = ops.dora_linear(x_in, ref.weight, ref.bias, *params, ref.scaling, recompute=recompute)
        got = torch.autograd.grad(y, [x_in, *params], dy)
        for name, g, e in zip(["x", "A", "B", "m"], got, expected):
            assert_rel_close(g, e, name=f"d{name} recompute={recompute}")


# ------------------------------------------------------------------------------ autograd / gradcheck

@pytest.mark.parametrize("mode", ["default", "recompute", "dropout", "dropout_recompute"])
def test_dora_function_gradcheck(mode):
    r, d_in, d_out = 3, 6, 5
    w, b = randn(d_out, d_in), randn(d_out)
    args = [randn(4, d_in, requires_grad=True), randn(r, d_in, requires_grad=True),
            randn(d_out, r, requires_grad=True), randn(d_out, requires_grad=True), b.requires_grad_()]
    p = 0.3 if mode.startswith("dropout") else 0.0
    norm = ops.dora_weight_norm(w, args[1], args[2], 1.3)  # a constant, as in PEFT (detached)

    def f(x, a, bb, m, bias):
        torch.manual_seed(0)  # the same dropout mask on every call
        plan = ops.DoraPlan(1.3, p, recompute=mode.endswith("recompute"))
        return ops.DoraLinearFunction.apply(x, w, bias, a, bb, m, norm, plan)

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_delora_function_gradcheck(p):
    r, d_in, d_out = 3, 6, 5
    w = randn(d_out, d_in)
    args = [randn(4, d_in, requires_grad=True), randn(r, d_in, requires_grad=True),
            randn(d_out, r, requires_grad=True), randn(1, requires_grad=True).abs(), randn(d_out, requires_grad=True)]
    w_norm = w.norm(dim=0)

    def f(x, a, bb, lam, bias):
        torch.manual_seed(0)
        return ops.delora_linear(x, w, bias, a, bb, lam, w_norm, dropout_p=p)

    assert torch.autograd.gradcheck(f, args)


# ------------------------------------------------------------------------------------- PEFT parity

@pytest.mark.parametrize("r", [4, 16, 64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dora_equals_peft(r, bias, dropout):
    model, layer = dora_model(r, bias=bias, dropout=dropout)
    model.train()
    x, dy = randn(2, 13, D_IN, requires_grad=True), randn(2, 13, D_OUT)
    expected = run(model, dora_params(layer), x, dy)
    report = fastadapt.accelerate(model)
    got = run(model, dora_params(layer), x, dy)
    assert report.fused_calls == 1 and not report.fallbacks and not report.notes  # CPU: nn.Dropout's own mask
    assert_all_close(got, expected, ["output", "x", "A", "B", "m"])
    layer.scaling["default"] = 0.7  # read at call time
    fused = run(model, dora_params(layer), x, dy)
    fastadapt.revert(model)
    assert_all_close(fused, run(model, dora_params(layer), x, dy), ["output", "x", "A", "B", "m"])


def test_dora_recompute_equals_default():
    model, layer = dora_model(8)
    base = layer.get_base_layer()
    x, dy = randn(21, D_IN, requires_grad=True), randn(21, D_OUT)
    params = dora_params(layer)
    outs = []
    for recompute in (False, True):
        y = ops.dora_linear(x, base.weight, base.bias, *params[:2], params[2], layer.scaling["default"],
                            recompute=recompute)
        outs.append([y, *torch.autograd.grad(y, [x, *params], dy)])
    assert_all_close(outs[1], outs[0], ["output", "x", "A", "B", "m"])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_set_recompute_through_the_bridge_equals_peft(dropout):
    model, layer = dora_model(16, dropout=dropout)
    model.train()
    x, dy = randn(17, D_IN, requires_grad=True), randn(17, D_OUT)
    expected = run(model, dora_params(layer), x, dy)
    fastadapt.accelerate(model)
    assert dora_layers.set_recompute(model) == 1
    assert_all_close(run(model, dora_params(layer), x, dy), expected, ["output", "x", "A", "B", "m"])


def test_dora_fan_in_fan_out_equals_peft():
    from transformers.pytorch_utils import Conv1D
    base = Conv1D(nf=D_OUT, nx=D_IN).to(torch.float64)
    randomize_(base, scale=0.2)
    model = get_peft_model(nn.Sequential(base), LoraConfig(r=8, use_dora=True, target_modules=["0"],
                                                           fan_in_fan_out=True))
    randomize_(model, names=["lora_B"], scale=0.3)
    layer = model.base_model.model[0]
    x, dy = randn(11, D_IN, requires_grad=True), randn(11, D_OUT)
    expected = run(model, dora_params(layer), x, dy)
    report = fastadapt.accelerate(model)
    got = run(model, dora_params(layer), x, dy)
    assert report.fused_calls == 1 and not report.fallbacks
    assert_all_close(got, expected, ["output", "x", "A", "B", "m"])


@pytest.mark.parametrize("r", [4, 16, 64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_delora_equals_peft(r, bias, dropout):
    model, layer = delora_model(r, bias=bias, dropout=dropout)
    model.train()
    x, dy = randn(2, 13, D_IN, requires_grad=True), randn(2, 13, D_OUT)
    expected = run(model, delora_params(layer), x, dy)
    report = fastadapt.accelerate(model)
    got = run(model, delora_params(layer), x, dy)
    assert report.fused_calls == 1 and not report.fallbacks and not report.notes  # CPU: nn.Dropout's own mask
    assert_all_close(got, expected, ["output", "x", "A", "B", "lambda"])


def lambda_condition(ref, x64, mask, dy):
    """Condition number of dlambda = sum_{t,i} dY_t B_:,i u_ti / (r ||A_i|| ||B_:,i||): the ratio of
    the sum of |terms| to |sum|, by which any low-precision evaluation's relative error grows."""
    with torch.no_grad():
        u = nn.functional.linear(x64 * mask * ref.delora_w_norm, ref.delora_A)
        terms = (dy @ ref.delora_B) * u * (ref.component_scale() / ref.delora_lambda)
        return float(terms.abs().sum() / terms.sum().abs())


@pytest.mark.parametrize("method", ["dora", "delora"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_low_precision_matches_float64_like_peft(method, dtype):
    """PEFT's setup with autocast_adapter_dtype=False (adapter in the model's dtype) and dropout:
    the output and every gradient are within the table of the float64 truth (same mask); the
    scalar dlambda's bound is scaled by its sum's condition number, which PEFT needs as well."""
    build, reference = (dora_model, DoRA) if method == "dora" else (delora_model, DeLoRA)
    model, layer = build(16, dropout=0.1, dtype=dtype, autocast=False)
    params = dora_params(layer) if method == "dora" else delora_params(layer)
    x, dy = randn(3, 11, D_IN, dtype=dtype, requires_grad=True), randn(3, 11, D_OUT, dtype=dtype)
    ref = reference.from_peft(layer)
    torch.manual_seed(11)
    mask, _ = ops.draw_dropout(x, 0.1)  # the mask the fused run draws after manual_seed(11)
    x64 = x.detach().double().requires_grad_()
    y64 = ref(x64, dropout_mask=mask.double())
    ref_params = [ref.lora_A, ref.lora_B, ref.magnitude] if method == "dora" else \
        [ref.delora_A, ref.delora_B, ref.delora_lambda]
    truth = [y64, *torch.autograd.grad(y64, [x64, *ref_params], dy.double())]
    report = fastadapt.accelerate(model)
    fused = run(model, params, x, dy)
    assert report.fused_calls == 1 and not report.fallbacks
    scales = [1, 1, 1, 1, lambda_condition(ref, x64.detach(), mask.double(), dy.double()) if method == "delora" else 1]
    for name, got, true, scale in zip(["output", "x", "A", "B", "m or lambda"], fused, truth, scales):
        assert_rel_close(got, true, dtype, scale=scale, name=name)


AUTOCAST_MODES = ["dora", "dora_recompute", "dora_dropout", "dora_dropout_recompute", "delora", "delora_dropout"]


@pytest.mark.parametrize("mode", AUTOCAST_MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_adapter_on_half_base_matches_peft(mode, dtype):
    """PEFT's default autocast_adapter_dtype=True on a bf16 / fp16 base: the adapter stays float32.
    Fused (no fallback): output and every gradient have PEFT's dtypes, and both PEFT and fused are
    within the dtype's tolerance of the float64 truth of the same math with the same mask (DoRA
    draws it on the float32 copy of x, as PEFT's dropout(x.to(float32)); DeLoRA on x itself)."""
    method = mode.split("_")[0]
    dropout = 0.1 if "dropout" in mode else 0.0
    build, reference = (dora_model, DoRA) if method == "dora" else (delora_model, DeLoRA)
    model, layer = build(16, dropout=dropout, dtype=dtype)
    params = dora_params(layer) if method == "dora" else delora_params(layer)
    assert all(p.dtype == torch.float32 for p in params) and layer.get_base_layer().weight.dtype == dtype
    x, dy = randn(3, 11, D_IN, dtype=dtype, requires_grad=True), randn(3, 11, D_OUT, dtype=dtype)
    peft_out = run(model, params, x, dy)
    torch.manual_seed(11)
    mask = ops.draw_dropout(x.detach().float() if method == "dora" else x.detach(), dropout)[0].double() \
        if dropout else torch.ones(())
    ref = reference.from_peft(layer)
    x64 = x.detach().double().requires_grad_()
    y64 = ref(x64, dropout_mask=mask) if dropout else ref(x64)
    ref_params = [ref.lora_A, ref.lora_B, ref.magnitude] if method == "dora" else \
        [ref.delora_A, ref.delora_B, ref.delora_lambda]
    truth = [y64, *torch.autograd.grad(y64, [x64, *ref_params], dy.double())]
    report = fastadapt.accelerate(model)
    if mode.endswith("recompute"):
        dora_layers.set_recompute(model)
    fused = run(model, params, x, dy)
    assert report.fused_calls == 1 and not report.fallbacks
    scale = lambda_condition(ref, x64.detach(), mask, dy.double()) if method == "delora" else 1
    for name, got, want, true, sc in zip(["output", "x", "A", "B", "m or lambda"], fused, peft_out, truth,
                                         [1, 1, 1, 1, scale]):
        assert got.dtype == want.dtype, name
        assert_rel_close(want, true, dtype, scale=sc, name=f"PEFT {name}")
        assert_rel_close(got, true, dtype, scale=sc, name=f"fused {name}")


# Every kernel in fp32, fp16 and bf16; bf16 only compiled (the interpreter has no bf16 arithmetic).
INTERPRETED = fastadapt.backend.interpreter_mode()
KERNEL_DTYPES = [torch.float32, torch.float16, pytest.param(
    torch.bfloat16, marks=pytest.mark.skipif(INTERPRETED, reason="the Triton interpreter does no bf16 arithmetic"))]


def _half_scale(dtype):
    """Half I/O rounds the inputs and the output once each: twice the dtype's bound."""
    return 1.0 if dtype == torch.float32 else 2.0


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_forced_triton_backend_runs_the_kernels(monkeypatch, device, dtype):
    """FASTADAPT_BACKEND=triton: the norm kernel and the fused scaled GEMM (forward and dx) run
    (the interpreter on CPU; on a GPU the launchers' default tiles and the autotuned GEMM); output
    and every gradient match the float64 reference.  The forward GEMM stores y and y_pre (saved)
    from one epilogue in every dtype; backward's row pass gives v, u^T dY and dm's column sum.
    fp32 tl.dot runs IEEE."""
    from fastadapt.triton_kernels import dora_norm as kernels
    calls = []
    for name in ("dora_norm_forward", "scaled_lowrank_gemm", "dora_dy_row_pass"):
        launcher = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=launcher, _n=name, **k: calls.append(_n) or _f(*a, **k))
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    ref = DoRA(randn(19, 24), randn(19), randn(4, 24, scale=0.3), randn(19, 4, scale=0.3), randn(19), 1.5)
    params = [t.to(dtype, copy=True).to(device) for t in (ref.lora_A, ref.lora_B, ref.magnitude)]
    for p in params:
        p.requires_grad_()
    x, dy = randn(21, 24, requires_grad=True), randn(21, 19)
    x_low = x.detach().to(dtype).to(device).requires_grad_()
    y = ops.dora_linear(x_low, ref.weight.to(dtype).to(device), ref.bias.to(dtype).to(device), *params,
                        ref.scaling)
    got = [y, *torch.autograd.grad(y, [x_low, *params], dy.to(dtype).to(device))]
    y_ref = ref(x)
    expected = [y_ref, *torch.autograd.grad(y_ref, [x, ref.lora_A, ref.lora_B, ref.magnitude], dy)]
    for name, g, e in zip(["output", "x", "A", "B", "m"], got, expected):
        assert_rel_close(g, e, dtype, scale=_half_scale(dtype), name=name)
    assert sorted(set(calls)) == ["dora_dy_row_pass", "dora_norm_forward", "scaled_lowrank_gemm"]
    assert calls.count("scaled_lowrank_gemm") == 2  # forward and dx


def test_delora_clamped_norms_equal_peft():
    """A zero row of delora_A and a zero column of delora_B hit PEFT's 1e-4 clamp (no gradient)."""
    model, layer = delora_model(8)
    with torch.no_grad():
        layer.delora_A["default"][2].zero_()
        layer.delora_B["default"][:, 5].zero_()
    x, dy = randn(9, D_IN, requires_grad=True), randn(9, D_OUT)
    expected = run(model, delora_params(layer), x, dy)
    fastadapt.accelerate(model)
    got = run(model, delora_params(layer), x, dy)
    assert all(torch.isfinite(g).all() for g in got)
    assert_all_close(got, expected, ["output", "x", "A", "B", "lambda"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_against_float64_reference(dtype):
    ref = DoRA(randn(D_OUT, D_IN, scale=0.1), randn(D_OUT), randn(8, D_IN, scale=0.1), randn(D_OUT, 8, scale=0.1),
               randn(D_OUT).abs() + 0.5, 2.0)
    x = noncontig(randn(3, 7, D_IN).to(dtype))
    cast = [t.to(dtype) for t in (ref.weight, ref.bias, ref.lora_A, ref.lora_B, ref.magnitude)]
    assert_rel_close(ops.dora_linear(x, *cast, ref.scaling), ref(x.double()), dtype)
    dref = DeLoRA.demo(D_IN, D_OUT, 8)
    cast = [t.to(dtype) for t in (dref.weight, dref.bias, dref.delora_A, dref.delora_B, dref.delora_lambda,
                                  dref.delora_w_norm)]
    assert_rel_close(ops.delora_linear(x, *cast), dref(x.double()), dtype)


def test_dora_merge_unmerge_round_trip():
    model, layer = dora_model(8)
    model.eval()
    x = randn(6, D_IN)
    expected = model(x)
    report = fastadapt.accelerate(model)
    assert_rel_close(model(x), expected)
    layer.merge()
    assert_rel_close(model(x), expected, name="merged")
    layer.unmerge()
    assert_rel_close(model(x), expected, name="unmerged")
    assert report.fused_calls == 2 and report.fallbacks["merged layer"] == 1
    with torch.no_grad():  # any write to W invalidates the cached ||W||^2
        layer.get_base_layer().weight.mul_(1.5)
    fused = model(x)
    fastadapt.revert(model)
    assert_rel_close(fused, model(x), name="after weight write")


# ------------------------------------------------------------------------------------- memory

def saved_ratio(fn, x, params):
    """Bytes of unique storages autograd saves, except the parameters' and buffers', per bytes(x)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / (x.numel() * x.element_size())


@pytest.mark.parametrize("kind", ["dora", "dora_recompute", "dora_dropout", "dora_dropout_recompute", "delora",
                                  "delora_dropout", "triton_dora", "triton_dora_dropout",
                                  "triton_dora_dropout_recompute", "triton_delora_dropout"])
def test_saved_activation_bytes(monkeypatch, device, kind):
    """Exactly x (+ the output or y_pre by default) + u (N x r) + the norm (out,) + 1 bit per
    element of x for the torch backend's dropout mask; the triton backend saves y_pre and no mask
    (an int seed); the issue's bounds (2.05 / 1.05 at r/in = 16/1024) follow."""
    triton = kind.startswith("triton")
    if triton:
        monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    dev = device if triton else "cpu"
    n, d, r = 64, 128, 4
    f32 = dict(dtype=torch.float32, device=dev)
    x = randn(n, d, **f32, requires_grad=True)
    w, b = randn(d, d, **f32), randn(d, **f32)
    a, bb = randn(r, d, **f32, requires_grad=True), randn(d, r, **f32, requires_grad=True)
    dropout = 0.1 if "dropout" in kind else 0.0
    mask_bits = 1 / 32 if dropout and not triton else 0
    if "delora" in kind:
        lam, w_norm = randn(1, **f32, requires_grad=True), w.norm(dim=0)
        ratio = saved_ratio(lambda: ops.delora_linear(x, w, b, a, bb, lam, w_norm, dropout_p=dropout), x,
                            [w, b, a, bb, lam, w_norm])
        assert ratio == pytest.approx(1 + r / d + mask_bits)
        return
    m = randn(d, **f32, requires_grad=True)
    ratio = saved_ratio(lambda: ops.dora_linear(x, w, b, a, bb, m, 2.0, dropout_p=dropout,
                                                recompute="recompute" in kind), x, [w, b, a, bb, m])
    activations = 1 if "recompute" in kind else 2
    assert ratio == pytest.approx(activations + r / d + 1 / n + mask_bits)


# ------------------------------------------------------------------------------------- bad input

def test_magnitude_length_mismatch_names_parameter_and_shapes():
    model, layer = dora_model(4)
    layer.lora_magnitude_vector["default"].weight = nn.Parameter(randn(D_OUT - 2))
    fastadapt.accelerate(model)
    with pytest.raises(ValueError, match=rf"lora_magnitude_vector.*\({D_OUT - 2},\).*\({D_OUT},\)"):
        model(randn(3, D_IN))


def test_rank_above_min_features():
    w = randn(6, 9)
    with pytest.raises(ValueError, match="r=7"):
        ops.dora_weight_norm(w, randn(7, 9), randn(6, 7), 1.0)
    with pytest.raises(ValueError, match="r=7"):
        ops.delora_linear(randn(2, 9), w, None, randn(7, 9), randn(6, 7), randn(1), randn(9))


def test_nan_in_adapter_gives_nan_not_hang():
    model, layer = dora_model(4)
    with torch.no_grad():
        layer.lora_A["default"].weight[0, 0] = float("nan")
    fastadapt.accelerate(model)
    assert torch.isnan(model(randn(3, D_IN))).any()


def test_fallback_reasons():
    """Dtype mixes other than PEFT's autocast (float32 adapter on a half base) run PEFT's forward,
    with the reason counted."""
    model, layer = dora_model(4, dtype=torch.float32)
    for module in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
        module.to(torch.bfloat16)  # a bf16 adapter on a float32 base: PEFT casts x down
    report = fastadapt.accelerate(model)
    model(randn(3, D_IN, dtype=torch.float32))
    assert any("adapter dtype torch.bfloat16 on a torch.float32 base" in why for why in report.fallbacks)
    model, layer = dora_model(4, dtype=torch.bfloat16)
    layer.cast_input_dtype_enabled = False
    assert "cast_input_dtype_enabled=False" in dora_layers.dora_check(layer, "default", randn(3, D_IN).bfloat16())
    model, layer = delora_model(4, dtype=torch.float32)
    layer.delora_B["default"].data = layer.delora_B["default"].data.to(torch.bfloat16)
    assert "adapter tensors have mixed dtypes" in dora_layers.delora_check(layer, "default", randn(3, D_IN).float())


# ------------------------------------------------------------------------------ Triton norm kernel

@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("r, cached", [(5, True), (16, False)])
@pytest.mark.parametrize("tiles", [(16, 32), (None, None)])  # None: the launcher's default for the device
def test_triton_norm_kernel_matches_reference(device, dtype, r, cached, tiles):
    from fastadapt.triton_kernels.dora_norm import dora_norm_forward
    block_m, block_k = tiles
    ref = DoRA(randn(40, 72), None, randn(r, 72, scale=0.3), randn(40, r, scale=0.3), randn(40), 1.7)
    w, a, b = (t.to(dtype=dtype, device=device) for t in (ref.weight, ref.lora_A, ref.lora_B))
    w_sq = ops.weight_row_sq_norm(w) if cached else None
    norm = dora_norm_forward(w, a, b, ref.scaling, w_sq, block_m=block_m, block_k=block_k)
    assert_rel_close(norm, ref.weight_norm(), dtype)
    assert_rel_close(dora_norm_forward(w.T.contiguous().T, a, b, ref.scaling, w_sq, block_m=block_m, block_k=block_k),
                     ref.weight_norm(), dtype, name="strided W")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_forced_triton_backend_delora(monkeypatch, device, dtype):
    """FASTADAPT_BACKEND=triton: DeLoRA's forward and dx run the fused GEMM; all gradients match
    (dlambda, a scalar sum, within its condition number times the table, as PEFT needs too)."""
    from fastadapt.triton_kernels import dora_norm as kernels
    calls = []
    launcher = kernels.scaled_lowrank_gemm
    monkeypatch.setattr(kernels, "scaled_lowrank_gemm", lambda *a, **k: calls.append(1) or launcher(*a, **k))
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    ref = DeLoRA.demo(24, 19, 4)
    cast = lambda t: t.detach().to(dtype).to(device)  # noqa: E731
    params = [cast(t).requires_grad_() for t in (ref.delora_A, ref.delora_B, ref.delora_lambda)]
    x, dy = randn(21, 24, requires_grad=True), randn(21, 19)
    x_low = cast(x).requires_grad_()
    y = ops.delora_linear(x_low, cast(ref.weight), cast(ref.bias), *params, cast(ref.delora_w_norm))
    got = [y, *torch.autograd.grad(y, [x_low, *params], cast(dy))]
    y_ref = ref(x)
    expected = [y_ref, *torch.autograd.grad(y_ref, [x, ref.delora_A, ref.delora_B, ref.delora_lambda], dy)]
    scales = [1, 1, 1, 1, lambda_condition(ref, x.detach(), torch.ones(()), dy)]
    for name, g, e, sc in zip(["output", "x", "A", "B", "lambda"], got, expected, scales):
        assert_rel_close(g, e, dtype, scale=_half_scale(dtype) * sc, name=name)
    assert len(calls) == 2  # forward and dx


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_triton_scaled_lowrank_gemm_matches_reference(device, dtype):
    """C = so o (x diag(sk) y + u v) + b: DoRA's forward (scale epilogue) and dx (scale on load)."""
    from fastadapt.triton_kernels.dora_norm import scaled_lowrank_gemm
    m, k, n, r = 37, 40, 29, 5
    x, w, u, b_lr = (randn(*s) for s in ((m, k), (n, k), (m, r), (n, r)))
    g, bias = randn(n).abs() + 0.5, randn(n)
    cast = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    x_strided = noncontig(cast(x))
    y, y_pre = scaled_lowrank_gemm(x_strided, cast(w).T, cast(u), cast(b_lr).T, out_scale=g.float().to(device),
                                   bias=cast(bias), with_pre=True)
    assert_rel_close(y, g * (x @ w.T + u @ b_lr.T) + bias, dtype, name="forward: scale epilogue")
    assert_rel_close(y_pre, x @ w.T + u @ b_lr.T, dtype, name="forward: y_pre from the same epilogue")
    dy, v, a = randn(m, n), randn(m, r), randn(r, k)
    dx = scaled_lowrank_gemm(cast(dy), cast(w), cast(v), cast(a), k_scale=g.float().to(device))
    assert_rel_close(dx, (dy * g) @ w + v @ a, dtype, name="dx: scale on load")


# ------------------------------------------------------------------ triton backend: seeded dropout

class FixedMask(nn.Module):
    """PEFT's dropout module replaced by a product with one fixed, already scaled mask."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask.reshape(x.shape).to(x.dtype)


def philox_mask(seed, shape, p, device):
    """The triton backend's mask (0 or 1 / (1 - p), float32) for ``seed``, ``p`` and a 2-D shape."""
    from fastadapt.triton_kernels.dora_norm import seeded_dropout
    return seeded_dropout(torch.ones(shape, device=device), seed, p)


def test_launchers_name_the_operand_of_a_wrong_dtype(device):
    """The fused GEMM and the row pass take half x / dY with the adapter operands in the same dtype
    or all float32; anything else is a TypeError naming the operand."""
    from fastadapt.triton_kernels.dora_norm import dora_dy_row_pass, scaled_lowrank_gemm
    half = lambda *shape: randn(*shape).to(dtype=torch.float16, device=device)  # noqa: E731
    f32 = lambda *shape: randn(*shape).to(dtype=torch.float32, device=device)  # noqa: E731
    with pytest.raises(TypeError, match="v is torch.float16"):
        scaled_lowrank_gemm(half(17, 16), half(16, 18), f32(17, 16), half(16, 18))
    with pytest.raises(TypeError, match="y is torch.float32"):
        scaled_lowrank_gemm(half(17, 16), f32(16, 18), half(17, 16), half(16, 18))
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        scaled_lowrank_gemm(*(t.double() for t in (f32(17, 16), f32(16, 18), f32(17, 16), f32(16, 18))))
    with pytest.raises(TypeError, match="b_scaled is torch.float16"):
        dora_dy_row_pass(half(17, 18), f32(17, 16), half(18, 16), half(17, 18))
    with pytest.raises(TypeError, match="y_pre is torch.float32"):
        dora_dy_row_pass(half(17, 18), half(17, 16), half(18, 16), f32(17, 18))


def mixed_leaves(ref, adapter_names, x64, device):
    """PEFT's default dtypes for a half model: the reference's adapter tensors ``adapter_names`` as
    float32 leaves, x a float16 leaf, weight and bias float16, on ``device``; and the cast used."""
    def cast(t, dtype):
        return None if t is None else t.detach().to(dtype=dtype, device=device)
    params = [cast(getattr(ref, name), torch.float32).requires_grad_() for name in adapter_names]
    return (params, cast(x64, torch.float16).requires_grad_(), cast(ref.weight, torch.float16),
            cast(ref.bias, torch.float16), cast)


def philox_truth(ref, ref_params, x64, dy, dropout, device):
    """(mask, [y, dx, d ref_params...]) in float64 for the Philox mask a fused call regenerates
    when its seed is the first draw after manual_seed(11) (as in :func:`run`); mask 1 without dropout."""
    mask = torch.ones(())
    if dropout:
        torch.manual_seed(11)
        rows = x64.numel() // x64.shape[-1]
        mask = philox_mask(ops.draw_dropout_seed(), (rows, x64.shape[-1]), dropout, device).cpu().double()
        mask = mask.reshape(x64.shape)
    y64 = ref(x64, dropout_mask=mask) if dropout else ref(x64)
    return mask, [y64, *torch.autograd.grad(y64, [x64, *ref_params], dy.double())]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_seeded_dropout_kernels(device, dtype):
    """The mask drops a fraction p (within 4 sigma), scales kept values by 1 / (1 - p), depends on
    the seed and the logical index only (strided x, same mask; 97 columns: a partial group of 4
    at the end of each row), and the backward's in-place out += mask o inner regenerates exactly
    the forward's mask."""
    from fastadapt.triton_kernels.dora_norm import dropout_mask_add_, seeded_dropout
    p, shape, seed = 0.3, (61, 97), 123
    mask = philox_mask(seed, shape, p, device)
    dropped = float((mask == 0).double().mean())
    assert abs(dropped - p) < 4 * (p * (1 - p) / mask.numel()) ** 0.5
    assert torch.equal(mask.unique().cpu(), torch.tensor([0.0, 1 / (1 - p)]))
    assert not torch.equal(philox_mask(seed + 1, shape, p, device), mask)
    lanes = [mask[:, c:96:4] for c in range(4)]  # the four outputs of one Philox call are distinct draws
    assert all(not torch.equal(lanes[0], other) for other in lanes[1:])
    x = randn(*shape).to(dtype=dtype, device=device)
    x_d, rest = seeded_dropout(x, seed, p, with_rest=True)
    assert x_d.dtype == rest.dtype == dtype
    assert torch.equal(x_d, (x.float() * mask).to(dtype))
    assert_rel_close(rest, x.double() - x.double() * mask.double(), dtype, name="x - x_d")
    assert torch.equal(seeded_dropout(x, seed, p), x_d)
    assert torch.equal(seeded_dropout(noncontig(x), seed, p), x_d)
    assert torch.equal(seeded_dropout(x.T.contiguous().T, seed, p), x_d)
    assert torch.equal(dropout_mask_add_(torch.zeros(shape, device=device), torch.ones(shape, device=device), seed, p),
                       mask)
    out, inner = (randn(*shape).to(dtype=dtype, device=device) for _ in range(2))
    expected = out.double() + inner.double() * mask.double()
    assert dropout_mask_add_(out, noncontig(inner), seed, p) is out
    assert_rel_close(out, expected, dtype, name="out += mask o inner")


def _triton_vs_peft(monkeypatch, device, dtype, method, *, bias, recompute=False, dropout=0.1, zero_rows=()):
    """The fused layer on the forced triton backend against PEFT in float64 whose dropout module
    multiplies by the mask the fused call regenerates (its seed is the first draw after
    manual_seed(11), as in :func:`run`): output and every gradient within the dtype's table
    (doubled for half I/O; dlambda scaled by its condition number)."""
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    build = dora_model if method == "dora" else delora_model
    model64, layer64 = build(16, bias=bias, dropout=dropout)
    if zero_rows:
        with torch.no_grad():
            layer64.lora_magnitude_vector["default"].weight[list(zero_rows)] = 0.0
    model = copy.deepcopy(model64).to(dtype=dtype, device=device)
    layer = model.base_model.model[0]
    params, params64 = (dora_params(lay) if method == "dora" else delora_params(lay) for lay in (layer, layer64))
    x64, dy64 = randn(2, 13, D_IN, requires_grad=True), randn(2, 13, D_OUT)
    mask = torch.ones(())
    if dropout:
        torch.manual_seed(11)
        mask = philox_mask(ops.draw_dropout_seed(), (26, D_IN), dropout, device).cpu().double().reshape(x64.shape)
        (layer64.lora_dropout if method == "dora" else layer64.delora_dropout)["default"] = FixedMask(mask)
    expected = run(model64, params64, x64, dy64)
    report = fastadapt.accelerate(model)
    if recompute:
        assert dora_layers.set_recompute(model) == 1
    x = x64.detach().to(dtype=dtype, device=device).requires_grad_()
    got = run(model, params, x, dy64.to(dtype=dtype, device=device))
    assert report.fused_calls == 1 and not report.fallbacks
    assert report.notes == ({dora_layers.PHILOX_DROPOUT_NOTE: 1} if dropout else {})
    names = ["output", "x", "A", "B", "m" if method == "dora" else "lambda"]
    scales = [1, 1, 1, 1, 1 if method == "dora" else
              lambda_condition(DeLoRA.from_peft(layer64), x64.detach(), mask, dy64)]
    for name, g, e, sc in zip(names, got, expected, scales):
        assert torch.isfinite(g).all(), name
        assert_rel_close(g, e, dtype, scale=_half_scale(dtype) * sc, name=name)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("method, bias, recompute", [("dora", True, False), ("dora", False, False),
                                                     ("dora", True, True), ("dora", False, True),
                                                     ("delora", True, False), ("delora", False, False)])
def test_triton_dropout_equals_peft_with_the_same_mask(monkeypatch, device, dtype, method, bias, recompute):
    """Dropout 0.1 in training on the triton backend: no fallback, the Philox mask regenerated in
    forward and backward (never saved), and PEFT's output and gradients for that mask."""
    _triton_vs_peft(monkeypatch, device, dtype, method, bias=bias, recompute=recompute)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_triton_zero_magnitude_rows_equal_peft(monkeypatch, device, dropout):
    """The triton backend always saves y_pre (no m == 0 check, no host sync): rows with m_j = 0
    still get PEFT's dm_j = colsum(dY o y_pre)_j / n_j, finite."""
    _triton_vs_peft(monkeypatch, device, torch.float32, "dora", bias=True, dropout=dropout, zero_rows=(3, 40))


def test_dropout_falls_back_only_where_no_philox_kernel_serves_a_device():
    """Off CPU, dropout runs fused wherever the Philox kernels serve x (also PEFT's default float32
    adapter on a half base); float64 there, or the torch backend forced,
    falls back, since only CPU's mask stream is nn.Dropout's.  (A meta tensor stands in for a
    device here.)"""
    off_cpu = "cuda" if torch.cuda.is_available() else "meta"
    for dtype, autocast, backend, fallback in ((torch.float64, True, "triton", True),
                                               (torch.float32, True, "triton", False),
                                               (torch.float16, True, "triton", False),   # fp32 adapter
                                               (torch.float16, False, "triton", False),
                                               (torch.float32, True, "torch", True)):
        _, layer = dora_model(4, dropout=0.1, dtype=dtype, autocast=autocast)
        layer.train()
        x = torch.empty(3, D_IN, dtype=dtype, device=off_cpu)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FASTADAPT_BACKEND", backend)
            reason = dora_layers.dora_check(layer, "default", x)
            note = dora_layers.dora_note(layer, "default", x)
        assert (reason is not None and "without the Philox kernels" in reason) == fallback, reason
        assert (note == dora_layers.PHILOX_DROPOUT_NOTE) == (not fallback)
        assert dora_layers.dora_check(layer, "default", torch.empty(3, D_IN, dtype=dtype)) is None


@pytest.mark.parametrize("mode", [m for m in AUTOCAST_MODES if "dropout" in m])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES[1:])
def test_autocast_adapter_on_half_base_with_philox_mask(monkeypatch, device, mode, dtype):
    """PEFT's default float32 adapter on a half base, dropout 0.1, where the Philox kernels serve
    (every CUDA call; FASTADAPT_BACKEND=triton here): DoRA runs the mixed kernels, DeLoRA's GEMMs
    run torch, both with PEFT's casts; the mask comes from the seeded kernels (DoRA on the float32
    copy of x, applied in-kernel; DeLoRA on x) and is
    regenerated in backward, never saved; no fallback, the report notes the stream; output and
    every gradient within the dtype's tolerance of the float64 truth for that mask."""
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    method = mode.split("_")[0]
    build, reference = (dora_model, DoRA) if method == "dora" else (delora_model, DeLoRA)
    model, layer = build(16, dropout=0.1, dtype=dtype)
    ref = reference.from_peft(layer)
    model.to(device)
    params = dora_params(layer) if method == "dora" else delora_params(layer)
    assert all(p.dtype == torch.float32 for p in params) and layer.get_base_layer().weight.dtype == dtype
    x, dy = randn(3, 11, D_IN, dtype=dtype), randn(3, 11, D_OUT, dtype=dtype)
    x64 = x.double().requires_grad_()
    ref_params = [ref.lora_A, ref.lora_B, ref.magnitude] if method == "dora" else \
        [ref.delora_A, ref.delora_B, ref.delora_lambda]
    mask, truth = philox_truth(ref, ref_params, x64, dy, 0.1, device)
    report = fastadapt.accelerate(model)
    if mode.endswith("recompute"):
        dora_layers.set_recompute(model)
    fused = run(model, params, x.to(device).requires_grad_(), dy.to(device))
    assert report.fused_calls == 1 and not report.fallbacks
    assert report.notes == {dora_layers.PHILOX_DROPOUT_NOTE: 1}
    scale = lambda_condition(ref, x64.detach(), mask, dy.double()) if method == "delora" else 1
    for name, got, true, sc in zip(["output", "x", "A", "B", "m or lambda"], fused, truth, [1, 1, 1, 1, scale]):
        assert got.dtype == (dtype if name in ("output", "x") else torch.float32), name
        assert_rel_close(got, true, dtype, scale=sc, name=f"fused {name}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only with a CUDA device")
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_triton_backend_does_not_sync(dropout):
    """DoRA (a zero magnitude entry included) and DeLoRA, each also with PEFT's default float32
    adapter on a bf16 base (the mixed kernels), forward and backward on CUDA run with torch's sync
    debug mode set to error (after a warm-up call that compiles and autotunes; every tensor is on
    the device before, since a host-to-device copy synchronizes too)."""
    ref = DoRA(randn(40, 48), randn(40), randn(8, 48, scale=0.3), randn(40, 8, scale=0.3), randn(40), 1.5)
    dref = DeLoRA.demo(48, 40, 8)
    cuda = lambda t: t.detach().float().cuda()  # noqa: E731
    params = [cuda(t).requires_grad_() for t in (ref.lora_A, ref.lora_B, ref.magnitude)]
    dparams = [cuda(t).requires_grad_() for t in (dref.delora_A, dref.delora_B, dref.delora_lambda)]
    with torch.no_grad():
        params[2][5] = 0.0
    weight, bias, dweight, dbias, w_norm = (cuda(t) for t in (ref.weight, ref.bias, dref.weight, dref.bias,
                                                                 dref.delora_w_norm))
    x, dy = cuda(randn(33, 48)).requires_grad_(), cuda(randn(33, 40))
    bf16 = lambda t: t.detach().to(torch.bfloat16)  # noqa: E731
    x_h, dy_h, weight_h, bias_h = bf16(x).requires_grad_(), bf16(dy), bf16(weight), bf16(bias)
    dweight_h, dbias_h = bf16(dweight), bf16(dbias)

    def step():
        y = ops.dora_linear(x, weight, bias, *params, ref.scaling, dropout_p=dropout)
        torch.autograd.grad(y, [x, *params], dy)
        y = ops.dora_linear(x_h, weight_h, bias_h, *params, ref.scaling, dropout_p=dropout)
        torch.autograd.grad(y, [x_h, *params], dy_h)
        y = ops.delora_linear(x, dweight, dbias, *dparams, w_norm, dropout_p=dropout)
        torch.autograd.grad(y, [x, *dparams], dy)
        y = ops.delora_linear(x_h, dweight_h, dbias_h, *dparams, w_norm, dropout_p=dropout)
        torch.autograd.grad(y, [x_h, *dparams], dy_h)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_triton_dy_row_pass_matches_reference(device, dtype):
    """v = dY b_s, P = u^T dY and colsum(dY o y_pre) from one read of dY (3 row blocks of 16 and
    a partial one, strided dY), against float64 of the same rounded inputs."""
    from fastadapt.triton_kernels.dora_norm import dora_dy_row_pass
    n, out_features, r = 53, 45, 5
    dy, u, b_s, y_pre = (randn(*s).to(dtype=dtype, device=device)
                         for s in ((n, out_features), (n, r), (out_features, r), (n, out_features)))
    v, p, colsum = dora_dy_row_pass(noncontig(dy), u, b_s, y_pre, block_n=16, block_o=16)
    dy64, u64, b64, y64 = (t.double() for t in (dy, u, b_s, y_pre))
    assert v.dtype == p.dtype == dtype and colsum.dtype == torch.float32
    assert_rel_close(v, dy64 @ b64, dtype, name="v = dY b_s")
    assert_rel_close(p, u64.T @ dy64, dtype, name="P = u^T dY")
    assert_rel_close(colsum, (dy64 * y64).sum(0), torch.float32, name="colsum(dY o y_pre)")


# ------------------------------------------- triton backend: float32 adapter on a half base (mixed)

def _count_launchers(monkeypatch, names):
    """Record every call of the named launchers of fastadapt.triton_kernels.dora_norm."""
    from fastadapt.triton_kernels import dora_norm as kernels
    calls = []
    for name in names:
        launcher = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=launcher, _n=name, **k: calls.append(_n) or _f(*a, **k))
    return calls


def _half_ulp_bound(dtype):
    """One unit in the last place of ``dtype``, relative: 2^-10 for float16 (2^-7 for bfloat16)."""
    return torch.finfo(dtype).eps


@pytest.mark.parametrize("mode", ["bias", "no_bias", "recompute", "dropout", "dropout_recompute"])
def test_mixed_triton_path_matches_torch_mixed_path_and_float64(monkeypatch, device, mode):
    """PEFT's default float32 adapter on a float16 base, FASTADAPT_BACKEND=triton (every CUDA call):
    DoRA runs the mixed kernels (u = x A^T and dA = v^T x by float32_matmul, the dropout mask applied
    in-kernel; the fused GEMM with the half base product rounded where PEFT rounds it; the row pass
    on half dY with float32 u and B), not the torch mixed path.  Output and every gradient: PEFT's
    dtypes; within the float16 table of the float64 truth of the same math and mask; and within one
    float16 rounding of the torch mixed path.  Both round at the same points and differ only in
    float32 summation order, so a rounded value moves by one unit in the last place where a
    rounding flips: y, dx within 2^-10 relative, dm (sums of dY o y_pre, y_pre half) within 2^-10
    times its sum's condition number, dA and dB (float32 math on identical half inputs) within the
    float32 table."""
    calls = _count_launchers(monkeypatch, ("float32_matmul", "scaled_lowrank_gemm", "dora_dy_row_pass"))
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    half, f32 = torch.float16, torch.float32
    dropout = 0.2 if "dropout" in mode else 0.0
    recompute = "recompute" in mode
    exact = lambda t, dtype: t.to(dtype).double()  # noqa: E731  (values the low-precision run sees exactly)
    ref = DoRA(exact(randn(19, 24), half), None if mode == "no_bias" else exact(randn(19), half),
               exact(randn(4, 24, scale=0.3), f32), exact(randn(19, 4, scale=0.3), f32), exact(randn(19), f32), 1.5)
    x64, dy = exact(randn(21, 24), half).requires_grad_(), randn(21, 19).to(half)
    mask, truth = philox_truth(ref, [ref.lora_A, ref.lora_B, ref.magnitude], x64, dy, dropout, device)

    def fused(backend):
        params, x, weight, bias, cast = mixed_leaves(ref, ("lora_A", "lora_B", "magnitude"), x64, device)
        torch.manual_seed(11)
        if backend == "triton":
            y = ops.dora_linear(x, weight, bias, *params, ref.scaling, dropout_p=dropout, recompute=recompute)
        else:  # the torch mixed path with the same Philox mask (what CUDA ran before)
            norm = ops.dora_weight_norm(weight, *params[:2], ref.scaling)
            plan = ops.DoraPlan(ref.scaling, dropout, recompute, "torch", seeded_mask=dropout > 0)
            y = ops.DoraLinearFunction.apply(x, weight, bias, *params, norm, plan)
        return [y, *torch.autograd.grad(y, [x, *params], cast(dy, half))]

    got = fused("triton")
    counts = {name: calls.count(name) for name in set(calls)}
    torch_path = fused("torch")
    # forward u and GEMM, backward dx GEMM and dA; recompute: v and u^T dY instead of the row pass
    assert counts == ({"float32_matmul": 4, "scaled_lowrank_gemm": 2} if recompute else
                      {"float32_matmul": 2, "scaled_lowrank_gemm": 2, "dora_dy_row_pass": 1})
    with torch.no_grad():
        x_d = x64 * mask
        y_pre = x_d @ ref.weight.T + ref.scaling * (x_d @ ref.lora_A.T) @ ref.lora_B.T
        terms = dy.double() * y_pre
        dm_condition = float(terms.abs().sum(0).norm() / terms.sum(0).norm())
    bounds = {"output": 1.0, "x": 1.0, "m": dm_condition}
    for name, g, t, true in zip(["output", "x", "A", "B", "m"], got, torch_path, truth):
        assert g.dtype == t.dtype == (half if name in ("output", "x") else f32), name
        assert_rel_close(g, true, half, name=f"{name} vs float64")
        if name in bounds:
            err = rel_error(g, t)
            assert err <= bounds[name] * _half_ulp_bound(half), f"{name} vs torch mixed path: {err:.3e}"
        else:
            assert_rel_close(g, t, f32, name=f"{name} vs torch mixed path")


def test_triton_float32_matmul_matches_reference(device):
    """C = fl32(a) fl32(b) for a half a and a float32 b (and the transposed roles), strided, the
    reduction split in 3 chunks; with dropout the operand's mask is seeded_dropout's for that
    shape (DoRA's u = (mask o x) A^T and dA = v^T (mask o x)): float32 table of float64."""
    from fastadapt.triton_kernels.dora_norm import float32_matmul
    x = randn(45, 37).to(dtype=torch.float16, device=device)
    a_t = randn(37, 5).to(dtype=torch.float32, device=device)
    v_t = randn(5, 45).to(dtype=torch.float32, device=device)
    x64, a64, v64 = (t.double().cpu() for t in (x, a_t, v_t))
    assert_rel_close(float32_matmul(noncontig(x), a_t), x64 @ a64, torch.float32, name="x A^T")
    assert_rel_close(float32_matmul(v_t, x, split_k=3, block_k=16), v64 @ x64, torch.float32, name="v^T x, split")
    mask = philox_mask(7, (45, 37), 0.3, device).double().cpu()
    assert_rel_close(float32_matmul(x, a_t, dropout=("a", 7, 0.3)), (x64 * mask) @ a64, torch.float32,
                     name="(mask o x) A^T")
    assert_rel_close(float32_matmul(v_t, x, dropout=("b", 7, 0.3), split_k=2, block_k=16), v64 @ (x64 * mask),
                     torch.float32, name="v^T (mask o x), split")
    with pytest.raises(ValueError, match="valid choices: 'a', 'b'"):
        float32_matmul(x, a_t, dropout=("x", 7, 0.3))


def test_triton_mixed_gemm_rounds_the_base_product(device):
    """The fused GEMM with half x, W and float32 u, v: ``round_base`` rounds x W^T to float16
    before the float32 low-rank term joins it (PEFT's F.linear(x, W)).  Integer x and W make x W^T
    exact in float32 and odd above 2048, where float16 rounds; u v is a multiple of 1/16: C_pre is
    then fl_h(fl_h(x W^T) + u v) exactly (both sums exact in float32), and differs without
    ``round_base``.  The residual
    epilogue (DoRA's mixed dropout forward) and a float32 output (its dx inner term) match the
    float64 of the same formula within the float16 / float32 table."""
    from fastadapt.triton_kernels.dora_norm import scaled_lowrank_gemm
    gen = torch.Generator().manual_seed(3)
    ints = lambda *s, lo=-8, hi=9: torch.randint(lo, hi, s, generator=gen).double()  # noqa: E731
    m, k, n, r = 37, 48, 29, 5
    x, w = ints(m, k, lo=1, hi=17), ints(n, k, lo=1, hi=17)         # x W^T in [48, 12288]
    u, v = ints(m, r, lo=-3, hi=4) / 4, ints(r, n, lo=-3, hi=4) / 4
    g = randn(n).abs() + 0.5
    half = lambda t: t.to(dtype=torch.float16, device=device)  # noqa: E731
    f32 = lambda t: t.to(dtype=torch.float32, device=device)  # noqa: E731
    base = (x @ w.T).half().double()
    assert not torch.equal(base, x @ w.T)  # the data does hit float16 rounding
    y, pre = scaled_lowrank_gemm(half(x), half(w).T, f32(u), f32(v), out_scale=f32(g), with_pre=True, round_base=True)
    assert torch.equal(pre.cpu(), (base + u @ v).half())
    unrounded = scaled_lowrank_gemm(half(x), half(w).T, f32(u), f32(v), with_pre=True)[1]
    assert not torch.equal(unrounded.cpu(), pre.cpu())
    assert_rel_close(y, g * (base + u @ v), torch.float16, name="y")
    res = randn(m, n).half().double()
    y_res = scaled_lowrank_gemm(half(x), half(w).T, f32(u), f32(v), out_scale=f32(g), round_base=True,
                                residual=half(res))
    assert_rel_close(y_res, (res - base) + g * (base + u @ v), torch.float16, name="residual epilogue")
    inner = scaled_lowrank_gemm(half(x), half(w).T, f32(u), f32(v), round_base=True, out_dtype=torch.float32)
    assert inner.dtype == torch.float32
    assert_rel_close(inner, base + u @ v, torch.float32, name="float32 output")


def test_triton_dy_row_pass_mixed(device):
    """Half dY and y_pre with float32 u and b_s (PEFT's float32 adapter): v and P in float32 from
    the exactly converted dY, within the float32 table of float64 of the same inputs."""
    from fastadapt.triton_kernels.dora_norm import dora_dy_row_pass
    n, out_features, r = 40, 45, 5
    dy, y_pre = (randn(n, out_features).to(dtype=torch.float16, device=device) for _ in range(2))
    u, b_s = randn(n, r).to(dtype=torch.float32, device=device), randn(out_features, r).to(dtype=torch.float32,
                                                                                         device=device)
    v, p, colsum = dora_dy_row_pass(noncontig(dy), u, b_s, y_pre, block_n=16, block_o=16)
    dy64, u64, b64, y64 = (t.double().cpu() for t in (dy, u, b_s, y_pre))
    assert v.dtype == p.dtype == colsum.dtype == torch.float32
    assert_rel_close(v, dy64 @ b64, torch.float32, name="v = dY b_s")
    assert_rel_close(p, u64.T @ dy64, torch.float32, name="P = u^T dY")
    assert_rel_close(colsum, (dy64 * y64).sum(0), torch.float32, name="colsum(dY o y_pre)")


@pytest.mark.parametrize("mode", ["default", "recompute", "dropout", "delora", "delora_dropout"])
def test_mixed_triton_path_saves_no_float32_activation_copies(monkeypatch, device, mode):
    """A float32 adapter on a float16 base on the triton backend: DoRA saves x and y_pre in float16
    (x alone with recompute), u (N, r) in float32 and the norm, DeLoRA x and u, and no mask (an
    int seed): exactly (2 or 1) + 2 r/d + 2/N (DeLoRA 1 + 2 r/d) times bytes(x) for
    d_in = d_out = d, no float32 copy of x or y_pre."""
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    n, d, r = 64, 128, 4
    half = dict(dtype=torch.float16, device=device)
    x, w, b = randn(n, d, **half, requires_grad=True), randn(d, d, **half), randn(d, **half)
    a, bb, m = (randn(*s, dtype=torch.float32, device=device, requires_grad=True) for s in ((r, d), (d, r), (d,)))
    dropout = 0.1 if mode.endswith("dropout") else 0.0
    if mode.startswith("delora"):
        w_norm = w.float().norm(dim=0)
        ratio = saved_ratio(lambda: ops.delora_linear(x, w, b, a, bb, m[:1], w_norm, dropout_p=dropout), x,
                            [w, b, a, bb, m, w_norm])
        assert ratio == pytest.approx(1 + 2 * r / d)
        return
    ratio = saved_ratio(lambda: ops.dora_linear(x, w, b, a, bb, m, 2.0, dropout_p=dropout,
                                                recompute=mode == "recompute"), x, [w, b, a, bb, m])
    assert ratio == pytest.approx((1 if mode == "recompute" else 2) + 2 * r / d + 2 / n)


@pytest.mark.parametrize("mode", ["bias", "no_bias", "dropout"])
def test_mixed_triton_delora_matches_torch_mixed_path_and_float64(monkeypatch, device, mode):
    """DeLoRA with PEFT's default float32 adapter on a float16 base, FASTADAPT_BACKEND=triton: the
    mixed kernels (u, dY B and dA's and dB's products by float32_matmul; y and dx without dropout
    by the fused GEMM, its half base product, with the bias in forward, rounded before the float32
    low-rank term joins it), not the torch mixed path.  Output and every gradient within the
    float16 table of the float64 truth and within one float16 rounding of the torch mixed path
    (y, dx: 2^-10 relative; the float32 gradients: the float32 table); dlambda, and dA's and dB's
    radial terms through the same sums dc, scaled by the sums' condition number."""
    calls = _count_launchers(monkeypatch, ("float32_matmul", "scaled_lowrank_gemm"))
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    half, f32 = torch.float16, torch.float32
    dropout = 0.2 if mode == "dropout" else 0.0
    demo = DeLoRA.demo(24, 19, 4)
    exact = lambda t, dtype: t.to(dtype).double()  # noqa: E731  (values the low-precision run sees exactly)
    ref = DeLoRA(exact(demo.weight, half), None if mode == "no_bias" else exact(demo.bias, half),
                 *(exact(t, f32) for t in (demo.delora_A, demo.delora_B, demo.delora_lambda, demo.delora_w_norm)))
    x64, dy = exact(randn(21, 24), half).requires_grad_(), randn(21, 19).to(half)
    mask, truth = philox_truth(ref, [ref.delora_A, ref.delora_B, ref.delora_lambda], x64, dy, dropout, device)

    def fused(backend):
        params, x, weight, bias, cast = mixed_leaves(ref, ("delora_A", "delora_B", "delora_lambda"), x64, device)
        w_norm = cast(ref.delora_w_norm, torch.float32)
        torch.manual_seed(11)
        if backend == "triton":
            y = ops.delora_linear(x, weight, bias, *params, w_norm, dropout_p=dropout)
        else:  # the torch mixed path with the same Philox mask (what CUDA ran before)
            plan = ops.DeloraPlan(dropout, "torch", seeded_mask=dropout > 0)
            y = ops.DeloraLinearFunction.apply(x, weight, bias, *params, w_norm, plan)
        return [y, *torch.autograd.grad(y, [x, *params], cast(dy, half))]

    got = fused("triton")
    counts = {name: calls.count(name) for name in set(calls)}
    torch_path = fused("torch")
    # u, t = dY B, dA's and dB's products; the fused GEMM for y and (without dropout) dx
    assert counts == {"float32_matmul": 4, "scaled_lowrank_gemm": 1 if dropout else 2}
    condition = lambda_condition(ref, x64.detach(), mask, dy.double())
    for name, g, t, true in zip(["output", "x", "A", "B", "lambda"], got, torch_path, truth):
        assert g.dtype == t.dtype == (half if name in ("output", "x") else f32), name
        scale = 1.0 if name in ("output", "x") else condition
        assert_rel_close(g, true, half, scale=scale, name=f"{name} vs float64")
        if name in ("output", "x"):
            err = rel_error(g, t)
            assert err <= _half_ulp_bound(half), f"{name} vs torch mixed path: {err:.3e}"
        else:
            assert_rel_close(g, t, f32, scale=scale, name=f"{name} vs torch mixed path")


@pytest.mark.parametrize("method", ["dora", "delora"])
def test_bridge_runs_the_mixed_kernels_for_peft_default_autocast(monkeypatch, device, method):
    """fastadapt.accelerate on PEFT's default float32 adapter on a float16 base with the triton
    backend (FASTADAPT_BACKEND=triton here, every CUDA call): the mixed kernels run (no fallback),
    and PEFT's output and fused are each within the float16 table of the float64 truth, with
    PEFT's dtypes (dlambda scaled by its sum's condition number)."""
    calls = _count_launchers(monkeypatch, ("float32_matmul", "scaled_lowrank_gemm"))
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    build, reference = (dora_model, DoRA) if method == "dora" else (delora_model, DeLoRA)
    model, layer = build(8, dtype=torch.float16)
    ref = reference.from_peft(layer)
    model.to(device)
    params = dora_params(layer) if method == "dora" else delora_params(layer)
    x, dy = randn(3, 11, D_IN, dtype=torch.float16), randn(3, 11, D_OUT, dtype=torch.float16)
    x64 = x.double().requires_grad_()
    y64 = ref(x64)
    ref_params = [ref.lora_A, ref.lora_B, ref.magnitude] if method == "dora" else \
        [ref.delora_A, ref.delora_B, ref.delora_lambda]
    truth = [y64, *torch.autograd.grad(y64, [x64, *ref_params], dy.double())]
    peft_out = run(model, params, x.to(device).requires_grad_(), dy.to(device))
    report = fastadapt.accelerate(model)
    fused = run(model, params, x.to(device).requires_grad_(), dy.to(device))
    assert report.fused_calls == 1 and not report.fallbacks
    assert calls.count("scaled_lowrank_gemm") == 2 and "float32_matmul" in calls  # forward and dx
    scale = lambda_condition(ref, x64.detach(), torch.ones(()), dy.double()) if method == "delora" else 1
    for name, got, want, true in zip(["output", "x", "A", "B", "m or lambda"], fused, peft_out, truth):
        assert got.dtype == want.dtype, name
        sc = scale if name == "m or lambda" else 1
        assert_rel_close(want, true, torch.float16, scale=sc, name=f"PEFT {name}")
        assert_rel_close(got, true, torch.float16, scale=sc, name=f"fused {name}")
