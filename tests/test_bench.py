"""fastadapt.bench: the saved-activation measure on toy layers with known answers, timing and
peak-memory plumbing, trained adapter parameters, run_cases and summary rows, every discovered
benchmark case at a small shape, the ``fastadapt bench | memory | check | plot`` commands and their
modes on toy cases, charts, the LyCORIS peer, and the pytest-benchmark microbenchmarks (tiny
shapes).  No speed assertions."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, OFTConfig, get_peft_model
from torch import nn

from fastadapt import bench
from fastadapt.bench import compare, model_step, peers, report, runner
from fastadapt.cli import main
from fastadapt.testing import linear_model, randn

REPO = Path(__file__).resolve().parent.parent


class SavesTwoCopies(nn.Module):
    """(x*1)^2 + (x+0)^2: each square saves its own fresh copy of x -> 2.0 x bytes(x)."""

    def forward(self, x):
        a, b = x * 1.0, x + 0.0
        return a * a + b * b


class SavesInputAndView(nn.Module):
    """x * view(x): mul saves both operands, one storage -> counted once, 1.0."""

    def forward(self, x):
        return x * x.reshape(-1).view(x.shape)


class SavesNothing(nn.Module):
    """x * 3 + 1 saves nothing for backward -> 0.0."""

    def forward(self, x):
        return x * 3.0 + 1.0


class DiscardsBranch(nn.Module):
    """A saved copy whose graph branch is dropped before backward is not alive -> 0.0."""

    def forward(self, x):
        copy = x * 1.0
        _ = copy * copy  # saves ``copy`` twice, then the branch is discarded
        return x + 1.0


class ScalesByParameterAndBuffer(nn.Module):
    """(x * w) * b, trainable parameter w, buffer b: autograd saves x (for dw), w (for dx) and
    b (for d(xw)); w and b are excluded -> 1.0."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.rand(d) + 0.5)
        self.register_buffer("b", torch.rand(d) + 0.5)

    def forward(self, x):
        return (x * self.w) * self.b


@pytest.mark.parametrize("layer, expected", [
    (SavesTwoCopies(), 2.0),
    (SavesInputAndView(), 1.0),
    (SavesNothing(), 0.0),
    (DiscardsBranch(), 0.0),
    (ScalesByParameterAndBuffer(37), 1.0),
])
def test_saved_activation_ratio_on_toy_layers(layer, expected):
    x = randn(9, 37, dtype=torch.float32)
    assert bench.saved_activation_ratio(layer, x) == expected


def test_saved_activation_bytes_in_bytes_and_x_not_required_to_need_grad():
    x = randn(5, 11, dtype=torch.float64)  # does not require grad: the measure makes a leaf
    assert bench.saved_activation_bytes(SavesTwoCopies(), x) == 2 * 5 * 11 * 8


def test_frozen_linear_saves_nothing_and_trainable_linear_saves_x():
    x = randn(13, 24, dtype=torch.float32)
    frozen = nn.Linear(24, 17).requires_grad_(False)
    assert bench.saved_activation_ratio(frozen, x) == 0.0
    assert bench.saved_activation_ratio(nn.Linear(24, 17), x) == 1.0


def test_parameters_excluded_for_plain_callables_and_by_exclude():
    x = randn(6, 10, dtype=torch.float32)
    lin = nn.Linear(10, 10)
    # a lambda is not a Module: the packed weight view is excluded through ``exclude``
    with_exclude = bench.saved_activation_ratio(lambda t: lin(t), x, exclude=list(lin.parameters()))
    without = bench.saved_activation_ratio(lambda t: lin(t), x)
    assert with_exclude == 1.0
    weight_bytes = 10 * 10 * 4  # the saved weight.t() view: not a Parameter object itself
    assert without == pytest.approx(1.0 + weight_bytes / (6 * 10 * 4), rel=1e-12)


def test_overhead_ratio_and_time_arms_return_positive_finite_numbers():
    x = randn(16, 24, dtype=torch.float32)
    base = nn.Linear(24, 24).requires_grad_(False)
    adapted = nn.Sequential(nn.Linear(24, 24), nn.Tanh())
    result = bench.overhead_ratio(adapted, base, x, iters=3, warmup=1)
    for value in (result.adapted_s, result.base_s, result.ratio):
        assert math.isfinite(value) and value > 0
    assert result.ratio == pytest.approx(result.adapted_s / result.base_s)
    times = bench.time_arms({"a": adapted, "b": base, "c": SavesTwoCopies()}, x, iters=2, warmup=0)
    assert set(times) == {"a", "b", "c"} and all(math.isfinite(t) and t > 0 for t in times.values())
    assert all(p.grad is None for p in adapted.parameters())  # set to None between runs


class _Sleeps(nn.Module):
    """An arm whose fwd+bwd takes a scripted wall time: it sleeps the next of ``seconds`` (cycled)."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds, self.calls = list(seconds), 0

    def forward(self, x):
        import time
        time.sleep(self.seconds[self.calls % len(self.seconds)])
        self.calls += 1
        return x * 2


def test_median_rse_of_known_samples():
    assert bench.median_rse([1.0, 1.0, 1.0, 1.0]) == 0.0
    assert bench.median_rse([1.0, 2.0]) == 0.0   # too few to say
    # median 2, deviations (1, 0, 1, 0) so MAD 0.5, n = 4: 1.8581 * 0.5 / (2 * 2)
    assert bench.median_rse([1.0, 2.0, 3.0, 2.0]) == pytest.approx(1.8581 * 0.5 / 4)


def test_time_arm_samples_adds_rounds_only_while_a_median_is_uncertain():
    x = randn(4, 3, dtype=torch.float32)
    # 1 ms / 6 ms alternating: MAD/median ~ 1 whatever the scheduler adds, so rounds run to max_iters
    noisy = bench.time_arm_samples({"noisy": _Sleeps([1e-3, 6e-3]), "steady": _Sleeps([1e-3])}, x,
                                   iters=4, warmup=0, max_iters=9)
    assert {name: len(s) for name, s in noisy.items()} == {"noisy": 9, "steady": 9}
    fixed = bench.time_arm_samples({"noisy": _Sleeps([1e-3, 6e-3])}, x, iters=4, warmup=0)
    assert len(fixed["noisy"]) == 4   # no max_iters: exactly iters
    with pytest.raises(ValueError, match="max_iters"):
        bench.time_arm_samples({"a": _Sleeps([0.0])}, x, iters=4, max_iters=3)


def test_peak_memory_counts_the_allocations_of_forward_and_backward():
    x = randn(64, 32, dtype=torch.float32)
    lin = nn.Linear(32, 48)
    # output + grad_out is allocated outside; inside: y (64x48), dx (64x32), dW (48x32), db (48)
    expected = 4 * (64 * 48 + 64 * 32 + 48 * 32 + 48)
    peak = bench.peak_memory(lin, x)
    assert expected <= peak <= expected + 4096


def test_relative_error_is_the_shared_numerics_function():
    from fastadapt.numerics import rel_error
    assert bench.relative_error is rel_error


def _tiny_case(name="toy_linear"):
    """An exact arm (a float32 copy of the reference) and a wrong arm (a different weight)."""

    def build(d, n, dtype, device):
        base = nn.Linear(d, d, bias=False).to(dtype).requires_grad_(False)
        adapted = nn.Linear(d, d, bias=False).to(dtype)
        wrong = nn.Linear(d, d, bias=False).to(dtype)
        oracle = nn.Linear(d, d, bias=False).to(torch.float64)
        with torch.no_grad():
            oracle.weight.copy_(adapted.weight)
        return bench.CaseSetup(x=randn(n, d, dtype=dtype, device=device), base=base,
                               arms={"peft": adapted, "wrong": wrong}, reference=oracle)

    return bench.Case(name, "lowrank", build)


def test_run_cases_rows_keys_and_errors():
    rows = bench.run_cases([_tiny_case()], 24, 10, torch.float32, "cpu", iters=2,
                           warmup=1, compile_backend="eager", on_error="raise")
    by_arm = {r["arm"]: r for r in rows}
    assert list(by_arm) == ["base", "peft", "wrong", "peft_compile"]
    for row in rows:
        assert {"case", "family", "arm", "d", "n", "dtype", "device", "time_s", "ratio",
                "saved_ratio", "rel_error", "tolerance"} <= set(row)
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
    assert by_arm["base"]["ratio"] == 1.0 and by_arm["base"]["rel_error"] is None
    assert by_arm["base"]["saved_ratio"] == 0.0 and by_arm["peft"]["saved_ratio"] == 1.0
    assert by_arm["peft"]["rel_error"] < 1e-5
    assert by_arm["peft_compile"]["rel_error"] < 1e-5
    assert by_arm["wrong"]["rel_error"] > 0.1
    assert "state_s" not in by_arm["base"]   # no round probe, no state reads
    reads = iter(range(100))
    probed = bench.run_cases([_tiny_case()], 24, 10, torch.float32, "cpu", iters=3, warmup=1, compile=False,
                             measures=("time",), on_error="raise", round_probe=lambda: next(reads))
    assert [(r["arm"], r["state_s"], len(r["samples_s"])) for r in probed] == [
        ("base", [0, 1, 2], 3), ("peft", [0, 1, 2], 3), ("wrong", [0, 1, 2], 3)]


def test_case_metrics_reach_every_row_and_the_markdown():
    def build(d, n, dtype, device):
        setup = _tiny_case().build(d, n, dtype, device)
        setup.metrics["orthogonality error"] = 3.5e-6
        return setup

    rows = bench.run_cases([bench.Case("with_metrics", "cayley", build)], 8, 4, torch.float32, "cpu",
                           iters=1, warmup=0, compile=False, measures=("error",))
    assert all(r["metrics"] == {"orthogonality error": 3.5e-6} for r in rows)
    assert "- with_metrics: orthogonality error 3.50e-06" in report.bench_table(bench.summary_rows(rows))


def test_run_cases_records_a_failing_case():
    def broken(d, n, dtype, device):
        raise ValueError("r=0 must be a positive integer")

    rows = bench.run_cases([bench.Case("broken", "lowrank", broken), _tiny_case()], 8, 4,
                           torch.float32, "cpu", iters=1, warmup=0, compile=False,
                           measures=("error",))
    assert rows[0]["arm"] is None and "r=0" in rows[0]["error"]
    assert [r["arm"] for r in rows[1:]] == ["base", "peft", "wrong"]
    assert "time_s" not in rows[1]


def test_selected_matches_family_or_name_prefix():
    cases = [bench.Case("lora_r16", "lowrank", None), bench.Case("oft_b32", "cayley", None),
             bench.Case("delora_r16", "dora_norm", None)]
    assert [c.name for c in bench.selected(cases, ["lora"])] == ["lora_r16"]
    assert [c.name for c in bench.selected(cases, ["cayley"])] == ["oft_b32"]
    assert [c.name for c in bench.selected(cases, ["delora", "oft"])] == ["oft_b32", "delora_r16"]
    assert len(bench.selected(cases, [])) == 3



# --------------------------------------------------------------------------------------------
# trained parameters

def _peft_layer(config, d=32, dtype=torch.float32):
    return get_peft_model(linear_model(d, d, bias=False, dtype=dtype, seed=0), config).base_model.model[0]


def test_train_adapter_moves_only_trainable_parameters_by_about_lr_per_step():
    layer = _peft_layer(LoraConfig(r=4, target_modules=["0"]))
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    assert torch.count_nonzero(before["lora_B.default.weight"]) == 0  # PEFT's init: B = 0
    rng = torch.get_rng_state()
    bench.train_adapter_(layer, randn(16, 32, dtype=torch.float32, seed=3), steps=3, lr=1e-2)
    assert torch.equal(torch.get_rng_state(), rng)  # the global generator is left as it was
    for name, p in layer.named_parameters():
        moved = (p.detach() - before[name]).abs().max().item()
        if p.requires_grad:
            assert 0 < moved <= 3 * 1e-2 * 1.01, name  # Adam: at most ~lr per step
        else:
            assert moved == 0, name  # the frozen base never moves
        assert p.grad is None
    assert layer.training  # PEFT layers are built in training mode; the flag is restored


def test_train_adapter_is_deterministic_and_reaches_oft_q():
    config = OFTConfig(oft_block_size=8, r=0, target_modules=["0"])
    layers = [_peft_layer(config) for _ in range(2)]
    for layer in layers:
        layer.eval()
        bench.train_adapter_(layer, randn(16, 32, dtype=torch.float32, seed=3))
        assert not layer.training
    q0, q1 = (layer.oft_R["default"].weight for layer in layers)
    assert torch.count_nonzero(q0) == q0.numel() and torch.equal(q0, q1)


def test_train_adapter_takes_model_inputs_and_rejects_bad_arguments():
    model = get_peft_model(model_step.bench_llama(32, layers=1, vocab=16), LoraConfig(r=2, target_modules=["q_proj"]))
    batch = model_step.token_batch(8, 16, "cpu")
    bench.train_adapter_(model, {"input_ids": batch["input_ids"]}, steps=1)
    assert all(torch.count_nonzero(p) > 0 for n, p in model.named_parameters() if "lora_B" in n)
    with pytest.raises(ValueError, match="steps"):
        bench.train_adapter_(model, batch, steps=-1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        bench.train_adapter_(nn.Linear(4, 4).requires_grad_(False), torch.zeros(2, 4))


def test_peft_layer_case_trains_patches_and_records_config():
    config = OFTConfig(oft_block_size=8, r=0, target_modules=["0"], use_cayley_neumann=False)
    setup = bench.peft_layer_case(32, 4, torch.float32, "cpu", config, fused={"fastadapt": lambda layer: layer})
    assert torch.count_nonzero(setup.arms["peft"].oft_R["default"].weight) > 0
    assert torch.equal(setup.arms["peft"].oft_R["default"].weight, setup.arms["fastadapt"].oft_R["default"].weight)
    assert setup.reports["fastadapt"].num_patched == 1
    assert setup.config == {"peft_config": "OFTConfig", "oft_block_size": 8, "use_cayley_neumann": False,
                            "method": "oft"}


# --------------------------------------------------------------------------------------------
# rows

def test_case_method_from_its_name_or_given():
    assert bench.Case("oft_b32_exact", "cayley", None).method == "oft"
    assert bench.Case("toy", "cayley", None).method is None
    assert bench.Case("toy", "cayley", None, method="psoft").method == "psoft"
    with pytest.raises(ValueError, match="valid choices"):
        bench.Case("toy", "cayley", None, method="nosuch")


def _fused_toy_case():
    """Arms "fastadapt" (exact), "fastadapt_other" (wrong) and "peft" (exact), a peer and a report."""
    from fastadapt.peft import AccelerationReport

    def build(d, n, dtype, device):
        setup = _tiny_case().build(d, n, dtype, device)
        report = AccelerationReport(fused_calls=7)
        report.fallbacks["merged layer"] += 2
        return bench.CaseSetup(x=setup.x, base=setup.base, reference=setup.reference,
                               arms={"fastadapt": setup.arms["peft"], "fastadapt_other": setup.arms["wrong"],
                                     "peft": setup.arms["peft"]},
                               peers={"lycoris": nn.Linear(d, d, bias=False)}, reports={"fastadapt": report},
                               config={"r": 2})
    return bench.Case("dora_toy", "dora_norm", build)


def test_summary_rows_hold_the_json_schema():
    rows = bench.run_cases([_fused_toy_case()], 16, 8, torch.float32, "cpu", iters=1, warmup=0, compile=False,
                           on_error="raise")
    assert [r["arm"] for r in rows] == ["base", "fastadapt", "fastadapt_other", "peft", "lycoris"]
    assert rows[-1]["peer"] and rows[-1]["rel_error"] is None  # a peer has its own parametrisation
    [summary] = bench.summary_rows(rows)
    required = {"method", "config", "device", "dtype", "d", "tokens", "base_ms", "fastadapt_ms", "peft_ms",
                "peft_compile_ms", "saved_ratio", "peft_saved_ratio", "peak_bytes", "peft_peak_bytes", "max_rel_err",
                "fallbacks"}
    assert required <= set(summary)
    assert summary["method"] == "dora" and summary["config"] == {"r": 2} and summary["tokens"] == 8
    assert summary["peft_compile_ms"] is None and summary["lycoris_ms"] > 0
    assert summary["fastadapt_ms"] == pytest.approx(rows[1]["time_s"] * 1e3)
    assert summary["peak_bytes"] == rows[1]["peak_bytes"] > 0
    assert summary["max_rel_err"] == rows[2]["rel_error"] > 0.1  # the worst fastadapt arm
    assert summary["fallbacks"] == 2 and summary["fused_calls"] == 7
    assert set(summary["arms"]) == {"base", "fastadapt", "fastadapt_other", "peft", "lycoris"}
    assert "fastadapt_other" in report.bench_table([summary])


def test_failing_case_rows_in_summary_and_tables():
    def broken(d, n, dtype, device):
        raise ValueError("r=0 must be a positive integer")

    rows = bench.run_cases([bench.Case("lora_broken", "lowrank", broken)], 8, 4, torch.float32, "cpu")
    [summary] = bench.summary_rows(rows)
    assert summary["method"] == "lora" and "r=0" in summary["error"] and summary["fastadapt_ms"] is None
    assert "| lora_broken | ERROR | ValueError: r=0" in report.bench_table([summary])


def test_representative_cases_build_and_match_their_reference():
    """The case of every bridged method that ``--quick`` runs (found by name in benchmarks/, every
    family) at d=64, N=8: no error, every compared arm within the tolerance table, no fused arm
    falling back to PEFT."""
    found = runner.discover(REPO / "benchmarks")
    assert not found.errors
    cases = [case for _, case in runner.representatives(found.cases) if case is not None]
    rows = bench.run_cases(cases, 64, 8, torch.float32, "cpu", compile=False, measures=("error",))
    assert not [r["error"] for r in rows if r.get("error")]
    for r in rows:
        if r["rel_error"] is not None:
            assert r["rel_error"] <= r["tolerance"], (r["case"], r["arm"], r["rel_error"])
        assert r.get("fallbacks", 0) == 0, (r["case"], r["arm"], r.get("fallback_reasons"))


def test_every_bridged_method_has_a_representative_case():
    found = runner.discover(REPO / "benchmarks")
    groups = runner.bridged_groups()
    assert ("oft", "oftv2") in groups  # one fused forward of PEFT's OFT layer serves both names
    missing = [group for group, case in runner.representatives(found.cases) if case is None]
    assert not missing, f"bridged methods without a benchmark case: {missing}"
    assert dict(runner.representatives(found.cases))[("oft", "oftv2")].name == "oft_b32"


# --------------------------------------------------------------------------------------------
# command line on toy cases

TOY_CASES = '''
from peft import LoraConfig

from fastadapt.bench import Adapter, Case, peft_layer_case


def lora_config(size, targets):
    return LoraConfig(r=size, lora_alpha=size, target_modules=targets)


def build(d, n, dtype, device):
    return peft_layer_case(d, n, dtype, device, lora_config(2, ["0"]))


def broken(d, n, dtype, device):
    raise ValueError("r=0 must be a positive integer")


CASES = [Case("lora_toy", "lowrank", build), Case("oft_toy", "cayley", build, method="oft"),
         Case("lora_broken", "lowrank", broken)]
ADAPTERS = [Adapter("lora", lora_config, "r", sizes=(1, 2, 3, 4, 6, 8), default=2)]
'''


@pytest.fixture
def toy_dir(tmp_path):
    folder = tmp_path / "cases"
    folder.mkdir()
    (folder / "cases_toy.py").write_text(TOY_CASES)
    return folder


def _run(args, toy_dir, tmp_path):
    """Run the command; returns (exit code, the JSON document written to --json)."""
    out = tmp_path / "doc.json"
    code = main([*args, "--cases-dir", str(toy_dir), "--out", str(tmp_path / "results"), "--json", str(out),
                 "--no-compile"])
    return code, json.loads(out.read_text())


def _plots(doc_path: Path, tmp_path) -> None:
    assert main(["plot", str(doc_path), "-o", str(tmp_path / "chart.png")]) == 0
    assert (tmp_path / "chart.png").stat().st_size > 1000


def test_cli_bench_rows_a_failing_case_and_writes_everything(toy_dir, tmp_path, capsys):
    code, doc = _run(["bench", "--device", "cpu", "--d", "16", "--n", "8", "--iters", "1", "--warmup", "0"],
                     toy_dir, tmp_path)
    assert code == 1  # the failing case fails the run, after the others ran
    assert doc["kind"] == "bench" and {"machine", "versions", "date", "ceilings"} <= set(doc)
    assert doc["config"]["command"].startswith("fastadapt bench --device cpu --d 16")
    assert {"torch", "peft", "triton", "lycoris"} <= set(doc["versions"])
    by_case = {r["case"]: r for r in doc["rows"]}
    assert set(by_case) == {"lora_toy", "oft_toy", "lora_broken"}
    assert "r=0" in by_case["lora_broken"]["error"]
    ok = by_case["lora_toy"]
    assert ok["error"] is None and ok["peft_ms"] > 0 and ok["peft_rel_err"] < 1e-5 and ok["peft_peak_bytes"] > 0
    assert {r["arm"] for r in doc["arm_rows"] if r["case"] == "lora_toy"} >= {"base", "peft"}
    [md] = (tmp_path / "results").glob("*.md")
    assert "| lora_toy |" in md.read_text() and "| lora_broken | ERROR |" in capsys.readouterr().out
    _plots(tmp_path / "doc.json", tmp_path)


def test_cli_quick_one_row_per_bridged_method(toy_dir, tmp_path):
    code, doc = _run(["bench", "--quick", "--d", "16", "--n", "8", "--iters", "1", "--warmup", "0"], toy_dir, tmp_path)
    assert doc["config"]["quick"] and doc["config"]["iters"] == 1
    groups = runner.bridged_groups()
    assert sorted(tuple(r["serves"]) for r in doc["rows"]) == sorted(groups)
    [oft] = [r for r in doc["rows"] if r["serves"] == ["oft", "oftv2"]]
    assert oft["case"] == "oft_toy" and oft["error"] is None
    toy = {"oft_toy": {"oft", "oftv2"}, "lora_toy": {"lora"}}  # methods the toy cases measure
    covered = [r for r in doc["rows"] if any(set(r["serves"]) & methods for methods in toy.values())]
    assert all(r["case"] in toy and r["error"] is None for r in covered)
    missing = [r for r in doc["rows"] if r not in covered]
    assert all("no benchmark case measures" in r["error"] for r in missing)
    assert code == (1 if missing else 0)
    code, doc = _run(["bench", "--quick", "--only", "oft", "--d", "16", "--n", "8", "--iters", "1", "--warmup", "0"],
                     toy_dir, tmp_path)
    assert code == 0 and [r["case"] for r in doc["rows"]] == ["oft_toy"]  # --only narrows, no missing rows


def test_cli_host_overhead_table(toy_dir, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        _, doc = _run(["bench", "--host-overhead", "--iters", "2", "--warmup", "0", "--method", "oft", "--threads", "1"],
                      toy_dir, tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert doc["kind"] == "host_overhead" and (doc["config"]["d"], doc["config"]["n"]) == runner.HOST_SHAPE
    assert doc["machine"]["torch_threads"] == 1
    [row] = doc["rows"]
    assert row["case"] == "oft_toy" and row["peak_bytes"] is None  # time only
    assert 0 < row["peft_min_ms"] <= row["peft_ms"] and 0 < row["base_min_ms"] <= row["base_ms"]
    assert "fastadapt <= PEFT" in capsys.readouterr().out
    _plots(tmp_path / "doc.json", tmp_path)


def _no_bridges(monkeypatch):
    """The toy adapters' method measured as PEFT only, whatever fused paths other families add."""
    import fastadapt.peft
    monkeypatch.setattr(fastadapt.peft, "bridged_methods", lambda: set())


@pytest.mark.parametrize("axis, sizes", [("tokens", "4,8"), ("rank", "1,2")])
def test_cli_sweep(toy_dir, tmp_path, axis, sizes, monkeypatch):
    _no_bridges(monkeypatch)
    code, doc = _run(["bench", "--sweep", axis, "--sizes", sizes, "--d", "16", "--n", "8", "--iters", "1",
                      "--warmup", "0"], toy_dir, tmp_path)
    assert code == 0 and doc["kind"] == "sweep"
    assert [r["sweep"]["value"] for r in doc["rows"]] == [int(s) for s in sizes.split(",")]
    assert all(r["peft_ms"] > 0 and r["peft_peak_bytes"] > 0 for r in doc["rows"])
    knob = "r" if axis == "rank" else "tokens"
    assert all(r["sweep"]["knob"] == knob for r in doc["rows"])
    _plots(tmp_path / "doc.json", tmp_path)


def test_cli_memory_training_step_parts(toy_dir, tmp_path, monkeypatch):
    _no_bridges(monkeypatch)
    code, doc = _run(["memory", "--d", "32", "--n", "16", "--method", "lora"], toy_dir, tmp_path)
    assert code == 0 and doc["kind"] == "memory"
    by_arm = {r["arm"]: r for r in doc["rows"]}
    assert set(by_arm) == {"peft"}  # no fused path (patched away here), no compile
    peft = by_arm["peft"]
    trainable_bytes = peft["trainable_params"] * 4
    assert peft["gradients_bytes"] == trainable_bytes
    assert peft["optimizer_bytes"] >= 2 * trainable_bytes  # AdamW: exp_avg and exp_avg_sq (+ step)
    assert peft["saved_bytes"] > 0 and peft["step_ms"] > 0
    parts = sum(peft[k] for k in report.STEP_PARTS)
    assert peft["peak_bytes"] >= peft["parameters_bytes"] + peft["optimizer_bytes"]
    assert parts > peft["parameters_bytes"]
    _plots(tmp_path / "doc.json", tmp_path)


def test_cli_budget_equal_parameters(toy_dir, tmp_path, capsys, monkeypatch):
    _no_bridges(monkeypatch)
    code, doc = _run(["bench", "--budget", "3%", "--d", "32", "--n", "16"], toy_dir, tmp_path)
    assert code == 0 and doc["kind"] == "budget"
    budget = doc["config"]["budget"]
    total = sum(p.numel() for p in model_step.bench_llama(32, layers=runner.MODEL_LAYERS, device="meta").parameters())
    assert budget == round(0.03 * total)
    [row] = [r for r in doc["rows"] if r["arm"] == "peft"]
    counts = {s: bench.adapters.count_at(runner.discover(toy_dir).adapters[0], s,
                                         lambda: model_step.bench_llama(32, layers=runner.MODEL_LAYERS, device="meta"),
                                         doc["config"]["targets"]) for s in (1, 2, 3, 4, 6, 8)}
    assert row["trainable_params"] == min(counts.values(), key=lambda c: abs(c - budget))
    assert "vs budget" in capsys.readouterr().out
    _plots(tmp_path / "doc.json", tmp_path)


def test_cli_bad_input_says_what_is_valid(toy_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"--method 'nosuch'.*valid names: \['lora', 'oft'\]"):
        main(["bench", "--method", "nosuch", "--cases-dir", str(toy_dir)])
    with pytest.raises(SystemExit, match="valid choices: cpu, cuda"):
        runner.resolve_device("tpu:0")
    with pytest.raises(SystemExit, match="percentage"):
        runner.parse_budget("lots", 1000)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no CUDA device exists")
def test_cli_cuda_without_cuda_is_a_clear_error(toy_dir):
    with pytest.raises(SystemExit, match="no CUDA device is available.*--device cpu"):
        main(["bench", "--device", "cuda", "--cases-dir", str(toy_dir)])


def test_cli_check_command(capsys):
    assert main(["check", "--device", "cpu", "--d", "32", "--n", "8", "--only", "lora_r16", "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert " ok" in out and "FAIL" not in out


# --------------------------------------------------------------------------------------------
# budget search, timelines, old documents, peers

def test_budget_size_bisects_to_the_nearest_valid_size():
    def config(size, targets):
        if size % 2:
            raise ValueError("odd sizes are rejected by this toy config")
        return LoraConfig(r=size, target_modules=targets)

    def make():
        return linear_model(16, 16, bias=False, dtype=torch.float32)

    adapter = bench.Adapter("lora", config, "r", sizes=tuple(range(1, 17)), default=2)
    # LoRA on a 16 x 16 layer trains 32 r parameters; valid r are even
    assert bench.budget_size(adapter, 100, make, ["0"]) == (4, 128)   # 96 (r=3) is rejected; 64 is further
    assert bench.budget_size(adapter, 70, make, ["0"]) == (2, 64)
    assert bench.budget_size(adapter, 10_000, make, ["0"]) == (16, 512)
    never = bench.Adapter("lora", lambda s, t: config(1, t), "r", sizes=(1, 3), default=1)
    assert bench.budget_size(never, 100, make, ["0"]) is None


def test_timeline_from_snapshot_tracks_allocations_and_keeps_the_peak(monkeypatch):
    events = [{"action": "alloc", "size": 100, "time_us": 1}, {"action": "alloc", "size": 50, "time_us": 2},
              {"action": "free_requested", "size": 100, "time_us": 3},
              {"action": "free_completed", "size": 100, "time_us": 4}, {"action": "segment_alloc", "size": 999}]
    assert model_step.timeline_from_snapshot({"device_traces": [events]}) == [(1.0, 100), (2.0, 150), (4.0, 50)]
    monkeypatch.setattr(model_step, "TIMELINE_POINTS", 2)
    assert model_step.timeline_from_snapshot({"device_traces": [events]}) == [(2.0, 150), (4.0, 50)]


def test_plot_reads_documents_written_before_kinds_existed(tmp_path):
    rows = [{"case": "c", "arm": "base", "ratio": 1.0}, {"case": "c", "arm": "peft", "ratio": 1.2, "saved_ratio": 1.0}]
    (tmp_path / "r.json").write_text(json.dumps(
        {"config": {"device": "cpu", "dtype": "float32", "d": 8, "n": 4}, "rows": rows}))
    _plots(tmp_path / "r.json", tmp_path)


lycoris_missing = pytest.mark.skipif(not peers.lycoris_available(), reason="lycoris-lora is not installed (optional)")


@lycoris_missing
def test_lycoris_peer_is_the_same_size_of_adapter_on_the_same_base():
    base = nn.Linear(64, 64, bias=False).requires_grad_(False)
    lora = peers.lycoris_arm(LoraConfig(r=4, lora_alpha=8, target_modules=["0"]), base)
    assert {n: tuple(p.shape) for n, p in lora.named_parameters()} == {"lora_down.weight": (4, 64),
                                                                       "lora_up.weight": (64, 4)}
    x = randn(5, 64, dtype=torch.float32)
    torch.testing.assert_close(lora(x), base(x))  # LyCORIS's init: the up projection is zero
    oft = peers.lycoris_arm(OFTConfig(oft_block_size=8, r=0, target_modules=["0"]), base)
    assert oft.block_size == 8
    assert peers.lycoris_arm(OFTConfig(oft_block_size=16, r=0, target_modules=["0"]), base) is None  # b > sqrt(d)
    assert peers.lycoris_arm(LoraConfig(r=4, use_dora=True, target_modules=["0"]), base) is None  # no bypass DoRA


def test_config_method_names_the_catalog_method():
    assert peers.config_method(LoraConfig(r=2)) == "lora"
    assert peers.config_method(LoraConfig(r=2, use_dora=True)) == "dora"
    assert peers.config_method(OFTConfig(oft_block_size=8, r=0)) == "oft"


# --------------------------------------------------------------------------------------------
# pytest-benchmark microbenchmarks (benchmarks/micro), tiny shapes

def test_microbenchmarks_run_and_record_peak_memory(tmp_path):
    """One benchmark of each module, timed (a round or two) with its JSON written: every family
    module and the discovered layer / op modules collect and run."""
    selection = ("(test_rotation and fwd-fastadapt-16-neumann) or (test_weight_norm and fastadapt) "
                 "or (test_layer and fwd-fastadapt-dora) or (test_op and dora_weight_norm and torch-ex0)")
    out = tmp_path / "micro.json"
    # a fresh pytest, not an xdist worker: pytest-benchmark disables timing when it sees the
    # worker's PYTEST_XDIST_* variables, which the README's ``-n 2`` run would pass down
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env["FASTADAPT_MICRO"] = "tiny"
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/micro", "-q", "-p", "no:cacheprovider",
                           "-k", selection, "--benchmark-only", "--benchmark-min-rounds=1",
                           "--benchmark-max-time=0.000001", "--benchmark-warmup=off", f"--benchmark-json={out}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    benchmarks = json.loads(out.read_text())["benchmarks"]
    modules = {b["fullname"].split("::")[0] for b in benchmarks}
    assert modules == {f"benchmarks/micro/{m}.py" for m in ("test_cayley", "test_dora_norm", "test_layers",
                                                            "test_registered_ops")}
    assert all(b["extra_info"]["peak_bytes"] >= 0 and b["group"] for b in benchmarks)


def test_microbenchmarks_are_outside_the_default_test_run():
    import tomllib
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert config["testpaths"] == ["tests"]


def test_every_cli_help_renders(capsys):
    """argparse formats help strings with %: a literal % in one crashes ``--help``."""
    from fastadapt.cli import build_parser
    for argv in (["--help"], ["bench", "--help"], ["memory", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(argv)
        assert exit_info.value.code == 0, argv
    assert "--budget" in capsys.readouterr().out


def test_saved_bytes_count_a_sparse_tensors_parts():
    """A sparse COO tensor saved for backward (PEFT's SHiRA does) counts its indices and values."""
    from fastadapt.bench.measure import saved_bytes_during
    dense = torch.randn(5, 4, requires_grad=True)
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 2, 4], [1, 3, 0]]), torch.randn(3), (6, 5))
    saved = saved_bytes_during(lambda: torch.sparse.mm(sparse, dense))
    assert saved == 2 * 3 * 8 + 3 * 4   # int64 indices (2, 3) and float32 values (3,)


def _bench_doc(ratios: dict) -> dict:
    """A bench document with one row per case: base 10 ms, each arm ratio x 10 ms (median and fastest)."""
    rows = [{"case": case, "base_min_ms": 10.0,
             **{f"{arm}_ratio": r for arm, r in arms.items()}, **{f"{arm}_min_ms": 10.0 * r for arm, r in arms.items()}}
            for case, arms in ratios.items()]
    return {"kind": "bench", "rows": rows}


def _written(folder: Path, **docs: dict) -> list[Path]:
    """Each document written to ``folder``/<name>.json; the paths in order."""
    paths = [folder / f"{name}.json" for name in docs]
    for path, doc in zip(paths, docs.values()):
        path.write_text(json.dumps(doc))
    return paths


def test_compare_counts_ratios_within_the_tolerance(tmp_path, capsys):
    a = _bench_doc({"lora": {"fastadapt": 1.10, "peft": 1.20}, "oft": {"fastadapt": 1.30}, "old": {"peft": 2.0}})
    b = _bench_doc({"lora": {"fastadapt": 1.12, "peft": 1.50}, "oft": {"fastadapt": 1.30, "peft": 1.4}})
    result = compare.compare_documents(a, b)
    assert (result["total"], result["within"], result["within_fastest"]) == (3, 2, 2)
    assert result["only_in_one"] == ["oft peft", "old peft"]
    (miss,) = [p for p in result["pairs"] if p["difference"] > 0.1]
    assert (miss["case"], miss["arm"]) == ("lora", "peft") and miss["difference"] == pytest.approx(0.25)
    assert compare.compare_documents(a, b, tolerance=0.3)["within"] == 3
    with pytest.raises(ValueError, match="tolerance"):
        compare.compare_documents(a, b, tolerance=10)
    paths = _written(tmp_path, a=a, b=b)
    assert main(["compare", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert "2 of 3 ratios agree within 10% by their medians" in out and "| lora | peft | 1.200 | 1.500 | 25.0%" in out
    assert main(["compare", "--strict", *map(str, paths)]) == 1


def test_cases_measured_in_the_slow_state_run_again_when_the_probe_reads_faster(capsys):
    """Each case's rows carry the probe read before it; a case whose probe read >= SLOW_STATE_FACTOR x
    the run's fastest is measured again at the end if the probe then reads faster, else kept; at most
    a quarter of the cases, the slowest readings first."""
    class Named:
        def __init__(self, name):
            self.name = name
    names = ["a", "slow", "b", "stuck", "capped", "c", "d", "e", "f"]
    cases = [Named(n) for n in names]
    readings = iter([1.0, 3.0, 1.1, 2.0, 1.6, 1.0, 1.0, 1.0, 1.0,   # ms, before each case
                     1.2, 1.2,   # slow: now 1.2 < 3.0 -> again (one read to decide, one before the run)
                     2.5])       # stuck: now 2.5 >= 2.0 -> kept; capped (1.6): beyond 9 // 4 = 2 cases
    runs = []

    def run(case):
        runs.append(case.name)
        return [{"case": case.name, "arm": "base", "time_s": len(runs)}]
    rows = runner.measure_with_probe(cases, run, lambda: next(readings) * 1e-3)
    assert runs == names + ["slow"] and next(readings, None) is None
    assert [r["case"] for r in rows] == names
    slow = rows[1]
    assert slow["time_s"] == 10 and slow["probe_ms"] == pytest.approx(1.2) and slow["first_probe_ms"] == pytest.approx(3.0)
    assert "first_probe_ms" not in rows[3] and rows[3]["probe_ms"] == pytest.approx(2.0)
    assert "stuck: probe 2.00 ms at its run, 2.50 now" in capsys.readouterr().err
    summary = bench.summary_rows(rows)
    assert [r["first_probe_ms"] for r in summary][:3] == [None, pytest.approx(3.0), None]
    doc = {"kind": "bench", "date": "2026-12-05T13:00:00", "rows": summary,
           "config": {"n": 8, "d": 4, "dtype": "float32", "device": "cpu", "iters": 1, "compile": False},
           "machine": {"cpu": "x", "cores": 2, "torch_threads": 2}, "versions": dict.fromkeys(("torch", "triton", "peft", "lycoris"), "-")}
    text = report.document_markdown(doc)
    assert "1.00-2.00" in text and "slow (3.00 -> 1.20)" in text and "machine state" not in text
    doc["arm_rows"] = [{"case": "a", "arm": "base", "state_s": [2.4e-3] * 6 + [3.7e-3] * 8},
                       {"case": "a", "arm": "peft", "state_s": [9.0] * 14}]   # one read per round: the base's
    assert ("machine state (a 64 MiB copy at the start of every timed round; `fastadapt compare` compares two runs "
            "within the state both timed a case in): 2.40-3.70 ms over 14 rounds, two states split at 2.98 ms: "
            "43% of the rounds in the fast-copy state") in report.document_markdown(doc)


def test_time_arm_rounds_reads_the_probe_once_per_timed_round():
    """The round probe runs at the start of every timed round (warmup rounds excluded, extra rounds
    included), so reads[i] is the state samples[arm][i] ran in."""
    x = randn(4, 3, dtype=torch.float32, seed=1)
    reads = iter(range(100))
    samples, got = bench.time_arm_rounds({"noisy": _Sleeps([1e-3, 6e-3]), "steady": _Sleeps([1e-3])}, x,
                                                 iters=4, warmup=2, max_iters=7, round_probe=lambda: next(reads))
    assert got == list(range(7)) and {len(s) for s in samples.values()} == {7}
    assert bench.time_arm_rounds({"a": _Sleeps([0.0])}, x, iters=3, warmup=0)[1] == []


def test_state_split_finds_two_states_and_only_two():
    from fastadapt.bench import states
    two = [2.4e-3, 2.5e-3, 2.3e-3, 2.45e-3] * 3 + [3.6e-3, 3.7e-3, 3.8e-3, 3.65e-3] * 5
    threshold = states.split_threshold(two)
    assert 2.5e-3 < threshold < 3.6e-3
    assert states.state_names([2.4e-3, 3.7e-3], threshold) == ["fast copy", "slow copy"]
    assert states.split_threshold([3.6e-3, 3.7e-3, 3.8e-3, 3.9e-3, 3.5e-3] * 4) is None     # within 25 %
    assert states.split_threshold([2.4e-3] * 2 + [3.7e-3] * 30) is None                       # 2 reads: no state
    assert states.split_threshold([2.4e-3] * 3 + [3.7e-3] * 2) is None                       # too few reads
    assert states.state_names([1.0, 2.0], None) == ["one state", "one state"]
    assert "one state" in states.state_summary([3.6e-3] * 8)
    assert "split at" in states.state_summary(two) and "38% of the rounds in the fast-copy state" in states.state_summary(two)
    assert states.state_summary([]) is None
    assert states.CopyProbe(1 << 16)() > 0
    with pytest.raises(ValueError, match="nbytes"):
        states.CopyProbe(0)


def _state_doc(fast_rounds: int, slow_rounds: int) -> dict:
    """A bench document for one case whose PEFT arm is 1.3 x base in the fast-copy state and 1.0 x in
    the slow-copy state (fastadapt 1.1 x in both), with this many rounds in each."""
    reads = [2.4e-3] * fast_rounds + [3.7e-3] * slow_rounds
    base = [0.010] * len(reads)
    peft = [0.013] * fast_rounds + [0.010] * slow_rounds
    arms = {"base": base, "fastadapt": [0.011] * len(reads), "peft": peft}
    arm_rows = [{"case": "c3a", "arm": arm, "samples_s": s, "state_s": reads} for arm, s in arms.items()]
    median = {arm: sorted(s)[len(s) // 2] for arm, s in arms.items()}
    row = {"case": "c3a", "base_min_ms": 10.0,
           **{f"{arm}_ratio": median[arm] / median["base"] for arm in ("fastadapt", "peft")},
           **{f"{arm}_min_ms": min(arms[arm]) * 1e3 for arm in ("fastadapt", "peft")}}
    return {"kind": "bench", "rows": [row], "arm_rows": arm_rows}


def test_compare_takes_each_ratio_within_the_state_both_runs_share(tmp_path, capsys):
    a, b = _state_doc(fast_rounds=14, slow_rounds=6), _state_doc(fast_rounds=4, slow_rounds=16)
    result = compare.compare_documents(a, b)
    assert (result["total"], result["within"], result["within_state"], result["in_shared_state"]) == (2, 1, 2, 2)
    peft = next(p for p in result["pairs"] if p["arm"] == "peft")
    assert peft["difference"] == pytest.approx(0.3)
    assert peft["state"] == "slow copy" and peft["a_state"] == pytest.approx(1.0) and peft["difference_state"] == 0
    # one run entirely in the fast state: the state with rounds in both is the fast one
    only_fast = compare.compare_documents(_state_doc(20, 0), _state_doc(6, 14))
    assert next(p for p in only_fast["pairs"] if p["arm"] == "peft")["state"] == "fast copy"
    # no shared state with enough rounds: the medians decide
    apart = compare.compare_documents(_state_doc(20, 0), _state_doc(4, 16))   # MIN_STATE_ROUNDS = 5
    assert apart["in_shared_state"] == 0 and apart["within_state"] == apart["within"] == 1
    # documents without state reads (GPU, older runs): no state comparison
    plain = compare.compare_documents(_bench_doc({"c3a": {"peft": 1.3}}), _bench_doc({"c3a": {"peft": 1.0}}))
    assert plain["state_threshold"] is None and plain["in_shared_state"] == 0
    paths = _written(tmp_path, a=a, b=b)
    assert main(["compare", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 agree within 10% when each ratio is taken within the state" in out
    assert "| c3a | peft | 1.300 | 1.000 | 30.0% |" in out and "| slow copy | 1.000 | 1.000 | 0.0% | NO |" in out
