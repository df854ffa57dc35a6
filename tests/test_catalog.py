"""The catalog, fastadapt.methods(), the reference registry and the CLI."""
import pytest
import torch
import torch.nn.functional as F

import fastadapt
from fastadapt import cli
from fastadapt._catalog import CATALOG, entry
from fastadapt.numerics import assert_rel_close
from fastadapt.reference import REFERENCES, ReferenceAdapter, get
from fastadapt.testing import randn


def test_catalog_has_the_33_methods_with_valid_families():
    assert len(CATALOG) == 33
    assert {e.family for e in CATALOG.values()} <= set(fastadapt.FAMILIES) | {"model"}
    assert entry("VB-LoRA").name == "vblora"
    with pytest.raises(ValueError, match="valid choices"):
        entry("bone")


def test_methods_reports_every_catalog_method_with_boolean_fields():
    table = fastadapt.methods()
    assert list(table) == list(CATALOG)
    for support in table.values():
        for field in fastadapt.SUPPORT_FIELDS:
            assert isinstance(getattr(support, field), bool)
        assert support.reference == (support.name in REFERENCES)


def test_every_catalog_method_has_a_reference():
    missing = sorted(set(CATALOG) - set(REFERENCES))
    assert not missing, f"no reference for {missing}"


def test_reference_lookup():
    with pytest.raises(ValueError, match="valid choices"):
        get("not-a-method")


WEIGHT_REFERENCES = sorted(n for n, c in REFERENCES.items()
                           if issubclass(c, ReferenceAdapter) and c.has_delta_weight and hasattr(c, "demo"))


@pytest.mark.parametrize("name", WEIGHT_REFERENCES)
def test_reference_forward_equals_merged_weight(name):
    """x (W + dW)^T + merged bias == forward(x) in float64, for every method with a weight delta."""
    ref = REFERENCES[name].demo()
    x = randn(3, 2, ref.in_features)
    expected = F.linear(x, ref.weight + ref.delta_weight(), ref.merged_bias())
    out = ref(x)
    assert out.dtype == torch.float64
    assert_rel_close(out, expected, torch.float64, name=name)


def test_cli_info_prints_backends_and_matrix(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "triton interpreter" in out and "peft" in out
    for name in CATALOG:
        assert name in out


def test_cli_matrix_is_markdown(capsys):
    assert cli.main(["matrix"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| method |") and len(lines) == 2 + len(CATALOG)


def test_triton_kernels_installs_only_as_fastadapt_triton_kernels(tmp_path):
    """`triton_kernels/` is importable as fastadapt.triton_kernels, never as a top-level package
    (that name belongs to triton's own kernels).  Checked outside the repo, where cwd is not on sys.path."""
    import pathlib
    import subprocess
    import sys
    code = ("import importlib.util, fastadapt.triton_kernels as t; s = importlib.util.find_spec('triton_kernels'); "
            "print(t.__file__); print(s.origin if s else None)")
    ours, top = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                               check=True).stdout.split()
    assert top == "None" or pathlib.Path(top).parent != pathlib.Path(ours).parent
