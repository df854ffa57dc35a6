"""fastadapt.bench: timing, saved-activation bytes, peak memory, error vs float64 reference.

Measurement primitives live in :mod:`.measure`; trained adapter
parameters for every case in :mod:`.training`; benchmark cases and the loop over them in
:mod:`.cases`; adapters as functions of their size knob (sweeps, equal budgets) in
:mod:`.adapters`; one training step of a tiny Llama in :mod:`.model_step`; peer libraries
(LyCORIS) in :mod:`.peers`; the runner behind ``fastadapt bench | memory | check | plot`` (and
``python -m benchmarks.run``) in :mod:`.runner`, its tables in :mod:`.report`, two runs'
agreement (``fastadapt compare``) in :mod:`.compare`, charts in :mod:`.plot`, pytest-benchmark helpers for ``benchmarks/micro`` in :mod:`.micro`.
"""
from __future__ import annotations

from ..numerics import rel_error as relative_error
from .adapters import Adapter, adapter_case, budget_size
from .cases import Case, CaseSetup, measure_case, peft_case, peft_layer_case, run_cases, selected, summary_rows
from .measure import (MEDIAN_RSE_TARGET, OverheadResult, device_time_arms, flush_l2, machine_ceilings,
                      median_rse, overhead_ratio, peak_bytes_during, peak_memory, saved_activation_bytes, saved_activation_ratio,
                      saved_bytes_during, time_arm_rounds, time_arm_samples, time_arms)
from .runner import add_cli
from .training import TRAIN_LR, TRAIN_SEED, TRAIN_STEPS, TRAIN_TOKENS, train_adapter_

__all__ = [
    "Adapter", "Case", "CaseSetup", "MEDIAN_RSE_TARGET", "OverheadResult", "TRAIN_LR", "TRAIN_SEED", "TRAIN_STEPS", "TRAIN_TOKENS",
    "adapter_case", "add_cli", "budget_size", "device_time_arms", "flush_l2", "machine_ceilings", "measure_case", "median_rse",
    "overhead_ratio", "peak_bytes_during", "peak_memory", "peft_case", "peft_layer_case", "relative_error", "run_cases",
    "saved_activation_bytes", "saved_activation_ratio", "saved_bytes_during", "selected", "summary_rows",
    "time_arm_rounds", "time_arm_samples", "time_arms", "train_adapter_",
]
