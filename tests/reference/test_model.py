"""Model-level / mixture references (fastadapt/reference/model.py) against their definitions and
against PEFT 0.21 in float64: LoReFT, LN tuning, prompt tuning, Poly, X-LoRA, trainable tokens.

PEFT models are built locally: nn.Sequential bases (fastadapt.testing.linear_model) or a tiny
LlamaForCausalLM from a LlamaConfig (hidden 32, 2 layers, 4 heads, vocab 64).  Nothing is
downloaded.  Zero- or near-zero-initialised adapter parameters are randomised before comparing.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from peft import (LNTuningConfig, LoraConfig, PolyConfig, PromptTuningConfig, TrainableTokensConfig,
                  get_peft_model)
from peft.tuners.xlora.config import XLoraConfig
from peft.tuners.xlora.layer import XLoraLinearLayer
from transformers import LlamaForCausalLM

from fastadapt.numerics import assert_rel_close
from fastadapt.reference.model import XLoRA, LNTuning, LoReFT, Poly, PromptTuning, TrainableTokens
from fastadapt import testing
from fastadapt.testing import generator, linear_model, randn, randomize_

# PEFT warns that norm layers are an "unsupported layer type" for LN tuning; it wraps them anyway.
pytestmark = pytest.mark.filterwarnings("ignore:Unsupported layer type:UserWarning")

F64 = torch.float64
VOCAB = 64


def tiny_llama(seed: int, tie_word_embeddings: bool = False) -> LlamaForCausalLM:
    """A float64 LlamaForCausalLM (hidden 32, 2 layers, 4 heads, vocab 64) with every weight redrawn."""
    return testing.tiny_llama(seed, vocab_size=VOCAB, tie_word_embeddings=tie_word_embeddings)


def token_batch(seed: int, batch: int = 3, seq: int = 7):
    """Random ids and a right-padded attention mask (first row padded by 2).  Right padding: with left
    padding the eager attention of a fully masked padded query row is NaN."""
    ids = torch.randint(0, VOCAB, (batch, seq), generator=generator(seed))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------- LoReFT
def test_loreft_rotation_rows_are_orthonormal_and_checked():
    ref = LoReFT.demo(hidden_size=13, r=4, seed=1)
    gram = ref.rotation @ ref.rotation.T
    assert_rel_close(gram, torch.eye(4, dtype=F64), name="R R^T")
    not_orthonormal = randn(4, 13)
    with pytest.raises(ValueError, match="rotation rows must be orthonormal"):
        LoReFT(not_orthonormal, randn(4, 13))


def test_loreft_is_identity_when_weight_equals_rotation_and_bias_zero():
    rotation = LoReFT.orthonormal_rows(randn(3, 11))
    ref = LoReFT(rotation, rotation.clone(), torch.zeros(3, dtype=F64))
    h = randn(2, 5, 11)
    assert_rel_close(ref(h), h, name="LoReFT(W=R, b=0)")
    assert_rel_close(ref(h, positions=torch.tensor([0, 4])), h, name="LoReFT(W=R, b=0) at positions")


def test_loreft_hand_computed_case():
    # d=2, r=1, R=[1,0], W=[2,3], b=[1]:  Phi([x, y]) = [x, y] + [1, 0] * (2x + 3y + 1 - x) = [2x + 3y + 1, y]
    ref = LoReFT(torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([[2.0, 3.0]], dtype=F64),
                 torch.tensor([1.0], dtype=F64))
    h = torch.tensor([[[1.0, 2.0], [-3.0, 0.5], [4.0, -1.0]]], dtype=F64)
    expected = torch.tensor([[[9.0, 2.0], [-3.0, 0.5], [6.0, -1.0]]], dtype=F64)
    assert_rel_close(ref(h, positions=torch.tensor([0, 2])), expected, name="LoReFT hand case")


def test_loreft_replaces_subspace_at_positions_only():
    ref = LoReFT.demo(hidden_size=17, r=5, seed=2)
    h = randn(3, 9, 17)
    positions = torch.tensor([[0, 4], [8, 1], [3, 3]])  # per-sequence positions (the last repeats one)
    out = ref(h, positions=positions)
    rows = torch.arange(3).unsqueeze(-1)
    edited, h_at = out[rows, positions], h[rows, positions]
    # R Phi(h) = W h + b inside the subspace; the orthogonal complement keeps h.
    assert_rel_close(edited @ ref.rotation.T, h_at @ ref.weight.T + ref.bias, name="R Phi(h)")
    complement = torch.eye(17, dtype=F64) - ref.rotation.T @ ref.rotation
    assert_rel_close(edited @ complement, h_at @ complement, name="(I - R^T R) Phi(h)")
    untouched = torch.ones(3, 9, dtype=torch.bool)
    untouched[rows, positions] = False
    assert torch.equal(out[untouched], h[untouched])
    assert not torch.allclose(edited, h_at)


def test_loreft_validation_names_parameter_and_range():
    with pytest.raises(ValueError, match=r"r=0"):
        LoReFT(torch.empty(0, 6, dtype=F64), torch.empty(0, 6, dtype=F64))
    with pytest.raises(ValueError, match=r"r=7.*1\.\.6"):
        LoReFT(randn(7, 6), randn(7, 6))
    ref = LoReFT.demo(hidden_size=6, r=2)
    with pytest.raises(ValueError, match=r"positions.*\[5\].*0\.\.4"):
        ref(randn(2, 5, 6), positions=torch.tensor([1, 5]))


# ---------------------------------------------------------------------------------------------- LN tuning
def _reference_model(peft_model, base_copy, reference_cls):
    """``base_copy`` with every PEFT-wrapped module replaced by ``reference_cls.from_peft`` of it."""
    replaced = 0
    for name, module in peft_model.get_base_model().named_modules():
        if type(module).__name__ == "LNTuningLayer":
            base_copy.set_submodule(name, reference_cls.from_peft(module))
            replaced += 1
    assert replaced > 0
    return base_copy


def test_ln_tuning_layernorm_and_rmsnorm_match_peft_outputs_and_grads():
    base = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.LayerNorm(13, eps=1e-4), torch.nn.Linear(13, 13),
                               torch.nn.RMSNorm(13, eps=None)).to(F64)
    randomize_(base, scale=0.5, seed=10)
    reference = copy.deepcopy(base)
    peft_model = get_peft_model(base, LNTuningConfig(target_modules=["1", "3"]))
    randomize_(peft_model, scale=0.5, seed=11, names=["ln_tuning_layers"])
    reference = _reference_model(peft_model, reference, LNTuning)

    x = randn(9, 41, 7)
    out_peft, out_ref = peft_model(x), reference(x)
    assert_rel_close(out_ref, out_peft, name="LN tuning output")
    out_peft.square().sum().backward()
    out_ref.square().sum().backward()
    for idx, norm in (("1", peft_model.base_model.model[1]), ("3", peft_model.base_model.model[3])):
        tuned, ref = norm.ln_tuning_layers["default"], reference[int(idx)]
        assert_rel_close(ref.weight.grad, tuned.weight.grad, name=f"d weight of norm {idx}")
        if getattr(tuned, "bias", None) is not None:
            assert_rel_close(ref.bias.grad, tuned.bias.grad, name=f"d bias of norm {idx}")
    # the frozen originals are kept beside the trainable copy
    assert torch.equal(reference[1].base_weight, peft_model.base_model.model[1].base_layer.weight)


def test_ln_tuning_matches_peft_on_tiny_llama():
    # LlamaRMSNorm normalises in float32 even for float64 inputs; torch.nn.RMSNorm is the same formula
    # in the input dtype, so swapping it in lets the comparison run at the float64 tolerance.
    base = tiny_llama(seed=20)
    for name, module in list(base.named_modules()):
        if type(module).__name__ == "LlamaRMSNorm":
            norm = torch.nn.RMSNorm(32, eps=module.variance_epsilon, dtype=F64)
            norm.weight.data.copy_(module.weight.data)
            base.set_submodule(name, norm)
    reference = copy.deepcopy(base)
    peft_model = get_peft_model(base, LNTuningConfig())  # PEFT's Llama targets: both layer norms + final norm
    randomize_(peft_model, scale=0.5, seed=21, names=["ln_tuning_layers"])
    reference = _reference_model(peft_model, reference, LNTuning)
    assert sum(isinstance(m, LNTuning) for m in reference.modules()) == 5

    ids, mask = token_batch(seed=22)
    expected = peft_model(input_ids=ids, attention_mask=mask).logits
    assert_rel_close(reference(input_ids=ids, attention_mask=mask).logits, expected, name="LN tuning logits")


def test_ln_tuning_llama_rmsnorm_agrees_to_float32_rounding():
    # With transformers' own LlamaRMSNorm (float32 normalisation) the float64 reference agrees to the
    # float32 tolerance: the difference is that rounding, not the formula.
    base = tiny_llama(seed=23)
    reference = copy.deepcopy(base)
    peft_model = get_peft_model(base, LNTuningConfig())
    randomize_(peft_model, scale=0.5, seed=24, names=["ln_tuning_layers"])
    reference = _reference_model(peft_model, reference, LNTuning)
    ids, mask = token_batch(seed=25)
    expected = peft_model(input_ids=ids, attention_mask=mask).logits
    assert_rel_close(reference(input_ids=ids, attention_mask=mask).logits, expected, torch.float32,
                     name="LN tuning logits vs LlamaRMSNorm")


def test_ln_tuning_validation():
    with pytest.raises(ValueError, match="kind='batchnorm'.*valid choices"):
        LNTuning(randn(5), kind="batchnorm")
    with pytest.raises(ValueError, match="norm=BatchNorm1d is not supported"):
        LNTuning.from_norm(torch.nn.BatchNorm1d(5))
    with pytest.raises(ValueError, match="last dimension 4.*expects 5"):
        LNTuning(randn(5))(randn(3, 4))


# ---------------------------------------------------------------------------------------------- prompt tuning
def test_prompt_tuning_matches_peft_logits_on_tiny_llama():
    base = tiny_llama(seed=30)
    peft_model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                         prompt_tuning_init="RANDOM"))
    randomize_(peft_model.prompt_encoder, scale=1.0, seed=31)
    ref = PromptTuning.from_peft(peft_model)
    assert ref.num_virtual_tokens == 3

    ids, mask = token_batch(seed=32)
    expected = peft_model(input_ids=ids, attention_mask=mask).logits
    frozen = peft_model.get_base_model()
    embeds, extended_mask = ref(frozen.get_input_embeddings()(ids), mask)
    assert extended_mask.shape == (3, 10) and torch.equal(extended_mask[:, :3], torch.ones(3, 3, dtype=torch.long))
    actual = frozen(inputs_embeds=embeds, attention_mask=extended_mask).logits
    assert_rel_close(actual[:, 3:], expected[:, 3:], name="prompt tuning logits, real tokens")
    assert_rel_close(actual, expected, name="prompt tuning logits, all positions")


def test_prompt_tuning_validation():
    ref = PromptTuning.demo(num_virtual_tokens=2, token_dim=6)
    with pytest.raises(ValueError, match="dim 5.*token_dim=6"):
        ref(randn(2, 3, 5))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        ref(randn(2, 3, 6), torch.ones(2, 4))
    with pytest.raises(ValueError, match="num_virtual_tokens=0"):
        PromptTuning(torch.empty(0, 6, dtype=F64))


# ---------------------------------------------------------------------------------------------- Poly
def _peft_poly_layer(d_in=15, d_out=9, r=2, n_tasks=5, n_skills=4, n_splits=3, seed=40):
    model = get_peft_model(linear_model(d_in, d_out, seed=seed),
                           PolyConfig(target_modules=["0"], r=r, n_tasks=n_tasks, n_skills=n_skills,
                                      n_splits=n_splits))
    layer = model.base_model.model[0]
    randomize_(layer, scale=1.0, seed=seed + 1, names=["poly_lora_B", "module_logits"])
    return layer.eval()


def test_poly_matches_peft_layer_for_task_ids():
    layer = _peft_poly_layer()
    ref = Poly.from_peft(layer)
    x = randn(4, 7, 15)
    task_ids = torch.tensor([0, 3, 4, 3])
    expected = layer(x, task_ids=task_ids)
    actual = ref(x, task_ids)
    assert_rel_close(actual, expected, name="Poly output")
    expected.square().sum().backward()
    actual.square().sum().backward()
    pairs = ((layer.poly_lora_A["default"], ref.lora_A), (layer.poly_lora_B["default"], ref.lora_B),
             (layer.poly_router["default"].module_logits, ref.module_logits))
    for peft_param, ref_param in pairs:
        assert_rel_close(ref_param.grad, peft_param.grad, name=f"Poly grad {tuple(ref_param.shape)}")
    # the adapter really contributes, and differently per task
    assert not torch.allclose(expected, ref.base(x))
    assert not torch.allclose(ref.task_delta_weight(0), ref.task_delta_weight(3))


def test_poly_forward_equals_per_task_merged_weight():
    ref = Poly.demo(d_in=12, d_out=8, r=3, n_tasks=3, n_skills=5, n_splits=4, seed=3)
    x = randn(3, 5, 12)
    task_ids = torch.tensor([2, 0, 2])
    merged = torch.stack([torch.nn.functional.linear(x[i], ref.weight + ref.task_delta_weight(t), ref.bias)
                          for i, t in enumerate(task_ids.tolist())])
    assert_rel_close(ref(x, task_ids), merged, name="Poly vs merged")


def test_poly_validation():
    ref = Poly.demo(d_in=12, d_out=8, n_tasks=3, n_splits=2)
    with pytest.raises(ValueError, match=r"task_ids holds \[3\].*0\.\.2"):
        ref(randn(2, 4, 12), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"n_splits=5 does not divide in_features=12"):
        Poly(randn(8, 12), None, randn(5, 2, 2, 2), randn(5, 2, 2, 1), randn(3, 10))
    with pytest.raises(ValueError, match=r"r=9 exceeds"):
        Poly(randn(8, 12), None, randn(2, 2, 6, 9), randn(2, 2, 9, 4), randn(3, 4))


# ---------------------------------------------------------------------------------------------- X-LoRA
def _peft_xlora_layer(top_k, softmax_topk, d_in=13, d_out=10, ranks=(2, 3, 5), seed=50):
    """A lora.Linear holding one LoRA expert per rank, its forward replaced by PEFT's XLoraLinearLayer
    (layer_number 1 of 2), exactly as XLoraModel wires it, but without loading checkpoints."""
    model = get_peft_model(linear_model(d_in, d_out, seed=seed),
                           LoraConfig(target_modules=["0"], r=ranks[0], lora_alpha=3), adapter_name="e0")
    for e, r in enumerate(ranks[1:], start=1):
        model.add_adapter(f"e{e}", LoraConfig(target_modules=["0"], r=r, lora_alpha=2 * e + 1))
    model.base_model.set_adapter([f"e{e}" for e in range(len(ranks))])
    layer = model.base_model.model[0]
    randomize_(layer, scale=0.5, seed=seed + 1, names=["lora_B"])
    config = XLoraConfig(hidden_size=d_in, adapters={f"e{e}": "unused" for e in range(len(ranks))},
                         enable_softmax=not softmax_topk, enable_softmax_topk=softmax_topk, top_k_lora=top_k,
                         global_scaling_weight=0.7)
    xlora_layer = XLoraLinearLayer(model=SimpleNamespace(disabled=False), target=layer, target_forward=layer.forward,
                                   layer_number=1, config=config)
    layer.forward = xlora_layer.forward
    return layer.eval()


@pytest.mark.parametrize("top_k, softmax_topk", [(None, False), (2, False), (2, True), (None, True)])
def test_xlora_matches_peft_layer_given_scalings(top_k, softmax_topk):
    layer = _peft_xlora_layer(top_k, softmax_topk)
    ref = XLoRA.from_peft(layer)
    assert ref.n_experts == 3 and ref.top_k == top_k and ref.softmax_topk == softmax_topk
    x = randn(4, 6, 13)
    # classifier-like scalings: per-token softmax over experts, for each of the 2 X-LoRA layers
    scalings = torch.softmax(randn(4, 6, 2, 3, scale=2.0), dim=-1)
    expected = layer(x, scalings=scalings)
    actual = ref(x, scalings[:, :, 1, :])
    assert_rel_close(actual, expected, name=f"X-LoRA top_k={top_k} softmax={softmax_topk}")
    assert not torch.allclose(expected, ref.base(x))
    expected.square().sum().backward()
    actual.square().sum().backward()
    for e, name in enumerate(layer.active_adapters):
        assert_rel_close(ref.lora_A[e].grad, layer.lora_A[name].weight.grad, name=f"X-LoRA grad A_{e}")
        assert_rel_close(ref.lora_B[e].grad, layer.lora_B[name].weight.grad, name=f"X-LoRA grad B_{e}")


def test_xlora_equals_hand_weighted_lora_sum():
    # top_k=2 of 3 experts with softmax over the kept two, computed token by token
    w, bias = randn(7, 9), randn(7)
    experts = [(randn(r, 9), randn(7, r), 1.5 / r) for r in (1, 4, 2)]
    ref = XLoRA(w, bias, experts, top_k=2, softmax_topk=True, global_scaling_weight=0.5)
    x, raw = randn(2, 5, 9), randn(2, 5, 3)
    expected = torch.nn.functional.linear(x, w, bias)
    for b in range(2):
        for t in range(5):
            top2 = sorted(range(3), key=lambda e: -raw[b, t, e].item())[:2]
            weights = torch.softmax(raw[b, t, top2], dim=0)
            for weight, e in zip(weights, top2):
                lora_a, lora_b, scaling = experts[e]
                expected[b, t] += 0.5 * scaling * weight * (lora_b @ (lora_a @ x[b, t]))
    assert_rel_close(ref(x, raw), expected, name="X-LoRA hand sum")


class _LayerWithScalings(torch.nn.Module):
    """Runs an XLoRA reference with fixed scalings, so it can stand in for a Linear inside a model."""

    def __init__(self, ref: XLoRA, scalings: torch.Tensor):
        super().__init__()
        self.ref, self.scalings = ref, scalings

    def forward(self, x):
        return self.ref(x, self.scalings)


def test_xlora_model_matches_peft_on_tiny_llama(tmp_path):
    """Whole X-LoRA model: the scaling pass, the classifier's layer-wise softmax(logits / T) and every
    adapted layer, against PEFT's XLoraModel built from two LoRA checkpoints saved locally."""
    from peft.tuners import lora

    base = tiny_llama(seed=70)
    experts = {}
    for e, r in enumerate((2, 5)):
        lora_model = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=r + 2,
                                                                    target_modules=["q_proj", "v_proj"]))
        randomize_(lora_model, scale=0.3, seed=71 + e, names=["lora_B"])
        lora_model.save_pretrained(tmp_path / f"expert{e}")
        # PEFT 0.21 loads the experts under the names "0", "1", ... and activates the dict's keys:
        # only keys equal to str(position) work.
        experts[str(e)] = str(tmp_path / f"expert{e}")
    config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=experts, xlora_depth=1,
                         layerwise_scalings=True, softmax_temperature=0.8)
    xlora_model = get_peft_model(copy.deepcopy(base), config)
    classifier = xlora_model.base_model.internal_xlora_classifier
    randomize_(classifier, scale=1.0, seed=73)

    ids, mask = token_batch(seed=74)
    expected = xlora_model(input_ids=ids, attention_mask=mask).logits

    # Scaling pass: the scaling_pass_value (0) zeroes every expert, i.e. the frozen base model.
    last_hidden = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    head = classifier.layers[0]
    adapted = [(name, module) for name, module in xlora_model.base_model.lora_model.model.named_modules()
               if isinstance(module, lora.Linear)]
    scalings = XLoRA.classifier_scalings(torch.nn.functional.linear(last_hidden, head.weight, head.bias),
                                         len(adapted), temperature=0.8, layerwise=True)
    assert_rel_close(scalings, xlora_model.base_model.get_latest_scalings(), name="X-LoRA scalings")
    reference_model = copy.deepcopy(base)
    for name, module in adapted:
        layer_number = module.forward.__self__.layer_number
        reference_model.set_submodule(name, _LayerWithScalings(XLoRA.from_peft(module), scalings[:, :, layer_number]))
    actual = reference_model(input_ids=ids, attention_mask=mask).logits
    assert_rel_close(actual, expected, name="X-LoRA model logits")
    assert not torch.allclose(expected, base(input_ids=ids, attention_mask=mask).logits)


def test_xlora_validation():
    w = randn(7, 9)
    with pytest.raises(ValueError, match=r"top_k=3 must be None or in 1\.\.n_experts=2"):
        XLoRA(w, None, [(randn(2, 9), randn(7, 2), 1.0), (randn(3, 9), randn(7, 3), 1.0)], top_k=3)
    with pytest.raises(ValueError, match=r"experts\[0\]\.r=8 exceeds"):
        XLoRA(w, None, [(randn(8, 9), randn(7, 8), 1.0)])
    with pytest.raises(ValueError, match="scalings has shape"):
        XLoRA.demo(d_in=9)(randn(2, 5, 9), randn(2, 5, 2))


# ---------------------------------------------------------------------------------------------- trainable tokens
def test_trainable_tokens_match_peft_on_tiny_llama():
    base = tiny_llama(seed=60)
    reference_model = copy.deepcopy(base)
    indices = [3, 17, 40, 63]
    peft_model = get_peft_model(base, TrainableTokensConfig(token_indices=indices))
    embed = peft_model.get_base_model().get_input_embeddings()
    randomize_(embed, scale=1.0, seed=61, names=["trainable_tokens_delta"])
    ref = TrainableTokens.from_peft(embed)

    ids, mask = token_batch(seed=62)
    ids[:, 1:5] = torch.tensor(indices)  # every trainable token appears in every sequence
    assert_rel_close(ref(ids), embed(ids), name="trainable tokens embedding")
    changed = ref.merged_weight() != ref.weight
    assert changed.any(-1).nonzero().flatten().tolist() == indices
    expected = peft_model(input_ids=ids, attention_mask=mask).logits
    actual = reference_model(inputs_embeds=ref(ids), attention_mask=mask).logits
    assert_rel_close(actual, expected, name="trainable tokens logits")


def test_trainable_tokens_tied_output_head_matches_peft():
    # tied embeddings: PEFT wraps lm_head with a TrainableTokensLayer sharing the same rows
    base = tiny_llama(seed=63, tie_word_embeddings=True)
    assert base.lm_head.weight is base.get_input_embeddings().weight
    reference_model = copy.deepcopy(base)
    peft_model = get_peft_model(base, TrainableTokensConfig(token_indices=[0, 9, 33]))
    embed = peft_model.get_base_model().get_input_embeddings()
    randomize_(embed, scale=1.0, seed=64, names=["trainable_tokens_delta"])
    ref = TrainableTokens.from_peft(embed)

    ids, mask = token_batch(seed=65)
    expected = peft_model(input_ids=ids, attention_mask=mask).logits
    hidden = reference_model.model(inputs_embeds=ref(ids), attention_mask=mask).last_hidden_state
    assert_rel_close(ref.logits(hidden), expected, name="trainable tokens tied logits")
    # the trained rows matter on the output side too
    assert not torch.allclose(reference_model.lm_head(hidden), expected)


def test_trainable_tokens_validation():
    weight = randn(VOCAB, 8)
    with pytest.raises(ValueError, match=r"token_indices holds \[64\].*0\.\.63"):
        TrainableTokens(weight, [1, 64])
    with pytest.raises(ValueError, match="token_indices must be distinct"):
        TrainableTokens(weight, [2, 2])
    ref = TrainableTokens(weight, [2, 5])
    with pytest.raises(ValueError, match=r"input_ids holds \[-1\].*0\.\.63"):
        ref(torch.tensor([[0, -1]]))


def test_reference_classes_are_not_linear_weight_methods():
    for cls in (LoReFT, LNTuning, PromptTuning, Poly, XLoRA, TrainableTokens):
        assert cls.has_delta_weight is False, cls.__name__
