"""C3A b=64 / b=256 and FourierFT n=1000 (family circulant): fastadapt vs PEFT vs the frozen base.

Base: a bias-free d x d nn.Linear, frozen.  Adapters: PEFT's C3A (block_size b, PEFT's default
xavier_uniform init) and PEFT's FourierFT (n_frequency=1000, scaling=150, PEFT's default N(0, 1)
spectrum), each trained a few AdamW steps from that init by fastadapt.bench.train_adapter_.  Arms:
"peft" (PEFT's layer, eager; the runner adds torch.compile of it) and "fastadapt" (a copy of the
same trained layer patched by ``fastadapt.accelerate``).  Reference: the PEFT layer copied to
float64.  The ``_adapter_in_input_dtype`` cases use PEFT's autocast_adapter_dtype=False: on a half
base the adapter stays in the input dtype (the Triton path's half spectra on GPU; the default keeps
float32 adapters and float32 spectra).  On CPU in float32 they equal the default cases.

ADAPTERS: FourierFT's count is n_frequency.  C3A has no entry: its parameter count,
out * in / block_size, falls as the knob grows, and fastadapt.bench.budget_size bisects over
counts that grow with it.
"""
from __future__ import annotations

from peft import C3AConfig, FourierFTConfig

from fastadapt.bench import Adapter, Case, peft_case

N_FREQUENCY = 1000


def _c3a_config(block_size: int, targets) -> C3AConfig:
    return C3AConfig(block_size=block_size, target_modules=targets)


def _fourierft_config(n_frequency: int, targets) -> FourierFTConfig:
    return FourierFTConfig(n_frequency=n_frequency, scaling=150.0, target_modules=targets)


CASES = [
    Case("c3a_b64", "circulant", peft_case(lambda t: _c3a_config(64, t)),
         notes="PEFT C3A b=64 (FFTs of x in fp32, complex einsum) vs fused (merged weight, block DFTs in backward)"),
    Case("c3a_b256", "circulant", peft_case(lambda t: _c3a_config(256, t)), notes="PEFT C3A b=256 vs fused"),
    Case("fourierft_n1000", "circulant", peft_case(lambda t: _fourierft_config(N_FREQUENCY, t)),
         notes="PEFT FourierFT n=1000 (dense ifft2 + second GEMM) vs fused (merged weight, row DFTs in backward)"),
    Case("c3a_b64_adapter_in_input_dtype", "circulant",
         peft_case(lambda t: _c3a_config(64, t), autocast_adapter_dtype=False),
         notes="C3A b=64 with autocast_adapter_dtype=False: half spectra on GPU (CPU fp32: as c3a_b64)"),
    Case("fourierft_n1000_adapter_in_input_dtype", "circulant",
         peft_case(lambda t: _fourierft_config(N_FREQUENCY, t), autocast_adapter_dtype=False),
         notes="FourierFT n=1000 with autocast_adapter_dtype=False: half cos/sin dots on GPU (CPU fp32: as n1000)"),
]

ADAPTERS = [
    Adapter("fourierft", _fourierft_config, "n_frequency", sizes=(16, 32, 64, 125, 250, 500, 1000, 2000, 4000, 8000),
            default=N_FREQUENCY),
]
