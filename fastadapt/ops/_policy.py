"""PEFT's adapter dtype policy, once for every family.

PEFT (0.21) stores adapter weights in the base layer's dtype unless ``autocast_adapter_dtype=True``
(its default) upcasts them to float32 when the base is float16 or bfloat16.  A layer then casts x
to the adapter's dtype for the adapter path (``cast_input_dtype_enabled``, on by default), runs
the frozen base product in the base dtype, and adds the two.  So a fused op meets exactly two
dtype layouts:

    same:   x, W, bias and the adapter tensors all in one dtype (float64, float32, float16, bfloat16)
    mixed:  x, W, bias in float16 / bfloat16, the adapter tensors in float32 (PEFT's default on a
            half base): base GEMMs in the half dtype, the adapter path in float32, the sum rounded
            to the half dtype once

Anything else (x and W of different dtypes, adapter tensors of mixed dtypes, a half adapter on a
float32 base, ...) is a configuration the bridge does not fuse: :func:`fallback_reason` says why
and PEFT's forward runs.  Accumulation: float64 stays float64, everything else accumulates in
float32 (:func:`acc_dtype`).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from .. import _validate

HALF_DTYPES = (torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_mixed(base_dtype: torch.dtype, adapter_dtype: torch.dtype) -> bool:
    """True for PEFT's float32 adapter on a float16 / bfloat16 base."""
    return adapter_dtype == torch.float32 and base_dtype in HALF_DTYPES


def adapter_compute_dtype(base_name: str, base: torch.Tensor, adapter_tensors) -> torch.dtype:
    """The dtype the adapter path computes in: the one dtype of ``adapter_tensors`` ((name, tensor)
    pairs), which is ``base``'s dtype (x or W), or float32 on a float16 / bfloat16 base (PEFT's
    default ``autocast_adapter_dtype=True``).  TypeError naming the parameters otherwise;
    ValueError for a device mismatch."""
    (first_name, first), *rest = adapter_tensors
    for name, t in rest:
        _validate.same(first_name, first, name, t)
    if first.dtype != base.dtype and not is_mixed(base.dtype, first.dtype):
        _validate.same(base_name, base, first_name, first)  # raises: names both dtypes
    if first.device != base.device:
        raise ValueError(f"{base_name} is on {base.device} but {first_name} is on {first.device}; move one to match")
    return first.dtype


def fallback_reason(layer, x: torch.Tensor, base_tensors: Iterable[Optional[torch.Tensor]],
                    adapter_tensors: Iterable[torch.Tensor], *, casts_x: bool) -> Optional[str]:
    """Why the dtypes of one PEFT layer call cannot run fused, or None.

    Fused: x, W and the bias share one dtype, the adapter tensors share one dtype, and that is
    x's dtype or float32 on a float16 / bfloat16 x (the two layouts of the module docstring).
    ``casts_x``: the PEFT layer casts x to the adapter dtype (lora.Linear does, unless
    ``cast_input_dtype_enabled`` is off, in which case PEFT's own forward raises on the mix).
    Inside ``torch.autocast`` on x's device any mix of float32 / float16 / bfloat16 is served:
    PEFT's layer runs its products in the autocast dtype whatever its inputs' dtypes, and the ops'
    autocast registration casts theirs (bridge entries opt in with ``BridgeEntry.autocast``).
    """
    base_tensors, adapter_tensors = list(base_tensors), list(adapter_tensors)
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        floats = {x.dtype, *(t.dtype for t in (*base_tensors, *adapter_tensors) if t is not None)}
        if floats <= {torch.float32, *HALF_DTYPES}:
            return None
    base_dtypes = {x.dtype, *(t.dtype for t in base_tensors if t is not None)}
    if len(base_dtypes) > 1:
        return f"x, base weight and bias have mixed dtypes {sorted(str(d) for d in base_dtypes)}"
    adapter_dtypes = {t.dtype for t in adapter_tensors}
    if len(adapter_dtypes) > 1:
        return f"adapter tensors have mixed dtypes {sorted(str(d) for d in adapter_dtypes)}"
    (adapter_dtype,) = adapter_dtypes
    if adapter_dtype == x.dtype:
        return None
    if not is_mixed(x.dtype, adapter_dtype):
        return f"adapter dtype {adapter_dtype} on a {x.dtype} base (fused: the same dtype, or float32 on a half base)"
    if casts_x and not getattr(layer, "cast_input_dtype_enabled", True):
        return "cast_input_dtype_enabled=False with a float32 adapter on a half base"
    return None
