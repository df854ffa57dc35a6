"""The drop-in promise end to end, on a tiny Llama built from a config (nothing downloaded):
training with ``fastadapt.accelerate`` follows PEFT's own training step for step (losses and every
adapter parameter), every adapted layer runs fused, and the checkpoint it writes loads in plain PEFT
and gives PEFT's outputs.  Twice: on the CPU torch path, and with FASTADAPT_BACKEND=triton, which
runs the CUDA path's Triton kernels (through the interpreter here) inside a whole model: attention
reshapes, several layers, an optimizer between steps."""
import copy

import pytest
import torch
from peft import DeloraConfig, LoraConfig, OFTConfig, PeftModel, PsoftConfig, get_peft_model

import fastadapt
from fastadapt.numerics import assert_rel_close
from fastadapt.testing import generator, randomize_, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]
CONFIGS = {
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS),
    "oft": lambda: OFTConfig(oft_block_size=8, r=0, target_modules=TARGETS),
    "oft_exact": lambda: OFTConfig(oft_block_size=8, r=0, use_cayley_neumann=False, target_modules=TARGETS),
    "psoft": lambda: PsoftConfig(r=4, psoft_alpha=4, target_modules=["q_proj", "v_proj"]),
    "delora": lambda: DeloraConfig(r=4, delora_lambda=5, init_weights=False, target_modules=TARGETS),
}
ADAPTER_PARAMS = ["lora_B", "oft_R", "psoft_R", "delora_B"]


def _batches(count=3, batch=2, seq=9, vocab=64):
    g = generator(7)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(count)]


def _count_kernel_launches(monkeypatch) -> list:
    """Wrap every public launcher of the Triton kernel modules; returns the list of launched names."""
    from fastadapt.triton_kernels import cayley, dora_norm
    launched = []
    for module in (cayley, dora_norm):
        for name, fn in list(vars(module).items()):
            if callable(fn) and not name.startswith("_") and getattr(fn, "__module__", "") == module.__name__ \
                    and not isinstance(fn, type) and not hasattr(fn, "run"):
                def counted(*args, _fn=fn, _name=name, **kwargs):
                    launched.append(_name)
                    return _fn(*args, **kwargs)
                monkeypatch.setattr(module, name, counted)
    return launched


def _train(model, batches):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_training_follows_peft_and_checkpoint_loads_in_plain_peft(method, backend, tmp_path, monkeypatch):
    base = tiny_llama(3, dtype=torch.float32)
    peft_model = get_peft_model(copy.deepcopy(base), CONFIGS[method]())
    randomize_(peft_model, names=ADAPTER_PARAMS, scale=0.05, seed=4)
    peft_model.train()
    fused_model = copy.deepcopy(peft_model)
    report = fastadapt.accelerate(fused_model)
    assert report.num_patched >= 4, str(report)

    batches = _batches()
    expected = _train(peft_model, batches)
    monkeypatch.setenv("FASTADAPT_BACKEND", backend)
    launched = _count_kernel_launches(monkeypatch)
    got = _train(fused_model, batches)
    assert bool(launched) == (backend == "triton"), sorted(set(launched))
    assert report.fused_calls == report.num_patched * len(batches) and not report.fallbacks, str(report)
    assert_rel_close(got, expected, name="losses")
    trained = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    for name, param in fused_model.named_parameters():
        if param.requires_grad:
            assert_rel_close(param, trained[name], scale=10, name=name)  # 3 SGD steps of fp32 rounding

    fused_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()  # plain PEFT, nothing patched
    fused_model.eval()
    ids = batches[0]
    assert_rel_close(loaded(input_ids=ids).logits, fused_model(input_ids=ids).logits, name="logits")


@pytest.mark.parametrize("method", ["dora", "delora"])
def test_half_base_with_float32_adapter_on_the_triton_path_follows_peft(method, monkeypatch):
    """PEFT's default for a half model (autocast_adapter_dtype: float32 adapter on a float16 base)
    through the Triton kernels' mixed path (FASTADAPT_BACKEND=triton, the CUDA path), three SGD
    steps on a tiny float16 Llama: losses follow PEFT's own run within the float16 table, and every
    parameter update follows the CPU torch path's (itself checked against PEFT above and in
    test_dora_norm) within twice that table: both round at PEFT's points and differ only in float32
    summation order (DeLoRA's lambda by value: its gradient is an ill-conditioned sum).  (Against
    PEFT the updates differ by ~1e-3 on both fused paths alike.)"""
    base = tiny_llama(5, dtype=torch.float16)
    peft_model = get_peft_model(copy.deepcopy(base), CONFIGS[method]())
    randomize_(peft_model, names=ADAPTER_PARAMS, scale=0.05, seed=4)
    assert all(p.dtype == torch.float32 for p in peft_model.parameters() if p.requires_grad)
    peft_model.train()
    initial = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    torch_path, triton_path = copy.deepcopy(peft_model), copy.deepcopy(peft_model)
    fastadapt.accelerate(torch_path)
    report = fastadapt.accelerate(triton_path)
    batches = _batches()
    expected = _train(peft_model, batches)
    _train(torch_path, batches)
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    launched = _count_kernel_launches(monkeypatch)
    got = _train(triton_path, batches)
    assert "scaled_lowrank_gemm" in launched and "float32_matmul" in launched, sorted(set(launched))
    assert report.fused_calls == report.num_patched * len(batches) and not report.fallbacks, str(report)
    assert_rel_close(got, expected, torch.float16, name="losses")
    reference = dict(torch_path.named_parameters())
    for name, param in triton_path.named_parameters():
        if "delora_lambda" in name:
            # dlambda sums dY_t B_:,i u_ti over tokens and ranks with cancellation (test_dora_norm
            # scales its tolerance by that sum's condition number); some layers' lambda barely moves
            # in three steps, so their updates carry no relative precision: compare the values
            assert_rel_close(param, reference[name], torch.float16, name=name)
        elif param.requires_grad:
            assert_rel_close(param - initial[name], reference[name] - initial[name], torch.float16, scale=2,
                             name=f"update of {name}")
