"""fastadapt: exact, fused fast paths for parameter-efficient fine-tuning adapters.

    import fastadapt
    report = fastadapt.accelerate(peft_model)   # same results, faster; checkpoints unchanged
    fastadapt.revert(peft_model)
    fastadapt.methods()                         # what exists for each catalog method
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ._catalog import CATALOG, FAMILIES
from .peft import AccelerationReport, accelerate, revert

__version__ = "0.1.0"


@dataclass(frozen=True)
class MethodSupport:
    """What exists for one catalog method; every boolean is derived from a live registry."""

    name: str
    title: str
    family: str
    in_peft: bool
    reference: bool
    cpu: bool
    triton: bool
    peft_bridge: bool
    peft_config: bool

    def as_dict(self) -> dict:
        return asdict(self)


SUPPORT_FIELDS = ("reference", "cpu", "triton", "peft_bridge", "peft_config")


def methods() -> dict[str, MethodSupport]:
    """Every catalog method (33) with what exists for it, in catalog order."""
    from .configs import CONFIGS
    from .ops import implemented
    from .peft import bridged_methods
    from .reference import REFERENCES

    cpu, triton = implemented()
    bridged = bridged_methods()
    return {
        name: MethodSupport(
            name=name, title=e.title, family=e.family, in_peft=e.peft_type is not None,
            reference=name in REFERENCES, cpu=name in cpu, triton=name in triton,
            peft_bridge=name in bridged, peft_config=name in CONFIGS)
        for name, e in CATALOG.items()
    }


def keep_boft_butterfly_factors() -> None:
    """Make PEFT build BOFT layers created after this call with their configured
    boft_n_butterfly_factor where PEFT's CUDA extension does not build (PEFT then forces 1):
    an exact torch block-diagonal stands in for it, process-wide (needed to load a checkpoint
    trained with m > 1 on a GPU; fastadapt.layers.butterfly says what it means for others)."""
    from .layers.butterfly import keep_boft_butterfly_factors as keep
    keep()


__all__ = ["AccelerationReport", "CATALOG", "FAMILIES", "MethodSupport", "accelerate", "keep_boft_butterfly_factors",
           "methods", "revert"]
