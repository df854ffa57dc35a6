"""Ahead-of-time compile report: every @triton.jit kernel of fastadapt.triton_kernels, compiled for an
NVIDIA target without a GPU (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas), and what
the machine code says about speed: instruction mix, occupancy, waves.

    python -m benchmarks.compile_report [--arch 90] [--out DIR] [--workers 2]
                                        [--smoke | --standard | --exhaustive] [--only TEXT] [--ptx-only]

The interpreter (TRITON_INTERPRET=1, how the tests run on CPU) never lowers a kernel, so it misses
what only the compiler sees: illegal constructs, tl.dot shape/dtype rules, shared-memory overflow,
register pressure, and whether a dot runs on tensor cores.  This script lowers each kernel exactly
as the JIT would for a launch on the target: the launcher's arguments at the standard shape
(N = 8192 rows, d = 4096 features) go through Triton's own binder (``create_function_from_signature``:
int 1 -> constexpr, multiples of 16 -> tt.divisibility, pointers 16-byte aligned), then

    triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                   options=backend.parse_options({"num_warps": ..., "num_stages": ...}).__dict__)

with ``knobs.nvidia.dump_ptxas_log`` on.  Per variant it records:
  - registers, spill bytes, stack frame (ptxas -v) and shared memory (Triton's metadata);
  - the dots of the TTIR by operand precision (half = fp16 / bf16 operands, tf32, ieee = IEEE fp32);
  - the SASS instruction mix (triton's bundled ``cuobjdump -sass``; static counts, a loop body once):
    tensor-core MMAs (HGMMA = Hopper wgmma, HMMA = mma.sync), FFMA, global loads / stores (LDG /
    STG), cp.async (LDGSTS) and TMA (UTMALDG ...), shared loads / stores (LDS, LDSM / STS, STSM),
    barriers (BAR, SYNCS = mbarrier), local memory (LDL / STL: spills), warp shuffles;
  - occupancy on the H200 (``benchmarks.roofline.H200``: registers, shared memory, warps, blocks
    per SM) and the programs the launcher starts at the standard shape against the 132 SMs
    (waves; tail = fraction of the last wave's slots in use).
Checks (each a finding; exit status 1 if any, or if a row fails): a variant with half or tf32 dots
and no tensor-core instruction; spill stores above ``SPILL_BUDGET`` for the variant's scope (unless
the variant states ``accepted_spill``, which must then still be needed); IEEE fp32 dots in a half
dtype without ``ieee_reason`` (fp32 inputs default to torch's IEEE fp32 matmul semantics); a
``standard`` variant in a half dtype that launches fewer programs than the H200 has SMs at the
standard shape (some SMs idle for the whole launch) unless it states ``accepted_launch`` (the
reason, with the microseconds at stake), which must then still launch under one wave.  Other
launches under one wave are listed as notes.

Variant tables by convention: for every kernel module ``fastadapt/triton_kernels/<module>.py`` there is
``benchmarks/compile_<module>.py`` defining ``variants() -> dict[kernel_name, list[Variant]]``, built from
the launcher's own helpers (tiles, warps, autotune configs, grid), with ``Variant`` and ``mock_tensor``
imported from here (it may also define ``roofline(shape)``: benchmarks/roofline.py).  A kernel without
an entry, an entry whose kernel is gone, a variants file that fails to import, or arguments that no
longer bind to the kernel's parameters make a ``stale-table`` row; a lowering or ptxas failure a
``compile-error`` row, a cuobjdump failure a ``disasm-error`` row: each says why and the others go on.
Writes ``sm<arch>_<date>.json`` (header + rows) and ``.md``, and the roofline beside them.  CPU cost:
~7 CPU-minutes by default, dominated by the b = 64 / 128 Cayley tiles; ``--smoke`` ~15 s; ``--standard``
(what tests/test_compile_sm90.py runs) ~0.7 CPU-s per variant.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import importlib
import io
import json
import math
import os
import pkgutil
import platform
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

from benchmarks.roofline import H200, GPU

ROWS, FEATURES = 8192, 4096          # the GPU standard shape (benchmarks/gpu_suite.sh)
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
HALF_DTYPES = ("float16", "bfloat16")
KERNEL_PACKAGE = "fastadapt.triton_kernels"
BENCH_DIR = Path(__file__).resolve().parent
# Shared memory one block may use (opt-in maximum, bytes): Triton raises OutOfResources at load time
# above it, which ptxas does not check (the kernel's shared memory is dynamic).
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: H200.smem_per_block_max,
                    100: 232448, 120: 101376}
# Spill stores per thread (bytes) a variant may have, by what it runs over.  "activations": the
# program streams N-row tensors, so local-memory traffic multiplies with the tokens: none allowed.
# "parameters": the work is parameter-sized (e.g. one program per b x b rotation block, independent
# of N), where a few hundred bytes per thread stay in L1 and cost little next to the GEMMs.
SPILL_BUDGET = {"activations": 0, "parameters": 512}
FP32_IEEE_DEFAULT_REASON = "fp32 inputs: IEEE fp32 like torch's default fp32 matmul (no TF32 rounding)"


@dataclass(frozen=True)
class Variant:
    """One specialisation of a kernel, as its launcher calls it at the standard shape.

    ``build(dtype)`` returns the launcher's (args, kwargs) with ``mock_tensor`` stand-ins for
    tensors; kwargs hold the constexprs and num_warps / num_stages.  ``grid``: the programs the
    launcher starts at that shape (its own grid helper where it has one).  ``scope``: "activations"
    or "parameters" (picks the spill budget).  ``standard``: a benchmark case launches it at the
    GPU standard shape (tests/test_compile_sm90.py compiles these in bfloat16).  ``ieee_reason``:
    why IEEE fp32 dots are used on purpose in a half-dtype variant.  ``accepted_spill``: {dtype:
    reason} for spills above the budget that are known, with the reason and what would remove them
    (a statement that is no longer needed is itself a finding).  ``accepted_launch``: why the
    launch may start fewer programs than the SMs at the standard shape (e.g. one program per
    independent parameter block), with the microseconds at stake; required of a standard variant in
    a half dtype that does, a finding when the launch fills the SMs."""
    name: str
    build: Callable
    dtypes: tuple = FLOAT_DTYPES
    exhaustive_dtypes: tuple = ()    # compiled only with --exhaustive (slow, and the same code as a default dtype)
    grid: tuple = ()
    scope: str = "activations"
    standard: bool = False
    ieee_reason: str = ""
    accepted_spill: dict | None = None
    accepted_launch: str = ""


def mock_tensor(dtype: str):
    """A stand-in tensor of ``dtype`` ("float32", "bfloat16", ...) for Triton's binder."""
    import torch
    from triton.runtime.jit import MockTensor
    return MockTensor(getattr(torch, dtype))


# --------------------------------------------------------------------------------------------
# discovery

def discover_kernels() -> dict[str, list[str]]:
    """{module: [kernel names]} for every JIT function named ``*_kernel`` defined in a module of the
    kernel package (helpers such as ``_skew_tile`` are inlined into kernels, never launched)."""
    package = importlib.import_module(KERNEL_PACKAGE)
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{KERNEL_PACKAGE}.{info.name}")
        names = [name for name, obj in vars(module).items()
                 if name.endswith("_kernel") and type(obj).__name__ in ("JITFunction", "InterpretedFunction")
                 and getattr(obj, "fn", obj).__module__ == module.__name__]
        if names:
            found[module.__name__] = names
    return found


def variants_file(kernel_module: str) -> Path:
    return BENCH_DIR / f"compile_{kernel_module.rsplit('.', 1)[-1]}.py"


def variant_modules() -> dict[str, str | None]:
    """{kernel module: its variants module ``benchmarks.compile_<module>``, or None if the file is missing}."""
    return {module: f"benchmarks.{variants_file(module).stem}" if variants_file(module).exists() else None
            for module in discover_kernels()}


def orphan_variant_files() -> list[str]:
    """benchmarks/compile_<x>.py files whose kernel module fastadapt/triton_kernels/<x>.py is gone."""
    known = {variants_file(m).name for m in discover_kernels()}
    package = Path(importlib.import_module(KERNEL_PACKAGE).__path__[0])
    return sorted(p.name for p in BENCH_DIR.glob("compile_*.py")
                  if p.name not in known and p.name != Path(__file__).name
                  and not (package / f"{p.stem.removeprefix('compile_')}.py").exists())


def variants_for(module: str) -> dict[str, list[Variant]]:
    """The variants table of a kernel module ({} when it has no variants file); raises what the file raises."""
    name = variant_modules().get(module)
    return importlib.import_module(name).variants() if name else {}


def plan(smoke: bool = False, exhaustive: bool = False, standard: bool = False) -> list[tuple]:
    """(module, kernel, variant, dtype, problem) jobs; a stale table gives one job per kernel with
    variant '' and ``problem`` saying why.  ``smoke``: the first variant of each kernel in float32 and
    bfloat16; ``standard``: the first variant of each kernel in float32 and every ``standard``
    variant in bfloat16 (or its first half dtype; fp32-only variants are left to the full report:
    the b >= 64 Cayley tiles take 40-110 s each); ``exhaustive``: every variant in every dtype it
    takes (adds the slow half-precision b = 64 / 128 Cayley tiles)."""
    jobs = []
    modules = variant_modules()
    for module, kernels in discover_kernels().items():
        short = module.rsplit(".", 1)[-1]
        if modules[module] is None:
            problem = (f"no benchmarks/compile_{short}.py: add one defining variants() -> "
                       "{kernel name: [Variant, ...]} (see benchmarks/compile_report.py)")
            jobs.extend((module, kernel, "", "", problem) for kernel in kernels)
            continue
        try:
            table = variants_for(module)
        except Exception as error:  # noqa: BLE001 -- a broken table is a row, not a crash
            problem = f"benchmarks/compile_{short}.py variants() failed: {type(error).__name__}: {error}"
            jobs.extend((module, kernel, "", "", problem) for kernel in kernels)
            continue
        for kernel in kernels:
            variants = table.get(kernel, [])
            if not variants:
                jobs.append((module, kernel, "", "", f"no specialisation: add the launcher's arguments for "
                                                     f"{kernel} to variants() in benchmarks/compile_{short}.py"))
            chosen = []
            for index, variant in enumerate(variants):
                dtypes = variant.dtypes + (variant.exhaustive_dtypes if exhaustive else ())
                picked = []
                if (smoke or standard) and index == 0:
                    picked += [t for t in dtypes if t in (("float32",) if standard else ("float32", "bfloat16"))]
                if standard and variant.standard:
                    halves = [t for t in dtypes if t in HALF_DTYPES]
                    picked += ["bfloat16" if "bfloat16" in halves else halves[0]] if halves else []
                if not (smoke or standard):
                    picked = list(dtypes)
                chosen += [(variant.name, t) for t in dict.fromkeys(picked)]
            jobs.extend((module, kernel, name, dtype, "") for name, dtype in chosen)
        jobs.extend((module, gone, "", "", f"benchmarks/compile_{short}.py names {gone}, which {module} no "
                                           "longer defines") for gone in table if gone not in kernels)
    for orphan in orphan_variant_files():
        jobs.append((f"{KERNEL_PACKAGE}.{orphan[len('compile_'):-3]}", "", "", "",
                     f"benchmarks/{orphan} has no kernel module: delete it or restore the module"))
    return jobs


# --------------------------------------------------------------------------------------------
# what the compiled code says

_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_TTIR_DOT = re.compile(r"= tt\.dot (.*?) : tensor<([0-9x]+)x(\w+)>")
_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
TENSOR_OPS = ("HGMMA", "HMMA", "IGMMA", "IMMA", "QGMMA", "DMMA", "BGMMA")
# Columns of the report: name -> opcodes counted (static counts in the SASS).
SASS_COLUMNS = {
    "mma": TENSOR_OPS,
    "ffma": ("FFMA",),
    "ldg": ("LDG",), "stg": ("STG",),
    "cp_async": ("LDGSTS",),
    "tma": ("UTMALDG", "UTMASTG", "UTMAPF", "UTMAREDG", "UBLKCP", "UBLKRED", "UBLKPF"),
    "lds": ("LDS", "LDSM"), "sts": ("STS", "STSM"),
    "bar": ("BAR", "SYNCS"),
    "ldl": ("LDL",), "stl": ("STL",),
    "shfl": ("SHFL",),
    "atom": ("ATOM", "ATOMG", "ATOMS", "RED", "REDG"),
}


def ttir_dots(ttir: str) -> dict[str, int]:
    """tt.dot ops of the TTIR by operand precision: half (fp16 / bf16 / fp8 operands), tf32,
    tf32x3 and ieee (fp32 operands with inputPrecision ieee, Triton's default when not printed)."""
    counts = {"half": 0, "tf32": 0, "tf32x3": 0, "ieee": 0}
    for attributes, _, element in _TTIR_DOT.findall(ttir):
        if element != "f32":
            counts["half"] += 1
            continue
        precision = re.search(r"inputPrecision = (\w+)", attributes)
        counts[precision.group(1) if precision and precision.group(1) in counts else "ieee"] += 1
    return counts


def sass_opcodes(sass: str) -> dict[str, int]:
    """Opcode -> static count (predicates and modifiers stripped: "@!P0 LDG.E.128" -> LDG)."""
    found = collections.Counter()
    for line in sass.splitlines():
        match = _SASS_LINE.match(line)
        if match:
            found[match.group(1)] += 1
    return dict(found)


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin by triton's bundled cuobjdump; raises RuntimeError saying why it could not."""
    from triton import knobs
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            tool = knobs.nvidia.cuobjdump.path
            done = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, timeout=120)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
            raise RuntimeError(f"cuobjdump did not run: {type(error).__name__}: {error}") from error
    if done.returncode != 0 or "Function" not in done.stdout:
        raise RuntimeError(f"cuobjdump -sass exit {done.returncode}: {(done.stderr or done.stdout).strip()[:300]}")
    return done.stdout


def math_unit(dots: dict[str, int], opcodes: dict[str, int]) -> str:
    """Where the variant's dots run, from its SASS."""
    tensor = [op for op in TENSOR_OPS if opcodes.get(op)]
    if tensor:
        return f"tensor cores ({'+'.join(tensor)})" + (" + FFMA (IEEE fp32 dots)" if dots["ieee"] else "")
    if dots["half"] or dots["tf32"] or dots["tf32x3"]:
        return "FFMA: half/tf32 dots left the tensor cores"
    if dots["ieee"]:
        return "FFMA (IEEE fp32 dots)"
    return "no dot"


def occupancy(registers: int, shared: int, warps: int, gpu: GPU = H200) -> dict:
    """Resident blocks per SM and what limits them (CUDA occupancy-calculator arithmetic)."""
    regs_per_warp = math.ceil(registers * 32 / gpu.reg_alloc_unit) * gpu.reg_alloc_unit
    limits = {
        "registers": gpu.regs_per_sm // (regs_per_warp * warps),
        "shared": (0 if shared > gpu.smem_per_block_max else
                   gpu.smem_per_sm // (shared + gpu.smem_reserved_per_block)),
        "warps": gpu.max_warps_per_sm // warps,
        "blocks": gpu.max_blocks_per_sm,
    }
    limiter = min(limits, key=limits.get)
    blocks = limits[limiter]
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * warps,
                occupancy=round(blocks * warps / gpu.max_warps_per_sm, 3), limiter=limiter)


def waves(grid: tuple, blocks_per_sm: int, gpu: GPU = H200) -> dict:
    """Programs at the standard shape against the resident slots of all SMs."""
    programs = math.prod(grid)
    slots = blocks_per_sm * gpu.sms
    if not slots:
        return dict(programs=programs, waves=None, tail=None)
    rest = programs % slots      # 3 significant digits: a launch of a few programs is not 0 waves
    return dict(programs=programs, waves=float(f"{programs / slots:.3g}"), tail=float(f"{rest / slots:.3g}"),
                sms_busy=min(programs, gpu.sms))


def _analyse(row: dict, compiled, variant: Variant, to_cubin: bool) -> None:
    """Dots, SASS mix, occupancy, waves and findings of a compiled row (in place)."""
    dots = ttir_dots(compiled.asm["ttir"])
    row["dots"] = dots
    if variant.ieee_reason:
        row["ieee_reason"] = variant.ieee_reason if dots["ieee"] else ""
    elif dots["ieee"] and row["dtype"] == "float32":
        row["ieee_reason"] = FP32_IEEE_DEFAULT_REASON
    if row["grid"]:
        row["programs"] = math.prod(row["grid"])
    findings = row["findings"]
    if dots["ieee"] and row["dtype"] in HALF_DTYPES and not row.get("ieee_reason"):
        findings.append(f"{dots['ieee']} IEEE fp32 dots in a {row['dtype']} variant without a stated reason "
                        "(Variant.ieee_reason), i.e. CUDA-core FFMA where tensor cores could run")
    if not to_cubin:
        return
    try:
        opcodes = sass_opcodes(disassemble(compiled.asm["cubin"]))
    except RuntimeError as error:
        row.update(status="disasm-error", error=str(error))
        return
    row["sass_ops"] = opcodes
    row["sass"] = {name: sum(opcodes.get(op, 0) for op in ops) for name, ops in SASS_COLUMNS.items()}
    row["sass"]["instructions"] = sum(opcodes.values())
    row["math"] = math_unit(dots, opcodes)
    if (dots["half"] or dots["tf32"] or dots["tf32x3"]) and not row["sass"]["mma"]:
        findings.append(f"left the tensor cores: {dots['half']} half / {dots['tf32']} tf32 dots in the TTIR but no "
                        f"HGMMA/HMMA in the SASS ({row['sass']['ffma']} FFMA)")
    row.update(occupancy(row["registers"], row["shared_bytes"], row["num_warps"]))
    if row["grid"]:
        row.update(waves(row["grid"], row["blocks_per_sm"]))
        _check_launch(row, variant)
    budget = SPILL_BUDGET[variant.scope]
    row["spill_budget"] = budget
    accepted = (variant.accepted_spill or {}).get(row["dtype"], "")
    if row["spill_store_bytes"] > budget and accepted:
        row["accepted_spill"] = accepted
    elif row["spill_store_bytes"] > budget:
        findings.append(f"spills {row['spill_store_bytes']} B per thread > the {budget} B budget for "
                        f"{variant.scope}-scope variants ({row['registers']} registers)")
    elif accepted:
        findings.append(f"accepted_spill[{row['dtype']!r}] is stated but it spills {row['spill_store_bytes']} B "
                        f"<= {budget} B: remove the statement")


def _check_launch(row: dict, variant: Variant, gpu: GPU = H200) -> None:
    """Programs at the standard shape against the SMs (in place): under one wave, a standard
    half-precision variant needs ``accepted_launch`` (else a finding); an accepted one is recorded,
    any other is a note; a stated ``accepted_launch`` on a launch that fills the SMs is a finding."""
    programs = row["programs"]
    if programs >= gpu.sms:
        if variant.accepted_launch:
            row["findings"].append(f"accepted_launch is stated but it launches {programs} programs for {gpu.sms} "
                                   "SMs: remove the statement")
        return
    idle = f"{programs} programs for {gpu.sms} SMs: {gpu.sms - programs} SMs idle at the standard shape"
    if variant.accepted_launch:
        row["accepted_launch"] = variant.accepted_launch
    elif variant.standard and row["dtype"] in HALF_DTYPES:
        row["findings"].append(f"{idle}: launch at least one program per SM (e.g. fewer rows per program or a "
                               "split with a second-stage reduction) or state Variant.accepted_launch with the "
                               "reason and the microseconds at stake")
    else:
        row["notes"].append(idle)


def _configure_worker(cache_dir: str) -> None:
    from triton import knobs
    knobs.cache.dir = cache_dir
    knobs.compilation.always_compile = True     # a fresh lowering (and ptxas log) for every row
    knobs.nvidia.dump_ptxas_log = True


def _error_text(error: BaseException) -> tuple[str, str]:
    """(one-line headline, up to ~30 lines of detail).  Triton's CompilationError starts with the
    source location ("at 45:14:") and ends with the message; ptxas failures name ptxas' own error."""
    text = str(error).strip() or repr(error)
    lines = [line for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if re.match(r"at \d+:\d+:", first):
        headline = f"{lines[-1].strip()} ({first.rstrip(':')} of the kernel)"
    else:
        ptxas_errors = [line.strip() for line in lines[1:] if "ptxas" in line and "error" in line.lower()]
        headline = first + (f" | {ptxas_errors[0]}" if ptxas_errors else "")
    detail = lines if len(lines) <= 30 else lines[:10] + ["..."] + lines[-20:]
    return f"{type(error).__name__}: {headline}", "\n".join(detail)


def compile_one(job: tuple, arch: int, to_cubin: bool = True) -> dict:
    """Lower one (module, kernel, variant, dtype, problem) for sm_<arch>; a dict row, never raises."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    module_name, kernel_name, variant_name, dtype, problem = job
    row = dict(kernel=kernel_name, module=module_name.rsplit(".", 1)[-1], variant=variant_name, dtype=dtype,
               status="compile-error", error="", error_detail="", registers=None, spill_store_bytes=None,
               spill_load_bytes=None, stack_frame_bytes=None, shared_bytes=None, num_warps=None,
               num_stages=None, compile_s=None, stage="cubin" if to_cubin else "ptx", grid=[], findings=[], notes=[])
    if problem:
        row.update(status="stale-table", error=problem)
        return row
    module = importlib.import_module(module_name)
    kernel = getattr(module, kernel_name)
    if type(kernel).__name__ != "JITFunction":
        row["error"] = f"{kernel_name} is a {type(kernel).__name__}: unset TRITON_INTERPRET before importing triton"
        return row
    variant = next(v for v in variants_for(module_name)[kernel_name] if v.name == variant_name)
    row.update(grid=list(variant.grid), scope=variant.scope, standard=variant.standard)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    log = io.StringIO()
    start = time.perf_counter()
    try:   # bind the launcher's arguments as the JIT does (signature types, constexprs, divisibility)
        args, kwargs = variant.build(dtype)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, options, bound, specialization, options)
    except (TypeError, KeyError) as error:   # the table no longer matches the kernel's parameters
        row["status"] = "stale-table"
        row["error"], row["error_detail"] = _error_text(error)
        row["error"] += f" (update variants() in benchmarks/compile_{row['module']}.py to the launcher's call)"
        return row
    source = ASTSource(kernel, signature, constexprs, attrs)
    try:
        with contextlib.redirect_stdout(log):
            if to_cubin:
                compiled = triton.compile(source, target=target, options=options.__dict__)
            else:
                compiled = _compile_to_ptx(source, target, options)
    except Exception as error:  # noqa: BLE001 -- every failure is a report row
        row["compile_s"] = round(time.perf_counter() - start, 2)
        row["error"], row["error_detail"] = _error_text(error)
        return row
    row["compile_s"] = round(time.perf_counter() - start, 2)
    row.update(status="ok", shared_bytes=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
               num_stages=compiled.metadata.num_stages)
    max_shared = MAX_SHARED_BYTES.get(arch)
    if max_shared is not None and compiled.metadata.shared > max_shared:
        row.update(status="compile-error", error=f"OutOfResources: shared memory {compiled.metadata.shared} B "
                                                 f"> {max_shared} B per block on sm_{arch} (fails at launch)")
        return row
    if to_cubin:
        text = log.getvalue()
        regs, spill = _PTXAS_REGS.search(text), _PTXAS_SPILL.search(text)
        if regs is None or spill is None:
            row.update(status="compile-error", error=f"ptxas -v output not understood: {text[:200]!r}")
            return row
        row.update(registers=int(regs.group(1)), stack_frame_bytes=int(spill.group(1)),
                   spill_store_bytes=int(spill.group(2)), spill_load_bytes=int(spill.group(3)))
    elif f".entry {compiled.metadata.name}" not in compiled.asm["ptx"]:
        row.update(status="compile-error", error=f"PTX has no .entry {compiled.metadata.name}")
        return row
    _analyse(row, compiled, variant, to_cubin)
    return row


@dataclass
class _PTXKernel:
    metadata: object
    asm: dict


def _compile_to_ptx(source, target, options) -> _PTXKernel:
    """The backend's stages up to PTX (no ptxas): what triton.compile runs, minus make_cubin."""
    from types import SimpleNamespace
    from triton._C.libtriton import ir
    from triton.compiler import make_backend
    backend = make_backend(target)
    stages = {}
    backend.add_stages(stages, options, source.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    metadata = {"target": target, **options.__dict__}
    module = source.make_ir(target, options, backend.get_codegen_implementation(options),
                            backend.get_module_map(), context)
    asm = {}
    for stage in ("ttir", "ttgir", "llir", "ptx"):
        module = stages[stage](module, metadata)
        asm[stage] = module if isinstance(module, str) else str(module)
    metadata.setdefault("shared", 0)
    return _PTXKernel(SimpleNamespace(**metadata), asm)


def _progress(done: int, total: int, row: dict) -> None:
    if row["status"] != "ok":
        detail = row["status"]
    else:
        detail = (f"{row['registers']} regs" if row["registers"] is not None else "ptx") + \
                 (f", {row['math']}" if row.get("math") else "")
    print(f"[{done}/{total}] {row['kernel']} [{row['variant']}, {row['dtype']}]: {detail}, {row['compile_s']} s",
          file=sys.stderr, flush=True)


def _run(jobs, arch: int, workers: int, to_cubin: bool) -> list[dict]:
    """Rows in ``jobs`` order; progress on stderr as each compile finishes."""
    rows = [None] * len(jobs)
    with tempfile.TemporaryDirectory(prefix="triton-aot-") as cache_dir:
        if workers <= 1:
            _configure_worker(cache_dir)
            for index, job in enumerate(jobs):
                rows[index] = compile_one(job, arch, to_cubin)
                _progress(index + 1, len(jobs), rows[index])
            return rows
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_configure_worker,
                                 initargs=(cache_dir,)) as pool:
            futures = {pool.submit(compile_one, job, arch, to_cubin): index for index, job in enumerate(jobs)}
            for done, future in enumerate(as_completed(futures), 1):
                rows[futures[future]] = future.result()
                _progress(done, len(jobs), rows[futures[future]])
    return rows


# --------------------------------------------------------------------------------------------
# output

def _header(arch: int, argv: list[str], wall_s: float, to_cubin: bool) -> dict:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch)
    return dict(triton_version=triton.__version__, target=f"cuda sm_{arch} (GPUTarget('cuda', {arch}, 32))",
                ptxas=f"{os.path.basename(ptxas.path)} {ptxas.version}" if to_cubin else "not run (PTX only)",
                disassembler="triton's bundled cuobjdump -sass" if to_cubin else "not run",
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="python -m benchmarks.compile_report " + " ".join(argv),
                fp_fusion=os.environ["TRITON_DEFAULT_FP_FUSION"],
                host=f"{platform.machine()} {os.cpu_count()} CPUs, no GPU needed", wall_s=round(wall_s, 1),
                standard_shape=f"N={ROWS} rows, d={FEATURES} features",
                occupancy_model=f"{H200.name}: {H200.sms} SMs; see benchmarks/roofline.py H200 for the limits "
                                "and their sources",
                spill_budget_bytes_per_thread=SPILL_BUDGET)


def _cell(value) -> str:
    return "" if value is None else str(value).replace("|", "/")


def _markdown(header: dict, rows: list[dict]) -> str:
    failed = [r for r in rows if r["status"] != "ok"]
    spilling = [r for r in rows if r["spill_store_bytes"] or r["spill_load_bytes"]]
    findings = [r for r in rows if r["findings"]]
    lines = [f"# Triton ahead-of-time compile report ({header['target']})", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += [f"- rows: {len(rows)}, compiled: {len(rows) - len(failed)}, failed: {len(failed)}, "
              f"spilling: {len(spilling)}, with findings: {len(findings)}", ""]
    if findings or failed:
        lines += ["## Findings and failures", ""]
        lines += [f"- {r['kernel']} [{_cell(r['variant'])}, {r['dtype']}]: **{r['status']}** {_cell(r['error'])[:300]}"
                  for r in failed]
        lines += [f"- {r['kernel']} [{_cell(r['variant'])}, {r['dtype']}]: {f}"
                  for r in findings for f in r["findings"]]
        lines.append("")
    accepted = [r for r in rows if r.get("accepted_spill")]
    if accepted:
        lines += ["## Spills over the budget, accepted with a reason", ""]
        lines += [f"- {r['kernel']} [{_cell(r['variant'])}, {r['dtype']}]: {r['spill_store_bytes']} B per thread "
                  f"(budget {r['spill_budget']}): {r['accepted_spill']}" for r in accepted]
        lines.append("")
    launches = collections.defaultdict(list)
    for r in rows:
        if r.get("accepted_launch"):
            launches[(r["kernel"], r["variant"], r["programs"], r["accepted_launch"])].append(r["dtype"])
    if launches:
        lines += ["## Launches under one wave, accepted with a reason (fewer programs than the H200's SMs)", ""]
        lines += [f"- {kernel} [{_cell(variant)}, {' / '.join(dtypes)}]: {programs} programs for {H200.sms} SMs: "
                  f"{_cell(reason)}" for (kernel, variant, programs, reason), dtypes in launches.items()]
        lines.append("")
    under = [r for r in rows if r["notes"]]
    if under:
        lines += ["## Other launches smaller than the GPU (fewer programs than the H200's SMs; not a standard "
                  "half-precision variant)", ""]
        lines += [f"- {r['kernel']} [{_cell(r['variant'])}, {r['dtype']}]: {'; '.join(r['notes'])}" for r in under]
        lines.append("")
    reasons = collections.defaultdict(list)
    for r in rows:
        if r.get("ieee_reason"):
            reasons[r["ieee_reason"]].append(f"{r['kernel']} [{r['variant']}, {r['dtype']}]")
    if reasons:
        lines += ["## IEEE fp32 dots by design (CUDA-core FFMA, not tensor cores)", ""]
        for reason, where in reasons.items():
            lines.append(f"- {reason}: {len(where)} rows, e.g. {'; '.join(where[:4])}")
        lines.append("")
    lines += ["## Every variant", "",
              "math: where the dots run, from the SASS.  dots h/t/i: tt.dot ops in the TTIR with half, tf32 or "
              "IEEE fp32 operands.  Instruction columns are static SASS counts (a loop body once): mma = "
              "HGMMA/HMMA, ldg/stg = global, cp.a/tma = LDGSTS / UTMA*, lds/sts = shared (incl. LDSM/STSM), "
              "bar = BAR + SYNCS, ldl/stl = local memory (spills).  regs and spill stores per thread (ptxas -v), "
              "shared per program (KB).  blk/SM = resident programs per SM on the H200 and the limit that sets "
              "it (r = registers, s = shared, w = warps, b = blocks); occ = resident warps / 64.  programs at "
              "the standard shape; waves = programs / (blk/SM x 132); tail = filled fraction of the last wave.",
              "",
              "| kernel | variant | dtype | status | math | dots h/t/i | mma | ffma | ldg/stg | cp.a/tma | lds/sts "
              "| bar | ldl/stl | instr | regs | spill st | shared KB | warps | st | blk/SM | occ | programs | waves "
              "(tail) | s |",
              "|---|---|---|---|---|---|---:|---:|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"
              "---:|"]
    short = {"registers": "r", "shared": "s", "warps": "w", "blocks": "b"}
    for r in rows:
        status = "ok" if r["status"] == "ok" else f"**{r['status']}**: {_cell(r['error'])[:200]}"
        if r["findings"]:
            status += " **finding**"
        sass = r.get("sass") or {}
        dots = r.get("dots")
        dots_cell = f"{dots['half']}/{dots['tf32'] + dots['tf32x3']}/{dots['ieee']}" if dots else ""

        def pair(a, b):
            return f"{sass[a]}/{sass[b]}" if sass else ""
        spill = _cell(r["spill_store_bytes"])
        if r["spill_store_bytes"]:
            spill = f"**{spill}**"
        shared = "" if r["shared_bytes"] is None else f"{r['shared_bytes'] / 1024:.0f}"
        blocks = f"{r['blocks_per_sm']} {short[r['limiter']]}" if "blocks_per_sm" in r else ""
        wave = "" if r.get("waves") is None else f"{r['waves']} ({r['tail']})"
        lines.append(
            f"| {r['kernel']} | {_cell(r['variant'])} | {r['dtype']} | {status} | {r.get('math', '')} | {dots_cell} "
            f"| {_cell(sass.get('mma'))} | {_cell(sass.get('ffma'))} | {pair('ldg', 'stg')} "
            f"| {pair('cp_async', 'tma')} | {pair('lds', 'sts')} | {_cell(sass.get('bar'))} | {pair('ldl', 'stl')} "
            f"| {_cell(sass.get('instructions'))} "
            f"| {_cell(r['registers'])} | {spill} | {shared} | {_cell(r['num_warps'])} | {_cell(r['num_stages'])} "
            f"| {blocks} | {_cell(r.get('occupancy'))} | {_cell(r.get('programs'))} | {wave} "
            f"| {_cell(r['compile_s'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_report", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    parser.add_argument("--out", default="benchmarks/results/compile", help="folder for the .json and .md")
    parser.add_argument("--workers", type=int, default=2, help="compile processes (spawned)")
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--smoke", action="store_true", help="first variant per kernel, float32 and bfloat16 only")
    selection.add_argument("--standard", action="store_true",
                           help="the first variant per kernel in float32 and every variant a benchmark case "
                                "launches, in bfloat16 (the tests' set)")
    selection.add_argument("--exhaustive", action="store_true",
                           help="also half dtypes of the b = 64 / 128 Cayley tiles (~15 CPU-minutes more)")
    parser.add_argument("--only", action="append", default=[],
                        help="compile only variants whose 'kernel variant dtype' contains this (repeatable: any of them)")
    parser.add_argument("--ptx-only", action="store_true", help="stop at PTX (no ptxas: no registers, spills or SASS)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: the interpreter replaces @triton.jit kernels; unset it")
    # Triton 3.9 fuses a * b + c into FMA unless told otherwise (and warns that 3.10 will not); state it
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    start = time.perf_counter()
    jobs = [job for job in plan(args.smoke, args.exhaustive, args.standard)
            if not args.only or any(pattern in " ".join(job[1:4]) for pattern in args.only)]
    rows = _run(jobs, args.arch, args.workers, not args.ptx_only)
    header = _header(args.arch, argv, time.perf_counter() - start, not args.ptx_only)
    os.makedirs(args.out, exist_ok=True)
    suffix = "_smoke" if args.smoke else "_standard" if args.standard else ""
    stem = os.path.join(args.out, f"sm{args.arch}_{datetime.date.today():%Y%m%d}{suffix}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(header=header, rows=rows), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(_markdown(header, rows))
    from benchmarks import roofline
    roofline_stem, _, roofline_errors = roofline.write(args.out)
    failed = [r for r in rows if r["status"] != "ok"]
    spilling = [r for r in rows if r["spill_store_bytes"] or r["spill_load_bytes"]]
    findings = [(r, f) for r in rows for f in r["findings"]]
    print(f"{len(rows)} compiles in {header['wall_s']} s: {len(failed)} failed, {len(spilling)} spill, "
          f"{len(findings)} findings -> {stem}.md, {roofline_stem}.md")
    for r in failed:
        print(f"  {r['status'].upper()} {r['kernel']} [{r['variant']}, {r['dtype']}]: {r['error']}")
    for r, finding in findings:
        print(f"  FINDING {r['kernel']} [{r['variant']}, {r['dtype']}]: {finding}")
    for module, error in roofline_errors.items():
        print(f"  ROOFLINE ERROR {module}: {error}")
    return 1 if failed or findings or roofline_errors else 0


if __name__ == "__main__":
    sys.exit(main())
