"""Lazy build of csrc/ (C++ CPU kernels) with ninja via torch.utils.cpp_extension.

Nothing is compiled at import.  The first op that asks for ``extension()`` triggers one build;
a missing compiler or ninja degrades to the torch path with a single warning, never an import
error.  Sources: every ``*.cpp`` in the installed ``fastadapt/csrc`` package directory.
"""
from __future__ import annotations

import functools
import pathlib
import warnings



def _sources() -> list[str]:
    import fastadapt.csrc as pkg
    return sorted(str(p) for p in pathlib.Path(pkg.__file__).parent.glob("*.cpp"))


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled module, or None (with one warning) when it cannot be built."""
    sources = _sources()
    if not sources:
        return None
    try:
        from torch.utils.cpp_extension import load
        return load(name="fastadapt_cpu", sources=sources, extra_cflags=["-O3"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, build error: degrade, say so once
        warnings.warn(f"fastadapt: csrc/ could not be built ({type(exc).__name__}: {exc}); "
                      "using the torch path", stacklevel=2)
        return None


def built() -> bool:
    """True when the extension is already built in this process (does not trigger a build)."""
    return extension.cache_info().currsize > 0 and extension() is not None
