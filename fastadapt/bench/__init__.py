"""fastadapt.bench: timing, saved-activation bytes, peak memory, error vs float64 reference.

Measurement primitives (DESIGN.md section 6) live in :mod:`.measure`, benchmark cases and the
loop over them in :mod:`.cases`, the runner behind ``fastadapt bench | memory | check | plot``
(and ``python -m benchmarks.run``) in :mod:`.runner`, charts in :mod:`.plot`.
"""
from __future__ import annotations

from ..numerics import rel_error as relative_error
from .cases import Case, CaseSetup, measure_case, peft_layer_case, run_cases, selected
from .measure import (OverheadResult, device_time_arms, flush_l2, machine_ceilings, overhead_ratio,
                      peak_memory, saved_activation_bytes, saved_activation_ratio, time_arms)
from .runner import add_cli

__all__ = [
    "Case", "CaseSetup", "OverheadResult", "add_cli", "device_time_arms", "flush_l2",
    "machine_ceilings", "measure_case", "overhead_ratio", "peft_layer_case", "peak_memory", "relative_error",
    "run_cases", "saved_activation_bytes", "saved_activation_ratio", "selected", "time_arms",
]
