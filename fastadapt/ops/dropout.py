"""Dropout masks for every adapter family: fastadapt's Philox stream, and nn.Dropout's own.

Philox stream (the default of fused calls).  For a tensor x of shape (..., d), read as N rows of d
elements (leading dims flattened, any strides), the element (i, j) belongs to the Philox call
q = i ceil(d / 4) + floor(j / 4) (int64, a logical index: the same for any strides) at lane
c = j mod 4::

    (r_0, r_1, r_2, r_3) = Philox4x32-10(key = seed, counter = (q mod 2^32, q div 2^32, 0, 0))
    u_ij    = uniform(r_c)            s = int32(r_c); s = ~s if s < 0; u = float32(s) * 4.6566127342e-10
    keep_ij = u_ij >= float32(p)      P(keep) = 1 - p
    mask_ij = keep_ij / (1 - p)       nn.Dropout's scaling, E[mask] = 1
    x_d     = where(keep, x * float32(1 / (1 - p)), 0)     (float32 arithmetic; float64 in float64)

This is ``triton.language.rand4x(seed, q)`` bit for bit, so the Triton kernels
(``fastadapt.triton_kernels.dropout``), the C++ CPU op (``csrc/dropout.cpp``, AVX-512 / AVX2) and
the pure-torch Philox here (:func:`philox_uniform`: uint32 arithmetic emulated in int64 tensors,
the readable reference and the CPU fallback without a compiler) give the same mask for the same
(seed, p, shape) on every device.  nn.Dropout's distribution and scaling, not its bits.

Why a seed instead of a stored mask: a mask costs bytes(x) (or bytes(x) / 32 packed) from forward
to backward; the seed costs 8 bytes and regenerating the mask is a few ALU operations per element
(10 rounds of two 32 x 32-bit products and four xors per 4 elements), cheaper than moving the
mask through memory on a GPU and about one memory pass on a CPU core (benchmarks/NOTES.md).
Backward regenerates it: for x_d = mask o x, dx = mask o dy.

The seed (:func:`draw_seed`) is an int64 CPU scalar tensor drawn from CPU's default generator:
reproducible under ``torch.manual_seed``, no device sync on any device, traceable by
torch.compile (a tensor, not a Python int).  Op implementations read it with ``int(seed)`` (a CPU
tensor: no device sync); nothing outside an op implementation may.

Ops (``fastadapt::<name>`` custom ops; x any floating dtype, any leading dims and strides; outputs
contiguous in x's dtype; p in (0, 1)):

    philox_dropout(x, seed, p) -> x_d                 dx = mask o dy (the mask regenerated)
    philox_dropout_with_rest(x, seed, p) -> (x_d, x - x_d)
                                                      one pass over x (DoRA corrects the base output
                                                      with x - x_d); dx = dy_r + mask o (dy_d - dy_r)
    philox_mask_add_(out, inner, seed, p) -> None     out += mask o inner in place (a backward's
                                                      dx term), inner in out's dtype or float32 on a
                                                      half out; no autograd (a building block)

Backends: "cpp" on CPU when the extension builds (else "torch" with one warning), "triton" on CUDA
(float64 runs torch: the kernels take float32 / float16 / bfloat16), "torch" anywhere.

nn.Dropout's stream (``accelerate(..., dropout="torch")``: bit-identity with PEFT on CPU).
:func:`draw_dropout` draws exactly the mask ``F.dropout`` would from the default generator and
packs it to 1 bit per element for backward; :func:`unpack_dropout` gives it back bit for bit.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ..testing import randn
from ._registry import fused_op

# ----------------------------------------------------------------------------------------------
# Seeds

SEED_HIGH = 2 ** 63 - 1  # seeds are in [0, SEED_HIGH): any int64 the Triton kernels and csrc/ take


def draw_seed() -> Tensor:
    """The seed of one Philox mask: an int64 CPU scalar tensor in [0, 2^63 - 1) from CPU's default
    generator (reproducible under ``torch.manual_seed``; no device sync; no ``.item()``, so
    torch.compile traces it)."""
    return torch.randint(0, SEED_HIGH, (), dtype=torch.int64, device="cpu")


def _seed_value(seed: Tensor) -> int:
    """``int(seed)`` for an op implementation, after checking it is an int64 CPU scalar in range."""
    if seed.device.type != "cpu" or seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"seed is a {seed.dtype} tensor of shape {tuple(seed.shape)} on {seed.device}; "
                         "pass an int64 CPU scalar, e.g. fastadapt.ops.dropout.draw_seed()")
    value = int(seed)
    if not 0 <= value < 2 ** 63:
        raise ValueError(f"seed={value} must be in [0, 2**63)")
    return value


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(name: str, t: Tensor, p: float) -> None:
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the dropout ops take float32, float16, bfloat16 or float64")
    if t.dim() == 0:
        raise ValueError(f"{name} is 0-dimensional; the dropout ops take (..., d) tensors")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p} must be in (0, 1), e.g. p=0.1")


# ----------------------------------------------------------------------------------------------
# Pure-torch Philox: uint32 arithmetic in int64 tensors (every intermediate below 2^49: no overflow)

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57       # multipliers
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85           # key increments per round
_ROUNDS = 10
_UNIFORM_SCALE = 4.6566127342e-10                 # rounded to float32 where used, as triton does
_CALLS_PER_CHUNK = 1 << 18                        # bounds the fallback's int64 temporaries (2 MB each)


def _mul_hi_lo(a: int, c: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo): the 32-bit halves of the 64-bit product a c, for a constant a < 2^32 and c in
    [0, 2^32).  With c = c_hi 2^16 + c_lo, a c = (a c_hi + (a c_lo >> 16)) 2^16 + (a c_lo mod 2^16);
    every intermediate stays below 2^49."""
    by_hi, by_lo = (c >> 16) * a, (c & 0xFFFF) * a
    hi = (by_hi + (by_lo >> 16)) >> 16
    lo = (((by_hi & 0xFFFF) << 16) + by_lo) & _MASK32
    return hi, lo


def _philox4x32(q: Tensor, seed: int) -> list[Tensor]:
    """The four uint32 outputs (in int64 tensors) of Philox4x32-10 for int64 counters q >= 0."""
    c0, c1 = q & _MASK32, q >> 32
    c2 = c3 = torch.zeros_like(q)
    k0, k1 = seed & _MASK32, seed >> 32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return [c0, c1, c2, c3]


def _uniform(r: Tensor) -> Tensor:
    """triton's uint_to_uniform_float: the int32 view s of r, ~s where negative, times the scale in
    float32 (s < 2^31 rounds to float32 to nearest, as the kernels' int -> float conversion does)."""
    s = torch.where(r >= 2 ** 31, r ^ _MASK32, r)
    return s.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def philox_uniform(rows: int, d: int, seed: int, device=None, *, first_row: int = 0) -> Tensor:
    """u (rows, d) float32: the uniform of every element of the module docstring for rows
    first_row .. first_row + rows of a (..., d) tensor, computed with torch tensor ops only (the
    reference; the CPU fallback of the ops)."""
    groups = (d + 3) // 4
    out = torch.empty(rows, 4 * groups, dtype=torch.float32, device=device)
    step = max(1, _CALLS_PER_CHUNK // max(groups, 1))
    for row0 in range(0, rows, step):
        row1 = min(rows, row0 + step)
        q = (torch.arange(first_row + row0, first_row + row1, device=device)[:, None] * groups
             + torch.arange(groups, device=device)[None, :])
        lanes = [_uniform(r) for r in _philox4x32(q, seed)]
        out[row0:row1] = torch.stack(lanes, dim=-1).view(row1 - row0, 4 * groups)
    return out[:, :d]


def _keep_scale(x: Tensor, seed: int, p: float) -> tuple[Tensor, Tensor, torch.dtype]:
    """(keep shaped like x, the kept-value scale as a 0-d tensor, the compute dtype)."""
    d = x.shape[-1]
    keep = philox_uniform(x.numel() // max(d, 1), d, seed, x.device) >= torch.tensor(p, dtype=torch.float32)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return keep.view(x.shape), torch.tensor(1.0 / (1.0 - p), dtype=compute, device=x.device), compute


def _dropped(x: Tensor, keep: Tensor, scale: Tensor, compute: torch.dtype) -> Tensor:
    return torch.where(keep, x.to(compute) * scale, torch.zeros((), dtype=compute, device=x.device))


# ----------------------------------------------------------------------------------------------
# philox_dropout: x_d = mask o x

@fused_op("philox_dropout", autocast=False)
def philox_dropout(x: Tensor, seed: Tensor, p: float) -> Tensor:
    """x_d = mask o x for the Philox mask of (seed, p) (module docstring), contiguous, x's dtype."""
    _check("x", x, p)
    keep, scale, compute = _keep_scale(x, _seed_value(seed), p)
    return _dropped(x, keep, scale, compute).to(x.dtype).contiguous()


@philox_dropout.impl("cpp")
def _(x, seed, p):
    from .. import _cpp
    _check("x", x, p)
    return _cpp.extension().seeded_dropout(x, _seed_value(seed), p, False)[0]


@philox_dropout.impl("triton")
def _(x, seed, p):
    if x.dtype == torch.float64 or x.numel() == 0:
        return philox_dropout.implementations["torch"](x, seed, p)
    from ..triton_kernels.dropout import seeded_dropout
    _check("x", x, p)
    return seeded_dropout(x.reshape(-1, x.shape[-1]), _seed_value(seed), p).view(x.shape)


@philox_dropout.fake
def _(x, seed, p):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _dropout_setup(ctx, inputs, output):
    _, seed, p = inputs
    ctx.save_for_backward(seed)
    ctx.p = p


def _dropout_backward(ctx, dy):
    (seed,) = ctx.saved_tensors
    return philox_dropout(dy, seed, ctx.p), None, None


philox_dropout.autograd(_dropout_backward, _dropout_setup)


def philox_compiled(device) -> bool:
    """Whether the Philox stream's masks on ``device`` come from compiled code (csrc/ on the CPU,
    Triton on CUDA) under the current backend choice, rather than the pure-torch fallback (on the
    CPU about 3x PEFT's own dropout cost: LoRA r=16 with dropout 0.1 at d=1024, N=2048 ran 3.9-4.5 x
    the frozen base against PEFT's 1.45-1.55)."""
    from ..backend import select
    return select("philox_dropout", torch.device(device), tuple(philox_dropout.implementations)) != "torch"


def _example_seeds() -> Iterator[Tensor]:
    yield torch.tensor(7, dtype=torch.int64)
    yield torch.tensor(2 ** 62 + 12345, dtype=torch.int64)


@philox_dropout.example
def _():
    for seed in _example_seeds():
        yield (randn(5, 7, dtype=torch.float32, requires_grad=True, seed=31), seed, 0.3), {}
    x = randn(3, 6, 10, dtype=torch.float64, seed=32)[:, ::2, 1:].requires_grad_()  # strided leading dims
    yield (x, torch.tensor(5, dtype=torch.int64), 0.5), {}


# ----------------------------------------------------------------------------------------------
# philox_dropout_with_rest: (x_d, x - x_d) in one pass

@fused_op("philox_dropout_with_rest", autocast=False)
def philox_dropout_with_rest(x: Tensor, seed: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """(x_d, x - x_d) for the Philox mask of (seed, p), both contiguous in x's dtype (the
    difference taken in the compute dtype before rounding)."""
    _check("x", x, p)
    keep, scale, compute = _keep_scale(x, _seed_value(seed), p)
    x_c = x.to(compute)
    x_d = _dropped(x_c, keep, scale, compute)
    return x_d.to(x.dtype).contiguous(), (x_c - x_d).to(x.dtype).contiguous()


@philox_dropout_with_rest.impl("cpp")
def _(x, seed, p):
    from .. import _cpp
    _check("x", x, p)
    x_d, rest = _cpp.extension().seeded_dropout(x, _seed_value(seed), p, True)
    return x_d, rest


@philox_dropout_with_rest.impl("triton")
def _(x, seed, p):
    if x.dtype == torch.float64 or x.numel() == 0:
        return philox_dropout_with_rest.implementations["torch"](x, seed, p)
    from ..triton_kernels.dropout import seeded_dropout
    _check("x", x, p)
    x_d, rest = seeded_dropout(x.reshape(-1, x.shape[-1]), _seed_value(seed), p, with_rest=True)
    return x_d.view(x.shape), rest.view(x.shape)


@philox_dropout_with_rest.fake
def _(x, seed, p):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


def _with_rest_backward(ctx, dy_d, dy_rest):
    (seed,) = ctx.saved_tensors
    return dy_rest + philox_dropout(dy_d - dy_rest, seed, ctx.p), None, None


philox_dropout_with_rest.autograd(_with_rest_backward, _dropout_setup)


@philox_dropout_with_rest.example
def _():
    for seed in _example_seeds():
        yield (randn(4, 9, dtype=torch.float32, requires_grad=True, seed=33), seed, 0.2), {}
    yield (randn(9, 5, dtype=torch.float64, seed=34).T.requires_grad_(), torch.tensor(3, dtype=torch.int64), 0.7), {}


# ----------------------------------------------------------------------------------------------
# philox_mask_add_: out += mask o inner

@fused_op("philox_mask_add_", mutates_args=("out",), autocast=False)
def philox_mask_add_(out: Tensor, inner: Tensor, seed: Tensor, p: float) -> None:
    """out += mask o inner in place for the Philox mask of (seed, p) and out's shape: arithmetic in
    float32 (float64 for a float64 out), stored in out's dtype.  inner: out's shape, out's dtype or
    float32 on a half out (converted as the kernels load it), any strides; out must not overlap
    itself or inner."""
    _check("out", out, p)
    _check("inner", inner, p)
    if inner.shape != out.shape:
        raise ValueError(f"inner has shape {tuple(inner.shape)} but out has shape {tuple(out.shape)}; they must match")
    keep, scale, compute = _keep_scale(out, _seed_value(seed), p)
    out.copy_(out.to(compute) + _dropped(inner, keep, scale, compute))


@philox_mask_add_.impl("cpp")
def _(out, inner, seed, p):
    from .. import _cpp
    _check("out", out, p)
    _check("inner", inner, p)
    _cpp.extension().dropout_mask_add_(out, inner, _seed_value(seed), p)


@philox_mask_add_.impl("triton")
def _(out, inner, seed, p):
    if out.dtype == torch.float64 or out.numel() == 0:
        return philox_mask_add_.implementations["torch"](out, inner, seed, p)
    from ..triton_kernels.dropout import dropout_mask_add_
    _check("out", out, p)
    d = out.shape[-1]
    try:
        rows = out.view(-1, d)  # a view: the kernel writes out itself
    except RuntimeError:        # leading dims that do not flatten to one stride: write through a copy
        rows = out.reshape(-1, d).clone()
        dropout_mask_add_(rows, inner.reshape(-1, d), _seed_value(seed), p)
        out.copy_(rows.view(out.shape))
        return None
    dropout_mask_add_(rows, inner.reshape(-1, d), _seed_value(seed), p)
    return None


@philox_mask_add_.fake
def _(out, inner, seed, p):
    return None


@philox_mask_add_.example
def _():
    yield (randn(4, 9, dtype=torch.float32, seed=35), randn(4, 9, dtype=torch.float32, seed=36),
           torch.tensor(11, dtype=torch.int64), 0.4), {}
    yield (randn(2, 3, 5, dtype=torch.float16, seed=37), randn(2, 3, 5, dtype=torch.float32, seed=38),
           torch.tensor(2 ** 40, dtype=torch.int64), 0.1), {}


# ----------------------------------------------------------------------------------------------
# nn.Dropout's own stream, kept as one bit per element

# Packing 8 mask bytes (each 0 or 1, little-endian in one int64) into one byte: byte i of v moves
# to bit 56 + i under v * sum_i 2^(56 - 7 i); every other partial product lands on a distinct bit
# outside 56..63 (8 i - 7 j = 8 i' - 7 j' forces i = i', j = j'), so no carry reaches those bits
# (the product wraps mod 2^64; >> 56 then the cast to uint8 keeps exactly bits 56..63).
_PACK_MAGIC = 0x0102040810204080
_UNPACK_TABLES: dict = {}


def _unpack_table(dtype: torch.dtype, device, p: float) -> Tensor:
    """(256, 8): row k holds the 8 mask values byte k encodes (0 or nn.Dropout's 1 / (1 - p))."""
    key = (dtype, device, p)
    if key not in _UNPACK_TABLES:
        keep_value = torch.ones(1, dtype=dtype, device=device).div_(1 - p)  # bit-equal to F.dropout's
        bits = (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
        _UNPACK_TABLES[key] = bits.to(dtype) * keep_value
    return _UNPACK_TABLES[key]


def draw_dropout(x: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """(mask, packed): the mask ``F.dropout(x, p, training=True)`` uses on CPU, drawn the same way
    from the default generator (``bernoulli_(1 - p)`` then ``div_(1 - p)``), so a fused forward
    and PEFT's nn.Dropout see the same mask for the same seed; and the mask packed to one bit
    per element (uint8, bytes(x) / 32 for float32 x) for backward.

    Saving 1 bit beats redrawing on CPU: ``bernoulli_`` costs ~19 ms at 2048 x 1024, packing ~1 ms
    and unpacking (a 256-row table lookup) ~0.7 ms (benchmarks/NOTES.md, dora_norm).
    """
    noise = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    noise.bernoulli_(1 - p)
    keep = noise.to(torch.uint8).reshape(-1)
    pad = (-keep.numel()) % 8
    if pad:
        keep = F.pad(keep, (0, pad))
    packed = ((keep.view(torch.int64) * _PACK_MAGIC) >> 56).to(torch.uint8)
    return noise.div_(1 - p), packed


def unpack_dropout(packed: Tensor, shape, dtype: torch.dtype, p: float) -> Tensor:
    """The mask of :func:`draw_dropout` again, bit for bit, from its packed bits."""
    numel = 1
    for size in shape:
        numel *= size
    table = _unpack_table(dtype, packed.device, p)
    return torch.index_select(table, 0, packed.to(torch.int32)).view(-1)[:numel].view(shape)
