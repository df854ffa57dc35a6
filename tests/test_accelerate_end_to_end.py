"""The drop-in promise end to end, on a tiny Llama built from a config (nothing downloaded):
training with ``fastadapt.accelerate`` follows PEFT's own training step for step (losses and every
adapter parameter), every adapted layer runs fused, and the checkpoint it writes loads in plain PEFT
and gives PEFT's outputs.  Twice: on the CPU torch path, and with FASTADAPT_BACKEND=triton, which
runs the CUDA path's Triton kernels (through the interpreter here) inside a whole model: attention
reshapes, several layers, an optimizer between steps.

Every bridged method takes part through its family's ``tests/peft_configs_<family>.py``
(``VARIANTS``).  Variants with dropout train with ``accelerate(model, dropout="torch")`` on the
torch path (nn.Dropout's masks: PEFT's own); on the Triton path their masks come from the Philox
stream, so that run follows the torch path's Philox run (one seed gives one mask on every backend).
"""
import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model

import fastadapt
from fastadapt.numerics import assert_rel_close
from fastadapt.peft import bridged_methods
from fastadapt.testing import generator, peft_configs, perturb_, tiny_llama, triton_launches

CONFIGS = peft_configs(Path(__file__).parent)
VARIANTS = sorted(CONFIGS.variants)

# Known failures whose cause lies outside the bridge: (variant, backend) -> "owner: cause".
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def _params(backends):
    cases = [(v, b) for v in VARIANTS for b in backends]
    unknown = sorted(set(KNOWN_FAILURES) - set((v, b) for v in VARIANTS for b in ("torch", "triton")))
    assert not unknown, f"KNOWN_FAILURES names no case: {unknown}"
    return [pytest.param(v, b, id=f"{v}-{b}", marks=[pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[(v, b)])]
                         if (v, b) in KNOWN_FAILURES else []) for v, b in cases]


def test_every_bridged_method_has_a_model_variant():
    missing = sorted(CONFIGS.methods_without_variants(bridged_methods()))
    assert not missing, (f"bridged methods without a tiny-Llama variant: {missing}; add a PeftVariant to VARIANTS "
                         f"in tests/peft_configs_<family>.py (found: {CONFIGS.files})")


def _batches(count=3, batch=2, seq=9, vocab=64):
    g = generator(7)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(count)]


def _train(model, batches):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for i, ids in enumerate(batches):
        torch.manual_seed(100 + i)  # the same dropout masks in every run of these batches
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


def _peft_model(variant, dtype):
    model = get_peft_model(tiny_llama(3, dtype=dtype), variant.config())
    perturb_(model, scale=0.05, seed=4)
    return model.train()


@pytest.mark.parametrize("name,backend", _params(("torch", "triton")))
def test_training_follows_peft_and_checkpoint_loads_in_plain_peft(name, backend, tmp_path, monkeypatch):
    variant = CONFIGS.variants[name]
    peft_model = _peft_model(variant, torch.float32)
    fused_model = copy.deepcopy(peft_model)
    torch_masks = variant.dropout and backend == "torch"
    report = fastadapt.accelerate(fused_model, methods=[variant.method], dropout="torch" if torch_masks else "philox")
    assert report.num_patched >= 2, str(report)

    batches = _batches()
    if variant.dropout and not torch_masks:  # Philox masks: follow the torch path's Philox run
        reference = copy.deepcopy(peft_model)
        fastadapt.accelerate(reference, methods=[variant.method])
        monkeypatch.setenv("FASTADAPT_BACKEND", "torch")
        expected = _train(reference, batches)
    else:
        reference = peft_model
        expected = _train(peft_model, batches)
    monkeypatch.setenv("FASTADAPT_BACKEND", backend)
    with triton_launches() as launched:
        got = _train(fused_model, batches)
    has_kernels = fastadapt.methods()[variant.method].triton  # the method declares Triton kernels
    assert bool(launched) == (backend == "triton" and has_kernels), sorted(set(launched))
    assert report.fused_calls == report.num_patched * len(batches) and not report.fallbacks, str(report)
    assert_rel_close(got, expected, name="losses")
    trained = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    for param_name, param in fused_model.named_parameters():
        if param.requires_grad:
            assert_rel_close(param, trained[param_name], scale=10, name=param_name)  # 3 SGD steps of fp32 rounding

    fused_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(3, dtype=torch.float32), tmp_path).eval()  # plain PEFT
    fused_model.eval()
    ids = batches[0]
    assert_rel_close(loaded(input_ids=ids).logits, fused_model(input_ids=ids).logits, name="logits")


@pytest.mark.parametrize("name", [v for v in VARIANTS if not CONFIGS.variants[v].dropout])
def test_half_base_with_float32_adapter_on_the_triton_path_follows_peft(name, monkeypatch):
    """PEFT's default for a half model (autocast_adapter_dtype: float32 adapter on a float16 base)
    through the Triton kernels (FASTADAPT_BACKEND=triton, the CUDA path), three SGD steps on a tiny
    float16 Llama: every call fused, Triton kernels launched, losses follow PEFT's own run within the
    float16 table, and every parameter update follows the CPU torch path's (itself checked against
    PEFT above and in each family's tests) within twice that table: both round at PEFT's points and
    differ only in float32 summation order.  A parameter whose update is below a hundredth of its
    value (DeLoRA's lambda: its gradient is an ill-conditioned sum that some layers barely move in
    three steps) carries no relative precision in its update: its value is compared instead.  (The
    accuracy of each gradient against float64 is test_half_precision's contract.)"""
    variant = CONFIGS.variants[name]
    peft_model = _peft_model(variant, torch.float16)
    assert all(p.dtype == torch.float32 for p in peft_model.parameters() if p.requires_grad)
    initial = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    torch_path, triton_path = copy.deepcopy(peft_model), copy.deepcopy(peft_model)
    fastadapt.accelerate(torch_path, methods=[variant.method])
    report = fastadapt.accelerate(triton_path, methods=[variant.method])
    batches = _batches()
    expected = _train(peft_model, batches)
    _train(torch_path, batches)
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    with triton_launches() as launched:
        got = _train(triton_path, batches)
    assert launched or not fastadapt.methods()[variant.method].triton, "no Triton kernel ran"
    assert report.fused_calls == report.num_patched * len(batches) and not report.fallbacks, str(report)
    assert_rel_close(got, expected, torch.float16, name="losses")
    reference = dict(torch_path.named_parameters())
    for param_name, param in triton_path.named_parameters():
        if not param.requires_grad:
            continue
        update, ref_update = param - initial[param_name], reference[param_name] - initial[param_name]
        if ref_update.norm() < 0.01 * reference[param_name].norm():
            assert_rel_close(param, reference[param_name], torch.float16, name=param_name)
        else:
            assert_rel_close(update, ref_update, torch.float16, scale=2, name=f"update of {param_name}")
