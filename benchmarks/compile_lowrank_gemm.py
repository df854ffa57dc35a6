"""Compile variants of fastadapt/triton_kernels/lowrank_gemm.py: the fused scaled low-rank GEMM
(one variant per autotune config, forward and dx modes, and the mixed-precision forward) and the
float32 products of half activations with a float32 adapter (``float32_matmul``'s CUDA tiles).

No ``roofline``: these are shared blocks.  ``fused_gemm_step`` and ``float32_matmul_steps`` give
their roofline steps to the families that launch them (compile_dora_norm.py; LoRA and the other
low-rank methods likewise).
"""
from __future__ import annotations

import triton

from benchmarks.compile_dropout import SEED
from benchmarks.compile_report import FEATURES, HALF_DTYPES, ROWS, Variant, mock_tensor
from benchmarks.roofline import Shape, Step, small

RANK = 16
MIXED_REASON = ("PEFT's float32 adapter on a half base: the low-rank term in IEEE fp32 after the half base "
                "product (2 N r d FLOPs, r / d of the GEMM's)")
FLOAT32_MATMUL_REASON = ("float32 products of PEFT's float32 adapter with half activations (tiles converted on "
                         "load): IEEE fp32 by definition; 2 N d r FLOPs on CUDA cores")


def variants() -> dict[str, list[Variant]]:
    from fastadapt.triton_kernels import _tiles as T
    from fastadapt.triton_kernels import lowrank_gemm as L
    out = {"_scaled_lowrank_gemm_kernel": [], "_float32_matmul_kernel": []}
    f, r = mock_tensor, RANK

    def gemm(config, mode):
        def build(dtype):
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
        if product == "u":    # u = x A^T: a = x (N, in), b = A^T (in, r) a view of the float32 A
            m, n, k, strides = ROWS, r, FEATURES, (FEATURES, 1, 1, FEATURES)
        else:                 # dA = v^T x: a = v^T (r, N) a view of the float32 v, b = x (N, in)
            m, n, k, strides = r, FEATURES, ROWS, (1, r, FEATURES, 1)
        block_m, block_n, block_k, k_per_split, grid = float32_matmul_tiles(m, n, k)

        def build(dtype):
            a, b = (f(dtype), f("float32")) if product == "u" else (f("float32"), f(dtype))
            seed, p = (SEED, 0.1) if masked else (0, 0.5)
            args = (a, b, f("float32"), m, n, k, k_per_split, *strides, seed, p, 1 / (1 - p))
            return args, dict(DROPOUT_A=masked == "a", DROPOUT_B=masked == "b",
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
        return build, grid

    for config in L._GEMM_CONFIGS:
        tile = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        shape = f"{tile} w{config.num_warps} s{config.num_stages}"
        grid = (triton.cdiv(ROWS, config.kwargs["BLOCK_M"]), triton.cdiv(FEATURES, config.kwargs["BLOCK_N"]))
        for mode in ("forward", "dx"):
            out["_scaled_lowrank_gemm_kernel"].append(Variant(f"{mode} {shape} r={r}", gemm(config, mode), grid=grid,
                                                              standard=True))
        out["_scaled_lowrank_gemm_kernel"].append(Variant(
            f"forward mixed {shape} r={r} (fp32 u, v; residual, round_base)", gemm(config, "forward mixed"),
            HALF_DTYPES, grid=grid, standard=True, ieee_reason=MIXED_REASON))
    for name, product, masked in (("u = x A^T (r=16, A float32)", "u", None),
                                  ("u = (mask o x) A^T (r=16)", "u", "a"),
                                  ("dA = v^T (mask o x) (r=16, v float32)", "dA", "b")):
        build, grid = float32_matmul(product, masked)
        out["_float32_matmul_kernel"].append(Variant(name, build, grid=grid, standard=True,
                                                     ieee_reason=FLOAT32_MATMUL_REASON))
    return out


# --------------------------------------------------------------------------------------------
# roofline steps of these kernels, for the families that launch them

def float32_matmul_tiles(m: int, n: int, k: int) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, K_PER_SPLIT, grid) that float32_matmul picks on CUDA for C (m, n) over
    k: the skinny side padded (block_r), 64 elsewhere, BLOCK_K 16, split-K to about 256 programs with
    no chunk shorter than 512 (the launcher's rule, restated: it has no tile helper to call)."""
    from fastadapt.triton_kernels._tiles import block_r
    block_m, block_n, block_k = (block_r(m) if m <= 64 else 64), (block_r(n) if n <= 64 else 64), 16
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k = max(1, min(triton.cdiv(k, 512), triton.cdiv(256, tiles)))
    k_per_split = max(1, triton.cdiv(triton.cdiv(k, split_k), block_k)) * block_k
    return block_m, block_n, block_k, k_per_split, (triton.cdiv(m, block_m), triton.cdiv(n, block_n),
                                                    triton.cdiv(k, k_per_split))


def float32_matmul_steps(what: str, m: int, n: int, k: int, a: int, b: int) -> list[Step]:
    """Roofline steps of float32_matmul (C (m, n) = a (m, k) b (k, n), a / b bytes per element):
    IEEE fp32 on CUDA cores, half tiles converted on load, the launcher's split-K partials summed."""
    grid = float32_matmul_tiles(m, n, k)[-1]
    partial = grid[2] * m * n * 4
    steps = [Step(what, m * k * a + k * n * b + partial, fp32_flops=2.0 * m * n * k, kernel="_float32_matmul_kernel",
                  programs=grid[0] * grid[1] * grid[2])]
    if grid[2] > 1:
        steps.append(small("sum the split-K partials", 1, partial + m * n * 4))
    return steps


def fused_gemm_step(what: str, s: Shape, m: int, n: int, k: int, *, lowrank_fp32: bool, outputs: int = 1,
                    out_elem: int | None = None, extra_reads: int = 0, r: int = RANK) -> Step:
    """Roofline step of scaled_lowrank_gemm (C (m, n) from X (m, k) Y (k, n) + U (m, r) V (r, n)):
    the base product on tensor cores, the rank-r term in the same accumulator (IEEE fp32 for PEFT's
    float32 adapter), ``outputs`` (m, n) stores (y and y_pre: 2), ``extra_reads`` (m, n) loads (a residual)."""
    e, lr = s.elem, 4 if lowrank_fp32 else s.elem
    nbytes = m * k * e + k * n * e + (m + n) * r * lr + outputs * m * n * (out_elem or e) + extra_reads * m * n * e
    lowrank = 2.0 * m * n * r
    return Step(what, nbytes, tensor_flops=2.0 * m * n * k + (0.0 if lowrank_fp32 else lowrank),
                fp32_flops=lowrank if lowrank_fp32 else 0.0, kernel="_scaled_lowrank_gemm_kernel")
