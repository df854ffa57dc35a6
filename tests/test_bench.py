"""fastadapt.bench: the saved-activation measure on toy layers with known answers, timing and
peak-memory plumbing (no speed assertions), run_cases rows, and the ``fastadapt bench`` CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from fastadapt import bench
from fastadapt.cli import main
from fastadapt.testing import randn


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


def test_case_metrics_reach_every_row_and_the_markdown():
    from fastadapt.bench.runner import markdown_table

    def build(d, n, dtype, device):
        setup = _tiny_case().build(d, n, dtype, device)
        setup.metrics["orthogonality error"] = 3.5e-6
        return setup

    rows = bench.run_cases([bench.Case("with_metrics", "cayley", build)], 8, 4, torch.float32, "cpu",
                           iters=1, warmup=0, compile=False, measures=("error",))
    assert all(r["metrics"] == {"orthogonality error": 3.5e-6} for r in rows)
    assert "- with_metrics: orthogonality error 3.50e-06" in markdown_table(rows)


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


def test_cli_bench_writes_json_and_markdown(tmp_path, capsys):
    code = main(["bench", "--device", "cpu", "--d", "64", "--n", "32", "--iters", "2",
                 "--warmup", "1", "--only", "lora", "--no-compile", "--out", str(tmp_path)])
    assert code == 0
    [json_path] = tmp_path.glob("*.json")
    [md_path] = tmp_path.glob("*.md")
    result = json.loads(json_path.read_text())
    assert result["config"]["d"] == 64 and result["config"]["n"] == 32
    assert {"cpu", "cores", "torch", "triton", "peft"} <= set(result["machine"])
    assert result["ceilings"]["copy_GBps"] > 0 and result["ceilings"]["matmul_GFLOPps"] > 0
    cases = {r["case"] for r in result["rows"]}
    assert cases == {"lora_r16", "lora_r16_dropout0.1"}
    peft_rows = [r for r in result["rows"] if r["arm"] == "peft"]
    assert all(r["rel_error"] < 1e-5 for r in peft_rows)
    assert "| lora_r16 | peft |" in md_path.read_text()
    assert "| lora_r16 | peft |" in capsys.readouterr().out


def test_cli_check_and_memory_commands(capsys):
    assert main(["check", "--device", "cpu", "--d", "32", "--n", "8", "--only", "lora_r16",
                 "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok") == 2 and "FAIL" not in out  # peft arm of both lora cases
    assert main(["memory", "--device", "cpu", "--d", "32", "--n", "8", "--only", "lora_r16_dropout",
                 "--no-compile"]) == 0
    table = capsys.readouterr().out
    assert "| lora_r16_dropout0.1 | peft |" in table and "| lora_r16 |" not in table


def test_cli_plot_draws_or_says_how_to_install_matplotlib(tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="matplotlib"):
            main(["plot", str(tmp_path / "r.json"), "-o", str(tmp_path / "r.png")])
        return
    rows = [{"case": "c", "arm": "peft", "ratio": 1.2, "saved_ratio": 1.0}]
    (tmp_path / "r.json").write_text(json.dumps(
        {"config": {"device": "cpu", "dtype": "float32", "d": 8, "n": 4}, "rows": rows}))
    assert main(["plot", str(tmp_path / "r.json"), "-o", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").stat().st_size > 0
