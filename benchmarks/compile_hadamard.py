"""Compile variants of fastadapt/triton_kernels/hadamard.py (LoHa, LoKr), as the launchers call them at the
GPU standard shape (N = 8192 tokens, d = 4096), and the family's roofline.

The merged GEMM (one variant per autotune config for LoHa's forward; dx and LoKr's forward and dx with
the first config): weight tiles W + s D generated on chip, D = (L1 R1) o (L2 R2) (LoHa, r = 16: two
rank-16 tensor-core dots per tile, IEEE fp32 for a float32 base) or a kron(w1, w2) gather (LoKr,
a = b = c = d = 64); PEFT's float32 factors on a half base are converted to the half dtype in the
tile.  LoHa's
factor gradients: G = dY^T X tiles over all tokens (tensor cores for half inputs), contracted with the
float32 factor tiles by IEEE fp32 dots once per tile.
"""
from __future__ import annotations

import triton

from benchmarks.compile_report import FEATURES, HALF_DTYPES, ROWS, Variant, mock_tensor
from benchmarks.roofline import Method, Shape, Step, gemm, small

RANK = 16
LOHA_GPU_TARGET, LOKR_GPU_TARGET = 1.50, 1.20
FP32_KRON_SPILL = ("24 B per thread: a float32 layer's kron forward (W^T tile loaded k-major, two int32 "
                   "gathers, the IEEE dot's operand copies) needs 255 registers and a few more at 64 x 64 with 4 or "
                   "8 warps; float32 layers on CUDA run FMA-bound at ~1/15 of the bf16 path, where the spill is "
                   "L1-resident; dx (no transpose) does not spill")
CONTRACTION_REASON = ("LoHa's factor gradients contract s G o P (float32 tiles) with the factor tiles once per "
                      "(BLOCK_O, BLOCK_I) tile: IEEE fp32 keeps PEFT's float32 gradient accuracy; 12 O I r FLOPs, "
                      "independent of N, against the tensor-core G's 2 N O I")


def variants() -> dict[str, list[Variant]]:
    from fastadapt.triton_kernels import _tiles as T
    from fastadapt.triton_kernels import hadamard as H
    f, d, n, r = mock_tensor, FEATURES, ROWS, RANK
    out = {"_merged_gemm_fwd_kernel": [], "_loha_factor_grads_bwd_kernel": []}

    def merged_gemm(config, mode, fp32_adapter=False):
        """mode: "loha y", "loha dx", "lokr y", "lokr dx", "residual" (x, W, C contiguous; factors too)."""
        def build(dtype):
            adapter = "float32" if fp32_adapter else dtype
            if mode.startswith("loha"):
                generator, rank, dk, dn = H.HADAMARD, r, 1, 1
                if mode == "loha y":   # Y = W^T, L = w1b^T (I, r), R = w1a^T (r, O): views of contiguous tensors
                    factor_strides = (1, d, 1, r, 1, d, 1, r)
                else:                  # Y = W, L = w1a (O, r), R = w1b (r, I)
                    factor_strides = (r, 1, d, 1, r, 1, d, 1)
            elif mode.startswith("lokr"):
                side = 64               # d = 4096 = 64 x 64 (PEFT's split), w1 (64, 64), w2 (64, 64)
                generator, rank, dk, dn = H.KRONECKER, 1, side, side
                # forward K1 = w1^T, K2 = w2^T; dx K1 = w1, K2 = w2 (R1 / R2 unused: the same pointers)
                factor_strides = (1, side, 1, side, 1, side, 1, side) if mode == "lokr y" else \
                    (side, 1, side, 1, side, 1, side, 1)
            else:                       # y = fl(x W^T) + s term (LoKr's float32 term on a half base)
                generator, rank, dk, dn = H.NO_TERM, 1, 1, 1
                factor_strides = (1, d, 1, d, 1, d, 1, d)
            y_strides = (1, d) if mode.endswith(" y") or mode == "residual" else (d, 1)
            factor = f(dtype) if mode == "residual" else f(adapter)
            residual = f("float32") if mode == "residual" else f(dtype)
            args = (f(dtype), f(dtype), *(factor for _ in range(4)), f(dtype), residual, f(dtype),
                    n, d, d, rank, dk, dn, 2.0, d, 1, *y_strides, *factor_strides, d, 1)
            return args, dict(GENERATOR=generator, HAS_BIAS=False, HAS_RES=mode == "residual",
                              IEEE=dtype == "float32", BLOCK_R=min(T.block_r(rank), H.MAX_BLOCK_R), **config.kwargs,
                              num_warps=config.num_warps, num_stages=config.num_stages)
        return build

    for precision, dtypes in (("half", HALF_DTYPES), ("float32", ("float32",))):
        for index, config in enumerate(H.MERGED_GEMM_CONFIGS[precision]):
            tile = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            shape = f"{tile} w{config.num_warps} s{config.num_stages}"
            grid = (triton.cdiv(n, config.kwargs["BLOCK_M"]), triton.cdiv(d, config.kwargs["BLOCK_N"]))
            first = index == 0
            out["_merged_gemm_fwd_kernel"].append(Variant(f"LoHa y = x (W + dW)^T r={r} {shape}",
                                                          merged_gemm(config, "loha y"), dtypes, grid=grid,
                                                          standard=first and precision == "half"))
            if not first and precision == "half":
                continue
            out["_merged_gemm_fwd_kernel"] += [
                Variant(f"LoHa dx = dY (W + dW) r={r} {shape}", merged_gemm(config, "loha dx"), dtypes, grid=grid),
                Variant(f"LoKr y = x (W + s kron(w1, w2))^T 64x64 {shape}", merged_gemm(config, "lokr y"), dtypes,
                        grid=grid, standard=first and precision == "half",
                        accepted_spill=None if precision == "half" else {"float32": FP32_KRON_SPILL}),
                Variant(f"LoKr dx {shape}", merged_gemm(config, "lokr dx"), dtypes, grid=grid),
            ]
            if precision == "half":
                out["_merged_gemm_fwd_kernel"] += [
                    Variant(f"LoHa y, float32 factors {shape}", merged_gemm(config, "loha y", True), dtypes,
                            grid=grid, standard=True),
                    Variant(f"LoKr y, float32 factors {shape}", merged_gemm(config, "lokr y", True), dtypes,
                            grid=grid),
                    Variant(f"y = fl(x W^T) + s term (LoKr's float32 term) {shape}", merged_gemm(config, "residual"),
                            dtypes, grid=grid, standard=True),
                ]

    tiles = H.FACTOR_GRADS_TILES_CUDA
    grads_grid = (triton.cdiv(d, tiles["BLOCK_O"]), triton.cdiv(d, tiles["BLOCK_I"]))

    def factor_grads(fp32_adapter):
        def build(dtype):
            adapter = "float32" if fp32_adapter else dtype
            args = (f(dtype), f(dtype), *(f(adapter) for _ in range(4)), *(f("float32") for _ in range(4)),
                    n, d, d, r, 2.0, d, 1, d, 1, r, 1, d, 1, r, 1, d, 1)
            return args, dict(IEEE=dtype == "float32", BLOCK_R=T.block_r(r), **tiles)
        return build

    out["_loha_factor_grads_bwd_kernel"] += [
        Variant(f"r={r}, factors in the input dtype", factor_grads(False), grid=grads_grid, standard=True,
                ieee_reason=CONTRACTION_REASON),
        Variant(f"r={r}, float32 factors (PEFT's default)", factor_grads(True), HALF_DTYPES, grid=grads_grid,
                standard=True, ieee_reason=CONTRACTION_REASON),
    ]
    return out


# --------------------------------------------------------------------------------------------
# roofline

def _merged_gemm(what: str, s: Shape, m: int, n: int, k: int, rank_tile: int, block_m: int = 128) -> Step:
    """The merged GEMM: the layer GEMM's FLOPs plus (LoHa) two rank-tile dots per weight tile per M tile."""
    regen = 2 * 2.0 * k * n * rank_tile * (m / block_m)
    return Step(what, bytes=(m * k + k * n + m * n) * s.elem, tensor_flops=2.0 * m * n * k + regen,
                kernel="_merged_gemm_fwd_kernel")


def _loha(s: Shape, fp32_adapter: bool) -> tuple:
    from fastadapt.ops.hadamard_loha import loha_plan
    e, n, i, o, r = s.elem, s.n, s.d_in, s.d_out, RANK
    plan = loha_plan(n, i, o, r, backend="triton", layout="mixed" if fp32_adapter else "half")
    steps = []
    thin = (lambda what, m, nn, k: gemm(what, m, nn, k, a=4 if fp32_adapter else e, b=4 if fp32_adapter else e,
                                        c=4, fp32=fp32_adapter))
    kr = small("Khatri-Rao factors A (O, r^2), B (r^2, I)", 2, (o + i) * r * r * 4)
    if plan.forward == "tiles":
        steps.append(_merged_gemm("y = x (W + s P1 o P2)^T (tiles)", s, n, o, i, 16))
    else:
        steps += [kr, thin("u = x B^T", n, r * r, i), thin("term = s u A^T", n, o, r * r),
                  gemm("y = fl(x W^T) + term", n, o, i, c=e, extra_bytes=n * o * 4)]
    if plan.factor_grads == "tiles":
        steps += [Step("G tiles, contracted (s G o P2, s G o P1 with the factors)",
                       bytes=n * (i + o) * e + 4 * i * o * r // 64 * 4, tensor_flops=2.0 * n * o * i,
                       fp32_flops=12.0 * o * i * r, kernel="_loha_factor_grads_bwd_kernel"),
                  small("sum the partials (4 factors)", 4, 4 * (o + i) * r * (i // 64) * 4)]
    else:
        steps += [kr, thin("u = x B^T", n, r * r, i), thin("v = dY A", n, r * r, o),
                  thin("M_A = dY^T u", o, r * r, n), thin("M_B = v^T x", r * r, i, n),
                  small("contract M_A, M_B with the factors", 4, 2 * (o + i) * r * r * 4)]
    if plan.input_grad == "tiles":
        steps.append(_merged_gemm("dx = dY (W + s P1 o P2) (tiles)", s, n, i, o, 16))
    else:
        steps += [thin("term = s v B", n, i, r * r), gemm("dx = fl(dY W) + term", n, i, o, c=e, extra_bytes=n * i * 4)]
    return tuple(steps)


def _lokr(s: Shape, decompose_factor: int, fp32_adapter: bool) -> tuple:
    """LoKr at ``s``: (a, c), (b, d) from PEFT's split.  A bf16 adapter: on-chip kron tiles, factor
    gradients on tensor cores (cuBLAS bf16).  PEFT's float32 adapter: the reshaped float32 term (cuBLAS
    fp32) joined after the rounded bf16 GEMM in the merged kernel's epilogue, factor gradients fp32."""
    from fastadapt.reference.hadamard import lokr_factorization
    e, n, i, o = s.elem, s.n, s.d_in, s.d_out
    c, d = lokr_factorization(i, decompose_factor)
    a, b = lokr_factorization(o, decompose_factor)
    w = 4 if fp32_adapter else e         # the reshaped products' element size

    def product(what, flops, nbytes, launches=1):
        return Step(what, bytes=nbytes, tensor_flops=0.0 if fp32_adapter else flops,
                    fp32_flops=flops if fp32_adapter else 0.0, launches=launches)
    steps = [small("form w1 / w2 from factors", 2)]
    if fp32_adapter:
        steps += [Step("x, dY to float32", bytes=n * (i + o) * (e + 4), launches=2),
                  product("Z = X w2^T; term = w1 Z_t", 2.0 * n * (c * d * b + a * c * b),
                          (n * i + 2 * n * c * b + n * o) * 4, launches=2),
                  Step("y = fl(x W^T) + s term (residual epilogue)", bytes=(n * i + i * o + n * o) * e + n * o * 4,
                       tensor_flops=2.0 * n * o * i, kernel="_merged_gemm_fwd_kernel"),
                  product("Q = w1^T dY_t; term = Q w2", 2.0 * n * (c * a * b + c * b * d),
                          (n * o + 2 * n * c * b + n * i) * 4, launches=2),
                  Step("dx = fl(dY W) + s term (residual epilogue)", bytes=(n * o + i * o + n * i) * e + n * i * 4,
                       tensor_flops=2.0 * n * o * i, kernel="_merged_gemm_fwd_kernel")]
    else:
        steps += [Step("y = x (W + s kron(w1, w2))^T (kron tiles)", bytes=(n * i + i * o + n * o) * e,
                       tensor_flops=2.0 * n * o * i, kernel="_merged_gemm_fwd_kernel"),
                  Step("dx = dY (W + s kron(w1, w2)) (kron tiles)", bytes=(n * o + i * o + n * i) * e,
                       tensor_flops=2.0 * n * o * i, kernel="_merged_gemm_fwd_kernel"),
                  product("Q = w1^T dY_t (bmm)", 2.0 * n * c * a * b, (n * o + n * c * b) * w)]
    # V = dY w2 (written, read), bmm V_t X_t^T (per-token (a, c) products written, summed), Q^T X
    steps += [product("V = dY w2 (N a, b) x (b, d)", 2.0 * n * a * b * d, (n * o + 2 * n * a * d) * w),
              product("sum_t V_t X_t^T (bmm, then the token sum)", 2.0 * n * a * d * c,
                      (n * a * d + n * i + 2 * n * a * c) * w, launches=2),
              product("d w2 = Q^T X", 2.0 * b * d * n * c, (n * c * b + n * i) * w),
              small("scale, cast, factor products' gradients", 4)]
    return tuple(steps)


def roofline(shape: Shape) -> list[Method]:
    fp32_note = ("PEFT's default float32 adapter on the bf16 base: float32 thin products / contractions on CUDA "
                 "cores, the weight tiles and G on tensor cores")
    found = [
        Method("LoHa r=16, fp32 adapter (PEFT default)", "loha_r16", _loha(shape, True), LOHA_GPU_TARGET,
               note=fp32_note + "; the tiles regenerate each weight tile per 128 tokens (+2 r_pad / 128 tensor)"),
        Method("LoHa r=16, bf16 adapter", "loha_r16_adapter_in_input_dtype", _loha(shape, False), LOHA_GPU_TARGET,
               note="Khatri-Rao thin GEMMs (r^2 = 256) on tensor cores where the plan picks them"),
        Method("LoKr r=16, fp32 adapter (PEFT default)", "lokr_r16", _lokr(shape, -1, True), LOKR_GPU_TARGET,
               note=fp32_note + "; PEFT's rounding points: float32 term after the rounded bf16 GEMM"),
        Method("LoKr r=16 decomposed, fp32 adapter", "lokr_r16_decomposed", _lokr(shape, 16, True),
               LOKR_GPU_TARGET),
        Method("LoKr r=16, bf16 adapter", "lokr_r16", _lokr(shape, -1, False), LOKR_GPU_TARGET,
               note="the bf16-adapter layout of lokr_r16 (no case of its own): factor gradients on tensor cores"),
    ]
    return found
