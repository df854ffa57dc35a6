"""The benchmark runner behind ``fastadapt bench | memory | check | plot`` and benchmarks/run.py.

Cases live in ``benchmarks/cases_*.py`` of the source tree (each defines ``CASES: list[Case]``
and may define ``ADAPTERS: list[Adapter]``); they are found in ``--cases-dir``, else
``./benchmarks``, else the ``benchmarks`` folder beside the installed ``fastadapt`` package (an
editable install).  Every command writes one results document (JSON: kind, config, machine,
versions, date, rows) and the same as Markdown into ``--out`` (default
``benchmarks/results/<device>/``), prints the table, and with ``--json FILE`` also writes the
document to FILE; ``plot`` redraws a chart from such a document.

    fastadapt bench                        every case at the standard shape
    fastadapt bench --quick                one case per bridged method, standard shape, few iters
    fastadapt bench --host-overhead        the same cases at d=128, N=64: per-call host time
    fastadapt bench --sweep tokens|d|rank  time and peak memory against the swept size
    fastadapt bench --budget 0.5%          every method at one trainable-parameter budget (tiny Llama)
    fastadapt memory                       one training step of a tiny Llama per method, by part
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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import Adapter, adapter_case, budget_size
from .cases import Case, run_cases, selected, summary_rows
from .measure import MEDIAN_RSE_TARGET
from .report import document_markdown, fmt

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
# Standard shapes: CPU fp32 d=1024, N=2048; GPU bf16 d=4096, N=8192.
STANDARD = {"cpu": (1024, 2048, "float32"), "cuda": (4096, 8192, "bfloat16")}
# --quick: every bridged method at the standard shape in a few minutes (2 CPU cores: < 4 min).
QUICK_ITERS, QUICK_WARMUP = 10, 2
# Timed rounds may grow to this multiple of --iters while a median is uncertain (time_arm_samples).
MAX_ITERS_FACTOR = 2
# --host-overhead: a shape where the whole step is host time.
HOST_SHAPE, HOST_ITERS, HOST_WARMUP = (128, 64), 200, 20
# --sweep: sizes when --sizes is not given (rank: the powers of two among an adapter's sizes).
SWEEP_SIZES = {"tokens": (256, 512, 1024, 2048, 4096), "d": (256, 512, 1024, 2048)}
SWEEP_RANKS = (4, 8, 16, 32, 64, 128, 256)
SWEEP_ITERS = 10
# fastadapt memory / --budget: a tiny Llama (hidden, layers, tokens per step).
MODEL_HIDDEN, MODEL_LAYERS, MODEL_TOKENS = 256, 2, 512
BUDGET_DEFAULT = "2%"
# --budget: a method whose nearest size misses the budget by more than this is marked (its knob is coarse).
BUDGET_TOLERANCE = 0.15


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


@dataclass
class Discovered:
    """Everything the ``cases_*.py`` of a folder define, and the modules that failed to load."""

    cases: list[Case] = field(default_factory=list)
    adapters: list[Adapter] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


def _load_module(path: Path):
    name = f"benchmarks.{path.stem}"
    module = sys.modules.get(name)
    if module is None or Path(getattr(module, "__file__", "")).resolve() != path.resolve():
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return module


def discover(folder: Path) -> Discovered:
    """``CASES`` and ``ADAPTERS`` of every ``folder/cases_*.py`` (file name order)."""
    found = Discovered()
    for path in sorted(Path(folder).glob("cases_*.py")):
        try:
            module = _load_module(path)
            cases, adapters = list(module.CASES), list(getattr(module, "ADAPTERS", []))
        except Exception as exc:
            found.errors[path.name] = f"{type(exc).__name__}: {exc}"
            continue
        bad = [c for c in cases if not isinstance(c, Case)] + [a for a in adapters if not isinstance(a, Adapter)]
        if bad:
            found.errors[path.name] = f"CASES / ADAPTERS hold entries of other types: {bad[:3]}"
            continue
        found.cases += cases
        found.adapters += adapters
    names = [c.name for c in found.cases]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"case names defined twice: {twice}")
    methods = [a.method for a in found.adapters]
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:
        raise ValueError(f"ADAPTERS define a method twice: {twice}")
    return found


def bridged_groups() -> list[tuple[str, ...]]:
    """Bridged methods, grouped where one fused forward of one PEFT class serves several names
    (OFT and OFTv2: PEFT 0.21's OFT layer is OFTv2), from the live bridge registry."""
    from ..peft import registry
    groups: dict[tuple, set] = {}
    for cls, entries in registry().items():
        for e in entries:
            groups.setdefault((cls, e.forward), set()).add(e.method)
    return sorted(tuple(sorted(g)) for g in groups.values())


def representatives(cases: list[Case]) -> list[tuple[tuple[str, ...], Case | None]]:
    """Per group of bridged methods, the first case measuring one of them (None if none does)."""
    return [(group, next((c for c in cases if c.method in group), None)) for group in bridged_groups()]


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


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
            "peft": _version("peft"), "transformers": _version("transformers"), "fastadapt": _version("fastadapt"),
            "lycoris": _version("lycoris-lora")}


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): other processes on the cores make
    2-thread CPU timings measure the scheduler, so every result records it, at start and end."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_info(device: torch.device) -> dict:
    """The machine (and, for older readers, the library versions) a result was measured on."""
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "load_start": load_average(), **versions()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------------------------
# arguments

def resolve_device(name: str | None) -> torch.device:
    """``--device``: cpu or cuda[:i] (default: cuda when available); SystemExit saying what is wrong."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name!r} is not a device; valid choices: cpu, cuda, cuda:<index>") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name!r}: fastadapt benchmarks run on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        built = "without CUDA (a CPU build)" if torch.version.cuda is None else f"with CUDA {torch.version.cuda}"
        raise SystemExit(f"--device {name}: no CUDA device is available (torch {torch.__version__} is built {built}, "
                         "torch.cuda.is_available() is False); run with --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def _resolve_shape(args, shape=None) -> tuple[torch.device, int, int, torch.dtype]:
    device = resolve_device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads {args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    d, n, dtype = STANDARD["cuda" if device.type == "cuda" else "cpu"]
    if shape is not None:
        d, n = shape
    return device, args.d or d, args.n or n, DTYPES[args.dtype or dtype]


def _discover(args) -> Discovered:
    found = discover(cases_dir(args.cases_dir))
    for module, message in found.errors.items():
        print(f"warning: {module} not loaded: {message}", file=sys.stderr)
    return found


def _check_methods(args, found: Discovered) -> None:
    valid = sorted({c.method for c in found.cases if c.method} | {a.method for a in found.adapters})
    unknown = [m for m in args.method if m not in valid]
    if unknown:
        raise SystemExit(f"--method {', '.join(map(repr, unknown))}: no benchmark measures it; valid names: {valid}")


def _chosen_cases(args, found: Discovered) -> list[Case]:
    _check_methods(args, found)
    chosen = selected(found.cases, args.only)
    if args.method:
        chosen = [c for c in chosen if c.method in args.method]
    if not chosen:
        raise SystemExit(f"--only {args.only} --method {args.method} match no case; "
                         f"cases: {[c.name for c in found.cases]}")
    return chosen


def _chosen_adapters(args, found: Discovered) -> list[Adapter]:
    _check_methods(args, found)
    adapters = [a for a in found.adapters if not args.method or a.method in args.method]
    if not adapters:
        raise SystemExit(f"no ADAPTERS entry for {args.method or 'any method'}; methods with one: "
                         f"{sorted(a.method for a in found.adapters)}")
    return adapters


def _progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def _report_errors(rows: list[dict]) -> int:
    failed = [r for r in rows if r.get("error")]
    for r in failed:
        print(f"error in {r.get('case') or r.get('method')}: {r['error']}\n{r.get('traceback', '')}", file=sys.stderr)
    return len(failed)


# --------------------------------------------------------------------------------------------
# results documents

def new_document(kind: str, device: torch.device, config: dict, args=None) -> dict:
    """A results document; ``args.command_line`` (set by the command line entry) is recorded."""
    stamp = datetime.datetime.now(datetime.timezone.utc)
    return {"kind": kind, "date": stamp.isoformat(timespec="seconds"),
            "config": {"command": getattr(args, "command_line", None), **config},
            "machine": machine_info(device), "versions": versions(), "rows": []}


def write_document(result: dict, out_dir: Path, stem: str, json_file: str | None = None) -> tuple[Path, Path]:
    """``<date>_<stem>.json`` and ``.md`` into ``out_dir`` (and the JSON to ``json_file``)."""
    stamp = datetime.datetime.fromisoformat(result["date"])
    result["machine"]["load_end"] = load_average()
    out_dir.mkdir(parents=True, exist_ok=True)
    base = f"{stamp:%Y%m%d-%H%M%S}_{stem}"
    json_path, md_path = out_dir / f"{base}.json", out_dir / f"{base}.md"
    text = json.dumps(result, indent=1, default=str) + "\n"
    json_path.write_text(text)
    md_path.write_text(document_markdown(result))
    if json_file:
        Path(json_file).parent.mkdir(parents=True, exist_ok=True)
        Path(json_file).write_text(text)
    return json_path, md_path


def _finish(result: dict, args, device: torch.device, stem: str, failed: int) -> int:
    out_dir = Path(args.out) if args.out else Path("benchmarks") / "results" / device_name(device)
    json_path, md_path = write_document(result, out_dir, stem, args.json)
    print(document_markdown(result))
    print(f"wrote {json_path} and {md_path}" + (f" and {args.json}" if args.json else ""))
    return 1 if failed else 0


def _shape_stem(d, n, dtype) -> str:
    return f"d{d}_n{n}_{str(dtype).removeprefix('torch.')}"


# --------------------------------------------------------------------------------------------
# bench

def bench_command(args) -> int:
    """``fastadapt bench`` and its modes (--quick, --host-overhead, --sweep, --budget)."""
    if args.sweep:
        return sweep_command(args)
    if args.budget:
        return budget_command(args)
    host = args.host_overhead
    device, d, n, dtype = _resolve_shape(args, HOST_SHAPE if host else None)
    found = _discover(args)
    quick = args.quick or host
    iters = args.iters or (HOST_ITERS if host else QUICK_ITERS if quick else 20)
    warmup = args.warmup if args.warmup is not None else (HOST_WARMUP if host else QUICK_WARMUP if quick else 3)
    max_iters = _max_iters(args, iters, extend=not host)
    if quick:  # --only narrows the candidates; a group left without a case is reported only without --only
        _check_methods(args, found)
        chosen = [(g, c) for g, c in representatives(selected(found.cases, args.only))
                  if (not args.method or set(g) & set(args.method)) and (c is not None or not args.only)]
    else:
        chosen = [((c.method,), c) for c in _chosen_cases(args, found)]
    kind = "host_overhead" if host else "bench"
    result = new_document(kind, device, args=args, config={
        "d": d, "n": n, "dtype": str(dtype).removeprefix("torch."), "device": str(device), "iters": iters,
        "max_iters": max_iters, "warmup": warmup, "compile": not args.no_compile, "compile_backend": args.compile_backend,
        "quick": quick, "only": args.only, "method": args.method})
    if not host:
        from .measure import machine_ceilings
        result["ceilings"] = machine_ceilings(device, dtype=dtype)
    result["module_errors"] = found.errors
    measures = ("time",) if host else ("time", "saved", "peak", "error")
    arm_rows = []
    missing = [group for group, case in chosen if case is None]
    for group in missing:
        arm_rows.append({"case": "/".join(group), "method": group[0], "arm": None, "d": d, "n": n,
                         "error": f"no benchmark case measures the bridged method(s) {list(group)}: add a Case "
                                  "to benchmarks/cases_<family>.py"})

    state_probe = None
    if device.type == "cpu" and not host:   # the machine state of every timed round (bench.states)
        from .states import CopyProbe
        state_probe = CopyProbe()

    def run(case):
        return run_cases([case], d, n, dtype, device, iters, warmup=warmup, max_iters=max_iters,
                         compile=not args.no_compile, compile_backend=args.compile_backend, measures=measures,
                         progress=_progress, round_probe=state_probe)
    cases = [case for _, case in chosen if case is not None]
    if state_probe is not None:
        from .measure import batched_product_probe
        arm_rows += measure_with_probe(cases, run, batched_product_probe)
    else:
        for case in cases:
            arm_rows += run(case)
    serves = {case.name: list(group) for group, case in chosen if case is not None}
    result["rows"] = [{**row, "serves": serves.get(row["case"], [row["method"]])} for row in summary_rows(arm_rows)]
    result["arm_rows"] = arm_rows
    stem = ("host_overhead_" if host else "quick_" if quick else "") + _shape_stem(d, n, dtype)
    failed = _report_errors(arm_rows) + (bool(found.errors) and not (args.only or args.method))
    return _finish(result, args, device, stem, failed)


# A CPU case whose probe (measure.batched_product_probe) read this many times the run's fastest
# probe ran in the VM's slow state: it is measured again at the end of the run if the probe then
# reads faster.
SLOW_STATE_FACTOR = 1.5


def measure_with_probe(cases: list, run, probe) -> list[dict]:
    """``run(case)`` -> arm rows for each case, each row carrying ``probe_ms`` (the probe read just
    before its case).  Cases whose probe read at least SLOW_STATE_FACTOR x the fastest probe of the
    run (at most a quarter of the cases, the slowest readings first: a bounded cost) are measured
    once more at the end, where the probe then reads faster than it did; their rows are replaced and
    keep the first reading as ``first_probe_ms``."""
    rows, probes = {}, {}

    def measure(case):
        probes[case.name] = probe() * 1e3
        rows[case.name] = [{**r, "probe_ms": probes[case.name]} for r in run(case)]
    for case in cases:
        measure(case)
    fastest = min(probes.values(), default=0.0)
    slow = sorted((c for c in cases if probes[c.name] >= SLOW_STATE_FACTOR * fastest),
                  key=lambda c: -probes[c.name])[:max(1, len(cases) // 4)]
    for case in slow:
        first = probes[case.name]
        now = probe() * 1e3
        if now >= first:
            _progress(f"{case.name}: probe {first:.2f} ms at its run, {now:.2f} now (fastest {fastest:.2f}): kept")
            continue
        _progress(f"{case.name}: probe {first:.2f} ms at its run (fastest {fastest:.2f}): measured again")
        measure(case)
        rows[case.name] = [{**r, "first_probe_ms": first} for r in rows[case.name]]
    return [r for case in cases for r in rows[case.name]]


def _max_iters(args, iters: int, *, extend: bool) -> int:
    """--max-iters, else MAX_ITERS_FACTOR x iters where noisy medians may get more rounds (not for
    --host-overhead, which reads the fastest run)."""
    if args.max_iters is not None:
        if args.max_iters < iters:
            raise SystemExit(f"--max-iters {args.max_iters} must be >= --iters ({iters})")
        return args.max_iters
    return MAX_ITERS_FACTOR * iters if extend else iters


def sweep_command(args) -> int:
    """Time and peak memory of each method's layer case against tokens, d or its size knob."""
    device, d, n, dtype = _resolve_shape(args)
    found = _discover(args)
    adapters = _chosen_adapters(args, found)
    iters = args.iters or SWEEP_ITERS
    warmup = args.warmup if args.warmup is not None else QUICK_WARMUP
    result = new_document("sweep", device, args=args, config={
        "sweep": args.sweep, "d": d, "n": n, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
        "iters": iters, "warmup": warmup, "compile": not args.no_compile, "sizes": args.sizes,
        "method": args.method})
    arm_rows = []
    for adapter in adapters:
        # one curve per method: along rank the size varies, along tokens or d it is the default
        label = adapter.method if args.sweep == "rank" else f"{adapter.method} {adapter.size_name}={adapter.default}"
        if args.sweep == "rank":
            values = args.sizes or [s for s in SWEEP_RANKS if s in adapter.sizes] or list(adapter.sizes)
        else:
            values = args.sizes or list(SWEEP_SIZES[args.sweep])
        for value in values:
            size = value if args.sweep == "rank" else None
            at_d, at_n = (value, n) if args.sweep == "d" else (d, value) if args.sweep == "tokens" else (d, n)
            case_rows = run_cases([adapter_case(adapter, size)], at_d, at_n, dtype, device, iters, warmup=warmup,
                                  compile=not args.no_compile, compile_backend=args.compile_backend,
                                  measures=("time", "peak"), progress=_progress)
            for row in case_rows:
                row["sweep"] = {"axis": args.sweep, "knob": adapter.size_name if size else args.sweep, "value": value}
                row["case"] = label
            arm_rows += case_rows
    rows = []
    for point_rows in _split_by(arm_rows, lambda r: (r["case"], r["sweep"]["value"])):
        rows.append({**summary_rows(point_rows)[0], "sweep": point_rows[0]["sweep"]})
    result["rows"], result["arm_rows"] = rows, arm_rows
    return _finish(result, args, device, f"sweep_{args.sweep}_" + _shape_stem(d, n, dtype), _report_errors(arm_rows))


def _split_by(rows: list[dict], key) -> list[list[dict]]:
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return list(groups.values())


# --------------------------------------------------------------------------------------------
# training-step memory and equal budgets (tiny Llama)

def parse_budget(text: str, total_params: int) -> int:
    """"0.5%" (of the base model's parameters) or a count ("20000", "2e4") -> parameters."""
    try:
        if text.endswith("%"):
            value = round(float(text[:-1]) / 100 * total_params)
        else:
            value = round(float(text))
    except ValueError:
        raise SystemExit(f"--budget {text!r}: give a percentage of the model's parameters (e.g. 0.5%) "
                         "or a parameter count (e.g. 20000)") from None
    if value <= 0:
        raise SystemExit(f"--budget {text!r} must be positive")
    return value


def _model_config(args, device, dtype) -> dict:
    from .model_step import LLAMA_TARGETS
    return {"d": args.d or MODEL_HIDDEN, "n": args.n or MODEL_TOKENS, "layers": MODEL_LAYERS,
            "dtype": str(dtype).removeprefix("torch."), "device": str(device), "targets": LLAMA_TARGETS,
            "compile": not args.no_compile, "compile_backend": args.compile_backend, "method": args.method}


def _step_rows(adapter: Adapter, size: int, cfg: dict, dtype, device) -> list[dict]:
    from ..peft import bridged_methods
    from .model_step import step_arms
    base = {"method": adapter.method, "size_name": adapter.size_name, "size": size}
    try:
        config = adapter.config(size, cfg["targets"])
        arms = step_arms(config, hidden=cfg["d"], tokens=cfg["n"], dtype=dtype, device=device,
                         compile=cfg["compile"], compile_backend=cfg["compile_backend"],
                         fused=adapter.method in bridged_methods(), timeline=device.type == "cuda",
                         progress=lambda arm: _progress(f"{adapter.method} {adapter.size_name}={size}: {arm}"))
    except Exception as exc:
        return [{**base, "arm": None, "error": f"{type(exc).__name__}: {exc}"}]
    return [{**base, "arm": arm, **values} for arm, values in arms.items()]


def memory_command(args) -> int:
    """One training step of a tiny Llama per method: parameters / gradients / optimizer state /
    saved activations / peak, fastadapt vs PEFT vs torch.compile(PEFT)."""
    device, _, _, dtype = _resolve_shape(args)
    found = _discover(args)
    adapters = _chosen_adapters(args, found)
    cfg = _model_config(args, device, dtype)
    result = new_document("memory", device, cfg, args)
    for adapter in adapters:
        result["rows"] += _step_rows(adapter, adapter.default, cfg, dtype, device)
    stem = f"memory_llama{cfg['d']}_n{cfg['n']}_{cfg['dtype']}"
    return _finish(result, args, device, stem, _report_errors(result["rows"]))


def budget_command(args) -> int:
    """Every method at the size whose trainable parameters are nearest one budget, on a tiny Llama."""
    from .model_step import bench_llama
    device, _, _, dtype = _resolve_shape(args)
    found = _discover(args)
    adapters = _chosen_adapters(args, found)
    cfg = _model_config(args, device, dtype)

    def make_model():
        return bench_llama(cfg["d"], layers=cfg["layers"], dtype=dtype, device="meta")

    total = sum(p.numel() for p in make_model().parameters())
    budget = parse_budget(args.budget, total)
    cfg.update(budget=budget, budget_text=args.budget, base_params=total, tolerance=BUDGET_TOLERANCE)
    result = new_document("budget", device, cfg, args)
    for adapter in adapters:
        found_size = budget_size(adapter, budget, make_model, cfg["targets"])
        if found_size is None:
            result["rows"].append({"method": adapter.method, "size_name": adapter.size_name, "size": None,
                                   "arm": None, "error": f"no size in {adapter.sizes} is valid on this model"})
            continue
        size, _ = found_size
        result["rows"] += _step_rows(adapter, size, cfg, dtype, device)
    stem = f"budget{budget}_llama{cfg['d']}_n{cfg['n']}_{cfg['dtype']}"
    return _finish(result, args, device, stem, _report_errors(result["rows"]))


# --------------------------------------------------------------------------------------------
# check, plot

def check_command(args) -> int:
    """Error of every arm against the float64 reference; exit 1 if any exceeds the table."""
    device, d, n, dtype = _resolve_shape(args)
    cases = _chosen_cases(args, _discover(args))
    rows = run_cases(cases, d, n, dtype, device, compile=not args.no_compile,
                     compile_backend=args.compile_backend, measures=("error",), progress=_progress)
    failures = _report_errors(rows)
    for r in rows:
        if r.get("arm") in (None, "base") or r.get("peer"):
            continue
        err, tol = r["rel_error"], r["tolerance"]
        verdict = "no reference" if err is None else ("ok" if err <= tol else "FAIL")
        failures += verdict == "FAIL"
        print(f"{r['case']:>28} {r['arm']:>14}: rel err {fmt(err, '.2e')} (tol {tol:.0e}) {verdict}")
    return 1 if failures else 0


def plot_command(args) -> int:
    from .plot import plot_results
    path = plot_results([Path(p) for p in args.results], Path(args.output))
    print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------------------------
# the command line

def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 CPU, bfloat16 CUDA")
    parser.add_argument("--method", action="append", default=[],
                        help="only this catalog method (repeatable), e.g. --method oft")
    parser.add_argument("--cases-dir", help="folder with cases_*.py (default: ./benchmarks)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile(PEFT) arm")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); on a shared machine "
                                                    "--threads 1 keeps tiny-shape timings free of waits for a busy core")


def _output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="results folder (default: benchmarks/results/<device>)")
    parser.add_argument("--json", metavar="FILE", help="also write the results document (JSON) to FILE")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    _common_arguments(parser)
    _output_arguments(parser)
    parser.add_argument("--d", type=int, help="features (default: 1024 on CPU, 4096 on CUDA)")
    parser.add_argument("--n", type=int, help="tokens (default: 2048 on CPU, 8192 on CUDA)")
    parser.add_argument("--only", action="append", default=[],
                        help="a family, or a prefix of case names (repeatable)")
    parser.add_argument("--iters", type=int, help=f"timed rounds (median; default 20, --quick {QUICK_ITERS}, "
                                                  f"--host-overhead {HOST_ITERS}, --sweep {SWEEP_ITERS})")
    parser.add_argument("--max-iters", type=int,
                        help=f"up to this many timed rounds while a median is uncertain (relative standard error "
                             f"above {MEDIAN_RSE_TARGET * 100:g}%%; default {MAX_ITERS_FACTOR} x iters, --host-overhead: iters)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 3, --quick/--sweep 2, "
                                                   f"--host-overhead {HOST_WARMUP})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="one case per bridged method at the standard shape, few iters (CPU: < 4 min)")
    mode.add_argument("--host-overhead", action="store_true",
                      help=f"per-call host time: the --quick cases at d={HOST_SHAPE[0]}, N={HOST_SHAPE[1]}")
    mode.add_argument("--sweep", choices=("tokens", "d", "rank"),
                      help="time and peak memory against tokens, d or the adapter's size knob (log-log chart)")
    mode.add_argument("--budget", metavar="B", help=f"equal trainable-parameter budget on a tiny Llama: a percentage "
                                                    f"of its parameters (e.g. {BUDGET_DEFAULT.replace('%', '%%')}) or a count")
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")],
                        help="--sweep values, comma-separated (e.g. 256,1024,4096)")


def add_cli(subparsers) -> None:
    """Add ``bench``, ``memory``, ``check``, ``compare`` and ``plot`` to the ``fastadapt`` command."""
    p = subparsers.add_parser("bench", help="time every benchmark case; write JSON + Markdown")
    add_bench_arguments(p)
    p.set_defaults(func=bench_command)
    p = subparsers.add_parser("memory", help="one training step of a tiny Llama per method, memory by part")
    _common_arguments(p)
    _output_arguments(p)
    p.add_argument("--d", type=int, help=f"hidden size (default {MODEL_HIDDEN})")
    p.add_argument("--n", type=int, help=f"tokens per step (default {MODEL_TOKENS})")
    p.set_defaults(func=memory_command)
    p = subparsers.add_parser("check", help="error vs the float64 reference per case")
    _common_arguments(p)
    p.add_argument("--d", type=int, help="features (default: 1024 on CPU, 4096 on CUDA)")
    p.add_argument("--n", type=int, help="tokens (default: 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--only", action="append", default=[], help="a family, or a prefix of case names (repeatable)")
    p.set_defaults(func=check_command)
    from .compare import add_cli as add_compare
    add_compare(subparsers)
    p = subparsers.add_parser("plot", help="draw a chart from results JSON (any fastadapt bench/memory document)")
    p.add_argument("results", nargs="+", help="results .json written by `fastadapt bench` or `fastadapt memory`")
    p.add_argument("-o", "--output", required=True, help="image file to write, e.g. out.png")
    p.set_defaults(func=plot_command)


def main(argv=None) -> int:
    """Entry of ``python -m benchmarks.run``: the ``bench`` command's options."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                     description="Run benchmarks/cases_*.py; write JSON + Markdown.")
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    args.command_line = " ".join(["python -m benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
    return bench_command(args)
