"""The catalog: the 33 adapter methods fastadapt covers, each with its kernel family.

This table holds only facts that do not change as the library grows (name, family, where
PEFT has the method, the paper).  What *exists* for a method (reference, cpu path, triton
kernel, PEFT bridge, PEFT config) is derived from the live registries in
:func:`fastadapt.methods`, never written here by hand.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    title: str
    family: str          # kernel family (fastadapt.FAMILIES) or "model" for non-layer methods
    peft_type: str | None  # PEFT's PeftType name where PEFT 0.21 has the method
    paper: str


_ENTRIES = [
    CatalogEntry("lora", "LoRA", "lowrank", "LORA", "arXiv:2106.09685"),
    CatalogEntry("pissa", "PiSSA (LoRA init; OLoRA init beside it)", "lowrank", "LORA", "arXiv:2404.02948"),
    CatalogEntry("dora", "DoRA", "dora_norm", "LORA", "arXiv:2402.09353"),
    CatalogEntry("delora", "DeLoRA", "dora_norm", "DELORA", "arXiv:2503.18225"),
    CatalogEntry("oft", "OFT", "cayley", "OFT", "arXiv:2306.07280"),
    CatalogEntry("oftv2", "OFTv2 (input-centric OFT)", "cayley", "OFT", "arXiv:2506.19847"),
    CatalogEntry("psoft", "PSOFT", "cayley", "PSOFT", "arXiv:2505.11235"),
    CatalogEntry("ssvd", "SSVD", "cayley", None, "arXiv:2509.02830"),
    CatalogEntry("antipasto", "AntiPaSTO", "cayley", None, "arXiv:2601.07473"),
    CatalogEntry("boft", "BOFT", "butterfly", "BOFT", "arXiv:2311.06243"),
    CatalogEntry("goft", "GOFT (Givens)", "butterfly", None, "arXiv:2404.04316"),
    CatalogEntry("hra", "HRA (Householder)", "butterfly", "HRA", "arXiv:2405.17484"),
    CatalogEntry("ether", "ETHER", "butterfly", None, "arXiv:2405.20271"),
    CatalogEntry("road", "RoAd (2x2 rotations)", "butterfly", "ROAD", "arXiv:2409.00119"),
    CatalogEntry("c3a", "C3A (block circulant)", "circulant", "C3A", "arXiv:2407.19342"),
    CatalogEntry("fourierft", "FourierFT", "circulant", "FOURIERFT", "arXiv:2405.03003"),
    CatalogEntry("loha", "LoHa", "hadamard", "LOHA", "arXiv:2108.06098"),
    CatalogEntry("lokr", "LoKr", "hadamard", "LOKR", "arXiv:2309.14859"),
    CatalogEntry("vera", "VeRA", "lowrank", "VERA", "arXiv:2310.11454"),
    CatalogEntry("adalora", "AdaLoRA", "lowrank", "ADALORA", "arXiv:2303.10512"),
    CatalogEntry("randlora", "RandLoRA", "lowrank", "RANDLORA", "arXiv:2502.00987"),
    CatalogEntry("vblora", "VB-LoRA", "lowrank", "VBLORA", "arXiv:2405.15179"),
    CatalogEntry("miss", "MiSS (serves Bone)", "lowrank", "MISS", "arXiv:2409.15371"),
    CatalogEntry("shira", "SHiRA", "lowrank", "SHIRA", "arXiv:2406.13175"),
    CatalogEntry("svft", "SVFT", "lowrank", None, "arXiv:2405.19597"),
    CatalogEntry("ia3", "IA3", "lowrank", "IA3", "arXiv:2205.05638"),
    CatalogEntry("clover", "CLOVER (joint Q-K / V-O)", "model", None, "arXiv:2411.17426"),
    CatalogEntry("loreft", "LoReFT", "model", None, "arXiv:2404.03592"),
    CatalogEntry("ln_tuning", "LN tuning", "model", "LN_TUNING", "arXiv:2312.11420"),
    CatalogEntry("prompt_tuning", "Prompt tuning", "model", "PROMPT_TUNING", "arXiv:2104.08691"),
    CatalogEntry("poly", "Poly (mixture of LoRA skills)", "mixture", "POLY", "arXiv:2202.13914"),
    CatalogEntry("xlora", "X-LoRA (mixture of LoRA experts)", "mixture", "XLORA", "arXiv:2402.07148"),
    CatalogEntry("trainable_tokens", "Trainable tokens", "model", "TRAINABLE_TOKENS", "PEFT docs"),
]

CATALOG: dict[str, CatalogEntry] = {e.name: e for e in _ENTRIES}
FAMILIES = ("cayley", "butterfly", "circulant", "dora_norm", "hadamard", "lowrank", "mixture")


def entry(name: str) -> CatalogEntry:
    """Catalog entry for ``name``; ValueError naming valid choices otherwise."""
    key = name.lower().replace("-", "").replace(" ", "_")
    if key not in CATALOG:
        raise ValueError(f"method={name!r} is not in the catalog; valid choices: {sorted(CATALOG)}")
    return CATALOG[key]
