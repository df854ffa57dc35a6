"""Compile variants and roofline of fastadapt/triton_kernels/dora_norm.py (DoRA, DeLoRA).

``variants()``: the factored norm and the backward row pass as their launchers call them at the
standard shape.  ``roofline(shape)``: the launches of each benchmark case (benchmarks/cases_dora.py)
in one forward + backward on the GPU path, as fastadapt/ops/dora_norm.py runs them today; the
fused GEMM and the float32 products are lowrank_gemm.py's, the Philox masks dropout.py's.
"""
from __future__ import annotations

import torch
import triton

from benchmarks.compile_lowrank_gemm import RANK, float32_matmul_steps, fused_gemm_step
from benchmarks.compile_report import FEATURES, HALF_DTYPES, ROWS, Variant, mock_tensor
from benchmarks.roofline import H200, Method, Shape, Step, gemm, small

CUDA = torch.device("cuda")   # the launchers' tiles for a GPU (a device object only: no GPU is needed)
GPU_TARGET = 1.15       # DESIGN section 7: DoRA r=16 GPU bf16 <= 1.15 (dropout: physical floor 2.0)


def norm_launch(out_features: int, in_features: int, sms: int = H200.sms) -> dict:
    """The norm launcher's tiles and split-K at a shape on a GPU of ``sms`` SMs."""
    from fastadapt.triton_kernels import dora_norm as K
    block_m, block_k = K.norm_tiles(CUDA)
    row_blocks = triton.cdiv(out_features, block_m)
    k_per_split, splits = K.split_extent(in_features, K.fill_splits(row_blocks, sms, triton.cdiv(in_features, block_k)),
                                         block_k)
    return dict(block_m=block_m, block_k=block_k, row_blocks=row_blocks, k_per_split=k_per_split, splits=splits)


def row_pass_launch(n: int, out_features: int, sms: int = H200.sms) -> dict:
    """The row pass launcher's tiles and column split at a shape on a GPU of ``sms`` SMs."""
    from fastadapt.triton_kernels import dora_norm as K
    block_n, block_o, warps = K.row_pass_tiles(CUDA)
    n_blocks = triton.cdiv(n, block_n)
    o_per_split, splits = K.split_extent(out_features, K.fill_splits(n_blocks, sms, triton.cdiv(out_features, block_o)),
                                         block_o)
    return dict(block_n=block_n, block_o=block_o, num_warps=warps, n_blocks=n_blocks, o_per_split=o_per_split,
                splits=splits)


def variants() -> dict[str, list[Variant]]:
    from fastadapt.triton_kernels import _tiles as T
    from fastadapt.triton_kernels import dora_norm as K
    out = {"_dora_norm_fwd_kernel": [], "_dora_norm_finish_kernel": [], "_dora_dy_row_pass_kernel": []}
    f = mock_tensor
    norm_at = norm_launch(FEATURES, FEATURES)
    rows_at = row_pass_launch(ROWS, FEATURES)

    def norm(r, has_wsq):
        def build(dtype):
            args = (f(dtype), f(dtype), f(dtype), f("float32"), f("float32"), f("float32"), FEATURES, FEATURES, r,
                    norm_at["k_per_split"], FEATURES, 1, FEATURES, 1, r, 1, 2.0, 1e-12)
            return args, dict(HAS_WSQ=has_wsq, FINISH=norm_at["splits"] == 1,
                              DOT_PRECISION="ieee" if dtype == "float32" else "tf32",
                              BLOCK_M=norm_at["block_m"], BLOCK_K=norm_at["block_k"], BLOCK_R=T.block_r(r))
        return build

    def finish(has_wsq):
        def build(dtype):
            args = (f("float32"), f("float32"), f("float32"), f("float32"), FEATURES, norm_at["splits"], 2.0, 1e-12)
            return args, dict(HAS_WSQ=has_wsq, BLOCK=K.FINISH_BLOCK)
        return build

    def row_pass(r, mixed):
        def build(dtype):
            compute = "float32" if mixed else dtype     # u, b_scaled, v: float32 adapter on a half dY
            v = "float32" if rows_at["splits"] > 1 else compute   # several column slabs: a float32 v partial
            args = (f(dtype), f(compute), f(compute), f(dtype), f(v), f("float32"), f("float32"),
                    ROWS, FEATURES, r, rows_at["o_per_split"], FEATURES, 1, r, 1, r, 1, FEATURES, 1)
            return args, dict(IEEE=compute == "float32", UPCAST=compute != dtype, BLOCK_N=rows_at["block_n"],
                              BLOCK_O=rows_at["block_o"], BLOCK_R=T.block_r(r), num_warps=rows_at["num_warps"])
        return build

    norm_grid = (norm_at["row_blocks"], norm_at["splits"])
    norm_tile = f"{norm_at['block_m']}x{norm_at['block_k']}, {norm_at['splits']} K slabs"
    for r in (16, 128):
        for has_wsq in (False, True):   # W is frozen: the first call computes ||W||^2, later calls load it
            out["_dora_norm_fwd_kernel"].append(Variant(
                f"r={r} {'cached' if has_wsq else 'computed'} W row norms, {norm_tile}", norm(r, has_wsq),
                grid=norm_grid, scope="parameters", standard=r == RANK))
    finish_programs = triton.cdiv(FEATURES, K.FINISH_BLOCK)
    for has_wsq in (False, True):
        out["_dora_norm_finish_kernel"].append(Variant(
            f"{norm_at['splits']} partials, {'cached' if has_wsq else 'computed'} W row norms", finish(has_wsq),
            ("float32",), grid=(finish_programs,), scope="parameters", standard=True,
            accepted_launch=f"sums the {norm_at['splits']} x {FEATURES} float32 partial row sums and reads q "
                            f"(and the cached W row norms), writes n: <= {(norm_at['splits'] + 3) * FEATURES * 4 // 1024} KiB, "
                            f"{(norm_at['splits'] + 3) * FEATURES * 4 / H200.hbm_bytes_per_s * 1e6:.2f} us at 4.8 TB/s "
                            f"on all SMs: the launch itself ({H200.launch_gap_s * 1e6:.0f} us gap) is the cost, "
                            f"not the {finish_programs} programs of {K.FINISH_BLOCK} rows"))
    rows_grid = (rows_at["n_blocks"], rows_at["splits"])
    rows_tile = f"{rows_at['block_n']}x{rows_at['block_o']} w{rows_at['num_warps']}, {rows_at['splits']} column slabs"
    for r in (RANK, 64):
        out["_dora_dy_row_pass_kernel"].append(Variant(f"r={r} {rows_tile}", row_pass(r, False), grid=rows_grid,
                                                       standard=r == RANK))
    out["_dora_dy_row_pass_kernel"].append(Variant(
        f"r={RANK} {rows_tile} mixed (fp32 u, b_s)", row_pass(RANK, True), HALF_DTYPES, grid=rows_grid, standard=True,
        ieee_reason="PEFT's float32 adapter: v = dY (s g o B) and u^T dY in fp32, as PEFT computes them from "
                    "dY.to(float32) (4 N d r FLOPs)"))
    return out


# --------------------------------------------------------------------------------------------
# roofline: what each benchmark case launches on the GPU path (r = 16, bias-free base)

def _row_pass(s: Shape, mixed: bool, r: int = RANK) -> list[Step]:
    """v = dY b_s, P = u^T dY, colsum(dY o y_pre) from one read of dY (and y_pre), 128 rows per program
    and the columns in as many slabs as fill the SMs (each slab's v share a float32 partial)."""
    e, lr = s.elem, 4 if mixed else s.elem
    at = row_pass_launch(s.n, s.d_out)
    partial = at["n_blocks"] * (r + 1) * s.d_out * 4
    v_partial = at["splits"] * s.n * r * 4 if at["splits"] > 1 else 0
    flops = 2 * 2.0 * s.n * s.d_out * r
    sums = 5 + (0 if at["splits"] == 1 else 1 if mixed else 2)   # + v.sum(0) (and its cast to a half u)
    return [Step(f"row pass: v, u^T dY, colsum(dY o y_pre) ({at['splits']} column slabs)",
                 2 * s.n * s.d_out * e + 2 * s.n * r * lr + partial + v_partial,
                 tensor_flops=0.0 if mixed else flops, fp32_flops=flops if mixed else 0.0,
                 kernel="_dora_dy_row_pass_kernel", programs=at["n_blocks"] * at["splits"]),
            small("sum the row-pass partials, dB, dm", sums, partial + v_partial + 2 * r * s.d_out * 4)]


def _norm(s: Shape, mixed: bool, r: int = RANK) -> list[Step]:
    """||W + s B A||_row per forward (W frozen, ||W||^2 cached): the kernel for one dtype (split-K
    with a finish launch when the row blocks do not fill the SMs); for a float32 adapter on a half W,
    torch: W converted to fp32 by 2^20-element blocks, W A^T by cuBLAS fp32."""
    e, w = s.elem, s.d_out * s.d_in
    if not mixed:
        at = norm_launch(s.d_out, s.d_in)
        steps = [small("q = rowsum((B A A^T) o B), g = m / n", 6),
                 Step(f"norm: W A^T and rowsum((W A^T) o B) in one pass over W ({at['splits']} K slabs)",
                      w * e + (at["splits"] * s.d_out * 4 if at["splits"] > 1 else 0),
                      tensor_flops=2.0 * w * r, kernel="_dora_norm_fwd_kernel",
                      programs=at["row_blocks"] * at["splits"])]
        if at["splits"] > 1:
            steps.append(Step("norm: sum the K slabs' row sums, root", (at["splits"] + 3) * s.d_out * 4,
                              kernel="_dora_norm_finish_kernel"))
        return steps
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
