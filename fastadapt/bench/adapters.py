"""Adapters as functions of their size knob, for sweeps over rank and for equal-budget comparisons.

A benchmark module may define, beside ``CASES``, ``ADAPTERS: list[Adapter]``: for one catalog
method, its PEFT config as a function of the knob that sets its parameter count (LoRA's ``r``,
OFT's ``oft_block_size``, FourierFT's ``n_frequency``, ...).  From that:

- :func:`adapter_case` builds a layer case at any size (``fastadapt bench --sweep rank``);
- :func:`budget_size` finds the size whose trainable parameter count on a model is nearest a
  budget (``fastadapt bench --budget``), by bisection over ``sizes`` (the count grows with the
  knob for every method in the catalog; sizes the config rejects for the model are skipped).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .._catalog import CATALOG
from .cases import Case, CaseSetup, peft_layer_case


@dataclass(frozen=True)
class Adapter:
    """One method's PEFT config as a function of its size knob.

    method:    catalog name ("oft", "lora", ...).
    config:    ``config(size, target_modules) -> PEFT config``.
    size_name: the knob's name, for labels ("r", "oft_block_size").
    sizes:     ascending sizes to sweep and to search a budget among.
    default:   the size of ``fastadapt memory`` and of a rank-less sweep.
    """

    method: str
    config: Callable[[int, list], object]
    size_name: str
    sizes: tuple
    default: int

    def __post_init__(self):
        if self.method not in CATALOG:
            raise ValueError(f"Adapter method={self.method!r} is not a catalog name; valid choices: {sorted(CATALOG)}")
        if list(self.sizes) != sorted(set(self.sizes)) or not self.sizes:
            raise ValueError(f"Adapter {self.method!r}: sizes={self.sizes!r} must be non-empty, ascending, distinct")


def adapter_case(adapter: Adapter, size: Optional[int] = None, *, fused: Optional[bool] = None) -> Case:
    """A layer case (:func:`fastadapt.bench.peft_layer_case`) of ``adapter`` at ``size`` (default:
    its default), named "<method>_<size_name><size>".  ``fused``: add the "fastadapt" arm
    (default: when ``fastadapt.accelerate`` bridges the method)."""
    from ..peft import bridged_methods
    size = adapter.default if size is None else size
    with_fused = adapter.method in bridged_methods() if fused is None else fused

    def build(d: int, n: int, dtype: torch.dtype, device) -> CaseSetup:
        return peft_layer_case(d, n, dtype, device, adapter.config(size, ["0"]),
                               fused={"fastadapt": lambda layer: layer} if with_fused else None)

    return Case(f"{adapter.method}_{adapter.size_name}{size}", CATALOG[adapter.method].family, build,
                notes=f"{adapter.method} at {adapter.size_name}={size}", method=adapter.method)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_at(adapter: Adapter, size: int, make_model: Callable[[], nn.Module], targets: list) -> Optional[int]:
    """Trainable parameters of ``get_peft_model(make_model(), adapter.config(size, targets))``,
    or None where PEFT rejects that size for the model (e.g. a block size that divides no width)."""
    from peft import get_peft_model
    try:
        return trainable_parameters(get_peft_model(make_model(), adapter.config(size, targets)))
    except (ValueError, AssertionError, RuntimeError):
        return None


def budget_size(adapter: Adapter, budget: int, make_model: Callable[[], nn.Module],
                targets: list) -> Optional[tuple[int, int]]:
    """(size, trainable parameters) of the valid size in ``adapter.sizes`` whose count is nearest
    ``budget``, or None when no size is valid for the model.

    Bisection for the first size whose count reaches the budget (a size PEFT rejects is dropped
    from the list when probed), then the nearer of it and the valid size below it: about
    log2(len(sizes)) + 2 models built, so ``sizes`` may list every integer of a rank range.
    """
    sizes = list(adapter.sizes)
    counts: dict[int, Optional[int]] = {}

    def count(size: int) -> Optional[int]:
        if size not in counts:
            counts[size] = count_at(adapter, size, make_model, targets)
        return counts[size]

    lo, hi = 0, len(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        c = count(sizes[mid])
        if c is None:
            del sizes[mid]
            hi -= 1
        elif c >= budget:
            hi = mid
        else:
            lo = mid + 1

    def nearest_valid(i: int, step: int) -> Optional[int]:
        while 0 <= i < len(sizes):
            if count(sizes[i]) is not None:
                return sizes[i]
            i += step
        return None

    around = [s for s in (nearest_valid(lo - 1, -1), nearest_valid(lo, 1)) if s is not None]
    if not around:
        return None
    size = min(around, key=lambda s: (abs(count(s) - budget), s))
    return size, count(size)
