"""RoAd's rotation passes as C++ CPU ops (csrc/road.cpp, torch.ops.fastadapt_cpu.road_rotate /
road_rotate_backward), the "cpp" backend of fastadapt::road_rotate, road_rotate_backward, road_linear
and road_linear_backward: the torch path's bits where ATen's arithmetic is known (x86-64: fused
multiply-adds under its AVX2 / AVX512 kernels, plain ones under DEFAULT), every kernel against
float64 on odd shapes, non-contiguous views and every dtype, results independent of the thread
count, gradients through the registered ops, bad input, and the torch path without a compiler."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from fastadapt import _cpp
from fastadapt.numerics import assert_rel_close
from fastadapt.ops import butterfly as ops
from fastadapt.testing import noncontig, randn

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# (rows, out, group_size): one row; fewer rows than a step; several 4-row steps with a ragged last
# one (the tests that patch the step to 4); more rows than the 128-row step; half = 1 and 150.
SHAPES = [(1, 8, 2), (7, 12, 6), (23, 24, 8), (129, 64, 16), (300, 300, 300)]
FUSED_CAPABILITIES = ("AVX2", "AVX512")   # ATen's kernels built with FMA (addcmul fused)


def road_ops():
    """torch.ops.fastadapt_cpu; skips where this machine cannot build csrc/."""
    if _cpp.extension() is None:
        pytest.skip("csrc/ could not be built here (no C++ compiler or ninja): only the torch path runs")
    return torch.ops.fastadapt_cpu


def acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def inputs(rows, out, dtype, seed):
    """(dy, h, f, g): activations in ``dtype``, coefficients in its accumulation dtype."""
    return (randn(rows, out, seed=seed).to(dtype), randn(rows, out, seed=seed + 1).to(dtype),
            randn(out, seed=seed + 2).to(acc(dtype)), randn(out, seed=seed + 3).to(acc(dtype)))


def reference(dy, h, f, g, group_size):
    """float64 [y, dh, df, dg] of y = h R^T, from the inputs as given (half inputs exactly widened)."""
    h64 = h.double().requires_grad_()
    f64, g64 = f.double().requires_grad_(), g.double().requires_grad_()
    half = group_size // 2
    hv, fv, gv = h64.unflatten(1, (-1, 2, half)), f64.view(-1, 2, half), g64.view(-1, 2, half)
    y = torch.stack([fv[:, 0] * hv[:, :, 0] - gv[:, 0] * hv[:, :, 1],
                     fv[:, 1] * hv[:, :, 1] + gv[:, 1] * hv[:, :, 0]], 2).flatten(1)
    return [y.detach(), *torch.autograd.grad(y, [h64, f64, g64], dy.double())]


def torch_path_fuses() -> bool:
    return torch.backends.cpu.get_cpu_capability() in FUSED_CAPABILITIES


def run_kernel(road, kernel, dy, h, f, g, group_size):
    """[y, dh, df, dg] from one csrc/ kernel ("" = the torch path's arithmetic)."""
    y = road.road_rotate(h, f, g, group_size, kernel)
    return [y, *road.road_rotate_backward(dy, h, f, g, group_size, True, ops._ROAD_ROWS, kernel)]


def run_torch_path(dy, h, f, g, group_size):
    return [ops._road_torch(h, f, g, group_size), *ops._road_backward_torch(dy, h, f, g, group_size, True)]


def assert_same_bits(got, expected, names=("y", "dh", "df", "dg")):
    for name, a, e in zip(names, got, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert torch.equal(a, e), f"{name}: not the same bits (max difference {(a - e).abs().max().item():.3e})"


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64",
                    reason="the torch path's rounding is known on x86-64 only (ATen's capability builds)")
@pytest.mark.parametrize("step", [4, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_same_bits_as_the_torch_path(shape, dtype, step, monkeypatch):
    """kernel "" and every kernel of the same arithmetic (fused or plain, as ATen's capability)
    against _road_torch / _road_backward_torch, over 4-row steps and the default 128."""
    road = road_ops()
    monkeypatch.setattr(ops, "_ROAD_ROWS", step)
    rows, out, group_size = shape
    args = inputs(rows, out, dtype, seed=10 * SHAPES.index(shape) + DTYPES.index(dtype))
    expected = run_torch_path(*args, group_size)
    same_arithmetic = [k for k in road.road_kernels() if (k != "plain") == torch_path_fuses()]
    for kernel in ["", *same_arithmetic]:
        assert_same_bits(run_kernel(road, kernel, *args, group_size), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_kernel_against_float64(shape, dtype):
    """Outputs in h's dtype (dh) and the accumulation dtype (df, dg), errors within the table's."""
    road = road_ops()
    rows, out, group_size = shape
    dy, h, f, g = inputs(rows, out, dtype, seed=100 + 10 * SHAPES.index(shape) + DTYPES.index(dtype))
    expected = reference(dy, h, f, g, group_size)
    for kernel in road.road_kernels():
        y, dh, df, dg = run_kernel(road, kernel, dy, h, f, g, group_size)
        assert y.dtype == dh.dtype == dtype and df.dtype == dg.dtype == acc(dtype)
        for name, a, e, tol in (("y", y, expected[0], dtype), ("dh", dh, expected[1], dtype),
                                ("df", df, expected[2], acc(dtype)), ("dg", dg, expected[3], acc(dtype))):
            assert_rel_close(a, e, tol, name=f"{kernel} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_views(dtype):
    """Every-other-column h and dy (made contiguous inside), row-sliced views (row stride 2 out)
    and a transposed buffer: the same bits as on contiguous copies, and the torch path's."""
    road = road_ops()
    rows, out, group_size = 37, 24, 6
    dy, h, f, g = inputs(rows, out, dtype, seed=300)
    expected = run_kernel(road, "", dy, h, f, g, group_size)
    wide_dy, wide_h = randn(2 * rows, out, seed=304).to(dtype), randn(2 * rows, out, seed=305).to(dtype)
    wide_dy[1::2], wide_h[::2] = dy, h
    for dy_view, h_view in [(noncontig(dy), noncontig(h)), (wide_dy[1::2], wide_h[::2]),
                            (dy.T.contiguous().T, h.T.contiguous().T)]:
        assert not dy_view.is_contiguous() and not h_view.is_contiguous()
        assert_same_bits(run_kernel(road, "", dy_view, h_view, f, g, group_size), expected)
        if torch_path_fuses():
            assert_same_bits(run_torch_path(dy_view, h_view, f, g, group_size), expected)


def test_results_do_not_depend_on_the_thread_count():
    road = road_ops()
    args = inputs(517, 96, torch.float32, seed=400)   # 5 residue blocks of 16 rows per 128-row step
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run_kernel(road, "", *args, 12))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert_same_bits(other, results[0])


def test_without_need_h_dh_is_empty_and_df_dg_unchanged():
    road = road_ops()
    dy, h, f, g = inputs(41, 16, torch.float32, seed=500)
    dh, df, dg = road.road_rotate_backward(dy, h, f, g, 4, True)
    none, df2, dg2 = road.road_rotate_backward(dy, h, f, g, 4, False)
    assert none.numel() == 0 and dh.shape == h.shape
    assert_same_bits([df2, dg2], [df, dg], names=("df", "dg"))
    empty = road.road_rotate_backward(dy[:0], h[:0], f, g, 4, True)
    assert empty[0].shape == (0, 16) and not empty[1].any() and not empty[2].any()
    assert road.road_rotate(h[:0], f, g, 4).shape == (0, 16)


@pytest.mark.parametrize("rows", [7, 13])   # 7 < 10 in_features: dh formed by the C++ pass; 13: R W
def test_ops_run_cpp_and_their_gradients_check_in_float64(rows, monkeypatch):
    """FASTADAPT_BACKEND=cpp: road_rotate's and road_linear's gradients by gradcheck (float64, the
    step patched to 3 rows so the C++ partials span several steps), strided x and h; each op's
    cpp implementation is the one that ran."""
    road_ops()
    monkeypatch.setenv("FASTADAPT_BACKEND", "cpp")
    monkeypatch.setattr(ops, "_ROAD_ROWS", 3)
    calls = []
    for op in (ops.road_rotate_op, ops.road_rotate_backward_op, ops.road_linear_op, ops.road_linear_backward_op):
        monkeypatch.setitem(op.implementations, "cpp", _counted(op.name, op.implementations["cpp"], calls))
    x = noncontig(randn(rows, 10, seed=1)).requires_grad_()
    W, b = randn(12, 10, seed=2, requires_grad=True), randn(12, seed=3, requires_grad=True)
    f, g = randn(12, seed=4, requires_grad=True), randn(12, seed=5, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, W, b, f, g: ops.road_linear_op(x, W, b, f, g, 4)[0], (x, W, b, f, g))
    h = noncontig(randn(rows, 12, seed=6)).requires_grad_()
    assert torch.autograd.gradcheck(lambda h, f, g: ops.road_rotate(h, f, g, 6), (h, f, g))
    assert set(calls) == {"road_rotate", "road_rotate_backward", "road_linear", "road_linear_backward"}


def _counted(name, implementation, calls):
    def run(*args):
        calls.append(name)
        return implementation(*args)
    return run


@pytest.mark.parametrize("rows", [7, 13])
def test_cpp_backend_gives_the_torch_backends_layer_output_and_gradients(rows, monkeypatch):
    """PEFT's RoAd layer function (road_2, float32, x and every parameter trainable) under
    FASTADAPT_BACKEND=cpp and =torch: the same output and gradients, bit for bit where ATen's
    arithmetic is fused (x86-64 AVX2 / AVX512), within float32's tolerance everywhere."""
    road_ops()
    x = noncontig(randn(rows, 10, dtype=torch.float32, seed=11))
    params = [randn(12, dtype=torch.float32, seed=12), 1 + randn(12, dtype=torch.float32, seed=13),
              randn(12, 10, dtype=torch.float32, seed=14), randn(12, dtype=torch.float32, seed=15)]
    dy = randn(rows, 12, dtype=torch.float32, seed=16)
    results = {}
    for backend in ("torch", "cpp"):
        monkeypatch.setenv("FASTADAPT_BACKEND", backend)
        leaves = [x.detach().requires_grad_()] + [p.detach().requires_grad_() for p in params]
        y = ops.road_linear(leaves[0], "road_2", 4, *leaves[1:])
        results[backend] = [y, *torch.autograd.grad(y, leaves, dy)]
    names = ("y", "dx", "dtheta", "dalpha", "dW", "db")
    if torch_path_fuses():
        assert_same_bits(results["cpp"], results["torch"], names=names)
    for name, a, e in zip(names, results["cpp"], results["torch"]):
        assert_rel_close(a, e.double(), torch.float32, name=name)


def test_bad_input_raises_naming_the_parameter():
    road = road_ops()
    dy, h, f, g = inputs(5, 12, torch.float32, seed=600)
    with pytest.raises(ValueError, match="group_size=5 must be even"):
        road.road_rotate(h, f, g, 5)
    with pytest.raises(TypeError, match="f has dtype Double; for h in Float pass it in Float"):
        road.road_rotate(h, f.double(), g, 6)
    with pytest.raises(ValueError, match="g must have shape"):
        road.road_rotate(h, f, g[:6], 6)
    with pytest.raises(ValueError, match="kernel=avx9 is not available on this CPU; valid choices"):
        road.road_rotate(h, f, g, 6, "avx9")
    with pytest.raises(ValueError, match="step_rows=0 must be positive"):
        road.road_rotate_backward(dy, h, f, g, 6, False, 0)
    with pytest.raises(TypeError, match="grad has dtype BFloat16 but h has Float"):
        road.road_rotate_backward(dy.bfloat16(), h, f, g, 6, False)


def test_mixed_dtypes_the_op_takes_run_the_torch_path(monkeypatch):
    """The registered op takes any f, g dtype; the C++ op only h's accumulation dtype: the cpp
    backend hands other mixes to the torch path instead of raising."""
    road_ops()
    monkeypatch.setenv("FASTADAPT_BACKEND", "cpp")
    dy, h, f, g = inputs(9, 12, torch.float32, seed=700)
    y = ops.road_rotate_op(h, f.double(), g.double(), 6)
    assert torch.equal(y, ops._road_torch(h, f.double(), g.double(), 6))
    got = ops.road_rotate_backward_op(dy, h, f.double(), g.double(), 6, True)
    assert_same_bits(got, ops._road_backward_torch(dy, h, f.double(), g.double(), 6, True), names=("dh", "df", "dg"))


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64",
                    reason="ATEN_CPU_CAPABILITY=default selects ATen's unfused kernels on x86-64")
def test_same_bits_as_atens_default_capability_kernels():
    """Under ATEN_CPU_CAPABILITY=default ATen's addcmul rounds the product first: kernel "" picks
    the plain kernel and still gives the torch path's bits (a fresh process: the capability is
    read once)."""
    road_ops()
    script = (
        "import torch\n"
        "from fastadapt import _cpp\n"
        "from fastadapt.ops import butterfly as ops\n"
        "from fastadapt.testing import randn\n"
        "assert _cpp.extension() is not None\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'\n"
        "for dtype in (torch.float32, torch.float64, torch.bfloat16):\n"
        "    a = torch.float64 if dtype == torch.float64 else torch.float32\n"
        "    dy, h = randn(300, 96, seed=1).to(dtype), randn(300, 96, seed=2).to(dtype)\n"
        "    f, g = randn(96, seed=3).to(a), randn(96, seed=4).to(a)\n"
        "    got = [torch.ops.fastadapt_cpu.road_rotate(h, f, g, 32),\n"
        "           *torch.ops.fastadapt_cpu.road_rotate_backward(dy, h, f, g, 32, True)]\n"
        "    want = [ops._road_torch(h, f, g, 32), *ops._road_backward_torch(dy, h, f, g, 32, True)]\n"
        "    assert all(torch.equal(x, y) for x, y in zip(got, want)), dtype\n"
        "print('ok')\n")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_without_a_compiler_the_road_ops_run_the_torch_path_with_one_warning(without_compiler):
    dy, h, f, g = inputs(9, 12, torch.float32, seed=800)
    x, W = randn(9, 10, dtype=torch.float32, seed=801), randn(12, 10, dtype=torch.float32, seed=802)
    with pytest.warns(UserWarning, match="could not be built") as record:
        y = ops.road_rotate_op(h, f, g, 6)
    assert len([w for w in record if "could not be built" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = ops.road_rotate_backward_op(dy, h, f, g, 6, True)
        y_linear, h_linear = ops.road_linear_op(x, W, None, f, g, 6)
    assert torch.equal(y, ops._road_torch(h, f, g, 6))
    assert_same_bits(back, ops._road_backward_torch(dy, h, f, g, 6, True), names=("dh", "df", "dg"))
    assert torch.equal(y_linear, ops._road_torch(F.linear(x, W), f, g, 6))
