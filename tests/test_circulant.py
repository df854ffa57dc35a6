"""Circulant family (C3A, FourierFT): ops (torch path, Triton in the interpreter), layers, PEFT bridge.

Every comparison is a relative Frobenius error against the float64 references of
fastadapt.reference.circulant or PEFT's own layer, within fastadapt.numerics' one tolerance table.

PEFT 0.21's C3A input gradient is not the gradient of its forward: BlockCircularConvolution.backward
correlates dY with the kernel where the forward's adjoint convolves (dx[j] = sum_k dY[k] K[(k + j) mod b]
instead of K[(j - k) mod b]: the true gradient for dY reversed within each block; equal for b <= 2).
fastadapt returns the true gradient (float64 gradcheck, the dense reference's autograd) and the
bridge notes it per call; the PEFT parity tests compare every other gradient with PEFT and x's with
the reference (test_peft_c3a_input_gradient_reverses_dy_blocks pins PEFT's behaviour).
"""
import copy

import pytest
import torch
from peft import C3AConfig, FourierFTConfig, get_peft_model

import fastadapt
from fastadapt.layers import circulant as layers
from fastadapt.numerics import assert_rel_close, rel_error, tolerance
from fastadapt.ops import circulant as ops
from fastadapt.reference.circulant import C3A, FourierFT, spectrum_indices
from fastadapt.testing import DTYPES, linear_model, noncontig, output_and_grads, randn, randomize_

F16, F32, F64 = torch.float16, torch.float32, torch.float64
INTERPRETER_BF16 = "the Triton interpreter has no bfloat16 arithmetic (compiled GPUs run it)"


def _c3a_reference(d_in, d_out, b, *, seed):
    base = linear_model(d_in, d_out, dtype=F64, seed=seed)[0]
    return C3A(base.weight, base.bias, block_size=b, c3a_kernel=randn(d_out // b, d_in // b, b, seed=seed + 1))


def _fourierft_reference(d_in, d_out, n, *, seed, scaling=20.0):
    base = linear_model(d_in, d_out, dtype=F64, seed=seed)[0]
    return FourierFT(base.weight, base.bias, n_frequency=n, scaling=scaling, random_loc_seed=seed,
                     fourierft_spectrum=randn(n, seed=seed + 1))


def _truth(ref, x, cotangent):
    """Float64 output and gradients (x, adapter parameter, bias) of a reference; bias becomes a leaf."""
    ref = copy.deepcopy(ref)
    ref.bias = torch.nn.Parameter(ref.bias)
    x = x.detach().to(F64).requires_grad_()
    y = ref(x)
    (param,) = [p for n, p in ref.named_parameters() if n != "bias"]
    return [y.detach(), *torch.autograd.grad(y, [x, param, ref.bias], cotangent.to(F64))]


def _fused(fn, ref, x, cotangent, dtype, adapter_dtype, param):
    """The same quantities from the fused op in ``dtype`` (adapter in ``adapter_dtype``)."""
    x = x.detach().to(dtype).requires_grad_()
    weight, bias = ref.weight.to(dtype), ref.bias.to(dtype).requires_grad_()
    adapter = param.detach().to(adapter_dtype).requires_grad_()
    y = fn(x, weight, bias, adapter)
    return [y.detach(), *torch.autograd.grad(y, [x, adapter, bias], cotangent.to(dtype))]


def _ops_for(ref):
    if isinstance(ref, C3A):
        return (lambda x, w, b, k: ops.c3a_linear(x, w, b, k)), ref.c3a_kernel
    return (lambda x, w, b, c: ops.fourierft_linear(x, w, b, c, ref.indices, ref.scaling)), ref.fourierft_spectrum


def _assert_fused_equals_reference(ref, x, dtype, adapter_dtype=None, *, grad_scale=1.0):
    fn, param = _ops_for(ref)
    cotangent = randn(*x.shape[:-1], ref.out_features, seed=99)
    expected = _truth(ref, x, cotangent)
    actual = _fused(fn, ref, x, cotangent, dtype, adapter_dtype or dtype, param)
    for name, a, e, scale in zip(("y", "dx", "dparam", "dbias"), actual, expected, (1, 1, grad_scale, grad_scale)):
        assert_rel_close(a, e, dtype, scale=scale, name=name)


# ----------------------------------------------------------------------------- torch path, every dtype

C3A_SHAPES = [(16, 12, 4), (27, 18, 9), (40, 24, 8), (7, 5, 1)]    # (in, out, b): odd b, b = 1, in != out
FOURIERFT_SHAPES = [(16, 12, 40), (27, 20, 101), (9, 7, 63), (13, 6, 1)]   # n = in * out (every location) included


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d_in,d_out,b", C3A_SHAPES)
def test_c3a_torch_path_every_dtype_against_float64(dtype, d_in, d_out, b):
    ref = _c3a_reference(d_in, d_out, b, seed=d_in)
    x = noncontig(randn(9, 41, d_in, seed=1))
    # half: x, W, K and y rounded; dK sums 369 tokens' products
    _assert_fused_equals_reference(ref, x, dtype, grad_scale=1.0 if dtype == F32 else 2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d_in,d_out,n", FOURIERFT_SHAPES)
def test_fourierft_torch_path_every_dtype_against_float64(dtype, d_in, d_out, n):
    ref = _fourierft_reference(d_in, d_out, n, seed=d_in)
    x = noncontig(randn(9, 41, d_in, seed=2))
    _assert_fused_equals_reference(ref, x, dtype, grad_scale=1.0 if dtype == F32 else 2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, F16])
def test_float32_adapter_on_half_base_torch_path(dtype):
    """PEFT's default layout: x, W, bias half, the adapter float32 (W + dW rounded to the half dtype once)."""
    x = randn(3, 17, 24, seed=3)
    _assert_fused_equals_reference(_c3a_reference(24, 16, 8, seed=5), x, dtype, F32, grad_scale=2.0)
    _assert_fused_equals_reference(_fourierft_reference(24, 16, 50, seed=6), x, dtype, F32, grad_scale=2.0)


def test_strided_weight_and_more_chunks_than_one():
    """A transposed weight view (fan_in_fan_out storage) and more rows than one CPU DFT chunk."""
    d_in, d_out = 512, 48
    rows = 2 * ops._chunk_rows(10 ** 9, d_in) + 3
    x = randn(rows, d_in, seed=8)
    cotangent = randn(rows, d_out, seed=9)
    for ref in (_c3a_reference(d_in, d_out, 16, seed=7), _fourierft_reference(d_in, d_out, 77, seed=10)):
        fn, param = _ops_for(ref)
        expected = _truth(ref, x, cotangent)
        for name, a, e in zip(("y", "dx", "dparam", "dbias"), _fused(fn, ref, x, cotangent, F64, F64, param), expected):
            assert_rel_close(a, e, name=name)
        column_major = ref.weight.T.contiguous().T     # same values, other strides
        assert_rel_close(fn(x, column_major, ref.bias, param), expected[0], name="y, strided W")


def test_gradcheck_float64():
    x = randn(2, 2, 12, requires_grad=True, seed=10)
    weight = randn(8, 12, seed=11)
    bias = randn(8, requires_grad=True, seed=12)
    kernel = randn(2, 3, 4, requires_grad=True, seed=13)
    assert torch.autograd.gradcheck(lambda a, b, k: ops.c3a_linear(a, weight, b, k), (x, bias, kernel), fast_mode=True)
    spectrum = randn(30, requires_grad=True, seed=14)
    indices = spectrum_indices(8, 12, 30, 5)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.fourierft_linear(a, weight, b, c, indices, 7.0),
                                    (x, bias, spectrum), fast_mode=True)


# ----------------------------------------------------------------------------- Triton kernels (interpreter on CPU)
# Shapes are small but legal when compiled (tl.dot dims >= 16).  Every kernel runs in fp32 and fp16
# (bf16 only compiled) with the adapter in the base dtype, and with PEFT's float32 adapter on fp16.

TRITON_DTYPES = [F32, F16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason=INTERPRETER_BF16))]


@pytest.fixture
def triton_backend(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("d_in,d_out,b", [(64, 32, 32), (48, 96, 24), (32, 48, 16)])   # b = 24: masked DFT columns
def test_c3a_triton_kernels_against_float64(triton_backend, device, dtype, d_in, d_out, b):
    ref = _c3a_reference(d_in, d_out, b, seed=d_out).to(device)
    x = noncontig(randn(2, 19, d_in, seed=15, device=device))
    _assert_fused_equals_reference(ref, x, dtype, grad_scale=1.0 if dtype == F32 else 2.0)
    if dtype == F16:
        _assert_fused_equals_reference(ref, x, dtype, F32, grad_scale=2.0)


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("d_in,d_out,n", [(64, 32, 100), (40, 33, 37)])
def test_fourierft_triton_kernels_against_float64(triton_backend, device, dtype, d_in, d_out, n):
    ref = _fourierft_reference(d_in, d_out, n, seed=d_in).to(device)
    x = noncontig(randn(2, 19, d_in, seed=16, device=device))
    _assert_fused_equals_reference(ref, x, dtype, grad_scale=1.0 if dtype == F32 else 2.0)
    if dtype == F16:
        _assert_fused_equals_reference(ref, x, dtype, F32, grad_scale=2.0)


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("b", [16, 24])
def test_block_dft_and_contraction_kernels_in_the_input_dtype(triton_backend, device, dtype, b):
    """The block spectra stored in the input dtype (the bfloat16 path's tensor-core dots; float16 here
    exercises the same code in the interpreter) and the contraction of such spectra, against float64."""
    from fastadapt.triton_kernels import circulant as kernels
    x, dy = noncontig(randn(37, 48, seed=60, device=device)), randn(37, 96, seed=61, device=device)
    spectra = [kernels.block_dft_forward(t.to(dtype), b, dtype) for t in (dy, x)]
    for t, spectrum in zip((dy, x), spectra):
        expected = torch.fft.rfft(t.to(dtype).to(F64).unflatten(-1, (-1, b)))         # (N, blocks, f)
        assert_rel_close(spectrum[0], expected.real.permute(2, 1, 0), dtype, name="cos part")
        assert_rel_close(spectrum[1], -expected.imag.permute(2, 1, 0), dtype, name="sin part")
    parts = kernels.c3a_backward_spectrum(*spectra, split=2)
    d_hat, x_hat = (s.to(F64) for s in spectra)
    expected_re = torch.einsum("fmt,fnt->fmn", d_hat[0], x_hat[0]) + torch.einsum("fmt,fnt->fmn", d_hat[1], x_hat[1])
    expected_im = torch.einsum("fmt,fnt->fmn", d_hat[1], x_hat[0]) - torch.einsum("fmt,fnt->fmn", d_hat[0], x_hat[1])
    assert_rel_close(parts[0], expected_re, F32, name="Re S")
    assert_rel_close(parts[1], expected_im, F32, name="Im S")


def test_triton_launchers_reject_bad_operands(triton_backend):
    from fastadapt.triton_kernels import circulant as kernels
    w = randn(32, 64, dtype=F32, seed=17)
    with pytest.raises(TypeError, match="c3a_kernel"):
        kernels.c3a_weight_forward(w, randn(1, 2, 32, dtype=F16, seed=18))
    with pytest.raises(ValueError, match="c3a_kernel"):
        kernels.c3a_weight_forward(w, randn(1, 4, 16, dtype=F32, seed=19))
    with pytest.raises(ValueError, match="rows"):
        kernels.fourierft_weight_forward(w, randn(3, dtype=F32, seed=20), torch.zeros(2, dtype=torch.int64),
                                         torch.zeros(3, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="block_size"):
        kernels.block_dft_forward(w, 48, F32)


# ----------------------------------------------------------------------------- layers

def test_layers_init_like_peft_and_merge_exactly():
    """PEFT's default inits from the same generator state; the merged forward equals the unmerged one
    bit for bit (merge writes the weight the forward multiplies by); unmerge restores W."""
    from peft.tuners.c3a.layer import C3ALinear as PeftC3A
    from peft.tuners.fourierft.layer import FourierFTLinear as PeftFourierFT
    base = linear_model(32, 48, dtype=F32, seed=21)[0]
    torch.manual_seed(3)
    peft_c3a = PeftC3A(copy.deepcopy(base), "default", C3AConfig(block_size=16), 16)
    torch.manual_seed(3)
    c3a = layers.C3ALinear(copy.deepcopy(base), 16)
    assert torch.equal(c3a.c3a_kernel, peft_c3a.c3a_kernel["default"])
    assert c3a.c3a_kernel.abs().max() > 0   # PEFT's default (xavier_uniform) is not the identity
    torch.manual_seed(4)
    peft_fft = PeftFourierFT(copy.deepcopy(base), "default", FourierFTConfig(n_frequency=90, scaling=3.0), 90)
    torch.manual_seed(4)
    fft = layers.FourierFTLinear(copy.deepcopy(base), 90, scaling=3.0)
    assert torch.equal(fft.fourierft_spectrum, peft_fft.fourierft_spectrum["default"])
    assert torch.equal(fft.indices, peft_fft.indices["default"])
    x = randn(5, 32, dtype=F32, seed=22)
    for layer, peft_layer in ((c3a, peft_c3a), (fft, peft_fft)):
        with torch.no_grad():
            y, y_peft = layer(x), peft_layer(x)
            assert_rel_close(y, y_peft, name=f"{type(layer).__name__} vs PEFT")
            weight = layer.base_layer.weight.clone()
            layer.merge()
            assert torch.equal(layer(x), y)
            layer.unmerge()
            assert_rel_close(layer.base_layer.weight, weight, name="unmerged W")
            assert not layer.merged


@pytest.mark.parametrize("dtype", DTYPES)
def test_layers_every_dtype_follow_peft_dtype_policy(dtype):
    base = linear_model(24, 16, dtype=dtype, seed=23)[0]
    for layer in (layers.C3ALinear(copy.deepcopy(base), 8), layers.FourierFTLinear(copy.deepcopy(base), 30)):
        (param,) = [p for p in layer.parameters() if p.requires_grad]
        assert param.dtype == (F32 if dtype != F32 else dtype)
        x = randn(4, 24, dtype=dtype, seed=24, requires_grad=True)
        y = layer(x)
        y.float().sum().backward()
        assert y.dtype == dtype and x.grad.dtype == dtype and param.grad.dtype == param.dtype
    half = layers.C3ALinear(copy.deepcopy(base), 8, autocast_adapter_dtype=False)
    assert half.c3a_kernel.dtype == dtype


def test_layers_save_only_x():
    x = randn(1024, 64, dtype=F32, requires_grad=True, seed=25)
    from fastadapt.bench import saved_activation_ratio
    for layer in (layers.C3ALinear(linear_model(64, 64, dtype=F32, seed=26)[0], 16),
                  layers.FourierFTLinear(linear_model(64, 64, dtype=F32, seed=27)[0], 200)):
        ratio = saved_activation_ratio(layer, x)
        assert ratio == pytest.approx(1.0, abs=1e-9), f"{type(layer).__name__} saved {ratio:.3f} x bytes(x)"


def test_layers_compile_without_graph_breaks():
    x = randn(6, 32, dtype=F32, requires_grad=True, seed=28)
    for layer in (layers.C3ALinear(linear_model(32, 16, dtype=F32, seed=29)[0], 8),
                  layers.FourierFTLinear(linear_model(32, 16, dtype=F32, seed=30)[0], 40)):
        torch._dynamo.reset()
        assert torch._dynamo.explain(layer)(x).graph_break_count == 0
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True)
        y = compiled(x)
        (dx,) = torch.autograd.grad(y.sum(), [x])
        (dx_eager,) = torch.autograd.grad(layer(x).sum(), [x])
        assert_rel_close(dx, dx_eager, name="compiled dx")


@pytest.mark.parametrize("dtype", [torch.bfloat16, F16])
def test_layers_under_autocast_equal_peft_under_autocast(dtype):
    """The op keeps the adapter in float32 under autocast (PEFT does too) and casts x, W, bias."""
    base = linear_model(32, 16, dtype=F32, seed=31)[0]
    pairs = []
    for config, ours in ((C3AConfig(block_size=8, target_modules=["0"]), lambda b: layers.C3ALinear(b, 8)),
                         (FourierFTConfig(n_frequency=40, scaling=10.0, target_modules=["0"]),
                          lambda b: layers.FourierFTLinear(b, 40, scaling=10.0))):
        peft_layer = get_peft_model(torch.nn.Sequential(copy.deepcopy(base)), config).base_model.model[0]
        layer = ours(copy.deepcopy(base))
        with torch.no_grad():
            (param,) = [p for p in layer.parameters() if p.requires_grad]
            param.copy_(next(p for n, p in peft_layer.named_parameters() if p.requires_grad))
        pairs.append((peft_layer, layer))
    x = randn(3, 5, 32, dtype=F32, seed=32)
    for peft_layer, layer in pairs:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            expected, actual = peft_layer(x), layer(x)
        assert_rel_close(actual.float(), expected.float(), dtype, name=type(layer).__name__)


def test_bad_input_names_the_parameter():
    base = linear_model(24, 16, dtype=F32, seed=33)[0]
    with pytest.raises(ValueError, match="block_size"):
        layers.C3ALinear(copy.deepcopy(base), 5)
    with pytest.raises(ValueError, match="block_size"):
        layers.C3ALinear(copy.deepcopy(base), 3)            # divides in (24), not out (16)
    with pytest.raises(ValueError, match="init_weights"):
        layers.C3ALinear(copy.deepcopy(base), 8, init_weights="orthogonal")
    with pytest.raises(ValueError, match="n_frequency"):
        layers.FourierFTLinear(copy.deepcopy(base), 24 * 16 + 1)
    with pytest.raises(ValueError, match="n_frequency"):
        layers.FourierFTLinear(copy.deepcopy(base), 0)
    x, w = randn(3, 24, dtype=F32, seed=34), base.weight.detach()
    with pytest.raises(ValueError, match="c3a_kernel"):
        ops.c3a_linear(x, w, None, randn(2, 2, 8, dtype=F32, seed=35))
    with pytest.raises(ValueError, match="block_size"):
        ops.c3a_linear(x, w, None, randn(3, 4, 6, dtype=F32, seed=36))   # b = 6 does not divide out = 16
    with pytest.raises(TypeError, match="c3a_kernel"):
        ops.c3a_linear(x, w, None, randn(2, 3, 8, dtype=F16, seed=37))
    with pytest.raises(ValueError, match="n_frequency"):
        ops.fourierft_linear(x, w, None, randn(385, dtype=F32, seed=38), torch.zeros(2, 385, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="indices"):
        ops.fourierft_linear(x, w, None, randn(5, dtype=F32, seed=39), torch.zeros(2, 5, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="requires grad"):
        ops.c3a_linear(x, w.clone().requires_grad_(), None, randn(2, 3, 8, dtype=F32, seed=40))


# ----------------------------------------------------------------------------- PEFT bridge


def _peft_model(config, d_in, d_out, *, dtype=F32, seed, conv1d=False, bias="none", scale=0.05):
    if conv1d:
        from transformers.pytorch_utils import Conv1D
        base = Conv1D(d_out, d_in)
        with torch.no_grad():
            base.weight.copy_(randn(d_in, d_out, seed=seed) / d_in ** 0.5)
            base.bias.copy_(randn(d_out, seed=seed + 1))
        model = torch.nn.Sequential(base).to(dtype)
    else:
        model = linear_model(d_in, d_out, dtype=dtype, seed=seed)
    model = get_peft_model(model, config)
    randomize_(model, scale=scale, seed=seed + 2, names=["c3a_kernel", "fourierft_spectrum"])
    return model


def _accelerated_run(model, x, cotangent):
    fused = copy.deepcopy(model)
    report = fastadapt.accelerate(fused)
    result = output_and_grads(fused, x, cotangent)
    assert report.fused_calls == 1 and not report.fallbacks, str(report)
    return result, report


@pytest.mark.parametrize("d_in,d_out,block_size", [(64, 96, 32), (128, 64, 64), (256, 512, 256)])
def test_c3a_bridge_equals_peft(d_in, d_out, block_size):
    """Output, c3a_kernel and bias gradients equal PEFT's; x's equals the float64 truth (PEFT's is
    not: module docstring)."""
    model = _peft_model(C3AConfig(block_size=block_size, target_modules=["0"], bias="all"), d_in, d_out, seed=41)
    x = randn(3, 7, d_in, dtype=F32, seed=42)
    cotangent = randn(3, 7, d_out, dtype=F32, seed=43)
    expected = output_and_grads(model, x, cotangent)
    (y, dx, *grads), report = _accelerated_run(model, x, cotangent)
    assert report.notes == {layers.C3A_INPUT_GRADIENT_NOTE: 1}, str(report)
    assert_rel_close(y, expected[0], name="output")
    for name, actual, want in zip(("c3a_kernel", "bias"), grads, expected[2:]):
        assert_rel_close(actual, want, name=f"d{name}")
    layer = model.base_model.model[0]
    ref = C3A.from_peft(layer)
    x64 = x.to(F64).requires_grad_()
    (dx_truth,) = torch.autograd.grad(ref(x64), [x64], cotangent.to(F64))
    assert_rel_close(dx, dx_truth, F32, name="dx vs float64 truth")


def test_peft_c3a_input_gradient_reverses_dy_blocks():
    """Pins PEFT 0.21's C3A input gradient: the true one for dY reversed within each block
    (dY[m b + (-k mod b)]), so the bridge's exact dx differs from PEFT's; if PEFT fixes it, this
    fails and the note goes."""
    b = 8
    model = _peft_model(C3AConfig(block_size=b, target_modules=["0"]), 16, 24, dtype=F64, seed=44, scale=0.5)
    x = randn(5, 16, seed=45)
    cotangent = randn(5, 24, seed=46)
    ref = C3A.from_peft(model.base_model.model[0])
    _, dx_peft, _ = output_and_grads(model, x, cotangent)
    adapter_dx_peft = dx_peft - cotangent @ ref.weight            # PEFT's dx minus the base layer's
    reversed_cotangent = cotangent.unflatten(-1, (-1, b))[..., (-torch.arange(b)) % b].flatten(-2)
    truths = []
    for dy in (cotangent, reversed_cotangent):
        x64 = x.clone().requires_grad_()
        truths += torch.autograd.grad(ref(x64) - ref.base(x64), [x64], dy)
    assert_rel_close(adapter_dx_peft, truths[1], F32, name="PEFT's adapter dx vs the true one of block-reversed dY")
    assert rel_error(adapter_dx_peft, truths[0]) > 0.1


@pytest.mark.parametrize("conv1d", [False, True])
def test_fourierft_bridge_equals_peft(conv1d):
    config = FourierFTConfig(n_frequency=150, scaling=50.0, target_modules=["0"], bias="all", fan_in_fan_out=conv1d)
    model = _peft_model(config, 40, 24, seed=47, conv1d=conv1d)
    x = noncontig(randn(2, 9, 40, dtype=F32, seed=48))
    cotangent = randn(2, 9, 24, dtype=F32, seed=49)
    expected = output_and_grads(model, x, cotangent)
    actual, _ = _accelerated_run(model, x, cotangent)
    for name, a, e in zip(("output", "dx", "dspectrum", "dbias"), actual, expected):
        assert_rel_close(a, e, name=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, F16])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
@pytest.mark.parametrize("method", ["c3a", "fourierft"])
def test_half_models_as_accurate_as_peft(dtype, autocast_adapter_dtype, method):
    """bf16 / fp16 models, PEFT's float32 adapters or adapters in the base dtype: output and every
    gradient within the table of the float64 truth or at most 1.5 x PEFT's own error (PEFT runs
    both methods' adapter path in float32).  x's truth for C3A: the reference's autograd."""
    if method == "c3a":
        config = C3AConfig(block_size=16, target_modules=["0"], bias="all")
    else:
        config = FourierFTConfig(n_frequency=120, scaling=100.0, target_modules=["0"], bias="all")
    base = linear_model(48, 32, dtype=F64, seed=50)
    peft64 = get_peft_model(base, config)
    randomize_(peft64, scale=0.05, seed=51, names=["c3a_kernel", "fourierft_spectrum"])
    model = copy.deepcopy(peft64).to(dtype)
    if autocast_adapter_dtype:
        for name, p in model.named_parameters():
            if method in name:
                p.data = p.data.float()
    x = randn(4, 9, 48, dtype=dtype, seed=52)
    cotangent = randn(4, 9, 32, dtype=dtype, seed=53)
    peft = output_and_grads(model, x, cotangent)
    fused, _ = _accelerated_run(model, x, cotangent)
    truth = list(output_and_grads(peft64, x.to(F64), cotangent.to(F64)))
    ref = (C3A if method == "c3a" else FourierFT).from_peft(peft64.base_model.model[0])
    x64 = x.to(F64).requires_grad_()
    (truth[1],) = torch.autograd.grad(ref(x64), [x64], cotangent.to(F64))
    for name, f, p, t in zip(("output", "dx", "dadapter", "dbias"), fused, peft, truth):
        err, peft_err = rel_error(f, t), rel_error(p, t)
        assert err <= max(tolerance(dtype), 1.5 * peft_err), f"{name}: {err:.3e} vs PEFT's {peft_err:.3e}"


def test_bridge_falls_back_where_peft_semantics_differ():
    """Two active C3A adapters (PEFT feeds one into the next: square layers only), a trainable base
    weight, an adapter dtype PEFT's policy does not produce: PEFT's forward, with the reason."""
    model = _peft_model(C3AConfig(block_size=8, target_modules=["0"]), 16, 16, seed=54)
    model.add_adapter("other", C3AConfig(block_size=8, target_modules=["0"]))
    layer = model.base_model.model[0]
    layer.set_adapter(["default", "other"])
    x = randn(3, 16, dtype=F32, seed=55)
    expected = model(x)
    report = fastadapt.accelerate(model)
    assert_rel_close(model(x), expected, name="two adapters")
    assert report.fused_calls == 0 and "2 active adapters" in str(report)
    layer.set_adapter("default")
    layer.get_base_layer().weight.requires_grad_(True)
    model(x)
    assert any("trainable" in reason for reason in report.fallbacks)
    layer.get_base_layer().weight.requires_grad_(False)
    layer.c3a_kernel["default"].data = layer.c3a_kernel["default"].data.half()
    model(x)
    assert any("adapter dtype" in reason for reason in report.fallbacks), str(report)
    fastadapt.revert(model)


def test_accelerated_model_compiles_without_graph_breaks():
    for config in (C3AConfig(block_size=8, target_modules=["0"]),
                   FourierFTConfig(n_frequency=30, target_modules=["0"])):
        model = _peft_model(config, 16, 24, seed=56)
        fastadapt.accelerate(model)
        x = randn(3, 16, dtype=F32, seed=57, requires_grad=True)
        torch._dynamo.reset()
        assert torch._dynamo.explain(model)(x).graph_break_count == 0
        torch._dynamo.reset()
        y = torch.compile(model, fullgraph=True)(x)
        assert_rel_close(y, model(x), name="compiled")
        fastadapt.revert(model)
