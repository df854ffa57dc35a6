"""CLOVER reference (not in PEFT): at init the re-parameterised Q-K / V-O pairs reproduce the
original attention exactly, the factors are orthonormal, pruning is the best low-rank
approximation, the rewritten weights compute what forward computes, and bad inputs raise."""
import pytest
import torch

from fastadapt.numerics import assert_rel_close
from fastadapt.reference.clover import CLOVER, REFERENCES
from fastadapt.testing import noncontig, randn

F64 = torch.float64
H, HEAD_DIM, D_MODEL, D_OUT = 3, 5, 17, 11


def split_heads(t):
    """(..., T, H * head_dim) -> (..., H, T, head_dim)."""
    return t.unflatten(-1, (H, -1)).transpose(-2, -3)


def attention_logits(x, q_weight, k_weight, x_keys=None):
    q = split_heads(x @ q_weight.T)
    k = split_heads((x if x_keys is None else x_keys) @ k_weight.T)
    return q @ k.transpose(-1, -2)


def attention_output(x, probs, v_weight, o_weight):
    """o_proj(concat_h(P_h v_h)) for given attention probabilities P (..., H, T, T)."""
    mixed = probs @ split_heads(x @ v_weight.T)                    # (..., H, T, head_dim)
    return mixed.transpose(-2, -3).flatten(-2) @ o_weight.T


def random_s(clover):
    with torch.no_grad():
        clover.clover_S.add_(randn(*clover.clover_S.shape, scale=0.3))
    return clover


def test_qk_identity_at_init():
    q, k = randn(H * HEAD_DIM, D_MODEL), randn(H * HEAD_DIM, D_MODEL)
    clover = CLOVER(q, k, num_heads=H)
    x, x_keys = noncontig(randn(2, 7, D_MODEL)), randn(2, 4, D_MODEL)
    assert_rel_close(clover.bilinear(), clover.original_bilinear(), name="U S V^T vs Wq^T Wk")
    assert_rel_close(clover(x), attention_logits(x, q, k), name="self-attention logits")
    assert_rel_close(clover(x, x_keys), attention_logits(x, q, k, x_keys), name="cross-attention logits")


def test_vo_identity_at_init():
    v, o = randn(H * HEAD_DIM, D_MODEL), randn(D_OUT, H * HEAD_DIM)
    clover = CLOVER(v, o, num_heads=H, pair="vo")
    x = randn(2, 6, D_MODEL)
    probs = torch.softmax(randn(2, H, 6, 6), dim=-1)
    assert_rel_close(clover.bilinear(), clover.original_bilinear(), name="U S V^T vs Wv^T Wo^T")
    assert_rel_close((probs @ clover(x)).sum(dim=-3), attention_output(x, probs, v, o), name="attention output")


@pytest.mark.parametrize("pair,second_shape", [("qk", (H * HEAD_DIM, D_MODEL)), ("vo", (D_OUT, H * HEAD_DIM))])
def test_factors_are_orthonormal_and_singular_values_exact(pair, second_shape):
    clover = CLOVER(randn(H * HEAD_DIM, D_MODEL), randn(*second_shape), num_heads=H, pair=pair)
    eye = torch.eye(HEAD_DIM, dtype=F64).expand(H, -1, -1)
    assert_rel_close(clover.U.transpose(1, 2) @ clover.U, eye, name="U^T U")
    assert_rel_close(clover.V.transpose(1, 2) @ clover.V, eye, name="V^T V")
    expected = torch.linalg.svdvals(clover.original_bilinear())[:, :HEAD_DIM]   # SVD of the dense product
    assert_rel_close(clover.singular_values, expected, name="singular values")


@pytest.mark.parametrize("pair,second_shape", [("qk", (H * HEAD_DIM, D_MODEL)), ("vo", (D_OUT, H * HEAD_DIM))])
def test_adapted_weights_compute_forward(pair, second_shape):
    first, second = randn(H * HEAD_DIM, D_MODEL), randn(*second_shape)
    clover = random_s(CLOVER(first, second, num_heads=H, pair=pair, r=4))
    new_first, new_second = clover.adapted_weights()
    x = randn(3, 5, D_MODEL)
    if pair == "qk":
        assert new_first.shape == new_second.shape == (H * 4, D_MODEL)
        assert_rel_close(clover(x), attention_logits(x, new_first, new_second), name="logits from q', k'")
    else:
        assert new_first.shape == (H * 4, D_MODEL) and new_second.shape == (D_OUT, H * 4)
        probs = torch.softmax(randn(3, H, 5, 5), dim=-1)
        assert_rel_close((probs @ clover(x)).sum(dim=-3), attention_output(x, probs, new_first, new_second),
                         name="output from v', o'")


def test_pruning_is_best_low_rank_approximation():
    clover = CLOVER(randn(H * HEAD_DIM, D_MODEL), randn(H * HEAD_DIM, D_MODEL), num_heads=H, r=2)
    full = clover.original_bilinear()
    dropped = torch.linalg.svdvals(full)[:, 2:]
    residual = torch.linalg.matrix_norm(full - clover.bilinear())
    assert_rel_close(residual, torch.linalg.vector_norm(dropped, dim=-1), name="Eckart-Young residual")


def test_training_s_gives_full_rank_update():
    clover = random_s(CLOVER(randn(H * HEAD_DIM, D_MODEL), randn(H * HEAD_DIM, D_MODEL), num_heads=H))
    update = clover.bilinear() - clover.original_bilinear()
    assert torch.all(torch.linalg.matrix_rank(update) == HEAD_DIM)
    # ... and stays inside the head's orthogonal bases: U U^T dM V V^T = dM.
    projected = clover.U @ clover.U.transpose(1, 2) @ update @ clover.V @ clover.V.transpose(1, 2)
    assert_rel_close(projected, update, name="update in span(U) x span(V)")


def test_registered_demo():
    clover = REFERENCES["clover"].demo()
    assert clover.has_delta_weight is False and clover.U.dtype == F64
    assert clover(randn(2, 4, 10)).shape == (2, 3, 4, 4)


@pytest.mark.parametrize("make,parameter", [
    (lambda q: CLOVER(q, q, num_heads=4), "num_heads"),
    (lambda q: CLOVER(q, randn(12, 10), num_heads=3), "k_weight"),
    (lambda q: CLOVER(q, q, num_heads=3, r=0), "r"),
    (lambda q: CLOVER(q, q, num_heads=3, r=6), "r"),
    (lambda q: CLOVER(q, q, num_heads=3, pair="qv"), "pair"),
    (lambda q: CLOVER(q, randn(7, 14), num_heads=3, pair="vo"), "o_weight"),
    (lambda q: CLOVER(q, q.float(), num_heads=3), "dtype"),
])
def test_bad_configuration_names_parameter(make, parameter):
    q = randn(15, 9)    # 3 heads of 5, d_model 9
    with pytest.raises((ValueError, TypeError), match=parameter):
        make(q)
