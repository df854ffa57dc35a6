"""lowrank family, the methods beside LoRA: VeRA, AdaLoRA, VB-LoRA (on LoRA's op), IA3, MiSS,
SHiRA, RandLoRA (their own ops): PEFT parity through the bridge, the float64 references, every dtype,
float64 gradcheck, the Triton paths in the interpreter, saved activations, torch.compile, bad input.
"""
import copy
import warnings

import pytest
import torch
from peft import AdaLoraConfig, IA3Config, MissConfig, RandLoraConfig, ShiraConfig, VBLoRAConfig, VeraConfig, \
    get_peft_model

import fastadapt
from fastadapt.bench import saved_activation_ratio
from fastadapt.numerics import assert_rel_close
from fastadapt.ops import lowrank as ops
from fastadapt.reference import lowrank as lowrank_ref
from fastadapt.reference import structured
from fastadapt.testing import (
    assert_fused_as_accurate_as_peft, linear_model, noncontig, output_and_grads, perturb_, randn, triton_launches)

F16, F32, F64 = torch.float16, torch.float32, torch.float64
INTERPRETER_BF16 = "the Triton interpreter has no bfloat16 arithmetic (compiled GPUs run it)"

# method -> (PEFT config factory (dropout p) -> config, float64 reference class or None, conv1d supported)
METHODS = {
    "vera": (lambda p: VeraConfig(r=8, vera_dropout=p, target_modules=["0"]), lowrank_ref.VeRA, True),
    "adalora": (lambda p: AdaLoraConfig(init_r=6, lora_alpha=4, total_step=10, lora_dropout=p, target_modules=["0"]),
                lowrank_ref.AdaLoRA, True),
    "vblora": (lambda p: VBLoRAConfig(r=4, vector_length=4, num_vectors=8, topk=2, vblora_dropout=p,
                                      target_modules=["0"]), lowrank_ref.VBLoRA, True),
    "ia3_feedforward": (lambda p: IA3Config(target_modules=["0"], feedforward_modules=["0"]), structured.IA3, True),
    "ia3_output": (lambda p: IA3Config(target_modules=["0"], feedforward_modules=[]), structured.IA3, True),
    "miss": (lambda p: MissConfig(r=5, miss_dropout=p, target_modules=["0"]), structured.MiSS, False),
    "miss_mini": (lambda p: MissConfig(r=4, init_weights="mini", mini_r=4, miss_dropout=p, target_modules=["0"]),
                  structured.MiSS, False),
    "shira": (lambda p: ShiraConfig(r=2, target_modules=["0"]), structured.SHiRA, False),
    "randlora": (lambda p: RandLoraConfig(r=3, randlora_dropout=p, target_modules=["0"]), lowrank_ref.RandLoRA, True),
}
HAS_DROPOUT = ("vera", "adalora", "vblora", "miss", "miss_mini", "randlora")


def _peft_model(method, d_in, d_out, *, dtype=F32, seed, p=0.0, bias=True, conv1d=False):
    config = METHODS[method][0](p)
    if conv1d:
        from transformers.pytorch_utils import Conv1D
        base = Conv1D(d_out, d_in)
        with torch.no_grad():
            base.weight.copy_(randn(d_in, d_out, seed=seed) / d_in ** 0.5)
            base.bias.copy_(randn(d_out, seed=seed + 1))
        model, config.fan_in_fan_out = torch.nn.Sequential(base).to(dtype), True
    else:
        model = linear_model(d_in, d_out, dtype=dtype, seed=seed, bias=bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(model, config)
    perturb_(model, scale=0.3, seed=seed + 2)
    return model


# ----------------------------------------------------------------------------- PEFT parity (fp32, float64 masks)

@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("shape", [(24, 16), (16, 40)])
def test_bridge_equals_peft(method, shape):
    """Output, x's and every trainable parameter's gradient equal PEFT's, in eval and, where the
    method drops its input, in training with nn.Dropout's own masks (dropout="torch")."""
    d_in, d_out = shape
    p = 0.3 if method in HAS_DROPOUT else 0.0
    model = _peft_model(method, d_in, d_out, seed=10, p=p)
    fused = copy.deepcopy(model)
    report = fastadapt.accelerate(fused, dropout="torch")
    x = noncontig(randn(3, 7, d_in, dtype=F32, seed=11))
    cotangent = randn(3, 7, d_out, dtype=F32, seed=12)
    for train in (False, True) if p else (False,):
        model.train(train), fused.train(train)
        for i, (a, e) in enumerate(zip(output_and_grads(fused, x, cotangent), output_and_grads(model, x, cotangent))):
            assert_rel_close(a, e, name=f"train={train}: {'output' if i == 0 else f'gradient {i}'}")
    assert report.fused_calls >= 1 and not report.fallbacks, str(report)


@pytest.mark.parametrize("method", sorted(m for m, (_, _, conv1d) in METHODS.items() if conv1d))
def test_bridge_conv1d_base_equals_peft(method):
    model = _peft_model(method, 20, 12, seed=13, conv1d=True)
    fused = copy.deepcopy(model)
    report = fastadapt.accelerate(fused)
    x, cotangent = randn(4, 20, dtype=F32, seed=14), randn(4, 12, dtype=F32, seed=15)
    for i, (a, e) in enumerate(zip(output_and_grads(fused, x, cotangent), output_and_grads(model, x, cotangent))):
        assert_rel_close(a, e, name=f"{'output' if i == 0 else f'gradient {i}'}")
    assert report.fused_calls == 1 and not report.fallbacks, str(report)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_float64_reference_of_the_peft_layer_matches_the_bridge(method):
    """fastadapt.reference's float64 oracle of the PEFT layer (its from_peft) equals the fused layer."""
    model = _peft_model(method, 24, 16, dtype=F64, seed=16)
    ref = METHODS[method][1].from_peft(model.base_model.model[0])
    fastadapt.accelerate(model)
    x = randn(5, 24, seed=17)
    assert_rel_close(model(x), ref(x), F64, name="output vs reference")


@pytest.mark.parametrize("dtype", [torch.bfloat16, F16, F32])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_every_dtype_as_accurate_as_peft(method, dtype, autocast_adapter_dtype):
    """A model in ``dtype`` with PEFT's float32 adapter (or one in the model's dtype): output and
    every gradient within the table of the float64 truth, or at most 1.5 x PEFT's own error."""
    if dtype == F32 and not autocast_adapter_dtype:
        pytest.skip("float32: one layout only")
    peft64 = _peft_model(method, 48, 32, dtype=F64, seed=18)
    model = copy.deepcopy(peft64).to(dtype)
    if autocast_adapter_dtype:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    for name, b in model.named_buffers():     # PEFT keeps shared projections / bases in the adapter dtype
        if b.is_floating_point() and any(k in name for k in ("vera_", "randlora_")):
            b.data = b.data.to(F32 if autocast_adapter_dtype else dtype)
    x = randn(4, 9, 48, dtype=dtype, seed=19)
    cotangent = randn(4, 9, 32, dtype=dtype, seed=20)
    assert_fused_as_accurate_as_peft(model, peft64, x, cotangent, dtype)


# ----------------------------------------------------------------------------- ops: gradcheck, Triton, saved

def _op_cases(dtype=F64, device="cpu"):
    """(name, fn(x, *params) -> y, x, params) for each own op, on random inputs."""
    def r(*shape, seed, scale=1.0):
        return randn(*shape, dtype=dtype, device=device, seed=seed, scale=scale).requires_grad_()
    w, b = randn(6, 8, dtype=dtype, device=device, seed=21, scale=0.4), r(6, seed=22)
    w_wide = randn(8, 6, dtype=dtype, device=device, seed=23, scale=0.4)
    idx = torch.tensor([[0, 5, 2, 2, 5, 1], [7, 1, 3, 3, 0, 4]], device=device)
    a1, b1 = randn(2, 1, 6, dtype=dtype, device=device, seed=24), randn(8, 3, 2, dtype=dtype, device=device, seed=25)
    yield "ia3_feedforward", lambda x, b_, l: ops.ia3_linear(x, w, b_, l, feedforward=True), r(5, 8, seed=26), \
        [b, r(8, seed=27)]
    yield "ia3_output", lambda x, b_, l: ops.ia3_linear(x, w, b_, l, feedforward=False), r(5, 8, seed=28), \
        [b, r(6, seed=29)]
    for p in (0.0, 0.3):
        yield f"miss p={p}", lambda x, b_, d, p=p: ops.miss_linear(x, w, b_, d, dropout_p=p), r(5, 8, seed=30), \
            [b, r(3, 6, seed=31)]     # r = 3: x padded to 9
        yield f"randlora p={p} in > out", lambda x, lam, gam, p=p: ops.randlora_linear(
            x, w, None, a1, b1, lam, gam, 0.7, dropout_p=p), r(5, 8, seed=32), [r(2, 3, seed=33), r(3, 6, seed=34)]
        yield f"randlora p={p} in < out", lambda x, lam, gam, p=p: ops.randlora_linear(
            x, w_wide, None, a1, b1, lam, gam, 0.7, dropout_p=p), r(5, 6, seed=35), [r(2, 3, seed=36), r(3, 6, seed=37)]
    yield "shira", lambda x, b_, sw: ops.shira_linear(x, w, b_, sw, idx, 1.5), r(5, 8, seed=38), [b, r(6, seed=39)]


@pytest.mark.parametrize("case", list(_op_cases()), ids=lambda c: c[0])
def test_ops_gradcheck_float64(case):
    name, fn, x, params = case

    def call(*args):
        torch.manual_seed(0)     # the same dropout mask at every evaluation
        return fn(*args)
    assert torch.autograd.gradcheck(call, (x, *params), fast_mode=True)


def test_shira_sampled_product_over_token_chunks(monkeypatch):
    """SHiRA's dw over several token chunks (a short last one, repeated positions) equals the
    float64 dY^T x read at the positions."""
    from fastadapt.ops import lowrank_shira
    monkeypatch.setattr(lowrank_shira, "SAMPLED_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(lowrank_shira, "SAMPLED_MIN_ROWS", 4)
    dy, x = randn(11, 6, dtype=F32, seed=47), noncontig(randn(11, 9, dtype=F32, seed=48))
    indices = torch.tensor([[5, 0, 2, 2, 3], [8, 1, 4, 4, 0]])
    plan = lowrank_shira.shira_plan(indices, 6, 9)
    got = torch.empty(5).index_copy_(0, plan.order.long(), lowrank_shira.sampled_product(dy, x, plan.crow, plan.ccol))
    expected = (dy.double().T @ x.double())[indices[0], indices[1]]
    assert_rel_close(got, expected, F32, name="dw")


def test_ia3_input_scale_gradient_over_row_chunks(monkeypatch):
    """IA3 (input side) on a bfloat16 base with PEFT's float32 l: dl's column dots over several row
    chunks (a short last one, x non-contiguous) and dx equal the float64 reference."""
    from fastadapt.ops import lowrank_ia3
    monkeypatch.setattr(lowrank_ia3, "COLUMN_DOT_ROWS", 4)
    bf16 = torch.bfloat16
    x = noncontig(randn(11, 9, dtype=bf16, seed=77)).requires_grad_()
    weight, bias = randn(6, 9, dtype=bf16, scale=0.3, seed=78), randn(6, dtype=bf16, seed=79)
    l = randn(9, dtype=F32, seed=80, requires_grad=True)
    dy = randn(11, 6, dtype=bf16, seed=81)
    y = ops.ia3_linear(x, weight, bias, l, feedforward=True)
    got = torch.autograd.grad(y, (x, l), dy)
    x64, l64 = x.detach().double().requires_grad_(), l.detach().double().requires_grad_()
    y64 = (x64 * l64) @ weight.double().T + bias.double()
    expected = torch.autograd.grad(y64, (x64, l64), dy.double())
    assert_rel_close(y, y64, bf16, name="y")
    for name, g, e in zip(("dx", "dl"), got, expected):
        assert_rel_close(g, e, bf16, name=name)


@pytest.fixture
def triton_backend(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")


TRITON_DTYPES = [F32, F16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason=INTERPRETER_BF16))]
# float32 MiSS without dropout multiplies by the merged weight (cuBLAS): only dD's float32 product runs Triton
TRITON_KERNELS = {"ia3": {"_scaled_lowrank_gemm_kernel"}, "miss": {"_scaled_lowrank_gemm_kernel", "_float32_matmul_kernel"},
                  "randlora": {"_randlora_scale_grad_kernel"}, "shira": {"_sampled_product_kernel"}}


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_own_ops_triton_paths_against_float64(triton_backend, device, dtype, monkeypatch):
    """Each op's Triton path (its kernels launched) in ``dtype`` against the same op in float64."""
    for (name, fn, x64, params64), (_, fn_d, x_d, params_d) in zip(_op_cases(F64, device), _op_cases(dtype, device)):
        if "p=0.3" in name and name.startswith("miss"):
            continue    # MiSS's padded mask runs torch (covered by the gradcheck); its unpadded one below
        cotangent = randn(x64.shape[0], 6 if x64.shape[1] == 8 else 8, device=device, seed=40)
        monkeypatch.setenv("FASTADAPT_BACKEND", "torch")
        torch.manual_seed(1)
        y64 = fn(x64, *params64)
        expected = [y64, *torch.autograd.grad(y64, [x64, *params64], cotangent)]
        monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
        torch.manual_seed(1)
        with triton_launches() as launched:
            y = fn_d(x_d, *params_d)
            got = [y, *torch.autograd.grad(y, [x_d, *params_d], cotangent.to(dtype))]
        assert TRITON_KERNELS[name.split()[0].split("_")[0]] & set(launched), (name, launched)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_rel_close(g, e, dtype, scale=1.0 if dtype == F32 else 3.0, name=f"{name}: {i}")


def test_miss_masked_gemm_epilogue_in_the_interpreter(triton_backend):
    """MiSS with dropout and r dividing in: dx from the masked low-rank GEMM with F (r, in)."""
    x64 = randn(18, 32, seed=41)
    weight, block = randn(16, 32, seed=42, scale=0.2), randn(8, 16, seed=43)
    cotangent = randn(18, 16, seed=44)
    results = []
    for dtype, backend in ((F64, "torch"), (F32, "triton")):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("FASTADAPT_BACKEND", backend)
            x, d = x64.to(dtype).requires_grad_(), block.to(dtype).requires_grad_()
            torch.manual_seed(2)
            with triton_launches() as launched:
                y = ops.miss_linear(x, weight.to(dtype), None, d, dropout_p=0.2)
                results.append([y, *torch.autograd.grad(y, [x, d], cotangent.to(dtype))])
    assert "_masked_lowrank_gemm_kernel" in launched
    for i, (g, e) in enumerate(zip(*reversed(results))):
        assert_rel_close(e, g, F32, name=f"output {i}")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_saved_activations_at_most_bytes_of_x(method):
    """x alone (or IA3's output-side base product: out / in of it), never a second copy of x, dW,
    or (VeRA r = 8) u beyond 1/32 of bytes(x); with dropout in training the mask's seed (8 bytes)."""
    model = _peft_model(method, 256, 256, seed=45, p=0.1 if method in HAS_DROPOUT else 0.0)
    fastadapt.accelerate(model)
    x = randn(2048, 256, dtype=F32, seed=46, requires_grad=True)
    for train in (False, True):
        model.train(train)
        ratio = saved_activation_ratio(model, x)
        assert ratio <= 1.05, f"train={train}: saved {ratio:.3f} x bytes(x)"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_accelerated_model_compiles_without_graph_breaks(method):
    model = _peft_model(method, 16, 24, seed=47, p=0.1 if method in HAS_DROPOUT else 0.0)
    fastadapt.accelerate(model)
    x = randn(3, 16, dtype=F32, seed=48, requires_grad=True)
    for train in (False, True):
        model.train(train)
        torch._dynamo.reset()
        assert torch._dynamo.explain(model)(x).graph_break_count == 0
    torch._dynamo.reset()
    model.eval()
    y = torch.compile(model, fullgraph=True)(x)
    assert_rel_close(y, model(x), name="compiled")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bridge_under_autocast_equals_peft_under_autocast(method):
    model = _peft_model(method, 32, 16, seed=49)
    fused = copy.deepcopy(model)
    report = fastadapt.accelerate(fused)
    x = randn(3, 5, 32, dtype=F32, seed=50)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = model(x), fused(x)
    assert actual.dtype == expected.dtype
    assert_rel_close(actual.float(), expected.float(), torch.bfloat16, name="autocast output")
    assert report.fused_calls == 1, str(report)


# ----------------------------------------------------------------------------- fallbacks and bad input

def test_bridge_falls_back_with_a_reason():
    """MiSS "bat", two active MiSS adapters: PEFT's forward, with the reason."""
    x = randn(3, 16, dtype=F32, seed=51)
    bat = get_peft_model(linear_model(16, 16, seed=52), MissConfig(r=4, init_weights="bat", target_modules=["0"]))
    report = fastadapt.accelerate(bat)
    bat(x)
    assert report.fallbacks == {"adapter configuration has no fused path": 1}, str(report)
    miss = _peft_model("miss", 16, 12, seed=54)
    miss.add_adapter("other", MissConfig(r=2, target_modules=["0"]))
    miss.base_model.set_adapter(["default", "other"])
    report = fastadapt.accelerate(miss)
    expected = type(miss.base_model.model[0]).forward(miss.base_model.model[0], x)
    assert_rel_close(miss(x), expected, name="two MiSS adapters")
    assert "2 active adapters" in " | ".join(report.fallbacks), str(report)


def test_bad_input_names_the_parameter():
    x, w = randn(3, 12, dtype=F32, seed=55), randn(8, 12, dtype=F32, seed=56)
    with pytest.raises(ValueError, match="ia3_l"):
        ops.ia3_linear(x, w, None, randn(8, dtype=F32, seed=57), feedforward=True)
    with pytest.raises(ValueError, match="miss_block"):
        ops.miss_linear(x, w, None, randn(13, 8, dtype=F32, seed=58))
    with pytest.raises(ValueError, match="shira_indices"):
        ops.shira_linear(x, w, None, randn(2, dtype=F32, seed=59), torch.tensor([[0, 8], [1, 1]]))
    with pytest.raises(ValueError, match="shira_indices"):
        ops.shira_linear(x, w, None, randn(2, dtype=F32, seed=60), torch.tensor([[0, 1], [1, -1]]))
    with pytest.raises(ValueError, match="shira_weight"):
        ops.shira_linear(x, w, None, randn(3, dtype=F32, seed=61), torch.tensor([[0, 1], [1, 2]]))
    with pytest.raises(ValueError, match="randlora_B"):
        ops.randlora_linear(x, w, None, randn(2, 1, 8, dtype=F32, seed=62), randn(12, 3, 2, dtype=F32, seed=63),
                            randn(2, 4, dtype=F32, seed=64), randn(4, 8, dtype=F32, seed=65), 1.0)
    with pytest.raises(TypeError, match="miss_block"):
        ops.miss_linear(x, w, None, randn(3, 8, dtype=F64, seed=66))
    # PEFT's own checks stay where PEFT raises them, under accelerate too
    model = get_peft_model(linear_model(16, 12, seed=67), VeraConfig(r=4, target_modules=["0"]))
    fastadapt.accelerate(model)
    with pytest.raises(ValueError, match="vera_A"):    # a second VeRA adapter of a rank above the shared projection's
        model.add_adapter("other", VeraConfig(r=8, target_modules=["0"]))
    with pytest.raises(ValueError, match="r"):         # PEFT: MiSS r above in_features
        get_peft_model(linear_model(4, 6, seed=68), MissConfig(r=5, target_modules=["0"]))


# ----------------------------------------------------------------------------- SVFT (fastadapt's layer)

def _svft_layer(dtype=F64, *, r=10, pattern="banded", seed, autocast_adapter_dtype=True, device="cpu"):
    from fastadapt.layers.lowrank import SVFTLinear
    base = linear_model(24, 16, dtype=dtype, seed=seed)[0].to(device)
    layer = SVFTLinear(copy.deepcopy(base), r, pattern=pattern, off_diag=0 if pattern == "plain" else 2, seed=seed,
                       autocast_adapter_dtype=autocast_adapter_dtype)
    with torch.no_grad():
        layer.svft_m.copy_(randn(layer.svft_m.shape[0], seed=seed + 1))
    ref = structured.SVFT(base.weight.to(F64), base.bias.to(F64), r, pattern=pattern,
                          off_diag=0 if pattern == "plain" else 2, seed=seed, svft_m=layer.svft_m.detach().to(F64))
    return layer, ref


@pytest.mark.parametrize("dtype", [F64, F32, torch.bfloat16, F16])
@pytest.mark.parametrize("pattern", ["plain", "banded", "random"])
def test_svft_layer_against_float64_reference(dtype, pattern):
    """Output and the gradients of x, svft_m and the bias against fastadapt.reference's SVFT; the
    layer's SVD is the reference's (float64), kept in float32 on a half base (PEFT's adapter rule)."""
    layer, ref = _svft_layer(dtype, pattern=pattern, seed=70)
    layer.base_layer.bias.requires_grad_(True)
    ref.bias = torch.nn.Parameter(ref.bias)
    x = randn(3, 7, 24, dtype=dtype, seed=71, requires_grad=True)
    cotangent = randn(3, 7, 16, dtype=dtype, seed=72)
    y = layer(x)
    got = [y, *torch.autograd.grad(y, [x, layer.svft_m, layer.base_layer.bias], cotangent)]
    x64 = x.detach().to(F64).requires_grad_()
    y64 = ref(x64)
    want = [y64, *torch.autograd.grad(y64, [x64, ref.svft_m, ref.bias], cotangent.to(F64))]
    for i, (g, w) in enumerate(zip(got, want)):
        assert_rel_close(g, w, dtype, scale=1.0 if dtype in (F32, F64) else 2.0, name=f"{i}")


def test_svft_merge_gradcheck_compile_and_saved():
    layer, _ = _svft_layer(F64, seed=73)
    x = randn(5, 24, seed=74, requires_grad=True)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert_rel_close(layer(x), y, name="merged")
        layer.unmerge()
        assert_rel_close(layer(x), y, name="unmerged")
    assert torch.autograd.gradcheck(lambda x, m: ops.svft_linear(x, layer.base_layer.weight, layer.base_layer.bias,
                                                                 layer.svft_u, layer.svft_vh, m, layer.svft_indices),
                                    (x, layer.svft_m), fast_mode=True)
    layer32, _ = _svft_layer(F32, r=16, seed=75)
    torch._dynamo.reset()
    assert torch._dynamo.explain(layer32)(x.detach().float().requires_grad_()).graph_break_count == 0
    ratio = saved_activation_ratio(layer32, randn(2048, 24, dtype=F32, seed=76))
    assert ratio <= 1.05, f"saved {ratio:.3f} x bytes(x)"


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_svft_triton_path(triton_backend, device, dtype):
    layer, ref = _svft_layer(dtype, r=16, seed=77, device=device)
    x = randn(2, 9, 24, dtype=dtype, seed=78, device=device, requires_grad=True)
    with triton_launches() as launched:
        y = layer(x)
        gx, gm = torch.autograd.grad(y, [x, layer.svft_m], torch.ones_like(y))
    assert "_scaled_lowrank_gemm_kernel" in launched
    x64 = x.detach().to(F64).requires_grad_()
    y64 = ref.to(device)(x64)
    rx, rm = torch.autograd.grad(y64, [x64, ref.svft_m], torch.ones_like(y64))
    for g, w in ((y, y64), (gx, rx), (gm, rm)):
        assert_rel_close(g, w, dtype, scale=1.0 if dtype == F32 else 2.0)


def test_svft_bad_input():
    from fastadapt.layers.lowrank import SVFTLinear
    with pytest.raises(ValueError, match="r=30"):
        SVFTLinear(linear_model(24, 16, seed=79)[0], 30)
    with pytest.raises(ValueError, match="pattern"):
        SVFTLinear(linear_model(24, 16, seed=79)[0], 4, pattern="dense")
    layer, _ = _svft_layer(F32, seed=80)
    with pytest.raises(ValueError, match="svft_indices"):
        ops.svft_linear(randn(2, 24, dtype=F32, seed=81), layer.base_layer.weight, None, layer.svft_u, layer.svft_vh,
                        layer.svft_m, layer.svft_indices[:, :3])
