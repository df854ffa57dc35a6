"""Hadamard family (LoHa, LoKr): ops (torch path, both LoHa algorithms; Triton in the interpreter),
layers, PEFT bridge.

Every comparison is a relative Frobenius error against the float64 references of
fastadapt.reference.hadamard or PEFT's own layer, within fastadapt.numerics' one tolerance table.
LoHa's two algorithms ("tiles": merged weight / G = dY^T X contracted; "khatri_rao": rank-r^2 thin
GEMMs) and LoKr's two forward / dx algorithms ("tiles": merged weight; "reshape": reshape and
matmul) are each forced through ``loha_plan`` / ``lokr_plan`` so that all run at the tests' small
shapes, whatever the cost models would pick there.
"""
import copy

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, get_peft_model

import fastadapt
from fastadapt.layers import hadamard as layers
from fastadapt.numerics import assert_rel_close, rel_error, tolerance
from fastadapt.ops import hadamard as ops
from fastadapt.ops import hadamard_loha, hadamard_lokr
from fastadapt.ops.hadamard_loha import LohaPlan, loha_plan
from fastadapt.reference.hadamard import LoHa, LoKr
from fastadapt.testing import DTYPES, linear_model, noncontig, output_and_grads, randn, randomize_

F16, F32, F64 = torch.float16, torch.float32, torch.float64
INTERPRETER_BF16 = "the Triton interpreter has no bfloat16 arithmetic (compiled GPUs run it)"
PLANS = {"tiles": LohaPlan("tiles", "tiles", "tiles"), "khatri_rao": LohaPlan("khatri_rao", "khatri_rao", "khatri_rao"),
         "kr_grads_tiled_dx": LohaPlan("tiles", "tiles", "khatri_rao")}


@pytest.fixture(params=sorted(PLANS))
def loha_algorithm(request, monkeypatch):
    """Force one LoHa plan for every call of the test."""
    plan = PLANS[request.param]
    monkeypatch.setattr(hadamard_loha, "loha_plan", lambda *args, **kwargs: plan)
    return request.param


@pytest.fixture(params=hadamard_lokr.MODES)
def lokr_algorithm(request, monkeypatch):
    """Force one LoKr forward / dx algorithm ("tiles" or "reshape") for every call of the test."""
    monkeypatch.setattr(hadamard_lokr, "lokr_plan", lambda *args, **kwargs: request.param)
    return request.param


def _loha_reference(d_in, d_out, r, *, seed, alpha=6.0):
    base = linear_model(d_in, d_out, dtype=F64, seed=seed)[0]
    factors = {name: randn(*shape, scale=0.5, seed=seed + 1 + i) for i, (name, shape) in enumerate(
        [("hada_w1_a", (d_out, r)), ("hada_w1_b", (r, d_in)), ("hada_w2_a", (d_out, r)), ("hada_w2_b", (r, d_in))])}
    return LoHa(base.weight, base.bias, r, alpha, **factors)


def _lokr_reference(d_in, d_out, r, *, seed, decompose_both=False, decompose_factor=-1, alpha=5.0):
    base = linear_model(d_in, d_out, dtype=F64, seed=seed)[0]
    g = torch.Generator().manual_seed(seed)
    return LoKr.from_config(base.weight, base.bias, r, alpha, decompose_both=decompose_both,
                            decompose_factor=decompose_factor, init_weights=False, generator=g)


def _params(ref):
    return {n: p for n, p in ref.named_parameters() if n != "bias"}


def _truth(ref, x, cotangent):
    """Float64 output and gradients (x, every adapter parameter, bias) of a reference."""
    ref = copy.deepcopy(ref)
    ref.bias = torch.nn.Parameter(ref.bias)
    x = x.detach().to(F64).requires_grad_()
    y = ref(x)
    return [y.detach(), *torch.autograd.grad(y, [x, *_params(ref).values(), ref.bias], cotangent.to(F64))]


def _call(ref, x, weight, bias, params):
    if isinstance(ref, LoHa):
        return ops.loha_linear(x, weight, bias, *params.values(), ref.scaling)
    return ops.lokr_linear(x, weight, bias, ref.scaling, **params)


def _fused(ref, x, cotangent, dtype, adapter_dtype, weight=None):
    x = x.detach().to(dtype).requires_grad_()
    weight = ref.weight.to(dtype) if weight is None else weight
    bias = ref.bias.to(dtype).requires_grad_()
    params = {n: p.detach().to(adapter_dtype).requires_grad_() for n, p in _params(ref).items()}
    y = _call(ref, x, weight, bias, params)
    return [y.detach(), *torch.autograd.grad(y, [x, *params.values(), bias], cotangent.to(dtype))]


def _assert_fused_equals_reference(ref, x, dtype, adapter_dtype=None, *, grad_scale=1.0):
    cotangent = randn(*x.shape[:-1], ref.out_features, seed=99)
    expected = _truth(ref, x, cotangent)
    actual = _fused(ref, x, cotangent, dtype, adapter_dtype or dtype)
    names = ["y", "dx", *(f"d{n}" for n in _params(ref)), "dbias"]
    for name, a, e in zip(names, actual, expected):
        assert_rel_close(a, e, dtype, scale=1.0 if name in ("y", "dx") else grad_scale, name=name)


# ----------------------------------------------------------------------------- torch path, every dtype

LOHA_SHAPES = [(16, 12, 4), (27, 18, 5), (7, 5, 1)]     # (in, out, r): odd sizes, r = 1
# (in, out, r, decompose_both, decompose_factor): whole w1 / w2; w2 factored; both factored; a prime
# out_features (w1 (1, c)); a decompose_factor that does not divide in_features
LOKR_LAYOUTS = [(12, 10, 4, False, -1), (64, 48, 2, False, -1), (64, 64, 1, True, -1), (12, 7, 1, False, -1),
                (27, 16, 1, True, 2)]


def _lokr_id(layout):
    d_in, d_out, r, both, factor = layout
    return f"{d_in}x{d_out}-r{r}{'-both' if both else ''}{f'-f{factor}' if factor > 0 else ''}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d_in,d_out,r", LOHA_SHAPES)
def test_loha_torch_path_every_dtype_against_float64(loha_algorithm, dtype, d_in, d_out, r):
    ref = _loha_reference(d_in, d_out, r, seed=d_in)
    x = noncontig(randn(9, 41, d_in, seed=1))
    # half: x, W, factors and y rounded; the factor gradients sum 369 tokens' products
    _assert_fused_equals_reference(ref, x, dtype, grad_scale=1.0 if dtype == F32 else 2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LOKR_LAYOUTS, ids=_lokr_id)
def test_lokr_torch_path_every_dtype_against_float64(lokr_algorithm, dtype, layout):
    d_in, d_out, r, both, factor = layout
    ref = _lokr_reference(d_in, d_out, r, seed=d_in + d_out, decompose_both=both, decompose_factor=factor)
    x = noncontig(randn(9, 41, d_in, seed=2))
    _assert_fused_equals_reference(ref, x, dtype, grad_scale=1.0 if dtype == F32 else 2.0)


def test_lokr_layouts_cover_whole_and_factored_sides():
    """The layouts above exercise every combination PEFT's rule produces."""
    sides = set()
    for d_in, d_out, r, both, factor in LOKR_LAYOUTS:
        shapes = LoKr.layout(d_in, d_out, r, decompose_both=both, decompose_factor=factor)
        sides.add(("lokr_w1" in shapes, "lokr_w2" in shapes))
    assert sides == {(True, True), (True, False), (False, False)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, F16])
def test_float32_adapter_on_half_base_torch_path(loha_algorithm, dtype):
    """PEFT's default layout: x, W, bias half, the adapter float32."""
    x = randn(3, 17, 24, seed=3)
    _assert_fused_equals_reference(_loha_reference(24, 16, 4, seed=5), x, dtype, F32, grad_scale=2.0)
    if loha_algorithm == "tiles":   # LoKr: its own plan
        _assert_fused_equals_reference(_lokr_reference(24, 16, 1, seed=6, decompose_both=True), x, dtype, F32,
                                       grad_scale=2.0)


def test_strided_weight_and_1d_input(lokr_algorithm):
    """A transposed weight view (same values, other strides) and a 1-D x."""
    for ref in (_loha_reference(20, 12, 3, seed=7), _lokr_reference(20, 12, 2, seed=8)):
        x = randn(5, 20, seed=9)
        cotangent = randn(5, 12, seed=10)
        expected = _truth(ref, x, cotangent)
        column_major = ref.weight.T.contiguous().T
        for a, e in zip(_fused(ref, x, cotangent, F64, F64, weight=column_major), expected):
            assert_rel_close(a, e)
        params = {n: p.detach() for n, p in _params(ref).items()}
        assert_rel_close(_call(ref, x[0], ref.weight, ref.bias, params), expected[0][0], name="1-D x")


def test_lokr_factor_gradients_over_several_token_chunks():
    """More tokens than one chunk of the factor-gradient loop (float64, both sides factored)."""
    ref = _lokr_reference(512, 64, 1, seed=25, decompose_both=True)
    n = 2 * (hadamard_lokr._CHUNK_ELEMENTS // 512) + 3
    x, cotangent = randn(n, 512, seed=26), randn(n, 64, seed=27)
    for a, e in zip(_fused(ref, x, cotangent, F64, F64), _truth(ref, x, cotangent)):
        assert_rel_close(a, e)


def test_gradcheck_float64(loha_algorithm):
    x = randn(2, 3, 10, requires_grad=True, seed=11)
    weight = randn(6, 10, seed=12)
    bias = randn(6, requires_grad=True, seed=13)
    loha = [randn(*s, requires_grad=True, seed=14 + i) for i, s in enumerate([(6, 3), (3, 10), (6, 3), (3, 10)])]
    assert torch.autograd.gradcheck(lambda a, b, *f: ops.loha_linear(a, weight, b, *f, 0.7), (x, bias, *loha),
                                    fast_mode=True)
    if loha_algorithm == "tiles":
        lokr = [randn(*s, requires_grad=True, seed=20 + i) for i, s in enumerate([(2, 1), (1, 5), (3, 2)])]
        assert torch.autograd.gradcheck(
            lambda a, b, w1a, w1b, w2: ops.lokr_linear(a, weight, b, 1.3, lokr_w1_a=w1a, lokr_w1_b=w1b, lokr_w2=w2),
            (x, bias, *lokr), fast_mode=True)


def test_plan_at_the_benchmark_shapes():
    """The cost models' choices where they are measured or predicted (benchmarks/NOTES.md, hadamard):
    LoHa at CPU fp32 d = 1024, N = 2048: Khatri-Rao factor gradients up to r = 16 (at r = 16 the two
    ways tie within 1 % by FLOPs and measured time), the merged weight for the forward; CUDA bf16
    d = 4096, N = 8192: with PEFT's float32 adapter tiles except at small r, with a bf16 adapter
    (tensor-core thin GEMMs) Khatri-Rao up to about r^2 = d / 4.  LoKr: the merged weight at the
    standard shapes and always on CUDA, the reshaped products for a few tokens on CPU and for PEFT's
    float32 adapter on a half base (PEFT's rounding points)."""
    cpu = lambda r, n=2048: loha_plan(n, 1024, 1024, r, backend="torch", layout="float")  # noqa: E731
    assert cpu(16) == LohaPlan("tiles", "tiles", "khatri_rao")
    assert cpu(4) == LohaPlan("tiles", "tiles", "khatri_rao")
    assert cpu(1) == LohaPlan("khatri_rao", "khatri_rao", "khatri_rao")
    assert cpu(32) == LohaPlan("tiles", "tiles", "tiles")
    assert cpu(16, n=16).forward == "khatri_rao"     # a few tokens: no merged weight
    gpu = lambda r, layout: loha_plan(8192, 4096, 4096, r, backend="triton", layout=layout)  # noqa: E731
    assert gpu(16, "mixed") == LohaPlan("tiles", "tiles", "tiles")      # PEFT's float32 adapter: fp32 thin GEMMs
    assert gpu(4, "mixed").factor_grads == "khatri_rao"
    assert gpu(16, "half") == LohaPlan("khatri_rao", "khatri_rao", "khatri_rao")   # tensor-core thin GEMMs
    assert gpu(64, "half") == LohaPlan("tiles", "tiles", "tiles")
    lokr = hadamard_lokr.lokr_plan
    assert lokr(2048, (32, 32), (32, 32), backend="torch", mixed=False) == "tiles"
    assert lokr(16, (32, 32), (32, 32), backend="torch", mixed=False) == "reshape"
    assert lokr(2048, (32, 32), (32, 32), backend="triton", mixed=True) == "reshape"   # PEFT's rounding points
    assert lokr(8, (64, 64), (64, 64), backend="triton", mixed=False) == "tiles"


# ----------------------------------------------------------------------------- Triton kernels (interpreter on CPU)
# Tiles of 16 (legal when compiled); the sizes need not be multiples (masked).  fp32 and fp16 with the
# adapter in the base dtype, and PEFT's float32 adapter on fp16; bf16 only compiled.

TRITON_DTYPES = [F32, F16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason=INTERPRETER_BF16))]


@pytest.fixture
def triton_backend(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_loha_triton_kernels_against_float64(triton_backend, loha_algorithm, device, dtype):
    ref = _loha_reference(40, 33, 5, seed=30).to(device)
    x = noncontig(randn(2, 19, 40, seed=15, device=device))
    _assert_fused_equals_reference(ref, x, dtype, grad_scale=1.0 if dtype == F32 else 2.0)
    if dtype == F16:
        _assert_fused_equals_reference(ref, x, dtype, F32, grad_scale=2.0)


def test_loha_triton_rank_above_one_chunk(triton_backend, device):
    """r = 40: the on-chip rank-r products run in chunks of 32 (fp32)."""
    plan = PLANS["tiles"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hadamard_loha, "loha_plan", lambda *args, **kwargs: plan)
        _assert_fused_equals_reference(_loha_reference(48, 44, 40, seed=31).to(device),
                                       randn(21, 48, seed=16, device=device), F32)


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("layout", [LOKR_LAYOUTS[1], LOKR_LAYOUTS[4]], ids=_lokr_id)
def test_lokr_triton_kernels_against_float64(triton_backend, lokr_algorithm, device, dtype, layout):
    d_in, d_out, r, both, factor = layout
    ref = _lokr_reference(d_in, d_out, r, seed=32, decompose_both=both, decompose_factor=factor).to(device)
    x = noncontig(randn(2, 19, d_in, seed=17, device=device))
    _assert_fused_equals_reference(ref, x, dtype, grad_scale=1.0 if dtype == F32 else 2.0)
    if dtype == F16:   # PEFT's float32 adapter: its plan is "reshape" (the residual epilogue)
        _assert_fused_equals_reference(ref, x, dtype, F32, grad_scale=2.0)


def test_triton_launchers_reject_bad_operands(triton_backend):
    from fastadapt.triton_kernels import hadamard as kernels
    x, w = randn(8, 32, dtype=F32, seed=18), randn(32, 16, dtype=F32, seed=19)
    factor = randn(32, 4, dtype=F32, seed=20)
    with pytest.raises(TypeError, match="l1"):
        kernels.loha_gemm_forward(x, w, factor.half(), factor.T[:, :16], factor, factor.T[:, :16], 1.0)
    with pytest.raises(ValueError, match="r1"):
        kernels.loha_gemm_forward(x, w, factor, factor.T, factor, factor.T[:, :16], 1.0)
    with pytest.raises(ValueError, match="kron"):
        kernels.lokr_gemm_forward(x, w, randn(4, 4, dtype=F32, seed=21), randn(4, 4, dtype=F32, seed=22), 1.0)
    with pytest.raises(TypeError, match="residual"):
        kernels.gemm_residual_forward(x.half(), w.half(), randn(8, 16, dtype=F16, seed=23), 1.0)
    with pytest.raises(ValueError, match="w1b"):
        kernels.loha_factor_grads_backward(randn(8, 32, dtype=F32, seed=24), x, factor, factor, factor, factor.T, 1.0)


# ----------------------------------------------------------------------------- layers

def test_layers_init_like_peft_and_merge_exactly():
    """PEFT's inits from the same generator state; the merged forward equals the unmerged one within
    one rounding, unmerge restores W."""
    from peft.tuners.loha.layer import Linear as PeftLoHa
    from peft.tuners.lokr.layer import Linear as PeftLoKr
    base = linear_model(64, 48, dtype=F32, seed=40)[0]
    cases = [
        (lambda: PeftLoHa(copy.deepcopy(base), "default", LoHaConfig(r=4, alpha=8), r=4, alpha=8),
         lambda: layers.LoHaLinear(copy.deepcopy(base), 4, 8)),
        (lambda: PeftLoHa(copy.deepcopy(base), "default", LoHaConfig(r=3, init_weights=False), r=3, alpha=5),
         lambda: layers.LoHaLinear(copy.deepcopy(base), 3, 5, init_weights=False)),
        (lambda: PeftLoKr(copy.deepcopy(base), "default", LoKrConfig(r=2, decompose_both=True), r=2, alpha=4),
         lambda: layers.LoKrLinear(copy.deepcopy(base), 2, 4, decompose_both=True)),
        (lambda: PeftLoKr(copy.deepcopy(base), "default", LoKrConfig(r=8, init_weights="lycoris"), r=8, alpha=4),
         lambda: layers.LoKrLinear(copy.deepcopy(base), 8, 4, init_weights="lycoris")),
    ]
    x = randn(5, 64, dtype=F32, seed=41)
    for make_peft, make_ours in cases:
        torch.manual_seed(3)
        peft_layer = make_peft()
        torch.manual_seed(3)
        layer = make_ours()
        peft_params = {n.removesuffix(".default"): p for n, p in peft_layer.named_parameters()
                       if n.startswith(("hada", "lokr"))}
        ours = {n: p for n, p in layer.named_parameters() if p.requires_grad}
        assert sorted(peft_params) == sorted(ours)
        for name, p in ours.items():
            assert torch.equal(p, peft_params[name]), name
        randomize_(layer, scale=0.2, seed=42, names=["hada", "lokr"])
        with torch.no_grad():
            for name, p in ours.items():
                peft_params[name].copy_(p)
            y = layer(x)
            assert_rel_close(y, peft_layer(x), name=f"{type(layer).__name__} vs PEFT")
            weight = layer.base_layer.weight.clone()
            layer.merge()
            assert_rel_close(layer(x), y, name="merged")
            layer.unmerge()
            assert_rel_close(layer.base_layer.weight, weight, name="unmerged W")
            assert not layer.merged


@pytest.mark.parametrize("dtype", DTYPES)
def test_layers_every_dtype_follow_peft_dtype_policy(dtype):
    base = linear_model(24, 16, dtype=dtype, seed=43)[0]
    for layer in (layers.LoHaLinear(copy.deepcopy(base), 2, init_weights=False),
                  layers.LoKrLinear(copy.deepcopy(base), 1, decompose_both=True, init_weights=False)):
        params = [p for p in layer.parameters() if p.requires_grad]
        assert {p.dtype for p in params} == {F32}
        x = randn(4, 24, dtype=dtype, seed=44, requires_grad=True)
        y = layer(x)
        y.float().sum().backward()
        assert y.dtype == dtype and x.grad.dtype == dtype and all(p.grad.dtype == F32 for p in params)
    same = layers.LoKrLinear(copy.deepcopy(base), 1, autocast_adapter_dtype=False)
    assert {p.dtype for p in same.parameters() if p.requires_grad} == {dtype}


def test_layers_save_only_x():
    """bytes(x) of activations (plus LoKr's 8 x 8 products w1 and w2 of its factored sides)."""
    from fastadapt.bench import saved_activation_ratio
    x = randn(1024, 64, dtype=F32, requires_grad=True, seed=45)
    for layer, extra in ((layers.LoHaLinear(linear_model(64, 64, dtype=F32, seed=46)[0], 8, init_weights=False), 0),
                         (layers.LoKrLinear(linear_model(64, 64, dtype=F32, seed=47)[0], 1, decompose_both=True),
                          2 * 8 * 8 / x.numel())):
        ratio = saved_activation_ratio(layer, x)
        assert ratio == pytest.approx(1.0 + extra, abs=1e-9), f"{type(layer).__name__} saved {ratio:.4f} x bytes(x)"


def test_layers_compile_without_graph_breaks():
    x = randn(6, 32, dtype=F32, requires_grad=True, seed=48)
    for layer in (layers.LoHaLinear(linear_model(32, 16, dtype=F32, seed=49)[0], 4, init_weights=False),
                  layers.LoKrLinear(linear_model(32, 16, dtype=F32, seed=50)[0], 1, decompose_both=True)):
        torch._dynamo.reset()
        assert torch._dynamo.explain(layer)(x).graph_break_count == 0
        torch._dynamo.reset()
        y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
        (dx,) = torch.autograd.grad(y.sum(), [x])
        (dx_eager,) = torch.autograd.grad(layer(x).sum(), [x])
        assert_rel_close(dx, dx_eager, name="compiled dx")


@pytest.mark.parametrize("dtype", [torch.bfloat16, F16])
def test_layers_under_autocast_equal_peft_under_autocast(dtype):
    """The ops keep the float32 adapter under autocast and cast x, W, bias (PEFT computes its delta in
    the autocast dtype: the fused result is the closer of the two to float64)."""
    base = linear_model(32, 16, dtype=F32, seed=51)[0]
    x = randn(3, 5, 32, dtype=F32, seed=52)
    for config, ours in ((LoHaConfig(r=4, alpha=8, target_modules=["0"]), lambda b: layers.LoHaLinear(b, 4, 8)),
                         (LoKrConfig(r=2, alpha=4, target_modules=["0"]), lambda b: layers.LoKrLinear(b, 2, 4))):
        peft_layer = get_peft_model(torch.nn.Sequential(copy.deepcopy(base)), config).base_model.model[0]
        randomize_(peft_layer, scale=0.2, seed=53, names=["hada", "lokr"])
        layer = ours(copy.deepcopy(base))
        with torch.no_grad():
            for name, p in layer.named_parameters():
                if p.requires_grad:
                    p.copy_(getattr(peft_layer, name)["default"])
            with torch.autocast("cpu", dtype=dtype):
                expected, actual = peft_layer(x), layer(x)
            truth = copy.deepcopy(layer).double()(x.double())
        assert actual.dtype == expected.dtype == F32      # PEFT's result.to(previous_dtype)
        assert_rel_close(actual.float(), expected.float(), dtype, name=type(layer).__name__)
        assert rel_error(actual, truth) <= 1.5 * rel_error(expected, truth)


def test_bad_input_names_the_parameter():
    base = linear_model(24, 16, dtype=F32, seed=54)[0]
    with pytest.raises(ValueError, match="r=17"):
        layers.LoHaLinear(copy.deepcopy(base), 17)
    with pytest.raises(ValueError, match="r=0"):
        layers.LoKrLinear(copy.deepcopy(base), 0)
    with pytest.raises(ValueError, match="decompose_factor"):
        layers.LoKrLinear(copy.deepcopy(base), 2, decompose_factor=0)
    with pytest.raises(ValueError, match="init_weights"):
        layers.LoKrLinear(copy.deepcopy(base), 2, init_weights="orthogonal")
    x, w = randn(3, 24, dtype=F32, seed=55), base.weight.detach()
    f = lambda *s: randn(*s, dtype=F32, seed=56)  # noqa: E731
    with pytest.raises(ValueError, match="hada_w2_b"):
        ops.loha_linear(x, w, None, f(16, 2), f(2, 24), f(16, 2), f(2, 23), 1.0)
    with pytest.raises(ValueError, match="hada_w1_a"):
        ops.loha_linear(x, w, None, f(15, 2), f(2, 24), f(16, 2), f(2, 24), 1.0)
    with pytest.raises(TypeError, match="hada_w1_b"):
        ops.loha_linear(x, w, None, f(16, 2), f(2, 24).half(), f(16, 2), f(2, 24), 1.0)
    with pytest.raises(ValueError, match="out_features=16"):
        ops.lokr_linear(x, w, None, 1.0, lokr_w1=f(3, 4), lokr_w2=f(4, 6))
    with pytest.raises(ValueError, match="in_features=24"):
        ops.lokr_linear(x, w, None, 1.0, lokr_w1=f(4, 4), lokr_w2=f(4, 5))
    with pytest.raises(ValueError, match="lokr_w2_b"):
        ops.lokr_linear(x, w, None, 1.0, lokr_w1=f(4, 4), lokr_w2_a=f(4, 2), lokr_w2_b=f(3, 6))
    with pytest.raises(ValueError, match="lokr_w1"):
        ops.lokr_linear(x, w, None, 1.0, lokr_w2=f(4, 6))
    with pytest.raises(ValueError, match="requires grad"):
        ops.loha_linear(x, w.clone().requires_grad_(), None, f(16, 2), f(2, 24), f(16, 2), f(2, 24), 1.0)


# ----------------------------------------------------------------------------- PEFT bridge

def _peft_model(config, d_in, d_out, *, dtype=F32, seed, scale=0.2):
    model = get_peft_model(linear_model(d_in, d_out, dtype=dtype, seed=seed), config)
    randomize_(model, scale=scale, seed=seed + 2, names=["hada_", "lokr_"])
    return model


def _accelerated_run(model, x, cotangent, seed=0):
    fused = copy.deepcopy(model)
    report = fastadapt.accelerate(fused)
    result = output_and_grads(fused, x, cotangent, seed)
    assert report.fused_calls == 1 and not report.fallbacks, str(report)
    return result


BRIDGE_CONFIGS = {
    "loha_r4": LoHaConfig(r=4, alpha=8, target_modules=["0"]),
    "loha_r16": LoHaConfig(r=16, alpha=32, target_modules=["0"]),
    "lokr_full": LoKrConfig(r=16, alpha=32, target_modules=["0"]),
    "lokr_w2_factored": LoKrConfig(r=3, alpha=6, target_modules=["0"]),
    "lokr_both_factored": LoKrConfig(r=2, alpha=4, decompose_both=True, target_modules=["0"]),
}
# decompose_both with a factored w1 (lokr_w1_a / lokr_w1_b, no lokr_w1): fastadapt.peft's
# _common_reason looks for the active adapter in the layer's first adapter container only
# (PEFT's adapter_layer_names[0] = "lokr_w1") and falls back as if the adapter were absent.
@pytest.mark.parametrize("name", list(BRIDGE_CONFIGS))
def test_bridge_equals_peft(name):
    """Output, x's and every parameter's gradient equal PEFT's (float32, 64 -> 48 features)."""
    model = _peft_model(copy.deepcopy(BRIDGE_CONFIGS[name]), 64, 48, seed=60)
    layer = model.base_model.model[0]
    if name.startswith("lokr"):
        want = {"lokr_full": {"lokr_w1", "lokr_w2"}, "lokr_w2_factored": {"lokr_w1", "lokr_w2_a", "lokr_w2_b"},
                "lokr_both_factored": {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}}[name]
        assert {n for n in ops.LOKR_FACTORS if "default" in getattr(layer, n)} == want
    x = noncontig(randn(3, 7, 64, dtype=F32, seed=61))
    cotangent = randn(3, 7, 48, dtype=F32, seed=62)
    expected = output_and_grads(model, x, cotangent)
    actual = _accelerated_run(model, x, cotangent)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_rel_close(a, e, name=f"output / gradient {i}")


def test_lokr_both_factored_op_equals_peft_layer():
    """The op itself on PEFT's decompose_both layer (w1 and w2 factored): PEFT's numbers."""
    model = _peft_model(copy.deepcopy(BRIDGE_CONFIGS["lokr_both_factored"]), 64, 48, seed=63)
    x = randn(3, 7, 64, dtype=F32, seed=64)
    cotangent = randn(3, 7, 48, dtype=F32, seed=65)
    expected = output_and_grads(model, x, cotangent)
    fused = copy.deepcopy(model)
    fused.base_model.model[0].forward = lambda t: layers.lokr_forward(fused.base_model.model[0], "default", t)
    for i, (a, e) in enumerate(zip(output_and_grads(fused, x, cotangent), expected)):
        assert_rel_close(a, e, name=f"output / gradient {i}")
    assert len(expected) == 6 and all(g.abs().max() > 0 for g in expected[1:])


def test_loha_rank_dropout_in_training_equals_peft():
    """PEFT's rank-dropout mask (its own torch.rand draws, rescaled rows) in training: fused, exact."""
    config = LoHaConfig(r=4, alpha=8, rank_dropout=0.5, target_modules=["0"])
    model = _peft_model(config, 32, 24, seed=66).train()
    x = randn(5, 32, dtype=F32, seed=67)
    cotangent = randn(5, 24, dtype=F32, seed=68)
    expected = output_and_grads(model, x, cotangent, seed=5)
    actual = _accelerated_run(model, x, cotangent, seed=5)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_rel_close(a, e, name=f"output / gradient {i}")
    model.eval()
    assert rel_error(output_and_grads(model, x, cotangent)[0], expected[0]) > 0.01   # the mask mattered


@pytest.mark.parametrize("dtype", [torch.bfloat16, F16])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
@pytest.mark.parametrize("name", ["loha_r4", "lokr_w2_factored"])
def test_half_models_as_accurate_as_peft(dtype, autocast_adapter_dtype, name):
    """bf16 / fp16 models, PEFT's float32 adapters or adapters in the base dtype: output and every
    gradient within the table of the float64 truth or at most 1.5 x PEFT's own error."""
    peft64 = _peft_model(copy.deepcopy(BRIDGE_CONFIGS[name]), 48, 32, dtype=F64, seed=70, scale=0.1)
    model = copy.deepcopy(peft64).to(dtype)
    if autocast_adapter_dtype:
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
    x = randn(4, 9, 48, dtype=dtype, seed=71)
    cotangent = randn(4, 9, 32, dtype=dtype, seed=72)
    peft = output_and_grads(model, x, cotangent)
    fused = _accelerated_run(model, x, cotangent)
    truth = output_and_grads(peft64, x.to(F64), cotangent.to(F64))
    for i, (f, p, t) in enumerate(zip(fused, peft, truth)):
        err, peft_err = rel_error(f, t), rel_error(p, t)
        assert err <= max(tolerance(dtype), 1.5 * peft_err), f"output / gradient {i}: {err:.3e}, PEFT {peft_err:.3e}"


def test_bridge_falls_back_where_it_must():
    """Module dropout and LoKr's rank dropout in training, a trainable base weight, an adapter dtype
    PEFT's policy does not produce: PEFT's forward, with the reason; eval calls of the same configs fuse."""
    x = randn(3, 16, dtype=F32, seed=73)
    for config, reason in ((LoHaConfig(r=2, module_dropout=0.5, target_modules=["0"]), layers.MODULE_DROPOUT_REASON),
                           (LoKrConfig(r=2, rank_dropout=0.5, target_modules=["0"]), layers.LOKR_RANK_DROPOUT_REASON)):
        model = _peft_model(config, 16, 16, seed=74)
        report = fastadapt.accelerate(model)
        model.train()
        model(x)
        assert report.fallbacks == {reason: 1}, str(report)
        model.eval()
        model(x)
        assert report.fused_calls == 1
    layer = model.base_model.model[0]
    layer.get_base_layer().weight.requires_grad_(True)
    model(x)
    assert any("trainable" in r for r in report.fallbacks), str(report)
    layer.get_base_layer().weight.requires_grad_(False)
    layer.lokr_w1["default"].data = layer.lokr_w1["default"].data.half()
    model(x)
    assert any("mixed dtypes" in r for r in report.fallbacks), str(report)


def test_conv_layers_stay_peft():
    """PEFT's Conv2d LoHa / LoKr layers are not patched: the report names them, PEFT's forward runs."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 4))
    for config in (LoHaConfig(r=2, target_modules=["0", "2"]), LoKrConfig(r=2, target_modules=["0", "2"])):
        peft_model = get_peft_model(copy.deepcopy(model), config)
        x = randn(2, 3, 6, 6, dtype=F32, seed=75)
        expected = peft_model(x)
        report = fastadapt.accelerate(peft_model)
        assert report.num_patched == 1 and any("Conv2d" in cls for cls in report.skipped), str(report)
        assert_rel_close(peft_model(x), expected)


def test_accelerated_model_compiles_without_graph_breaks():
    for config in (LoHaConfig(r=2, rank_dropout=0.3, target_modules=["0"]),
                   LoKrConfig(r=1, target_modules=["0"])):
        model = _peft_model(config, 16, 24, seed=76).train()
        fastadapt.accelerate(model)
        x = randn(3, 16, dtype=F32, seed=77, requires_grad=True)
        torch._dynamo.reset()
        assert torch._dynamo.explain(model)(x).graph_break_count == 0
        fastadapt.revert(model)
