"""DoRA's backward through csrc/lora.cpp's thin-product pass, the "cpp" backend of
fastadapt::dora_linear_backward: against the torch path on float64-widened inputs (float32 within
the table's tolerance, float64 1e-10), with y_pre saved and in the recompute mode, odd row counts
and chunkings, ranks 2 / 16 / 64, row-strided views, results independent of the thread count,
the pass's colsum(dY o y_pre) against float64, gradients through the registered ops, the
configurations it hands to the torch body, and the torch body without a compiler."""
from __future__ import annotations

import warnings

import pytest
import torch

from fastadapt.numerics import assert_rel_close
from fastadapt.ops import dora_norm as dora_ops
from fastadapt.ops import dora_norm_dora as ops
from fastadapt.testing import noncontig, randn

F32, F64 = torch.float32, torch.float64
NAMES = ("dx", "dA", "dB", "dm", "db")
ALL = [True, True, True, True, True]
# the forward ops have no cpp implementation: FASTADAPT_BACKEND=cpp runs their torch one, and says so once
pytestmark = pytest.mark.filterwarnings("ignore:dora_.*backend 'cpp' is not implemented")


def inputs(rows, d_in, d_out, rank, dtype, seed, *, recompute=False, scaling=1.5):
    """The backward op's tensor inputs (dy, x, weight, bias, A, B, magnitude, norm, u, y_pre) in
    ``dtype``, u and y_pre from the forward op (y_pre None with ``recompute``)."""
    x = randn(rows, d_in, seed=seed).to(dtype)
    weight = randn(d_out, d_in, seed=seed + 1, scale=d_in ** -0.5).to(dtype)
    bias = randn(d_out, seed=seed + 2).to(dtype)
    lora_a = randn(rank, d_in, seed=seed + 3, scale=d_in ** -0.5).to(dtype)
    lora_b = randn(d_out, rank, seed=seed + 4, scale=0.3).to(dtype)
    magnitude = (randn(d_out, seed=seed + 5).abs() + 0.5).to(dtype)
    norm = dora_ops.dora_weight_norm(weight, lora_a, lora_b, scaling)
    with torch.no_grad():
        _, u, *pre = ops.dora_linear_op(x, weight, bias, lora_a, lora_b, magnitude, norm, scaling, recompute)
    dy = randn(rows, d_out, seed=seed + 6).to(dtype)
    return [dy, x, weight, bias, lora_a, lora_b, magnitude, norm, u, pre[0] if pre else None]


def backward(backend, monkeypatch, args, scaling=1.5, needs=ALL):
    """[dx, dA, dB, dm, db] from the registered backward op under FASTADAPT_BACKEND=``backend``."""
    monkeypatch.setenv("FASTADAPT_BACKEND", backend)
    return ops.dora_linear_backward_op(*args, scaling, list(needs))


def widened(args):
    return [None if t is None else t.double() for t in args]


def assert_same_bits(got, expected, names=NAMES):
    for name, a, e in zip(names, got, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert torch.equal(a, e), f"{name}: not the same bits (max difference {(a - e).abs().max().item():.3e})"


@pytest.mark.parametrize("recompute", [False, True], ids=["y_pre", "recompute"])
@pytest.mark.parametrize("chunk", [4, 128])
@pytest.mark.parametrize("rank", [2, 16, 64])
@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_cpp_against_the_torch_path(dtype, rows, rank, chunk, recompute, monkeypatch, thin_pass):
    """Every output of the cpp backend against the torch path's on the same inputs widened to
    float64 (float32: the table's tolerance; float64: 1e-10); 4-row chunks make 75 chunks for 300
    rows, more than the pass's 32 groups (several chunks add into one partial); 50 output columns
    end in a partial register of the colsum."""
    monkeypatch.setattr(ops, "_CPP_CHUNK_ROWS", chunk)
    args = inputs(rows, 24, 50, rank, dtype, seed=rows + rank, recompute=recompute)
    assert ops._cpp_serves(*args[:3], *args[4:], ALL)
    got = backward("cpp", monkeypatch, args)
    expected = backward("torch", monkeypatch, widened(args))
    for name, a, e in zip(NAMES, got, expected):
        assert a.dtype == dtype and a.shape == e.shape, name
        assert_rel_close(a, e, dtype, name=name)


@pytest.mark.parametrize("out_features", [16, 50])
@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_colsum_against_float64(dtype, rows, out_features, thin_pass):
    """The C++ pass's 4th output colsum(dY o y_pre) on 7-row chunks, with every product (dx_low, dA,
    dB) and with none of them, within the table's tolerance of the float64 sum; without y_pre it
    is empty."""
    op = thin_pass
    dy, x, _, _, lora_a, lora_b, _, _, u, _ = inputs(rows, 20, out_features, 16, dtype, seed=2 * rows)
    y_pre = randn(rows, out_features, seed=rows + 5).to(dtype)
    expected = (dy.double() * y_pre.double()).sum(dim=0)
    for needs in ([True, True, True], [False, False, False]):
        *products, colsum = op(dy, x, u, lora_b, lora_a, 1.0, *needs, 7, y_pre)
        assert colsum.dtype == dtype and colsum.shape == (out_features,)
        assert [p.numel() > 0 for p in products] == [need and rows > 0 for need in needs]
        assert_rel_close(colsum, expected, dtype, name="colsum")
    assert op(dy, x, u, lora_b, lora_a, 1.0, True, True, True, 7)[3].numel() == 0


@pytest.mark.parametrize("recompute", [False, True], ids=["y_pre", "recompute"])
def test_row_strided_views_give_the_contiguous_bits(recompute, monkeypatch, thin_pass):
    """Row-sliced dy, x and y_pre (unit column stride) go to the C++ pass as they are."""
    args = inputs(37, 24, 20, 16, F32, seed=40, recompute=recompute)
    views = list(args)
    for i in (0, 1) if recompute else (0, 1, 9):
        wide = randn(74, args[i].shape[1], seed=41 + i).to(F32)
        wide[1::2] = args[i]
        views[i] = wide[1::2]
        assert not views[i].is_contiguous()
    assert ops._cpp_serves(*views[:3], *views[4:], ALL)
    assert_same_bits(backward("cpp", monkeypatch, views), backward("cpp", monkeypatch, args))


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_results_do_not_depend_on_the_thread_count(dtype, monkeypatch, thin_pass):
    """dA, dB, dm through the registered op (5 chunks of 128 rows, the last ragged; dx adds BLAS's
    dY (g o W), not the pass's) and the pass's colsum on 10-row chunks (52 chunks in 32 groups)."""
    op = thin_pass
    args = inputs(517, 96, 80, 16, dtype, seed=50)
    dy, x, *_, lora_a, lora_b, _, _, u, y_pre = args
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(backward("cpp", monkeypatch, args)[1:4])
            results[-1] += op(dy, x, u, lora_b, lora_a, 1.0, True, True, True, 10, y_pre)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert_same_bits(other, results[0], names=[str(i) for i in range(len(other))])


@pytest.mark.parametrize("recompute", [False, True], ids=["y_pre", "recompute"])
@pytest.mark.parametrize("needs", [[False, False, False, True, False], [False, True, False, False, False],
                                   [True, False, False, False, True], [False, False, True, True, False]], ids=str)
def test_each_subset_of_gradients(needs, recompute, monkeypatch, thin_pass):
    """What is not asked for is empty, what is asked for is the torch path's (float64, tight)."""
    args = inputs(9, 12, 10, 3, F64, seed=60, recompute=recompute)
    got = backward("cpp", monkeypatch, args, needs=needs)
    expected = backward("torch", monkeypatch, args, needs=needs)
    for name, need, a, e in zip(NAMES, needs, got, expected):
        assert a.numel() == 0 if not need else a.shape == e.shape, name
        if need:
            assert_rel_close(a, e, F64, name=name)


@pytest.mark.parametrize("recompute", [False, True], ids=["y_pre", "recompute"])
def test_gradients_through_the_registered_ops_check_in_float64(recompute, monkeypatch, thin_pass):
    """FASTADAPT_BACKEND=cpp: fastadapt::dora_linear's gradients in x, bias, A, B and the magnitude
    by gradcheck (the norm a constant, as in PEFT: detached; a row-strided x, 3-row chunks); the
    backward op's cpp implementation is the one that ran and handed the products to C++."""
    monkeypatch.setenv("FASTADAPT_BACKEND", "cpp")
    monkeypatch.setattr(ops, "_CPP_CHUNK_ROWS", 3)
    calls = []
    serves = ops._cpp_serves
    monkeypatch.setattr(ops, "_cpp_serves", lambda *args: calls.append(serves(*args)) or calls[-1])
    x = randn(26, 10, seed=1)[::2].requires_grad_()
    weight = randn(12, 10, seed=2)
    bias = randn(12, seed=3, requires_grad=True)
    lora_a = randn(3, 10, seed=4, requires_grad=True)
    lora_b = randn(12, 3, seed=5, requires_grad=True)
    magnitude = (randn(12, seed=6).abs() + 0.5).requires_grad_()
    norm = dora_ops.dora_weight_norm(weight, lora_a, lora_b, 0.7)

    def fn(x, bias, lora_a, lora_b, magnitude):
        return ops.dora_linear_op(x, weight, bias, lora_a, lora_b, magnitude, norm, 0.7, recompute)[0]
    assert torch.autograd.gradcheck(fn, (x, bias, lora_a, lora_b, magnitude))
    assert calls and all(calls)


@pytest.mark.parametrize("recompute", [False, True], ids=["y_pre", "recompute"])
def test_cpp_backend_gives_the_torch_backends_layer_gradients(recompute, monkeypatch, thin_pass):
    """dora_linear in float32 (x, bias, A, B, magnitude trainable) under both backends: the same
    output and gradients within float32's tolerance."""
    dy, x, weight, bias, lora_a, lora_b, magnitude, *_ = inputs(300, 40, 36, 16, F32, seed=80)
    results = {}
    for backend in ("torch", "cpp"):
        monkeypatch.setenv("FASTADAPT_BACKEND", backend)
        leaves = [t.detach().clone().requires_grad_() for t in (x, bias, lora_a, lora_b, magnitude)]
        y = dora_ops.dora_linear(leaves[0], weight, *leaves[1:4], leaves[4], 2.0, recompute=recompute)
        results[backend] = [y, *torch.autograd.grad(y, leaves, dy)]
    for name, a, e in zip(("y", "dx", "db", "dA", "dB", "dm"), results["cpp"], results["torch"]):
        assert_rel_close(a, e.double(), F32, name=name)


def test_configurations_it_does_not_take_run_the_torch_body(monkeypatch, thin_pass):
    """Rank 1, a half base with a float32 adapter, a float32 adapter on a float64 base,
    column-strided x / dy / y_pre, only db wanted: the cpp backend runs the torch body, bit for bit;
    the dropout op (no cpp implementation) runs its torch one."""
    args = inputs(9, 12, 10, 4, F32, seed=90)
    dy, x, weight, bias, lora_a, lora_b, magnitude, norm, u, y_pre = args
    bf16 = torch.bfloat16   # PEFT's float32 adapter (and u, the norm) on a bfloat16 base
    half = [dy.to(bf16), x.to(bf16), weight.to(bf16), bias.to(bf16), *args[4:9], y_pre.to(bf16)]
    cases = {
        "rank 1": [dy, x, weight, bias, lora_a[:1], lora_b[:, :1], magnitude, norm, u[:, :1], y_pre],
        "bfloat16 base": half,
        "float32 adapter, float64 base": [*(t.double() for t in args[:4]), *args[4:7], norm.double(), u.double(),
                                          y_pre.double()],
        "column-strided x, dy, y_pre": [noncontig(dy), noncontig(x), *args[2:9], noncontig(y_pre)],
    }
    for name, case in cases.items():
        assert not ops._cpp_serves(*case[:3], *case[4:], ALL), name
        assert_same_bits(backward("cpp", monkeypatch, case), backward("torch", monkeypatch, case))
    only_db = [False, False, False, False, True]
    assert not ops._cpp_serves(*args[:3], *args[4:], only_db)
    assert_same_bits(backward("cpp", monkeypatch, args, needs=only_db),
                     backward("torch", monkeypatch, args, needs=only_db))
    seed = torch.tensor(7)
    dropout = {}
    for backend in ("torch", "cpp"):
        monkeypatch.setenv("FASTADAPT_BACKEND", backend)
        dropout[backend] = ops.dora_linear_dropout_backward_op(*args, 1.5, 0.25, seed, None, False, ALL)
    assert_same_bits(dropout["cpp"], dropout["torch"])


def test_without_a_compiler_the_backward_runs_the_torch_body_with_one_warning(without_compiler, monkeypatch):
    args = inputs(9, 12, 10, 4, F32, seed=97)
    expected = ops._backward(ops.TORCH, *args, 1.5, ALL)
    with pytest.warns(UserWarning, match="could not be built") as record:
        got = ops.dora_linear_backward_op(*args, 1.5, ALL)
    assert len([w for w in record if "could not be built" in str(w.message)]) == 1
    assert_same_bits(got, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_bits(ops.dora_linear_backward_op(*args, 1.5, ALL), expected)
