"""Dense reference of CLOVER: cross-layer orthogonal vectors (Meng et al., arXiv:2411.17426).

CLOVER treats the two projections that meet inside one attention head as one low-rank
bilinear map and re-parameterises it by its SVD.  Not in PEFT; not a single-Linear adapter
(it rewrites a *pair* of weights jointly), so the class subclasses ``nn.Module`` and has no
dense delta of one weight (``has_delta_weight = False``); :meth:`CLOVER.adapted_weights` gives
the pair of rewritten weights instead.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _validate

PAIRS = ("qk", "vo")


def head_factors(first: torch.Tensor, second: torch.Tensor, num_heads: int, pair: str):
    """Per-head factors ``(L, Rt)`` (num_heads, d, head_dim) with ``M_h = L_h Rt_h^T``.

    ``pair="qk"``: ``first = q_weight``, ``second = k_weight``, both (num_heads head_dim,
    d_model) as nn.Linear stores them; ``M_h = Wq_h^T Wk_h`` (d_model x d_model) is the bilinear
    form of the head's attention logits ``x M_h x'^T``.
    ``pair="vo"``: ``first = v_weight`` (num_heads head_dim, d_model), ``second = o_weight``
    (d_out, num_heads head_dim); ``M_h = Wv_h^T Wo_h^T`` (d_model x d_out) maps a token to the
    head's contribution to the output (before the attention probabilities mix tokens).
    """
    head_dim = first.shape[0] // num_heads
    left = first.reshape(num_heads, head_dim, -1).transpose(1, 2)            # (H, d_model, head_dim)
    if pair == "qk":
        right = second.reshape(num_heads, head_dim, -1).transpose(1, 2)      # (H, d_model, head_dim)
    else:
        right = second.reshape(second.shape[0], num_heads, head_dim).transpose(0, 1)  # (H, d_out, head_dim)
    return left, right


class CLOVER(nn.Module):
    """CLOVER joint Q-K or V-O adapter, dense float64 reference.

    Per head ``h`` the product of the pair is decomposed without forming it::

        M_h = L_h Rt_h^T,   L_h = Q_L R_L,   Rt_h = Q_R R_R          (thin QR, head_dim columns)
        R_L R_R^T = u diag(s) v^T                                    (head_dim x head_dim SVD)
        M_h = U_h diag(s_h) V_h^T,   U_h = Q_L u,   V_h = Q_R v       (U, V orthonormal columns)

    The adapter keeps the top ``r`` singular directions (default ``r = head_dim``: lossless; smaller ``r``
    prunes, the best rank-``r`` approximation of ``M_h``), freezes ``U`` (H, d_model, r) and
    ``V`` (H, d, r), and trains ``clover_S`` (H, r, r), initialised to ``diag(s_h[:r])``::

        adapted M_h = U_h S_h V_h^T
        qk:  logits_h(x, x') = (x U_h S_h) (x' V_h)^T         q' rows: (U_h S_h)^T, k' rows: V_h^T
        vo:  head output_h(x) = x U_h S_h V_h^T               v' rows: (U_h S_h)^T, o' columns: V_h

    Training the full ``S_h`` mixes all of the head's orthogonal vectors (a full-rank update of
    ``M_h`` within the span of ``U_h``, ``V_h``).  Logits are unscaled (the model keeps its
    ``1/sqrt(head_dim)``).  Rotary position embeddings sit between q/k and their product, so the
    Q-K pair is exact only without RoPE on those dimensions (the paper's caveat); V-O is always
    exact.  Multi-head attention with as many key/value heads as query heads.
    """

    has_delta_weight = False

    def __init__(self, first: torch.Tensor, second: torch.Tensor, *, num_heads: int, pair: str = "qk",
                 r: int | None = None):
        super().__init__()
        if pair not in PAIRS:
            raise ValueError(f"pair={pair!r} is not a CLOVER pair; valid choices: {list(PAIRS)}")
        names = ("q_weight", "k_weight") if pair == "qk" else ("v_weight", "o_weight")
        _validate.tensor(names[0], first, ndim=2)
        _validate.tensor(names[1], second, ndim=2)
        _validate.same(names[0], first, names[1], second)
        _validate.divides("num_heads", num_heads, first.shape[0], f"{names[0]}.shape[0]")
        head_dim = first.shape[0] // num_heads
        if pair == "qk":
            _validate.tensor(names[1], second, shape=first.shape)
        elif second.shape[1] != first.shape[0]:
            raise ValueError(f"o_weight has shape {tuple(second.shape)}; expected (d_out, {first.shape[0]}) "
                             f"to match v_weight {tuple(first.shape)}")
        self.register_buffer("first", first.detach().clone())
        self.register_buffer("second", second.detach().clone())
        left, right = head_factors(self.first, self.second, num_heads, pair)
        top = min(head_dim, left.shape[1], right.shape[1])     # rank bound of M_h
        if r is None:
            r = top
        elif _validate.positive_int("r", r) > top:
            raise ValueError(f"r={r} exceeds the rank bound min(head_dim, d_model, d_out)={top} of each head's "
                             f"product; choose r in 1..{top}")
        self.pair, self.num_heads, self.head_dim, self.r = pair, num_heads, head_dim, r

        q_left, r_left = torch.linalg.qr(left)
        q_right, r_right = torch.linalg.qr(right)
        u, s, vh = torch.linalg.svd(r_left @ r_right.transpose(1, 2))
        self.register_buffer("U", (q_left @ u)[..., :r])                       # (H, d_model, r)
        self.register_buffer("V", (q_right @ vh.transpose(1, 2))[..., :r])     # (H, d, r)
        self.register_buffer("singular_values", s)                             # (H, head_dim)
        self.clover_S = nn.Parameter(torch.diag_embed(s[:, :r]))               # (H, r, r)

    def original_bilinear(self) -> torch.Tensor:
        """``M_h = L_h Rt_h^T`` from the frozen original weights, (H, d_model, d)."""
        left, right = head_factors(self.first, self.second, self.num_heads, self.pair)
        return left @ right.transpose(1, 2)

    def bilinear(self) -> torch.Tensor:
        """Adapted ``U_h S_h V_h^T``, (H, d_model, d)."""
        return self.U @ self.clover_S @ self.V.transpose(1, 2)

    def adapted_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rewritten pair in nn.Linear layout, with ``S`` folded into the first weight:
        qk -> (q_weight' (H r, d_model), k_weight' (H r, d_model));
        vo -> (v_weight' (H r, d_model), o_weight' (d_out, H r))."""
        first = (self.U @ self.clover_S).transpose(1, 2).reshape(self.num_heads * self.r, -1)
        if self.pair == "qk":
            second = self.V.transpose(1, 2).reshape(self.num_heads * self.r, -1)
        else:
            second = self.V.transpose(0, 1).reshape(self.V.shape[1], self.num_heads * self.r)
        return first, second

    def forward(self, x: torch.Tensor, x_keys: torch.Tensor | None = None) -> torch.Tensor:
        """qk: unscaled attention logits (..., H, T, T_keys) of queries ``x`` (..., T, d_model)
        against keys ``x_keys`` (default ``x``).  vo: per-head outputs (..., H, T, d_out)."""
        projected = x.unsqueeze(-3) @ self.U @ self.clover_S                   # (..., H, T, r)
        if self.pair == "vo":
            return projected @ self.V.transpose(1, 2)
        keys = (x if x_keys is None else x_keys).unsqueeze(-3) @ self.V      # (..., H, T_keys, r)
        return projected @ keys.transpose(-1, -2)

    @classmethod
    def demo(cls) -> "CLOVER":
        g = torch.Generator().manual_seed(20241126)
        q = torch.randn(12, 10, generator=g, dtype=torch.float64) / 10 ** 0.5
        k = torch.randn(12, 10, generator=g, dtype=torch.float64) / 10 ** 0.5
        clover = cls(q, k, num_heads=3)
        with torch.no_grad():
            clover.clover_S.add_(0.1 * torch.randn(3, 4, 4, generator=g, dtype=torch.float64))
        return clover


REFERENCES = {"clover": CLOVER}
