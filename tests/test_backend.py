"""Backend choice: one module decides; forcing works; nothing silent."""
import warnings

import pytest
import torch

from fastadapt import _cpp, backend

CPU = torch.device("cpu")


def test_default_backend_per_device(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.select("op", CPU, ("torch", "triton")) == "torch"
    if backend.triton_available():
        assert backend.default_backend(torch.device("cuda")) == "triton"
    assert backend.default_backend(torch.device("mps")) == "torch"


def test_cpu_prefers_cpp_where_an_op_has_it_and_csrc_builds(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    monkeypatch.setattr(_cpp, "extension", lambda: object())   # built
    assert backend.select("op", CPU, ("torch", "cpp", "triton")) == "cpp"
    assert backend.select("op", CPU, ("torch", "triton")) == "torch"
    monkeypatch.setattr(_cpp, "extension", lambda: None)       # cannot be built: torch, no new warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.select("op", CPU, ("torch", "cpp")) == "torch"
    monkeypatch.setenv(backend.ENV_VAR, "torch")                # forcing still wins
    monkeypatch.setattr(_cpp, "extension", lambda: object())
    assert backend.select("op", CPU, ("torch", "cpp")) == "torch"


def test_forced_backend_and_unknown_value(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    assert backend.select("op", CPU, ("reference", "torch")) == "reference"
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="reference"):
        backend.select("op", CPU, ("torch",))


def test_forced_backend_not_implemented_warns_once(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    with pytest.warns(UserWarning, match="not implemented"):
        assert backend.select("only_torch_op", CPU, ("torch",)) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.select("only_torch_op", CPU, ("torch",)) == "torch"


@pytest.mark.skipif(not backend.triton_available(), reason="triton is not installed")
def test_forced_triton_on_cpu_uses_interpreter(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.select("op", CPU, ("torch", "triton")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.select("op", CPU, ("torch", "triton"))


def test_missing_compiler_degrades_to_torch_with_one_warning(without_compiler, monkeypatch):
    monkeypatch.setattr(_cpp, "_sources", lambda: ["fake.cpp"])
    _cpp.extension.cache_clear()
    with pytest.warns(UserWarning, match="could not be built"):
        assert _cpp.extension() is None
    monkeypatch.setenv(backend.ENV_VAR, "cpp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the build is not retried, so no second warning
        assert backend.select("op", CPU, ("torch", "cpp")) == "torch"
