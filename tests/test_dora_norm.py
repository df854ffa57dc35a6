"""dora_norm family: factored norm, the fused DoRA / DeLoRA ops, the PEFT bridge entries.

PEFT parity runs in float64 through ``fastadapt.accelerate`` (outputs and every gradient, r in
{4, 16, 64}, with and without bias, dropout 0 and 0.1): with ``dropout="torch"`` the fused call
draws nn.Dropout's own mask (the same seed on both sides: bit-identical); with the default Philox
stream PEFT's dropout module is replaced by a product with the Philox mask the fused call
regenerates.  The Triton implementations run forced (FASTADAPT_BACKEND=triton; the interpreter on
CPU) against the same truths.
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
from fastadapt.ops import dora_norm_rows as rows
from fastadapt.ops._dropout_mask import DropoutMask, draw_dropout_seed
from fastadapt.ops.dropout import draw_dropout, unpack_dropout
from fastadapt.ops.dora_norm_delora import delora_linear_op
from fastadapt.ops.dora_norm_dora import dora_linear_dropout_op, dora_linear_op
from fastadapt.reference.dora import DeLoRA, DoRA
from fastadapt.testing import DTYPES, linear_model, noncontig, randn, randomize_

D_IN, D_OUT = 97, 83
PHILOX_NOTE = {dora_layers.PHILOX_DROPOUT_NOTE: 1}


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


def ref_params(ref):
    return [ref.lora_A, ref.lora_B, ref.magnitude] if isinstance(ref, DoRA) else \
        [ref.delora_A, ref.delora_B, ref.delora_lambda]


def assert_all_close(actual, expected, names):
    for name, a, e in zip(names, actual, expected):
        assert_rel_close(a, e, name=name)


def philox_mask(seed, shape, p, device="cpu"):
    """The Philox mask (0 or 1 / (1 - p), float64 on CPU) of ``seed`` and ``p`` for a 2-D shape."""
    keep = DropoutMask(p, torch.tensor(seed), None, torch.float32).apply(torch.ones(shape, device=device)) != 0
    return keep.cpu().double() / (1 - p)


def first_seed(seed=11):
    """The Philox seed a fused call draws first after manual_seed(seed) (as in :func:`run`)."""
    torch.manual_seed(seed)
    return int(draw_dropout_seed())


def first_philox_mask(shape, p, device="cpu"):
    """The mask a fused call regenerates for an x of ``shape`` (..., d), float64 on CPU."""
    flat = (int(torch.tensor(shape[:-1]).prod()), shape[-1])
    return philox_mask(first_seed(), flat, p, device).reshape(shape)


class FixedMask(nn.Module):
    """PEFT's dropout module replaced by a product with one fixed, already scaled mask."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask.reshape(x.shape).to(x.dtype)


def lambda_condition(ref, x64, mask, dy):
    """Condition number of dlambda = sum_{t,i} dY_t B_:,i u_ti / (r ||A_i|| ||B_:,i||): the ratio of
    the sum of |terms| to |sum|, by which any low-precision evaluation's relative error grows."""
    with torch.no_grad():
        u = nn.functional.linear(x64 * mask * ref.delora_w_norm, ref.delora_A)
        terms = (dy @ ref.delora_B) * u * (ref.component_scale() / ref.delora_lambda)
        return float(terms.abs().sum() / terms.sum().abs())


def truth(ref, x64, dy, mask=None):
    """[y, dx, d params...] of the float64 reference (dropout with ``mask`` if given)."""
    x64 = x64.detach().double().requires_grad_()
    y = ref(x64) if mask is None else ref(x64, dropout_mask=mask)
    return [y, *torch.autograd.grad(y, [x64, *ref_params(ref)], dy.double())]


# ------------------------------------------------------------------------------------------ norm

@pytest.mark.parametrize("dtype, adapter_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                                  (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32)])
def test_factored_norm_matches_dense_norm(dtype, adapter_dtype):
    ref = DoRA(randn(37, 45), None, randn(5, 45, scale=0.3), randn(37, 5, scale=0.3), randn(37), 1.7)
    weight = ref.weight.to(dtype)
    ref.weight.data = weight.double()  # the norm of the W the op sees
    norm = ops.dora_weight_norm(weight, ref.lora_A.to(adapter_dtype), ref.lora_B.to(adapter_dtype), ref.scaling)
    assert norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_rel_close(norm, ref.weight_norm(), adapter_dtype)


def test_weight_sq_norm_cache(monkeypatch):
    """One entry per frozen weight (and view of it), computed once, recomputed after any write the
    version counter sees and after ``weight.data`` is replaced (PEFT's merge / unmerge); not kept
    for inference tensors."""
    computed = []
    real = ops.weight_row_sq_norm
    monkeypatch.setattr(ops, "weight_row_sq_norm", lambda w: computed.append(1) or real(w))
    w = nn.Parameter(randn(9, 7), requires_grad=False)
    cache = ops.RowSqNormCache()
    first = cache.get(w)
    assert cache.get(w) is first and len(computed) == 1
    assert_rel_close(cache.get(w.T), w.detach().square().sum(0), name="view")
    assert cache.get(w) is first and len(computed) == 2
    with torch.no_grad():
        w.mul_(2)
    assert_rel_close(cache.get(w), 4 * first)
    w.data = randn(9, 7)
    assert_rel_close(cache.get(w), w.detach().square().sum(1))
    with torch.inference_mode():
        frozen = randn(4, 3).clone()
    assert_rel_close(cache.get(frozen), frozen.square().sum(1))


def test_norm_op_reuses_the_cache_through_the_bridge(monkeypatch):
    """The norm op keeps ||W||^2 per weight: repeated calls compute it once; PEFT's merge/unmerge
    and an in-place write to W invalidate it (the fused output follows PEFT's)."""
    computed = []
    real = ops.weight_row_sq_norm
    monkeypatch.setattr(ops, "weight_row_sq_norm", lambda w: computed.append(1) or real(w))
    model, layer = dora_model(8)
    model.eval()
    x = randn(6, D_IN)
    expected = model(x)
    report = fastadapt.accelerate(model)
    for _ in range(3):
        assert_rel_close(model(x), expected)
    assert len(computed) == 1
    layer.merge()
    assert_rel_close(model(x), expected, name="merged")
    layer.unmerge()
    assert_rel_close(model(x), expected, name="unmerged")
    assert report.fused_calls == 4 and report.fallbacks["merged layer"] == 1 and len(computed) == 2
    with torch.no_grad():
        layer.get_base_layer().weight.mul_(1.5)
    fused = model(x)
    fastadapt.revert(model)
    assert_rel_close(fused, model(x), name="after weight write")


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


# ------------------------------------------------------------------------------ dropout masks

@pytest.mark.parametrize("shape", [(3, 7, 5), (16, 8)])
def test_torch_stream_mask_is_nn_dropouts_and_packs_to_bits(shape):
    x = randn(*shape, dtype=torch.float32)
    torch.manual_seed(5)
    expected = torch.nn.functional.dropout(x, 0.3, training=True)
    torch.manual_seed(5)
    mask, packed = draw_dropout(x, 0.3)
    assert torch.equal(x * mask, expected)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-x.numel() // 8)
    assert torch.equal(unpack_dropout(packed, x.shape, x.dtype, 0.3), mask)
    bits_mask = DropoutMask(0.3, None, packed, torch.float32)
    assert torch.equal(bits_mask.apply(noncontig(x)), expected)
    inner, out = randn(*shape, dtype=torch.float32), randn(*shape, dtype=torch.float32)
    assert torch.equal(bits_mask.add_(out.clone(), inner), torch.addcmul(out, inner, mask))


def test_philox_mask_interface():
    """DropoutMask with a seed: apply and add_ see one mask (the Philox stream's for that seed),
    which depends on the seed; exactly one of seed and bits is accepted."""
    x, inner = randn(13, 21, dtype=torch.float32), randn(13, 21, dtype=torch.float32)
    mask = DropoutMask(0.3, torch.tensor(5), None, torch.float32)
    values = mask.apply(torch.ones_like(x))
    assert values.unique().tolist() == [0.0, pytest.approx(1 / 0.7)]
    assert torch.equal(mask.apply(x), x * values) and mask.philox_seed == 5
    out = randn(13, 21, dtype=torch.float32)
    expected = out.double() + inner.double() * values.double()
    assert_rel_close(mask.add_(out, inner), expected, torch.float32, name="out += mask o inner")
    assert not torch.equal(DropoutMask(0.3, torch.tensor(6), None, torch.float32).apply(torch.ones_like(x)), values)
    with pytest.raises(ValueError, match="exactly one of seed"):
        DropoutMask(0.3, None, None, torch.float32)


# ------------------------------------------------------------------------------- CPU row blocks

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_row_block_loops(monkeypatch, dtype):
    """The backward's row-blocked reductions (4 rows per block here: 23 rows = 5 full blocks and a
    partial one), every dtype: (v, u^T dY, colsum(dY o y_pre)) and colsum(dY o x W^T) equal float64
    (half dY converted per block, the products in float32); in float64 every gradient of both DoRA
    modes through the blocked paths equals the reference's."""
    monkeypatch.setattr(rows, "_DY_BLOCK_ELEMENTS", 4 * 13)
    monkeypatch.setattr(rows, "_LINEAR_BLOCK_ELEMENTS", 4 * 13)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dy, y_pre = randn(23, 13).to(dtype), noncontig(randn(23, 13).to(dtype))
    u, b_s = randn(23, 3).to(acc), randn(13, 3).to(acc)
    dy64, y64, u64, b64 = (t.double() for t in (dy, y_pre, u, b_s))
    v, p, c = rows.dy_row_pass(noncontig(dy), u, b_s, y_pre)
    assert v.dtype == p.dtype == c.dtype == acc
    for name, got, want in (("v", v, dy64 @ b64), ("P", p, u64.T @ dy64), ("colsum", c, (dy64 * y64).sum(0))):
        assert_rel_close(got, want, acc, name=name)
    x, w = randn(23, 9).to(dtype), randn(13, 9).to(dtype)
    linear_tol = dtype if dtype == torch.bfloat16 else acc  # a half GEMM rounds its output
    assert_rel_close(rows.colsum_product_linear(dy, x, w, acc), (dy64 * (x.double() @ w.double().T)).sum(0),
                     linear_tol, name="colsum(dY o x W^T)")
    if dtype != torch.float64:
        return
    ref = DoRA(randn(13, 9), randn(13), randn(3, 9, scale=0.3), randn(13, 3, scale=0.3), randn(13), 1.3)
    x_in, dy = randn(23, 9, requires_grad=True), randn(23, 13)
    expected = truth(ref, x_in, dy)
    for recompute in (False, True):
        params = [t.detach().clone().requires_grad_() for t in ref_params(ref)]
        y = ops.dora_linear(x_in, ref.weight, ref.bias, *params, ref.scaling, recompute=recompute)
        got = torch.autograd.grad(y, [x_in, *params], dy)
        for name, g, e in zip(["x", "A", "B", "m"], got, expected[1:]):
            assert_rel_close(g, e, name=f"d{name} recompute={recompute}")


# ------------------------------------------------------------------------- gradcheck (float64)

def _dora_leaves(r=3, d_in=6, d_out=5):
    return [randn(4, d_in, requires_grad=True), randn(r, d_in, requires_grad=True),
            randn(d_out, r, requires_grad=True), randn(d_out, requires_grad=True), randn(d_out, requires_grad=True)]


@pytest.mark.parametrize("mode", ["default", "recompute", "philox", "bits", "philox_recompute"])
def test_dora_ops_gradcheck(mode):
    """float64 gradcheck of fastadapt::dora_linear and ::dora_linear_dropout on the CPU path, the
    norm a constant (as in PEFT: detached) and the mask fixed (a seed, or nn.Dropout's bits)."""
    w = randn(5, 6)
    args = _dora_leaves()
    norm = ops.dora_weight_norm(w, args[1], args[2], 1.3)
    recompute = mode.endswith("recompute")
    mask = ()
    if mode.startswith("philox"):
        mask = (0.3, torch.tensor(17), None)
    elif mode == "bits":
        mask = (0.3, None, draw_dropout(args[0].detach(), 0.3)[1])
    op = dora_linear_dropout_op if mask else dora_linear_op

    def f(x, a, bb, m, bias):
        return op(x, w, bias, a, bb, m, norm, 1.3, recompute, *mask)[0]

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("mode", ["no_dropout", "philox", "bits"])
def test_delora_op_gradcheck(mode):
    w = randn(5, 6)
    args = [randn(4, 6, requires_grad=True), randn(3, 6, requires_grad=True), randn(5, 3, requires_grad=True),
            randn(1, requires_grad=True).abs(), randn(5, requires_grad=True)]
    w_norm = w.norm(dim=0)
    mask = {"no_dropout": (0.0, None, None), "philox": (0.3, torch.tensor(17), None),
            "bits": (0.3, None, draw_dropout(args[0].detach(), 0.3)[1])}[mode]

    def f(x, a, bb, lam, bias):
        return delora_linear_op(x, w, bias, a, bb, lam, w_norm, *mask)[0]

    assert torch.autograd.gradcheck(f, args)


# ------------------------------------------------------------------------------------- PEFT parity

@pytest.mark.parametrize("r", [4, 16, 64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dora_equals_peft(r, bias, dropout):
    """dropout="torch": nn.Dropout's own mask, bit for bit, so outputs and gradients equal PEFT's."""
    model, layer = dora_model(r, bias=bias, dropout=dropout)
    model.train()
    x, dy = randn(2, 13, D_IN, requires_grad=True), randn(2, 13, D_OUT)
    expected = run(model, dora_params(layer), x, dy)
    report = fastadapt.accelerate(model, dropout="torch")
    got = run(model, dora_params(layer), x, dy)
    assert report.fused_calls == 1 and not report.fallbacks and not report.notes
    assert_all_close(got, expected, ["output", "x", "A", "B", "m"])
    layer.scaling["default"] = 0.7  # read at call time
    fused = run(model, dora_params(layer), x, dy)
    fastadapt.revert(model)
    assert_all_close(fused, run(model, dora_params(layer), x, dy), ["output", "x", "A", "B", "m"])


@pytest.mark.parametrize("r", [4, 16, 64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_delora_equals_peft(r, bias, dropout):
    model, layer = delora_model(r, bias=bias, dropout=dropout)
    model.train()
    x, dy = randn(2, 13, D_IN, requires_grad=True), randn(2, 13, D_OUT)
    expected = run(model, delora_params(layer), x, dy)
    report = fastadapt.accelerate(model, dropout="torch")
    got = run(model, delora_params(layer), x, dy)
    assert report.fused_calls == 1 and not report.fallbacks and not report.notes
    assert_all_close(got, expected, ["output", "x", "A", "B", "lambda"])


def _philox_vs_peft(method, *, bias=True, recompute=False, dropout=0.1, dtype=torch.float64, device="cpu",
                    zero_rows=()):
    """The fused layer with the Philox stream (asked for by name: "auto" takes nn.Dropout's under
    FASTADAPT_BACKEND=torch) against PEFT in float64 whose dropout module
    multiplies by the mask the fused call regenerates: output and every gradient within the
    dtype's table (doubled for half I/O; dlambda scaled by its condition number)."""
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
        mask = first_philox_mask(x64.shape, dropout, device)
        (layer64.lora_dropout if method == "dora" else layer64.delora_dropout)["default"] = FixedMask(mask)
    expected = run(model64, params64, x64, dy64)
    report = fastadapt.accelerate(model, dropout="philox")
    if recompute:
        assert dora_layers.set_recompute(model) == 1
    x = x64.detach().to(dtype=dtype, device=device).requires_grad_()
    got = run(model, params, x, dy64.to(dtype=dtype, device=device))
    assert report.fused_calls == 1 and not report.fallbacks
    assert report.notes == (PHILOX_NOTE if dropout else {})
    names = ["output", "x", "A", "B", "m" if method == "dora" else "lambda"]
    scales = [1, 1, 1, 1, 1 if method == "dora" else
              lambda_condition(DeLoRA.from_peft(layer64), x64.detach(), mask, dy64)]
    half_io = 1.0 if dtype in (torch.float32, torch.float64) else 2.0
    for name, g, e, sc in zip(names, got, expected, scales):
        assert torch.isfinite(g).all(), name
        assert_rel_close(g, e, dtype, scale=half_io * sc, name=name)


@pytest.mark.parametrize("method, bias, recompute", [("dora", True, False), ("dora", False, True),
                                                     ("delora", True, False), ("delora", False, False)])
def test_philox_dropout_equals_peft_with_the_same_mask(method, bias, recompute):
    """The default stream on CPU: the Philox mask (C++), regenerated in backward, never saved; no
    fallback, the report notes the stream; PEFT's output and gradients for that mask."""
    _philox_vs_peft(method, bias=bias, recompute=recompute)


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
    fastadapt.accelerate(model, dropout="torch")
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


# ------------------------------------------------------------------------------ half precision

def _torch_stream_mask(x, dropout, dtype):
    """nn.Dropout's mask a fused call draws first after manual_seed(11) on an x cast to ``dtype``."""
    torch.manual_seed(11)
    return draw_dropout(x.detach().to(dtype), dropout)[0].double()


@pytest.mark.parametrize("method", ["dora", "delora"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_low_precision_matches_float64_like_peft(method, dtype):
    """PEFT's setup with autocast_adapter_dtype=False (adapter in the model's dtype) and dropout
    (nn.Dropout's stream): the output and every gradient are within the table of the float64 truth
    (same mask); the scalar dlambda's bound is scaled by its sum's condition number, which PEFT
    needs as well."""
    build, reference = (dora_model, DoRA) if method == "dora" else (delora_model, DeLoRA)
    model, layer = build(16, dropout=0.1, dtype=dtype, autocast=False)
    params = dora_params(layer) if method == "dora" else delora_params(layer)
    x, dy = randn(3, 11, D_IN, dtype=dtype, requires_grad=True), randn(3, 11, D_OUT, dtype=dtype)
    ref = reference.from_peft(layer)
    mask = _torch_stream_mask(x, 0.1, dtype)
    expected = truth(ref, x, dy, mask)
    report = fastadapt.accelerate(model, dropout="torch")
    fused = run(model, params, x, dy)
    assert report.fused_calls == 1 and not report.fallbacks
    scales = [1, 1, 1, 1, lambda_condition(ref, x.detach().double(), mask, dy.double()) if method == "delora" else 1]
    for name, got, true, scale in zip(["output", "x", "A", "B", "m or lambda"], fused, expected, scales):
        assert_rel_close(got, true, dtype, scale=scale, name=name)


AUTOCAST_MODES = ["dora", "dora_recompute", "dora_dropout", "dora_dropout_recompute", "delora", "delora_dropout"]


@pytest.mark.parametrize("mode", AUTOCAST_MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_adapter_on_half_base_matches_peft(mode, dtype):
    """PEFT's default autocast_adapter_dtype=True on a bf16 / fp16 base: the adapter stays float32.
    Fused (no fallback): output and every gradient have PEFT's dtypes, and both PEFT and fused are
    within the dtype's tolerance of the float64 truth of the same math with the same mask
    (nn.Dropout's stream: DoRA draws it on the float32 copy of x, as PEFT's dropout(x.to(float32));
    DeLoRA on x itself)."""
    method = mode.split("_")[0]
    dropout = 0.1 if "dropout" in mode else 0.0
    build, reference = (dora_model, DoRA) if method == "dora" else (delora_model, DeLoRA)
    model, layer = build(16, dropout=dropout, dtype=dtype)
    params = dora_params(layer) if method == "dora" else delora_params(layer)
    assert all(p.dtype == torch.float32 for p in params) and layer.get_base_layer().weight.dtype == dtype
    x, dy = randn(3, 11, D_IN, dtype=dtype, requires_grad=True), randn(3, 11, D_OUT, dtype=dtype)
    peft_out = run(model, params, x, dy)
    mask = _torch_stream_mask(x, dropout, torch.float32 if method == "dora" else dtype) if dropout else None
    ref = reference.from_peft(layer)
    expected = truth(ref, x, dy, mask)
    report = fastadapt.accelerate(model, dropout="torch")
    if mode.endswith("recompute"):
        dora_layers.set_recompute(model)
    fused = run(model, params, x, dy)
    assert report.fused_calls == 1 and not report.fallbacks
    scale = lambda_condition(ref, x.detach().double(), 1 if mask is None else mask, dy.double()) \
        if method == "delora" else 1
    for name, got, want, true, sc in zip(["output", "x", "A", "B", "m or lambda"], fused, peft_out, expected,
                                         [1, 1, 1, 1, scale]):
        assert got.dtype == want.dtype, name
        assert_rel_close(want, true, dtype, scale=sc, name=f"PEFT {name}")
        assert_rel_close(got, true, dtype, scale=sc, name=f"fused {name}")


@pytest.mark.parametrize("method, dropout, dtype, backend", [
    *((m, p, dt, "torch") for m, p in (("dora", 0.0), ("dora", 0.1), ("delora", 0.0), ("delora", 0.1))
      for dt in (torch.bfloat16, torch.float16)),
    ("dora", 0.1, torch.float16, "triton"), ("delora", 0.0, torch.float16, "triton")])
def test_torch_autocast_matches_peft(monkeypatch, method, dropout, dtype, backend):
    """A float32 model under torch.autocast("cpu", dtype) (what HF Trainer's bf16=True / fp16=True
    does): the fused forward of the layer runs with x, W and b in the autocast dtype and the
    float32 adapter as it is; its output has PEFT's dtype under the same autocast (the autocast
    dtype for lora.Linear, x's dtype for DeloraLinear), and the output and every gradient of both
    PEFT and fused are within the autocast dtype's table of the float64 truth (same mask;
    dlambda scaled by its condition number).  Also through the Triton implementations (the
    interpreter, float16: the CUDA autocast path runs the same registration)."""
    monkeypatch.setenv("FASTADAPT_BACKEND", backend)
    build, reference = (dora_model, DoRA) if method == "dora" else (delora_model, DeLoRA)
    model, layer = build(16, dropout=dropout, dtype=torch.float32)
    model.train()
    params = dora_params(layer) if method == "dora" else delora_params(layer)
    forward = dora_layers.dora_forward if method == "dora" else dora_layers.delora_forward
    x = randn(3, 11, D_IN, dtype=torch.float32, requires_grad=True)
    dy = randn(3, 11, D_OUT, dtype=torch.float32)
    fastadapt.accelerate(model, dropout="torch")  # the bridge itself still defers to PEFT under autocast
    outs = {}
    for name, call in (("PEFT", lambda: type(layer).forward(layer, x)), ("fused", lambda: forward(layer, "default", x))):
        torch.manual_seed(11)
        with torch.autocast("cpu", dtype=dtype):
            y = call()
        outs[name] = [y, *torch.autograd.grad(y, [x, *params], dy.to(y.dtype))]
    mask = _torch_stream_mask(x, dropout, torch.float32) if dropout else None
    ref = reference.from_peft(layer)
    expected = truth(ref, x, dy.to(outs["PEFT"][0].dtype), mask)
    scale = lambda_condition(ref, x.detach().double(), 1 if mask is None else mask, dy.double()) \
        if method == "delora" else 1
    for i, name in enumerate(["output", "x", "A", "B", "m or lambda"]):
        assert outs["fused"][i].dtype == outs["PEFT"][i].dtype, name
        for who in ("PEFT", "fused"):
            assert_rel_close(outs[who][i], expected[i], dtype, scale=scale if i == 4 else 1, name=f"{who} {name}")


def _mean_gradient_errors(method, dtype, autocast, batches):
    """Mean over ``batches`` of the relative error of each adapter gradient (and the output)
    against a float64 copy of the layer on the same inputs, for PEFT and for fused."""
    build = dora_model if method == "dora" else delora_model
    model, layer = build(8, dtype=dtype, autocast=autocast)
    with torch.no_grad():  # trained-like: lambda / magnitude away from init
        for p in (dora_params(layer) if method == "dora" else delora_params(layer)):
            p.mul_(1 + 0.2 * randn(*p.shape).to(p.dtype))
    model64 = copy.deepcopy(model).double()
    layer64 = model64.base_model.model[0]
    fused = copy.deepcopy(model)
    fastadapt.accelerate(fused)
    models = {"64": model64, "PEFT": model, "fused": fused}
    errors = {"PEFT": [], "fused": []}
    for b in range(batches):
        x, dy = randn(4, 9, D_IN, dtype=dtype, scale=2.0), randn(4, 9, D_OUT, dtype=dtype)
        grads = {}
        for name, m in models.items():
            lay = m.base_model.model[0]
            params = dora_params(lay) if method == "dora" else delora_params(lay)
            grads[name] = run(m, params, x.to(next(m.parameters()).dtype).requires_grad_(),
                              dy.to(next(m.parameters()).dtype))
        for name in errors:
            errors[name].append([rel_error(g, t) for g, t in zip(grads[name], grads["64"])])
    del layer64
    return {name: torch.tensor(errs).mean(0) for name, errs in errors.items()}


@pytest.mark.parametrize("method", ["dora", "delora"])
@pytest.mark.parametrize("dtype, autocast", [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, False)])
def test_half_precision_gradients_are_as_accurate_as_peft(method, dtype, autocast):
    """Issue 13's contract on one layer: over 8 batches, the mean relative error of the output and
    of every gradient (DeLoRA's dlambda and DoRA's dm, ill-conditioned sums over the tokens,
    included) against a float64 copy on the same inputs is at most 1.5x PEFT's own.  The adapter
    path runs float32 on a half base (u, dY B never rounded to the half dtype), so dlambda's error
    is its terms' float32 rounding times the sum's condition number, not the half dtype's."""
    errors = _mean_gradient_errors(method, dtype, autocast, batches=8)
    for i, name in enumerate(["output", "x", "A", "B", "m or lambda"]):
        fused, peft = float(errors["fused"][i]), float(errors["PEFT"][i])
        assert fused <= 1.5 * peft, f"{name}: mean error {fused:.2e} > 1.5 x PEFT's {peft:.2e}"


# ----------------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("method, dropout, stream", [("dora", 0.0, "philox"), ("dora", 0.1, "philox"),
                                                     ("dora", 0.1, "torch"), ("delora", 0.1, "philox")])
def test_compiles_without_graph_breaks_and_equals_eager(method, dropout, stream):
    """An accelerated model (two layers, the first adapted) compiles with fullgraph=True (no graph
    break: the norm cache, the seed and the mask are inside ops) and its loss and every gradient
    equal eager's, dropout masks included (the seed is drawn by an op, not by inductor's RNG)."""
    build = dora_model if method == "dora" else delora_model
    model, layer = build(8, dropout=dropout, dtype=torch.float32)
    model.train()
    params = dora_params(layer) if method == "dora" else delora_params(layer)
    report = fastadapt.accelerate(model, dropout=stream)
    x = randn(3, 5, D_IN, dtype=torch.float32, requires_grad=True)

    def loss(x):
        return model(x).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    results = []
    # No compile caches: their keys do not cover a custom op's autograd formula, so a cached backward
    # graph can outlive a change to it.
    with torch._functorch.config.patch(enable_autograd_cache=False), \
            torch._inductor.config.patch(fx_graph_cache=False):
        for fn in (compiled, loss):
            torch.manual_seed(3)
            value = fn(x)
            results.append([value, *torch.autograd.grad(value, [x, *params])])
    torch._dynamo.reset()
    assert report.fused_calls >= 1 and not report.fallbacks
    for name, c, e in zip(["loss", "x", "A", "B", "m or lambda"], *results):
        assert_rel_close(c, e, torch.float32, name=name)


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


KINDS = ["dora", "dora_recompute", "dora_dropout", "dora_dropout_torch", "dora_dropout_recompute", "delora",
         "delora_dropout", "delora_dropout_torch"]


@pytest.mark.parametrize("backend, kind", [("torch", kind) for kind in KINDS] +
                         [("triton", kind) for kind in ("dora", "dora_dropout_recompute", "delora_dropout")])
def test_saved_activation_bytes(monkeypatch, device, backend, kind):
    """Exactly x (+ y_pre unless recompute) + u (N x r) + DoRA's norm (out,), plus the mask: an
    int64 seed for the Philox stream (never the mask), 1 bit per element of x for nn.Dropout's
    stream; the issue's bounds (2.05 / 1.05 at r/in = 16/1024) follow."""
    monkeypatch.setenv("FASTADAPT_BACKEND", backend)
    dev = device if backend == "triton" else "cpu"
    n, d, r = 64, 128, 4
    f32 = dict(dtype=torch.float32, device=dev)
    x = randn(n, d, **f32, requires_grad=True)
    w, b = randn(d, d, **f32), randn(d, **f32)
    a, bb = randn(r, d, **f32, requires_grad=True), randn(d, r, **f32, requires_grad=True)
    dropout = 0.1 if "dropout" in kind else 0.0
    stream = "torch" if kind.endswith("torch") else "philox"
    mask = 0 if not dropout else (1 / 32 if stream == "torch" else 8 / (n * d * 4))
    if kind.startswith("delora"):
        lam, w_norm = randn(1, **f32, requires_grad=True), w.norm(dim=0)
        ratio = saved_ratio(lambda: ops.delora_linear(x, w, b, a, bb, lam, w_norm, dropout_p=dropout,
                                                      dropout_stream=stream), x, [w, b, a, bb, lam, w_norm])
        assert ratio == pytest.approx(1 + r / d + mask)
        return
    m = randn(d, **f32, requires_grad=True)
    ratio = saved_ratio(lambda: ops.dora_linear(x, w, b, a, bb, m, 2.0, dropout_p=dropout, dropout_stream=stream,
                                                recompute="recompute" in kind), x, [w, b, a, bb, m])
    assert ratio == pytest.approx((1 if "recompute" in kind else 2) + r / d + 1 / n + mask)


# ------------------------------------------------------------------------------------- bad input

def test_magnitude_length_mismatch_names_parameter_and_shapes():
    model, layer = dora_model(4)
    layer.lora_magnitude_vector["default"].weight = nn.Parameter(randn(D_OUT - 2))
    fastadapt.accelerate(model)
    with pytest.raises(ValueError, match=rf"lora_magnitude_vector.*\({D_OUT - 2},\).*\({D_OUT},\)"):
        model(randn(3, D_IN))


def test_bad_arguments_name_the_parameter():
    w, x = randn(6, 9), randn(2, 9)
    with pytest.raises(ValueError, match=r"lora_B has shape \(6, 4\); expected \(6, 3\)"):
        ops.dora_weight_norm(w, randn(3, 9), randn(6, 4), 1.0)
    with pytest.raises(ValueError, match=r"delora_A has shape \(3, 8\); expected \(3, 9\)"):
        ops.delora_linear(x, w, None, randn(3, 8), randn(6, 3), randn(1), randn(9))
    a, b, m = randn(3, 9), randn(6, 3), randn(6)
    with pytest.raises(ValueError, match="dropout_stream='numpy'.*'philox', 'torch'"):
        ops.dora_linear(x, w, None, a, b, m, 1.0, dropout_p=0.1, dropout_stream="numpy")
    with pytest.raises(ValueError, match="dropout_p=1.0"):
        ops.delora_linear(x, w, None, a, b, randn(1), randn(9), dropout_p=1.0)
    with pytest.raises(TypeError, match="lora_A has torch.float16"):
        ops.dora_linear(x.float(), w.float(), None, a.half(), b.half(), m.half(), 1.0)
    with pytest.raises(ValueError, match="weight requires grad"):
        ops.dora_linear(x, w.requires_grad_(), None, a, b, m, 1.0)


@pytest.mark.parametrize("method", ["dora", "delora"])
def test_rank_above_the_layer_sizes_and_1d_input_equal_peft(method):
    """PEFT accepts r above min(in_features, out_features) (here r = 8 on a 2-unit layer) and a 1-D
    x (PEFT's DoRA then returns (1, out_features)): the fused path runs both, equal to PEFT."""
    if method == "dora":
        model, layer = dora_model(8, d_out=2, dropout=0.1)
    else:
        model = get_peft_model(linear_model(D_IN, 2), DeloraConfig(r=8, delora_lambda=5, init_weights=False,
                                                                   target_modules=["0"]))
        layer = model.base_model.model[0]
    params = dora_params(layer) if method == "dora" else delora_params(layer)
    model.train()
    for x in (randn(5, D_IN, requires_grad=True), randn(D_IN, requires_grad=True)):
        dy = randn(*model(x).shape)
        expected = run(model, params, x, dy)
        report = fastadapt.accelerate(model, dropout="torch")
        got = run(model, params, x, dy)
        fastadapt.revert(model)
        assert report.fused_calls == 1 and not report.fallbacks
        assert got[0].shape == expected[0].shape
        assert_all_close(got, expected, ["output", "x", "A", "B", "m or lambda"])


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


@pytest.mark.parametrize("method", ["dora", "delora"])
def test_dropout_streams_choose_fused_or_fallback(method):
    """dropout="philox" (default) runs fused on every device and dtype, noted in the report;
    dropout="torch" runs fused on CPU (nn.Dropout's own bits, no note) and falls back elsewhere
    (a meta tensor stands in for a device here); eval mode and p = 0 need neither."""
    build, check, note = ((dora_model, dora_layers.dora_check, dora_layers.dora_note) if method == "dora" else
                          (delora_model, dora_layers.delora_check, dora_layers.delora_note))
    off_cpu = "cuda" if torch.cuda.is_available() else "meta"
    for dtype in (torch.float64, torch.float32, torch.float16):
        model, layer = build(4, dropout=0.1, dtype=dtype)
        layer.train()
        cpu, other = torch.empty(3, D_IN, dtype=dtype), torch.empty(3, D_IN, dtype=dtype, device=off_cpu)
        fastadapt.accelerate(model)
        for x in (cpu, other):
            assert check(layer, "default", x) is None and note(layer, "default", x) == dora_layers.PHILOX_DROPOUT_NOTE
        fastadapt.accelerate(model, dropout="torch")
        assert check(layer, "default", cpu) is None and note(layer, "default", cpu) is None
        assert "dropout='torch' in training on" in check(layer, "default", other)
        layer.eval()
        assert check(layer, "default", other) is None and note(layer, "default", other) is None


# ------------------------------------------------------------------ Triton implementations

# Every kernel in fp32, fp16 and bf16; bf16 only compiled (the interpreter has no bf16 arithmetic).
INTERPRETED = fastadapt.backend.interpreter_mode()
KERNEL_DTYPES = [torch.float32, torch.float16, pytest.param(
    torch.bfloat16, marks=pytest.mark.skipif(INTERPRETED, reason="the Triton interpreter does no bf16 arithmetic"))]
LAUNCHERS = {"dora_norm_forward": "dora_norm", "dora_dy_row_pass": "dora_norm",
             "scaled_lowrank_gemm": "lowrank_gemm", "float32_matmul": "lowrank_gemm"}


def _half_scale(dtype):
    """Half I/O rounds the inputs and the output once each: twice the dtype's bound."""
    return 1.0 if dtype == torch.float32 else 2.0


def _half_ulp_bound(dtype):
    """One unit in the last place of ``dtype``, relative: 2^-10 for float16 (2^-7 for bfloat16)."""
    return torch.finfo(dtype).eps


def count_launchers(monkeypatch):
    """Record every call of the Triton launchers the dora_norm ops use (by launcher name)."""
    import importlib
    calls = []
    for name, module in LAUNCHERS.items():
        module = importlib.import_module(f"fastadapt.triton_kernels.{module}")
        launcher = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=launcher, _n=name, **k: calls.append(_n) or _f(*a, **k))
    return calls


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("r, cached", [(5, True), (16, False)])
# None: the launcher's default for the device; splits 2 / 3: split-K over 72 columns in 32-column
# chunks (slabs of 64 + 8, and 32 + 32 + 8) summed by the finish kernel
@pytest.mark.parametrize("tiles", [(16, 32, None), (None, None, None), (16, 32, 2), (16, 32, 3)])
def test_triton_norm_kernel_matches_reference(device, dtype, r, cached, tiles):
    from fastadapt.triton_kernels.dora_norm import dora_norm_forward
    block_m, block_k, splits = tiles
    ref = DoRA(randn(40, 72, seed=11), None, randn(r, 72, scale=0.3, seed=12), randn(40, r, scale=0.3, seed=13),
               randn(40, seed=14), 1.7)
    w, a, b = (t.to(dtype=dtype, device=device) for t in (ref.weight, ref.lora_A, ref.lora_B))
    w_sq = ops.weight_row_sq_norm(w) if cached else None
    kw = dict(block_m=block_m, block_k=block_k, splits=splits)
    norm = dora_norm_forward(w, a, b, ref.scaling, w_sq, **kw)
    assert_rel_close(norm, ref.weight_norm(), dtype)
    assert_rel_close(dora_norm_forward(w.T.contiguous().T, a, b, ref.scaling, w_sq, **kw),
                     ref.weight_norm(), dtype, name="strided W")


def test_fill_splits_fills_the_sms_in_whole_waves():
    from fastadapt.triton_kernels.dora_norm import fill_splits, split_extent
    assert fill_splits(64, 132, 64) == 4           # 256 programs, not 192 (a second wave of 60)
    assert fill_splits(128, 132, 64) == 2          # 256 programs
    assert fill_splits(132, 132, 64) == fill_splits(200, 132, 64) == 1
    assert fill_splits(64, 132, 2) == 2            # the work runs out of chunks: as many as there are
    assert fill_splits(64, 114, 64) * 64 >= 114    # an H100 PCIe's 114 SMs
    assert split_extent(4096, 4, 64) == (1024, 4)
    assert split_extent(72, 3, 32) == (32, 3) and split_extent(72, 2, 32) == (64, 2)
    assert split_extent(40, 8, 32) == (32, 2)      # 2 chunks: 2 splits, not 8


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_forced_triton_backend_runs_the_kernels(monkeypatch, device, dtype):
    """FASTADAPT_BACKEND=triton: the norm kernel, the fused GEMM (forward and dx), the row pass
    and the float32 products (u, dA) run (the interpreter on CPU; on a GPU the launchers' default
    tiles and the autotuned GEMM); output and every gradient match the float64 reference.  fp32
    tl.dot runs IEEE."""
    calls = count_launchers(monkeypatch)
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    ref = DoRA(randn(19, 24), randn(19), randn(4, 24, scale=0.3), randn(19, 4, scale=0.3), randn(19), 1.5)
    params = [t.to(dtype, copy=True).to(device).requires_grad_() for t in ref_params(ref)]
    x, dy = randn(21, 24), randn(21, 19)
    x_low = x.to(dtype).to(device).requires_grad_()
    y = ops.dora_linear(x_low, ref.weight.to(dtype).to(device), ref.bias.to(dtype).to(device), *params,
                        ref.scaling)
    got = [y, *torch.autograd.grad(y, [x_low, *params], dy.to(dtype).to(device))]
    for name, g, e in zip(["output", "x", "A", "B", "m"], got, truth(ref, x, dy)):
        assert_rel_close(g, e, dtype, scale=_half_scale(dtype), name=name)
    assert sorted(calls) == sorted(["dora_norm_forward", "float32_matmul", "scaled_lowrank_gemm",   # forward
                                    "dora_dy_row_pass", "scaled_lowrank_gemm", "float32_matmul"])  # backward


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_forced_triton_backend_delora(monkeypatch, device, dtype):
    """FASTADAPT_BACKEND=triton: DeLoRA's forward and dx run the fused GEMM, u, dY B, dA's and dB's
    products the float32 GEMM; all gradients match (dlambda, a scalar sum, within its condition
    number times the table, as PEFT needs too)."""
    calls = count_launchers(monkeypatch)
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    ref = DeLoRA.demo(24, 19, 4)
    cast = lambda t: t.detach().to(dtype).to(device)  # noqa: E731
    params = [cast(t).requires_grad_() for t in ref_params(ref)]
    x, dy = randn(21, 24), randn(21, 19)
    x_low = cast(x).requires_grad_()
    y = ops.delora_linear(x_low, cast(ref.weight), cast(ref.bias), *params, cast(ref.delora_w_norm))
    got = [y, *torch.autograd.grad(y, [x_low, *params], cast(dy))]
    scales = [1, 1, 1, 1, lambda_condition(ref, x, torch.ones(()), dy)]
    for name, g, e, sc in zip(["output", "x", "A", "B", "lambda"], got, truth(ref, x, dy), scales):
        assert_rel_close(g, e, dtype, scale=_half_scale(dtype) * sc, name=name)
    assert calls.count("scaled_lowrank_gemm") == 2 and calls.count("float32_matmul") == 4


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_triton_scaled_lowrank_gemm_matches_reference(device, dtype):
    """C = so o (x diag(sk) y + u v) + b: DoRA's forward (scale epilogue) and dx (scale on load)."""
    from fastadapt.triton_kernels.lowrank_gemm import scaled_lowrank_gemm
    m, k, n, r = 37, 40, 29, 5
    x, w, u, b_lr = (randn(*s) for s in ((m, k), (n, k), (m, r), (n, r)))
    g, bias = randn(n).abs() + 0.5, randn(n)
    cast = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    y, y_pre = scaled_lowrank_gemm(noncontig(cast(x)), cast(w).T, cast(u), cast(b_lr).T,
                                   out_scale=g.float().to(device), bias=cast(bias), with_pre=True)
    assert_rel_close(y, g * (x @ w.T + u @ b_lr.T) + bias, dtype, name="forward: scale epilogue")
    assert_rel_close(y_pre, x @ w.T + u @ b_lr.T, dtype, name="forward: y_pre from the same epilogue")
    dy, v, a = randn(m, n), randn(m, r), randn(r, k)
    dx = scaled_lowrank_gemm(cast(dy), cast(w), cast(v), cast(a), k_scale=g.float().to(device))
    assert_rel_close(dx, (dy * g) @ w + v @ a, dtype, name="dx: scale on load")


OPTION_SETS = {"forward": dict(out_scale=True, bias=True, with_pre=True, round_base=True),
               "dx": dict(k_scale=True, round_base=True),
               "inner": dict(k_scale=True, round_base=True, out_dtype=torch.float32),
               "residual": dict(out_scale=True, with_pre=True, round_base=True, residual=True),
               "delora": dict(bias=True, round_base=True, bias_in_base=True),
               "unrounded": dict(out_scale=True, bias=True)}


@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_twin_of_the_fused_gemm_matches_the_kernel(device, options, dtype):
    """fastadapt.ops._lowrank_gemm.lowrank_gemm (the CPU path) and the Triton kernel take the same
    arguments and round at the same points: float32 agrees to the float32 table, a half x with
    float32 u, v (the adapter path of a half base) to one unit in the last place of the half
    output (only float32 summation orders differ), a float32 output to the float32 table."""
    from fastadapt.ops._lowrank_gemm import lowrank_gemm
    from fastadapt.triton_kernels.lowrank_gemm import scaled_lowrank_gemm
    m, k, n, r = 37, 40, 29, 5
    opts = dict(OPTION_SETS[options])
    cast = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    f32 = lambda t: t.to(dtype=torch.float32, device=device)  # noqa: E731
    x, y = cast(randn(m, k)), cast(randn(n, k)).T
    u, v = f32(randn(m, r)), f32(randn(r, n))
    for name, make in (("k_scale", lambda: f32(randn(k).abs() + 0.5)), ("out_scale", lambda: f32(randn(n).abs() + 0.5)),
                       ("bias", lambda: cast(randn(n))), ("residual", lambda: cast(randn(m, n)))):
        if opts.get(name):
            opts[name] = make()
    kernel = scaled_lowrank_gemm(x, y, u, v, **opts)
    twin = lowrank_gemm(x.cpu(), y.cpu(), u.cpu(), v.cpu(), **{key: val.cpu() if isinstance(val, torch.Tensor) else val
                                                               for key, val in opts.items()})
    for got, want in zip(*((out,) if not isinstance(out, tuple) else out for out in (kernel, twin))):
        assert got.dtype == want.dtype and got.shape == want.shape
        if got.dtype == torch.float32:
            assert_rel_close(got, want, torch.float32, name=options)
        else:
            assert rel_error(got, want) <= _half_ulp_bound(dtype), options


def test_launchers_name_the_operand_of_a_wrong_dtype(device):
    """The fused GEMM and the row pass take half x / dY with the adapter operands in the same dtype
    or all float32; anything else is a TypeError naming the operand."""
    from fastadapt.triton_kernels.dora_norm import dora_dy_row_pass
    from fastadapt.triton_kernels.lowrank_gemm import scaled_lowrank_gemm
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


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_seeded_dropout_kernels(device, dtype):
    """The Triton mask drops a fraction p (within 4 sigma), scales kept values by 1 / (1 - p),
    depends on the seed and the logical index only (strided x, same mask; 97 columns: a partial
    group of 4 at the end of each row), the backward's in-place out += mask o inner regenerates
    exactly the forward's mask, and the CPU stream (C++) gives the same bits."""
    from fastadapt.triton_kernels.dropout import dropout_mask_add_, seeded_dropout
    p, shape, seed = 0.3, (61, 97), 123
    mask = seeded_dropout(torch.ones(shape, device=device), seed, p)
    dropped = float((mask == 0).double().mean())
    assert abs(dropped - p) < 4 * (p * (1 - p) / mask.numel()) ** 0.5
    assert torch.equal(mask.unique().cpu(), torch.tensor([0.0, 1 / (1 - p)]))
    assert torch.equal((mask.cpu() != 0).double() / (1 - p), philox_mask(seed, shape, p))  # CPU stream: same bits
    assert not torch.equal(seeded_dropout(torch.ones(shape, device=device), seed + 1, p), mask)
    lanes = [mask[:, c:96:4] for c in range(4)]  # the four outputs of one Philox call are distinct draws
    assert all(not torch.equal(lanes[0], other) for other in lanes[1:])
    x = randn(*shape).to(dtype=dtype, device=device)
    x_d, rest = seeded_dropout(x, seed, p, with_rest=True)
    assert x_d.dtype == rest.dtype == dtype
    assert torch.equal(x_d, (x.float() * mask).to(dtype))
    assert_rel_close(rest, x.double() - x.double() * mask.double(), dtype, name="x - x_d")
    assert torch.equal(seeded_dropout(noncontig(x), seed, p), x_d)
    assert torch.equal(seeded_dropout(x.T.contiguous().T, seed, p), x_d)
    out, inner = (randn(*shape).to(dtype=dtype, device=device) for _ in range(2))
    expected = out.double() + inner.double() * mask.double()
    assert dropout_mask_add_(out, noncontig(inner), seed, p) is out
    assert_rel_close(out, expected, dtype, name="out += mask o inner")


@pytest.mark.parametrize("dtype, method, bias, recompute", [
    (torch.float32, "dora", True, False), (torch.float32, "dora", False, True), (torch.float32, "delora", False, False),
    (torch.float16, "dora", False, False), (torch.float16, "delora", True, False),
    *(pytest.param(torch.bfloat16, method, True, False, marks=KERNEL_DTYPES[2].marks) for method in ("dora", "delora"))])
def test_triton_dropout_equals_peft_with_the_same_mask(monkeypatch, device, dtype, method, bias, recompute):
    """Dropout 0.1 in training on the triton backend: no fallback, the Philox mask regenerated in
    forward and backward (never saved), and PEFT's output and gradients for that mask."""
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    _philox_vs_peft(method, bias=bias, recompute=recompute, dtype=dtype, device=device)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_zero_magnitude_rows_equal_peft(monkeypatch, device, backend, dropout):
    """y_pre is saved (not recovered from y), so rows with m_j = 0 get PEFT's
    dm_j = colsum(dY o y_pre)_j / n_j, finite, without any check on the host."""
    monkeypatch.setenv("FASTADAPT_BACKEND", backend)
    _philox_vs_peft("dora", dropout=dropout, dtype=torch.float32, device=device if backend == "triton" else "cpu",
                    zero_rows=(3, 40))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only with a CUDA device")
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_triton_backend_does_not_sync(dropout):
    """DoRA (a zero magnitude entry included) and DeLoRA, each also with PEFT's default float32
    adapter on a bf16 base, forward and backward on CUDA run with torch's sync debug mode set to
    error (after a warm-up call that compiles and autotunes; every tensor is on the device before,
    since a host-to-device copy synchronizes too; the seed is a CPU scalar read on the host)."""
    ref = DoRA(randn(40, 48), randn(40), randn(8, 48, scale=0.3), randn(40, 8, scale=0.3), randn(40), 1.5)
    dref = DeLoRA.demo(48, 40, 8)
    cuda = lambda t: t.detach().float().cuda()  # noqa: E731
    params = [cuda(t).requires_grad_() for t in ref_params(ref)]
    dparams = [cuda(t).requires_grad_() for t in ref_params(dref)]
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
    a partial one, strided dY), against float64 of the same rounded inputs; b_s and u in dY's
    dtype or float32 (a half base's adapter path)."""
    from fastadapt.triton_kernels.dora_norm import dora_dy_row_pass
    n, out_features, r = 53, 45, 5
    dy, y_pre = (randn(n, out_features).to(dtype=dtype, device=device) for _ in range(2))
    dy64, y64 = dy.double(), y_pre.double()
    for adapter_dtype in {dtype, torch.float32}:
        u, b_s = (randn(*s).to(dtype=adapter_dtype, device=device) for s in ((n, r), (out_features, r)))
        for splits in (None, 2):   # 2: column slabs of 32 + 13, v summed from a float32 partial
            v, p, colsum = dora_dy_row_pass(noncontig(dy), u, b_s, y_pre, block_n=16, block_o=16, splits=splits)
            assert v.dtype == p.dtype == adapter_dtype and colsum.dtype == torch.float32
            assert_rel_close(v, dy64 @ b_s.double(), adapter_dtype, name=f"v = dY b_s, splits={splits}")
            assert_rel_close(p, u.double().T @ dy64, adapter_dtype, name=f"P = u^T dY, splits={splits}")
            assert_rel_close(colsum, (dy64 * y64).sum(0), torch.float32, name=f"colsum(dY o y_pre), splits={splits}")


def test_triton_float32_matmul_matches_reference(device):
    """C = fl32(a) fl32(b) for a half a and a float32 b (and the transposed roles), strided, the
    reduction split in 3 chunks; with dropout the operand's mask is the Philox mask for that shape
    (u = (mask o x) A^T and dA = v^T (mask o x)): float32 table of float64."""
    from fastadapt.triton_kernels.lowrank_gemm import float32_matmul
    x = randn(45, 37).to(dtype=torch.float16, device=device)
    a_t = randn(37, 5).to(dtype=torch.float32, device=device)
    v_t = randn(5, 45).to(dtype=torch.float32, device=device)
    x64, a64, v64 = (t.double().cpu() for t in (x, a_t, v_t))
    assert_rel_close(float32_matmul(noncontig(x), a_t), x64 @ a64, torch.float32, name="x A^T")
    assert_rel_close(float32_matmul(v_t, x, split_k=3, block_k=16), v64 @ x64, torch.float32, name="v^T x, split")
    mask = philox_mask(7, (45, 37), 0.3, device)
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
    ``round_base``.  The residual epilogue (DoRA's dropout forward on a half base) and a float32
    output (its dx inner term) match the float64 of the same formula within the float16 / float32
    table; ``round_base`` on float32 x changes nothing."""
    from fastadapt.triton_kernels.lowrank_gemm import scaled_lowrank_gemm
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
    assert torch.equal(scaled_lowrank_gemm(f32(x), f32(w).T, f32(u), f32(v), round_base=True),
                       scaled_lowrank_gemm(f32(x), f32(w).T, f32(u), f32(v)))


def mixed_leaves(ref, x64, device):
    """PEFT's default dtypes for a half model: the reference's adapter tensors as float32 leaves,
    x a float16 leaf, weight and bias float16, on ``device``; and the cast used."""
    def cast(t, dtype):
        return None if t is None else t.detach().to(dtype=dtype, device=device)
    params = [cast(p, torch.float32).requires_grad_() for p in ref_params(ref)]
    return (params, cast(x64, torch.float16).requires_grad_(), cast(ref.weight, torch.float16),
            cast(ref.bias, torch.float16), cast)


def philox_truth(ref, x64, dy, dropout, device):
    """(mask, [y, dx, d params...]) in float64 for the Philox mask a fused call regenerates when its
    seed is the first draw after manual_seed(11) (as in :func:`run`); mask 1 without dropout."""
    mask = first_philox_mask(x64.shape, dropout, device) if dropout else torch.ones(())
    return mask, truth(ref, x64, dy, mask if dropout else None)


def _torch_vs_triton(monkeypatch, device, call):
    """``call()`` -> outputs, on the forced torch backend and on the forced triton backend (with the
    Triton launchers counted)."""
    monkeypatch.setenv("FASTADAPT_BACKEND", "torch")
    torch_path = call()
    calls = count_launchers(monkeypatch)
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    return torch_path, call(), {name: calls.count(name) for name in set(calls)}


@pytest.mark.parametrize("mode", ["bias", "no_bias", "recompute", "dropout", "dropout_recompute"])
def test_mixed_dora_triton_matches_torch_and_float64(monkeypatch, device, mode):
    """PEFT's default float32 adapter on a float16 base: the triton implementation (u = x A^T and
    dA = v^T x by float32_matmul with the Philox mask applied in-kernel; y, y_pre and dx by the
    fused GEMM whose half base product is rounded where PEFT rounds it; the row pass on half dY with
    float32 u and B) against the torch implementation (the same roundings through the GEMM's torch
    twin) and the float64 truth.  Output and every gradient: PEFT's dtypes, within the float16
    table of the float64 truth; y and dx within one float16 rounding of the torch path, dm
    (sums of dY o y_pre, y_pre half) within 2^-10 times its sum's condition number, dA and dB
    (float32 math on identical half inputs) within the float32 table."""
    half, f32 = torch.float16, torch.float32
    dropout = 0.2 if "dropout" in mode else 0.0
    exact = lambda t, dtype: t.to(dtype).double()  # noqa: E731  (values the low-precision run sees exactly)
    ref = DoRA(exact(randn(19, 24), half), None if mode == "no_bias" else exact(randn(19), half),
               exact(randn(4, 24, scale=0.3), f32), exact(randn(19, 4, scale=0.3), f32), exact(randn(19), f32), 1.5)
    x64, dy = exact(randn(21, 24), half), randn(21, 19).to(half)
    mask, expected = philox_truth(ref, x64, dy, dropout, device)

    def fused():
        params, x, weight, bias, cast = mixed_leaves(ref, x64, device)
        torch.manual_seed(11)
        y = ops.dora_linear(x, weight, bias, *params, ref.scaling, dropout_p=dropout, recompute="recompute" in mode)
        return [y, *torch.autograd.grad(y, [x, *params], cast(dy, half))]

    torch_path, got, counts = _torch_vs_triton(monkeypatch, device, fused)
    # the norm runs torch (W half, adapter float32); u and dA by float32_matmul, y and dx by the
    # fused GEMM; recompute: v and u^T dY by float32_matmul instead of the row pass
    assert counts == ({"float32_matmul": 4, "scaled_lowrank_gemm": 2} if "recompute" in mode else
                      {"float32_matmul": 2, "scaled_lowrank_gemm": 2, "dora_dy_row_pass": 1})
    with torch.no_grad():
        x_d = x64 * mask
        y_pre = x_d @ ref.weight.T + ref.scaling * (x_d @ ref.lora_A.T) @ ref.lora_B.T
        terms = dy.double() * y_pre
        dm_condition = float(terms.abs().sum(0).norm() / terms.sum(0).norm())
    bounds = {"output": 1.0, "x": 1.0, "m": dm_condition}
    for name, g, t, true in zip(["output", "x", "A", "B", "m"], got, torch_path, expected):
        assert g.dtype == t.dtype == (half if name in ("output", "x") else f32), name
        assert_rel_close(g, true, half, name=f"{name} vs float64")
        if name in bounds:
            err = rel_error(g, t)
            assert err <= bounds[name] * _half_ulp_bound(half), f"{name} vs torch path: {err:.3e}"
        else:
            assert_rel_close(g, t, f32, name=f"{name} vs torch path")


@pytest.mark.parametrize("mode", ["bias", "no_bias", "dropout"])
def test_mixed_delora_triton_matches_torch_and_float64(monkeypatch, device, mode):
    """DeLoRA with PEFT's default float32 adapter on a float16 base: the triton implementation
    (u, dY B and dA's and dB's products by float32_matmul; y and dx without dropout by the fused
    GEMM, its half base product, with the bias in forward, rounded before the float32 low-rank term
    joins it) against the torch implementation and the float64 truth: within the float16 table of
    the truth and one float16 rounding of the torch path (y, dx; the float32 gradients: the float32
    table); dlambda, and dA's and dB's radial terms through the same sums dc, scaled by the sums'
    condition number."""
    half, f32 = torch.float16, torch.float32
    dropout = 0.2 if mode == "dropout" else 0.0
    demo = DeLoRA.demo(24, 19, 4)
    exact = lambda t, dtype: t.to(dtype).double()  # noqa: E731
    ref = DeLoRA(exact(demo.weight, half), None if mode == "no_bias" else exact(demo.bias, half),
                 *(exact(t, f32) for t in (demo.delora_A, demo.delora_B, demo.delora_lambda, demo.delora_w_norm)))
    x64, dy = exact(randn(21, 24), half), randn(21, 19).to(half)
    mask, expected = philox_truth(ref, x64, dy, dropout, device)

    def fused():
        params, x, weight, bias, cast = mixed_leaves(ref, x64, device)
        torch.manual_seed(11)
        y = ops.delora_linear(x, weight, bias, *params, cast(ref.delora_w_norm, f32), dropout_p=dropout)
        return [y, *torch.autograd.grad(y, [x, *params], cast(dy, half))]

    torch_path, got, counts = _torch_vs_triton(monkeypatch, device, fused)
    assert counts == {"float32_matmul": 4, "scaled_lowrank_gemm": 1 if dropout else 2}
    condition = lambda_condition(ref, x64, mask, dy.double())
    for name, g, t, true in zip(["output", "x", "A", "B", "lambda"], got, torch_path, expected):
        assert g.dtype == t.dtype == (half if name in ("output", "x") else f32), name
        scale = 1.0 if name in ("output", "x") else condition
        assert_rel_close(g, true, half, scale=scale, name=f"{name} vs float64")
        if name in ("output", "x"):
            err = rel_error(g, t)
            assert err <= _half_ulp_bound(half), f"{name} vs torch path: {err:.3e}"
        else:
            assert_rel_close(g, t, f32, scale=scale, name=f"{name} vs torch path")


@pytest.mark.parametrize("mode", ["default", "recompute", "dropout", "delora", "delora_dropout"])
def test_mixed_triton_path_saves_no_float32_activation_copies(monkeypatch, device, mode):
    """A float32 adapter on a float16 base on the triton backend: DoRA saves x and y_pre in float16
    (x alone with recompute), u (N, r) in float32 and the norm, DeLoRA x and u, and no mask (an
    int64 seed): exactly (2 or 1) + 2 r/d + 2/N (DeLoRA 1 + 2 r/d) times bytes(x) (+ the seed's
    8 bytes) for d_in = d_out = d, no float32 copy of x or y_pre."""
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    n, d, r = 64, 128, 4
    half = dict(dtype=torch.float16, device=device)
    x, w, b = randn(n, d, **half, requires_grad=True), randn(d, d, **half), randn(d, **half)
    a, bb, m = (randn(*s, dtype=torch.float32, device=device, requires_grad=True) for s in ((r, d), (d, r), (d,)))
    dropout = 0.1 if mode.endswith("dropout") else 0.0
    seed = 8 / (n * d * 2) if dropout else 0
    if mode.startswith("delora"):
        w_norm = w.float().norm(dim=0)
        ratio = saved_ratio(lambda: ops.delora_linear(x, w, b, a, bb, m[:1], w_norm, dropout_p=dropout), x,
                            [w, b, a, bb, m, w_norm])
        assert ratio == pytest.approx(1 + 2 * r / d + seed)
        return
    ratio = saved_ratio(lambda: ops.dora_linear(x, w, b, a, bb, m, 2.0, dropout_p=dropout,
                                                recompute=mode == "recompute"), x, [w, b, a, bb, m])
    assert ratio == pytest.approx((1 if mode == "recompute" else 2) + 2 * r / d + 2 / n + seed)


@pytest.mark.parametrize("method", ["dora", "delora"])
def test_bridge_runs_the_mixed_kernels_for_peft_default_autocast(monkeypatch, device, method):
    """fastadapt.accelerate on PEFT's default float32 adapter on a float16 base with the triton
    backend (FASTADAPT_BACKEND=triton here, every CUDA call): the mixed kernels run (no fallback),
    and PEFT's output and fused are each within the float16 table of the float64 truth, with
    PEFT's dtypes (dlambda scaled by its sum's condition number)."""
    calls = count_launchers(monkeypatch)
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    build, reference = (dora_model, DoRA) if method == "dora" else (delora_model, DeLoRA)
    model, layer = build(8, dtype=torch.float16)
    ref = reference.from_peft(layer)
    model.to(device)
    params = dora_params(layer) if method == "dora" else delora_params(layer)
    x, dy = randn(3, 11, D_IN, dtype=torch.float16), randn(3, 11, D_OUT, dtype=torch.float16)
    expected = truth(ref, x, dy)
    peft_out = run(model, params, x.to(device).requires_grad_(), dy.to(device))
    report = fastadapt.accelerate(model)
    fused = run(model, params, x.to(device).requires_grad_(), dy.to(device))
    assert report.fused_calls == 1 and not report.fallbacks
    assert calls.count("scaled_lowrank_gemm") == 2 and "float32_matmul" in calls  # forward and dx
    scale = lambda_condition(ref, x.double(), torch.ones(()), dy.double()) if method == "delora" else 1
    for name, got, want, true in zip(["output", "x", "A", "B", "m or lambda"], fused, peft_out, expected):
        assert got.dtype == want.dtype, name
        sc = scale if name == "m or lambda" else 1
        assert_rel_close(want, true, torch.float16, scale=sc, name=f"PEFT {name}")
        assert_rel_close(got, true, torch.float16, scale=sc, name=f"fused {name}")
