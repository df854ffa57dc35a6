"""The custom-op convention (fastadapt.ops._registry): every op passes torch.library.opcheck on its
examples; backend choice, autocast and torch.compile behave as the convention promises."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from fastadapt.ops._registry import fused_op, import_all
from fastadapt.testing import randn

ALL_OPS = import_all()


# A toy op declared the way every family declares its ops: y = s x W^T, with a triton stand-in
# implementation that marks its output so the tests can see which implementation ran.
@fused_op("registry_test_scaled_matmul", autocast_keep=("w_keep",))
def _scaled_matmul(x: Tensor, w: Tensor, w_keep: Tensor, s: float) -> Tensor:
    return (x @ w.T) * s + w_keep.to(x.dtype).sum()


@_scaled_matmul.impl("triton")
def _(x, w, w_keep, s):
    return (x @ w.T) * s + w_keep.to(x.dtype).sum() + 1000.0


@_scaled_matmul.fake
def _(x, w, w_keep, s):
    return x.new_empty(x.shape[0], w.shape[0])


def _setup(ctx, inputs, output):
    x, w, _, s = inputs
    ctx.save_for_backward(x, w)
    ctx.s = s


def _backward(ctx, grad):
    x, w = ctx.saved_tensors
    return grad @ w * ctx.s, grad.T @ x * ctx.s, None, None


_scaled_matmul.autograd(_backward, _setup)


@_scaled_matmul.example
def _():
    yield (randn(5, 7, dtype=torch.float32, requires_grad=True, seed=1),
           randn(3, 7, dtype=torch.float32, requires_grad=True, seed=2), randn(2, dtype=torch.float32, seed=3), 0.5), {}


def _op_examples():
    ops = {**ALL_OPS, "registry_test_scaled_matmul": _scaled_matmul}
    for name, op in sorted(ops.items()):
        examples = op.examples()
        if not examples:
            yield pytest.param(op, None, None, id=f"{name}-no-examples")
        for i, (args, kwargs) in enumerate(examples):
            yield pytest.param(op, args, kwargs, id=f"{name}-{i}")


@pytest.mark.parametrize("op, args, kwargs", list(_op_examples()))
def test_every_op_passes_opcheck(op, args, kwargs):
    assert args is not None, f"{op} declares no examples (@op.example): opcheck cannot test it"
    torch.library.opcheck(op.custom_op, args, kwargs)


def test_backend_choice_lives_in_the_registration(monkeypatch):
    x, w, keep = randn(4, 6, dtype=torch.float32, seed=4), randn(3, 6, dtype=torch.float32, seed=5), torch.zeros(2)
    expected = (x @ w.T) * 2.0
    monkeypatch.delenv("FASTADAPT_BACKEND", raising=False)
    torch.testing.assert_close(_scaled_matmul(x, w, keep, 2.0), expected)          # CPU -> torch
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    torch.testing.assert_close(_scaled_matmul(x, w, keep, 2.0), expected + 1000.0)  # forced triton
    monkeypatch.setenv("FASTADAPT_BACKEND", "cpp")                                 # not implemented: warns
    with pytest.warns(UserWarning, match="not implemented"):
        torch.testing.assert_close(_scaled_matmul(x, w, keep, 2.0), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_to_the_current_autocast_dtype(dtype):
    x = randn(4, 6, dtype=torch.float32, requires_grad=True, seed=6)
    w = randn(3, 6, dtype=torch.float32, requires_grad=True, seed=7)
    keep = randn(2, dtype=torch.float64, seed=8)
    with torch.autocast("cpu", dtype=dtype):
        y = _scaled_matmul(x, w, keep, 2.0)
    assert y.dtype == dtype
    expected = (x.to(dtype) @ w.to(dtype).T).float() * 2.0 + keep.sum().float()
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32   # gradients in the leaves' dtype


def test_compiles_without_graph_breaks():
    x = randn(4, 6, dtype=torch.float32, requires_grad=True, seed=9)
    w = randn(3, 6, dtype=torch.float32, requires_grad=True, seed=10)
    keep = torch.zeros(2)

    def f(x, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _scaled_matmul(x, w, keep, 3.0).float().relu().sum()

    assert torch._dynamo.explain(f)(x, w).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(x, w)
    loss.backward()
    x_grad = x.grad.clone()
    x.grad = None
    f(x, w).backward()
    torch.testing.assert_close(x_grad, x.grad, rtol=1e-2, atol=1e-2)   # bf16 products, fused differently


def test_declaring_a_name_twice_raises():
    with pytest.raises(ValueError, match="declared twice"):
        fused_op("registry_test_scaled_matmul")(lambda x: x)
