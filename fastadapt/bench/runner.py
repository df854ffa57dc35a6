"""The benchmark runner behind ``fastadapt bench | memory | check | plot`` and benchmarks/run.py.

Cases live in ``benchmarks/cases_*.py`` of the source tree (each defines ``CASES: list[Case]``);
they are found in ``--cases-dir``, else ``./benchmarks``, else the ``benchmarks`` folder beside
the installed ``fastadapt`` package (an editable install).  ``bench`` writes
``<date>_<shape>.json`` (rows + machine + shapes + ceilings) and the same table as ``.md`` into
``--out`` and prints the table; ``plot`` redraws a chart from such a JSON file.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

from .cases import Case, run_cases, selected

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
# Standard shapes (DESIGN.md section 6): CPU fp32 d=1024, N=2048; GPU bf16 d=4096, N=8192.
STANDARD = {"cpu": (1024, 2048, "float32"), "cuda": (4096, 8192, "bfloat16")}


# --------------------------------------------------------------------------------------------
# finding cases

def cases_dir(explicit: str | None = None) -> Path:
    """The folder holding ``cases_*.py``; FileNotFoundError saying where it looked."""
    candidates = [Path(explicit)] if explicit else [
        Path.cwd() / "benchmarks", Path(__file__).resolve().parents[2] / "benchmarks"]
    for path in candidates:
        if any(path.glob("cases_*.py")):
            return path
    raise FileNotFoundError(
        f"no benchmarks/cases_*.py found in {[str(p) for p in candidates]}; run from the fastadapt "
        "source tree or pass --cases-dir")


def discover(folder: Path) -> tuple[list[Case], dict[str, str]]:
    """All ``CASES`` of ``folder/cases_*.py``, and module name -> error for modules that fail."""
    cases: list[Case] = []
    errors: dict[str, str] = {}
    for path in sorted(folder.glob("cases_*.py")):
        name = f"benchmarks.{path.stem}"
        try:
            module = sys.modules.get(name)
            if module is None or Path(getattr(module, "__file__", "")).resolve() != path.resolve():
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                sys.modules[name] = module
            found = module.CASES
        except Exception as exc:
            errors[path.name] = f"{type(exc).__name__}: {exc}"
            continue
        bad = [c for c in found if not isinstance(c, Case)]
        if bad:
            errors[path.name] = f"CASES holds non-Case entries: {bad[:3]}"
            continue
        cases += found
    names = [c.name for c in cases]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"case names defined twice: {twice}")
    return cases, errors


# --------------------------------------------------------------------------------------------
# machine description

def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """"cpu", or the CUDA device name as a folder name (e.g. "nvidia-h200")."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "fastadapt": _version("fastadapt"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------------------------
# tables and files

def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    """One line per (case, arm): time, ratio vs base, saved ratio, error (+ device time on GPU)."""
    cuda = any("device_time_s" in r for r in rows)
    header = ["case", "arm", "fwd+bwd ms", "ratio"]
    header += ["device ms", "device ratio"] if cuda else []
    header += ["saved / bytes(x)", "peak MiB", "rel err vs fp64"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if r.get("arm") is None:
            lines.append(f"| {r['case']} | ERROR | {r['error']} |")
            continue
        cells = [r["case"], r["arm"],
                 _fmt(r.get("time_s") and r["time_s"] * 1e3, ".2f"), _fmt(r.get("ratio"), ".3f")]
        if cuda:
            cells += [_fmt(r.get("device_time_s") and r["device_time_s"] * 1e3, ".3f"),
                      _fmt(r.get("device_ratio"), ".3f")]
        cells += [_fmt(r.get("saved_ratio"), ".2f"),
                  _fmt(r.get("peak_bytes") and r["peak_bytes"] / 2 ** 20, ".2f"),
                  _fmt(r.get("rel_error"), ".1e")]
        lines.append("| " + " | ".join(cells) + " |")
    metrics = {r["case"]: r["metrics"] for r in rows if r.get("metrics")}
    if metrics:
        lines += ["", "Case metrics:"]
        lines += [f"- {case}: " + ", ".join(f"{k} {v:.2e}" for k, v in m.items()) for case, m in metrics.items()]
    return "\n".join(lines)


def write_results(out_dir: Path, result: dict, stamp: datetime.datetime) -> tuple[Path, Path]:
    """Write ``<date>_<shape>.json`` and ``.md`` into ``out_dir``; returns both paths."""
    cfg = result["config"]
    stem = f"{stamp:%Y%m%d-%H%M%S}_d{cfg['d']}_n{cfg['n']}_{cfg['dtype']}"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    m, c = result["machine"], result["ceilings"]
    md = [f"# fastadapt benchmark {stamp:%Y-%m-%d %H:%M} UTC",
          "",
          f"- shape: x ({cfg['n']}, {cfg['d']}) {cfg['dtype']} on {cfg['device']}, "
          f"iters {cfg['iters']} (median, interleaved), compile {cfg['compile']}",
          f"- machine: {m.get('gpu', m['cpu'])}, {m['cores']} cores, {m['torch_threads']} torch threads; "
          f"torch {m['torch']}, triton {m['triton']}, peft {m['peft']}",
          f"- ceilings: copy {c['copy_GBps']:.1f} GB/s, matmul {c['matmul_GFLOPps']:.1f} GFLOP/s "
          f"({c['matmul_dtype']}, n={c['matmul_n']})",
          "- ratio = fwd+bwd time / frozen base fwd+bwd time; saved = bytes saved for backward "
          "(parameters and buffers excluded) / bytes(x); error vs float64 reference in eval mode",
          "",
          markdown_table(result["rows"]), ""]
    md_path.write_text("\n".join(md))
    return json_path, md_path


# --------------------------------------------------------------------------------------------
# commands

def _resolve_shape(args) -> tuple[torch.device, int, int, torch.dtype]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    d, n, dtype = STANDARD["cuda" if device.type == "cuda" else "cpu"]
    return device, args.d or d, args.n or n, DTYPES[args.dtype or dtype]


def _load(args) -> tuple[list[Case], dict[str, str]]:
    cases, errors = discover(cases_dir(args.cases_dir))
    for module, message in errors.items():
        print(f"warning: {module} not loaded: {message}", file=sys.stderr)
    chosen = selected(cases, args.only)
    if not chosen:
        raise SystemExit(f"--only {args.only} matches no case; cases: {[c.name for c in cases]}")
    return chosen, errors


def _progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def _report_errors(rows: list[dict]) -> int:
    failed = [r for r in rows if r.get("arm") is None]
    for r in failed:
        print(f"error in case {r['case']}:\n{r['traceback']}", file=sys.stderr)
    return len(failed)


def bench_command(args) -> int:
    """Time every selected case; write JSON + Markdown; print the table."""
    device, d, n, dtype = _resolve_shape(args)
    cases, module_errors = _load(args)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    from .measure import machine_ceilings
    ceilings = machine_ceilings(device, dtype=dtype)
    rows = run_cases(cases, d, n, dtype, device, args.iters, warmup=args.warmup,
                     compile=not args.no_compile, compile_backend=args.compile_backend,
                     progress=_progress)
    result = {
        "config": {"d": d, "n": n, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
                   "iters": args.iters, "warmup": args.warmup, "compile": not args.no_compile,
                   "compile_backend": args.compile_backend, "only": args.only,
                   "date": stamp.isoformat(timespec="seconds")},
        "machine": machine_info(device),
        "ceilings": ceilings,
        "module_errors": module_errors,
        "rows": rows,
    }
    out_dir = Path(args.out) if args.out else Path("benchmarks") / "results" / device_name(device)
    json_path, md_path = write_results(out_dir, result, stamp)
    print(markdown_table(rows))
    print(f"\nwrote {json_path} and {md_path}")
    failed = _report_errors(rows)
    return 1 if failed or (module_errors and not args.only) else 0


def memory_command(args) -> int:
    """Saved-activation ratio and peak memory of every arm of every selected case."""
    device, d, n, dtype = _resolve_shape(args)
    cases, _ = _load(args)
    rows = run_cases(cases, d, n, dtype, device, compile=not args.no_compile,
                     compile_backend=args.compile_backend, measures=("saved", "peak"),
                     progress=_progress)
    print(markdown_table(rows))
    return 1 if _report_errors(rows) else 0


def check_command(args) -> int:
    """Error of every arm against the float64 reference; exit 1 if any exceeds the table."""
    device, d, n, dtype = _resolve_shape(args)
    cases, _ = _load(args)
    rows = run_cases(cases, d, n, dtype, device, compile=not args.no_compile,
                     compile_backend=args.compile_backend, measures=("error",), progress=_progress)
    failures = _report_errors(rows)
    for r in rows:
        if r.get("arm") in (None, "base"):
            continue
        err, tol = r["rel_error"], r["tolerance"]
        verdict = "no reference" if err is None else ("ok" if err <= tol else "FAIL")
        failures += verdict == "FAIL"
        print(f"{r['case']:>28} {r['arm']:>14}: rel err {_fmt(err, '.2e')} (tol {tol:.0e}) {verdict}")
    return 1 if failures else 0


def plot_command(args) -> int:
    from .plot import plot_results
    path = plot_results([Path(p) for p in args.results], Path(args.output))
    print(f"wrote {path}")
    return 0


def _shape_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--d", type=int, help="features (default: 1024 on CPU, 4096 on CUDA)")
    parser.add_argument("--n", type=int, help="tokens (default: 2048 on CPU, 8192 on CUDA)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 CPU, bfloat16 CUDA")
    parser.add_argument("--only", action="append", default=[],
                        help="a family, or a prefix of case names (repeatable)")
    parser.add_argument("--cases-dir", help="folder with cases_*.py (default: ./benchmarks)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile(PEFT) arm")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    _shape_arguments(parser)
    parser.add_argument("--iters", type=int, default=20, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--out", help="results folder (default: benchmarks/results/<device>)")


def add_cli(subparsers) -> None:
    """Add ``bench``, ``memory``, ``check`` and ``plot`` to the ``fastadapt`` command."""
    p = subparsers.add_parser("bench", help="time every benchmark case; write JSON + Markdown")
    add_bench_arguments(p)
    p.set_defaults(func=bench_command)
    p = subparsers.add_parser("memory", help="saved-activation ratio and peak memory per case")
    _shape_arguments(p)
    p.set_defaults(func=memory_command)
    p = subparsers.add_parser("check", help="error vs the float64 reference per case")
    _shape_arguments(p)
    p.set_defaults(func=check_command)
    p = subparsers.add_parser("plot", help="draw overhead ratios from results JSON (matplotlib)")
    p.add_argument("results", nargs="+", help="results .json written by `fastadapt bench`")
    p.add_argument("-o", "--output", required=True, help="image file to write, e.g. out.png")
    p.set_defaults(func=plot_command)


def main(argv=None) -> int:
    """Entry of ``python -m benchmarks.run``: the ``bench`` command's options."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                     description="Run benchmarks/cases_*.py; write JSON + Markdown.")
    add_bench_arguments(parser)
    return bench_command(parser.parse_args(argv))
