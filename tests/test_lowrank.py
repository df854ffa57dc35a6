"""lowrank family, LoRA: the fused op (torch path every dtype, Triton in the interpreter), dropout
masks, several active adapters, the PEFT bridge.

Every comparison is a relative Frobenius error against a float64 truth (the reference of
fastadapt.reference.lowrank, or the same formula with the same dropout mask) or PEFT's own layer,
within fastadapt.numerics' one tolerance table.
"""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import fastadapt
from fastadapt.bench import saved_activation_ratio
from fastadapt.layers import lowrank as layers
from fastadapt.numerics import assert_rel_close
from fastadapt.ops import lowrank as ops
from fastadapt.ops.dropout import philox_uniform
from fastadapt.reference.lowrank import LoRA
from fastadapt.testing import (
    DTYPES, assert_fused_as_accurate_as_peft, linear_model, noncontig, output_and_grads, randn, randomize_,
    triton_launches)

F16, F32, F64 = torch.float16, torch.float32, torch.float64
INTERPRETER_BF16 = "the Triton interpreter has no bfloat16 arithmetic (compiled GPUs run it)"


def _adapters(d_in, d_out, ranks, *, seed):
    """Random float64 factors of several adapters (B nonzero: away from PEFT's init)."""
    a = [randn(r, d_in, seed=seed + 2 * i, scale=d_in ** -0.5) for i, r in enumerate(ranks)]
    b = [randn(d_out, r, seed=seed + 2 * i + 1, scale=0.3) for i, r in enumerate(ranks)]
    return a, b


def _philox_masks(rows, d, ps, draw_seed):
    """The float64 masks the op draws for dropout probabilities ``ps`` (one seed per p > 0, from
    the default generator in order, as fastadapt.ops.lowrank draws them)."""
    masks = []
    for p in ps:
        if p == 0:
            masks.append(None)
            continue
        seed = int(draw_seed())
        keep = philox_uniform(rows, d, seed) >= torch.tensor(p, dtype=F32)
        masks.append(keep.to(F64) / (1 - p))
    return masks


def _truth(x, weight, bias, a_list, b_list, scalings, masks):
    """y = x W^T + b + sum_i s_i (mask_i o x) A_i^T B_i^T in float64."""
    x2d = x.reshape(-1, x.shape[-1])
    y = x2d @ weight.T + (0 if bias is None else bias)
    for a, b, s, mask in zip(a_list, b_list, scalings, masks):
        y = y + s * ((x2d if mask is None else x2d * mask) @ a.T) @ b.T
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _compare(x64, weight64, bias64, a64, b64, scalings, ps, dtype, adapter_dtype, *, grad_scale=1.0,
             stream="philox"):
    """Fused output and every gradient (x, bias, each A and B) in ``dtype`` vs the float64 truth
    with the same masks."""
    from fastadapt.ops.dropout import draw_seed
    cotangent = randn(*x64.shape[:-1], weight64.shape[0], seed=99)
    leaves64 = [x64.detach().clone().requires_grad_(), None if bias64 is None else bias64.clone().requires_grad_(),
                *[t.clone().requires_grad_() for t in (*a64, *b64)]]
    leaves = [t if t is None else t.detach().to(dtype if i < 2 else adapter_dtype).requires_grad_()
              for i, t in enumerate(leaves64)]
    if leaves64[0] is not None and not x64.is_contiguous():
        leaves[0] = noncontig(x64.detach().to(dtype)).requires_grad_()
    n = len(a64)
    torch.manual_seed(5)
    y = ops.lora_linear(leaves[0], weight64.to(dtype), leaves[1], leaves[2:2 + n], leaves[2 + n:], scalings,
                        dropout_p=ps, dropout_stream=stream)
    torch.manual_seed(5)
    masks = _philox_masks(x64.reshape(-1, x64.shape[-1]).shape[0], x64.shape[-1], ps, draw_seed)
    y64 = _truth(leaves64[0], weight64, leaves64[1], leaves64[2:2 + n], leaves64[2 + n:], scalings, masks)
    live = [i for i, t in enumerate(leaves) if t is not None]
    grads = torch.autograd.grad(y, [leaves[i] for i in live], cotangent.to(dtype))
    grads64 = torch.autograd.grad(y64, [leaves64[i] for i in live], cotangent)
    assert_rel_close(y, y64, dtype, name="y")
    for i, g, g64 in zip(live, grads, grads64):
        assert g.dtype == leaves[i].dtype
        assert_rel_close(g, g64, dtype, scale=grad_scale, name=f"grad of input {i}")


# ----------------------------------------------------------------------------- torch path, every dtype

LORA_SHAPES = [(24, 16, [8]), (17, 9, [1]), (16, 40, [64]), (33, 20, [3, 5])]   # r = 64: above both sizes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d_in,d_out,ranks", LORA_SHAPES)
def test_lora_torch_path_every_dtype_against_float64(dtype, d_in, d_out, ranks):
    weight, bias = linear_model(d_in, d_out, seed=d_in)[0].weight.detach(), randn(d_out, seed=1)
    a, b = _adapters(d_in, d_out, ranks, seed=2)
    x = noncontig(randn(9, 41, d_in, seed=3))
    scalings = [0.5 + i for i in range(len(ranks))]
    # half: x, W, the factors and y rounded; the parameter gradients sum 369 tokens' products
    scale = 1.0 if dtype == F32 else 2.0
    _compare(x, weight, bias, a, b, scalings, [0.0] * len(ranks), dtype, dtype, grad_scale=scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, F16])
def test_lora_float32_adapter_on_half_base(dtype):
    weight = linear_model(24, 16, seed=4)[0].weight.detach()
    a, b = _adapters(24, 16, [4], seed=5)
    _compare(randn(3, 17, 24, seed=6), weight, randn(16, seed=7), a, b, [2.0], [0.0], dtype, F32, grad_scale=2.0)
    _compare(randn(3, 17, 24, seed=6), weight, None, a, b, [2.0], [0.3], dtype, F32, grad_scale=2.0)


@pytest.mark.parametrize("ps", [[0.1], [0.5, 0.0], [0.25, 0.4], [0.0, 0.3, 0.0]])
def test_lora_dropout_philox_masks_against_float64(ps):
    """The mask regenerated from each adapter's seed: forward and backward against the float64
    formula with the same masks (dx, dA use the mask; no x_d is saved)."""
    ranks = [3, 2, 4][:len(ps)]
    weight = linear_model(20, 12, seed=8)[0].weight.detach()
    a, b = _adapters(20, 12, ranks, seed=9)
    _compare(randn(5, 7, 20, seed=10), weight, randn(12, seed=11), a, b, [1.5, 0.5, 2.0][:len(ps)], ps, F32, F32)
    _compare(randn(5, 7, 20, seed=10), weight, None, a, b, [1.5, 0.5, 2.0][:len(ps)], ps, F64, F64)


def test_lora_dropout_torch_stream_is_nn_dropout():
    """dropout_stream="torch": PEFT's nn.Dropout masks, bit for bit on CPU, adapter by adapter."""
    x = randn(6, 10, seed=12, requires_grad=True)
    weight = randn(8, 10, seed=13)
    a, b = _adapters(10, 8, [2, 3], seed=14)
    torch.manual_seed(15)
    y = ops.lora_linear(x, weight, None, a, b, [1.0, 2.0], dropout_p=[0.5, 0.3], dropout_stream="torch")
    torch.manual_seed(15)
    x_1, x_2 = torch.nn.functional.dropout(x, 0.5), torch.nn.functional.dropout(x, 0.3)
    expected = x @ weight.T + (x_1 @ a[0].T) @ b[0].T + 2.0 * (x_2 @ a[1].T) @ b[1].T
    assert_rel_close(y, expected, name="y")
    g = randn(6, 8, seed=16)
    assert_rel_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(expected, x, g)[0], name="dx")


def test_lora_strided_weight_and_empty_batch():
    weight = randn(12, 20, seed=17)
    a, b = _adapters(20, 12, [4], seed=18)
    x = randn(2, 3, 20, seed=19)
    expected = _truth(x, weight, None, a, b, [1.0], [None])
    column_major = weight.T.contiguous().T
    assert_rel_close(ops.lora_linear(x, column_major, None, a[0], b[0], 1.0), expected, name="y, strided W")
    empty = ops.lora_linear(randn(0, 20, seed=20), weight, None, a[0], b[0], 1.0)
    assert empty.shape == (0, 12)
    assert ops.lora_linear(x[0, 0], weight, None, a[0], b[0], 1.0).shape == (12,)


def test_lora_gradcheck_float64():
    x = randn(2, 3, 9, requires_grad=True, seed=21)
    weight = randn(7, 9, seed=22)
    bias = randn(7, requires_grad=True, seed=23)
    a, b = _adapters(9, 7, [2, 3], seed=24)
    a = [t.requires_grad_() for t in a]
    b = [t.requires_grad_() for t in b]

    def fn(stream, ps):
        def call(x, bias, a0, a1, b0, b1):
            torch.manual_seed(0)   # the same masks at every evaluation
            return ops.lora_linear(x, weight, bias, [a0, a1], [b0, b1], [0.7, 1.3], dropout_p=ps,
                                   dropout_stream=stream)
        return call
    for stream, ps in (("philox", [0.0, 0.0]), ("philox", [0.3, 0.0]), ("torch", [0.2, 0.4])):
        assert torch.autograd.gradcheck(fn(stream, ps), (x, bias, *a, *b), fast_mode=True)


# ----------------------------------------------------------------------------- Triton kernels (interpreter on CPU)

TRITON_DTYPES = [F32, F16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason=INTERPRETER_BF16))]


@pytest.fixture
def triton_backend(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("ranks,ps", [([16], [0.0]), ([16], [0.2]), ([8, 16], [0.0, 0.3])])
def test_lora_triton_kernels_against_float64(triton_backend, device, dtype, ranks, ps):
    weight = linear_model(32, 48, seed=25)[0].weight.detach().to(device)
    a, b = _adapters(32, 48, ranks, seed=26)
    a, b = [t.to(device) for t in a], [t.to(device) for t in b]
    x = noncontig(randn(2, 19, 32, seed=27, device=device))
    with triton_launches() as launched:
        _compare(x, weight, randn(48, seed=28, device=device), a, b, [2.0, 0.5][:len(ranks)], ps, dtype, dtype,
                 grad_scale=1.0 if dtype == F32 else 2.0)
    assert "_scaled_lowrank_gemm_kernel" in launched and "_float32_matmul_kernel" in launched
    if ps == [0.2]:   # one masked adapter: dx from the GEMM with the masked low-rank epilogue
        assert "_masked_lowrank_gemm_kernel" in launched
    if dtype == F16:  # PEFT's float32 adapter on a half base
        _compare(x, weight, None, a, b, [2.0, 0.5][:len(ranks)], ps, dtype, F32, grad_scale=2.0)


def test_masked_lowrank_gemm_rejects_bad_operands(triton_backend):
    from fastadapt.triton_kernels import lowrank as kernels
    dy, w = randn(20, 32, dtype=F32, seed=29), randn(32, 48, dtype=F32, seed=30)
    t, a = randn(20, 4, dtype=F32, seed=31), randn(4, 48, dtype=F32, seed=32)
    with pytest.raises(TypeError, match="u"):
        kernels.masked_lowrank_gemm(dy, w, t.half(), a, 1, 0.1)
    with pytest.raises(ValueError, match="chain"):
        kernels.masked_lowrank_gemm(dy, w, t, a[:, :40], 1, 0.1)
    with pytest.raises(ValueError, match="p=1.5"):
        kernels.masked_lowrank_gemm(dy, w, t, a, 1, 1.5)


# ----------------------------------------------------------------------------- PEFT bridge


def _peft_model(config, d_in, d_out, *, dtype=F32, seed, conv1d=False, scale=0.3):
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
    randomize_(model, scale=scale, seed=seed + 2, names=["lora_"])
    return model


def _assert_bridge_equals_peft(model, x, *, train=False, fused_calls=1):
    cotangent = randn(*x.shape[:-1], model(x).shape[-1], dtype=x.dtype, seed=34)
    fused = copy.deepcopy(model)
    report = fastadapt.accelerate(fused, dropout="torch")
    model.train(train), fused.train(train)
    expected, actual = output_and_grads(model, x, cotangent), output_and_grads(fused, x, cotangent)
    assert report.fused_calls == fused_calls and not report.fallbacks, str(report)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_rel_close(a, e, name="output" if i == 0 else f"gradient {i}")
    return fused, report


@pytest.mark.parametrize("r", [1, 8, 64])
@pytest.mark.parametrize("options", [{}, {"use_rslora": True, "bias": "all"}, {"lora_dropout": 0.2},
                                     {"lora_bias": True, "lora_alpha": 3}])
def test_lora_bridge_equals_peft(r, options):
    """Output, x's and every trainable parameter's gradient equal PEFT's (r = 64 is above both of the
    layer's sizes; training with dropout: nn.Dropout's own masks through dropout="torch")."""
    model = _peft_model(LoraConfig(r=r, target_modules=["0"], **options), 40, 24, seed=35)
    _assert_bridge_equals_peft(model, noncontig(randn(3, 7, 40, dtype=F32, seed=36)),
                               train="lora_dropout" in options)


def test_lora_bridge_conv1d_base_and_scale_read_at_call_time():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], fan_in_fan_out=True, lora_dropout=0.1)
    model = _peft_model(config, 20, 12, seed=37, conv1d=True)
    fused, report = _assert_bridge_equals_peft(model, randn(2, 5, 20, dtype=F32, seed=38), train=True)
    x = randn(4, 20, dtype=F32, seed=39)
    for layer in (model.base_model.model[0], fused.base_model.model[0]):
        layer.set_scale("default", 3.5)
    model.eval(), fused.eval()
    assert_rel_close(fused(x), model(x), name="after set_scale")
    assert report.fused_calls == 2


def test_lora_philox_dropout_in_training_is_noted_and_saves_only_x():
    """The default Philox stream: the report notes the mask's stream; saved activations stay at
    bytes(x) plus u (r / in), with and without dropout (PEFT keeps a second copy of x)."""
    model = _peft_model(LoraConfig(r=16, target_modules=["0"], lora_dropout=0.1), 256, 256, seed=40)
    report = fastadapt.accelerate(model)
    model.train()
    x = randn(512, 256, dtype=F32, seed=41, requires_grad=True)
    ratio = saved_activation_ratio(model, x)   # x, u and the 8-byte seed
    assert ratio <= 1.0 + 16 / 256 + 1e-4, f"saved {ratio:.3f} x bytes(x)"
    assert report.notes == {layers.PHILOX_DROPOUT_NOTE: report.fused_calls} and report.fused_calls > 0
    model.eval()
    assert saved_activation_ratio(model, x) <= 1.0 + 16 / 256 + 1e-9


@pytest.mark.parametrize("dtype", [torch.bfloat16, F16])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_half_models_as_accurate_as_peft(dtype, autocast_adapter_dtype):
    """bf16 / fp16 models with PEFT's float32 adapters or adapters in the base dtype: output and
    every gradient within the table of the float64 truth, or at most 1.5 x PEFT's own error."""
    peft64 = _peft_model(LoraConfig(r=8, target_modules=["0"], bias="all"), 48, 32, dtype=F64, seed=42, scale=0.2)
    model = copy.deepcopy(peft64).to(dtype)
    if autocast_adapter_dtype:
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
    x = randn(4, 9, 48, dtype=dtype, seed=43)
    cotangent = randn(4, 9, 32, dtype=dtype, seed=44)
    assert_fused_as_accurate_as_peft(model, peft64, x, cotangent, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, F16])
def test_bridge_under_autocast_equals_peft_under_autocast(dtype):
    """Under torch.autocast the op takes x, W, b and the factors in the autocast dtype, as PEFT's
    nn.Linear modules do there."""
    model = _peft_model(LoraConfig(r=8, target_modules=["0"]), 32, 16, seed=45)
    fused = copy.deepcopy(model)
    report = fastadapt.accelerate(fused)
    x = randn(3, 5, 32, dtype=F32, seed=46)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        expected, actual = model(x), fused(x)
    assert actual.dtype == expected.dtype
    assert_rel_close(actual.float(), expected.float(), dtype, name="autocast output")
    assert report.fused_calls == 1, str(report)


def test_bridge_falls_back_with_a_reason():
    """DoRA is another entry's; a trainable base weight, lora_bias with a float32 adapter on a half
    base and a dropout module PEFT never builds run PEFT's forward with the reason."""
    model = _peft_model(LoraConfig(r=4, target_modules=["0"]), 16, 12, seed=47)
    layer = model.base_model.model[0]
    x = randn(3, 16, dtype=F32, seed=48)
    report = fastadapt.accelerate(model, methods=["lora"])
    layer.get_base_layer().weight.requires_grad_(True)
    model(x)
    layer.get_base_layer().weight.requires_grad_(False)
    layer.lora_dropout["default"] = torch.nn.AlphaDropout(0.1)
    model.eval()   # in eval the module is the identity: fused
    assert_rel_close(model(x), type(layer).forward(layer, x), name="eval with AlphaDropout")
    assert "trainable" in " | ".join(report.fallbacks) and report.fused_calls == 1, str(report)
    model.train()
    model(x)
    assert "AlphaDropout" in " | ".join(report.fallbacks), str(report)
    dora = _peft_model(LoraConfig(r=4, target_modules=["0"], use_dora=True), 16, 12, seed=49)
    report = fastadapt.accelerate(dora, methods=["lora"])
    dora(x)
    assert report.fallbacks == {"adapter configuration has no fused path": 1}, str(report)
    half = _peft_model(LoraConfig(r=4, target_modules=["0"], lora_bias=True), 16, 12, seed=50).to(torch.bfloat16)
    for name, p in half.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    report = fastadapt.accelerate(half)
    half(x.to(torch.bfloat16))
    assert "lora_bias" in " | ".join(report.fallbacks), str(report)


def test_accelerated_model_compiles_without_graph_breaks():
    model = _peft_model(LoraConfig(r=4, target_modules=["0"], lora_dropout=0.1), 16, 24, seed=51)
    fastadapt.accelerate(model)
    x = randn(3, 16, dtype=F32, seed=52, requires_grad=True)
    for train in (False, True):
        model.train(train)
        torch._dynamo.reset()
        assert torch._dynamo.explain(model)(x).graph_break_count == 0
    torch._dynamo.reset()
    model.eval()
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    assert_rel_close(y, model(x), name="compiled")
    (dx,) = torch.autograd.grad(y.sum(), [x])
    (dx_eager,) = torch.autograd.grad(model(x).sum(), [x])
    assert_rel_close(dx, dx_eager, name="compiled dx")
    fastadapt.revert(model)


def test_reference_from_peft_matches_the_bridge():
    """fastadapt.reference.lowrank.LoRA (float64) of a PEFT layer equals the accelerated layer."""
    model = _peft_model(LoraConfig(r=5, lora_alpha=7, target_modules=["0"], bias="all"), 18, 11, seed=53)
    ref = LoRA.from_peft(model.base_model.model[0])
    fastadapt.accelerate(model)
    x = randn(4, 18, dtype=F32, seed=54)
    assert_rel_close(model(x), ref(x.to(F64)), F32, name="output vs reference")


def test_bad_input_names_the_parameter():
    x, w = randn(3, 12, dtype=F32, seed=55), randn(8, 12, dtype=F32, seed=56)
    a, b = randn(4, 12, dtype=F32, seed=57), randn(8, 4, dtype=F32, seed=58)
    with pytest.raises(ValueError, match="r=0"):
        ops.lora_linear(x, w, None, a[:0], b[:, :0], 1.0)
    with pytest.raises(ValueError, match="lora_A"):
        ops.lora_linear(x, w, None, a[:, :10], b, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        ops.lora_linear(x, w, None, a, b[:5], 1.0)
    with pytest.raises(TypeError, match="lora_B"):
        ops.lora_linear(x, w, None, a, b.double(), 1.0)
    with pytest.raises(TypeError, match="lora_A"):
        ops.lora_linear(x.double(), w.double(), None, a, b, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.lora_linear(x, w, None, a, b, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="dropout_stream"):
        ops.lora_linear(x, w, None, a, b, 1.0, dropout_p=0.1, dropout_stream="numpy")
    with pytest.raises(ValueError, match="one per adapter"):
        ops.lora_linear(x, w, None, [a, a], [b], 1.0)
    with pytest.raises(ValueError, match="requires grad"):
        ops.lora_linear(x, w.clone().requires_grad_(), None, a, b, 1.0)
    with pytest.raises(ValueError, match="x"):
        ops.lora_linear(x[:, :10], w, None, a, b, 1.0)


# ----------------------------------------------------------------------------- several adapters, mixed batches

def _two_adapter_model(*, dtype=F32, dropout=0.0, seed, adapters=("default", "other", "third")):
    model = _peft_model(LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=dropout), 24, 16,
                        dtype=dtype, seed=seed)
    for i, name in enumerate(adapters[1:]):
        model.add_adapter(name, LoraConfig(r=3 + 2 * i, lora_alpha=5, target_modules=["0"], lora_dropout=dropout,
                                           use_rslora=i == 1))
    randomize_(model, scale=0.3, seed=seed + 5, names=["lora_"])
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_several_active_adapters_equal_peft(dropout):
    """Three active adapters (ranks 4, 3, 5, rsLoRA on one) as one branch: output and every gradient
    equal PEFT's loop over them; in training nn.Dropout's masks adapter by adapter (dropout="torch")."""
    model = _two_adapter_model(dropout=dropout, seed=60)
    layer = model.base_model.model[0]
    layer.set_adapter(["default", "other", "third"])
    fused = copy.deepcopy(layer)
    fastadapt.accelerate(fused, dropout="torch")
    x = randn(3, 5, 24, dtype=F32, seed=61)
    cotangent = randn(3, 5, 16, dtype=F32, seed=62)
    for train in (False, True):
        layer.train(train), fused.train(train)
        expected = output_and_grads(layer, x, cotangent)
        x_leaf = x.clone().requires_grad_()
        torch.manual_seed(0)
        y = layers.lora_forward_many(fused, ["default", "other", "third"], x_leaf)
        actual = (y.detach(), *torch.autograd.grad(y, [x_leaf, *[p for p in fused.parameters() if p.requires_grad]],
                                                   cotangent))
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_rel_close(a, e, name=f"train={train}: {'output' if i == 0 else f'gradient {i}'}")


@pytest.mark.parametrize("dtype,autocast_adapter_dtype", [(F32, False), (torch.bfloat16, True), (F16, False)])
def test_mixed_batch_equals_peft(dtype, autocast_adapter_dtype):
    """adapter_names per sample (three adapters, "__base__", an adapter the layer does not hold):
    output and every gradient equal PEFT's _mixed_batch_forward (the low-rank term rounded to the
    output dtype before it is added, as PEFT does)."""
    model = _two_adapter_model(seed=63)
    if dtype != F32:
        model = model.to(dtype)
        if autocast_adapter_dtype:
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.data = p.data.float()
    layer = model.base_model.model[0].eval()
    names = ["other", "__base__", "default", "third", "other", "nowhere", "default"]
    x = randn(7, 3, 24, dtype=dtype, seed=64)
    cotangent = randn(7, 3, 16, dtype=dtype, seed=65)
    x_leaf = x.clone().requires_grad_()
    y = layer(x_leaf, adapter_names=names)
    params = [p for p in layer.parameters() if p.requires_grad]
    expected = (y.detach(), *torch.autograd.grad(y, [x_leaf, *params], cotangent))
    x_leaf = x.clone().requires_grad_()
    y = layers.lora_forward_mixed(layer, ["other", "default", "third"], x_leaf, names)
    actual = (y.detach(), *torch.autograd.grad(y, [x_leaf, *params], cotangent))
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_rel_close(a, e, dtype, scale=2.0 if dtype != F32 else 1.0,
                         name="output" if i == 0 else f"gradient {i}")


def test_bridge_serves_several_adapters_and_mixed_batches():
    """Through accelerate: several active adapters and adapter_names run fused (counted), equal to
    PEFT; a mixed batch with dropout in training runs PEFT's forward with the reason."""
    model = _two_adapter_model(seed=66, dropout=0.2)
    fused = copy.deepcopy(model)
    report = fastadapt.accelerate(fused)
    model.eval(), fused.eval()
    x = randn(4, 3, 24, dtype=F32, seed=67)
    names = ["third", "default", "__base__", "third"]
    assert_rel_close(fused(x, adapter_names=names), model(x, adapter_names=names), name="mixed batch")
    for m in (model, fused):
        m.base_model.set_adapter(["default", "third"])
    assert_rel_close(fused(x), model(x), name="two active adapters")
    assert report.fused_calls == 2 and not report.fallbacks, str(report)
    layer = fused.base_model.model[0].train()
    layer(x, adapter_names=names)
    assert report.fallbacks == {"adapter_names with dropout in training": 1}, str(report)


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_mixed_batch_triton_kernels_against_float64(triton_backend, device, dtype):
    """The row-grouped kernels (u per group, the GEMM with each tile's own low-rank term) for 3
    adapters of ranks 16, 8, 20 over 6 samples of 7 rows (tiles straddle no group; rows of no adapter)."""
    ranks, index = [16, 8, 20], [2, 0, -1, 0, 1, 2]
    weight = linear_model(32, 48, seed=68)[0].weight.detach().to(device)
    a, b = _adapters(32, 48, ranks, seed=69)
    x64 = randn(6, 7, 32, seed=70, device=device)
    cotangent = randn(6, 7, 48, seed=71, device=device)

    def run(leaf_dtype, adapter_dtype):
        x = x64.to(leaf_dtype).requires_grad_()
        factors = [t.to(device=device, dtype=adapter_dtype).requires_grad_() for t in (*a, *b)]
        y = ops.lora_mixed_linear(x, weight.to(leaf_dtype), None, factors[:3], factors[3:], [0.5, 1.0, 2.0], index)
        return [y, *torch.autograd.grad(y, [x, *factors], cotangent.to(leaf_dtype))]

    with triton_launches() as launched:
        actual = run(dtype, dtype)
    assert {"_segment_lowrank_kernel", "_segment_gemm_kernel"} <= set(launched)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTADAPT_BACKEND", "torch")
        expected = run(F64, F64)
    for i, (got, want) in enumerate(zip(actual, expected)):
        assert_rel_close(got, want, dtype, scale=1.0 if dtype == F32 else 2.0, name=f"output {i}")


def test_mixed_batch_gradcheck_and_bad_input():
    x = randn(4, 2, 6, requires_grad=True, seed=72)
    weight = randn(5, 6, seed=73)
    a, b = _adapters(6, 5, [2, 3], seed=74)
    a, b = [t.requires_grad_() for t in a], [t.requires_grad_() for t in b]
    assert torch.autograd.gradcheck(lambda x, a0, a1, b0, b1: ops.lora_mixed_linear(
        x, weight, None, [a0, a1], [b0, b1], [0.5, 2.0], [1, -1, 0, 1]), (x, *a, *b), fast_mode=True)
    with pytest.raises(ValueError, match="adapter_index"):
        ops.lora_mixed_linear(x, weight, None, a, b, [1.0, 1.0], [0, 2, 0, 0])
    with pytest.raises(ValueError, match="adapter_index"):
        ops.lora_mixed_linear(x, weight, None, a, b, [1.0, 1.0], [0, 1])
    model = _two_adapter_model(seed=75)
    layer = model.base_model.model[0].eval()
    with pytest.raises(ValueError, match="adapter_names"):   # PEFT's own check: one name per sample
        layers.lora_forward_mixed(layer, ["default"], randn(3, 24, dtype=F32, seed=76), ["default"] * 2)
    fastadapt.accelerate(model)
    model.eval()
    with pytest.raises(ValueError, match="non-existing"):   # PEFT's model-level check, unchanged by accelerate
        model(randn(2, 24, dtype=F32, seed=77), adapter_names=["default", "typo"])


# ----------------------------------------------------------------------------- PiSSA / OLoRA init

@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_olora_init_equals_reference_and_keeps_the_model(init, use_rslora):
    """PEFT's PiSSA / OLoRA init (the factors and the base weight rewritten to the residual) equals
    fastadapt.reference.lowrank's pissa_init / olora_init of the original weight (the randomized
    svd_lowrank of "pissa_niter_*" draws after PEFT's own initialisers: there W_res + s B A = W is
    checked), and the accelerated model at init computes the original layer and its gradients."""
    from fastadapt.reference.lowrank import lora_scaling, olora_init, pissa_init
    base = linear_model(24, 16, dtype=F32, seed=80)
    original = copy.deepcopy(base)
    r, alpha = 4, 6
    torch.manual_seed(81)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=init, use_rslora=use_rslora,
                                            target_modules=["0"]))
    layer = model.base_model.model[0]
    scaling = lora_scaling(alpha, r, use_rslora)
    weight = original[0].weight.detach()
    product = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    if "niter" in init:
        assert_rel_close(layer.get_base_layer().weight + scaling * product, weight, F32, scale=10, name="W_res + s B A")
    else:
        lora_A, lora_B, residual = (olora_init(weight, r, scaling=scaling) if init == "olora"
                                    else pissa_init(weight, r, scaling=scaling))
        # singular vectors are defined up to a sign per pair: compare the product and the residual
        assert_rel_close(product, lora_B @ lora_A, F32, scale=10, name="B A")
        assert_rel_close(layer.get_base_layer().weight, residual, F32, scale=10, name="residual base weight")
    report = fastadapt.accelerate(model)
    x = randn(5, 24, dtype=F32, seed=82)
    cotangent = randn(5, 16, dtype=F32, seed=83)
    for i, (a, e) in enumerate(zip(output_and_grads(model, x, cotangent)[:2], output_and_grads(original, x, cotangent)[:2])):
        assert_rel_close(a, e, F32, scale=10, name="output" if i == 0 else "grad x")
    assert report.fused_calls == 1, str(report)


# ----------------------------------------------------------------------------- VeRA's saved set

BF16 = torch.bfloat16
# (plan, N, in, out, r, dtype, dropout p, what autograd saves besides parameters)
VERA_PLANS = [("merged", 64, 16, 16, 8, F32, 0.0, "u, W_eff"),
              ("merged", 40, 16, 16, 16, F32, 0.0, "u"),            # u + W_eff above bytes(x): W_eff rebuilt
              ("merged", 200, 8, 16, 12, F32, 0.0, "x"),            # r > in: u above bytes(x), recomputed
              ("unmerged", 24, 16, 12, 4, F32, 0.25, "u, seed"),
              ("unmerged", 24, 16, 12, 20, BF16, 0.0, "u, h"),      # half base: PEFT's float32 u and h
              ("unmerged", 24, 16, 12, 4, BF16, 0.25, "u, h, seed")]


@pytest.mark.parametrize("plan, n, d_in, d_out, r, dtype, p, saved", VERA_PLANS)
def test_vera_saves_u_and_merged_weight_in_place_of_x(plan, n, d_in, d_out, r, dtype, p, saved):
    """VeRA's backward never reads x but to recompute u: the op saves u (and the merged weight
    where both fit in bytes(x); on a half base PEFT's h) instead, and every gradient stays within
    the table against float64."""
    from fastadapt.ops.dropout import draw_seed
    adapter = F32 if dtype == BF16 else dtype
    x = randn(n, d_in, dtype=dtype, seed=71, requires_grad=True)
    weight, bias = randn(d_out, d_in, dtype=dtype, scale=d_in ** -0.5, seed=72), randn(d_out, dtype=dtype, seed=73)
    vera_a, vera_b = randn(r, d_in, dtype=adapter, seed=74), randn(d_out, r, dtype=adapter, seed=75)
    lambdas = [randn(d_out, dtype=adapter, seed=76).requires_grad_(), randn(r, dtype=adapter, seed=77).requires_grad_()]
    bias.requires_grad_()
    assert ops._vera_plan(x, weight, r, p > 0, adapter, True)[0] == (plan == "merged")

    def call(x):
        torch.manual_seed(5)
        return ops.vera_linear(x, weight, bias, vera_a, vera_b, *lambdas, dropout_p=p)
    elem = {"x": n * d_in * x.element_size(), "u": n * r * 4, "W_eff": d_out * d_in * 4, "h": n * d_out * 4, "seed": 8}
    expected = sum(elem[name] for name in saved.split(", "))
    params = [weight, bias, vera_a, vera_b, *lambdas]
    assert saved_activation_ratio(call, x, exclude=params) == pytest.approx(expected / elem["x"])

    torch.manual_seed(5)
    masks = _philox_masks(n, d_in, [p], draw_seed)
    leaves64 = [t.detach().to(F64).requires_grad_() for t in (x, bias, *lambdas)]
    x64, bias64, lb64, ld64 = leaves64
    x_d = x64 if masks[0] is None else x64 * masks[0]
    y64 = x64 @ weight.to(F64).T + bias64 + lb64 * ((ld64 * (x_d @ vera_a.to(F64).T)) @ vera_b.to(F64).T)
    cotangent = randn(n, d_out, seed=78)
    y = call(x)
    grads = torch.autograd.grad(y, [x, bias, *lambdas], cotangent.to(dtype))
    assert_rel_close(y, y64, dtype, name="y")
    for name, g, g64 in zip(("x", "bias", "lambda_b", "lambda_d"), grads,
                            torch.autograd.grad(y64, leaves64, cotangent)):
        assert_rel_close(g, g64, dtype, name=f"grad of {name}")
