"""SHiRA's sampled product as a C++ CPU op (csrc/sampled_product.cpp, torch.ops.fastadapt_cpu):
values[k] = sum_n dY[n, p_k] x[n, q_k] at CSR positions, against a float64 reference on odd
shapes, repeated / unsorted positions, empty rows, non-contiguous views and every input dtype;
the same bits from every instruction set and thread count; bad plans; the registration on
SHiRA's backward op and its fallback to the torch path without a compiler."""
from __future__ import annotations

import warnings

import pytest
import torch

from fastadapt import _cpp, backend
from fastadapt.numerics import assert_rel_close
from fastadapt.ops import lowrank_shira as S
from fastadapt.testing import noncontig, randn

SHAPES = [(1, 5, 7), (9, 13, 41), (75, 6, 341), (130, 17, 9), (700, 3, 11)]   # (N, out, in); 700: 2 token blocks
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def sampled_product():
    """torch.ops.fastadapt_cpu.sampled_product; skips where this machine cannot build csrc/."""
    if _cpp.extension() is None:
        pytest.skip("csrc/ could not be built here (no C++ compiler or ninja): only the torch path runs")
    return torch.ops.fastadapt_cpu.sampled_product


def positions(out: int, in_: int, k: int, seed: int) -> torch.Tensor:
    """(2, k) random positions in PEFT's unsorted order, with repeats and (k < out) empty rows."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, max(1, out - 1), (k,), generator=g)      # the last row stays empty
    cols = torch.randint(0, in_, (k,), generator=g)
    if k >= 2:
        rows[1], cols[1] = rows[0], cols[0]                         # a repeated position
    return torch.stack([rows, cols])


def reference(dy: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, ccol: torch.Tensor) -> torch.Tensor:
    """float64 (dY^T x) at the CSR entries, from the inputs as given (half inputs exactly widened)."""
    rows = torch.repeat_interleave(torch.arange(crow.numel() - 1), crow.diff().long())
    return (dy.double().T @ x.double())[rows, ccol.long()]


def acc_tolerance(dtype: torch.dtype) -> torch.dtype:
    """Inputs are exact in the accumulation type: the error is the float32 (float64) sums'."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_reference(dtype, shape):
    """Every chunking (0: chosen from x's width; 8; 13 with a ragged last chunk) on odd shapes."""
    op = sampled_product()
    n, out, in_ = shape
    seed = 100 * SHAPES.index(shape) + DTYPES.index(dtype)
    plan = S.shira_plan(positions(out, in_, 3 * out + 5, seed), out, in_)
    dy = randn(n, out, dtype=dtype, seed=seed + 1)
    x = randn(n, in_, dtype=dtype, seed=seed + 2)
    expected = reference(dy, x, plan.crow, plan.ccol)
    for chunk in (0, 8, 13):
        got = op(dy, x, plan.crow, plan.ccol, chunk)
        assert got.dtype == acc_tolerance(dtype) and got.shape == expected.shape
        assert_rel_close(got, expected, acc_tolerance(dtype), name=f"chunk {chunk}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_views(dtype):
    """Column-major x, every-other-column dY, row-sliced views (unit column stride, row stride 2 d)."""
    op = sampled_product()
    n, out, in_ = 37, 11, 19
    plan = S.shira_plan(positions(out, in_, 40, seed=7), out, in_)
    dy = randn(n, out, dtype=dtype, seed=8)
    x = randn(n, in_, dtype=dtype, seed=9)
    expected = reference(dy, x, plan.crow, plan.ccol)
    wide_dy, wide_x = randn(2 * n, out, dtype=dtype, seed=10), randn(2 * n, in_, dtype=dtype, seed=11)
    wide_dy[::2], wide_x[::2] = dy, x
    views = [(noncontig(dy), x.T.contiguous().T), (wide_dy[::2], wide_x[::2])]
    for dy_view, x_view in views:
        assert not dy_view.is_contiguous() and not x_view.is_contiguous()
        assert_rel_close(op(dy_view, x_view, plan.crow, plan.ccol, 16), expected, acc_tolerance(dtype))


def test_unsorted_columns_within_a_row_and_empty_rows():
    """The op takes a row's positions in any column order (repeats included): values follow ccol."""
    op = sampled_product()
    dy, x = randn(21, 4, dtype=torch.float32, seed=20), randn(21, 10, dtype=torch.float32, seed=21)
    crow = torch.tensor([0, 5, 5, 5, 9], dtype=torch.int32)            # rows 1 and 2 empty
    ccol = torch.tensor([9, 2, 2, 0, 7, 3, 1, 8, 3], dtype=torch.int32)
    assert_rel_close(op(dy, x, crow, ccol), reference(dy, x, crow, ccol), torch.float32)


def test_empty_inputs():
    op = sampled_product()
    crow = torch.zeros(4, dtype=torch.int32)
    assert op(randn(5, 3, dtype=torch.float32, seed=30), randn(5, 6, dtype=torch.float32, seed=31), crow,
              torch.zeros(0, dtype=torch.int32)).shape == (0,)
    plan = S.shira_plan(torch.tensor([[0, 2], [1, 5]]), 3, 6)
    got = op(torch.zeros(0, 3), torch.zeros(0, 6), plan.crow, plan.ccol)
    assert torch.equal(got, torch.zeros(2))


def test_same_bits_on_every_instruction_set_and_thread_count():
    """Lanes, the chunk sum's tree, the token blocks and their order are fixed: AVX2 == portable C++
    bit for bit, and 1 thread == 2 threads."""
    op = sampled_product()
    n, out, in_ = 600, 64, 96                     # two token blocks of at least 256 tokens: two tasks
    plan = S.shira_plan(positions(out, in_, 2048, seed=40), out, in_)
    before = torch.get_num_threads()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        dy, x = randn(n, out, dtype=dtype, seed=41), randn(n, in_, dtype=dtype, seed=42)
        results = []
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                results += [op(dy, x, plan.crow, plan.ccol, 0, isa) for isa in torch.ops.fastadapt_cpu.sampled_product_isas()]
        finally:
            torch.set_num_threads(before)
        assert all(torch.equal(r, results[0]) for r in results[1:]), dtype
        assert_rel_close(results[0], reference(dy, x, plan.crow, plan.ccol), torch.float32)


def test_bad_plans_and_inputs_raise_naming_the_argument():
    op = sampled_product()
    dy, x = randn(4, 3, dtype=torch.float32, seed=50), randn(4, 5, dtype=torch.float32, seed=51)
    crow, ccol = torch.tensor([0, 1, 1, 2], dtype=torch.int32), torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="ccol"):
        op(dy, x, crow, torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        op(dy, x, torch.tensor([0, 2, 1, 2], dtype=torch.int32), ccol)
    with pytest.raises(ValueError, match="crow must have shape"):
        op(dy, x, crow[:3], ccol)
    with pytest.raises(ValueError, match="crow must run from 0"):
        op(dy, x, torch.tensor([0, 1, 1, 3], dtype=torch.int32), ccol)
    with pytest.raises(TypeError, match="int32"):
        op(dy, x, crow.long(), ccol)
    with pytest.raises(TypeError, match="must match"):
        op(dy.double(), x, crow, ccol)
    with pytest.raises(ValueError, match="isa"):
        op(dy, x, crow, ccol, 0, "sse9")
    with pytest.raises(ValueError, match="chunk_tokens"):
        op(dy, x, crow, ccol, -1)


def _backward_args(dtype, seed):
    n, out, in_ = 33, 12, 17
    plan = S.shira_plan(positions(out, in_, 29, seed), out, in_)
    dy, x = randn(n, out, dtype=dtype, seed=seed + 1), randn(n, in_, dtype=dtype, seed=seed + 2)
    weight = randn(out, in_, dtype=dtype, scale=0.3, seed=seed + 3)
    shira_weight = randn(29, dtype=torch.float32 if dtype != torch.float64 else dtype, seed=seed + 4)
    return (dy, x, weight, shira_weight, 0.75, *plan, [True, True, True])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
def test_shira_backward_registers_cpp_and_picks_it_on_cpu(dtype, monkeypatch):
    """The choice is the registration's: "cpp" is a backend of shira_linear_backward, select picks it
    for CPU tensors; dw equals the float64 reference and the torch path's, dx and db are the same
    tensors as the torch path's."""
    sampled_product()
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    op = S.shira_linear_backward_op
    assert "cpp" in op.backends
    assert backend.select(op.name, torch.device("cpu"), op.backends) == "cpp"
    args = _backward_args(dtype, seed=60)
    dx, db, dw = op.implementations["cpp"](*args)
    dx_t, db_t, dw_t = op.implementations["torch"](*args)
    assert torch.equal(dx, dx_t) and torch.equal(db, db_t) and dw.dtype == dw_t.dtype
    dy, x, _, _, scaling, crow, ccol, order, _ = args
    expected = torch.empty(ccol.numel(), dtype=torch.float64).index_copy_(
        0, order.long(), reference(dy, x, crow, ccol) * scaling)
    assert_rel_close(dw, expected, acc_tolerance(dtype), name="dw (cpp)")
    assert_rel_close(dw_t, expected, acc_tolerance(dtype), name="dw (torch)")


def test_without_a_compiler_the_shira_gradient_runs_the_torch_path_with_one_warning(without_compiler):
    """A failing build leaves SHiRA's backward on sampled_addmm, with one warning for the process."""
    args = _backward_args(torch.float32, seed=70)
    op = S.shira_linear_backward_op
    with pytest.warns(UserWarning, match="could not be built") as record:
        first = op(*args)
    assert len([w for w in record if "could not be built" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = op(*args)
    expected = op.implementations["torch"](*args)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(first, second, expected))
