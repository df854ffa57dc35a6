"""Compile variants and roofline of fastadapt/triton_kernels/dora_norm.py (DoRA, DeLoRA).

``variants()``: the factored norm and the backward row pass as their launchers call them at the
standard shape.  ``roofline(shape)``: the launches of each benchmark case (benchmarks/cases_dora.py)
in one forward + backward on the GPU path, as fastadapt/ops/dora_norm.py runs them today; the
fused GEMM and the float32 products are lowrank_gemm.py's, the Philox masks dropout.py's.
"""
from __future__ import annotations

import triton

from benchmarks.compile_lowrank_gemm import RANK, float32_matmul_steps, fused_gemm_step
from benchmarks.compile_report import FEATURES, HALF_DTYPES, ROWS, Variant, mock_tensor
from benchmarks.roofline import Method, Shape, Step, gemm, small

GPU_TARGET = 1.15       # DESIGN section 7: DoRA r=16 GPU bf16 <= 1.15 (dropout: physical floor 2.0)


def variants() -> dict[str, list[Variant]]:
    from fastadapt.triton_kernels import _tiles as T
    out = {"_dora_norm_fwd_kernel": [], "_dora_dy_row_pass_kernel": []}
    f = mock_tensor

    def norm(r, has_wsq):
        def build(dtype):
            args = (f(dtype), f(dtype), f(dtype), f("float32"), f("float32"), f("float32"), FEATURES, FEATURES, r,
                    FEATURES, 1, FEATURES, 1, r, 1, 2.0, 1e-12)
            return args, dict(HAS_WSQ=has_wsq, DOT_PRECISION="ieee" if dtype == "float32" else "tf32",
                              BLOCK_M=64, BLOCK_K=64, BLOCK_R=T.block_r(r))
        return build

    def row_pass(r, mixed):
        def build(dtype):
            compute = "float32" if mixed else dtype     # u, b_scaled, v: float32 adapter on a half dY
            args = (f(dtype), f(compute), f(compute), f(dtype), f(compute), f("float32"), f("float32"),
                    ROWS, FEATURES, r, FEATURES, 1, r, 1, r, 1, FEATURES, 1)
            return args, dict(IEEE=compute == "float32", UPCAST=compute != dtype, BLOCK_N=128, BLOCK_O=32,
                              BLOCK_R=T.block_r(r), num_warps=8)
        return build

    for r in (16, 128):
        for has_wsq in (False, True):   # W is frozen: the first call computes ||W||^2, later calls load it
            out["_dora_norm_fwd_kernel"].append(Variant(
                f"r={r} {'cached' if has_wsq else 'computed'} W row norms", norm(r, has_wsq),
                grid=(triton.cdiv(FEATURES, 64),), scope="parameters", standard=r == RANK))
    row_grid = (triton.cdiv(ROWS, 128),)
    for r in (RANK, 64):
        out["_dora_dy_row_pass_kernel"].append(Variant(f"r={r} 128x32 w8", row_pass(r, False), grid=row_grid,
                                                       standard=r == RANK))
    out["_dora_dy_row_pass_kernel"].append(Variant(
        f"r={RANK} 128x32 w8 mixed (fp32 u, b_s)", row_pass(RANK, True), HALF_DTYPES, grid=row_grid, standard=True,
        ieee_reason="PEFT's float32 adapter: v = dY (s g o B) and u^T dY in fp32, as PEFT computes them from "
                    "dY.to(float32) (4 N d r FLOPs)"))
    return out


# --------------------------------------------------------------------------------------------
# roofline: what each benchmark case launches on the GPU path (r = 16, bias-free base)

def _row_pass(s: Shape, mixed: bool, r: int = RANK) -> list[Step]:
    """v = dY b_s, P = u^T dY, colsum(dY o y_pre) from one read of dY (and y_pre), 128 rows per program."""
    e, lr = s.elem, 4 if mixed else s.elem
    blocks = triton.cdiv(s.n, 128)
    partial = blocks * (r + 1) * s.d_out * 4
    flops = 2 * 2.0 * s.n * s.d_out * r
    return [Step("row pass: v, u^T dY, colsum(dY o y_pre)", 2 * s.n * s.d_out * e + 2 * s.n * r * lr + partial,
                 tensor_flops=0.0 if mixed else flops, fp32_flops=flops if mixed else 0.0,
                 kernel="_dora_dy_row_pass_kernel", programs=blocks),
            small("sum the row-pass partials, dB, dm", 5, partial + 2 * r * s.d_out * 4)]


def _norm(s: Shape, mixed: bool, r: int = RANK) -> list[Step]:
    """||W + s B A||_row per forward (W frozen, ||W||^2 cached): the kernel for one dtype; for a
    float32 adapter on a half W, torch: W converted to fp32 by 2^20-element blocks, W A^T by cuBLAS fp32."""
    e, w = s.elem, s.d_out * s.d_in
    if not mixed:
        return [small("q = rowsum((B A A^T) o B), g = m / n", 6),
                Step("norm: W A^T and rowsum((W A^T) o B) in one pass over W", w * e,
                     tensor_flops=2.0 * w * r, kernel="_dora_norm_fwd_kernel", programs=triton.cdiv(s.d_out, 64))]
    blocks = triton.cdiv(w, 1 << 20)
    return [small("q, cross, g = m / n (torch)", 8),
            Step(f"norm (torch): W.to(float32) by blocks ({blocks})", w * (e + 4), launches=blocks),
            Step(f"norm (torch): W A^T, cuBLAS fp32 ({blocks} blocks)", w * 4, fp32_flops=2.0 * w * r,
                 launches=blocks)]


def _dora(s: Shape, mixed: bool, dropout: bool) -> tuple:
    e, N, din, dout = s.elem, s.n, s.d_in, s.d_out
    x = N * din
    fwd = _norm(s, mixed) + [small("b_scaled, casts", 2)]
    if not dropout:
        fwd += (float32_matmul_steps("u = x A^T (fp32)", N, RANK, din, e, 4) if mixed else
                [gemm("u = x A^T", N, RANK, din)])
        fwd.append(fused_gemm_step("y, y_pre = g o (x W^T + u (sB)^T) (+ b)", s, N, dout, din, lowrank_fp32=mixed,
                               outputs=2))
    elif mixed:
        fwd += float32_matmul_steps("u = (mask o x) A^T (fp32, mask in-kernel)", N, RANK, din, e, 4)
        fwd += [gemm("base = x W^T + b", N, dout, din),
                Step("x_d = mask o x", 2 * x * e, kernel="_seeded_dropout_kernel"),
                fused_gemm_step("y, y_pre: residual epilogue over x_d W^T", s, N, dout, din, lowrank_fp32=True,
                            outputs=2, extra_reads=1)]
    else:
        fwd += [Step("x_d, x - x_d = mask o x, one pass", 3 * x * e, kernel="_seeded_dropout_kernel"),
                gemm("u = x_d A^T", N, RANK, din),
                fused_gemm_step("y_pre = x_d W^T + u (sB)^T", s, N, dout, din, lowrank_fp32=False),
                gemm("y = (x - x_d) W^T + b", N, dout, din),
                Step("y += g o y_pre", 3 * N * dout * e, launches=1)]
    bwd = [small("b_scaled = B (s g)", 2)] + _row_pass(s, mixed)
    if not dropout:
        bwd.append(fused_gemm_step("dx = dY (g o W) + v A", s, N, din, dout, lowrank_fp32=mixed))
        bwd += (float32_matmul_steps("dA = v^T x (fp32)", RANK, din, N, 4, e) if mixed else
                [gemm("dA = v^T x", RANK, din, N)])
    else:
        bwd += [fused_gemm_step("inner = v A + dY ((g - 1) o W)", s, N, din, dout, lowrank_fp32=mixed,
                            out_elem=4 if mixed else e),
                gemm("dY W", N, din, dout),
                Step("dx = dY W + mask o inner (in place)", x * (2 * e + (4 if mixed else e)),
                     kernel="_dropout_mask_add_kernel")]
        if mixed:
            bwd += float32_matmul_steps("dA = v^T (mask o x) (fp32, mask in-kernel)", RANK, din, N, 4, e)
        else:
            bwd += [Step("x_d = mask o x (regenerated)", 2 * x * e, kernel="_seeded_dropout_kernel"),
                    gemm("dA = v^T x_d", RANK, din, N)]
    return tuple(fwd + bwd)


def _delora(s: Shape) -> tuple:
    """PEFT's default float32 DeLoRA adapter on the bf16 base (the delora_r16 case): float32_matmul
    for u, t = dY B, dA and dB; the fused GEMM (fp32 low-rank term) for y and dx."""
    e, N, din, dout = s.elem, s.n, s.d_in, s.d_out
    return tuple([
        small("component scale c, A o w, B c", 10),
        *float32_matmul_steps("u = x (A o w)^T (fp32)", N, RANK, din, e, 4),
        fused_gemm_step("y = fl(x W^T + b) + (u o c) B^T", s, N, dout, din, lowrank_fp32=True),
        small("component scale c, A o w (backward)", 10),
        *float32_matmul_steps("t = dY B (fp32)", N, RANK, dout, e, 4),
        fused_gemm_step("dx = dY W + (t o c) A_w", s, N, din, dout, lowrank_fp32=True),
        Step("dc = colsum(t o u)", 2 * N * RANK * 4),
        *float32_matmul_steps("dA: (t o c)^T x (fp32)", RANK, din, N, 4, e),
        *float32_matmul_steps("dB: u^T dY (fp32)", RANK, dout, N, 4, e),
        small("radial terms, dlambda", 8),
    ])


def roofline(shape: Shape) -> list[Method]:
    fp32_note = ("PEFT's default float32 adapter on the bf16 base: the low-rank products IEEE fp32 on CUDA cores "
                 "(float32_matmul, the fused GEMM's fp32 low-rank dot, the mixed row pass), the norm in torch")
    return [
        Method("DoRA r=16, fp32 adapter (PEFT default)", "dora_r16", _dora(shape, True, False), GPU_TARGET,
               note=fp32_note),
        Method("DoRA r=16, bf16 adapter", "dora_r16_adapter_in_input_dtype", _dora(shape, False, False), GPU_TARGET),
        Method("DoRA r=16 dropout 0.1, fp32 adapter (PEFT default)", "dora_r16_dropout0.1", _dora(shape, True, True),
               note=fp32_note + "; 4 GEMMs with W: floor 2.0"),
        Method("DoRA r=16 dropout 0.1, bf16 adapter", "dora_r16_dropout0.1_adapter_in_input_dtype",
               _dora(shape, False, True), note="4 GEMMs with W: floor 2.0"),
        Method("DeLoRA r=16, fp32 adapter (PEFT default)", "delora_r16", _delora(shape),
               note="no GPU target in DESIGN section 7 (CPU target <= 1.20)"),
    ]
