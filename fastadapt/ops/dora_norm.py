"""dora_norm family: DoRA's factored weight norm and fused DoRA / DeLoRA linear layers.

Factored norm (never forms B @ A, never a d_out x d_in temporary beyond the frozen W itself)::

    ||W + s B A||_row^2 = ||W||_row^2 + 2 s rowsum((W A^T) o B) + s^2 rowsum((B (A A^T)) o B)

||W||_row^2 is cached per weight (:class:`RowSqNormCache`): W is frozen, and the cache is
invalidated by anything that replaces or writes W through autograd-visible ops (PEFT's
merge/unmerge replace ``weight.data``; ``load_state_dict`` and ``torch.no_grad(): w.copy_``
bump the version counter).  Writes through ``weight.data.<op>_`` bypass the version counter:
call :meth:`RowSqNormCache.clear` after such a write.

Zero-norm rows: n = max(sqrt(max(n^2, 0)), NORM_EPS) with NORM_EPS = 1e-12 (the eps of
``F.normalize``).  PEFT divides by the raw norm and returns NaN on a row where W + s B A is zero
(peft#2049); every other row is identical.  The norm sums run in float32 for half inputs.

Backends: "torch" (CPU path, this file) and "triton" for the norm pieces
(``fastadapt.triton_kernels.dora_norm``), picked per call by :func:`fastadapt.backend.select`;
float64 always runs torch (tl.dot has no float64).  A float32 adapter on a half base (PEFT's
default autocast_adapter_dtype) runs the triton backend's mixed kernels with PEFT's casts (see
DoraLinearFunction / DeloraLinearFunction; DoRA's norm itself runs torch there, W converted to
float32 block by block).  On the torch path forward
applies g = m / n to the output in place; backward folds it into W's rows for dx (a d_out x d_in
temporary, freed at once) since dY may not be scaled in place.  On the triton backend DoRA's
forward GEMM carries g, the low-rank term and the bias in its epilogue and stores y_pre beside y
from the same accumulator, and dx's GEMM applies g to the dY tiles as it loads them
(``scaled_lowrank_gemm``); backward reads dY once for v = dY (s g o B), u^T dY and dm's column
sum (``dora_dy_row_pass``); x A^T, dA, the recompute path's pieces and the second GEMM with W of
the dropout path use torch, except on the mixed path, where u = x A^T, dA = v^T x (and
recompute's v, u^T dY; DeLoRA's u, dY B, dA and dB) come from ``float32_matmul`` (half tiles
converted to float32 on load, DoRA's dropout mask applied in-kernel).  No call on the triton
backend synchronizes with the device.

Dropout masks (:func:`seeded_dropout_masks` picks the source per call): on CPU the fused forward
draws nn.Dropout's own mask from the default generator (bit-identical to PEFT's nn.Dropout for
the same seed) and keeps it as 1 bit per element for backward.  Wherever the Triton kernels serve
the device (every CUDA call but float64, including a float32 adapter on a half base) no mask is
kept: one int seed is drawn from CPU's default generator
(:func:`draw_dropout_seed`; no device sync, reproducible under ``torch.manual_seed``) and the
kernels regenerate the mask from Philox(seed, element index) wherever it is needed
(``seeded_dropout``, ``dropout_mask_add_``): nn.Dropout's distribution and scaling, other bits.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _validate
from ..backend import select
from ..reference.dora import DELORA_NORM_CLAMP, check_magnitude

METHODS = ("dora", "delora")
TRITON_METHODS = ("dora", "delora")

NORM_EPS = 1e-12


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


HALF_DTYPES = (torch.float16, torch.bfloat16)


def adapter_compute_dtype(base_name: str, base: torch.Tensor, adapter_tensors) -> torch.dtype:
    """The dtype the adapter path computes in: the one dtype of ``adapter_tensors`` ((name, tensor)
    pairs), which is ``base``'s dtype (x or W), or float32 on a float16 / bfloat16 base (PEFT's default
    ``autocast_adapter_dtype=True``: adapter weights upcast to float32, x cast to them for the
    adapter path).  TypeError naming the parameters otherwise."""
    (first_name, first), *rest = adapter_tensors
    for name, t in rest:
        _validate.same(first_name, first, name, t)
    if first.dtype != base.dtype and not (first.dtype == torch.float32 and base.dtype in HALF_DTYPES):
        _validate.same(base_name, base, first_name, first)  # raises: names both dtypes
    if first.device != base.device:
        raise ValueError(f"{base_name} is on {base.device} but {first_name} is on {first.device}; move one to match")
    return first.dtype


def fused_backend(x: torch.Tensor) -> str:
    """The backend :func:`dora_linear` / :func:`delora_linear` run for ``x``: "torch" for float64
    (tl.dot has none), otherwise :func:`fastadapt.backend.select`'s choice, also for a float32
    adapter on a half x (PEFT's autocast_adapter_dtype: the triton backend has kernels for its
    casts, see :class:`DoraLinearFunction` / :class:`DeloraLinearFunction`)."""
    if x.dtype == torch.float64:
        return "torch"
    return select("dora_norm", x.device, ("torch", "triton"))


def seeded_dropout_masks(x: torch.Tensor) -> bool:
    """Whether a fused call on ``x`` draws its dropout mask from the seeded Philox kernels
    (``triton_kernels.dora_norm.seeded_dropout``) instead of nn.Dropout's own draw: exactly when the
    call runs the triton backend (every CUDA call but float64, including a float32 adapter on a half
    base); never on CPU by default, where the torch draw is bit-identical to PEFT's nn.Dropout."""
    return fused_backend(x) == "triton"


def draw_dropout_seed() -> int:
    """The seed of one triton-backend dropout mask: an int in [0, 2^31 - 1) from CPU's default
    generator (no device sync on any device; reproducible under ``torch.manual_seed``)."""
    return int(torch.randint(0, 2 ** 31 - 1, (1,), device="cpu").item())


def weight_row_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W_j||^2 per output row j of W (out, in), accumulated in float32 (float64 for float64)."""
    return torch.linalg.vector_norm(weight.detach(), dim=1, dtype=_acc_dtype(weight.dtype)).square()


class RowSqNormCache:
    """Caches ||W||_row^2 of one frozen weight.

    The entry is valid while W's storage is the same live storage object (a weak reference,
    so a freed storage whose address is reused does not match), at the same offset, shape,
    strides, dtype and version counter.
    """

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self._storage_ref = None
        self._key = None
        self._value = None

    @staticmethod
    def _key_of(weight: torch.Tensor):
        return (weight.storage_offset(), tuple(weight.shape), weight.stride(), weight.dtype, weight.device,
                weight._version)

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        storage = weight.untyped_storage()
        key = self._key_of(weight)
        if self._storage_ref is None or self._storage_ref() is not storage or self._key != key:
            self._value = weight_row_sq_norm(weight)
            self._storage_ref = weakref.ref(storage)
            self._key = key
        return self._value


def _norm_from_pieces(w_sq, cross, quad, scaling: float) -> torch.Tensor:
    sq = w_sq + 2.0 * scaling * cross + scaling * scaling * quad
    return sq.clamp_min(0).sqrt().clamp_min(NORM_EPS)


# Rows of a half-precision W converted to float32 per block in W A^T for a float32 adapter
# (2^20 elements: a 4 MiB float32 block, never a whole d_out x d_in copy).
_UPCAST_BLOCK_ELEMENTS = 1 << 20


def _weight_times_a_t(weight: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """W A^T (out, r) in A's dtype; a half W with a float32 A is converted exactly, block of rows by block."""
    if weight.dtype == lora_A.dtype:
        return weight @ lora_A.T
    rows = max(1, _UPCAST_BLOCK_ELEMENTS // weight.shape[1])
    return torch.cat([block.to(lora_A.dtype) @ lora_A.T for block in weight.split(rows)])


def _dora_norm_torch(weight, lora_A, lora_B, scaling, w_sq):
    acc = w_sq.dtype
    a, b = lora_A.to(acc), lora_B.to(acc)
    wa = _weight_times_a_t(weight, lora_A).to(acc)   # (out, r): W A^T, a thin GEMM
    cross = (wa * b).sum(dim=1)                 # rowsum((W A^T) o B)
    quad = ((b @ (a @ a.T)) * b).sum(dim=1)     # rowsum((B (A A^T)) o B)
    return _norm_from_pieces(w_sq, cross, quad, scaling)


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     weight_sq_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """n_j = ||W_j + s (B A)_j|| for W (out, in), A (r, in), B (out, r); detached, float32
    (float64 for float64 inputs).  ``weight_sq_norm``: cached ||W||_row^2 (computed if None)."""
    _validate.tensor("weight", weight, ndim=2)
    out_features, in_features = weight.shape
    _validate.tensor("lora_A", lora_A, ndim=2)
    _validate.rank(lora_A.shape[0], in_features, out_features)
    _validate.tensor("lora_A", lora_A, shape=(lora_A.shape[0], in_features))
    _validate.tensor("lora_B", lora_B, shape=(out_features, lora_A.shape[0]))
    adapter_dtype = adapter_compute_dtype("weight", weight, (("lora_A", lora_A), ("lora_B", lora_B)))
    with torch.no_grad():
        w_sq = weight_row_sq_norm(weight) if weight_sq_norm is None else weight_sq_norm
        # float64 and a float32 adapter on a half W always run the torch path (tl.dot has no
        # float64; the kernel takes one dtype).
        if (weight.dtype != torch.float64 and adapter_dtype == weight.dtype
                and select("dora_norm", weight.device, ("torch", "triton")) == "triton"):
            from ..triton_kernels.dora_norm import dora_norm_forward
            return dora_norm_forward(weight, lora_A, lora_B, float(scaling), w_sq)
        return _dora_norm_torch(weight, lora_A, lora_B, float(scaling), w_sq)


# ----------------------------------------------------------------------------------------------
# Dropout masks kept as one bit per element.

# Packing 8 mask bytes (each 0 or 1, little-endian in one int64) into one byte: byte i of v moves
# to bit 56 + i under v * sum_i 2^(56 - 7 i); every other partial product lands on a distinct bit
# outside 56..63 (8 i - 7 j = 8 i' - 7 j' forces i = i', j = j'), so no carry reaches those bits
# (the product wraps mod 2^64; >> 56 then the cast to uint8 keeps exactly bits 56..63).
_PACK_MAGIC = 0x0102040810204080
_UNPACK_TABLES: dict = {}


def _unpack_table(dtype: torch.dtype, device, p: float) -> torch.Tensor:
    """(256, 8): row k holds the 8 mask values byte k encodes (0 or nn.Dropout's 1 / (1 - p))."""
    key = (dtype, device, p)
    if key not in _UNPACK_TABLES:
        keep_value = torch.ones(1, dtype=dtype, device=device).div_(1 - p)  # bit-equal to F.dropout's
        bits = (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
        _UNPACK_TABLES[key] = bits.to(dtype) * keep_value
    return _UNPACK_TABLES[key]


def draw_dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
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


def unpack_dropout(packed: torch.Tensor, shape, dtype: torch.dtype, p: float) -> torch.Tensor:
    """The mask of :func:`draw_dropout` again, bit for bit, from its packed bits."""
    numel = 1
    for size in shape:
        numel *= size
    table = _unpack_table(dtype, packed.device, p)
    return torch.index_select(table, 0, packed.to(torch.int32)).view(-1)[:numel].view(shape)


# ----------------------------------------------------------------------------------------------
# DoRA

# Rows per block of :func:`colsum_product`: 2^17 elements, a 512 KiB float32 block that stays in cache.
_COLSUM_BLOCK_ELEMENTS = 1 << 17


def colsum_product(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """colsum(a o b) for (N, d) a, b, accumulated in ``acc``, block of rows by block: the product
    goes through one reused cache-sized buffer instead of an N x d temporary (a fresh N x d
    allocation costs its page faults on top of the extra pass; see benchmarks/NOTES.md)."""
    n, d = a.shape
    rows = max(1, _COLSUM_BLOCK_ELEMENTS // max(d, 1))
    if n <= rows:
        return torch.linalg.vecdot(a.to(acc), b.to(acc), dim=0)
    buf = torch.empty(rows, d, dtype=acc, device=a.device)
    partial = torch.empty(-(-n // rows), d, dtype=acc, device=a.device)
    for i, start in enumerate(range(0, n, rows)):
        block = buf[: min(rows, n - start)]
        if a.dtype == acc:
            torch.mul(a[start:start + rows], b[start:start + rows], out=block)
        else:
            block.copy_(a[start:start + rows]).mul_(b[start:start + rows])   # exact upcast, product in acc
        torch.sum(block, dim=0, out=partial[i])
    return partial.sum(dim=0)



# Rows per block of :func:`colsum_product_linear`: 2^18 output elements (1 MiB float32), big
# enough for an efficient GEMM, small enough to stay in cache for the product with dY.
_LINEAR_BLOCK_ELEMENTS = 1 << 18


def colsum_product_linear(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """colsum(dy o (x W^T)) for dy (N, out), x (N, in) and W (out, in) of one dtype, block of rows
    by block: x W^T is never an N x out tensor (recompute's y_pre)."""
    n, out_features = dy.shape
    rows = max(1, _LINEAR_BLOCK_ELEMENTS // max(out_features, 1))
    buf = torch.empty(min(rows, n), out_features, dtype=dy.dtype, device=dy.device)
    partial = torch.empty(-(-n // rows), out_features, dtype=acc, device=dy.device)
    for i, start in enumerate(range(0, n, rows)):
        block = buf[: min(rows, n - start)]
        torch.mm(x[start:start + rows], weight.T, out=block)
        if acc == dy.dtype:
            torch.sum(block.mul_(dy[start:start + rows]), dim=0, out=partial[i])
        else:
            torch.sum(block.to(acc).mul_(dy[start:start + rows]), dim=0, out=partial[i])
    return partial.sum(dim=0)


# Rows per block of :func:`dy_row_pass`: 2^18 elements of dY (1 MiB float32) stay in cache for
# the three products that read them.
_DY_BLOCK_ELEMENTS = 1 << 18


def dy_row_pass(dy: torch.Tensor, u: torch.Tensor, b_scaled: torch.Tensor, other: torch.Tensor):
    """(dY b_scaled, u^T dY, colsum(dY o other)) for dY, other (N, out), u (N, r), b_scaled (out, r),
    all of one dtype, in one pass over dY block of rows by block (each block read from memory once
    instead of three times, and no N x out product temporary)."""
    n, out_features = dy.shape
    rows = max(1, _DY_BLOCK_ELEMENTS // max(out_features, 1))
    v = torch.empty(n, b_scaled.shape[1], dtype=dy.dtype, device=dy.device)
    u_t_dy = torch.zeros(u.shape[1], out_features, dtype=dy.dtype, device=dy.device)
    buf = torch.empty(min(rows, n), out_features, dtype=dy.dtype, device=dy.device)
    partial = torch.empty(-(-n // rows), out_features, dtype=dy.dtype, device=dy.device)
    for i, start in enumerate(range(0, n, rows)):
        dy_block = dy[start:start + rows]
        torch.mm(dy_block, b_scaled, out=v[start:start + rows])
        u_t_dy.addmm_(u[start:start + rows].T, dy_block)
        block = buf[: dy_block.shape[0]]
        torch.sum(torch.mul(dy_block, other[start:start + rows], out=block), dim=0, out=partial[i])
    return v, u_t_dy, partial.sum(dim=0)

@dataclass(frozen=True)
class DoraPlan:
    """Non-tensor settings of one fused DoRA call (read at call time, never cached)."""

    scaling: float
    dropout_p: float = 0.0
    recompute: bool = False
    backend: str = "torch"
    seeded_mask: bool = False   # dropout mask from the Philox kernels (seeded_dropout_masks)


class DoraLinearFunction(torch.autograd.Function):
    """Fused DoRA linear on 2-D x (N, in); PEFT's gradients (the norm n is a constant).

    Notation: W (out, in) frozen, A (r, in), B (out, r), m (out,), s scaling, n the detached norm,
    g = m / n, x_d = x * mask (mask = 1 without dropout), u = x_d A^T (N, r).

    Forward without dropout (one GEMM with W, accumulating onto the low-rank term written first
    (beta = 1), then g and b applied to y in place: no d_out x d_in temporary, no second N x out
    tensor; on the triton backend g, the low-rank term and b sit in the GEMM's epilogue instead,
    which also stores y_pre from the same accumulator; float16 / bfloat16 outputs: see "saved"):
        y = g o (u (s B)^T + x W^T) + b
    Forward with dropout (PEFT corrects the base output of the un-dropped x: two GEMMs with W):
        y_pre = x_d W^T + s u B^T,     y = (x - x_d) W^T + b + g o y_pre
    (triton backend: x_d and x - x_d from one ``seeded_dropout`` pass, y_pre from the fused GEMM.)
    Backward, with dY (N, out):
        v   = dY (s g o B)                      (N, r)
        dx  = v A + dY (g o W)                  without dropout (triton: g applied to dY tiles on load)
        dx  = dY W + mask o (v A + dY ((g - 1) o W))       with dropout (triton: the inner term from
                                                the fused GEMM, mask o inner added to dY W in place
                                                by ``dropout_mask_add_``, the mask regenerated)
        dA  = v^T x_d   (triton: x_d regenerated from the seed)
        P   = u^T dY (r, out),   dB = (s g) o P^T,   db = colsum(dY)
        dm  = colsum(dY o y_pre) / n
    v, P and dm's colsum come from one read of dY (unless recompute): on the triton backend one
    kernel (``dora_dy_row_pass``), on CPU with one dtype a pass over 256-row blocks of dY
    (:func:`dy_row_pass`); no N x out product temporary is allocated.
    What is saved (besides parameters), torch backend:
        default, no dropout: x, u and the output y; y_pre is recovered as (y - b) / g, so
                  dm = (colsum(dY o y) - b colsum(dY)) / m.  (If some m_j == 0 the call runs
                  as ``recompute`` instead: y carries no information on that row.)  For a
                  float16 / bfloat16 output, x, u and y_pre instead (same bytes): the forward
                  computes y_pre = x W^T + s u B^T, then y = g o y_pre + b (an N x out pass, no g
                  folded into W), because inverting a rounded half y loses digits wherever
                  |g y_pre| << |b| or g is small.
        default, dropout:   x, u, y_pre (not recoverable from y) and the 1-bit packed mask.
        recompute=True:     x, u (and the packed mask); backward recomputes x_d W^T, one more
                  GEMM with W, about +0.5x the frozen layer's time, and takes y_pre's low-rank
                  half from P: colsum(dY o (s u B^T))_j = s sum_k B_jk P_kj.
    What is saved on the triton backend: x, u and y_pre by default (the fused GEMM stores it, so
    no m == 0 check and no host sync), x and u with recompute; with dropout the same tensors plus
    the int seed in ctx (no mask: the kernels regenerate it).
    Saved bytes as a multiple of bytes(x), float32: 2 + r/in (+ 1/32 for the torch backend's
    packed mask) by default, 1 + r/in (+ 1/32) with recompute.  Where the default saves the
    output itself (torch backend, no dropout, float32 / float64), modifying it in place before
    backward (e.g. ``nn.ReLU(inplace=True)`` right after the layer) makes autograd raise its
    "modified by an inplace operation" error; use recompute=True there.

    Float32 adapter on a float16 / bfloat16 base (PEFT's default ``autocast_adapter_dtype``;
    ``mixed``), the casts of PEFT's ``lora.Linear.forward`` / ``DoraLinearLayer.forward``: every
    GEMM with W runs in the base dtype (x W^T, dY W; with dropout x_d and (g - 1) o dY are rounded
    to the base dtype for their GEMM with W, where PEFT upcasts W instead), everything else in
    float32 (x cast to float32 for the adapter path, the mask drawn on that float32 copy as
    nn.Dropout draws it there (on CUDA the Philox kernels' mask on that copy, regenerated in
    backward from the seed: x, u, y_pre saved, no mask), u, v, g, the scaling of the base product,
    dm, dA, dB), and the output and dx are rounded to the base dtype once at the end.  g is never
    folded into the half W (that would round g o W).  y_pre is saved in the base dtype.  With fl_h
    the rounding to the base dtype, fl32 the exact conversion to float32 and everything else
    float32, both backends compute (x_d = mask o fl32(x), mask = 1 without dropout):
        u     = x_d A^T
        y_pre = fl32(fl_h(x W^T)) + s u B^T                    y = fl_h(g o y_pre + b)
        dropout: y_pre = fl32(fl_h(fl_h(x_d) W^T)) + s u B^T,
                 y = fl_h((fl32(fl_h(x W^T + b)) - fl32(fl_h(fl_h(x_d) W^T))) + g o y_pre)
        v = fl32(dY) (s g o B),   P = u^T fl32(dY),   dm = colsum(fl32(dY) o fl32(fl_h(y_pre))) / n
                 (recompute: colsum(fl32(dY) o fl32(fl_h(fl_h(x_d) W^T))) + s rowsum(B o P^T), then / n)
        dx    = fl_h(fl32(fl_h(fl_h(fl32(dY) o g) W)) + v A)
        dropout: dx = fl_h(fl32(fl_h(dY W)) + mask o (fl32(fl_h(fl_h(fl32(dY) o (g - 1)) W)) + v A))
        dA    = v^T x_d
    The triton backend (every CUDA call) runs this without float32 copies of x, x_d or dY:
    ``float32_matmul`` converts half tiles as it loads them (u, dA; recompute's v and u^T dY) and
    applies the mask in-kernel; the fused GEMM rounds its half base product before the IEEE fp32
    low-rank dot joins it (``round_base``; dx's k_scale load rounds fl_h(fl32(dY) o g) as the
    torch cast does), with dropout through the residual epilogue (forward) and a float32 inner term
    for ``dropout_mask_add_`` (dx); the row pass converts dY tiles for v, P and dm's colsum.  Only
    float32 summation orders differ between the backends, so each rounded result is equal or, where
    the float32 values straddle a rounding boundary, one unit in the last place apart.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, plan: DoraPlan):
        s = plan.scaling
        acc = weight_norm.dtype
        compute = lora_A.dtype                                            # x.dtype unless mixed
        mixed = compute != x.dtype
        g = (magnitude.detach().to(acc) / weight_norm).to(compute)       # (out,)
        ctx.plan = plan
        ctx.dropout_seed = None
        if plan.backend == "triton":
            y, y_pre, u, ctx.dropout_seed = _dora_forward_triton(x, weight, bias, lora_A, lora_B, g, plan)
            ctx.save_for_backward(x, u, weight, bias, lora_A, lora_B, magnitude, weight_norm, y_pre, None)
            ctx.recompute = plan.recompute
            ctx.saved_pre = True
            return y
        # A half y is not inverted for y_pre ((y - b) / g loses digits where |g y_pre| << |b|):
        # half outputs keep y_pre itself (same bytes).
        keep_pre = plan.dropout_p > 0 or x.dtype in HALF_DTYPES
        # Only a saved y needs m != 0 (y_pre = (y - b) / g); the check syncs, so it runs only then.
        recompute = plan.recompute or (not keep_pre and bool((magnitude == 0).any()))
        packed = None
        x_c = x.to(compute)                                               # no copy unless mixed
        if plan.dropout_p == 0 and keep_pre:
            u = x_c @ lora_A.T
            y_pre = F.linear(x, weight).to(compute).addmm_(u, lora_B.T, alpha=s)
            y = (y_pre * g if bias is None else torch.addcmul(bias.to(compute), y_pre, g)).to(x.dtype)
            y_pre = y_pre.to(x.dtype)
        elif plan.dropout_p == 0:
            u = x @ lora_A.T
            y = u @ (lora_B * s).T
            y.addmm_(x, weight.T)
            y.mul_(g)
            if bias is not None:
                y.add_(bias)
            y_pre = None
        else:
            if plan.seeded_mask:  # CUDA, float32 adapter on a half base: the triton backend's mask
                from ..triton_kernels.dora_norm import seeded_dropout
                ctx.dropout_seed = draw_dropout_seed()
                x_d = seeded_dropout(x_c, ctx.dropout_seed, plan.dropout_p)
            else:
                mask, packed = draw_dropout(x_c, plan.dropout_p)
                x_d = x_c * mask
                del mask
            u = x_d @ lora_A.T
            if mixed:
                base_d = F.linear(x_d.to(x.dtype), weight)
                y_pre = base_d.to(compute).addmm_(u, lora_B.T, alpha=s)
                y = F.linear(x, weight, bias).to(compute).sub_(base_d).addcmul_(y_pre, g).to(x.dtype)
                y_pre = y_pre.to(x.dtype)
                del base_d
            else:
                y_pre = x_d @ weight.T
                y_pre.addmm_(u, lora_B.T, alpha=s)
                y = F.linear(x - x_d, weight, bias)
                y.addcmul_(y_pre, g)
            del x_d
        del x_c
        saved_out = None if recompute else (y_pre if keep_pre else y)
        ctx.save_for_backward(x, u, weight, bias, lora_A, lora_B, magnitude, weight_norm, saved_out, packed)
        ctx.recompute = recompute
        ctx.saved_pre = keep_pre
        return y

    @staticmethod
    def backward(ctx, dy):
        x, u, weight, bias, lora_A, lora_B, magnitude, weight_norm, saved_out, packed = ctx.saved_tensors
        plan: DoraPlan = ctx.plan
        s = plan.scaling
        acc = weight_norm.dtype
        compute = lora_A.dtype
        mixed = compute != x.dtype
        g = (magnitude.detach().to(acc) / weight_norm).to(compute)
        # Mixed on the triton backend the kernels convert dY and x tile by tile: no float32 copies.
        kernels_mixed = mixed and plan.backend == "triton"
        if kernels_mixed:
            from ..triton_kernels.dora_norm import float32_matmul, seeded_dropout
        dy_c = None if kernels_mixed else dy.to(compute)                  # no copy unless mixed
        b_scaled = lora_B * (s * g)[:, None]
        need_m = ctx.needs_input_grad[5]
        # One pass over dY for v, u^T dY and dm's colsum: the triton kernel, or on CPU row blocks
        # when all are one dtype.
        row_pass = need_m and not ctx.recompute and (
            plan.backend == "triton" or (dy.dtype == acc == compute and dy.device.type == "cpu"))
        if row_pass and plan.backend == "triton":
            from ..triton_kernels.dora_norm import dora_dy_row_pass
            v, u_t_dy, dot = dora_dy_row_pass(dy, u, b_scaled, saved_out)
        elif row_pass:
            v, u_t_dy, dot = dy_row_pass(dy, u, b_scaled, saved_out)
        elif kernels_mixed:
            v = float32_matmul(dy, b_scaled)
        else:
            v = dy_c @ b_scaled                                           # (N, r)
        seed = ctx.dropout_seed
        mask = None if packed is None else unpack_dropout(packed, x.shape, compute, plan.dropout_p)
        dx = d_a = d_b = d_m = d_bias = None
        if ctx.needs_input_grad[0]:
            if plan.backend == "triton":
                dx = _dora_dx_triton(dy, weight, v, lora_A, g, seed, plan.dropout_p)
            elif mask is None and seed is None:
                dx = v @ lora_A
                if mixed:
                    dx = dx.add_((dy_c * g).to(x.dtype) @ weight).to(x.dtype)
                else:
                    dx.addmm_(dy, weight * g[:, None])
            else:
                inner = v @ lora_A
                if mixed:
                    inner.add_((dy_c * (g - 1)).to(x.dtype) @ weight)
                    dx = _add_dropped_((dy @ weight).to(compute), inner, mask, seed, plan.dropout_p).to(x.dtype)
                else:
                    inner.addmm_(dy, weight * (g - 1)[:, None])
                    dx = _add_dropped_(dy @ weight, inner, mask, seed, plan.dropout_p)
                del inner
        if kernels_mixed:
            # dA's float32_matmul converts x and applies the mask per tile; recompute's half GEMM
            # takes fl_h(mask o x), as PEFT's x_d.to(half)
            x_d = seeded_dropout(x, seed, plan.dropout_p) if seed is not None and need_m and ctx.recompute else x
        elif seed is not None and (ctx.needs_input_grad[3] or (need_m and ctx.recompute)):
            from ..triton_kernels.dora_norm import seeded_dropout
            x_d = seeded_dropout(x.to(compute), seed, plan.dropout_p)
        elif seed is None:
            x_d = x.to(compute) if mask is None else x.to(compute) * mask
        if ctx.needs_input_grad[3]:
            if kernels_mixed:
                d_a = float32_matmul(v.T, x, dropout=None if seed is None else ("b", seed, plan.dropout_p))
            else:
                d_a = v.T @ x_d
        if not row_pass and (ctx.needs_input_grad[4] or (need_m and ctx.recompute)):
            # (r, out): the faster layout for BLAS (r rows)
            u_t_dy = float32_matmul(u.T, dy) if kernels_mixed else u.T @ dy_c
        if ctx.needs_input_grad[4]:
            d_b = (u_t_dy * (s * g)).T
        if need_m:
            if not row_pass and not ctx.recompute:
                dot = colsum_product(dy, saved_out, acc)
            if ctx.recompute:
                lowrank = (lora_B.to(acc) * u_t_dy.T.to(acc)).sum(dim=1)
                d_m = (colsum_product_linear(dy, x_d.to(x.dtype), weight, acc) + s * lowrank) / weight_norm
            elif not ctx.saved_pre:  # saved_out is y: y_pre = (y - b) / g
                if bias is not None:
                    dot = dot - bias.detach().to(acc) * dy.sum(dim=0, dtype=acc)
                d_m = dot / magnitude.detach().to(acc)
            else:  # saved_out is y_pre
                d_m = dot / weight_norm
            d_m = d_m.to(magnitude.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            d_bias = dy.sum(dim=0)
        return dx, None, d_bias, d_a, d_b, d_m, None, None


def _add_dropped_(out: torch.Tensor, inner: torch.Tensor, mask: Optional[torch.Tensor], seed: Optional[int],
                  p: float) -> torch.Tensor:
    """out += mask o inner in place: the unpacked torch-drawn mask, or the Philox mask of ``seed``
    regenerated in-kernel.  Returns out."""
    if seed is None:
        return out.addcmul_(inner, mask)
    from ..triton_kernels.dora_norm import dropout_mask_add_
    return dropout_mask_add_(out, inner, seed, p)


def _dora_forward_triton(x, weight, bias, lora_A, lora_B, g, plan: DoraPlan):
    """(y, y_pre or None, u, seed or None) of DoRA's forward on the triton backend: without dropout
    one fused GEMM gives y and y_pre (u = x A^T by ``float32_matmul`` for a float32 adapter on a
    half base); with dropout, one dtype: ``seeded_dropout`` gives x_d and x - x_d in one pass, the
    fused GEMM y_pre, and y = (x - x_d) W^T + b + g o y_pre; mixed: u = (mask o x) A^T in float32
    with the mask applied in-kernel, y = fl_h((fl_h(x W^T + b) - B0) + g o (B0 + s u B^T)) with
    B0 = fl_h(fl_h(mask o x) W^T) from the fused GEMM's residual epilogue (PEFT's casts).  y_pre is
    None with recompute."""
    from ..triton_kernels.dora_norm import float32_matmul, scaled_lowrank_gemm, seeded_dropout
    keep_pre = not plan.recompute
    mixed = lora_A.dtype != x.dtype
    b_scaled_t = (lora_B * plan.scaling).T
    g32 = g.to(torch.float32)
    if plan.dropout_p == 0:
        u = float32_matmul(x, lora_A.T) if mixed else x @ lora_A.T
        out = scaled_lowrank_gemm(x, weight.T, u, b_scaled_t, out_scale=g32, bias=bias, with_pre=keep_pre,
                                  round_base=mixed)
        y, y_pre = out if keep_pre else (out, None)
        return y, y_pre, u, None
    seed = draw_dropout_seed()
    if mixed:
        u = float32_matmul(x, lora_A.T, dropout=("a", seed, plan.dropout_p))
        base = F.linear(x, weight, bias)
        x_d = seeded_dropout(x, seed, plan.dropout_p)                    # fl_h(mask o x), PEFT's x_d.to(half)
        out = scaled_lowrank_gemm(x_d, weight.T, u, b_scaled_t, out_scale=g32, with_pre=keep_pre, round_base=True,
                                  residual=base)
        del x_d, base
        y, y_pre = out if keep_pre else (out, None)
        return y, y_pre, u, seed
    x_d, x_rest = seeded_dropout(x, seed, plan.dropout_p, with_rest=True)
    u = x_d @ lora_A.T
    y_pre = scaled_lowrank_gemm(x_d, weight.T, u, b_scaled_t)
    del x_d
    y = F.linear(x_rest, weight, bias)
    y.addcmul_(y_pre, g)
    return y, (y_pre if keep_pre else None), u, seed


def _dora_dx_triton(dy, weight, v, lora_A, g, seed, p):
    """dx on the triton backend: v A + dY (g o W) from one fused GEMM (g on the dY tiles) without
    dropout; with dropout dY W + mask o (v A + dY ((g - 1) o W)), the mask regenerated from
    ``seed`` and added in place by ``dropout_mask_add_``.  A float32 adapter on a half base (PEFT's
    casts): the base product fl_h(fl_h(dY o g) W) (or fl_h(fl_h(dY o (g - 1)) W)) plus v A in
    float32, the inner term kept in float32, dx rounded once."""
    from ..triton_kernels.dora_norm import dropout_mask_add_, scaled_lowrank_gemm
    mixed = lora_A.dtype != dy.dtype
    if seed is None:
        return scaled_lowrank_gemm(dy, weight, v, lora_A, k_scale=g.to(torch.float32), round_base=mixed)
    inner = scaled_lowrank_gemm(dy, weight, v, lora_A, k_scale=(g - 1).to(torch.float32), round_base=mixed,
                                out_dtype=lora_A.dtype)
    return dropout_mask_add_(dy @ weight, inner, seed, p)


def _check_frozen(name: str, t: torch.Tensor) -> None:
    if t.requires_grad:
        raise ValueError(f"{name} requires grad; the fused path needs it frozen ({name}.requires_grad_(False))")


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float, *, dropout_p: float = 0.0,
                recompute: bool = False, weight_sq_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DoRA's forward as PEFT computes it, differentiable in x, lora_A, lora_B, magnitude, bias.

    x (..., in); weight (out, in) frozen (pass ``weight.T`` for fan_in_fan_out storage); bias
    (out,) or None; lora_A (r, in); lora_B (out, r); magnitude (out,) = ``lora_magnitude_vector``.
    lora_A, lora_B and magnitude share x's dtype, or are float32 on a float16 / bfloat16 x and W
    (PEFT's default autocast_adapter_dtype; see :class:`DoraLinearFunction` for the casts).
    ``dropout_p > 0`` (training-mode semantics; pass 0 in eval): the torch backend draws the mask
    from the default generator exactly as nn.Dropout does (bit-identical on CPU); the triton backend
    regenerates a Philox mask from one seed (see the module docstring).  ``recompute``: save only
    x (see :class:`DoraLinearFunction` for what each mode saves and costs).
    """
    _validate.tensor("x", x, min_ndim=1)
    _validate.tensor("weight", weight, ndim=2)
    out_features, in_features = weight.shape
    check_magnitude(magnitude, out_features)
    _validate.tensor("x", x, shape=(*x.shape[:-1], in_features))
    _validate.same("x", x, "weight", weight)
    adapter_compute_dtype("x", x, (("lora_A", lora_A), ("lora_B", lora_B), ("magnitude", magnitude)))  # validates
    if bias is not None:
        _validate.tensor("bias", bias, shape=(out_features,))
        _validate.same("x", x, "bias", bias)
    _check_frozen("weight", weight)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1), e.g. dropout_p=0.1")
    norm = dora_weight_norm(weight, lora_A, lora_B, scaling, weight_sq_norm)
    plan = DoraPlan(float(scaling), float(dropout_p), bool(recompute), fused_backend(x),
                    seeded_mask=dropout_p > 0 and seeded_dropout_masks(x))
    x2d = x.reshape(-1, in_features)
    y = DoraLinearFunction.apply(x2d, weight, bias, lora_A, lora_B, magnitude, norm, plan)
    return y.reshape(*x.shape[:-1], out_features)


# ----------------------------------------------------------------------------------------------
# DeLoRA

def delora_component_scale(lora_A: torch.Tensor, lora_B: torch.Tensor, delora_lambda: torch.Tensor):
    """(c, a_norm, b_norm, a_live, b_live): c_i = lambda / r / (max(||A_i||, 1e-4) max(||B_:,i||, 1e-4)),
    all (r,) in float32 (float64 for float64); ``*_live`` marks norms at or above the clamp (where
    the clamp passes gradient, as torch.clamp does)."""
    acc = _acc_dtype(lora_A.dtype)
    r = lora_A.shape[0]
    a_norm = torch.linalg.vector_norm(lora_A.detach(), dim=1, dtype=acc)
    b_norm = torch.linalg.vector_norm(lora_B.detach(), dim=0, dtype=acc)
    a_live, b_live = a_norm >= DELORA_NORM_CLAMP, b_norm >= DELORA_NORM_CLAMP
    c = delora_lambda.detach().to(acc) / r / (a_norm.clamp_min(DELORA_NORM_CLAMP) * b_norm.clamp_min(DELORA_NORM_CLAMP))
    return c, a_norm, b_norm, a_live, b_live


@dataclass(frozen=True)
class DeloraPlan:
    """Non-tensor settings of one fused DeLoRA call."""

    dropout_p: float = 0.0
    backend: str = "torch"
    seeded_mask: bool = False   # dropout mask from the Philox kernels (seeded_dropout_masks)


class DeloraLinearFunction(torch.autograd.Function):
    """Fused DeLoRA linear on 2-D x (N, in), PEFT's forward and gradients.

    Notation: W (out, in) frozen, w = delora_w_norm (in,) frozen, A (r, in), B (out, r),
    lambda (1,), c_i = lambda / r / (||A_i|| ||B_:,i||) (norms clamped at 1e-4),
    A_w = A o w[None, :] (r, in), x_d = x * mask, u = x_d A_w^T (N, r):
        y = x W^T + b + (u o c) B^T
    x o w is never formed: (x o w) A^T = x (A o w)^T.  On the triton backend the low-rank term
    and the bias sit in the epilogue of the GEMM with W (``scaled_lowrank_gemm``), forward and dx
    (dx without dropout).  Backward, with dY (N, out):
        t   = dY B                     (N, r)
        dx  = dY W + mask o ((t o c) A_w)
        dc  = colsum(t o u)
        dA  = ((t o c)^T x_d) o w  +  (-dc c / ||A_i||^2) A_i       (second term where ||A_i|| >= 1e-4)
        dB  = (dY^T u) o c         +  (-dc c / ||B_:,i||^2) B_:,i   (second term where ||B_:,i|| >= 1e-4)
        dlambda = sum_i dc_i c_i / lambda, computed as sum_i dc_i / (r ||A_i|| ||B_:,i||)
    Saved (besides parameters and buffers): x, u and with dropout the 1-bit packed mask on the
    torch backend, the int seed (in ctx, no tensor) on the triton backend, whose kernels regenerate
    the mask for x_d (forward, dA) and add mask o ((t o c) A_w) to dY W in place (dx):
    1 + r/in (+ 1/32 for the torch backend's mask) times bytes(x) for float32 x.

    Float32 adapter (A, B, lambda, w) on a float16 / bfloat16 base (PEFT's default
    autocast_adapter_dtype): PEFT does not cast x; the mask is drawn on x's dtype (on CUDA by the
    Philox kernels, regenerated in backward), x_d o w and
    everything after it is float32, x W^T and dY W run in the base dtype, and the float32 low-rank
    term is added to the base output (and to dY W) with one rounding to the base dtype:
        y  = fl_h(fl32(fl_h(x W^T + b)) + (u o c) B^T),   u = fl32(x_d) A_w^T,   t = fl32(dY) B
        dx = fl_h(fl32(fl_h(dY W)) + mask o ((t o c) A_w))
    The triton backend (every CUDA call) computes u, t, (t o c)^T x_d and u^T dY with
    ``float32_matmul`` (half tiles converted on load: no float32 copy of x or dY) and y and dx
    (without dropout) with the fused GEMM, its half base product (with the bias, forward) rounded
    before the IEEE fp32 low-rank dot joins it (``round_base``, ``bias_in_base``); with dropout dx
    is dY W plus ``dropout_mask_add_`` of the float32 (t o c) A_w.  It agrees with the torch
    backend up to float32 summation order (a rounded value moves by one unit in the last place
    where a rounding flips).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, delora_lambda, w_norm, plan: DeloraPlan):
        c, *_ = delora_component_scale(lora_A, lora_B, delora_lambda)
        compute = lora_A.dtype                              # x.dtype unless mixed
        mixed = compute != x.dtype
        a_w = lora_A * w_norm
        packed = ctx.dropout_seed = None
        if plan.dropout_p == 0:
            x_d = x
        elif plan.seeded_mask or plan.backend == "triton":  # on x's dtype, as PEFT's dropout(x)
            from ..triton_kernels.dora_norm import seeded_dropout
            ctx.dropout_seed = draw_dropout_seed()
            x_d = seeded_dropout(x, ctx.dropout_seed, plan.dropout_p)
        else:
            mask, packed = draw_dropout(x, plan.dropout_p)  # on x's dtype, as PEFT's dropout(x)
            x_d = x * mask
            del mask
        if mixed and plan.backend == "triton":              # half tiles converted on load
            from ..triton_kernels.dora_norm import float32_matmul
            u = float32_matmul(x_d, a_w.T)
        else:
            u = x_d.to(compute) @ a_w.T
        del x_d
        b_c = lora_B * c.to(lora_B.dtype)
        if plan.backend == "triton":
            from ..triton_kernels.dora_norm import scaled_lowrank_gemm
            y = scaled_lowrank_gemm(x, weight.T, u, b_c.T, bias=bias, round_base=mixed, bias_in_base=mixed)
        elif compute != x.dtype:
            y = F.linear(x, weight, bias)
            y.add_(u @ b_c.T)                               # float32 sum, rounded once
        else:
            y = u @ b_c.T if bias is None else torch.addmm(bias, u, b_c.T)
            y.addmm_(x, weight.T)                           # beta = 1: y written once
        ctx.save_for_backward(x, u, weight, bias, lora_A, lora_B, delora_lambda, w_norm, packed)
        ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, dy):
        x, u, weight, bias, lora_A, lora_B, delora_lambda, w_norm, packed = ctx.saved_tensors
        r = lora_A.shape[0]
        c, a_norm, b_norm, a_live, b_live = delora_component_scale(lora_A, lora_B, delora_lambda)
        a_w = lora_A * w_norm
        acc = c.dtype
        compute = lora_A.dtype
        mixed = compute != x.dtype
        kernels_mixed = mixed and ctx.plan.backend == "triton"  # dY and x converted tile by tile
        if kernels_mixed:
            from ..triton_kernels.dora_norm import float32_matmul
        dy_c = None if kernels_mixed else dy.to(compute)    # no copy unless mixed
        t = float32_matmul(dy, lora_B) if kernels_mixed else dy_c @ lora_B
        tc = t * c.to(t.dtype)
        seed, p = ctx.dropout_seed, ctx.plan.dropout_p
        mask = None if packed is None else unpack_dropout(packed, x.shape, x.dtype, p)
        dx = d_bias = d_a = d_b = d_lambda = None
        if ctx.needs_input_grad[0]:
            if ctx.plan.backend == "triton":
                from ..triton_kernels.dora_norm import dropout_mask_add_, scaled_lowrank_gemm
                if seed is None:
                    dx = scaled_lowrank_gemm(dy, weight, tc, a_w, round_base=mixed)
                else:
                    dx = dropout_mask_add_(dy @ weight, tc @ a_w, seed, p)
            elif mask is None and seed is None and not mixed:
                dx = tc @ a_w
                dx.addmm_(dy, weight)                       # beta = 1: dx written once
            elif mask is None and seed is None:
                dx = dy @ weight
                dx.add_(tc @ a_w)
            else:
                dx = _add_dropped_(dy @ weight, tc @ a_w, mask, seed, p)
        if bias is not None and ctx.needs_input_grad[2]:
            d_bias = dy.sum(dim=0)
        dc = torch.linalg.vecdot(t.to(acc), u.to(acc), dim=0)             # (r,), accumulated in acc
        if ctx.needs_input_grad[3]:
            if seed is not None:
                from ..triton_kernels.dora_norm import seeded_dropout
                x_d = seeded_dropout(x, seed, p)
            else:
                x_d = x if mask is None else x * mask
            d_an = torch.where(a_live, -dc * c / a_norm.clamp_min(DELORA_NORM_CLAMP), 0)
            radial = (d_an / a_norm.clamp_min(DELORA_NORM_CLAMP))[:, None] * lora_A.to(acc)
            tc_x = float32_matmul(tc.T, x_d) if kernels_mixed else tc.T @ x_d.to(compute)
            d_a = (tc_x * w_norm + radial).to(lora_A.dtype)
        if ctx.needs_input_grad[4]:
            d_bn = torch.where(b_live, -dc * c / b_norm.clamp_min(DELORA_NORM_CLAMP), 0)
            radial = lora_B.to(acc) * (d_bn / b_norm.clamp_min(DELORA_NORM_CLAMP))
            u_t_dy = float32_matmul(u.T, dy) if kernels_mixed else u.T @ dy_c
            d_b = (u_t_dy.T * c.to(compute) + radial).to(lora_B.dtype)
        if ctx.needs_input_grad[5]:
            inv = 1.0 / (r * a_norm.clamp_min(DELORA_NORM_CLAMP) * b_norm.clamp_min(DELORA_NORM_CLAMP))
            d_lambda = (dc * inv).sum().reshape(1).to(delora_lambda.dtype)
        return dx, None, d_bias, d_a, d_b, d_lambda, None, None


def delora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], delora_A: torch.Tensor,
                  delora_B: torch.Tensor, delora_lambda: torch.Tensor, delora_w_norm: torch.Tensor, *,
                  dropout_p: float = 0.0) -> torch.Tensor:
    """DeLoRA's forward as PEFT computes it, differentiable in x, delora_A, delora_B, delora_lambda, bias.

    x (..., in); weight (out, in) frozen; delora_A (r, in); delora_B (out, r); delora_lambda (1,);
    delora_w_norm (in,) frozen; the four adapter tensors share x's dtype or are float32 on a
    float16 / bfloat16 x (PEFT's default autocast_adapter_dtype).  ``dropout_p > 0``: PEFT's
    module_dropout in training; the torch backend draws the mask from the default generator
    exactly as nn.Dropout does (bit-identical on CPU), the triton backend regenerates a Philox
    mask from one seed (see the module docstring).
    """
    _validate.tensor("x", x, min_ndim=1)
    _validate.tensor("weight", weight, ndim=2)
    out_features, in_features = weight.shape
    _validate.tensor("x", x, shape=(*x.shape[:-1], in_features))
    _validate.tensor("delora_A", delora_A, ndim=2)
    r = _validate.rank(delora_A.shape[0], in_features, out_features)
    _validate.tensor("delora_A", delora_A, shape=(r, in_features))
    _validate.tensor("delora_B", delora_B, shape=(out_features, r))
    _validate.tensor("delora_lambda", delora_lambda, shape=(1,))
    _validate.tensor("delora_w_norm", delora_w_norm, shape=(in_features,))
    _validate.same("x", x, "weight", weight)
    adapter_compute_dtype("x", x, (("delora_A", delora_A), ("delora_B", delora_B),  # validates
                                   ("delora_lambda", delora_lambda), ("delora_w_norm", delora_w_norm)))
    if bias is not None:
        _validate.tensor("bias", bias, shape=(out_features,))
        _validate.same("x", x, "bias", bias)
    _check_frozen("weight", weight)
    _check_frozen("delora_w_norm", delora_w_norm)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1), e.g. dropout_p=0.1")
    y = DeloraLinearFunction.apply(x.reshape(-1, in_features), weight, bias, delora_A, delora_B, delora_lambda,
                                   delora_w_norm, DeloraPlan(float(dropout_p), fused_backend(x),
                                                             seeded_mask=dropout_p > 0 and seeded_dropout_masks(x)))
    return y.reshape(*x.shape[:-1], out_features)
