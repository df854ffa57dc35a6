"""Input checks shared by references, ops and layers.

Every error names the offending parameter and a valid choice.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer, e.g. {name}=8")
    return value


def rank(r, d_in: int, d_out: int, name: str = "r") -> int:
    """A rank in 1..min(d_in, d_out)."""
    positive_int(name, r)
    top = min(d_in, d_out)
    if r > top:
        raise ValueError(f"{name}={r} exceeds min(in_features, out_features)={top}; choose {name} in 1..{top}")
    return r


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def nearest_divisors(n: int, value: int, count: int = 2) -> list[int]:
    """The divisors of ``n`` closest to ``value`` (ties: smaller first)."""
    return sorted(sorted(divisors(n), key=lambda k: (abs(k - value), k))[:count])


def divides(name: str, block, features: int, features_name: str = "in_features") -> int:
    """``block`` must divide ``features``; the error lists the nearest valid choices."""
    positive_int(name, block)
    if features % block:
        raise ValueError(
            f"{name}={block} does not divide {features_name}={features}; nearest valid "
            f"{name}: {nearest_divisors(features, block)}")
    return block


def even(name: str, value: int) -> int:
    if value % 2:
        raise ValueError(f"{name}={value} must be even (features are rotated in pairs); e.g. {value - 1 or 2}")
    return value


def tensor(name: str, t, *, ndim=None, min_ndim=None, dtype=None, device=None, shape=None) -> torch.Tensor:
    """Check a tensor argument; TypeError for wrong type/dtype, ValueError for shape/device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must have ndim={ndim}, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.ndim < min_ndim:
        raise ValueError(f"{name} must have ndim >= {min_ndim}, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}; expected {dtype}")
    if dtype is None and not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {list(FLOAT_DTYPES)}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device}; expected {device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")
    return t


_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def autocast_casts(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True inside ``torch.autocast`` on the tensors' device when both dtypes are ones it casts: the
    fused ops' autocast registration gives them one dtype before any kernel runs."""
    return (a.dtype in _AUTOCAST_DTYPES and b.dtype in _AUTOCAST_DTYPES and a.device.type in ("cpu", "cuda")
            and torch.is_autocast_enabled(a.device.type))


def same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """``a`` and ``b`` must share dtype and device (any float32 / float16 / bfloat16 mix inside
    ``torch.autocast``, which casts them to its dtype)."""
    if a.dtype != b.dtype and not autocast_casts(a, b):
        raise TypeError(f"{name_a} has dtype {a.dtype} but {name_b} has {b.dtype}; cast one to match")
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}; move one to match")
