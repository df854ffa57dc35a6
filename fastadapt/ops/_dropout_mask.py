"""The dropout mask of one fused call, from either stream, behind one interface.

A fused op that applies dropout to its input receives the mask as two optional tensors:

    seed  an int64 CPU scalar: fastadapt's Philox stream, mask_ij = Philox(seed, i, j) >= p, kept
          values scaled by 1 / (1 - p); regenerated wherever it is needed, never stored
    bits  uint8, 1 bit per element: nn.Dropout's own mask (drawn from the default generator
          before the op, bit-identical to PEFT's nn.Dropout on CPU), kept for backward

exactly one of them given.  :class:`DropoutMask` turns them into the three things an op does with
a mask: x_d = mask o x, (x_d, x - x_d), and out += mask o inner.  The Philox pieces are the
shared dropout ops (the same bits on every device: C++ on CPU, Triton on CUDA); nn.Dropout's bits
are unpacked to 0 or 1 / (1 - p) in the dtype nn.Dropout drew them on.
"""
from __future__ import annotations

from typing import Optional

import torch

import torch.nn.functional as F

from ..backend import select
from ._registry import fused_op


@fused_op("draw_dropout_seed", autocast=False)
def draw_seed() -> torch.Tensor:
    """The seed of one Philox mask: an int64 CPU scalar in [0, 2^31 - 1) from CPU's default generator
    (no device sync on any device; reproducible under ``torch.manual_seed``).  A custom op, so that
    torch.compile keeps the draw from the default generator (inductor would lower a traced randint
    to its own generator: another mask than eager's)."""
    return torch.randint(0, 2 ** 31 - 1, (), dtype=torch.int64, device="cpu")


draw_seed.impl("triton")(draw_seed.implementations["torch"])  # a CPU scalar whichever backend runs the mask


@draw_seed.fake
def _():
    return torch.empty((), dtype=torch.int64, device="cpu")


draw_seed.example(lambda: iter([((), {})]))


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


def _philox_split(x: torch.Tensor, seed: int, p: float, with_rest: bool):
    if select("dropout", x.device, ("torch", "triton")) == "triton":
        from ..triton_kernels import dropout as kernels
        return kernels.seeded_dropout(x, seed, p, with_rest=with_rest)
    from .. import _cpp
    out = _cpp.extension().seeded_dropout(x, seed, p, with_rest)
    return tuple(out) if with_rest else out[0]


def _philox_add_(out: torch.Tensor, inner: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    if select("dropout", out.device, ("torch", "triton")) == "triton":
        from ..triton_kernels import dropout as kernels
        return kernels.dropout_mask_add_(out, inner, seed, p)
    from .. import _cpp
    _cpp.extension().dropout_mask_add_(out, inner, seed, p)
    return out


class DropoutMask:
    """One dropout mask with probability ``p``: Philox of ``seed`` or nn.Dropout's ``bits`` (see
    the module docstring); ``dtype``: the dtype nn.Dropout drew the bits on (their kept value is
    1 / (1 - p) rounded to it).  Built inside op implementations (it reads the seed on the host)."""

    def __init__(self, p: float, seed: Optional[torch.Tensor], bits: Optional[torch.Tensor], dtype: torch.dtype):
        if (seed is None) == (bits is None):
            raise ValueError("a dropout mask takes exactly one of seed (Philox) and bits (nn.Dropout's)")
        self.p = float(p)
        self.seed = None if seed is None else int(seed)
        self.bits = bits
        self.dtype = dtype

    def values(self, shape) -> torch.Tensor:
        """nn.Dropout's mask (0 or 1 / (1 - p), in ``self.dtype``) unpacked from the bits."""
        return unpack_dropout(self.bits, shape, self.dtype, self.p)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x_d = mask o x (N, d), contiguous, in x's dtype (float32 arithmetic for half x)."""
        if self.seed is not None:
            return _philox_split(x, self.seed, self.p, False)
        return torch.mul(x, self.values(x.shape)).to(x.dtype).contiguous()

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_d, x - x_d) in x's dtype, from one pass over x for the Philox stream."""
        if self.seed is not None:
            return _philox_split(x, self.seed, self.p, True)
        x_d = self.apply(x)
        return x_d, x - x_d

    def add_(self, out: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
        """out += mask o inner in place (inner in out's dtype or float32 on a half out); returns out."""
        if self.seed is not None:
            return _philox_add_(out, inner, self.seed, self.p)
        return out.addcmul_(inner, self.values(out.shape))
