"""Roofline predictions for the GPU standard shapes, and the H200's limits in one place.

    python -m benchmarks.roofline [--out benchmarks/results/compile]

No GPU is needed: each benchmark case's fused path is written down as the launches it makes in
one forward + backward (``Step``: HBM bytes read + written, each operand once; FLOPs on tensor
cores; FLOPs on CUDA cores, i.e. IEEE fp32 ``tl.dot`` or cuBLAS fp32 without TF32), and each
launch costs

    t = max(tensor_flops / tensor_rate + fp32_flops / fp32_rate,  bytes / bandwidth,  latency)  + launch gap

(the two compute pipes counted one after the other: a bound, not an overlap model; a launch of
fewer programs than SMs gets that fraction of the compute rates; ``latency`` is a stated floor for
launches made of dependent steps, e.g. the Cayley elimination's b pivots).  Two rates:
``floor`` uses the datasheet peaks and no launch gap; ``predicted`` uses the achievable fractions
of ``ACHIEVABLE`` and a per-launch gap (assumptions, stated there).  The frozen base is the
benchmark's denominator: a frozen nn.Linear with x requiring grad runs 2 GEMMs of 2 N d_in d_out
FLOPs (y = x W^T; dx = dY W; no dW), and the ratio is method time / base time at the same rates.

Convention (a family adds files, edits no list): ``benchmarks/compile_<module>.py`` of a kernel
module ``fastadapt/triton_kernels/<module>.py`` may define ``roofline(shape: Shape) -> list[Method]``
(one Method per benchmark case of its family).  ``methods()`` finds them by that name through
``benchmarks.compile_report.variant_modules()``.  Results: ``roofline_h200_<date>.json`` / ``.md``
beside the compile report (``python -m benchmarks.compile_report`` writes them too).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GPU:
    """Per-device limits used by the occupancy columns of the compile report and by the roofline."""
    name: str
    sms: int
    regs_per_sm: int              # 32-bit registers
    max_regs_per_thread: int
    reg_alloc_unit: int           # registers, allocated per warp in units of this many
    smem_per_sm: int              # bytes
    smem_per_block_max: int       # bytes, opt-in maximum for one block (Triton opts in)
    smem_reserved_per_block: int  # bytes the driver reserves per resident block
    max_warps_per_sm: int
    max_blocks_per_sm: int
    hbm_bytes_per_s: float
    bf16_tensor_flops: float      # dense, fp16 / bf16 inputs, fp32 accumulation
    tf32_tensor_flops: float      # dense
    fp32_flops: float             # CUDA cores (FFMA = 2 FLOPs)
    launch_gap_s: float           # assumed idle time between two dependent kernels
    sources: tuple = ()


H200 = GPU(
    name="NVIDIA H200 SXM (sm_90)", sms=132, regs_per_sm=65536, max_regs_per_thread=255, reg_alloc_unit=256,
    smem_per_sm=228 * 1024, smem_per_block_max=227 * 1024, smem_reserved_per_block=1024,
    max_warps_per_sm=64, max_blocks_per_sm=32,
    hbm_bytes_per_s=4.8e12, bf16_tensor_flops=989e12, tf32_tensor_flops=494e12, fp32_flops=67e12,
    launch_gap_s=3e-6,
    sources=(
        "NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): HBM3e 4.8 TB/s; FP32 67 TFLOPS; "
        "TF32 / BF16 tensor 989 / 1,979 TFLOPS *with sparsity*, so dense 494 / 989 TFLOPS",
        "H200 SXM is the GH100 configuration of H100 SXM5: 132 SMs (NVIDIA H100 Tensor Core GPU "
        "Architecture whitepaper)",
        "CUDA C++ Programming Guide, 'Technical Specifications per Compute Capability', cc 9.0: 64 K "
        "32-bit registers per SM, 255 per thread, 64 resident warps and 32 resident blocks per SM, "
        "228 KB shared memory per SM, 227 KB per block (opt-in), 1 KB reserved per block; register "
        "allocation unit 256 per warp (CUDA occupancy calculator)",
        "launch_gap_s: an assumption (kernel drain + ramp between dependent launches, ~2-5 us on "
        "Hopper), not a datasheet number",
    ))


@dataclass(frozen=True)
class Achievable:
    """Fractions of the peaks a tuned kernel reaches: assumptions, to be replaced by GPU measurement."""
    tensor: float = 0.75   # cuBLAS bf16 GEMMs at d = 4096: ~700-750 TFLOP/s on H100/H200 SXM
    hbm: float = 0.85      # streaming kernels: ~4.1 TB/s of 4.8
    fp32: float = 0.5      # IEEE fp32 tl.dot on CUDA cores: operands from shared memory, address math
    note: str = ("assumed, not measured: tensor 0.75 of the bf16 peak (typical cuBLAS at these sizes), "
                 "HBM 0.85 of 4.8 TB/s, FFMA 0.5 of 67 TFLOP/s, plus launch_gap_s per launch")


ACHIEVABLE = Achievable()
PEAK = Achievable(tensor=1.0, hbm=1.0, fp32=1.0, note="datasheet peaks, no launch gap")


@dataclass(frozen=True)
class Shape:
    """A benchmark shape: n tokens, d_in -> d_out, activations and W of ``elem`` bytes (bf16: 2)."""
    name: str
    n: int
    d_in: int
    d_out: int
    elem: int = 2


# DESIGN section 6: GPU bf16 d = 4096, N = 8192; also 4096 <-> 11008 (an MLP's up / down projection).
SHAPES = (Shape("d=4096", 8192, 4096, 4096), Shape("4096->11008", 8192, 4096, 11008),
          Shape("11008->4096", 8192, 11008, 4096))
MiB = 2 ** 20


@dataclass(frozen=True)
class Step:
    """One launch (or a few identical ones) of a fused path."""
    what: str
    bytes: float = 0.0             # HBM read + write, each operand once
    tensor_flops: float = 0.0
    fp32_flops: float = 0.0
    kernel: str = ""               # the Triton kernel (a compile-report row); "" = torch / cuBLAS
    launches: int = 1
    programs: int = 0              # programs launched when fewer than the SMs (compute rates scale down)
    latency_s: float = 0.0         # a floor from dependent steps inside the launch (e.g. a pivot loop)


@dataclass(frozen=True)
class Method:
    """One benchmark case's path at one shape: ``steps`` is the whole forward + backward."""
    name: str
    case: str                      # the benchmark case (benchmarks/cases_*.py) the GPU run will time
    steps: tuple
    target: float | None = None    # DESIGN section 7 GPU bf16 target (adapted / frozen base)
    note: str = ""


def small(what: str, launches: int, nbytes: float = 0.0) -> Step:
    """Tiny torch launches (parameter-sized elementwise ops, reductions, casts): launch gaps only."""
    return Step(what, bytes=nbytes, launches=launches)


def gemm(what: str, m: int, n: int, k: int, *, a: int = 2, b: int = 2, c: int = 2, fp32: bool = False,
         kernel: str = "", extra_bytes: float = 0.0) -> Step:
    """C (m, n) = A (m, k) B (k, n): operands of a, b, c bytes per element, each moved once."""
    flops = 2.0 * m * n * k
    return Step(what, bytes=m * k * a + k * n * b + m * n * c + extra_bytes,
                tensor_flops=0.0 if fp32 else flops, fp32_flops=flops if fp32 else 0.0, kernel=kernel)


def base_steps(shape: Shape) -> tuple:
    """The frozen base with x requiring grad: y = x W^T and dx = dY W (bf16 GEMMs, cuBLAS)."""
    s = shape
    return (gemm("base y = x W^T", s.n, s.d_out, s.d_in, c=s.elem),
            gemm("base dx = dY W", s.n, s.d_in, s.d_out, c=s.elem))


def step_time(step: Step, gpu: GPU = H200, rates: Achievable = ACHIEVABLE) -> tuple[float, str]:
    """(seconds, bound) of one step: bound is "tensor", "fp32" or "memory"."""
    fill = min(1.0, step.programs / gpu.sms) if step.programs else 1.0
    tensor = step.tensor_flops / (gpu.bf16_tensor_flops * rates.tensor * fill)
    fp32 = step.fp32_flops / (gpu.fp32_flops * rates.fp32 * fill)
    memory = step.bytes / (gpu.hbm_bytes_per_s * rates.hbm)
    latency = 0.0 if rates is PEAK else step.latency_s
    gap = 0.0 if rates is PEAK else step.launches * gpu.launch_gap_s
    bound, longest = max((("memory", memory), ("latency", latency), ("tensor" if tensor >= fp32 else "fp32",
                                                                      tensor + fp32)), key=lambda item: item[1])
    return longest + gap, bound


def path_time(steps, gpu: GPU = H200, rates: Achievable = ACHIEVABLE) -> float:
    return sum(step_time(s, gpu, rates)[0] for s in steps)


def predict(method: Method, shape: Shape, gpu: GPU = H200) -> dict:
    """A result row: floor and predicted times and ratios to the base, extra traffic, FFMA share."""
    base = base_steps(shape)
    row = dict(method=method.name, case=method.case, shape=shape.name, target=method.target, note=method.note)
    for label, rates in (("floor", PEAK), ("predicted", ACHIEVABLE)):
        t_base, t = path_time(base, gpu, rates), path_time(method.steps, gpu, rates)
        row[f"{label}_base_ms"] = round(t_base * 1e3, 4)
        row[f"{label}_ms"] = round(t * 1e3, 4)
        row[f"{label}_ratio"] = round(t / t_base, 3)
    row["bytes_MiB"] = round(sum(s.bytes for s in method.steps) / MiB, 1)
    row["extra_bytes_MiB"] = round((sum(s.bytes for s in method.steps) - sum(s.bytes for s in base)) / MiB, 1)
    row["tensor_GFLOP"] = round(sum(s.tensor_flops for s in method.steps) / 1e9, 2)
    row["fp32_GFLOP"] = round(sum(s.fp32_flops for s in method.steps) / 1e9, 3)
    fp32_steps = [s for s in method.steps if step_time(s)[1] == "fp32"]
    row["fp32_bound_ms"] = round(sum(step_time(s)[0] for s in fp32_steps) * 1e3, 4)
    row["launches"] = sum(s.launches for s in method.steps)
    if method.target is not None:
        row["verdict"] = "meets" if row["predicted_ratio"] <= method.target else "misses"
    row["steps"] = [dict(asdict(s), time_us=round(step_time(s)[0] * 1e6, 2), bound=step_time(s)[1])
                    for s in method.steps]
    return row


# --------------------------------------------------------------------------------------------
# discovery and output

def methods(shape: Shape) -> tuple[list[Method], dict[str, str]]:
    """Every family's Methods at ``shape`` (``roofline(shape)`` of each benchmarks/compile_<module>.py),
    and module -> error for a roofline that raises."""
    from benchmarks.compile_report import variant_modules
    found, errors = [], {}
    for module_name in variant_modules().values():
        if module_name is None:
            continue
        try:
            module = importlib.import_module(module_name)
            if hasattr(module, "roofline"):
                found += list(module.roofline(shape))
        except Exception as error:  # noqa: BLE001 -- one family's model must not hide the others
            errors[module_name] = f"{type(error).__name__}: {error}"
    return found, errors


def rows(gpu: GPU = H200) -> tuple[list[dict], dict[str, str]]:
    out, errors = [], {}
    for shape in SHAPES:
        found, failed = methods(shape)
        errors.update(failed)
        out += [predict(m, shape, gpu) for m in found]
    return out, errors


def header(gpu: GPU = H200) -> dict:
    return dict(gpu=asdict(gpu), achievable=asdict(ACHIEVABLE), shapes=[asdict(s) for s in SHAPES],
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                base="frozen nn.Linear, x requires grad: 2 bf16 GEMMs (y = x W^T, dx = dY W), 4 N d_in d_out FLOPs")


def markdown(head: dict, result: list[dict], errors: dict[str, str]) -> str:
    gpu, ach = head["gpu"], head["achievable"]
    lines = ["# Roofline predictions, GPU standard shapes (bf16, N = 8192)", "",
             f"- date: {head['date']}; device model: {gpu['name']}, {gpu['sms']} SMs, "
             f"{gpu['hbm_bytes_per_s'] / 1e12:.1f} TB/s, bf16 tensor {gpu['bf16_tensor_flops'] / 1e12:.0f} TFLOP/s "
             f"dense, fp32 (FFMA) {gpu['fp32_flops'] / 1e12:.0f} TFLOP/s",
             *[f"- source: {s}" for s in gpu["sources"]],
             f"- base: {head['base']}",
             f"- floor = datasheet peaks, no launch gaps; predicted = {ach['note']}",
             "- per launch: max(tensor / rate + fp32 / rate, bytes / bandwidth, latency) + gap; compute rates "
             "scaled by programs / SMs for launches smaller than the GPU; bytes = HBM traffic with each operand "
             "read or written once (L2 reuse inside a launch assumed, none across launches)",
             "- fp32 ms = time of launches bound by CUDA-core fp32 (IEEE fp32 dots, cuBLAS fp32 without TF32)",
             ""]
    if errors:
        lines += [f"- **roofline error** {m}: {e}" for m, e in errors.items()] + [""]
    lines += ["| method | case | shape | floor | predicted | GPU target | verdict | base ms | method ms | "
              "extra MiB | fp32 GFLOP | fp32-bound ms | launches |",
              "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result:
        target = "" if r["target"] is None else f"<= {r['target']}"
        lines.append(f"| {r['method']} | {r['case']} | {r['shape']} | {r['floor_ratio']:.3f} | "
                     f"**{r['predicted_ratio']:.3f}** | {target} | {r.get('verdict', '')} | "
                     f"{r['predicted_base_ms']:.3f} | {r['predicted_ms']:.3f} | {r['extra_bytes_MiB']:.0f} | "
                     f"{r['fp32_GFLOP']:.2f} | {r['fp32_bound_ms']:.3f} | {r['launches']} |")
    notes = {(r["method"], r["note"]) for r in result if r["note"]}
    if notes:
        lines += ["", "Notes:", ""] + [f"- {m}: {n}" for m, n in sorted(notes)]
    lines += ["", f"## Launches per method at {SHAPES[0].name} (predicted rates)", ""]
    for r in (r for r in result if r["shape"] == SHAPES[0].name):
        lines += [f"### {r['method']} ({r['case']}): {r['predicted_ratio']:.3f} x base", "",
                  "| step | kernel | MiB | tensor GFLOP | fp32 GFLOP | us | bound |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for s in r["steps"]:
            launches = f" (x{s['launches']})" if s["launches"] > 1 else ""
            lines.append(f"| {s['what']}{launches} | {s['kernel']} | {s['bytes'] / MiB:.1f} | "
                         f"{s['tensor_flops'] / 1e9:.2f} | {s['fp32_flops'] / 1e9:.3f} | {s['time_us']:.1f} "
                         f"| {s['bound']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def write(out_dir: str, gpu: GPU = H200) -> tuple[str, list[dict], dict[str, str]]:
    """Write roofline_<gpu>_<date>.json / .md into ``out_dir``; returns (stem, rows, errors)."""
    result, errors = rows(gpu)
    head = header(gpu)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"roofline_h200_{datetime.date.today():%Y%m%d}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(header=head, errors=errors, rows=result), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(head, result, errors))
    return stem, result, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/compile", help="folder for the .json and .md")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    stem, result, errors = write(args.out)
    for r in result:
        if r["shape"] == SHAPES[0].name:
            target = "" if r["target"] is None else f" (target <= {r['target']}: {r['verdict']})"
            print(f"{r['method']:<58} floor {r['floor_ratio']:.3f}  predicted {r['predicted_ratio']:.3f}{target}")
    for module, error in errors.items():
        print(f"ROOFLINE ERROR {module}: {error}")
    print(f"-> {stem}.md")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
