"""Benchmark cases and the loop that measures them.

A benchmark module (``benchmarks/cases_<family>.py``) defines ``CASES: list[Case]``.  Each case
builds, for one shape, the frozen base layer, the arms to compare with it, and the float64
oracle for the accuracy column.  :func:`run_cases` turns cases into result rows: one row per
arm (the base included) with its time, overhead ratio, saved-activation ratio and error, so
every time sits beside its accuracy.
"""
from __future__ import annotations

import copy
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..numerics import rel_error, tolerance
from .measure import device_time_arms, peak_memory, saved_activation_ratio, time_arms

MEASURES = ("time", "saved", "error", "peak")
# Profiled fwd+bwd runs per arm for the device-time column: each is its own profiler session
# (tens of ms of setup and parsing), and kernel time barely varies between runs.
DEVICE_TIME_ITERS = 5
DEFAULT_MEASURES = ("time", "saved", "error")


@dataclass
class CaseSetup:
    """What one case builds for one shape.

    x:         the input, shape (n, d) unless the case says otherwise (made to require grad).
    base:      the frozen base layer (the denominator of every overhead ratio).
    arms:      name -> nn.Module or callable to compare with ``base``; an arm named "peft" also
               gets a "peft_compile" twin (torch.compile of it) in :func:`run_cases`.
    reference: ``reference(x64) -> float64 output`` for the accuracy column, or None.  The arms
               are evaluated for accuracy in eval mode (dropout inactive), so the reference
               computes the output without dropout.
    metrics:   case-level numbers recorded beside the rows (e.g. the orthogonality error of the
               rotation the case trains), name -> float.
    """

    x: torch.Tensor
    base: Callable
    arms: dict[str, Callable]
    reference: Optional[Callable] = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """A named benchmark case: ``build(d, n, dtype, device) -> CaseSetup``."""

    name: str
    family: str
    build: Callable[[int, int, torch.dtype, torch.device], CaseSetup]
    notes: str = field(default="", compare=False)


def peft_layer_case(d: int, n: int, dtype: torch.dtype, device, config, *, randomize=(),
                    scale: float = 0.1, prepare: Optional[Callable] = None,
                    fused: Optional[dict] = None, autocast_adapter_dtype: bool = True) -> CaseSetup:
    """The usual case: PEFT's layer (``config``, target "0") on a frozen, random, bias-free d x d
    Linear, parameters named in ``randomize`` overwritten (times ``scale``), then ``prepare(layer)``
    (further changes to the adapter, in place); arms "peft" and, per
    entry of ``fused`` (arm name -> function of a patched copy, e.g. ``lambda layer: layer``), an
    ``accelerate``-patched copy; reference: the PEFT layer copied to float64.
    ``autocast_adapter_dtype`` is PEFT's own switch (True: fp32 adapters on a half base)."""
    from peft import get_peft_model

    import fastadapt
    from ..testing import linear_model, randn, randomize_
    model = linear_model(d, d, bias=False, dtype=dtype).to(device)
    layer = get_peft_model(model, config, autocast_adapter_dtype=autocast_adapter_dtype).base_model.model[0]
    if randomize:
        randomize_(layer, scale=scale, names=list(randomize))
    if prepare is not None:
        with torch.no_grad():
            prepare(layer)
    arms = {}
    for name, finish in (fused or {}).items():
        patched = copy.deepcopy(layer)
        report = fastadapt.accelerate(patched)
        if report.num_patched != 1:
            raise RuntimeError(f"fastadapt did not patch the layer:\n{report}")
        arms[name] = finish(patched)
    arms["peft"] = layer
    return CaseSetup(x=randn(n, d, dtype=dtype, device=device), base=layer.base_layer, arms=arms,
                     reference=copy.deepcopy(layer).to(torch.float64).eval())


def selected(cases: list[Case], only) -> list[Case]:
    """Cases whose family equals, or whose name starts with, one of ``only`` (all when empty).

    A prefix, not a substring: "lora" selects lora_r16 and lora_r16_dropout0.1, not delora_r16.
    """
    if not only:
        return list(cases)
    return [c for c in cases if any(s == c.family or c.name.startswith(s) for s in only)]


def _eval_output(arm: Callable, x: torch.Tensor) -> torch.Tensor:
    """``arm(x)`` in eval mode without grad; the arm's training flag is restored after."""
    was_training = arm.training if isinstance(arm, nn.Module) else None
    if was_training is not None:
        arm.eval()
    try:
        with torch.no_grad():
            return arm(x)
    finally:
        if was_training is not None:
            arm.train(was_training)


def _reference_output(reference: Callable, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference(x.detach().to(torch.float64))


def measure_case(case: Case, d: int, n: int, dtype: torch.dtype, device, *, iters: int = 20,
                 warmup: int = 3, compile: bool = True, compile_backend: str = "inductor",
                 measures=DEFAULT_MEASURES) -> list[dict]:
    """Rows for one case: one per arm, ``base`` first.  See :func:`run_cases`."""
    unknown = set(measures) - set(MEASURES)
    if unknown:
        raise ValueError(f"measures={sorted(unknown)} unknown; valid choices: {list(MEASURES)}")
    device = torch.device(device)
    setup = case.build(d, n, dtype, device)
    arms = dict(setup.arms)
    if "base" in arms:
        raise ValueError(f"case {case.name!r}: arm name 'base' is reserved for CaseSetup.base")
    if compile and "peft" in arms:
        torch._dynamo.reset()  # a hit recompile limit would silently run eager
        arms["peft_compile"] = torch.compile(arms["peft"], backend=compile_backend)
    everything = {"base": setup.base, **arms}
    x = setup.x.detach().requires_grad_(True)
    rows = [{"case": case.name, "family": case.family, "arm": name, "d": d, "n": n,
             "dtype": str(dtype).removeprefix("torch."), "device": str(device), "metrics": dict(setup.metrics)}
            for name in everything]
    by_arm = {row["arm"]: row for row in rows}

    if "time" in measures:
        times = time_arms(everything, x, iters=iters, warmup=warmup)
        device_times = (device_time_arms(everything, x, iters=min(iters, DEVICE_TIME_ITERS))
                        if device.type == "cuda" else None)
        for name, row in by_arm.items():
            row["time_s"] = times[name]
            row["ratio"] = times[name] / times["base"]
            if device_times is not None:
                row["device_time_s"] = device_times[name]
                row["device_ratio"] = device_times[name] / device_times["base"]
    if "saved" in measures:
        for name, row in by_arm.items():
            row["saved_ratio"] = saved_activation_ratio(everything[name], x)
    if "peak" in measures:
        for name, row in by_arm.items():
            row["peak_bytes"] = peak_memory(everything[name], x)
    if "error" in measures:
        ref = None if setup.reference is None else _reference_output(setup.reference, x)
        for name, row in by_arm.items():
            compared = ref is not None and name != "base"  # the base is not the adapted layer
            row["rel_error"] = rel_error(_eval_output(everything[name], x), ref) if compared else None
            row["tolerance"] = tolerance(dtype)
    return rows


def run_cases(cases: list[Case], d: int, n: int, dtype: torch.dtype, device, iters: int = 20, *,
              warmup: int = 3, compile: bool = True, compile_backend: str = "inductor",
              measures=DEFAULT_MEASURES, on_error: str = "record", progress=None) -> list[dict]:
    """Measure every case at one shape; one row per (case, arm), the base arm included.

    Row keys: case, family, arm, d, n, dtype, device, and per measure
      "time":  time_s (median fwd+bwd seconds), ratio (time / base time); on CUDA also
               device_time_s and device_ratio (profiler device time, median of
               min(iters, DEVICE_TIME_ITERS) profiled runs);
      "saved": saved_ratio (saved-activation bytes / bytes(x));
      "error": rel_error (relative Frobenius error vs the float64 reference, eval mode; None
               for the base arm and without a reference) and tolerance (the project table's bound for ``dtype``);
      "peak":  peak_bytes (:func:`fastadapt.bench.peak_memory` of fwd+bwd).
    An arm named "peft" gets a "peft_compile" twin unless ``compile=False``; dynamo is reset
    per case.  A case that raises gives one row {case, family, arm: None, error: message} when
    ``on_error="record"`` (the runner prints it and exits non-zero), or re-raises with "raise".
    ``progress(message)`` is called before each case when given.
    """
    if on_error not in ("record", "raise"):
        raise ValueError(f"on_error={on_error!r}; valid choices: ['record', 'raise']")
    rows: list[dict] = []
    for case in cases:
        if progress is not None:
            progress(f"{case.name} (d={d}, n={n}, {str(dtype).removeprefix('torch.')}, {device})")
        try:
            rows += measure_case(case, d, n, dtype, device, iters=iters, warmup=warmup,
                                 compile=compile, compile_backend=compile_backend, measures=measures)
        except Exception as exc:
            if on_error == "raise":
                raise
            rows.append({"case": case.name, "family": case.family, "arm": None,
                         "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc()})
    return rows
