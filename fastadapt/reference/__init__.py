"""fastadapt.reference: dense, readable PyTorch of every catalog method (the test oracles).

Each module exports ``REFERENCES = {catalog_name: class}``; :data:`REFERENCES` merges them.
Every class documents its formula, shapes and paper, runs in float64, and offers ``forward``
and (where the method has one) ``delta_weight``.
"""
from __future__ import annotations

from . import butterfly, cayley, circulant, clover, dora, hadamard, lowrank, model, structured
from ._base import ReferenceAdapter, peft_base_layer

_MODULES = (lowrank, structured, hadamard, dora, cayley, butterfly, circulant, clover, model)

REFERENCES: dict = {}
for _m in _MODULES:
    _clash = set(REFERENCES) & set(_m.REFERENCES)
    if _clash:
        raise RuntimeError(f"reference names defined twice: {sorted(_clash)}")
    REFERENCES.update(_m.REFERENCES)
    for _cls in _m.REFERENCES.values():
        globals()[_cls.__name__] = _cls


def get(name: str):
    """The reference class for catalog method ``name``."""
    from .._catalog import entry
    key = entry(name).name
    if key not in REFERENCES:
        raise ValueError(f"method={name!r} has no reference yet; available: {sorted(REFERENCES)}")
    return REFERENCES[key]


__all__ = ["REFERENCES", "ReferenceAdapter", "get", "peft_base_layer"]
