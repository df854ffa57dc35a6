"""Compile variants of fastadapt/triton_kernels/lowrank.py, as the launchers call them at the GPU
standard shape (N = 8192 tokens, d = 4096), and the low-rank family's roofline.

``_masked_lowrank_gemm_kernel``: LoRA's dx under dropout, dx = dY W + mask o (t A) (one variant per
autotune config; the low-rank operands in the base dtype, or PEFT's float32 adapter on a half base).
The LoRA forward and the rest of its backward run the shared blocks (compile_lowrank_gemm.py).
``_segment_lowrank_kernel`` / ``_segment_gemm_kernel``: a mixed-adapter batch (4 adapters of rank 16
over the 8192 rows), with the launcher's CUDA tiles (64-row tiles within one adapter's rows).
``_sampled_product_kernel``: SHiRA r = 16's weight gradient (K = 16 (4096 + 4096) positions).
``_randlora_scale_grad_kernel``: RandLoRA r = 32's lambda / gamma gradients (n = 128 bases).
"""
from __future__ import annotations

import triton

from benchmarks.compile_dropout import SEED
from benchmarks.compile_lowrank_gemm import RANK, float32_matmul_steps, fused_gemm_step
from benchmarks.compile_report import FEATURES, HALF_DTYPES, ROWS, Variant, mock_tensor
from benchmarks.roofline import Method, Shape, Step, small

LORA_GPU_TARGET, LORA_DROPOUT_GPU_TARGET = 1.12, 1.15
MIXED_REASON = ("PEFT's float32 adapter on a half base: the masked low-rank term t A in IEEE fp32 after the half "
                "base product (2 N r d FLOPs, r / d of the GEMM's)")


def variants() -> dict[str, list[Variant]]:
    from fastadapt.triton_kernels import _tiles as T
    from fastadapt.triton_kernels import lowrank as L
    f, r = mock_tensor, RANK
    out = {"_masked_lowrank_gemm_kernel": []}

    def masked_dx(config, fp32_adapter):
        def build(dtype):
            lowrank = "float32" if fp32_adapter else dtype
            # X = dY (N, out), Y = W (out, in), U = t (N, r), V = A (r, in), all row-major
            args = (f(dtype), f(dtype), f(lowrank), f(lowrank), f(dtype), ROWS, FEATURES, FEATURES, r,
                    FEATURES, 1, FEATURES, 1, r, 1, FEATURES, 1, SEED, 0.1, 1 / 0.9)
            mixed = fp32_adapter and dtype != "float32"
            return args, dict(ROUND_BASE=mixed, IEEE=dtype == "float32", LOWRANK_IEEE=lowrank == "float32",
                              BLOCK_R=T.block_r(r), **config.kwargs, num_warps=config.num_warps,
                              num_stages=config.num_stages)
        return build

    for configs, fp32_adapter in ((L.MASKED_GEMM_CONFIGS, False), (L.MASKED_GEMM_MIXED_CONFIGS, True)):
        for config in configs:
            tile = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            name = f"dx {tile} w{config.num_warps} s{config.num_stages} r={r}"
            grid = (triton.cdiv(ROWS, config.kwargs["BLOCK_M"]), triton.cdiv(FEATURES, config.kwargs["BLOCK_N"]))
            standard = config is configs[0]   # the CI compiles the largest tile of each (bf16)
            out["_masked_lowrank_gemm_kernel"].append(
                Variant(f"{name}, float32 t and A", masked_dx(config, True), HALF_DTYPES, grid=grid,
                        standard=standard, ieee_reason=MIXED_REASON) if fp32_adapter else
                Variant(name, masked_dx(config, False), grid=grid, standard=standard))
    out.update(_segment_variants())
    out.update(_shira_randlora_variants())
    return out


SHIRA_RANK, RANDLORA_RANK = 16, 32


def _shira_randlora_variants() -> dict[str, list[Variant]]:
    from fastadapt.triton_kernels import lowrank as L
    f = mock_tensor
    k = SHIRA_RANK * 2 * FEATURES
    split, per_split = L.sampled_split(ROWS, k, L.SAMPLED_TILES["BLOCK_K"], L.SAMPLED_TILES["BLOCK_T"])

    def sampled(dtype):
        args = (f(dtype), f(dtype), f("int64"), f("int64"), f("float32"), k, ROWS, per_split, FEATURES, 1, FEATURES, 1)
        return args, dict(L.SAMPLED_TILES)

    n_bases = FEATURES // RANDLORA_RANK

    def scale_grad(dtype):
        args = (f("float32"), f(dtype), f(dtype), f(dtype), f("float32"), f("float32"), RANDLORA_RANK, n_bases, FEATURES)
        return args, dict(BLOCK_D=128)

    return {
        "_sampled_product_kernel": [Variant(f"dw: K = {k} positions over {ROWS} tokens", sampled,
                                            grid=(triton.cdiv(k, L.SAMPLED_TILES["BLOCK_K"]), split), standard=True)],
        "_randlora_scale_grad_kernel": [Variant(f"dlambda, dgamma: r={RANDLORA_RANK}, n={n_bases}", scale_grad,
                                                grid=(n_bases, triton.cdiv(FEATURES, 128)), scope="parameters",
                                                standard=True)],
    }


MIXED_ADAPTERS = 4
SEGMENT_REASON = ("mixed-adapter batch: the rank-16 products in IEEE fp32 (float32 packed factors, u / t kept in "
                  "float32 as PEFT's float32 adapter path; 2 N r d FLOPs, r / d of the GEMM's)")


def _segment_variants() -> dict[str, list[Variant]]:
    from fastadapt.triton_kernels import _tiles as T
    f, r = mock_tensor, RANK
    block_m, block_n, block_k = 64, 64, 32          # segment_plan / segment_lowrank / segment_gemm on CUDA
    tiles = triton.cdiv(ROWS, block_m) + MIXED_ADAPTERS   # each adapter's rows start a tile

    def lowrank(dtype):
        args = (f(dtype), f("int64"), f("float32"), f("float32"), f("int32"), f("int32"), f("int32"), FEATURES, r,
                FEATURES, 1, FEATURES * r, r, 1)
        return args, dict(BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=T.block_r(r))

    def gemm(dtype):
        args = (f(dtype), f(dtype), f("int64"), f("float32"), f("float32"), f(dtype), f(dtype), f("int32"),
                f("int32"), f("int32"), FEATURES, FEATURES, r, FEATURES, 1, 1, FEATURES, r * FEATURES, FEATURES, 1)
        return args, dict(HAS_BIAS=True, ROUND_LOWRANK=True, IEEE=dtype == "float32", BLOCK_M=block_m,
                          BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=T.block_r(r))

    return {
        "_segment_lowrank_kernel": [Variant(f"u = x[rows] A_g^T, {MIXED_ADAPTERS} adapters r={r}", lowrank,
                                            grid=(tiles,), standard=True, ieee_reason=SEGMENT_REASON)],
        "_segment_gemm_kernel": [Variant(f"y = x W^T + b + u V_g, {MIXED_ADAPTERS} adapters r={r}", gemm,
                                         grid=(tiles, triton.cdiv(FEATURES, block_n)), standard=True,
                                         ieee_reason=SEGMENT_REASON)],
    }


# --------------------------------------------------------------------------------------------
# roofline

def _lora(s: Shape, fp32_adapter: bool, dropout: bool) -> tuple:
    """LoRA r = 16 on the bf16 base (PEFT's default float32 adapter, or the adapter in bf16): u and the
    parameter-gradient products by float32_matmul (the Philox mask in-kernel), y and dx by one fused
    GEMM each (dx with dropout: the masked low-rank epilogue)."""
    e, n, din, dout = s.elem, s.n, s.d_in, s.d_out
    a = 4 if fp32_adapter else e
    masked = " (mask in-kernel)" if dropout else ""
    fwd = [*float32_matmul_steps(f"u = x_d A^T (fp32){masked}", n, RANK, din, e, a),
           small("s B, casts", 2),
           fused_gemm_step("y = x W^T + b + u (sB)^T", s, n, dout, din, lowrank_fp32=fp32_adapter)]
    bwd = [*float32_matmul_steps("t = s dY B (fp32)", n, RANK, dout, e, a)]
    if dropout:
        lr = 4 if fp32_adapter else e
        bwd.append(Step("dx = dY W + mask o (t A)", n * dout * e + dout * din * e + (n + din) * RANK * lr + n * din * e,
                        tensor_flops=2.0 * n * din * dout + (0.0 if fp32_adapter else 2.0 * n * din * RANK),
                        fp32_flops=2.0 * n * din * RANK if fp32_adapter else 0.0,
                        kernel="_masked_lowrank_gemm_kernel"))
    else:
        bwd.append(fused_gemm_step("dx = dY W + t A", s, n, din, dout, lowrank_fp32=fp32_adapter))
    bwd += [*float32_matmul_steps(f"dA = t^T x_d (fp32){masked}", RANK, din, n, 4, e),
            *float32_matmul_steps("dB = s (u^T dY)^T (fp32)", RANK, dout, n, 4, e),
            small("scale, casts of dA, dB", 4)]
    return tuple(fwd + bwd)


def roofline(shape: Shape) -> list[Method]:
    fp32_note = ("PEFT's default float32 adapter on the bf16 base: the rank-16 products IEEE fp32 on CUDA cores "
                 "(float32_matmul; the fused GEMM's fp32 low-rank dot)")
    return [
        Method("LoRA r=16, fp32 adapter (PEFT default)", "lora_r16", _lora(shape, True, False), LORA_GPU_TARGET,
               note=fp32_note),
        Method("LoRA r=16, bf16 adapter", "lora_r16_adapter_in_input_dtype", _lora(shape, False, False),
               LORA_GPU_TARGET),
        Method("LoRA r=16 dropout 0.1, fp32 adapter (PEFT default)", "lora_r16_dropout0.1", _lora(shape, True, True),
               LORA_DROPOUT_GPU_TARGET, note=fp32_note + "; the mask regenerated in 3 kernels, never stored"),
    ]
