"""The shared dropout module (fastadapt.ops.dropout): one Philox mask, the same bits from the C++
op (every instruction set this CPU has), the pure-torch Philox and the Triton kernels
(interpreter on CPU); the mask's distribution and scaling; gradients regenerated from the seed;
the build-failure fallback; nn.Dropout's stream packed to one bit per element."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from fastadapt import _cpp, backend
from fastadapt.ops import dropout as D
from fastadapt.testing import randn

SEEDS = (0, 1, 2 ** 31 - 2, 0x5DEECE66D_1234567)   # the last above 2^62: both key words non-zero
PS = (0.1, 0.5, 0.9)
SHAPES = [(n, d) for n in (1, 9, 64) for d in (1, 3, 5, 41, 341)]
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The Triton interpreter (CPU) has no bf16 arithmetic; compiled kernels on a GPU test it too.
TRITON_DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if torch.cuda.is_available() else ())


def ext():
    """The compiled csrc/ module; skips where this machine cannot build it."""
    module = _cpp.extension()
    if module is None:
        pytest.skip("csrc/ could not be built here (no C++ compiler or ninja): only the torch path runs")
    return module


def seed_tensor(seed: int) -> torch.Tensor:
    return torch.tensor(seed, dtype=torch.int64)


def run(op, backend_name: str, *args):
    """One implementation of ``op`` called directly (the registration's choice is tested apart)."""
    if backend_name == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
    return op.implementations[backend_name](*args)


@pytest.mark.parametrize("seed", SEEDS)
def test_uniforms_of_every_cpp_instruction_set_equal_the_torch_philox(seed):
    """u_ij (float32, bit for bit) from AVX-512 / AVX2 / portable C++ and from the int64-emulated
    torch Philox, over odd shapes (partial groups of 4 at each row end) and tiles wider than one
    kernel tile (d = 2100 > 1024 columns)."""
    module = ext()
    for n, d in SHAPES + [(3, 2100)]:
        expected = D.philox_uniform(n, d, seed)
        assert expected.shape == (n, d) and float(expected.min()) >= 0.0 and float(expected.max()) < 1.0
        for isa in module.philox_isas():
            assert torch.equal(module.philox_uniform(n, d, seed, isa), expected), (isa, n, d)


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_calls_past_two_to_the_32(seed):
    """Calls q >= 2^32 (rows * ceil(d / 4) >= 2^32) carry q's high word into the counter: every C++
    instruction set agrees with the torch Philox across q = 2^32, and those calls differ from the
    calls q mod 2^32."""
    module = ext()
    first_row = 2 ** 31 - 2  # d = 8: two calls per row, q = 2^32 - 4 .. 2^32 + 3
    expected = D.philox_uniform(4, 8, seed, first_row=first_row)
    for isa in module.philox_isas():
        assert torch.equal(module.philox_uniform(4, 8, seed, isa, first_row), expected), isa
    assert not torch.equal(expected[2:], D.philox_uniform(2, 8, seed))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_cpp_and_torch_give_the_same_bits(dtype, seed):
    """x_d, (x_d, x - x_d) and out += mask o inner: the C++ op and the torch Philox agree bit for
    bit in every dtype (float32 arithmetic, float64 in float64), every shape and p."""
    ext()
    s = seed_tensor(seed)
    for i, (n, d) in enumerate(SHAPES):
        x = randn(n, d, dtype=dtype, seed=100 + i)
        inner = randn(n, d, dtype=dtype, seed=200 + i)
        for p in PS:
            x_d = run(D.philox_dropout, "torch", x, s, p)
            assert torch.equal(run(D.philox_dropout, "cpp", x, s, p), x_d), (n, d, p)
            pair = run(D.philox_dropout_with_rest, "torch", x, s, p)
            assert torch.equal(pair[0], x_d)
            for a, b in zip(run(D.philox_dropout_with_rest, "cpp", x, s, p), pair):
                assert torch.equal(a, b), (n, d, p)
            outs = [randn(n, d, dtype=dtype, seed=300 + i) for _ in range(2)]
            run(D.philox_mask_add_, "torch", outs[0], inner, s, p)
            run(D.philox_mask_add_, "cpp", outs[1], inner, s, p)
            assert torch.equal(outs[0], outs[1]), (n, d, p)


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("seed, p", list(zip(SEEDS, PS + PS[:1])))
def test_triton_gives_the_same_bits_as_cpp_and_torch(device, dtype, seed, p):
    """The Triton kernels (compiled on a GPU, the interpreter on CPU) against the torch Philox on
    CPU (and so the C++ op, tested equal to it above): x_d, x - x_d and the in-place mask add,
    every shape."""
    s = seed_tensor(seed)
    for i, (n, d) in enumerate(SHAPES):
        x = randn(n, d, dtype=dtype, seed=400 + i)
        pair = run(D.philox_dropout_with_rest, "torch", x, s, p)
        for a, b in zip(run(D.philox_dropout_with_rest, "triton", x.to(device), s, p), pair):
            assert torch.equal(a.cpu(), b), (n, d)
        if d in (5, 341):  # the mask-add kernel on a partial and a multi-tile row
            inner = randn(n, d, dtype=dtype, seed=500 + i)
            out = randn(n, d, dtype=dtype, seed=600 + i)
            out_dev = out.to(device)
            run(D.philox_mask_add_, "torch", out, inner, s, p)
            run(D.philox_mask_add_, "triton", out_dev, inner.to(device), s, p)
            assert torch.equal(out_dev.cpu(), out), (n, d)
    x = randn(9, 41, dtype=dtype, seed=700)
    assert torch.equal(run(D.philox_dropout, "triton", x.to(device), s, p).cpu(),
                       run(D.philox_dropout, "torch", x, s, p))


def strided_views(dtype, device="cpu"):
    """(view, its contiguous copy): transposed, column-sliced, a 3-D view whose leading dims do not
    flatten to one stride (its rows need a divmod per row), and a 1-D tensor (one row)."""
    base = randn(12, 2, 41, dtype=dtype, seed=800).to(device)
    views = [randn(41, 9, dtype=dtype, seed=801).to(device).T, randn(9, 83, dtype=dtype, seed=802).to(device)[:, 1::2],
             base.permute(1, 0, 2)[:, ::3], randn(7, dtype=dtype, seed=803).to(device)]
    return [(v, v.contiguous()) for v in views]


@pytest.mark.parametrize("backend_name", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mask_depends_on_the_logical_index_only(device, backend_name, dtype):
    """Strided, transposed and non-flattenable views give the mask of their contiguous copy (also
    for the in-place add into a strided out); leading dims flatten to rows."""
    if backend_name == "cpp":
        ext()
    dev = device if backend_name == "triton" else "cpu"
    s = seed_tensor(2 ** 40 + 3)
    for view, copy in strided_views(dtype, dev):
        assert torch.equal(run(D.philox_dropout, backend_name, view, s, 0.3).cpu(),
                           run(D.philox_dropout, "torch", copy.cpu(), s, 0.3)), tuple(view.shape)
        out = randn(*reversed(view.shape), dtype=dtype, seed=804).to(dev).transpose(0, -1) if view.dim() > 1 \
            else randn(*view.shape, dtype=dtype, seed=804).to(dev)
        out_copy = out.cpu().contiguous()
        run(D.philox_mask_add_, backend_name, out, view, s, 0.3)
        run(D.philox_mask_add_, "torch", out_copy, copy.cpu(), s, 0.3)
        assert torch.equal(out.cpu(), out_copy), tuple(view.shape)
    x3 = randn(3, 5, 41, dtype=dtype, seed=806)
    assert torch.equal(run(D.philox_dropout, backend_name, x3.to(dev), s, 0.3).cpu().view(15, 41),
                       run(D.philox_dropout, "torch", x3.view(15, 41), s, 0.3))


@pytest.mark.parametrize("p", PS)
def test_keep_fraction_and_scale(p):
    """1 - p of the elements kept (within 4 binomial sigma), each lane of a Philox call and each
    seed drawing its own mask, kept values exactly x * float32(1 / (1 - p))."""
    n, d = 129, 257
    x = torch.ones(n, d)
    masks = [D.philox_dropout(x, seed_tensor(seed), p) for seed in SEEDS]
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    for mask in masks:
        assert set(mask.unique().tolist()) <= {0.0, float(scale)}
        kept = float((mask != 0).double().mean())
        assert abs(kept - (1 - p)) < 4 * (p * (1 - p) / mask.numel()) ** 0.5
        lanes = [mask[:, c:256:4] for c in range(4)]
        assert all(not torch.equal(lanes[0], other) for other in lanes[1:])
    assert all(not torch.equal(masks[0], other) for other in masks[1:])


def test_with_rest_and_mask_add_arithmetic():
    """x - x_d taken in float32 before rounding to half; out += mask o inner with a float32 inner
    on a half out (converted on load, one rounding at the store)."""
    s = seed_tensor(77)
    x = randn(9, 41, dtype=torch.float16, seed=900)
    keep = D.philox_uniform(9, 41, 77) >= torch.tensor(0.3, dtype=torch.float32)
    scale = torch.tensor(1 / 0.7, dtype=torch.float32)
    x_d32 = torch.where(keep, x.float() * scale, torch.zeros(()))
    x_d, rest = D.philox_dropout_with_rest(x, s, 0.3)
    assert torch.equal(x_d, x_d32.half()) and torch.equal(rest, (x.float() - x_d32).half())
    out = randn(9, 41, dtype=torch.float16, seed=901)
    inner = randn(9, 41, dtype=torch.float32, seed=902)
    expected = (out.float() + torch.where(keep, inner * scale, torch.zeros(()))).half()
    D.philox_mask_add_(out, inner, s, 0.3)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend_name", ["torch", "cpp"])
def test_gradients(monkeypatch, backend_name):
    """float64 gradcheck (and gradgradcheck: the backward is the same op) of both differentiable
    ops; the gradient is mask o dy with the mask regenerated from the seed."""
    if backend_name == "cpp":
        ext()
    monkeypatch.setenv(backend.ENV_VAR, backend_name)
    s = seed_tensor(2 ** 62 + 1)
    x = randn(5, 9, dtype=torch.float64, requires_grad=True, seed=1000)
    xt = randn(9, 5, dtype=torch.float64, seed=1001).T.requires_grad_()
    for inp in (x, xt):
        assert torch.autograd.gradcheck(lambda t: D.philox_dropout(t, s, 0.4), (inp,))
        assert torch.autograd.gradcheck(lambda t: D.philox_dropout_with_rest(t, s, 0.4), (inp,))
    assert torch.autograd.gradgradcheck(lambda t: D.philox_dropout(t, s, 0.4), (x,))
    dy = randn(5, 9, dtype=torch.float64, seed=1002)
    (dx,) = torch.autograd.grad(D.philox_dropout(x, s, 0.4), x, dy)
    assert torch.equal(dx, D.philox_dropout(dy, s, 0.4))


def test_cpu_default_runs_cpp_and_forcing_works(monkeypatch):
    """Unforced on CPU the registration picks the C++ op (csrc/ built on first use); FASTADAPT_BACKEND
    still forces torch."""
    ext()
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.select("philox_dropout", torch.device("cpu"), D.philox_dropout.backends) == "cpp"
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    assert backend.select("philox_dropout", torch.device("cpu"), D.philox_dropout.backends) == "torch"


def test_without_a_compiler_the_torch_path_runs_with_one_warning(without_compiler):
    """A failing build (no compiler) leaves the ops working on the torch Philox (same bits), with
    one warning for the whole process, not one per call."""
    x, s = randn(9, 41, dtype=torch.float32, seed=1100), seed_tensor(5)
    with pytest.warns(UserWarning, match="could not be built") as record:
        first = D.philox_dropout(x, s, 0.2)
    assert len([w for w in record if "could not be built" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = D.philox_dropout(x, s, 0.2)
    assert torch.equal(first, second)
    assert torch.equal(first, run(D.philox_dropout, "torch", x, s, 0.2))


def test_draw_seed_is_a_reproducible_int64_cpu_scalar():
    torch.manual_seed(3)
    first = [D.draw_seed() for _ in range(3)]
    torch.manual_seed(3)
    again = [D.draw_seed() for _ in range(3)]
    assert all(s.dtype == torch.int64 and s.device.type == "cpu" and s.dim() == 0 for s in first)
    assert [int(s) for s in first] == [int(s) for s in again]
    assert len({int(s) for s in first}) == 3 and all(0 <= int(s) < 2 ** 63 for s in first)


def test_compiles_without_graph_breaks():
    """draw_seed and the ops inside torch.compile: one graph (the seed is a tensor, no .item())."""
    x = randn(8, 12, dtype=torch.float32, requires_grad=True, seed=1200)

    def f(x):
        seed = D.draw_seed()
        x_d, rest = D.philox_dropout_with_rest(x, seed, 0.25)
        return (D.philox_dropout(x, seed, 0.25) * x_d + rest).sum()

    assert torch._dynamo.explain(f)(x).graph_break_count == 0


@pytest.mark.parametrize("bad, error, match", [
    (dict(p=0.0), ValueError, r"p=0(\.0)? must be in"),
    (dict(p=1.0), ValueError, r"p=1(\.0)? must be in"),
    (dict(x=torch.ones(3, 4, dtype=torch.int32)), TypeError, "x has dtype torch.int32"),
    (dict(x=torch.ones(())), ValueError, "0-dimensional"),
    (dict(seed=torch.tensor(5, dtype=torch.int32)), ValueError, "int64 CPU scalar"),
    (dict(seed=torch.tensor(-1)), ValueError, "seed=-1"),
])
@pytest.mark.parametrize("backend_name", ["torch", "cpp"])
def test_bad_arguments_name_the_parameter(bad, error, match, backend_name):
    if backend_name == "cpp":
        ext()
    args = dict(x=torch.ones(3, 4), seed=seed_tensor(1), p=0.5)
    args.update(bad)
    with pytest.raises(error, match=match):
        run(D.philox_dropout, backend_name, args["x"], args["seed"], args["p"])


def test_mask_add_shape_mismatch_names_both():
    with pytest.raises(ValueError, match="inner has shape"):
        D.philox_mask_add_(torch.ones(3, 4), torch.ones(4, 3), seed_tensor(1), 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("numel", [40, 45])
def test_torch_stream_is_nn_dropouts_mask_packed_to_one_bit(dtype, numel):
    """draw_dropout draws F.dropout's mask from the default generator (the same for the same seed),
    packs it to ceil(numel / 8) bytes, and unpack_dropout gives it back bit for bit."""
    x = randn(numel, dtype=dtype, seed=1300).view(-1, 5)
    torch.manual_seed(21)
    mask, packed = D.draw_dropout(x, 0.3)
    torch.manual_seed(21)
    expected = F.dropout(torch.ones_like(x), 0.3, training=True)
    assert torch.equal(mask, expected)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-numel // 8)
    assert torch.equal(D.unpack_dropout(packed, x.shape, dtype, 0.3), mask)


@pytest.mark.parametrize("backend_name", ["torch", "cpp"])
def test_mask_add_refuses_an_out_that_overlaps_itself(backend_name):
    if backend_name == "cpp":
        ext()
    out = torch.zeros(1, 5).expand(4, 5)
    with pytest.raises((ValueError, RuntimeError), match="overlap|single memory location"):
        run(D.philox_mask_add_, backend_name, out, torch.ones(4, 5), seed_tensor(1), 0.5)
