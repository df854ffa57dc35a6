"""LoRA's backward thin products as a C++ CPU op (csrc/lora.cpp, torch.ops.fastadapt_cpu.
lora_backward_thin), the "cpp" backend of fastadapt::lora_linear_backward: against float64 and the
torch path (float32 within the table's tolerance, float64 1e-10), odd row counts and chunkings,
ranks 1 / 16 / 20 / 64, row-strided views, scaling != 1, results independent of the thread count,
gradients through the registered ops, the configurations it hands to the torch path, bad input,
and the torch path without a compiler."""
from __future__ import annotations

import warnings

import pytest
import torch

from fastadapt.numerics import assert_rel_close
from fastadapt.ops import lowrank as lowrank_ops
from fastadapt.ops import lowrank_lora as ops
from fastadapt.testing import noncontig, randn

F32, F64 = torch.float32, torch.float64
NAMES = ("dx", "db", "dA", "dB")
ALL = [True, True, True, True]
# the forward op has no cpp implementation: FASTADAPT_BACKEND=cpp runs its torch one, and says so once
pytestmark = pytest.mark.filterwarnings("ignore:lora_linear. backend 'cpp' is not implemented")


def inputs(rows, d_in, d_out, rank, dtype, seed):
    """(dy, x, weight, A, B, u) in ``dtype``, u = x A^T as the forward keeps it."""
    x = randn(rows, d_in, seed=seed).to(dtype)
    weight = randn(d_out, d_in, seed=seed + 1, scale=d_in ** -0.5).to(dtype)
    lora_a = randn(rank, d_in, seed=seed + 2, scale=d_in ** -0.5).to(dtype)
    lora_b = randn(d_out, rank, seed=seed + 3, scale=0.3).to(dtype)
    dy = randn(rows, d_out, seed=seed + 4).to(dtype)
    return dy, x, weight, lora_a, lora_b, x @ lora_a.T


def backward(backend, monkeypatch, dy, x, weight, lora_a, lora_b, u, scaling, *, ranks=None, ps=None, seeds=(),
             bits=(), merged=False, needs=ALL):
    """[dx, db, dA, dB] from the registered backward op under FASTADAPT_BACKEND=``backend``."""
    monkeypatch.setenv("FASTADAPT_BACKEND", backend)
    rank = lora_a.shape[0]
    return ops.lora_linear_backward_op(dy, x, weight, lora_a, lora_b, u, scaling, ranks or [rank], ps or [0.0],
                                       list(seeds), list(bits), merged, list(needs))


def assert_same_bits(got, expected, names=NAMES):
    for name, a, e in zip(names, got, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert torch.equal(a, e), f"{name}: not the same bits (max difference {(a - e).abs().max().item():.3e})"


@pytest.mark.parametrize("chunk", [4, 128])
@pytest.mark.parametrize("rank", [2, 16, 64])
@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_cpp_against_the_torch_path(dtype, rows, rank, chunk, monkeypatch, thin_pass):
    """Every output of the cpp backend against the torch path's on the same inputs widened to
    float64 (float32: the table's tolerance; float64: 1e-10); 4-row chunks make 75 chunks for 300
    rows, more than the op's 32 groups (several chunks add into one partial)."""
    monkeypatch.setattr(ops, "_LORA_CHUNK_ROWS", chunk)
    args = inputs(rows, 24, 20, rank, dtype, seed=rows + rank)
    scaling = 0.75
    got = backward("cpp", monkeypatch, *args, scaling)
    expected = backward("torch", monkeypatch, *[t.double() for t in args], scaling)
    for name, a, e in zip(NAMES, got, expected):
        assert a.dtype == dtype and a.shape == e.shape, name
        assert_rel_close(a, e, dtype, name=name)


@pytest.mark.parametrize("rank", [1, 16, 20, 64])
@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_op_against_float64(dtype, rows, rank, thin_pass):
    """The C++ op itself on 7-row chunks: dx_low = s dY B A, dA = s (dY B)^T x, dB = s dY^T u within
    the table's tolerance (rank 1: the registered op runs the torch path, the C++ op still takes it;
    20 ranks: a partial register of ranks; 70 columns: a partial register of columns)."""
    op = thin_pass
    dy, x, _, lora_a, lora_b, u = inputs(rows, 70, 50, rank, dtype, seed=3 * rows + rank)
    t = 1.5 * dy.double() @ lora_b.double()
    expected = [t @ lora_a.double(), t.T @ x.double(), 1.5 * dy.double().T @ u.double()]
    got = op(dy, x, u, lora_b, lora_a, 1.5, True, True, True, 7)
    for name, a, e in zip(("dx_low", "dA", "dB"), got, expected):
        assert a.dtype == dtype and a.is_contiguous(), name
        assert_rel_close(a, e, dtype, name=name)


def test_row_strided_dy_and_x_give_the_contiguous_bits(monkeypatch, thin_pass):
    """Row-sliced views (row stride 2 d, unit column stride) go to the C++ op as they are."""
    dy, x, weight, lora_a, lora_b, u = inputs(37, 24, 20, 16, F32, seed=40)
    wide_dy, wide_x = randn(74, 20, seed=41).to(F32), randn(74, 24, seed=42).to(F32)
    wide_dy[1::2], wide_x[::2] = dy, x
    dy_view, x_view = wide_dy[1::2], wide_x[::2]
    assert not dy_view.is_contiguous() and not x_view.is_contiguous()
    assert ops._cpp_serves(dy_view, x_view, weight, lora_a, lora_b, u, [0.0], False, ALL)
    expected = backward("cpp", monkeypatch, dy, x, weight, lora_a, lora_b, u, 2.0)
    assert_same_bits(backward("cpp", monkeypatch, dy_view, x_view, weight, lora_a, lora_b, u, 2.0), expected)


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_results_do_not_depend_on_the_thread_count(dtype, monkeypatch, thin_pass):
    """dA, dB through the registered op (5 chunks of 128 rows, the last ragged; its dx adds BLAS's
    dY W, not this op's) and every output of the C++ op on 10-row chunks (52 chunks in 32 groups)."""
    op = thin_pass
    args = inputs(517, 96, 80, 16, dtype, seed=50)
    dy, x, _, lora_a, lora_b, u = args
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(backward("cpp", monkeypatch, *args, 0.5)[2:])
            results[-1] += op(dy, x, u, lora_b, lora_a, 0.5, True, True, True, 10)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert_same_bits(other, results[0], names=[str(i) for i in range(len(other))])


@pytest.mark.parametrize("needs", [[False, False, True, False], [True, False, False, False],
                                   [False, False, False, True], [True, True, False, True]], ids=str)
def test_each_subset_of_gradients(needs, monkeypatch, thin_pass):
    """What is not asked for is empty, what is asked for is the torch path's (float64, tight)."""
    args = inputs(9, 12, 10, 3, F64, seed=60)
    got = backward("cpp", monkeypatch, *args, 1.5, needs=needs)
    expected = backward("torch", monkeypatch, *args, 1.5, needs=needs)
    for name, need, a, e in zip(NAMES, needs, got, expected):
        assert a.numel() == 0 if not need else a.shape == e.shape, name
        if need:
            assert_rel_close(a, e, F64, name=name)


def test_u_not_kept_is_recomputed(monkeypatch, thin_pass):
    """The forward keeps no u where x is cheaper to save: the cpp backend forms x A^T again."""
    dy, x, weight, lora_a, lora_b, u = inputs(11, 12, 10, 4, F64, seed=70)
    got = backward("cpp", monkeypatch, dy, x, weight, lora_a, lora_b, u.new_empty(0, 4), 1.25)
    expected = backward("torch", monkeypatch, dy, x, weight, lora_a, lora_b, u, 1.25)
    for name, a, e in zip(NAMES, got, expected):
        assert_rel_close(a, e, F64, name=name)


@pytest.mark.parametrize("rows", [7, 13])
def test_gradients_through_the_registered_ops_check_in_float64(rows, monkeypatch, thin_pass):
    """FASTADAPT_BACKEND=cpp: lora_linear's gradients by gradcheck (two adapters with different
    scalings, a row-strided x, 3-row chunks); the backward op's cpp implementation is the one
    that ran and handed the products to C++."""
    monkeypatch.setenv("FASTADAPT_BACKEND", "cpp")
    monkeypatch.setattr(ops, "_LORA_CHUNK_ROWS", 3)
    calls = []
    serves = ops._cpp_serves
    monkeypatch.setattr(ops, "_cpp_serves", lambda *args: calls.append(serves(*args)) or calls[-1])
    x = randn(2 * rows, 10, seed=1)[::2].requires_grad_()
    weight = randn(12, 10, seed=2)
    bias = randn(12, seed=3, requires_grad=True)
    a = [randn(r, 10, seed=4 + r, requires_grad=True) for r in (2, 3)]
    b = [randn(12, r, seed=8 + r, requires_grad=True) for r in (2, 3)]

    def fn(x, bias, a0, a1, b0, b1):
        return lowrank_ops.lora_linear(x, weight, bias, [a0, a1], [b0, b1], [0.7, 1.3])
    assert torch.autograd.gradcheck(fn, (x, bias, *a, *b))
    assert calls and all(calls)


def test_cpp_backend_gives_the_torch_backends_layer_gradients(monkeypatch, thin_pass):
    """lora_linear in float32 (x, bias, A, B trainable) under both backends: the same output and
    gradients within float32's tolerance."""
    dy, x, weight, lora_a, lora_b, _ = inputs(300, 40, 36, 16, F32, seed=80)
    bias = randn(36, seed=85).to(F32)
    results = {}
    for backend in ("torch", "cpp"):
        monkeypatch.setenv("FASTADAPT_BACKEND", backend)
        leaves = [t.detach().clone().requires_grad_() for t in (x, bias, lora_a, lora_b)]
        y = lowrank_ops.lora_linear(leaves[0], weight, leaves[1], leaves[2], leaves[3], 2.0)
        results[backend] = [y, *torch.autograd.grad(y, leaves, dy)]
    for name, a, e in zip(("y", "dx", "db", "dA", "dB"), results["cpp"], results["torch"]):
        assert_rel_close(a, e.double(), F32, name=name)


def test_configurations_it_does_not_take_run_the_torch_path(monkeypatch, thin_pass):
    """Dropout, merged mode, rank 1, a half base, a float32 adapter on a float64 base and
    column-strided x or dy: the cpp backend runs the torch path, bit for bit."""
    dy, x, weight, lora_a, lora_b, u = inputs(9, 12, 10, 4, F32, seed=90)
    cases = {
        "dropout": dict(ranks=[2, 2], ps=[0.25, 0.0], seeds=[torch.tensor(7)]),
        "merged": dict(merged=True),
    }
    for name, options in cases.items():
        assert_same_bits(backward("cpp", monkeypatch, dy, x, weight, lora_a, lora_b, u, 1.5, **options),
                         backward("torch", monkeypatch, dy, x, weight, lora_a, lora_b, u, 1.5, **options))
    inputs_by_case = {
        "bfloat16 base": (dy.bfloat16(), x.bfloat16(), weight.bfloat16(), lora_a, lora_b, u),
        "float32 adapter, float64 base": (dy.double(), x.double(), weight.double(), lora_a, lora_b, u.double()),
        "column-strided x, dy": (noncontig(dy), noncontig(x), weight, lora_a, lora_b, u),
        "rank 1": (dy, x, weight, lora_a[:1], lora_b[:, :1], u[:, :1]),
    }
    for name, args in inputs_by_case.items():
        assert not ops._cpp_serves(*args, [0.0], False, ALL), name
        assert_same_bits(backward("cpp", monkeypatch, *args, 1.5), backward("torch", monkeypatch, *args, 1.5))


def test_empty_batch_gives_zero_factor_gradients(thin_pass):
    op = thin_pass
    dy, x, weight, lora_a, lora_b, u = inputs(0, 12, 10, 4, F32, seed=95)
    dx, d_a, d_b, colsum = op(dy, x, u, lora_b, lora_a, 2.0, True, True, True)
    assert dx.shape == (0, 12) and d_a.shape == (4, 12) and d_b.shape == (10, 4) and colsum.numel() == 0
    assert not d_a.any() and not d_b.any()
    colsum = op(dy, x, u, lora_b, lora_a, 2.0, False, False, False, 128, dy)[3]   # y_pre: DoRA's colsum
    assert colsum.shape == (10,) and not colsum.any()


def test_bad_input_raises_naming_the_parameter(thin_pass):
    op = thin_pass
    dy, x, weight, lora_a, lora_b, u = inputs(5, 12, 10, 4, F32, seed=96)
    with pytest.raises(ValueError, match="chunk_rows=0 must be positive"):
        op(dy, x, u, lora_b, lora_a, 1.0, True, True, True, 0)
    with pytest.raises(TypeError, match="x has dtype Double; pass it in dy's dtype Float"):
        op(dy, x.double(), u, lora_b, lora_a, 1.0, True, True, True)
    with pytest.raises(TypeError, match="dy has dtype BFloat16; valid: float32, float64"):
        op(dy.bfloat16(), x, u, lora_b, lora_a, 1.0, True, True, True)
    with pytest.raises(ValueError, match="B has 9 rows but dy has 10 columns"):
        op(dy, x, u, lora_b[:9], lora_a, 1.0, True, True, True)


def test_without_a_compiler_the_backward_runs_the_torch_path_with_one_warning(without_compiler, monkeypatch):
    args = inputs(9, 12, 10, 4, F32, seed=97)
    expected = ops._backward(ops.TORCH, *args, 1.5, [4], [0.0], [], [], False, ALL)
    with pytest.warns(UserWarning, match="could not be built") as record:
        got = ops.lora_linear_backward_op(*args, 1.5, [4], [0.0], [], [], False, ALL)
    assert len([w for w in record if "could not be built" in str(w.message)]) == 1
    assert_same_bits(got, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_bits(ops.lora_linear_backward_op(*args, 1.5, [4], [0.0], [], [], False, ALL), expected)
