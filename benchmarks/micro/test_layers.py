"""Layer microbenchmarks of every bridged method, found by name (no list to edit).

For each ``ADAPTERS`` entry of ``benchmarks/cases_*.py`` whose method ``fastadapt.accelerate``
bridges: PEFT's layer at the adapter's default size on a bias-free d x d Linear, trained a few
AdamW steps from init (fastadapt.bench.train_adapter_), forward and forward+backward, as
  fastadapt  the layer patched by fastadapt.accelerate,
  torch      the method's reference (fastadapt.reference, ``from_peft``) cast to the layer's dtype:
             the textbook torch composition,
  peft       PEFT's layer.
"""
import copy

import pytest
from peft import get_peft_model

import fastadapt
from fastadapt.bench.micro import forward_backward, forward_only, run
from fastadapt.bench.runner import cases_dir, discover
from fastadapt.bench.training import train_adapter_
from fastadapt.peft import bridged_methods
from fastadapt.reference import REFERENCES
from fastadapt.testing import linear_model, randn

BRIDGED = [a for a in discover(cases_dir()).adapters if a.method in bridged_methods()]


@pytest.mark.parametrize("adapter", BRIDGED, ids=lambda a: a.method)
@pytest.mark.parametrize("arm", ["fastadapt", "torch", "peft"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_layer(benchmark, device, shape, adapter, arm, pass_):
    d, n, dtype = shape
    model = linear_model(d, d, bias=False, dtype=dtype).to(device)
    layer = get_peft_model(model, adapter.config(adapter.default, ["0"])).base_model.model[0]
    train_adapter_(layer, randn(64, d, dtype=dtype, device=device, seed=1))
    if arm == "fastadapt":
        layer = copy.deepcopy(layer)
        report = fastadapt.accelerate(layer, min_macs=0)   # the fused layer, also below the CPU crossover
        assert report.num_patched == 1, report
    elif arm == "torch":
        reference = REFERENCES.get(adapter.method)
        if not hasattr(reference, "from_peft"):
            pytest.skip(f"{adapter.method} has no reference built from a PEFT layer (fastadapt.reference)")
        layer = reference.from_peft(layer).to(device=device, dtype=dtype)
    x = randn(n, d, dtype=dtype, device=device, seed=2).requires_grad_(True)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    fn = lambda: layer(x)  # noqa: E731
    call = forward_only(fn) if pass_ == "fwd" else forward_backward(fn, [x, *trainable])
    group = f"{adapter.method} {adapter.size_name}={adapter.default} {pass_} (d={d}, n={n}, {str(dtype)[6:]})"
    run(benchmark, call, group=group, device=device)
    if arm == "fastadapt":
        assert sum(report.fallbacks.values()) == 0, f"the fused path fell back: {report}"
