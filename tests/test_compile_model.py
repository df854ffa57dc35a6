"""torch.compile of an accelerated model: ``torch.compile(model, fullgraph=True)`` of a tiny Llama
accelerated for every bridged method traces in one graph (no graph break, no recompile on the next
call), calls fastadapt's custom ops inside it, and gives PEFT's eager outputs and gradients within
the float32 table.

Variants come from each family's ``tests/peft_configs_<family>.py`` (``VARIANTS``); a bridged
method without one fails here.  The compiler backend is ``aot_eager``: dynamo and AOTAutograd
(fake kernels, autograd registration, functionalisation) as inductor sees them, without minutes of
C++ code generation per model on a CI CPU.  Variants with dropout run in training mode, once with
``accelerate(model, dropout="torch")`` against PEFT (nn.Dropout's masks), once with the default
Philox stream against the same accelerated model in eager (the same seed gives the same masks).
A failing compile lists every graph break ``torch._dynamo.explain`` finds.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

import fastadapt
from fastadapt import peft as bridge
from fastadapt.numerics import assert_rel_close
from fastadapt.peft import bridged_methods
from fastadapt.testing import peft_configs, perturb_, tiny_llama

CONFIGS = peft_configs(Path(__file__).parent)
# Read at import, before tests/conftest.py's fixture turns the crossovers off per test.
MEASURED_CROSSOVER = bridge.measured_crossover

# Known failures whose cause lies outside the bridge: (variant, dropout stream) -> "owner: cause".
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def _cases():
    cases = [(v.name, "philox") for v in CONFIGS.variants.values()]
    cases += [(v.name, "torch") for v in CONFIGS.variants.values() if v.dropout]
    unknown = sorted(set(KNOWN_FAILURES) - set(cases))
    assert not unknown, f"KNOWN_FAILURES names no case: {unknown}"
    return [pytest.param(name, stream, id=f"{name}-{stream}" if CONFIGS.variants[name].dropout else name,
                         marks=[pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[(name, stream)])]
                         if (name, stream) in KNOWN_FAILURES else [])
            for name, stream in sorted(cases)]


def test_every_bridged_method_has_a_model_variant():
    missing = sorted(CONFIGS.methods_without_variants(bridged_methods()))
    assert not missing, (f"bridged methods without a tiny-Llama variant: {missing}; add a PeftVariant to VARIANTS "
                         f"in tests/peft_configs_<family>.py (found: {CONFIGS.files})")


class _Recorder:
    """A compiler backend that keeps every graph dynamo hands it and compiles it with aot_eager."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager
        self.graphs.append(gm)
        return aot_eager(gm, example_inputs)


def _compile(model, *args, **kwargs):
    """``torch.compile(model, fullgraph=True)`` called once; the compiled model, its recorder and the
    result.  A graph break fails with every break reason torch._dynamo.explain finds."""
    torch._dynamo.reset()
    recorder = _Recorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)
    try:
        result = compiled(*args, **kwargs)
    except torch._dynamo.exc.Unsupported:
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(*args, **kwargs)
        breaks = "\n".join(f"  {b.reason.splitlines()[0]} at {b.user_stack[-1] if b.user_stack else '?'}"
                           for b in explanation.break_reasons)
        pytest.fail(f"{explanation.graph_break_count} graph break(s):\n{breaks}")
    return compiled, recorder, result


def _fastadapt_ops(graphs) -> set:
    """Names of the fastadapt custom ops the traced graphs call."""
    return {str(node.target) for gm in graphs for node in gm.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("fastadapt.")}


def _grads(model) -> dict:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def _loss_and_grads(model, ids, seed, call=None):
    """Logits and every trainable parameter's gradient of one step of ``call`` (default: ``model``)."""
    torch.manual_seed(seed)
    out = (model if call is None else call)(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), _grads(model)


def _assert_same(got, expected, what):
    assert_rel_close(got[0], expected[0], name=f"{what}: logits")
    assert sorted(got[1]) == sorted(expected[1])
    for name, grad in expected[1].items():
        assert_rel_close(got[1][name], grad, name=f"{what}: grad {name}")


@pytest.mark.parametrize("variant,stream", _cases())
def test_compiled_accelerated_model_matches_peft(variant, stream):
    variant = CONFIGS.variants[variant]
    peft_model = get_peft_model(tiny_llama(3, dtype=torch.float32, layers=1), variant.config())
    perturb_(peft_model, scale=0.05)
    fused = copy.deepcopy(peft_model)
    report = fastadapt.accelerate(fused, methods=[variant.method], dropout=stream)
    assert report.num_patched >= 2, str(report)
    peft_model.train(variant.dropout), fused.train(variant.dropout)
    ids = torch.randint(0, 64, (2, 9))

    eager = _loss_and_grads(fused, ids, seed=1)
    assert report.fused_calls == report.num_patched and not report.fallbacks, str(report)
    expected = _loss_and_grads(peft_model, ids, seed=1) if stream == "torch" or not variant.dropout else eager

    torch.manual_seed(1)
    compiled, recorder, out = _compile(fused, input_ids=ids, labels=ids)
    out.loss.backward()
    assert _fastadapt_ops(recorder.graphs), "the compiled graph calls no fastadapt op (did every layer fall back?)"
    against = "PEFT" if expected is not eager else "eager"
    _assert_same((out.logits.detach(), _grads(fused)), expected, f"compiled vs {against}")
    second = _loss_and_grads(fused, ids, seed=2, call=compiled)
    assert len(recorder.graphs) == 1, f"{len(recorder.graphs)} graphs: the second call recompiled"
    assert report.fused_calls == report.num_patched, "calls inside torch.compile must not count (nor recompile)"
    _assert_same(second, _loss_and_grads(peft_model if expected is not eager else fused, ids, seed=2),
                 f"second call, compiled vs {against}")


# ----------------------------------------------------------------------------------------------
# the bridge alone, with a toy fused entry in plain torch (independent of any kernel family)

LORA_CLASS = "peft.tuners.lora.layer.Linear"


def _toy_lora_forward(layer, adapter, x):
    base = layer.get_base_layer()
    return F.linear(x, base.weight, base.bias) + layer.scaling[adapter] * layer.lora_B[adapter](layer.lora_A[adapter](x))


def test_the_bridge_traces_in_one_graph_and_counts_only_in_eager(monkeypatch):
    """Entry selection, checks, notes and the report's counters trace without a graph break; inside
    the compiled graph the counters stay still (counting there would guard on their values and
    recompile every call), in eager they count every call."""
    entry = bridge.BridgeEntry(LORA_CLASS, "lora", _toy_lora_forward, applies=lambda layer, a: not layer.use_dora[a],
                               check=lambda layer, a, x: None, note=lambda layer, a, x: "toy note")
    monkeypatch.setattr(bridge, "registry", lambda: {LORA_CLASS: [entry]})
    model = get_peft_model(tiny_llama(3, dtype=torch.float32, layers=1), LoraConfig(r=4, target_modules=["q_proj"]))
    perturb_(model, scale=0.05)
    report = fastadapt.accelerate(model)
    ids = torch.randint(0, 64, (2, 5))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=ids)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    expected = model(input_ids=ids).logits
    assert report.fused_calls == 1 and report.notes == {"toy note": 1}
    compiled, recorder, out = _compile(model, input_ids=ids)
    for _ in range(2):
        assert_rel_close(compiled(input_ids=ids).logits, expected)
    assert len(recorder.graphs) == 1 and report.fused_calls == 1
    model.base_model.model.model.layers[0].self_attn.q_proj.merge()  # the fallback branch traces too
    compiled, recorder, out = _compile(model, input_ids=ids)
    assert_rel_close(out.logits, expected)
    assert not report.fallbacks
    model(input_ids=ids)
    assert report.fallbacks == {"merged layer": 1}


def test_compiled_calls_are_fused_whatever_their_size(monkeypatch):
    """The crossover weighs eager host time per call, which a compiled graph does not pay: inside
    torch.compile a call below LoRA's crossover takes the fused path (fastadapt's op in the graph,
    no recompile on the next call), while the same call run eagerly takes the small path."""
    monkeypatch.setattr(bridge, "measured_crossover", MEASURED_CROSSOVER)
    ids = torch.randint(0, 64, (2, 5))
    model = get_peft_model(tiny_llama(3, dtype=torch.float32, layers=1), LoraConfig(r=4, target_modules=["q_proj"]))
    perturb_(model, scale=0.05)
    expected = model(input_ids=ids).logits
    report = fastadapt.accelerate(model)
    compiled, recorder, out = _compile(model, input_ids=ids)
    assert_rel_close(out.logits, expected)
    assert_rel_close(compiled(input_ids=ids).logits, expected)
    assert len(recorder.graphs) == 1 and _fastadapt_ops(recorder.graphs)
    assert report.fused_calls == 0 and not report.fallbacks, "calls inside torch.compile are not counted"
    assert torch.equal(model(input_ids=ids).logits, expected)
    assert report.fallbacks == {bridge.SMALL_CALL_REASON: 1}, str(report)
