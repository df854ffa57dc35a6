"""Tile choice and operand checks shared by every launcher in fastadapt.triton_kernels.

Tiles are powers of two >= 16 (tl.arange needs powers of two, tl.dot needs each dim >= 16); a
rank or other skinny side is padded to such a width (``block_r``) and masked.  Operands of a
launcher that takes a half base with PEFT's float32 adapter obey :func:`check_operands`.
"""
from __future__ import annotations

import functools

import torch
import triton


def check_operands(what: str, base, partner, adapter) -> torch.dtype:
    """Dtype/device contract of the mixed-capable launchers: ``base`` = (name, tensor) in float32,
    float16 or bfloat16; ``partner`` of the same dtype and device; the ``adapter`` pairs in base's
    dtype or all float32 (PEFT's float32 adapter on a half base), on base's device.  Returns the
    adapter operands' dtype."""
    (name, t0), (pname, pt) = base, partner
    if t0.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} has dtype {t0.dtype}; {what} takes float32, float16 or bfloat16")
    if pt.dtype != t0.dtype or pt.device != t0.device:
        raise TypeError(f"{pname} is {pt.dtype} on {pt.device} but {name} is {t0.dtype} on {t0.device}; "
                        f"{what} takes {name} and {pname} of one dtype and device")
    adapter_dtype = adapter[0][1].dtype if adapter[0][1].dtype == torch.float32 else t0.dtype
    for aname, t in adapter:
        if t.dtype != adapter_dtype or t.device != t0.device:
            raise TypeError(f"{aname} is {t.dtype} on {t.device} but {name} is {t0.dtype} on {t0.device}; "
                            f"{' and '.join(a for a, _ in adapter)} take {name}'s dtype, or float32 on a "
                            f"float16 / bfloat16 {name}, on {name}'s device")
    return adapter_dtype


def block_r(r: int) -> int:
    """A skinny side (a rank r) padded to a legal tile width: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(r))


def check_tiles(**tiles) -> None:
    """Tile sizes compile only as powers of two >= 16 (tl.arange sizes, tl.dot's minimum)."""
    for name, value in tiles.items():
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name}={value} must be a power of two >= 16, e.g. {name}=32")


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (programs that run side by side); 1 for a CPU
    tensor, where the interpreter runs programs one after another and splitting gains nothing."""
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
