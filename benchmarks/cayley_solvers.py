"""Packed skew -> Cayley rotation R: exact solvers against the 5-term Neumann series, by measurement.

    python -m benchmarks.cayley_solvers --device cuda|cpu [--iters 50] [--threads T] [--out results.json]

Shapes: block size b in {16, 32, 64, 128}, n = 4096 / b blocks on CUDA (one d = 4096 layer),
n = 1024 / b on CPU (the CPU standard d = 1024), fp32 parameters.  Two regimes of |Q|:
  small  entries ~ 0.5 / b (the OFT benchmark cases; ||Q||_2 ~ 1 / sqrt(b), a trained adapter);
  large  entries ~ 1 (||Q||_2 ~ 2 sqrt(b): Neumann diverges, Newton-Schulz needs ~14 steps at b=128).
Modes:
  CUDA (fastadapt.triton_kernels.cayley, one launch for all blocks): ``elimination`` (in-kernel
    Gauss-Jordan, the default), ``newton_schulz`` (matmul-only iteration), ``neumann5`` (PEFT's
    series), and the backward launches ``bwd exact`` / ``bwd neumann5`` (dL/dR -> dL/dpacked);
    ``torch inv`` (batched torch.linalg.inv_ex, the torch path) for scale.
  CPU (torch, what fastadapt.ops runs there): ``torch inv`` (batched inv_ex, as ops.cayley),
    ``torch solve`` (linalg.solve(I - Q, I + Q, left=False), as the reference / PEFT),
    ``torch newton_schulz`` (the kernel's iteration in bmm, same step count) and ``torch neumann5``
    (fastadapt.ops.cayley_maps.NeumannSeries: two b x b products).
On CUDA it also checks that an OFT training step on the triton path never waits for the device
(sync_check).  Every row: median time per call (all n blocks), the relative error of R against float64 (a solve;
for Neumann rows the float64 series, so it measures the arithmetic, not the truncation) and the
orthogonality error max_i ||R_i^T R_i - I||_F (which shows the truncation).  Newton-Schulz rows also give the step
count (the largest over blocks; see triton_kernels/cayley.py for the bound).  Prints a Markdown
table and writes JSON (rows + machine info) to --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fastadapt.bench.runner import machine_info
from fastadapt.numerics import rel_error
from fastadapt.ops import cayley as ops
from fastadapt.ops.cayley_maps import NeumannSeries
from fastadapt.ops.cayley_monitor import MONITOR
from fastadapt.reference import cayley as ref
from fastadapt.testing import randn

BLOCKS = (16, 32, 64, 128)
REGIMES = {"small": lambda b: 0.5 / b, "large": lambda b: 1.0}


def _lam(Q: torch.Tensor) -> torch.Tensor:
    """Per block min(||Q^2||_1, ||Q||_F^2) >= ||Q||_2^2 (the Newton-Schulz scaling bound)."""
    Q2 = Q @ Q
    return torch.minimum(Q2.abs().sum(-2).amax(-1), Q.square().sum((-2, -1)))


def torch_newton_schulz(Q: torch.Tensor, steps: int) -> torch.Tensor:
    """The kernel's iteration in batched torch: X_0 = alpha (I + Q), X <- 2X - X (A X), A = I - Q."""
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device).expand_as(Q)
    Q2 = Q @ Q
    lam = torch.minimum(Q2.abs().sum(-2).amax(-1), Q.square().sum((-2, -1)))[:, None, None]
    alpha = 2 / (2 + lam)
    X = alpha * (eye + Q)
    AX = alpha * (eye - Q2)
    A = eye - Q
    for step in range(steps):
        X = torch.baddbmm(X, X, AX, beta=2, alpha=-1)
        if step + 1 < steps:
            AX = A @ X
    return 2 * X - eye


def _timed(fn, device: torch.device, iters: int) -> float:
    """Median seconds per call: CUDA events around 10 back-to-back calls, or perf_counter."""
    fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                fn()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop) / 1e3 / 10)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _modes(device: torch.device, packed: torch.Tensor, b: int, steps: int) -> dict:
    """name -> (callable producing R or a packed gradient, is_forward)."""
    eye = torch.eye(b, dtype=packed.dtype, device=device)
    if device.type == "cuda":
        from fastadapt.triton_kernels import cayley as kernels
        grad_R = randn(*packed.shape[:1], b, b, dtype=packed.dtype, device=device, seed=1)
        R = kernels.cayley_forward(packed, b)
        return {
            "elimination": (lambda: kernels.cayley_forward(packed, b, solver="elimination"), True),
            "newton_schulz": (lambda: kernels.cayley_forward(packed, b, solver="newton_schulz"), True),
            "neumann5": (lambda: kernels.cayley_forward(packed, b, 5), True),
            "torch inv": (lambda: 2 * torch.linalg.inv_ex(eye - ops.skew(packed, b))[0] - eye, True),
            "bwd exact": (lambda: kernels.cayley_backward(R, grad_R, b), False),
            "bwd neumann5": (lambda: kernels.cayley_backward(packed, grad_R, b, 5), False),
        }
    return {
        "torch inv": (lambda: 2 * torch.linalg.inv_ex(eye - ops.skew(packed, b))[0] - eye, True),
        "torch solve": (lambda: torch.linalg.solve(eye - (Q := ops.skew(packed, b)), eye + Q, left=False), True),
        "torch newton_schulz": (lambda: torch_newton_schulz(ops.skew(packed, b), steps), True),
        "torch neumann5": (lambda: NeumannSeries(ops.skew(packed, b), 5).R, True),
    }


def run(device: torch.device, iters: int) -> list[dict]:
    from fastadapt.triton_kernels.cayley import newton_schulz_steps
    d = 4096 if device.type == "cuda" else 1024
    rows = []
    for regime, entry_scale in REGIMES.items():
        for b in BLOCKS:
            n = d // b
            packed64 = randn(n, ops.packed_size(b), scale=entry_scale(b), seed=b)
            Q64 = ref.skew(packed64, b)
            expected = ref.cayley(Q64)
            steps = newton_schulz_steps(float(_lam(Q64.float()).max()))
            packed = packed64.float().to(device)
            with torch.no_grad():
                for mode, (fn, forward) in _modes(device, packed, b, steps).items():
                    row = {"regime": regime, "b": b, "n": n, "mode": mode,
                           "||Q||_2 max": float(torch.linalg.matrix_norm(Q64, ord=2).max()),
                           "us": 1e6 * _timed(fn, device, iters)}
                    if forward:
                        R = fn().double().cpu()
                        target = ref.neumann(Q64, 5) if "neumann" in mode else expected
                        row["rel err"] = float(rel_error(R, target))
                        row["orth err"] = float(ref.orthogonality_error(R))
                    if "newton_schulz" in mode:
                        row["steps"] = steps
                    rows.append(row)
                    print(_row_line(row), flush=True)
    return rows


def sync_check(device: torch.device) -> dict:
    """CUDA: OFT layer forward + backward on the triton path under torch.cuda.set_sync_debug_mode
    ("error"): "none" when no call waits for the device, else the error.  Cases: exact and Neumann
    with small |Q|, and a divergent Neumann Q over the three calls before its warning (call 1
    queues ||Q||_F, call 2 judges it and queues the bounds of S = Q^2, call 3 judges those and
    queues the exact test; the warning call 4 computes ||Q||_2 with one sync, by design, outside
    the check)."""
    from fastadapt.layers.cayley import OFTLinear
    result = {}
    for name, neumann, entry_scale, calls in (("exact", False, 0.01, 3), ("neumann5", True, 0.01, 3),
                                              ("neumann5 divergent, before the warning", True, 1.0, 3)):
        MONITOR.reset()
        layer = OFTLinear(torch.nn.Linear(512, 256, device=device), oft_block_size=32, use_cayley_neumann=neumann)
        with torch.no_grad():
            layer.oft_R.weight.normal_().mul_(entry_scale)
        x = torch.randn(300, 512, device=device, requires_grad=True)
        layer(x).sum().backward()  # compile / warm up outside the check
        MONITOR.reset()
        try:
            for _ in range(calls):
                torch.cuda.synchronize(device)  # the previous call's reading is ready: judged in this call
                torch.cuda.set_sync_debug_mode("error")
                try:
                    layer(x).sum().backward()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            result[name] = "none"
        except RuntimeError as error:
            result[name] = str(error).splitlines()[0]
    MONITOR.reset()
    return result


HEADER = "| regime | b | n | max ||Q||_2 | mode | us / call | rel err vs fp64 | max ||R^T R - I||_F | NS steps |"


def _row_line(row: dict) -> str:
    def fmt(key, spec):
        return format(row[key], spec) if key in row else "-"
    return (f"| {row['regime']} | {row['b']} | {row['n']} | {row['||Q||_2 max']:.3g} | {row['mode']} | "
            f"{row['us']:.1f} | {fmt('rel err', '.1e')} | {fmt('orth err', '.1e')} | {fmt('steps', 'd')} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=50, help="timed samples per row (median)")
    parser.add_argument("--out", type=Path, help="JSON file for the rows and machine info")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 is steadier on a "
                                                     "shared machine, the b x b work is too small to split)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    # The sync check first (small, quick compiles): under the GPU suite's timeout the rows at
    # b = 128, whose fp32 tile programs take the longest to compile, are the ones to lose.
    syncs = sync_check(device) if device.type == "cuda" else {}
    for name, verdict in syncs.items():
        print(f"host syncs in an OFT step, {name}: {verdict}", flush=True)
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    rows = run(device, args.iters)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": str(device), "iters": args.iters, "machine": machine_info(device),
                                        "rows": rows, "host syncs": syncs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
