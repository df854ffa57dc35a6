"""The PEFT bridge mechanism: patch, fall back with a counted reason, revert, checkpoints unchanged.

Uses a toy fused entry for PEFT's LoRA layer (exact LoRA math in torch) so the mechanism is tested
independently of any kernel family.
"""
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, LoHaConfig, get_peft_model

import fastadapt
from fastadapt import peft as bridge
from fastadapt.numerics import assert_rel_close
from fastadapt.testing import linear_model, randn, randomize_

LORA_CLASS = "peft.tuners.lora.layer.Linear"
# Read at import, before tests/conftest.py's fixture turns the crossovers off per test.
MEASURED_CROSSOVER = bridge.measured_crossover


def _toy_lora_forward(layer, adapter, x):
    base = layer.get_base_layer()
    y = F.linear(x, base.weight, base.bias)
    return y + layer.scaling[adapter] * layer.lora_B[adapter](layer.lora_A[adapter](x))


def _toy_check(layer, adapter, x):
    if layer.training and getattr(layer.lora_dropout[adapter], "p", 0) > 0:
        return "dropout in training"
    return None


def linear_forward(model, x):
    """The frozen base model's output, computed from the base layers' own weights."""
    net = model.base_model.model
    h = F.linear(x, net[0].get_base_layer().weight, net[0].get_base_layer().bias)
    return F.linear(torch.relu(h), net[2].get_base_layer().weight, net[2].get_base_layer().bias)


@pytest.fixture
def toy_registry(monkeypatch):
    entry = bridge.BridgeEntry(LORA_CLASS, "lora", _toy_lora_forward, check=_toy_check,
                               applies=lambda layer, a: not layer.use_dora[a])
    monkeypatch.setattr(bridge, "registry", lambda: {LORA_CLASS: [entry]})
    return entry


def _lora_model(**kw):
    model = get_peft_model(linear_model(12, 10, depth=2), LoraConfig(r=4, target_modules=["0", "2"], **kw))
    randomize_(model, names=["lora_B"], scale=0.5)
    return model


def test_accelerate_patches_and_matches_peft(toy_registry):
    model = _lora_model()
    x = randn(3, 5, 12)
    expected = model(x)
    report = fastadapt.accelerate(model)
    assert report.num_patched == 2 and report.patched[LORA_CLASS] == 2
    assert_rel_close(model(x), expected)
    assert report.fused_calls == 2 and not report.fallbacks
    assert "2 layer(s) patched" in str(report)


def test_fallback_reasons_are_counted(toy_registry):
    model = _lora_model(lora_dropout=0.1)
    x = randn(2, 12)
    report = fastadapt.accelerate(model)
    model.train()
    model(x)
    assert report.fallbacks["dropout in training"] == 2
    model.eval()
    with model.disable_adapter():
        assert_rel_close(model(x), linear_forward(model, x))
    assert report.fallbacks["adapters disabled"] >= 2
    layer = model.base_model.model[0]
    out_unmerged = model(x)
    layer.merge()
    assert_rel_close(model(x), out_unmerged)
    assert report.fallbacks["merged layer"] >= 1
    layer.unmerge()
    assert report.fused_calls >= 2


def test_autocast_context_falls_back_to_peft(toy_registry):
    model = _lora_model().float()
    x = randn(3, 12, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
        report = fastadapt.accelerate(model)
        got = model(x)
    assert report.fallbacks["torch.autocast context"] == 2 and report.fused_calls == 0
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_an_entry_declaring_autocast_runs_fused_under_autocast(monkeypatch):
    """An entry whose forward reproduces PEFT's autocast semantics (here the toy forward: plain
    torch ops, which autocast like PEFT's) serves calls inside torch.autocast."""
    entry = bridge.BridgeEntry(LORA_CLASS, "lora", _toy_lora_forward, autocast=True,
                               applies=lambda layer, a: not layer.use_dora[a])
    monkeypatch.setattr(bridge, "registry", lambda: {LORA_CLASS: [entry]})
    model = _lora_model().float()
    x = randn(3, 12, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
        report = fastadapt.accelerate(model)
        got = model(x)
    assert report.fused_calls == 2 and not report.fallbacks
    assert got.dtype == expected.dtype
    assert_rel_close(got, expected, torch.bfloat16)


def test_second_adapter_and_adapter_names_fall_back(toy_registry):
    model = _lora_model()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["0", "2"]))
    report = fastadapt.accelerate(model)
    x = randn(4, 12)
    layer = model.base_model.model[0]
    layer.set_adapter(["default", "other"])
    layer(x)
    assert report.fallbacks["2 active adapters"] == 1
    layer.set_adapter("default")
    model.eval()
    model(x, adapter_names=["default", "other", "default", "other"])
    assert report.fallbacks["adapter_names (mixed-adapter batch)"] >= 1


def test_revert_restores_peft_forward_and_state_dict_is_unchanged(toy_registry, tmp_path):
    model = _lora_model()
    keys = sorted(model.state_dict())
    fastadapt.accelerate(model)
    assert sorted(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    assert fastadapt.revert(model) == 2
    assert "forward" not in vars(model.base_model.model[0])
    assert not hasattr(model, "_fastadapt_report")
    assert fastadapt.revert(model) == 0


def test_unregistered_layers_are_reported_not_patched(toy_registry):
    model = get_peft_model(linear_model(8, 8), LoHaConfig(r=2, target_modules=["0"]))
    report = fastadapt.accelerate(model)
    assert report.num_patched == 0
    assert report.skipped == {"peft.tuners.loha.layer.Linear": "no fused path registered for this layer class"}


def test_methods_filter_and_unknown_name(toy_registry):
    model = _lora_model()
    report = fastadapt.accelerate(model, methods=["oft"])
    assert report.num_patched == 0 and "not among methods" in report.skipped[LORA_CLASS]
    with pytest.raises(ValueError, match="valid choices"):
        fastadapt.accelerate(model, methods=["nolora"])


def test_notes_count_documented_differences_of_fused_calls(monkeypatch):
    def note(layer, adapter, x):
        return "toy note in training" if layer.training else None

    entry = bridge.BridgeEntry(LORA_CLASS, "lora", _toy_lora_forward, note=note,
                               applies=lambda layer, a: not layer.use_dora[a])
    monkeypatch.setattr(bridge, "registry", lambda: {LORA_CLASS: [entry]})
    model = _lora_model()
    report = fastadapt.accelerate(model)
    x = randn(3, 12)
    model.eval()
    model(x)
    assert not report.notes and report.fused_calls == 2
    model.train()
    model(x)
    assert report.notes == {"toy note in training": 2} and report.fused_calls == 4
    assert "fused x2, note: toy note in training" in str(report)


def test_an_active_adapter_the_layer_does_not_hold_runs_peft(monkeypatch):
    """An adapter added to some target layers only: the others run PEFT's forward (their base layer),
    whatever the entry's ``applies`` says (here the default, True for every adapter)."""
    entry = bridge.BridgeEntry(LORA_CLASS, "lora", _toy_lora_forward)
    monkeypatch.setattr(bridge, "registry", lambda: {LORA_CLASS: [entry]})
    model = _lora_model()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["0"]))
    randomize_(model, names=["lora_B"], scale=0.5)
    report = fastadapt.accelerate(model)
    x = randn(3, 12)
    model.set_adapter("other")
    expected = model(x)
    fastadapt.revert(model)
    assert_rel_close(expected, model(x))
    assert report.fused_calls == 1
    assert report.fallbacks == {"the active adapter is not on this layer (PEFT runs the base layer)": 1}


def test_small_forward_serves_plain_calls_only():
    """A small call runs the entry's small_forward (LoRA's: PEFT's ops without PEFT's per-call Python)
    only where that is what PEFT's forward does; with a hook on a submodule it bypasses, the adapters
    disabled or merged, PEFT's forward runs (and the hook fires)."""
    model = _lora_model()
    x = randn(3, 5, 12)
    expected = model(x)
    report = fastadapt.accelerate(model, min_macs=1 << 40)
    layer = model.base_model.model[0]
    small_forward, adapter = bridge._lean_forward(layer)
    served = []

    def count_small_calls():   # the plan the first call cached, its small_forward wrapped to count calls
        model(x)
        plans = layer.__dict__[bridge._ATTR_SMALL_PLANS]
        for key, (bound, _) in plans.items():
            plans[key] = (bound, (lambda *args: served.append(1) or small_forward(*args), adapter))
        served.clear()

    count_small_calls()
    assert torch.equal(model(x), expected) and len(served) == 1
    assert report.fused_calls == 0 and report.fallbacks == {bridge.SMALL_CALL_REASON: 4}
    handle = layer.lora_A["default"].register_forward_hook(lambda module, args, out: 2 * out)
    with_hook = model(x)   # small_forward sees the hook and hands the call to PEFT's forward
    fastadapt.revert(model)
    assert torch.equal(with_hook, model(x)) and not torch.equal(with_hook, expected)
    handle.remove()
    fastadapt.accelerate(model, min_macs=1 << 40)
    count_small_calls()
    with model.disable_adapter():
        assert torch.equal(model(x), linear_forward(model, x))
    model.merge_adapter()
    assert_rel_close(model(x), expected)
    model.unmerge_adapter()
    assert not served
    assert_rel_close(model(x), expected)   # the unmerged weight is W + dW - dW: rounding
    assert len(served) == 1


def test_small_forward_only_under_the_peft_release_it_reproduces(monkeypatch):
    """Under a PEFT release the small_forwards were not checked against, small calls run PEFT's forward."""
    model = _lora_model()
    fastadapt.accelerate(model, min_macs=1 << 40)
    layer = model.base_model.model[0]
    assert bridge.peft_release() in bridge.SMALL_FORWARD_PEFT_RELEASES and bridge._lean_forward(layer) is not None
    monkeypatch.setattr(bridge, "peft_release", lambda: "0.99")
    assert bridge._lean_forward(layer) is None


def test_calls_below_the_crossover_run_peft(monkeypatch):
    """Below min_macs multiply-adds (x.numel() x out_features) a call runs PEFT's own forward,
    counted with its reason; the entry's measured crossover by default, 0 fuses every call."""
    entry = bridge.BridgeEntry(LORA_CLASS, "lora", _toy_lora_forward, applies=lambda layer, a: not layer.use_dora[a],
                               min_macs={"cpu": 10 ** 6})
    monkeypatch.setattr(bridge, "registry", lambda: {LORA_CLASS: [entry]})
    monkeypatch.setattr(bridge, "measured_crossover", MEASURED_CROSSOVER)
    model = _lora_model()
    x = randn(3, 5, 12)
    expected = model(x)
    report = fastadapt.accelerate(model)
    assert torch.equal(model(x), expected)
    assert report.fallbacks == {bridge.SMALL_CALL_REASON: 2} and report.fused_calls == 0, str(report)
    for min_macs, fused in [(0, 2), (3 * 5 * 12 * 10, 1), (3 * 5 * 12 * 10 + 1, 0)]:
        report = fastadapt.accelerate(model, min_macs=min_macs)   # layer 0: 12 -> 10 (1800), layer 2: 10 -> 10
        assert_rel_close(model(x), expected)
        assert report.fused_calls == fused and sum(report.fallbacks.values()) == 2 - fused, (min_macs, str(report))
    for bad in (-1, 2.5, True, "0"):
        with pytest.raises(ValueError, match="min_macs"):
            fastadapt.accelerate(model, min_macs=bad)


def test_auto_dropout_takes_nn_dropouts_stream_where_philox_would_run_in_pure_torch(monkeypatch):
    """dropout="auto" (the default) is fixed when accelerate runs: Philox on a CPU whose Philox masks
    come from csrc/ (the report notes the stream), nn.Dropout's own masks where they would come from
    the pure-torch Philox (FASTADAPT_BACKEND=torch here, as on a machine without a compiler): PEFT's
    output and gradients, no note.  Off the CPU "auto" is Philox; revert forgets the choice."""
    from fastadapt.ops.dropout import philox_compiled
    model = _lora_model(lora_dropout=0.3)
    model.train()
    layer = model.base_model.model[0]
    x = randn(64, 12, seed=5, requires_grad=True)

    def step():
        torch.manual_seed(11)
        out = model(x)
        grads = torch.autograd.grad(out.square().sum(), [x, layer.lora_A["default"].weight])
        return [out, *grads]
    expected = step()
    report = fastadapt.accelerate(model, min_macs=0)
    assert bridge.dropout_stream(layer) == "auto" and philox_compiled("cpu")   # csrc builds on this machine
    assert bridge.dropout_stream(layer, x) == "philox" and bridge.dropout_stream(layer, x.to("meta")) == "philox"
    step()
    assert report.fused_calls == 2 and report.notes and not report.fallbacks
    monkeypatch.setenv("FASTADAPT_BACKEND", "torch")
    assert not philox_compiled("cpu")
    report = fastadapt.accelerate(model, min_macs=0)
    assert bridge.dropout_stream(layer, x) == "torch"
    for got, want, name in zip(step(), expected, ["output", "dx", "dA"]):
        assert_rel_close(got, want, name=name)
    assert report.fused_calls == 2 and not report.notes and not report.fallbacks
    assert bridge.dropout_stream(layer, x) == "torch" and fastadapt.accelerate(model, dropout="philox") is not None
    assert bridge.dropout_stream(layer, x) == "philox"   # asked for by name: the pure-torch Philox, slow but asked
    fastadapt.revert(model)
    assert "_fastadapt_cpu_dropout_stream" not in layer.__dict__ and bridge.dropout_stream(layer, x) == "philox"
    with pytest.raises(ValueError, match=r"valid choices: \['auto', 'philox', 'torch'\]"):
        fastadapt.accelerate(model, dropout="numpy")
