"""Build for fastadapt.

``triton_kernels/`` is installed as ``fastadapt.triton_kernels`` (never as a top-level
``triton_kernels``: triton's own kernel package owns that import name).  ``csrc/`` ships as
package data and is compiled lazily on first use (see ``fastadapt/_cpp.py``).
"""
from setuptools import setup

PEFT_PIN = "peft>=0.21,<0.22"

setup(
    name="fastadapt",
    version="0.1.0",
    description="Fused, exact kernels for parameter-efficient fine-tuning adapters",
    python_requires=">=3.10",
    packages=[
        "fastadapt",
        "fastadapt.ops",
        "fastadapt.layers",
        "fastadapt.reference",
        "fastadapt.bench",
        "fastadapt.triton_kernels",
        "fastadapt.csrc",
    ],
    package_dir={"fastadapt.triton_kernels": "triton_kernels", "fastadapt.csrc": "csrc"},
    package_data={"fastadapt.csrc": ["*.cpp", "*.h"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        'triton; platform_system == "Linux"',
    ],
    extras_require={
        "peft": [PEFT_PIN, "transformers"],
        # matplotlib: `fastadapt plot` and its tests run after the README's install command
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", PEFT_PIN, "transformers", "ninja",
                 "matplotlib"],
        "bench": [PEFT_PIN, "transformers", "pytest-benchmark", "matplotlib"],
    },
    entry_points={"console_scripts": ["fastadapt=fastadapt.cli:main"]},
)
