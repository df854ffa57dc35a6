"""Butterfly chains as a few strided block-diagonal passes (the geometry behind fastadapt.ops.butterfly).

A butterfly factor (BOFT's ``M_i = P_i B_i P_i^T``, GOFT's Givens stage ``G_i``) never needs its
permutation: cut the features into pieces of ``h`` consecutive features (``h = b / 2``; ``h = b``
for a single factor of odd block size), number the pieces ``p``, and factor ``i`` mixes, for every
fixed value of the other bits of ``p``, the ``2h = b`` features whose piece indices differ only in
bit ``i`` of ``p``, with its ``b x b`` block: rows ``0..h-1`` the piece with that bit clear, rows
``h..2h-1`` the piece with it set.  Block ``k`` of ``boft_R[i]`` is the one whose chunk of
``b 2^i`` features is ``k // 2^i`` and whose position in it is ``k % 2^i`` (PEFT's numbering; GOFT
lists its pairs the same way).  Factor 0 mixes ``b`` consecutive features (block-diagonal OFT).

A pass.  Consecutive factors ``lo .. lo + k - 1`` together mix piece bits ``[lo, lo + k)``, so
their product is one block per value of the remaining bits: with

    feature f = ((a M + m) L + l) H + r,     M = 2^k, L = 2^lo, H = h,  a < A = d / (M L H)

block ``g = a L + l`` (``A L`` blocks) mixes the ``c = M H`` features ``(m, r)`` (local index
``m H + r``), ``y_g = x_g B_g`` (row vectors).  ``L = 1`` is plain block-diagonal (chunks of ``c``
consecutive features).  The pass blocks are built from the factor blocks by applying the factors
to ``c`` indicator rows (:func:`pass_blocks`, differentiable torch on ``c x d`` numbers), so the
activations see one dense ``c x c`` product per pass instead of ``k`` permuted factors.
That construction is the ``butterfly_pass_blocks`` custom op (torch on every device: d c numbers
per factor); its backward recomputes the indicator rows, so autograd keeps only the factor
blocks, not one c x d intermediate per factor.

A chain of ``m`` factors runs as ``ceil``-ish ``m / k`` passes of width ``c <= MAX_WIDTH`` (a single
factor wider than that is one pass of its own width); a pass narrower than ``MIN_WIDTH`` takes
more bits without factors (its blocks are then block-diagonal), which keeps the CPU's batched
GEMMs and Triton's ``tl.dot`` tiles efficient.  BOFT with ``b = 8``: ``m = 1, 2`` are one pass of
width 16, ``m = 4`` one of width 64; GOFT on 1024 features (10 Givens stages): widths 64 and 16.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _validate
from ._registry import fused_op

MIN_WIDTH = 16
MAX_WIDTH = 64


@dataclass(frozen=True)
class Pass:
    """One strided block-diagonal pass: piece bits ``[low_bit, low_bit + n_bits)`` of pieces of
    ``piece`` features, applying ``factors`` (in order; possibly fewer bits than ``n_bits``)."""

    low_bit: int
    n_bits: int
    factors: tuple[int, ...]
    piece: int
    d: int

    @property
    def geometry(self) -> tuple[int, int, int, int]:
        """(A, M, L, H): feature f = ((a M + m) L + l) H + r."""
        M, L, H = 2 ** self.n_bits, 2 ** self.low_bit, self.piece
        return self.d // (M * L * H), M, L, H

    @property
    def width(self) -> int:
        return 2 ** self.n_bits * self.piece

    @property
    def n_blocks(self) -> int:
        A, _, L, _ = self.geometry
        return A * L


@dataclass(frozen=True)
class ButterflyPlan:
    """How a chain ``x M_{m-1} ... M_1 M_0`` of ``n_factors`` factors of ``block_size`` blocks on
    ``d`` features runs: ``passes`` in application order (highest factors first)."""

    d: int
    block_size: int
    n_factors: int
    passes: tuple[Pass, ...]

    @property
    def piece(self) -> int:
        return self.passes[0].piece

    @property
    def span(self) -> int:
        """Features coupled by the whole chain: ``b 2^(m-1)`` (the rotation is block-diagonal in
        chunks of this many consecutive features)."""
        return self.block_size * 2 ** (self.n_factors - 1)

    def geometry(self, transpose: bool = False) -> list[int]:
        """Flat [A, M, L, H] per pass in the order the passes run (reversed when transposed)."""
        passes = reversed(self.passes) if transpose else self.passes
        return [v for p in passes for v in p.geometry]


def check_butterfly(d: int, block_size: int, n_factors: int, *, features_name: str = "in_features") -> None:
    """ValueError naming the parameter and valid values unless ``n_factors`` factors of
    ``block_size`` blocks tile ``d`` features: ``block_size`` divides ``d``; for ``n_factors > 1``
    ``block_size`` is even and ``block_size * 2^(n_factors - 1)`` divides ``d``."""
    _validate.divides("block_size", block_size, d, features_name)
    _validate.positive_int("n_butterfly_factor", n_factors)
    if n_factors == 1:
        return
    if block_size % 2:
        raise ValueError(f"block_size={block_size} must be even for n_butterfly_factor={n_factors} > 1 "
                         f"(butterfly factors pair half-blocks); e.g. block_size={block_size + 1} or "
                         "n_butterfly_factor=1")
    span = block_size * 2 ** (n_factors - 1)
    if d % span:
        top = max(k for k in range(1, n_factors) if d % (block_size * 2 ** (k - 1)) == 0)
        raise ValueError(f"n_butterfly_factor={n_factors} needs {features_name}={d} divisible by block_size * "
                         f"2^(n_butterfly_factor - 1) = {span}; valid n_butterfly_factor: 1..{top}")


def plan(d: int, block_size: int, n_factors: int, *, max_width: int = MAX_WIDTH,
         min_width: int = MIN_WIDTH) -> ButterflyPlan:
    """The passes of a chain of ``n_factors`` butterfly factors (see the module docstring)."""
    check_butterfly(d, block_size, n_factors)
    if block_size % 2:  # one factor of odd blocks: pieces are whole blocks, no bit is mixed
        groups, piece = [(0, 0, (0,))], block_size
    else:
        piece = block_size // 2
        groups, current = [], []
        for i in range(n_factors - 1, -1, -1):  # application order: M_{m-1} first
            if current and 2 ** (current[0] - i + 1) * piece > max(max_width, block_size):
                groups.append(current)
                current = []
            current.append(i)
        groups.append(current)
        groups = [(g[-1], g[0] - g[-1] + 1, tuple(g)) for g in groups]
    passes = []
    for low, bits, factors in groups:
        while 2 ** bits * piece < min_width and d % (2 ** (low + bits + 1) * piece) == 0:
            bits += 1
        passes.append(Pass(low, bits, factors, piece, d))
    return ButterflyPlan(d, block_size, n_factors, tuple(passes))


def encode(chain: ButterflyPlan) -> list[int]:
    """A plan as a flat int list (a custom op's argument): [d, block_size, n_factors, piece, then per
    pass low_bit, n_bits, len(factors), *factors]."""
    out = [chain.d, chain.block_size, chain.n_factors, chain.piece]
    for p in chain.passes:
        out += [p.low_bit, p.n_bits, len(p.factors), *p.factors]
    return out


def decode(code: list[int]) -> ButterflyPlan:
    d, block_size, n_factors, piece = code[:4]
    passes, i = [], 4
    while i < len(code):
        low, bits, k = code[i:i + 3]
        passes.append(Pass(low, bits, tuple(code[i + 3:i + 3 + k]), piece, d))
        i += 3 + k
    return ButterflyPlan(d, block_size, n_factors, tuple(passes))


def _local_index(p: Pass, device) -> torch.Tensor:
    """For every feature f its index m H + r inside its block of pass ``p``."""
    _, M, L, H = p.geometry
    f = torch.arange(p.d, device=device)
    return ((f // H) // L % M) * H + f % H


def _factor_view(x2d: torch.Tensor, factor: int, piece: int, b: int) -> torch.Tensor:
    """(N, n_blocks, b): the rows of each block of factor ``factor`` (a copy unless contiguous blocks)."""
    N, d = x2d.shape
    if piece == b:  # odd block size: contiguous blocks
        return x2d.reshape(N, d // b, b)
    T = 2 ** factor
    return x2d.reshape(N, d // (2 * T * piece), 2, T, piece).transpose(2, 3).reshape(N, -1, b)


def _factor_unview(v: torch.Tensor, factor: int, piece: int, b: int) -> torch.Tensor:
    N, n, _ = v.shape
    d = n * b
    if piece == b:
        return v.reshape(N, d)
    T = 2 ** factor
    return v.reshape(N, d // (2 * T * piece), T, 2, piece).transpose(2, 3).reshape(N, d)


def apply_factor(x2d: torch.Tensor, blocks: torch.Tensor, factor: int, piece: int, *,
                 transpose: bool = False) -> torch.Tensor:
    """``x M_i`` (or ``x M_i^T``) for one factor with its blocks (n, b, b): ``b`` broadcast
    products ``out_c = sum_r v_r B[:, r, c]`` (a batched GEMM of thousands of tiny blocks is
    several times slower on CPU).  Plain torch: used on the small indicator rows of the pass
    blocks and by the tests."""
    b = blocks.shape[-1]
    B = blocks.transpose(-2, -1) if transpose else blocks
    v = _factor_view(x2d, factor, piece, b)
    return _factor_unview(sum(v[..., r:r + 1] * B[:, r, :] for r in range(b)), factor, piece, b)


def _factor_grad(v2d: torch.Tensor, g2d: torch.Tensor, factor: int, piece: int, b: int) -> torch.Tensor:
    """dB (n, b, b) of out = v M_i for the gradient g at out: dB_j = v_j^T g_j over the rows."""
    v, g = _factor_view(v2d, factor, piece, b), _factor_view(g2d, factor, piece, b)
    return torch.einsum("ngr,ngc->grc", v, g)


def _indicator_rows(p: Pass, dtype, device) -> torch.Tensor:
    """(c, d): row j is 1 on every feature of local index j in pass ``p``."""
    index = _local_index(p, device)
    return (index[None, :] == torch.arange(p.width, device=device)[:, None]).to(dtype)


def _rows_to_blocks(rows: torch.Tensor, p: Pass) -> torch.Tensor:
    A, M, L, H = p.geometry
    c = p.width
    return rows.reshape(c, A, M, L, H).permute(1, 3, 0, 2, 4).reshape(A * L, c, c).contiguous()


def _blocks_to_rows(blocks: torch.Tensor, p: Pass) -> torch.Tensor:
    A, M, L, H = p.geometry
    c = p.width
    return blocks.reshape(A, L, c, M, H).permute(2, 0, 3, 1, 4).reshape(c, p.d)


def _pass_blocks(blocks: torch.Tensor, code: list[int]) -> list[torch.Tensor]:
    """The pass blocks (A L, c, c) of the plan ``code`` (:func:`encode`) from the factor blocks
    (m, n, b, b): each pass's factors applied to its ``c`` indicator rows."""
    chain = decode(code)
    out = []
    for p in chain.passes:
        rows = _indicator_rows(p, blocks.dtype, blocks.device)
        for i in p.factors:
            rows = apply_factor(rows, blocks[i], i, p.piece)
        out.append(_rows_to_blocks(rows, p))
    return out


# Parameter-sized torch on any device: the one implementation serves every backend.
pass_blocks_op = fused_op("butterfly_pass_blocks", autocast=False)(_pass_blocks)
pass_blocks_op.impl("triton")(_pass_blocks)


@pass_blocks_op.fake
def _(blocks, code):
    return [blocks.new_empty(p.n_blocks, p.width, p.width) for p in decode(code).passes]


def _pass_blocks_backward_torch(grads: list[torch.Tensor], blocks: torch.Tensor, code: list[int]) -> torch.Tensor:
    """dL/dblocks from dL/d(pass blocks): per pass, the rows recomputed, then walked back
    (g <- g M_i^T, dB_i = rows^T g per block)."""
    chain = decode(code)
    b = blocks.shape[-1]
    dblocks = torch.zeros_like(blocks)
    for p, grad in zip(chain.passes, grads):
        rows = [_indicator_rows(p, blocks.dtype, blocks.device)]
        for i in p.factors[:-1]:
            rows.append(apply_factor(rows[-1], blocks[i], i, p.piece))
        g = _blocks_to_rows(grad, p)
        for k in range(len(p.factors) - 1, -1, -1):
            i = p.factors[k]
            dblocks[i] += _factor_grad(rows[k], g, i, p.piece, b)
            if k:
                g = apply_factor(g, blocks[i], i, p.piece, transpose=True)
    return dblocks


pass_blocks_backward_op = fused_op("butterfly_pass_blocks_backward", autocast=False)(_pass_blocks_backward_torch)
pass_blocks_backward_op.impl("triton")(_pass_blocks_backward_torch)


@pass_blocks_backward_op.fake
def _(grads, blocks, code):
    return blocks.new_empty(blocks.shape)


def _pass_blocks_setup(ctx, inputs, output):
    blocks, code = inputs
    ctx.save_for_backward(blocks)
    ctx.code = code


def _pass_blocks_backward(ctx, grads):
    (blocks,) = ctx.saved_tensors
    grads = [torch.zeros(p.n_blocks, p.width, p.width, dtype=blocks.dtype, device=blocks.device) if g is None else g
             for g, p in zip(grads, decode(ctx.code).passes)]
    return pass_blocks_backward_op(grads, blocks, ctx.code), None


pass_blocks_op.autograd(_pass_blocks_backward, _pass_blocks_setup)


@pass_blocks_op.example
def _():
    from ..testing import randn
    for d, b, m in ((24, 4, 2), (16, 2, 4), (12, 3, 1)):
        chain = plan(d, b, m, max_width=4 if m == 2 else 8, min_width=4)
        yield (randn(m, d // b, b, b, dtype=torch.float32, seed=d + m, requires_grad=True), encode(chain)), {}


@pass_blocks_backward_op.example
def _():
    from ..testing import randn
    chain = plan(16, 2, 4, max_width=8, min_width=4)
    grads = [randn(p.n_blocks, p.width, p.width, dtype=torch.float32, seed=k) for k, p in enumerate(chain.passes)]
    yield (grads, randn(4, 8, 2, 2, dtype=torch.float32, seed=9), encode(chain)), {}


def pass_blocks(blocks: torch.Tensor, chain: ButterflyPlan) -> list[torch.Tensor]:
    """The dense blocks of every pass, (A L, c, c) each, from the factor blocks (m, n, b, b), in
    ``blocks``' dtype.  Differentiable; saves only ``blocks`` (backward recomputes the c x d
    indicator rows instead of keeping one copy per factor)."""
    m, n, b, _ = blocks.shape
    if (m, n * b, b) != (chain.n_factors, chain.d, chain.block_size):
        raise ValueError(f"blocks {tuple(blocks.shape)} do not match the plan's {chain.n_factors} factors of "
                         f"{chain.d // chain.block_size} blocks of {chain.block_size}")
    return pass_blocks_op(blocks, encode(chain))
