"""PEFT-shaped configs for methods PEFT lacks (SSVD, GOFT, ETHER, AntiPaSTO, SVFT).

``CONFIGS`` maps catalog name -> config class; each method's issue adds its own.
"""
CONFIGS: dict = {}
