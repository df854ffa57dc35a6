"""Command line: ``fastadapt info | matrix | demo`` (+ ``bench | memory | plot | check`` from fastadapt.bench)."""
from __future__ import annotations

import argparse
import importlib.metadata
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def backends() -> dict[str, str]:
    """What this machine offers each backend, as printable strings."""
    import torch

    from . import _cpp, backend
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "torch": torch.__version__,
        "cuda device": cuda,
        "triton": _version("triton") if backend.triton_available() else "not available",
        "triton interpreter": "on" if backend.interpreter_mode() else "off",
        "csrc built": "yes" if _cpp.built() else "no (built lazily on first use)",
        "peft": _version("peft"),
        "forced backend": backend.forced_backend() or "none",
    }


def support_matrix(markdown: bool = True) -> str:
    """The method x backend table from fastadapt.methods()."""
    from . import SUPPORT_FIELDS, methods
    rows = list(methods().values())
    header = ["method", "family", "in PEFT", *SUPPORT_FIELDS]
    mark = {True: "yes", False: "-"}
    body = [[m.name, m.family, mark[m.in_peft], *(mark[getattr(m, f)] for f in SUPPORT_FIELDS)] for m in rows]
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(out)
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header, *body])


def _info(args) -> int:
    for key, value in backends().items():
        print(f"{key:>20}: {value}")
    print()
    print(support_matrix(markdown=False))
    return 0


def _matrix(args) -> int:
    print(support_matrix(markdown=True))
    return 0


def _demo(args) -> int:
    """Check every reference against its own merged form on random data (a smoke run)."""
    import torch

    from .numerics import rel_error
    from .reference import REFERENCES
    failed = 0
    for name, cls in sorted(REFERENCES.items()):
        demo = getattr(cls, "demo", None)
        if demo is None or not cls.has_delta_weight:
            continue
        ref = demo()
        x = torch.randn(4, ref.in_features, dtype=torch.float64)
        err = rel_error(ref(x), torch.nn.functional.linear(x, ref.merged_weight(), ref.merged_bias()))
        ok = err < 1e-10
        failed += not ok
        print(f"{name:>16}: forward vs merged weight rel err {err:.1e} {'ok' if ok else 'FAIL'}")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastadapt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends found and the method support matrix").set_defaults(func=_info)
    sub.add_parser("matrix", help="the support matrix as markdown").set_defaults(func=_matrix)
    sub.add_parser("demo", help="run every reference against its merged weight").set_defaults(func=_demo)
    from . import bench
    if hasattr(bench, "add_cli"):
        bench.add_cli(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = " ".join(["fastadapt", *argv])  # recorded in results files
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
