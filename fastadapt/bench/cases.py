"""Benchmark cases and the loop that measures them.

A benchmark module (``benchmarks/cases_<family>.py``) defines ``CASES: list[Case]``.  Each case
builds, for one shape, the frozen base layer, the arms to compare with it, and the float64
oracle for the accuracy column.  :func:`run_cases` turns cases into result rows: one row per
arm (the base included) with its time, overhead ratio, saved-activation ratio, peak memory and
error, so every time sits beside its memory and its accuracy; :func:`summary_rows` folds them
into one row per case (fastadapt, PEFT, compiled PEFT and peers side by side).
"""
from __future__ import annotations

import copy
import statistics
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .._catalog import CATALOG
from ..numerics import rel_error, tolerance
from .measure import device_time_arms, peak_memory, saved_activation_ratio, time_arm_rounds
from .peers import config_method, lycoris_arm
from .training import TRAIN_TOKENS, train_adapter_

MEASURES = ("time", "saved", "peak", "error")
# Profiled fwd+bwd runs per arm for the device-time column: each is its own profiler session
# (tens of ms of setup and parsing), and kernel time barely varies between runs.
DEVICE_TIME_ITERS = 5
DEFAULT_MEASURES = MEASURES
# Seed of the example a layer case trains its adapter on (train_adapter_).
TRAIN_EXAMPLE_SEED = 1


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
    peers:     name -> arm of another library (e.g. "lycoris"): timed and measured like the
               arms, but computing its own parametrisation, so it has no error column.
    reports:   arm name -> the ``fastadapt.accelerate`` report of that arm: its fused calls and
               fallbacks during the measurement go into the arm's row.
    config:    the adapter's configuration, recorded in every row (e.g. {"peft_config":
               "OFTConfig", "oft_block_size": 32}).
    """

    x: torch.Tensor
    base: Callable
    arms: dict[str, Callable]
    reference: Optional[Callable] = None
    metrics: dict[str, float] = field(default_factory=dict)
    peers: dict[str, Callable] = field(default_factory=dict)
    reports: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)


def _method_from_name(name: str) -> Optional[str]:
    head = name.split("_")[0]
    return head if head in CATALOG else None


@dataclass(frozen=True)
class Case:
    """A named benchmark case: ``build(d, n, dtype, device) -> CaseSetup``.

    method: the catalog method the case measures; default: the case name's first
    underscore-separated word when that is a catalog name ("oft_b32" -> "oft").  The first case
    of a method (in discovery order: file name, then list order) is that method's
    representative in ``fastadapt bench --quick`` and ``--host-overhead``.
    """

    name: str
    family: str
    build: Callable[[int, int, torch.dtype, torch.device], CaseSetup]
    notes: str = field(default="", compare=False)
    method: Optional[str] = None

    def __post_init__(self):
        if self.method is None:
            object.__setattr__(self, "method", _method_from_name(self.name))
        elif self.method not in CATALOG:
            raise ValueError(f"Case {self.name!r}: method={self.method!r} is not a catalog name; "
                             f"valid choices: {sorted(CATALOG)}")


def config_summary(config) -> dict:
    """A PEFT config as the fields that differ from its class's defaults, plus its class name."""
    defaults = type(config)()
    skip = {"target_modules", "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode"}
    summary = {"peft_config": type(config).__name__}
    for key, value in vars(config).items():
        if key in skip or key.startswith("_") or getattr(defaults, key, object()) == value:
            continue
        summary[key] = value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)
    return summary


def peft_layer_case(d: int, n: int, dtype: torch.dtype, device, config, *, fused: Optional[dict] = None,
                    autocast_adapter_dtype: bool = True, d_out: Optional[int] = None) -> CaseSetup:
    """The usual case: PEFT's layer (``config``, target "0") on a frozen, random, bias-free
    d -> d_out (default d) Linear, its adapter trained by :func:`fastadapt.bench.train_adapter_`
    (the documented AdamW steps on a random regression loss, never init).

    Arms: "peft" (that layer), and per entry of ``fused`` (arm name -> function of a patched
    copy, e.g. ``lambda layer: layer``) an ``accelerate``-patched copy of the same trained layer;
    peer "lycoris" where LyCORIS is installed and has the method (trained the same way from its
    own init).  Reference: the PEFT layer copied to float64.  ``autocast_adapter_dtype`` is
    PEFT's own switch (True: fp32 adapters on a half base).
    """
    from peft import get_peft_model

    import fastadapt
    from ..testing import linear_model, randn
    model = linear_model(d, d_out or d, bias=False, dtype=dtype).to(device)
    layer = get_peft_model(model, config, autocast_adapter_dtype=autocast_adapter_dtype).base_model.model[0]
    example = randn(TRAIN_TOKENS, d, dtype=dtype, device=device, seed=TRAIN_EXAMPLE_SEED)
    train_adapter_(layer, example)
    arms, reports = {}, {}
    for name, finish in (fused or {}).items():
        patched = copy.deepcopy(layer)
        report = fastadapt.accelerate(patched)
        if report.num_patched != 1:
            raise RuntimeError(f"fastadapt did not patch the layer:\n{report}")
        arms[name], reports[name] = finish(patched), report
    arms["peft"] = layer
    peers = {}
    lycoris = lycoris_arm(config, copy.deepcopy(layer.base_layer))
    if lycoris is not None:
        peers["lycoris"] = train_adapter_(lycoris, example)
    return CaseSetup(x=randn(n, d, dtype=dtype, device=device), base=layer.base_layer, arms=arms,
                     reference=copy.deepcopy(layer).to(torch.float64).eval(), peers=peers, reports=reports,
                     config=config_summary(config) | {"method": config_method(config)})


def peft_case(config: Callable, *, autocast_adapter_dtype: bool = True):
    """A :class:`Case` build for :func:`peft_layer_case` with one fused arm, "fastadapt" (the
    patched PEFT layer): ``config(target_modules)`` gives the PEFT config."""
    def build(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
        return peft_layer_case(d, n, dtype, device, config(["0"]), autocast_adapter_dtype=autocast_adapter_dtype,
                               fused={"fastadapt": lambda layer: layer})
    return build


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
                 measures=DEFAULT_MEASURES, max_iters: Optional[int] = None,
                 round_probe: Optional[Callable[[], float]] = None) -> list[dict]:
    """Rows for one case: one per arm, ``base`` first.  See :func:`run_cases`."""
    unknown = set(measures) - set(MEASURES)
    if unknown:
        raise ValueError(f"measures={sorted(unknown)} unknown; valid choices: {list(MEASURES)}")
    device = torch.device(device)
    setup = case.build(d, n, dtype, device)
    arms = dict(setup.arms)
    clash = ({"base", "peft_compile"} & (set(arms) | set(setup.peers))) | (set(arms) & set(setup.peers))
    if clash:
        raise ValueError(f"case {case.name!r}: arm names {sorted(clash)} are reserved ('base', 'peft_compile') "
                         "or used both as an arm and as a peer")
    if compile and "peft" in arms:
        torch._dynamo.reset()  # a hit recompile limit would silently run eager
        arms["peft_compile"] = torch.compile(arms["peft"], backend=compile_backend)
    everything = {"base": setup.base, **arms, **setup.peers}
    x = setup.x.detach().requires_grad_(True)
    rows = [{"case": case.name, "family": case.family, "method": case.method, "arm": name,
             "peer": name in setup.peers, "d": d, "n": n, "dtype": str(dtype).removeprefix("torch."),
             "device": str(device), "config": dict(setup.config), "metrics": dict(setup.metrics)}
            for name in everything]
    by_arm = {row["arm"]: row for row in rows}

    if "time" in measures:
        samples, reads = time_arm_rounds(everything, x, iters=iters, warmup=warmup, max_iters=max_iters,
                                         round_probe=round_probe)
        times = {name: statistics.median(s) for name, s in samples.items()}
        device_times = (device_time_arms(everything, x, iters=min(iters, DEVICE_TIME_ITERS))
                        if device.type == "cuda" else None)
        for name, row in by_arm.items():
            row["time_s"] = times[name]
            row["min_time_s"] = min(samples[name])
            row["rounds"] = len(samples[name])
            row["samples_s"] = samples[name]
            if round_probe is not None:
                row["state_s"] = reads
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
            # the base is not the adapted layer; a peer computes its own parametrisation
            compared = ref is not None and name != "base" and not row["peer"]
            row["rel_error"] = rel_error(_eval_output(everything[name], x), ref) if compared else None
            row["tolerance"] = tolerance(dtype)
    for name, report in setup.reports.items():
        by_arm[name].update(fused_calls=report.fused_calls, fallbacks=sum(report.fallbacks.values()),
                            fallback_reasons=dict(report.fallbacks))
    return rows


def run_cases(cases: list[Case], d: int, n: int, dtype: torch.dtype, device, iters: int = 20, *,
              warmup: int = 3, compile: bool = True, compile_backend: str = "inductor",
              measures=DEFAULT_MEASURES, on_error: str = "record", progress=None,
              max_iters: Optional[int] = None, round_probe: Optional[Callable[[], float]] = None) -> list[dict]:
    """Measure every case at one shape; one row per (case, arm), the base arm included.

    Row keys: case, family, method, arm, peer (True for another library's arm), d, n, dtype,
    device, config, metrics, and per measure
      "time":  time_s (median fwd+bwd seconds), min_time_s (the fastest run: the cost without the
               scheduler's interruptions, what host-overhead tables read), ratio (time / base time),
               rounds (timed runs per arm: ``iters``, or up to ``max_iters`` while a median is
               uncertain, :func:`fastadapt.bench.time_arm_samples`), samples_s (every timed run, in
               order), with ``round_probe`` state_s (its read at the start of each timed round,
               aligned with samples_s: :mod:`fastadapt.bench.states`); on CUDA also
               device_time_s and device_ratio (profiler device time, median of
               min(iters, DEVICE_TIME_ITERS) profiled runs);
      "saved": saved_ratio (saved-activation bytes / bytes(x));
      "peak":  peak_bytes (:func:`fastadapt.bench.peak_memory` of one fwd+bwd: CPU from the
               profiler's allocator records, CUDA max_memory_allocated);
      "error": rel_error (relative Frobenius error vs the float64 reference, eval mode; None
               for the base arm, peers and without a reference) and tolerance (the project
               table's bound for ``dtype``);
    and for arms patched by ``fastadapt.accelerate``: fused_calls, fallbacks (PEFT forwards
    run instead during the measurement) and fallback_reasons.
    An arm named "peft" gets a "peft_compile" twin unless ``compile=False``; dynamo is reset
    per case.  A case that raises gives one row {case, family, method, arm: None, error,
    traceback} when ``on_error="record"`` (the others still run), or re-raises with "raise".
    ``progress(message)`` is called before each case when given.
    """
    if on_error not in ("record", "raise"):
        raise ValueError(f"on_error={on_error!r}; valid choices: ['record', 'raise']")
    rows: list[dict] = []
    for case in cases:
        if progress is not None:
            progress(f"{case.name} (d={d}, n={n}, {str(dtype).removeprefix('torch.')}, {device})")
        try:
            rows += measure_case(case, d, n, dtype, device, iters=iters, warmup=warmup, compile=compile,
                                 compile_backend=compile_backend, measures=measures, max_iters=max_iters,
                                 round_probe=round_probe)
        except Exception as exc:
            if on_error == "raise":
                raise
            rows.append(error_row(case, exc, d=d, n=n, dtype=dtype, device=device))
    return rows


def error_row(case: Case, exc: BaseException, **shape) -> dict:
    """The row a failing case leaves: what failed and where, no measurements."""
    row = {"case": case.name, "family": case.family, "method": case.method, "arm": None,
           "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    for key, value in shape.items():
        row[key] = str(value).removeprefix("torch.") if key in ("dtype", "device") else value
    return row


# --------------------------------------------------------------------------------------------
# one row per case

SUMMARY_ARMS = ("base", "fastadapt", "peft", "peft_compile", "lycoris")


def _ms(seconds):
    return None if seconds is None else seconds * 1e3


def summary_rows(rows: list[dict]) -> list[dict]:
    """One row per case from :func:`run_cases` rows (the ``--json`` schema).

    Keys: case, method, family, config, device, dtype, d, tokens, probe_ms and first_probe_ms (the
    CPU machine-state probe, runner.measure_with_probe; None elsewhere); per arm of SUMMARY_ARMS
    ``<arm>_ms``, ``<arm>_min_ms`` and ``<arm>_ratio`` (median and fastest fwd+bwd ms, median
    ratio to the base; the "fastadapt" arm is the patched layer's default mode); saved_ratio / peak_bytes (fastadapt) beside
    peft_saved_ratio, peft_compile_saved_ratio, lycoris_saved_ratio, peft_peak_bytes,
    peft_compile_peak_bytes, lycoris_peak_bytes, base_peak_bytes; max_rel_err (largest error of
    the fastadapt arms vs float64), peft_rel_err, tolerance; fallbacks and fused_calls (summed
    over the fastadapt arms); arms (every arm, other modes included: ms, ratio, saved_ratio,
    peak_bytes, rel_error); metrics; error (None, or why the case failed).  A missing arm or
    measure gives None.
    """
    by_case: dict[str, list[dict]] = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    out = []
    for case, case_rows in by_case.items():
        first = case_rows[0]
        arms = {r["arm"]: r for r in case_rows if r.get("arm") is not None}
        failed = next((r for r in case_rows if r.get("arm") is None), None)
        summary = {"case": case, "method": first.get("method"), "family": first.get("family"),
                   "config": first.get("config"), "device": first.get("device"), "dtype": first.get("dtype"),
                   "d": first.get("d"), "tokens": first.get("n"), "probe_ms": first.get("probe_ms"),
                   "first_probe_ms": first.get("first_probe_ms")}
        for arm in SUMMARY_ARMS:
            r = arms.get(arm, {})
            summary[f"{arm}_ms"] = _ms(r.get("time_s"))
            summary[f"{arm}_min_ms"] = _ms(r.get("min_time_s"))
            summary[f"{arm}_ratio"] = r.get("ratio")
        fa = arms.get("fastadapt", {})
        summary["saved_ratio"] = fa.get("saved_ratio")
        summary["peak_bytes"] = fa.get("peak_bytes")
        for arm in ("peft", "peft_compile", "lycoris"):
            summary[f"{arm}_saved_ratio"] = arms.get(arm, {}).get("saved_ratio")
            summary[f"{arm}_peak_bytes"] = arms.get(arm, {}).get("peak_bytes")
        summary["base_peak_bytes"] = arms.get("base", {}).get("peak_bytes")
        fused = [r for name, r in arms.items() if name.startswith("fastadapt")]
        errors = [r["rel_error"] for r in fused if r.get("rel_error") is not None]
        summary["max_rel_err"] = max(errors) if errors else None
        summary["peft_rel_err"] = arms.get("peft", {}).get("rel_error")
        summary["tolerance"] = next((r["tolerance"] for r in arms.values() if "tolerance" in r), None)
        counted = [r for r in fused if "fallbacks" in r]
        summary["fallbacks"] = sum(r["fallbacks"] for r in counted) if counted else None
        summary["fused_calls"] = sum(r["fused_calls"] for r in counted) if counted else None
        summary["arms"] = {name: {"ms": _ms(r.get("time_s")), "ratio": r.get("ratio"),
                                  "saved_ratio": r.get("saved_ratio"), "peak_bytes": r.get("peak_bytes"),
                                  "rel_error": r.get("rel_error"), "peer": r.get("peer", False),
                                  "rounds": r.get("rounds")}
                           for name, r in arms.items()}
        summary["metrics"] = first.get("metrics", {})
        summary["error"] = failed["error"] if failed else None
        out.append(summary)
    return out
