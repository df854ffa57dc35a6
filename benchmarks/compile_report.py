"""Ahead-of-time compile report: every @triton.jit kernel of fastadapt.triton_kernels, compiled for an
NVIDIA target without a GPU (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas).

    python -m benchmarks.compile_report [--arch 90] [--out DIR] [--workers 2] [--smoke | --exhaustive]
                                        [--only TEXT] [--ptx-only]

The interpreter (TRITON_INTERPRET=1, how the tests run on CPU) never lowers a kernel, so it misses
what only the compiler sees: illegal constructs, tl.dot shape/dtype rules, shared-memory overflow,
register pressure.  This script lowers each kernel exactly as the JIT would for a launch on the
target: the launcher's arguments at the standard shape (N = 8192 rows, d = 4096 features) go
through Triton's own binder (``create_function_from_signature``: int 1 -> constexpr, multiples of
16 -> tt.divisibility, pointers 16-byte aligned), then

    triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                   options=backend.parse_options({"num_warps": ..., "num_stages": ...}).__dict__)

with ``knobs.nvidia.dump_ptxas_log`` on, so registers and spill bytes are read from ptxas -v.

Kernels are discovered from the modules (every JITFunction named ``*_kernel``); each needs an
entry in ``VARIANT_TABLES`` that mirrors what its launcher passes (tiles, warps, flags, dtypes),
built from the launchers' own helpers where they exist so the table follows their heuristics.  A
kernel without an entry, an entry whose kernel is gone, or an entry whose arguments no longer bind
to the kernel's parameters is a ``stale-table`` row; a lowering or ptxas failure a
``compile-error`` row.  Writes ``sm<arch>_<date>.json`` (header + rows) and ``.md``; exit status 1
if any row is not ok.  CPU cost: ~7 CPU-minutes by default (4 minutes wall with 2 workers on a
busy 2-core machine), dominated by the b = 64 / 128 Cayley tiles; ``--smoke`` takes ~15 s.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import json
import os
import pkgutil
import platform
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Callable

ROWS, FEATURES = 8192, 4096          # the GPU standard shape (benchmarks/gpu_suite.sh)
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
HALF_DTYPES = ("float16", "bfloat16")
KERNEL_PACKAGE = "fastadapt.triton_kernels"
# Shared memory one block may use (opt-in maximum, bytes): Triton raises OutOfResources at load time
# above it, which ptxas does not check (the kernel's shared memory is dynamic).
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


@dataclass(frozen=True)
class Variant:
    """One specialisation of a kernel: ``build(dtype)`` returns the launcher's (args, kwargs) with
    MockTensor stand-ins for tensors; kwargs hold the constexprs and num_warps / num_stages."""
    name: str
    build: Callable
    dtypes: tuple = FLOAT_DTYPES
    exhaustive_dtypes: tuple = ()    # compiled only with --exhaustive (slow, and the same code as a default dtype)


def _tensor(dtype):
    import torch
    from triton.runtime.jit import MockTensor
    return MockTensor(getattr(torch, dtype))


def _cayley_variants():
    from fastadapt.triton_kernels import cayley as C
    out = {"_cayley_fwd_kernel": [], "_cayley_bwd_kernel": [], "_block_rotate_fwd_kernel": [],
           "_block_rotate_bwd_weight_kernel": [], "_svd_core_fwd_kernel": []}

    def fwd(b, terms, solver):
        BLOCK = C._block_width(b)

        def build(dtype):
            args = (_tensor(dtype), _tensor(dtype), b, b * (b - 1) // 2, b * b)
            return args, dict(BLOCK=BLOCK, NEUMANN_TERMS=terms, NEUMANN_TOP=max(3, terms - 1),
                              SOLVER=C.EXACT_SOLVERS[solver], NS_MAX_ITERS=C.NS_MAX_ITERS, NS_TOL=C.NS_TOL,
                              num_warps=C._tile_warps(BLOCK))
        return build

    def bwd(b, terms):
        BLOCK = C._block_width(b)

        def build(dtype):
            src_stride = b * b if terms == 0 else b * (b - 1) // 2     # R (exact) or packed (Neumann)
            args = (_tensor(dtype), _tensor(dtype), _tensor(dtype), b, src_stride, b * b, b, 1, b * (b - 1) // 2)
            return args, dict(BLOCK=BLOCK, NEUMANN_TERMS=terms, NEUMANN_TOP=max(3, terms - 1),
                              num_warps=C._tile_warps(BLOCK))
        return build

    def rotate(b, transposed):
        BLOCK = C._block_width(b)

        def build(dtype):
            r_strides = (b * b, 1, b) if transposed else (b * b, b, 1)   # dx runs on R^T (a view)
            args = (_tensor(dtype), _tensor(dtype), _tensor(dtype), ROWS, b, FEATURES, 1, *r_strides, FEATURES)
            return args, dict(BLOCK_M=16 if BLOCK >= 128 else 64, BLOCK=BLOCK, IEEE=dtype == "float32")
        return build

    def rotate_weight(b):
        BLOCK = C._block_width(b)
        BLOCK_M = 16 if BLOCK >= 128 else 32
        n = FEATURES // b

        def build(dtype):
            import triton
            splits = max(1, min(triton.cdiv(ROWS, 4 * BLOCK_M), triton.cdiv(256, n)))
            rows_per_split = triton.cdiv(triton.cdiv(ROWS, splits), BLOCK_M) * BLOCK_M
            args = (_tensor(dtype), _tensor(dtype), _tensor("float32"), ROWS, b, rows_per_split,
                    FEATURES, 1, FEATURES, 1, n * b * b, b * b)
            return args, dict(BLOCK_M=BLOCK_M, BLOCK=BLOCK, IEEE=dtype == "float32", num_warps=C._tile_warps(BLOCK))
        return build

    def svd_core(r):
        def build(dtype):
            args = (*(_tensor(dtype) for _ in range(5)), ROWS, FEATURES, r, FEATURES, 1, FEATURES, 1, r, 1, r)
            return args, dict(IEEE=dtype == "float32", **C.svd_core_tiles(r))
        return build

    # The tile kernels compute in fp32 whatever the parameter dtype (it only changes the load and
    # store conversions), and the (B, B) fp32 IEEE tl.dot at B = 64 / 128 unrolls into ~16k FMA per
    # thread per dot: 10-60 s of ptxas each.  So half dtypes at b <= 32 by default, all with --exhaustive.
    for b in (16, 32, 64, 128):
        dtypes, extra = (FLOAT_DTYPES, ()) if b <= 32 else (("float32",), HALF_DTYPES)
        for solver in C.EXACT_SOLVERS:
            out["_cayley_fwd_kernel"].append(Variant(f"b={b} exact {solver}", fwd(b, 0, solver), dtypes, extra))
        out["_cayley_fwd_kernel"].append(Variant(f"b={b} neumann 5", fwd(b, 5, C.DEFAULT_EXACT_SOLVER), dtypes, extra))
        out["_cayley_bwd_kernel"].append(Variant(f"b={b} exact", bwd(b, 0), dtypes, extra))
        out["_cayley_bwd_kernel"].append(Variant(f"b={b} neumann 5 (closed form)", bwd(b, 5), dtypes, extra))
        horner = (dtypes, extra) if b <= 64 else ((), FLOAT_DTYPES)   # PEFT's default is 5 terms
        out["_cayley_bwd_kernel"].append(Variant(f"b={b} neumann 7 (Horner)", bwd(b, 7), *horner))
    for b in (32, 128):
        out["_block_rotate_fwd_kernel"].append(Variant(f"b={b} y = x R", rotate(b, False)))
        out["_block_rotate_fwd_kernel"].append(Variant(f"b={b} dx = dy R^T", rotate(b, True)))
        out["_block_rotate_bwd_weight_kernel"].append(Variant(f"b={b} dR", rotate_weight(b)))
    for r in (32, 128):
        out["_svd_core_fwd_kernel"].append(Variant(f"r={r}", svd_core(r)))
    return out


def _dora_variants():
    from fastadapt.triton_kernels import _tiles as T
    from fastadapt.triton_kernels import dropout as P
    from fastadapt.triton_kernels import lowrank_gemm as L
    out = {"_dora_norm_fwd_kernel": [], "_scaled_lowrank_gemm_kernel": [], "_float32_matmul_kernel": [],
           "_seeded_dropout_kernel": [],
           "_dropout_mask_add_kernel": [], "_dora_dy_row_pass_kernel": []}
    seed = seed_value = 0x5DEECE66D * 4099          # an int64 seed, as draw_dropout_seed gives

    def norm(r, has_wsq):
        def build(dtype):
            f = _tensor
            args = (f(dtype), f(dtype), f(dtype), f("float32"), f("float32"), f("float32"), FEATURES, FEATURES, r,
                    FEATURES, 1, FEATURES, 1, r, 1, 2.0, 1e-12)
            return args, dict(HAS_WSQ=has_wsq, DOT_PRECISION="ieee" if dtype == "float32" else "tf32",
                              BLOCK_M=64, BLOCK_K=64, BLOCK_R=T.block_r(r))
        return build

    def gemm(config, mode, r=16):
        def build(dtype):
            f = _tensor
            mixed = mode == "forward mixed"    # PEFT's float32 adapter on a half base, with dropout
            lowrank = "float32" if mixed else dtype
            if mode == "dx":   # dx = dY (g o W) + v A: X = dY (N, out), Y = W (out, in), U = v (N, r), V = A (r, in)
                strides = (FEATURES, 1, FEATURES, 1, r, 1, FEATURES, 1, FEATURES, 1)
                scales = (f("float32"), f(dtype), f(dtype))
                flags = dict(HAS_SK=True, HAS_SO=False, HAS_BIAS=False, HAS_PRE=False, HAS_RES=False)
            else:    # y = g o (x W^T + u (sB)^T) + b and y_pre: Y = W^T and V = (sB)^T are views
                strides = (FEATURES, 1, 1, FEATURES, r, 1, 1, r, FEATURES, 1)
                scales = (f(dtype), f("float32"), f(dtype))
                flags = dict(HAS_SK=False, HAS_SO=True, HAS_BIAS=not mixed, HAS_PRE=True, HAS_RES=mixed)
            args = (f(dtype), f(dtype), f(lowrank), f(lowrank), *scales, f(dtype), f(dtype), f(dtype),
                    ROWS, FEATURES, FEATURES, r, *strides)
            return args, dict(**flags, ROUND_BASE=mixed, BIAS_IN_BASE=False, IEEE=dtype == "float32",
                              LOWRANK_IEEE=lowrank == "float32", BLOCK_R=T.block_r(r), **config.kwargs,
                              num_warps=config.num_warps, num_stages=config.num_stages)
        return build

    def float32_matmul(product, masked):
        # float32_matmul's CUDA tiles: the skinny side padded (_block_r), 64 elsewhere, BLOCK_K 16
        def build(dtype):
            import triton
            f = _tensor
            if product == "u":    # u = x A^T: a = x (N, in), b = A^T (in, r) a view of the float32 A
                m, n, k, strides, a, b = ROWS, 16, FEATURES, (FEATURES, 1, 1, FEATURES), f(dtype), f("float32")
            else:                 # dA = v^T x: a = v^T (r, N) a view of the float32 v, b = x (N, in)
                m, n, k, strides, a, b = 16, FEATURES, ROWS, (1, 16, FEATURES, 1), f("float32"), f(dtype)
            block_m, block_n, block_k = (T.block_r(m) if m <= 64 else 64), (T.block_r(n) if n <= 64 else 64), 16
            tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
            split_k = max(1, min(triton.cdiv(k, 512), triton.cdiv(256, tiles)))
            k_per_split = max(1, triton.cdiv(triton.cdiv(k, split_k), block_k)) * block_k
            seed, p = (seed_value, 0.1) if masked else (0, 0.5)
            args = (a, b, f("float32"), m, n, k, k_per_split, *strides, seed, p, 1 / (1 - p))
            return args, dict(DROPOUT_A=masked == "a", DROPOUT_B=masked == "b",
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
        return build

    def dropout(d, with_rest):
        grid, block_m, block_d = P._elementwise_grid(ROWS, d)

        def build(dtype):
            args = (_tensor(dtype), _tensor(dtype), _tensor(dtype), ROWS, d, d, 1, seed, 0.1, 1 / 0.9)
            return args, dict(HAS_REST=with_rest, BLOCK_M=block_m, BLOCK_D=block_d)
        return build

    def mask_add(d):
        grid, block_m, block_d = P._elementwise_grid(ROWS, d)

        def build(dtype):
            args = (_tensor(dtype), _tensor(dtype), ROWS, d, d, 1, d, 1, seed, 0.1, 1 / 0.9)
            return args, dict(BLOCK_M=block_m, BLOCK_D=block_d)
        return build

    def row_pass(r, mixed):
        def build(dtype):
            f = _tensor
            compute = "float32" if mixed else dtype     # u, b_scaled, v: float32 adapter on a half dY
            args = (f(dtype), f(compute), f(compute), f(dtype), f(compute), f("float32"), f("float32"),
                    ROWS, FEATURES, r, FEATURES, 1, r, 1, r, 1, FEATURES, 1)
            return args, dict(IEEE=compute == "float32", UPCAST=compute != dtype, BLOCK_N=128, BLOCK_O=32,
                              BLOCK_R=T.block_r(r), num_warps=8)
        return build

    for r in (16, 128):
        for has_wsq in (False, True):
            out["_dora_norm_fwd_kernel"].append(Variant(f"r={r} {'cached' if has_wsq else 'computed'} W row norms",
                                                        norm(r, has_wsq)))
    for config in L._GEMM_CONFIGS:
        tile = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        shape = f"{tile} w{config.num_warps} s{config.num_stages}"
        for mode in ("forward", "dx"):
            out["_scaled_lowrank_gemm_kernel"].append(Variant(f"{mode} {shape} r=16", gemm(config, mode)))
        out["_scaled_lowrank_gemm_kernel"].append(Variant(f"forward mixed {shape} r=16 (fp32 u, v; residual, round_base)",
                                                          gemm(config, "forward mixed"), HALF_DTYPES))
    out["_float32_matmul_kernel"].append(Variant("u = x A^T (r=16, A float32)", float32_matmul("u", None)))
    out["_float32_matmul_kernel"].append(Variant("u = (mask o x) A^T (r=16)", float32_matmul("u", "a")))
    out["_float32_matmul_kernel"].append(Variant("dA = v^T (mask o x) (r=16, v float32)", float32_matmul("dA", "b")))
    for d in (FEATURES, 100):
        for with_rest in (True, False):
            out["_seeded_dropout_kernel"].append(Variant(f"d={d}{' with rest' if with_rest else ''}",
                                                         dropout(d, with_rest)))
        out["_dropout_mask_add_kernel"].append(Variant(f"d={d}", mask_add(d)))
    for r in (16, 64):
        out["_dora_dy_row_pass_kernel"].append(Variant(f"r={r} 128x32 w8", row_pass(r, False)))
    out["_dora_dy_row_pass_kernel"].append(Variant("r=16 128x32 w8 mixed (fp32 u, b_s)", row_pass(16, True),
                                                   HALF_DTYPES))
    return out


def _subset(table, *kernels):
    return lambda: {k: v for k, v in table().items() if k in kernels}


VARIANT_TABLES = {
    f"{KERNEL_PACKAGE}.cayley": _cayley_variants,
    f"{KERNEL_PACKAGE}.dora_norm": _subset(_dora_variants, "_dora_norm_fwd_kernel", "_dora_dy_row_pass_kernel"),
    f"{KERNEL_PACKAGE}.dropout": _subset(_dora_variants, "_seeded_dropout_kernel", "_dropout_mask_add_kernel"),
    f"{KERNEL_PACKAGE}.lowrank_gemm": _subset(_dora_variants, "_scaled_lowrank_gemm_kernel", "_float32_matmul_kernel"),
}


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


def variants_for(module: str) -> dict[str, list[Variant]]:
    table = VARIANT_TABLES.get(module)
    return table() if table else {}


def plan(smoke: bool, exhaustive: bool = False) -> list[tuple[str, str, str, str]]:
    """(module, kernel, variant, dtype) jobs; a kernel without a table entry gets one job with variant ''.
    ``smoke``: the first variant of each kernel in float32 and bfloat16 only; ``exhaustive``: every
    variant in every dtype it takes (adds the slow half-precision b = 64 / 128 Cayley tiles)."""
    jobs = []
    for module, kernels in discover_kernels().items():
        table = variants_for(module)
        for kernel in kernels:
            variants = table.get(kernel, [])
            if not variants:
                jobs.append((module, kernel, "", ""))
            for variant in variants[:1] if smoke else variants:
                dtypes = variant.dtypes + (variant.exhaustive_dtypes if exhaustive else ())
                if smoke:
                    dtypes = [t for t in dtypes if t in ("float32", "bfloat16")]
                jobs.extend((module, kernel, variant.name, dtype) for dtype in dtypes)
        jobs.extend((module, gone, "", "") for gone in table if gone not in kernels)
    return jobs


_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


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


def compile_one(job: tuple[str, str, str, str], arch: int, to_cubin: bool = True) -> dict:
    """Lower one (module, kernel, variant, dtype) for sm_<arch>; a dict row, never raises."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    module_name, kernel_name, variant_name, dtype = job
    row = dict(kernel=kernel_name, module=module_name.rsplit(".", 1)[-1], variant=variant_name, dtype=dtype,
               status="compile-error", error="", error_detail="", registers=None, spill_store_bytes=None,
               spill_load_bytes=None, stack_frame_bytes=None, shared_bytes=None, num_warps=None,
               num_stages=None, compile_s=None, stage="cubin" if to_cubin else "ptx")
    module = importlib.import_module(module_name)
    if not variant_name:
        row["status"] = "stale-table"
        row["error"] = ("no specialisation: add the launcher's arguments to VARIANT_TABLES in "
                        "benchmarks/compile_report.py" if hasattr(module, kernel_name) else
                        "VARIANT_TABLES names a kernel the module no longer defines")
        return row
    kernel = getattr(module, kernel_name)
    if type(kernel).__name__ != "JITFunction":
        row["error"] = f"{kernel_name} is a {type(kernel).__name__}: unset TRITON_INTERPRET before importing triton"
        return row
    variant = next(v for v in variants_for(module_name)[kernel_name] if v.name == variant_name)
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
        row["error"] += " (update VARIANT_TABLES in benchmarks/compile_report.py to the launcher's call)"
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
        asm[stage] = module
    return _PTXKernel(SimpleNamespace(**metadata), asm)


def _progress(done: int, total: int, row: dict) -> None:
    detail = f"{row['registers']} regs" if row["status"] == "ok" else row["status"]
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


def _header(arch: int, argv: list[str], wall_s: float, to_cubin: bool) -> dict:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch)
    return dict(triton_version=triton.__version__, target=f"cuda sm_{arch} (GPUTarget('cuda', {arch}, 32))",
                ptxas=f"{os.path.basename(ptxas.path)} {ptxas.version}" if to_cubin else "not run (PTX only)",
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="python -m benchmarks.compile_report " + " ".join(argv),
                fp_fusion=os.environ["TRITON_DEFAULT_FP_FUSION"],
                host=f"{platform.machine()} {os.cpu_count()} CPUs, no GPU needed", wall_s=round(wall_s, 1),
                standard_shape=f"N={ROWS} rows, d={FEATURES} features")


def _markdown(header: dict, rows: list[dict]) -> str:
    failed = [r for r in rows if r["status"] != "ok"]
    spilling = [r for r in rows if r["spill_store_bytes"] or r["spill_load_bytes"]]
    lines = [f"# Triton ahead-of-time compile report ({header['target']})", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += [f"- rows: {len(rows)}, compiled: {len(rows) - len(failed)}, failed: {len(failed)}, "
              f"spilling: {len(spilling)}", "",
              "Registers per thread, spill store / load bytes and stack frame (local memory per thread) from "
              "ptxas -v; shared = Triton's shared memory per program (bytes); s = compile seconds (whole "
              "pipeline, one process on a shared CPU core).", "",
              "| kernel | variant | dtype | status | regs | spill st/ld B | stack B | shared B | warps | stages | s |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(value):
        return "" if value is None else str(value).replace("|", "/")
    for r in rows:
        status = "ok" if r["status"] == "ok" else f"**{r['status']}**: {cell(r['error'])[:200]}"
        spill = "" if r["spill_store_bytes"] is None else f"{r['spill_store_bytes']}/{r['spill_load_bytes']}"
        if r["spill_store_bytes"] or r["spill_load_bytes"]:
            spill = f"**{spill}**"
        lines.append(f"| {r['kernel']} | {cell(r['variant'])} | {r['dtype']} | {status} | {cell(r['registers'])} | {spill} "
                     f"| {cell(r['stack_frame_bytes'])} | {cell(r['shared_bytes'])} | {cell(r['num_warps'])} | {cell(r['num_stages'])} "
                     f"| {cell(r['compile_s'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_report", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    parser.add_argument("--out", default="benchmarks/results/compile", help="folder for the .json and .md")
    parser.add_argument("--workers", type=int, default=2, help="compile processes (spawned)")
    parser.add_argument("--smoke", action="store_true", help="first variant per kernel, float32 and bfloat16 only")
    parser.add_argument("--exhaustive", action="store_true",
                        help="also half dtypes of the b = 64 / 128 Cayley tiles (~15 CPU-minutes more)")
    parser.add_argument("--only", default="", help="compile only variants whose 'kernel variant dtype' contains this")
    parser.add_argument("--ptx-only", action="store_true", help="stop at PTX (no ptxas: no registers or spills)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: the interpreter replaces @triton.jit kernels; unset it")
    # Triton 3.9 fuses a * b + c into FMA unless told otherwise (and warns that 3.10 will not); state it
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    start = time.perf_counter()
    jobs = [job for job in plan(args.smoke, args.exhaustive) if args.only in " ".join(job[1:])]
    rows = _run(jobs, args.arch, args.workers, not args.ptx_only)
    header = _header(args.arch, argv, time.perf_counter() - start, not args.ptx_only)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"sm{args.arch}_{datetime.date.today():%Y%m%d}{'_smoke' if args.smoke else ''}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(header=header, rows=rows), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(_markdown(header, rows))
    failed = [r for r in rows if r["status"] != "ok"]
    spilling = [r for r in rows if r["spill_store_bytes"] or r["spill_load_bytes"]]
    print(f"{len(rows)} compiles in {header['wall_s']} s: {len(failed)} failed, {len(spilling)} spill -> {stem}.md")
    for r in failed:
        print(f"  {r['status'].upper()} {r['kernel']} [{r['variant']}, {r['dtype']}]: {r['error']}")
    for r in spilling:
        print(f"  SPILLS {r['kernel']} [{r['variant']}, {r['dtype']}]: {r['spill_store_bytes']} B stores, "
              f"{r['spill_load_bytes']} B loads ({r['registers']} registers)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
