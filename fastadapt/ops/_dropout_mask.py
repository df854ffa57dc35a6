"""The dropout mask of one fused call, from either stream, behind one interface.

A fused op that applies dropout to its input receives the mask as two optional tensors:

    seed  an int64 CPU scalar: fastadapt's Philox stream (fastadapt.ops.dropout), regenerated
          wherever it is needed, never stored
    bits  uint8, 1 bit per element: nn.Dropout's own mask (``fastadapt.ops.dropout.draw_dropout``,
          drawn from the default generator before the op, bit-identical to PEFT's nn.Dropout on
          CPU), kept for backward

exactly one of them given.  :class:`DropoutMask` turns them into the three things an op does with
a mask: x_d = mask o x and out += mask o inner (the shared Philox ops: C++ on CPU, Triton on
CUDA, the same bits), and hands a Triton kernel the seed to apply the mask in-kernel.

:func:`draw_dropout_seed` draws the seed inside an op, not by a traced ``torch.randint``:
torch.compile then keeps the draw from CPU's default generator (inductor lowers a traced randint to
its own generator, another mask than eager's), and the op is registered as an ordered effect, so
AOTAutograd neither merges the draws of several layers into one (CSE) nor reorders them.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._registry import fused_op
from .dropout import draw_seed, philox_dropout, philox_mask_add_, unpack_dropout


@fused_op("draw_dropout_seed", autocast=False)
def draw_dropout_seed() -> torch.Tensor:
    """:func:`fastadapt.ops.dropout.draw_seed` as an op (an int64 CPU scalar from CPU's default
    generator; see the module docstring)."""
    return draw_seed()


draw_dropout_seed.impl("triton")(draw_dropout_seed.implementations["torch"])  # a CPU scalar on every backend


@draw_dropout_seed.fake
def _():
    return torch.empty((), dtype=torch.int64, device="cpu")


draw_dropout_seed.example(lambda: iter([((), {})]))
torch.library._register_effectful_op(draw_dropout_seed.default, torch.library.EffectType.ORDERED)


class DropoutMask:
    """One dropout mask with probability ``p``: Philox of ``seed`` or nn.Dropout's ``bits`` (see
    the module docstring); ``dtype``: the dtype nn.Dropout drew the bits on (their kept value is
    1 / (1 - p) rounded to it).  Built inside op implementations."""

    def __init__(self, p: float, seed: Optional[torch.Tensor], bits: Optional[torch.Tensor], dtype: torch.dtype):
        if (seed is None) == (bits is None):
            raise ValueError("a dropout mask takes exactly one of seed (Philox) and bits (nn.Dropout's)")
        self.p = float(p)
        self.seed = seed
        self.bits = bits
        self.dtype = dtype

    @property
    def philox_seed(self) -> Optional[int]:
        """The Philox seed as an int for a kernel that applies the mask itself (None for bits)."""
        return None if self.seed is None else int(self.seed)

    def values(self, shape) -> torch.Tensor:
        """nn.Dropout's mask (0 or 1 / (1 - p), in ``self.dtype``) unpacked from the bits."""
        return unpack_dropout(self.bits, shape, self.dtype, self.p)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x_d = mask o x, contiguous, in x's dtype (float32 arithmetic for half x)."""
        if self.seed is not None:
            return philox_dropout(x, self.seed, self.p)
        return torch.mul(x, self.values(x.shape)).to(x.dtype).contiguous()

    def add_(self, out: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
        """out += mask o inner in place (inner in out's dtype or float32 on a half out); returns out."""
        if self.seed is not None:
            philox_mask_add_(out, inner, self.seed, self.p)
            return out
        return out.addcmul_(inner, self.values(out.shape))
