"""Peer libraries as optional benchmark arms: LyCORIS (``pip install lycoris-lora``) in bypass mode.

A user choosing an adapter library compares more than fastadapt and PEFT.  Where LyCORIS is
installed and has the method of a case, :func:`lycoris_arm` builds LyCORIS's own module for the
same frozen base layer and the same size knob, in its bypass mode (``y = base(x) + delta(x)``,
the base weight never rebuilt), and the case times it beside the other arms.  Its parametrisation
differs from PEFT's (LyCORIS's OFT rotates the output side, its dropout drops the adapter's output
rather than its input), so the arm carries time and memory, never an error against PEFT's
reference.  LyCORIS stays optional: without it no arm is added and nothing fails.

Methods and what LyCORIS builds for them (catalog name -> LyCORIS module, from the PEFT config):

    lora  LoConModule(lora_dim=r, alpha=lora_alpha)
    loha  LohaModule(lora_dim=r, alpha=alpha)
    lokr  LokrModule(lora_dim=r, alpha=alpha, factor=decompose_factor, decompose_both=...)
    oft   DiagOFTModule(lora_dim=in_features // oft_block_size) when LyCORIS's factorisation gives
          that block size (it keeps block size <= block count: b <= sqrt(d))

LyCORIS's bypass mode has no DoRA (its weight decomposition needs the rebuilt weight), so DoRA
cases have no LyCORIS arm.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Optional

from torch import nn

LYCORIS_DIST = "lycoris-lora"


def lycoris_available() -> bool:
    return importlib.util.find_spec("lycoris") is not None


def config_method(config) -> str:
    """The catalog method a PEFT config configures ("dora" for LoRA with use_dora)."""
    peft_type = str(getattr(config.peft_type, "value", config.peft_type)).lower()
    if peft_type == "lora" and getattr(config, "use_dora", False):
        return "dora"
    return peft_type


def _lycoris_spec(method: str, config, base: nn.Linear) -> Optional[tuple[str, dict]]:
    """(LyCORIS module class name, its keyword arguments) for ``method``, or None."""
    if method == "lora" and not getattr(config, "use_rslora", False):
        return "LoConModule", {"lora_dim": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout}
    if method == "loha":
        return "LohaModule", {"lora_dim": config.r, "alpha": config.alpha}
    if method == "lokr":
        return "LokrModule", {"lora_dim": config.r, "alpha": config.alpha, "factor": config.decompose_factor,
                              "decompose_both": config.decompose_both}
    if method == "oft" and config.oft_block_size:
        b, d = config.oft_block_size, base.in_features
        if d % b == 0 and b * b <= d and not config.coft:
            return "DiagOFTModule", {"lora_dim": d // b}
    return None


def lycoris_arm(config, base: nn.Linear) -> Optional[nn.Module]:
    """LyCORIS's bypass-mode module for the method of ``config`` on the frozen ``base``, or None
    (LyCORIS not installed, or no equivalent).  ``base`` is used as is (not copied); the module's
    parameters are at LyCORIS's init: train them like every other arm's."""
    if not lycoris_available():
        return None
    spec = _lycoris_spec(config_method(config), config, base)
    if spec is None:
        return None
    from lycoris import modules
    logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # its INFO lines describe every module built
    cls_name, kwargs = spec
    module = getattr(modules, cls_name)("lycoris", base, 1.0, bypass_mode=True, **kwargs)
    return module.to(device=base.weight.device, dtype=base.weight.dtype)
