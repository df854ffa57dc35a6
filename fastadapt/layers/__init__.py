"""fastadapt.layers: one nn.Module per method family, holding PEFT-named parameters.

A family's layers module may also define ``PEFT_BRIDGE`` (see :mod:`fastadapt.peft`).
"""
