"""Dense references of the model-level and mixture methods: LoReFT, LN tuning, prompt tuning,
Poly, X-LoRA and trainable tokens.

None of these is a single linear-weight change, so every class sets ``has_delta_weight = False``
(``fastadapt demo`` skips them).  Poly and X-LoRA wrap a frozen ``nn.Linear`` and subclass
:class:`ReferenceAdapter` for its ``weight`` / ``bias`` buffers; their change of W depends on the
task id (Poly) or on per-token scalings (X-LoRA), so it is exposed per task / computed in
``forward`` rather than through ``delta_weight()``.  The others act on hidden states,
embeddings or norms and subclass ``nn.Module``.

Everything runs in float64: constructors and ``from_peft`` copy parameters to float64 and
``forward`` computes in the input's dtype (pass float64 inputs for oracle use).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validate
from ._base import ReferenceAdapter, float64

# PEFT's Poly router divides by (sum of skill weights + 1e-12); reproduced for bit-level parity.
POLY_ROUTER_EPS = 1e-12


def _indices(name: str, ids, size: int) -> torch.Tensor:
    """Integer indices (token ids, positions, task ids) in 0..size-1 as a LongTensor; ValueError
    naming ``name`` and the valid range otherwise."""
    ids = torch.as_tensor(ids)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer indices, got dtype {ids.dtype}")
    ids = ids.long()
    if ids.numel() and (ids.min() < 0 or ids.max() >= size):
        bad = ids[(ids < 0) | (ids >= size)].unique().tolist()
        raise ValueError(f"{name} holds {bad}, out of range; valid range: 0..{size - 1}")
    return ids


# ----------------------------------------------------------------------------------------------
# LoReFT
# ----------------------------------------------------------------------------------------------
class LoReFT(nn.Module):
    r"""LoReFT: low-rank linear subspace representation fine-tuning (Wu et al., arXiv:2404.03592).

    At the chosen positions a hidden state ``h`` (d,) is edited inside an r-dimensional subspace:

        Phi(h) = h + R^T (W h + b - R h)

    ``rotation`` R: (r, d) with orthonormal rows (R R^T = I_r), ``weight`` W: (r, d),
    ``bias`` b: (r,).  Consequences used by the tests: R Phi(h) = W h + b (the subspace
    coordinates are replaced by the learned projection), the orthogonal complement of the rows
    of R is left untouched, and W = R, b = 0 is the identity.

    ``forward(h, positions=None)``: ``h`` (batch, seq, d); ``positions`` None (every position),
    a 1-D LongTensor (the same positions in every sequence) or a (batch, n_positions) LongTensor
    (per-sequence positions), each in 0..seq-1.  Positions not listed are returned unchanged.
    PEFT does not have LoReFT; pyreft trains R through an orthogonal parametrisation, this
    reference takes R as given and checks its orthonormality.
    """

    has_delta_weight = False

    def __init__(self, rotation: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 *, orthonormal_atol: float = 1e-8):
        super().__init__()
        _validate.tensor("rotation", rotation, ndim=2)
        r, d = rotation.shape
        _validate.rank(r, d, d, name="r")
        _validate.tensor("weight", weight, shape=(r, d))
        if bias is not None:
            _validate.tensor("bias", bias, shape=(r,))
        rotation = float64(rotation)
        gram_error = (rotation @ rotation.T - torch.eye(r, dtype=torch.float64)).abs().max().item()
        if gram_error > orthonormal_atol:
            raise ValueError(
                f"rotation rows must be orthonormal (R R^T = I); max |R R^T - I| = {gram_error:.2e} > "
                f"orthonormal_atol={orthonormal_atol:g}; orthonormalise with LoReFT.orthonormal_rows(...)")
        self.rotation = nn.Parameter(rotation)
        self.weight = nn.Parameter(float64(weight))
        self.bias = nn.Parameter(torch.zeros(r, dtype=torch.float64) if bias is None else float64(bias))

    @property
    def rank(self) -> int:
        return self.rotation.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.rotation.shape[1]

    @staticmethod
    def orthonormal_rows(matrix: torch.Tensor) -> torch.Tensor:
        """(r, d) -> (r, d) with orthonormal rows spanning the same row space (QR of the transpose)."""
        q, _ = torch.linalg.qr(matrix.to(torch.float64).T)
        return q.T.contiguous()

    def intervene(self, h: torch.Tensor) -> torch.Tensor:
        """Phi(h) = h + R^T (W h + b - R h) on every vector of ``h`` (..., d)."""
        edit = F.linear(h, self.weight, self.bias) - F.linear(h, self.rotation)
        return h + edit @ self.rotation

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        _validate.tensor("h", h, ndim=3)
        if h.shape[-1] != self.hidden_size:
            raise ValueError(f"h has hidden size {h.shape[-1]}; this LoReFT expects {self.hidden_size}")
        if positions is None:
            return self.intervene(h)
        batch, seq = h.shape[:2]
        positions = _indices("positions", positions, seq)
        if positions.ndim == 1:
            positions = positions.expand(batch, -1)
        elif positions.ndim != 2 or positions.shape[0] != batch:
            raise ValueError(f"positions must be 1-D or (batch={batch}, n_positions); got shape "
                             f"{tuple(positions.shape)}")
        index = positions.to(h.device).unsqueeze(-1).expand(-1, -1, h.shape[-1])
        selected = torch.gather(h, 1, index)
        return h.scatter(1, index, self.intervene(selected))

    @classmethod
    def demo(cls, hidden_size: int = 12, r: int = 3, seed: int = 0) -> "LoReFT":
        g = torch.Generator().manual_seed(seed)
        rotation = cls.orthonormal_rows(torch.randn(r, hidden_size, generator=g, dtype=torch.float64))
        return cls(rotation, torch.randn(r, hidden_size, generator=g, dtype=torch.float64),
                   torch.randn(r, generator=g, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# LN tuning
# ----------------------------------------------------------------------------------------------
# transformers RMSNorm classes whose forward is weight * x / sqrt(mean(x^2) + variance_epsilon)
# (the Llama formula; GemmaRMSNorm's (1 + weight) differs and is deliberately not listed).
_LLAMA_STYLE_RMSNORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


class LNTuning(nn.Module):
    r"""LN tuning: train only a copy of the normalisation layers' affine parameters
    (Zhao et al., "Tuning LayerNorm in Attention", arXiv:2312.11420; PEFT ``LN_TUNING``).

    For x (..., d), over the last dimension:

        layernorm: y = (x - mean(x)) / sqrt(var(x) + eps) * w + b      (biased variance)
        rmsnorm:   y = x / sqrt(mean(x^2) + eps) * w (+ b where given)

    ``weight`` w and ``bias`` b (d,) are trainable parameters initialised from the frozen
    originals, kept as buffers ``base_weight`` / ``base_bias`` (PEFT deep-copies the layer; the
    original stays in the model).  ``eps=None`` for rmsnorm means ``torch.finfo(x.dtype).eps``
    as in ``torch.nn.RMSNorm``.  transformers' LlamaRMSNorm normalises in float32 even for float64
    inputs; this reference normalises in the input dtype (the exact float64 formula).
    """

    has_delta_weight = False
    KINDS = ("layernorm", "rmsnorm")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, kind: str = "layernorm",
                 eps: float | None = 1e-5):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"kind={kind!r} is not a normalisation this reference knows; valid choices: {self.KINDS}")
        if kind == "layernorm" and eps is None:
            raise ValueError("eps=None is only defined for kind='rmsnorm'; give layernorm a float eps, e.g. eps=1e-5")
        _validate.tensor("weight", weight, ndim=1)
        if bias is not None:
            _validate.tensor("bias", bias, shape=weight.shape)
        self.kind = kind
        self.eps = eps
        self.register_buffer("base_weight", float64(weight))
        self.register_buffer("base_bias", None if bias is None else float64(bias))
        self.weight = nn.Parameter(float64(weight))
        self.bias = None if bias is None else nn.Parameter(float64(bias))

    @property
    def normalized_size(self) -> int:
        return self.weight.shape[0]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The affine-free normalisation of ``x`` over its last dimension."""
        _validate.tensor("x", x, min_ndim=1)
        if x.shape[-1] != self.normalized_size:
            raise ValueError(f"x has last dimension {x.shape[-1]}; this norm expects {self.normalized_size}")
        if self.kind == "layernorm":
            centred = x - x.mean(-1, keepdim=True)
            return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.normalize(x) * self.weight
        return y if self.bias is None else y + self.bias

    @classmethod
    def from_norm(cls, norm: nn.Module) -> "LNTuning":
        """Reference for a norm module: ``nn.LayerNorm`` (1-D normalized_shape, affine), ``nn.RMSNorm``
        (affine) or a Llama-style transformers RMSNorm; the trainable copy starts at its parameters."""
        name = type(norm).__name__
        if isinstance(norm, nn.LayerNorm):
            if len(norm.normalized_shape) != 1 or norm.weight is None:
                raise ValueError(f"norm={name} must normalise one dimension with elementwise_affine=True; "
                                 f"got normalized_shape={tuple(norm.normalized_shape)}")
            return cls(norm.weight, norm.bias, kind="layernorm", eps=norm.eps)
        if isinstance(norm, nn.RMSNorm):
            if len(norm.normalized_shape) != 1 or norm.weight is None:
                raise ValueError(f"norm={name} must normalise one dimension with elementwise_affine=True; "
                                 f"got normalized_shape={tuple(norm.normalized_shape)}")
            return cls(norm.weight, None, kind="rmsnorm", eps=norm.eps)
        if name in _LLAMA_STYLE_RMSNORMS:
            return cls(norm.weight, None, kind="rmsnorm", eps=norm.variance_epsilon)
        raise ValueError(f"norm={name} is not supported; valid choices: nn.LayerNorm, nn.RMSNorm, "
                         f"{', '.join(_LLAMA_STYLE_RMSNORMS)}")

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default") -> "LNTuning":
        """From a PEFT ``LNTuningLayer``: the trainable copy is ``layer.ln_tuning_layers[adapter_name]``,
        the frozen original is ``layer.base_layer``."""
        if adapter_name not in layer.ln_tuning_layers:
            raise ValueError(f"adapter_name={adapter_name!r} not in this layer; valid choices: "
                             f"{list(layer.ln_tuning_layers)}")
        ref = cls.from_norm(layer.ln_tuning_layers[adapter_name])
        base = layer.get_base_layer()
        ref.base_weight.copy_(base.weight.detach())
        if ref.base_bias is not None:
            ref.base_bias.copy_(base.bias.detach())
        return ref

    @classmethod
    def demo(cls, size: int = 12, seed: int = 0) -> "LNTuning":
        g = torch.Generator().manual_seed(seed)
        return cls(1 + 0.1 * torch.randn(size, generator=g, dtype=torch.float64),
                   0.1 * torch.randn(size, generator=g, dtype=torch.float64), kind="layernorm", eps=1e-5)


# ----------------------------------------------------------------------------------------------
# Prompt tuning
# ----------------------------------------------------------------------------------------------
class PromptTuning(nn.Module):
    r"""Prompt tuning: trainable virtual-token embeddings prepended to the input embeddings
    (Lester et al., arXiv:2104.08691; PEFT ``PROMPT_TUNING``).

        E' = [P ; E]          P: (n_virtual, d) trainable, E: (batch, seq, d) the word embeddings
        mask' = [1 ; mask]    mask: (batch, seq) -> (batch, n_virtual + seq)

    ``forward(inputs_embeds, attention_mask=None)`` returns ``(E', mask')`` (mask' is None when
    mask is); the frozen model then runs on ``inputs_embeds=E', attention_mask=mask'``.  Its
    outputs at the first n_virtual positions belong to the virtual tokens.  The prompt is cast
    to the dtype of the embeddings, as PEFT does.
    """

    has_delta_weight = False

    def __init__(self, prompt: torch.Tensor):
        super().__init__()
        _validate.tensor("prompt", prompt, ndim=2)
        _validate.positive_int("num_virtual_tokens", prompt.shape[0])
        self.prompt = nn.Parameter(float64(prompt))

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.shape[0]

    @property
    def token_dim(self) -> int:
        return self.prompt.shape[1]

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None):
        _validate.tensor("inputs_embeds", inputs_embeds, ndim=3)
        batch, seq, dim = inputs_embeds.shape
        if dim != self.token_dim:
            raise ValueError(f"inputs_embeds has dim {dim}; this prompt has token_dim={self.token_dim}")
        prompt = self.prompt.to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        embeds = torch.cat([prompt, inputs_embeds], dim=1)
        if attention_mask is None:
            return embeds, None
        if tuple(attention_mask.shape) != (batch, seq):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({batch}, {seq})")
        ones = torch.ones(batch, self.num_virtual_tokens, dtype=attention_mask.dtype, device=attention_mask.device)
        return embeds, torch.cat([ones, attention_mask], dim=1)

    @classmethod
    def from_peft(cls, peft_model, adapter_name: str = "default") -> "PromptTuning":
        """From a PEFT prompt-tuning ``PeftModel`` (one transformer submodule: decoder-only)."""
        if adapter_name not in peft_model.prompt_encoder:
            raise ValueError(f"adapter_name={adapter_name!r} has no prompt; valid choices: "
                             f"{list(peft_model.prompt_encoder)}")
        config = peft_model.peft_config[adapter_name]
        if config.num_transformer_submodules != 1:
            raise ValueError(f"num_transformer_submodules={config.num_transformer_submodules}; this reference "
                             "covers decoder-only models (num_transformer_submodules=1)")
        return cls(peft_model.prompt_encoder[adapter_name].embedding.weight)

    @classmethod
    def demo(cls, num_virtual_tokens: int = 4, token_dim: int = 12, seed: int = 0) -> "PromptTuning":
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randn(num_virtual_tokens, token_dim, generator=g, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Trainable tokens
# ----------------------------------------------------------------------------------------------
class TrainableTokens(nn.Module):
    r"""Trainable tokens: only the embedding rows of selected token ids train (PEFT
    ``TRAINABLE_TOKENS``, https://huggingface.co/docs/peft/package_reference/trainable_tokens).

        W' = W with rows W'[t_i] = V_i       W: (vocab, d) frozen, V: (k, d) trainable,
        embed(ids) = W'[ids] * embed_scale  t: (k,) distinct ids in 0..vocab-1

    The rows replace (not add to) the originals, as in PEFT.  ``embed_scale`` (default 1)
    reproduces scaled embeddings such as Gemma's.  ``merged_weight()`` is W'.  With tied input and
    output embeddings PEFT wraps the output head with the same rows: ``logits(h) = h W'^T``.
    """

    has_delta_weight = False

    def __init__(self, weight: torch.Tensor, token_indices, rows: torch.Tensor | None = None,
                 *, embed_scale: float = 1.0):
        super().__init__()
        _validate.tensor("weight", weight, ndim=2)
        vocab_size, dim = weight.shape
        indices = _indices("token_indices", token_indices, vocab_size)
        if indices.ndim != 1 or indices.numel() == 0:
            raise ValueError(f"token_indices must be a non-empty list of ids; got shape {tuple(indices.shape)}")
        if indices.unique().numel() != indices.numel():
            raise ValueError(f"token_indices must be distinct; got {indices.tolist()}")
        self.register_buffer("weight", float64(weight))
        self.register_buffer("token_indices", indices)
        if rows is None:
            rows = weight[indices]
        _validate.tensor("rows", rows, shape=(indices.numel(), dim))
        self.rows = nn.Parameter(float64(rows))
        self.embed_scale = float(embed_scale)

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def merged_weight(self) -> torch.Tensor:
        return self.weight.index_copy(0, self.token_indices, self.rows)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = _indices("input_ids", input_ids, self.vocab_size)
        return self.merged_weight()[ids] * self.embed_scale

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied output head: hidden (..., d) -> (..., vocab) = hidden W'^T."""
        _validate.tensor("hidden", hidden, min_ndim=1)
        if hidden.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"hidden has size {hidden.shape[-1]}; the embedding dim is {self.weight.shape[1]}")
        return F.linear(hidden, self.merged_weight())

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default") -> "TrainableTokens":
        """From a PEFT ``TrainableTokensLayer`` wrapping an ``nn.Embedding``."""
        if adapter_name not in layer.trainable_tokens_delta:
            raise ValueError(f"adapter_name={adapter_name!r} not in this layer; valid choices: "
                             f"{list(layer.trainable_tokens_delta)}")
        base = layer.get_base_layer()
        if not isinstance(base, nn.Embedding) or base.max_norm is not None:
            raise ValueError(f"layer must wrap an nn.Embedding without max_norm; got {base!r}")
        scale = layer._get_embed_scale()
        return cls(base.weight, layer.token_indices[adapter_name], layer.trainable_tokens_delta[adapter_name],
                   embed_scale=1.0 if scale is None else float(scale))

    @classmethod
    def demo(cls, vocab_size: int = 20, dim: int = 8, seed: int = 0) -> "TrainableTokens":
        g = torch.Generator().manual_seed(seed)
        indices = [1, 7, 13]
        return cls(torch.randn(vocab_size, dim, generator=g, dtype=torch.float64), indices,
                   torch.randn(len(indices), dim, generator=g, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Poly
# ----------------------------------------------------------------------------------------------
class Poly(ReferenceAdapter):
    r"""Poly: a per-task mixture of LoRA skills (Ponti et al., arXiv:2202.13914; PEFT ``POLY``).

    Shapes: A (n_splits, n_skills, d_in/n_splits, r), B (n_splits, n_skills, r, d_out/n_splits),
    ``module_logits`` Z (n_tasks, n_splits * n_skills).  For a sample of task t (eval-mode router):

        p[q, s] = sigmoid(Z[t, q*n_skills + s]),   w[q, s] = p[q, s] / (sum_s' p[q, s'] + 1e-12)
        A_t = stack_q  sum_s w[q, s] A[q, s]      (d_in, r)   splits stacked along d_in
        B_t = concat_q sum_s w[q, s] B[q, s]      (r, d_out)  splits side by side along d_out
        y   = x W^T + bias + (x A_t B_t) / r,     i.e. delta W_t = (A_t B_t)^T / r  (d_out, d_in)

    ``forward(x, task_ids)``: x (batch, ..., d_in), task_ids (batch,) in 0..n_tasks-1.
    In training mode PEFT draws w from a RelaxedBernoulli (random); this reference is its
    deterministic eval-mode router.
    """

    has_delta_weight = False

    def __init__(self, weight, bias, lora_A: torch.Tensor, lora_B: torch.Tensor, module_logits: torch.Tensor):
        super().__init__(float64(weight), None if bias is None else float64(bias))
        _validate.tensor("lora_A", lora_A, ndim=4)
        n_splits, n_skills, _, r = lora_A.shape
        _validate.positive_int("n_skills", n_skills)
        _validate.divides("n_splits", n_splits, self.in_features, "in_features")
        _validate.divides("n_splits", n_splits, self.out_features, "out_features")
        _validate.rank(r, self.in_features, self.out_features)
        _validate.tensor("lora_A", lora_A, shape=(n_splits, n_skills, self.in_features // n_splits, r))
        _validate.tensor("lora_B", lora_B, shape=(n_splits, n_skills, r, self.out_features // n_splits))
        _validate.tensor("module_logits", module_logits, ndim=2)
        if module_logits.shape[1] != n_splits * n_skills:
            raise ValueError(f"module_logits has {module_logits.shape[1]} columns; expected n_splits * n_skills = "
                             f"{n_splits * n_skills}")
        self.lora_A = nn.Parameter(float64(lora_A))
        self.lora_B = nn.Parameter(float64(lora_B))
        self.module_logits = nn.Parameter(float64(module_logits))

    @property
    def r(self) -> int:
        return self.lora_A.shape[3]

    @property
    def n_tasks(self) -> int:
        return self.module_logits.shape[0]

    @property
    def n_splits(self) -> int:
        return self.lora_A.shape[0]

    @property
    def n_skills(self) -> int:
        return self.lora_A.shape[1]

    def mixing_weights(self, task_id: int) -> torch.Tensor:
        """w (n_splits, n_skills) for one task."""
        probs = torch.sigmoid(self.module_logits[task_id].view(self.n_splits, self.n_skills))
        return probs / (probs.sum(-1, keepdim=True) + POLY_ROUTER_EPS)

    def task_factors(self, task_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_t (d_in, r), B_t (r, d_out)) for one task."""
        w = self.mixing_weights(task_id)
        a_splits = [sum(w[q, s] * self.lora_A[q, s] for s in range(self.n_skills)) for q in range(self.n_splits)]
        b_splits = [sum(w[q, s] * self.lora_B[q, s] for s in range(self.n_skills)) for q in range(self.n_splits)]
        return torch.cat(a_splits, dim=0), torch.cat(b_splits, dim=1)

    def task_delta_weight(self, task_id: int) -> torch.Tensor:
        """delta W_t = (A_t B_t)^T / r, (d_out, d_in)."""
        a, b = self.task_factors(task_id)
        return (a @ b).T / self.r

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        _validate.tensor("x", x, min_ndim=2)
        task_ids = _indices("task_ids", task_ids, self.n_tasks)
        if task_ids.shape != (x.shape[0],):
            raise ValueError(f"task_ids must have shape (batch={x.shape[0]},); got {tuple(task_ids.shape)}")
        out = []
        for sample, task in zip(x, task_ids.tolist()):
            a, b = self.task_factors(task)
            out.append(self.base(sample) + (sample @ a @ b) / self.r)
        return torch.stack(out)

    @classmethod
    def from_peft(cls, layer, adapter_name: str = "default") -> "Poly":
        """From a PEFT ``poly.Linear`` (its router's ``module_logits``, ``poly_lora_A/B``)."""
        if adapter_name not in layer.poly_lora_A:
            raise ValueError(f"adapter_name={adapter_name!r} not in this layer; valid choices: "
                             f"{list(layer.poly_lora_A)}")
        if layer.poly_type[adapter_name] != "poly":
            raise ValueError(f"poly_type={layer.poly_type[adapter_name]!r}; valid choices: ['poly']")
        base = layer.get_base_layer()
        return cls(base.weight, base.bias, layer.poly_lora_A[adapter_name], layer.poly_lora_B[adapter_name],
                   layer.poly_router[adapter_name].module_logits)

    @classmethod
    def demo(cls, d_in: int = 12, d_out: int = 8, r: int = 2, n_tasks: int = 3, n_skills: int = 4,
             n_splits: int = 2, seed: int = 0) -> "Poly":
        g = torch.Generator().manual_seed(seed)

        def rand(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        return cls(rand(d_out, d_in) / d_in ** 0.5, rand(d_out), rand(n_splits, n_skills, d_in // n_splits, r),
                   rand(n_splits, n_skills, r, d_out // n_splits), rand(n_tasks, n_splits * n_skills))


# ----------------------------------------------------------------------------------------------
# X-LoRA
# ----------------------------------------------------------------------------------------------
class XLoRA(ReferenceAdapter):
    r"""X-LoRA: a mixture of LoRA experts weighted per token (Buehler & Buehler, arXiv:2402.07148;
    PEFT ``XLORA``), one adapted Linear given the classifier's scalings for this layer.

        s' = gate(s)                                     s: (batch, seq, n_experts)
        y  = x W^T + bias + g * sum_e scaling_e * ((s'_e x) A_e^T) B_e^T

    ``experts``: list of (A_e (r_e, d_in), B_e (d_out, r_e), scaling_e) in PEFT's active-adapter
    order; g = ``global_scaling_weight``.  gate (PEFT's ``get_maybe_topk_scalings``):
    with ``top_k`` every entry outside the k largest of a token is set to 0; with
    ``softmax_topk`` the non-zero entries of a token are replaced by their softmax (zeros stay 0).
    The scalings come from X-LoRA's classifier: softmax(classifier(h) / T) over experts on the base
    model's last hidden state (:meth:`classifier_scalings` turns its logits into the per-layer
    scalings); ``forward`` takes this layer's slice.  LoRA dropout is not part of the reference
    (eval mode).
    """

    has_delta_weight = False

    def __init__(self, weight, bias, experts, *, top_k: int | None = None, softmax_topk: bool = False,
                 global_scaling_weight: float = 1.0):
        super().__init__(float64(weight), None if bias is None else float64(bias))
        if not experts:
            raise ValueError("experts must hold at least one (lora_A, lora_B, scaling) triple")
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.expert_scalings = []
        for e, (lora_a, lora_b, scaling) in enumerate(experts):
            _validate.tensor(f"experts[{e}].lora_A", lora_a, ndim=2)
            r = _validate.rank(lora_a.shape[0], self.in_features, self.out_features, name=f"experts[{e}].r")
            _validate.tensor(f"experts[{e}].lora_A", lora_a, shape=(r, self.in_features))
            _validate.tensor(f"experts[{e}].lora_B", lora_b, shape=(self.out_features, r))
            self.lora_A.append(nn.Parameter(float64(lora_a)))
            self.lora_B.append(nn.Parameter(float64(lora_b)))
            self.expert_scalings.append(float(scaling))
        if top_k is not None and not 1 <= top_k <= len(experts):
            raise ValueError(f"top_k={top_k!r} must be None or in 1..n_experts={len(experts)}")
        self.top_k = top_k
        self.softmax_topk = bool(softmax_topk)
        self.global_scaling_weight = float(global_scaling_weight)

    @property
    def n_experts(self) -> int:
        return len(self.lora_A)

    def gate(self, scalings: torch.Tensor) -> torch.Tensor:
        """Top-k masking and softmax over the kept entries, per token (last dimension)."""
        if self.top_k is not None:
            kept = torch.zeros_like(scalings, dtype=torch.bool)
            kept.scatter_(-1, scalings.topk(self.top_k, dim=-1).indices, True)
            scalings = torch.where(kept, scalings, torch.zeros_like(scalings))
        if self.softmax_topk:
            nonzero = scalings != 0
            soft = torch.softmax(scalings.masked_fill(~nonzero, float("-inf")), dim=-1)
            scalings = torch.where(nonzero, soft, torch.zeros_like(soft))
        return scalings

    @staticmethod
    def classifier_scalings(logits: torch.Tensor, n_layers: int, *, temperature: float = 1.0,
                            enable_softmax: bool = True, layerwise: bool = False) -> torch.Tensor:
        r"""Scalings for every X-LoRA layer from the classifier's logits on the base model's last
        hidden state: (batch, seq, n_experts), or (batch, seq, n_layers * n_experts) layer-major when
        ``layerwise``, -> (batch, seq, n_layers, n_experts); softmax(logits / T) over experts when
        ``enable_softmax``.  Layer l of the model uses ``[:, :, l, :]``."""
        _validate.tensor("logits", logits, ndim=3)
        _validate.positive_int("n_layers", n_layers)
        batch, seq, width = logits.shape
        if layerwise:
            if width % n_layers:
                raise ValueError(f"logits width {width} is not n_layers={n_layers} times n_experts")
            scalings = logits.reshape(batch, seq, n_layers, width // n_layers)
        else:
            scalings = logits.unsqueeze(2).expand(batch, seq, n_layers, width)
        return torch.softmax(scalings / temperature, dim=-1) if enable_softmax else scalings

    def forward(self, x: torch.Tensor, scalings: torch.Tensor) -> torch.Tensor:
        _validate.tensor("x", x, ndim=3)
        _validate.tensor("scalings", scalings, shape=(*x.shape[:2], self.n_experts))
        gated = self.gate(scalings)
        out = self.base(x)
        for e in range(self.n_experts):
            x_e = x * gated[..., e:e + 1]
            lora_out = x_e @ self.lora_A[e].T @ self.lora_B[e].T
            out = out + self.global_scaling_weight * self.expert_scalings[e] * lora_out
        return out

    @classmethod
    def from_peft(cls, layer, adapter_name: str | None = None) -> "XLoRA":
        """From a PEFT ``lora.Linear`` whose forward X-LoRA replaced (``XLoraLinearLayer``): the experts
        are its active adapters in order; top-k, softmax-top-k and the global weight come from the
        X-LoRA config.  ``adapter_name`` is unused (X-LoRA mixes every active adapter)."""
        xlora_layer = getattr(layer.forward, "__self__", None)
        if type(xlora_layer).__name__ != "XLoraLinearLayer":
            raise ValueError("layer must be a lora.Linear converted by X-LoRA (its forward bound to an "
                             f"XLoraLinearLayer); got forward of {type(xlora_layer).__name__}")
        experts = []
        for name in layer.active_adapters:
            if layer.use_dora[name] or layer.lora_bias[name]:
                raise ValueError(f"adapter {name!r} uses DoRA or lora_bias; this reference covers plain LoRA experts")
            experts.append((layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]))
        config = xlora_layer.config
        base = layer.get_base_layer()
        return cls(base.weight, base.bias, experts, top_k=config.top_k_lora, softmax_topk=config.enable_softmax_topk,
                   global_scaling_weight=config.global_scaling_weight)

    @classmethod
    def demo(cls, d_in: int = 12, d_out: int = 8, ranks=(2, 3, 4), seed: int = 0) -> "XLoRA":
        g = torch.Generator().manual_seed(seed)
        experts = [(torch.randn(r, d_in, generator=g, dtype=torch.float64),
                    torch.randn(d_out, r, generator=g, dtype=torch.float64), 2.0 / r) for r in ranks]
        return cls(torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5,
                   torch.randn(d_out, generator=g, dtype=torch.float64), experts, top_k=2, softmax_topk=True)


REFERENCES = {
    "loreft": LoReFT,
    "ln_tuning": LNTuning,
    "prompt_tuning": PromptTuning,
    "poly": Poly,
    "xlora": XLoRA,
    "trainable_tokens": TrainableTokens,
}
