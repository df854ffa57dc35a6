"""Every registered fused op (``fastadapt::<name>``, from every fastadapt/ops/<family>.py), timed
at its opcheck example inputs per backend this machine runs (CPU: torch / cpp / reference; CUDA:
triton beside torch): the per-call cost of each op and each of its implementations, found by
name (a new family's ops appear here with no edit).  Forward only, through the implementation
itself (below autograd and the dispatcher)."""
import pytest
import torch

from fastadapt.bench.micro import micro_device, run
from fastadapt.ops._registry import import_all


def _device_of(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


def _cases():
    device = micro_device()
    runnable = {"cpu": ("torch", "cpp", "reference"), "cuda": ("triton", "torch")}[device.type]
    out = []
    for name, op in sorted(import_all().items()):
        for backend in op.backends:
            if backend in runnable:
                out += [pytest.param(op, backend, i, id=f"{name}-{backend}-ex{i}") for i in range(len(op.examples()))]
    return out


@pytest.mark.parametrize("op, backend, example", _cases())
def test_op(benchmark, op, backend, example):
    device = micro_device()
    args, kwargs = op.examples()[example]
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    impl = op.implementations[backend]

    def call():
        with torch.no_grad():
            impl(*args, **kwargs)
    run(benchmark, call, group=f"{op.name} example {example}", device=_device_of(args))
