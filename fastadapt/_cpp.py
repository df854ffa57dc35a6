"""Lazy build of csrc/ (C++ CPU kernels) with ninja via torch.utils.cpp_extension.

Nothing is compiled at import.  The first op that asks for ``extension()`` triggers one build
(about a minute on 2 cores; cached afterwards under torch's extensions directory,
``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``, and rebuilt only when a source or a
flag changes; concurrent processes wait on torch's lock file in that directory).  A missing
compiler or ninja degrades to the torch path with a single warning, never an import error.
Sources: every ``*.cpp`` in the installed ``fastadapt/csrc`` package directory, one module: the
pybind functions of csrc/dropout.cpp (``extension().seeded_dropout``, ...) and the ops other files
register with TORCH_LIBRARY (csrc/sampled_product.cpp: ``torch.ops.fastadapt_cpu.sampled_product``,
reachable once ``extension()`` has loaded the module).

Flags: -O3; -ffp-contract=off (no fused multiply-add where the Triton kernels round a product
before adding it: the C++ ops promise the same bits); -fno-trapping-math (changes no value; lets
the compiler turn ``keep ? x * scale : 0`` into a vector select instead of a branch per element);
-fopenmp where torch's own parallel backend is OpenMP (at::parallel_for is a header template that
runs serially without it).  Instruction sets: csrc/philox_avx512.cpp and philox_avx2.cpp are
compiled for theirs by pragma and picked at run time from the CPU's flags, so one build runs on
any x86-64 CPU (csrc/sampled_product.cpp does the same for its AVX2 section, between push_options
and pop_options).
"""
from __future__ import annotations

import functools
import pathlib
import warnings

EXTENSION_NAME = "fastadapt_cpu"


def _sources() -> list[str]:
    import fastadapt.csrc as pkg
    return sorted(str(p) for p in pathlib.Path(pkg.__file__).parent.glob("*.cpp"))


def _flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags)."""
    import torch
    cflags, ldflags = ["-O3", "-ffp-contract=off", "-fno-trapping-math"], []
    if torch.backends.openmp.is_available():
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled module, or None (with one warning) when it cannot be built."""
    sources = _sources()
    if not sources:
        return None
    try:
        from torch.utils.cpp_extension import load
        cflags, ldflags = _flags()
        return load(name=EXTENSION_NAME, sources=sources, extra_cflags=cflags, extra_ldflags=ldflags,
                    verbose=False)
    except Exception as exc:  # no compiler, no ninja, build error: degrade, say so once
        warnings.warn(f"fastadapt: csrc/ could not be built ({type(exc).__name__}: {_summary(exc)}); "
                      "using the torch path", stacklevel=2)
        return None


def _summary(exc: Exception, tail: int = 3, width: int = 160) -> str:
    """The first line of a build error and its last lines, each cut to ``width`` characters
    (ninja's log repeats every compiler command line in full)."""
    lines = [line if len(line) <= width else line[:width] + "..." for line in str(exc).splitlines() if line.strip()]
    if len(lines) <= tail + 1:
        return " | ".join(lines)
    return " | ".join([lines[0], "...", *lines[-tail:]])


def built() -> bool:
    """True when the extension is already built in this process (does not trigger a build)."""
    return extension.cache_info().currsize > 0 and extension() is not None
