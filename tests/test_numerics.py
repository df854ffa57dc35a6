"""The tolerance table, the error measure and the shared test helpers."""
import pytest
import torch

from fastadapt import _validate
from fastadapt.numerics import TOLERANCE, assert_rel_close, rel_error, tolerance
from fastadapt.testing import linear_model, noncontig, randn, randomize_


def test_tolerance_table_matches_design():
    assert TOLERANCE[torch.float32] == 1e-5
    assert TOLERANCE["tf32"] == 3e-4
    assert TOLERANCE[torch.float16] == 1e-3
    assert TOLERANCE[torch.bfloat16] == 1e-2
    assert tolerance(torch.float32, scale=4) == pytest.approx(4e-5)
    with pytest.raises(ValueError, match="dtype"):
        tolerance(torch.int32)


def test_rel_error_is_relative_frobenius():
    e = randn(7, 5)
    a = e + 1e-3 * e.norm() / 5 ** 0.5 / 7 ** 0.5 * torch.ones(7, 5, dtype=torch.float64)
    expected = float((a - e).norm() / e.norm())
    assert rel_error(a, e) == pytest.approx(expected, rel=1e-12)
    assert rel_error(e, e) == 0.0
    assert rel_error(torch.ones(3), torch.zeros(3)) == pytest.approx(3 ** 0.5)


def test_assert_rel_close_fails_on_error_and_nan():
    e = randn(4, 4)
    assert_rel_close(e.float(), e)
    with pytest.raises(AssertionError, match="relative error"):
        assert_rel_close(e.float() * 1.001, e)
    bad = e.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(AssertionError):
        assert_rel_close(bad, e)
    with pytest.raises(ValueError, match="shape"):
        rel_error(e, e[:2])


def test_helpers_give_fresh_nonzero_data_and_noncontiguous_views():
    a, b = randn(3, 4), randn(3, 4)
    assert not torch.equal(a, b) and a.abs().min() > 0
    v = noncontig(a)
    assert not v.is_contiguous() and torch.equal(v, a)
    m = linear_model(5, 3, seed=0)
    randomize_(m, names=["weight"], seed=1)
    assert m[0].weight.abs().min() > 0 and m[0].weight.dtype == torch.float64


@pytest.mark.parametrize("call, match", [
    (lambda: _validate.rank(0, 8, 8), "r=0"),
    (lambda: _validate.rank(9, 8, 16), r"1\.\.8"),
    (lambda: _validate.divides("oft_block_size", 5, 24), r"\[4, 6\]"),
    (lambda: _validate.even("in_features", 7), "even"),
    (lambda: _validate.positive_int("r", 2.5), "positive integer"),
])
def test_validation_errors_name_parameter_and_valid_choice(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_tensor_checks_raise_type_and_value_errors():
    x = randn(2, 3)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        _validate.tensor("x", [1.0])
    with pytest.raises(TypeError, match="dtype"):
        _validate.tensor("x", torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="ndim=3"):
        _validate.tensor("x", x, ndim=3)
    with pytest.raises(TypeError, match="cast one"):
        _validate.same("x", x, "weight", x.float())
