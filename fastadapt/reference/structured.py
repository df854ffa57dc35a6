"""Dense references: structured updates (block-shared, sparse, diagonal, singular-vector).

Four methods whose change of ``W`` (``out_features x in_features``) has a fixed structure:

* :class:`MiSS`  -- one small block shared across the whole weight (serves Bone), PEFT ``miss``.
* :class:`SHiRA` -- a sparse update on a fixed index set, PEFT ``shira``.
* :class:`IA3`   -- a learned vector scaling the inputs (feedforward) or the outputs, PEFT ``ia3``.
* :class:`SVFT`  -- a sparse matrix between the frozen singular vectors of ``W`` (not in PEFT).

Every class keeps PEFT's parameter names as attribute names (``miss_block``, ``shira_weight``,
``ia3_l``), so a test can pair each reference gradient with PEFT's.  Adapter values are
``nn.Parameter`` (trainable), everything frozen is a buffer.  ``from_peft`` copies a PEFT layer
into float64; the constructors keep the dtype they are given.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _validate
from ._base import ReferenceAdapter, checked_parameter, float64, peft_base_layer


# ---------------------------------------------------------------------------------------------
# MiSS
# ---------------------------------------------------------------------------------------------
class MiSS(ReferenceAdapter):
    r"""MiSS: Matrix Shard Sharing (arXiv:2409.15371; PEFT ``miss``, successor of Bone).

    One trainable block is shared by every shard of ``W`` (out x in).  Three modes, as PEFT 0.21:

    ``mode="default"`` (PEFT ``init_weights=True`` / ``False``): ``miss_block`` D is (r, out).
        Column ``i`` of W gets the column ``D[i mod r]`` added:

        .. math:: \Delta W[o, i] = D[i \bmod r, o]

        so in activation space the input is folded into r bins (zero-padded to a multiple of r)
        and the bins are mapped by D:

        .. math:: y = x W^T + b + \Big(\sum_{g} x_{[g r : (g+1) r]}\Big) D

        with x (..., in) -> folded (..., r) -> (..., out).  r may exceed out_features and need
        not divide in_features (PEFT pads x); 1 <= r <= in_features.

    ``mode="mini"`` (PEFT ``init_weights="mini"``): ``miss_block`` is (r, mini_r) and is tiled
        out/mini_r times along the output dimension, D = [B B ... B]; then as in "default".
        mini_r must divide out_features.

    ``mode="bat"`` (PEFT ``init_weights="bat"``, Bone's block-affine transform): ``miss_block``
        B is (out/r, r, r); with the r x r blocks ``W_{ij} = W[i r:(i+1) r, j r:(j+1) r]``

        .. math:: \Delta W_{ij} = W_{ij} B_i + B_i

        r must divide both in_features and out_features.  This update depends on W, so its
        forward is the merged ``x (W + \Delta W)^T + b``, exactly as PEFT computes it.

    Every mode is the identity when the block is zero (PEFT's default initialisation).
    Dropout (PEFT ``miss_dropout``) is a training-time perturbation and not part of the oracle.
    """

    MODES = ("default", "mini", "bat")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, r: int, *,
                 mode: str = "default", mini_r: int | None = None, miss_block: torch.Tensor | None = None):
        super().__init__(weight, bias)
        d_out, d_in = self.weight.shape
        if mode not in self.MODES:
            raise ValueError(f"mode={mode!r} is not a MiSS mode; valid choices: {list(self.MODES)}")
        _validate.positive_int("r", r)
        if r > d_in:
            raise ValueError(f"r={r} exceeds in_features={d_in}; choose r in 1..{d_in}")
        if mode == "bat":
            # blocks tile both dimensions: r must divide gcd(in, out)
            _validate.divides("r", r, math.gcd(d_in, d_out), "gcd(in_features, out_features)")
            shape = (d_out // r, r, r)
        elif mode == "mini":
            if mini_r is None:
                example = _validate.nearest_divisors(d_out, 8)[-1]
                raise ValueError(f"mini_r is required for mode='mini'; e.g. mini_r={example} (divides out_features)")
            _validate.divides("mini_r", mini_r, d_out, "out_features")
            shape = (r, mini_r)
        else:
            shape = (r, d_out)
        if mode != "mini" and mini_r is not None:
            raise ValueError(f"mini_r={mini_r!r} only applies to mode='mini'; pass mini_r=None")
        self.mode, self.r, self.mini_r = mode, r, mini_r
        if miss_block is None:
            miss_block = torch.zeros(shape, dtype=self.weight.dtype, device=self.weight.device)
        self.miss_block = checked_parameter("miss_block", miss_block, shape, self.weight)

    def shared_block(self) -> torch.Tensor:
        """D (r, out) of modes "default"/"mini": the mini block tiled along the outputs."""
        if self.mode == "mini":
            return self.miss_block.repeat(1, self.out_features // self.mini_r)
        return self.miss_block

    def delta_weight(self) -> torch.Tensor:
        r = self.r
        if self.mode == "bat":
            d_out, d_in = self.weight.shape
            # blocks[i, j] = W_ij, shape (out/r, in/r, r, r)
            blocks = self.weight.reshape(d_out // r, r, d_in // r, r).transpose(1, 2)
            block_b = self.miss_block[:, None]                      # B_i, broadcast over j
            delta_blocks = blocks @ block_b + block_b
            return delta_blocks.transpose(1, 2).reshape(d_out, d_in)
        column_bin = torch.arange(self.in_features, device=self.weight.device) % r
        return self.shared_block()[column_bin].T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "bat":
            return super().forward(x)
        r = self.r
        pad = (-x.shape[-1]) % r
        folded = F.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, r).sum(dim=-2)   # (..., r)
        return self.base(x) + folded @ self.shared_block()

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default") -> "MiSS":
        base = peft_base_layer(layer)
        mode = layer.miss_fn if layer.miss_fn in ("bat", "mini") else "default"
        return cls(float64(base.weight), float64(base.bias), layer.miss_r[adapter_name], mode=mode,
                   mini_r=layer.miss_mini_r[adapter_name] if mode == "mini" else None,
                   miss_block=float64(layer.miss_block[adapter_name]))

    @classmethod
    def demo(cls, mode: str = "default") -> "MiSS":
        g = torch.Generator().manual_seed(0)
        d_out, d_in, r = (12, 18, 6) if mode == "bat" else (12, 17, 4)
        mini_r = 4 if mode == "mini" else None
        shape = {"default": (r, d_out), "mini": (r, 4), "bat": (d_out // r, r, r)}[mode]
        return cls(torch.randn(d_out, d_in, generator=g, dtype=torch.float64),
                   torch.randn(d_out, generator=g, dtype=torch.float64), r, mode=mode, mini_r=mini_r,
                   miss_block=0.1 * torch.randn(shape, generator=g, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# SHiRA
# ---------------------------------------------------------------------------------------------
def shira_random_indices(d_out: int, d_in: int, r: int, random_seed: int | None = None) -> torch.Tensor:
    """PEFT's default SHiRA mask (``mask_functions.random_mask``) as (2, K) row/column indices.

    K = r (d_in + d_out) positions drawn without replacement from the d_out x d_in grid by
    ``torch.randperm`` on a fresh CPU generator (seeded with ``random_seed`` when given, else at
    torch's fixed default seed), listed in row-major order -- the order PEFT's ``torch.where`` on
    the mask produces, which is the order of ``shira_weight``.
    """
    generator = torch.Generator()
    if random_seed is not None:
        generator.manual_seed(random_seed)
    num_values = r * (d_in + d_out)
    flat = torch.randperm(d_out * d_in, generator=generator)[:num_values].sort().values
    return torch.stack([flat // d_in, flat % d_in])


class SHiRA(ReferenceAdapter):
    r"""SHiRA: Sparse High Rank Adapters (arXiv:2406.13175; PEFT ``shira``).

    A fixed set of K = r (in + out) positions ``(p_k, q_k)`` of W is trainable (the LoRA
    parameter budget at rank r, but the update is sparse and generally of high rank):

    .. math:: \Delta W = s \sum_k w_k \, e_{p_k} e_{q_k}^T, \qquad
              y = x W^T + b + s\,\big[\, y_{p_k} \mathrel{+}= w_k x_{q_k} \big]_k

    Shapes: ``shira_weight`` w (K,), ``shira_indices`` (2, K) int64 (row p, column q),
    ``scaling`` s a float (PEFT's ``set_scale``; 1 in training).  Repeated positions add up, as
    in PEFT's ``torch.sparse_coo_tensor``.  Default indices: PEFT's random mask
    (:func:`shira_random_indices`); default values: zeros (PEFT's identity initialisation).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, r: int, *,
                 shira_indices: torch.Tensor | None = None, shira_weight: torch.Tensor | None = None,
                 scaling: float = 1.0, random_seed: int | None = None):
        super().__init__(weight, bias)
        d_out, d_in = self.weight.shape
        _validate.positive_int("r", r)
        top = (d_in * d_out) // (d_in + d_out)
        if r > top:
            raise ValueError(f"r={r} asks for r*(in_features+out_features)={r * (d_in + d_out)} values, more than the "
                             f"{d_in * d_out} entries of the weight; choose r in 1..{top}")
        num_values = r * (d_in + d_out)
        if shira_indices is None:
            shira_indices = shira_random_indices(d_out, d_in, r, random_seed).to(self.weight.device)
        if not isinstance(shira_indices, torch.Tensor) or shira_indices.is_floating_point():
            raise TypeError("shira_indices must be an integer torch.Tensor of shape (2, K)")
        if tuple(shira_indices.shape) != (2, num_values):
            raise ValueError(f"shira_indices has shape {tuple(shira_indices.shape)}; expected (2, {num_values}) "
                             f"for r={r} (K = r*(in_features+out_features))")
        rows, cols = shira_indices.long()
        if rows.min() < 0 or rows.max() >= d_out or cols.min() < 0 or cols.max() >= d_in:
            raise ValueError(f"shira_indices must hold rows in 0..{d_out - 1} and columns in 0..{d_in - 1}")
        self.register_buffer("shira_indices", shira_indices.detach().long().clone())
        if shira_weight is None:
            shira_weight = torch.zeros(num_values, dtype=self.weight.dtype, device=self.weight.device)
        self.shira_weight = checked_parameter("shira_weight", shira_weight, (num_values,), self.weight)
        self.r, self.scaling = r, float(scaling)

    def delta_weight(self) -> torch.Tensor:
        rows, cols = self.shira_indices
        delta = torch.zeros_like(self.weight)
        return delta.index_put((rows, cols), self.shira_weight * self.scaling, accumulate=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.shira_indices
        contributions = x[..., cols] * (self.shira_weight * self.scaling)      # (..., K)
        return self.base(x).index_add(-1, rows, contributions)

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default") -> "SHiRA":
        base = peft_base_layer(layer)
        return cls(float64(base.weight), float64(base.bias), layer.r[adapter_name],
                   shira_indices=layer.shira_indices[adapter_name],
                   shira_weight=float64(layer.shira_weight[adapter_name]), scaling=layer.scaling[adapter_name])

    @classmethod
    def demo(cls) -> "SHiRA":
        g = torch.Generator().manual_seed(0)
        d_out, d_in, r = 13, 11, 2
        return cls(torch.randn(d_out, d_in, generator=g, dtype=torch.float64),
                   torch.randn(d_out, generator=g, dtype=torch.float64), r, random_seed=0,
                   shira_weight=torch.randn(r * (d_in + d_out), generator=g, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# IA3
# ---------------------------------------------------------------------------------------------
class IA3(ReferenceAdapter):
    r"""(IA)^3: Infused Adapter by Inhibiting and Amplifying Inner Activations
    (arXiv:2205.05638; PEFT ``ia3``).

    A learned vector l rescales either the input or the output of the frozen layer:

    * feedforward (``is_feedforward=True``), ``ia3_l`` (1, in):
      :math:`y = (x \odot l) W^T + b`, i.e. columns of W scaled: :math:`W' = W \operatorname{diag}(l)`,
      :math:`\Delta W = W \odot (\mathbf 1 l - 1)`; the bias is unchanged.
    * otherwise (attention projections), ``ia3_l`` (out, 1):
      :math:`y = (x W^T + b) \odot l^T`, i.e. rows of W scaled: :math:`W' = \operatorname{diag}(l) W`,
      :math:`\Delta W = W \odot (l \mathbf 1 - 1)`, and the bias becomes :math:`b \odot l`.

    So ``forward(x) == x merged_weight()^T + merged_bias()`` in both modes (PEFT's ``merge``
    scales the bias in the output mode too).  ``ia3_l = 1`` (PEFT's default) is the identity.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, is_feedforward: bool,
                 ia3_l: torch.Tensor | None = None):
        super().__init__(weight, bias)
        if not isinstance(is_feedforward, bool):
            raise TypeError(f"is_feedforward must be True or False, got {is_feedforward!r}")
        self.is_feedforward = is_feedforward
        shape = (1, self.in_features) if is_feedforward else (self.out_features, 1)
        if ia3_l is None:
            ia3_l = torch.ones(shape, dtype=self.weight.dtype, device=self.weight.device)
        self.ia3_l = checked_parameter("ia3_l", ia3_l, shape, self.weight)

    def delta_weight(self) -> torch.Tensor:
        return self.weight * (self.ia3_l - 1)

    def merged_bias(self) -> torch.Tensor | None:
        """The bias after merging: scaled by l in the output mode, unchanged for feedforward."""
        if self.bias is None or self.is_feedforward:
            return self.bias
        return self.bias * self.ia3_l.flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_feedforward:
            return F.linear(x * self.ia3_l.flatten(), self.weight, self.bias)
        return self.base(x) * self.ia3_l.flatten()

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default") -> "IA3":
        base = peft_base_layer(layer)
        return cls(float64(base.weight), float64(base.bias), is_feedforward=bool(layer.is_feedforward),
                   ia3_l=float64(layer.ia3_l[adapter_name]))

    @classmethod
    def demo(cls, is_feedforward: bool = True) -> "IA3":
        g = torch.Generator().manual_seed(0)
        d_out, d_in = 9, 14
        shape = (1, d_in) if is_feedforward else (d_out, 1)
        return cls(torch.randn(d_out, d_in, generator=g, dtype=torch.float64),
                   torch.randn(d_out, generator=g, dtype=torch.float64), is_feedforward=is_feedforward,
                   ia3_l=1 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# SVFT
# ---------------------------------------------------------------------------------------------
def svft_pattern(r: int, pattern: str, off_diag: int = 0, seed: int | None = None) -> torch.Tensor:
    """Positions (2, K) of the trainable entries of the r x r SVFT matrix M, row-major.

    * ``"plain"``: the diagonal (K = r); ``off_diag`` must be 0.
    * ``"banded"``: every (i, j) with ``|i - j| <= off_diag`` (K = r (2d+1) - d (d+1)).
    * ``"random"``: as many positions as "banded" at the same ``off_diag``, drawn uniformly
      without replacement from the r x r grid by ``torch.randperm`` on a CPU generator seeded
      with ``seed`` (the paper's budget-matched random variant; the authors' code draws with
      replacement, which can repeat a position).
    """
    patterns = ("plain", "banded", "random")
    if pattern not in patterns:
        raise ValueError(f"pattern={pattern!r} is not an SVFT pattern; valid choices: {list(patterns)}")
    if isinstance(off_diag, bool) or not isinstance(off_diag, int) or not 0 <= off_diag < r:
        raise ValueError(f"off_diag={off_diag!r} must be an integer in 0..{r - 1} (bands beside the diagonal)")
    if pattern == "plain" and off_diag:
        raise ValueError(f"off_diag={off_diag} needs pattern='banded' or 'random'; pattern='plain' takes off_diag=0")
    rows, cols = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
    band = (rows - cols).abs() <= off_diag
    if pattern != "random":
        return torch.stack([rows[band], cols[band]])
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    flat = torch.randperm(r * r, generator=generator)[: int(band.sum())].sort().values
    return torch.stack([flat // r, flat % r])


class SVFT(ReferenceAdapter):
    r"""SVFT: Parameter-Efficient Fine-Tuning with Singular Vectors (arXiv:2405.19597; not in PEFT).

    With the thin SVD :math:`W = U \Sigma V^T` of the frozen weight, truncated to its top r
    singular triplets (U (out, r), V^T (r, in)), SVFT trains a sparse r x r matrix M whose
    positions are fixed by a pattern (:func:`svft_pattern`):

    .. math:: \Delta W = U M V^T, \qquad M = \sum_k m_k\, e_{p_k} e_{q_k}^T

    Activation space, never forming an out x in matrix (x (..., in)):

    .. math:: z = x V \;(\ldots, r), \qquad t = z M^T \;(\ldots, r),\ t_{p_k} \mathrel{+}= m_k z_{q_k},
              \qquad y = x W^T + b + t\, U^T \;(\ldots, out)

    Buffers: ``svft_u`` (out, r), ``svft_s`` (r,), ``svft_vh`` (r, in), ``svft_indices`` (2, K);
    parameter ``svft_m`` (K,), zeros by default so the adapter starts as the identity (the
    authors' code draws M at random and multiplies it by a learned gate sigmoid(g), a
    reparametrisation of the same values).  Unlike the authors' code, W itself stays exact
    when r < min(in, out): only the update lives in the top-r singular subspace.
    The SVD is taken in float64 (then cast to W's dtype); its sign convention is torch's.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, r: int | None = None, *,
                 pattern: str = "plain", off_diag: int = 0, seed: int | None = None,
                 svft_m: torch.Tensor | None = None):
        super().__init__(weight, bias)
        d_out, d_in = self.weight.shape
        r = min(d_in, d_out) if r is None else _validate.rank(r, d_in, d_out)
        indices = svft_pattern(r, pattern, off_diag, seed).to(self.weight.device)
        u, s, vh = torch.linalg.svd(self.weight.to(torch.float64), full_matrices=False)
        self.register_buffer("svft_u", u[:, :r].to(self.weight.dtype).contiguous())
        self.register_buffer("svft_s", s[:r].to(self.weight.dtype).contiguous())
        self.register_buffer("svft_vh", vh[:r].to(self.weight.dtype).contiguous())
        self.register_buffer("svft_indices", indices)
        if svft_m is None:
            svft_m = torch.zeros(indices.shape[1], dtype=self.weight.dtype, device=self.weight.device)
        self.svft_m = checked_parameter("svft_m", svft_m, (indices.shape[1],), self.weight)
        self.r, self.pattern, self.off_diag = r, pattern, off_diag

    def coefficient_matrix(self) -> torch.Tensor:
        """The dense r x r matrix M."""
        rows, cols = self.svft_indices
        m = torch.zeros(self.r, self.r, dtype=self.svft_m.dtype, device=self.svft_m.device)
        return m.index_put((rows, cols), self.svft_m, accumulate=True)

    def delta_weight(self) -> torch.Tensor:
        return self.svft_u @ self.coefficient_matrix() @ self.svft_vh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.svft_indices
        z = x @ self.svft_vh.T                                                  # (..., r)
        t = torch.zeros_like(z).index_add(-1, rows, z[..., cols] * self.svft_m)  # z M^T
        return self.base(x) + t @ self.svft_u.T

    @classmethod
    def demo(cls, pattern: str = "banded") -> "SVFT":
        g = torch.Generator().manual_seed(0)
        d_out, d_in, r, off_diag = 11, 15, 7, (0 if pattern == "plain" else 2)
        k = svft_pattern(r, pattern, off_diag, seed=0).shape[1]
        return cls(torch.randn(d_out, d_in, generator=g, dtype=torch.float64),
                   torch.randn(d_out, generator=g, dtype=torch.float64), r, pattern=pattern,
                   off_diag=off_diag, seed=0, svft_m=torch.randn(k, generator=g, dtype=torch.float64))


REFERENCES = {"miss": MiSS, "shira": SHiRA, "ia3": IA3, "svft": SVFT}
