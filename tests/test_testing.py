"""fastadapt.testing's own contracts: per-test seeds (a test's data depends on the test alone) and the
discovery of each family's PEFT configurations by file name."""
import textwrap

import pytest
import torch

from fastadapt import testing


def test_default_seeds_come_from_the_running_test(request):
    """conftest restarts the default-seed stream and torch's generator from the node id, so what ran
    before in this process (here: draws made on purpose) changes nothing."""
    seed = testing.seed_for(request.node.nodeid)
    first = torch.randn(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert torch.equal(testing.randn(3), first)
    second = torch.randn(3, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    assert torch.equal(testing.randn(3), second)
    assert torch.equal(torch.rand(2), torch.rand(2, generator=torch.Generator().manual_seed(seed)))


def test_seed_for_is_stable_and_distinguishes_names():
    assert testing.seed_for("tests/test_x.py::test_a") == testing.seed_for("tests/test_x.py::test_a")
    assert testing.seed_for("tests/test_x.py::test_a[1]") != testing.seed_for("tests/test_x.py::test_a[2]")
    assert 0 <= testing.seed_for("") < 2 ** 31


def test_peft_configs_are_found_by_file_name(tmp_path):
    (tmp_path / "peft_configs_alpha.py").write_text(textwrap.dedent("""
        import torch
        from fastadapt.testing import PeftVariant
        VARIANTS = [PeftVariant("a1", "alpha", lambda: "config a1")]
        SWEEP = {"alpha": lambda targets: {"small": "config"}}
        SWEEP_DTYPE = {"alpha": torch.float32}
    """))
    (tmp_path / "peft_configs_beta.py").write_text("SWEEP = {'beta': lambda targets: {}}\n")
    (tmp_path / "not_configs.py").write_text("raise RuntimeError('must not be imported')\n")
    found = testing.peft_configs(tmp_path)
    assert found.files == ["peft_configs_alpha.py", "peft_configs_beta.py"]
    assert list(found.variants) == ["a1"] and found.variants["a1"].config() == "config a1"
    assert sorted(found.sweeps) == ["alpha", "beta"] and found.sweep_dtypes == {"alpha": torch.float32}
    assert found.methods_without_variants({"alpha", "beta"}) == {"beta"}
    (tmp_path / "peft_configs_gamma.py").write_text("SWEEP = {'beta': lambda targets: {}}\n")
    with pytest.raises(ValueError, match="'beta' defined twice"):
        testing.peft_configs(tmp_path)


def test_targets_describe_the_adapted_layers():
    t = testing.Targets(("0", "2"), (6, 5), (5, 2), modules_to_save=("3",))
    assert t.smallest == 2 and t.rank_above == 7
    assert t.common == {"target_modules": ["0", "2"], "modules_to_save": ["3"]}
    assert testing.Targets(("0",), (1,), (4,)).common == {"target_modules": ["0"]}
