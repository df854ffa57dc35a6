"""Compile variants and roofline of fastadapt/triton_kernels/butterfly.py (BOFT, GOFT, HRA, ETHER, RoAd).

``variants()``: every kernel as its launcher calls it at the standard shape (N = 8192, d = 4096),
tiles, grids and row splits from the launcher's own helpers, geometries from
fastadapt.ops.butterfly_plan.  ``roofline(shape)``: the launches of each benchmark case
(benchmarks/cases_butterfly.py) in one forward + backward on the GPU path, as
fastadapt/ops/butterfly*.py and fastadapt/layers/butterfly.py run them today.
"""
from __future__ import annotations

from benchmarks.compile_report import FEATURES, ROWS, Variant, mock_tensor
from benchmarks.roofline import H200, Method, Shape, Step, base_steps, gemm, small

WY_REASON = ("the rank-k projections P = x U and the update (P K) U^T stay IEEE fp32 whatever x's dtype: "
             "2 k FLOPs per element each (k <= 16, memory-bound either way), and P feeds dU and dK, where a "
             "rounded P would cost the reflections' accuracy")


def _pass_geometries():
    """(name, geometry, standard) of the passes the benchmark cases launch at d = 4096, and a
    single wide factor (b = 128: K loop and column tiles)."""
    from fastadapt.ops.butterfly_plan import plan
    out = []
    boft = plan(FEATURES, 8, 2).passes[0]
    out.append((f"BOFT b=8 m<=2 (c={boft.width}, L=1)", boft.geometry, True))
    for p in plan(FEATURES, 2, 12).passes:
        out.append((f"GOFT stages {min(p.factors)}..{max(p.factors)} (c={p.width}, L={p.geometry[2]})", p.geometry,
                    True))
    wide = plan(FEATURES, 128, 1).passes[0]
    out.append((f"BOFT b=128 m=1 (c={wide.width}, K loop)", wide.geometry, False))
    return out


def variants() -> dict[str, list[Variant]]:
    import triton

    from fastadapt.triton_kernels import butterfly as K
    out = {name: [] for name in ("_butterfly_pass_fwd_kernel", "_butterfly_pass_bwd_blocks_kernel",
                                 "_householder_fwd_kernel", "_road_fwd_kernel", "_road_bwd_kernel",
                                 "_scale_fwd_kernel", "_scale_bwd_kernel")}

    def pass_fwd(geometry, rows, transposed):
        A, M, L, H = geometry
        c = M * H

        def build(dtype):
            tiles = K.pass_tiles(c, dtype != "float32")
            b_strides = (c * c, 1, c) if transposed else (c * c, c, 1)   # W C^T runs on B^T (a view)
            args = (mock_tensor(dtype), mock_tensor("float32"), mock_tensor(dtype), rows, c, M, L, H, FEATURES, 1,
                    *b_strides, FEATURES)
            return args, dict(SPLIT_B=dtype != "float32", **tiles)
        return build

    def pass_grid(geometry, rows, dtype="bfloat16"):
        A, M, L, H = geometry
        tiles = K.pass_tiles(M * H, dtype != "float32")
        return (triton.cdiv(rows, tiles["BLOCK_M"]), A * L, triton.cdiv(M * H, tiles["BLOCK_N"]))

    def pass_grad(geometry):
        A, M, L, H = geometry
        c = M * H
        tiles = K.pass_tiles(c, True, reduction=True)
        n_tiles = triton.cdiv(c, tiles["BLOCK_N"])
        splits, rows_per_split = K.row_splits(ROWS, tiles["BLOCK_M"], A * L * n_tiles * n_tiles)

        def build(dtype):
            t = K.pass_tiles(c, dtype != "float32", reduction=True)
            s, per = K.row_splits(ROWS, t["BLOCK_M"], A * L * n_tiles * n_tiles)
            args = (mock_tensor(dtype), mock_tensor(dtype), mock_tensor("float32"), ROWS, c, M, L, H, per, n_tiles,
                    FEATURES, 1, FEATURES, 1, A * L * c * c, c * c)
            return args, dict(HALF_DOT=dtype != "float32", **t)
        return build, (A * L, n_tiles * n_tiles, splits)

    for name, geometry, standard in _pass_geometries():
        grid = pass_grid(geometry, ROWS)
        out["_butterfly_pass_fwd_kernel"].append(Variant(f"{name}: x C", pass_fwd(geometry, ROWS, False), grid=grid,
                                                         standard=standard))
        out["_butterfly_pass_fwd_kernel"].append(Variant(f"{name}: W C^T (weight side, 4096 rows)",
                                                         pass_fwd(geometry, FEATURES, True),
                                                         grid=pass_grid(geometry, FEATURES), standard=standard))
        build, grid = pass_grad(geometry)
        out["_butterfly_pass_bwd_blocks_kernel"].append(Variant(f"{name}: dB = x^T g", build, grid=grid,
                                                                standard=standard))

    def householder(n, b, k, transposed_k):
        def build(dtype):
            tiles = K.householder_tiles(b, k, rows=ROWS, blocks=n, sms=H200.sms)
            k_strides = (0, 1, k) if transposed_k else (0, k, 1)   # backward runs K^T (a view)
            args = (mock_tensor(dtype), mock_tensor("float32"), mock_tensor("float32"), mock_tensor(dtype),
                    mock_tensor("float32"), ROWS, b, k, FEATURES, 1, b * k, k, 1, *k_strides, FEATURES, ROWS * k, k)
            return args, tiles
        return build

    for label, n, b, k in (("HRA r=8", 1, FEATURES, 8), ("ETHER n=32", 32, FEATURES // 32, 1),
                           ("ETHER+ n=32", 32, FEATURES // 32, 2)):
        grid = (triton.cdiv(ROWS, K.householder_tiles(b, k, rows=ROWS, blocks=n, sms=H200.sms)["BLOCK_M"]), n)
        for direction, transposed in (("z = x - (x U K) U^T", False), ("dx = g - (g U K^T) U^T", True)):
            out["_householder_fwd_kernel"].append(Variant(f"{label}: {direction}", householder(n, b, k, transposed),
                                                          grid=grid, standard=True, ieee_reason=WY_REASON))

    group, out_features = 64, FEATURES
    half = group // 2
    road = K.road_tiles(half)
    road_grid = (triton.cdiv(ROWS, road["BLOCK_M"]), out_features // group, triton.cdiv(half, road["BLOCK_C"]))
    out["_road_fwd_kernel"].append(Variant(
        f"group {group}", lambda dtype: ((mock_tensor(dtype), mock_tensor("float32"), mock_tensor("float32"),
                                          mock_tensor(dtype), ROWS, half, out_features, 1, out_features), road),
        grid=road_grid, standard=True))
    chunks = triton.cdiv(half, road["BLOCK_C"])
    splits, per = K.row_splits(ROWS, road["BLOCK_M"], out_features // group * chunks)
    for need_h in (True, False):
        out["_road_bwd_kernel"].append(Variant(
            f"group {group}, dh {'and' if need_h else 'without'} df, dg",
            lambda dtype, need_h=need_h: ((mock_tensor(dtype), mock_tensor(dtype), mock_tensor("float32"),
                                           mock_tensor("float32"), mock_tensor(dtype), mock_tensor("float32"), ROWS,
                                           half, out_features, per, out_features, 1, out_features, 1, out_features,
                                           2 * out_features), dict(NEED_H=need_h, **road)),
            grid=(out_features // group, chunks, splits), standard=need_h))

    scale = K.scale_tiles()
    scale_chunks = triton.cdiv(out_features, scale["BLOCK_C"])
    out["_scale_fwd_kernel"].append(Variant(
        "y = h o s + b (float32 s, b)",
        lambda dtype: ((mock_tensor(dtype), mock_tensor("float32"), mock_tensor("float32"), mock_tensor(dtype), ROWS,
                        out_features, out_features, 1, out_features), dict(HAS_BIAS=True, **scale)),
        grid=(triton.cdiv(ROWS, scale["BLOCK_M"]), scale_chunks), standard=True))
    splits, per = K.row_splits(ROWS, scale["BLOCK_M"], scale_chunks)
    out["_scale_bwd_kernel"].append(Variant(
        "ds = sum dy o h, db = sum dy",
        lambda dtype: ((mock_tensor(dtype), mock_tensor(dtype), mock_tensor("float32"), ROWS, out_features, per,
                        out_features, 1, out_features, 1, 2 * out_features), scale),
        grid=(scale_chunks, splits), standard=True))
    return out


# --------------------------------------------------------------------------------------------
# roofline: what each benchmark case launches on the GPU path

GPU_TARGETS = {"boft": 1.20, "goft": 1.20, "hra": 1.15, "road": 1.05}   # DESIGN section 7, GPU bf16


def _pass(what: str, rows: int, d: int, c: int, elem: int, out_elem: int, half: bool) -> Step:
    """One butterfly pass: read and write each element once, 2 c FLOPs per element (two tensor-core
    dots with B split hi + lo on a half input, IEEE fp32 otherwise)."""
    flops = 2.0 * rows * d * c
    return Step(what, rows * d * (elem + out_elem), tensor_flops=2 * flops if half else 0.0,
                fp32_flops=0.0 if half else flops, kernel="_butterfly_pass_fwd_kernel")


def _pass_grad(what: str, rows: int, d: int, c: int, elem: int, half: bool) -> Step:
    flops = 2.0 * rows * d * c
    return Step(what, 2 * rows * d * elem + 4 * d * c * 4, tensor_flops=flops if half else 0.0,
                fp32_flops=0.0 if half else flops, kernel="_butterfly_pass_bwd_blocks_kernel")


def _chain_steps(s: Shape, widths: list[int], *, scale: bool, factors: int) -> tuple:
    """BOFT / GOFT on the weight side (N > d_out): W C^T per pass, the GEMM, the epilogue; backward
    dx = dY (W_s C^T) and the walk of (x, dx) over the passes (orthogonal passes)."""
    e, half = s.elem, s.elem == 2
    out_rows = s.d_out
    steps = [small("Cayley / Givens blocks and their pass blocks (parameter-sized torch)", 6 + 4 * factors)]
    steps += [_pass(f"W C^T pass (c={c})", out_rows, s.d_in, c, e, e, half) for c in widths]
    fwd, bwd = base_steps(s)
    steps.append(fwd)
    if scale:
        steps.append(Step("y = h o s + b (fp32, one rounding)", s.n * s.d_out * 2 * e, kernel="_scale_fwd_kernel"))
        steps.append(Step("ds, db: one read of dY and h", 2 * s.n * s.d_out * e, kernel="_scale_bwd_kernel"))
        steps.append(small("W_s = diag(s) W", 1, 2 * s.d_out * s.d_in * e))
    steps += [_pass(f"W_s C^T pass (c={c})", out_rows, s.d_in, c, e, e, half) for c in widths]
    steps.append(bwd)
    for k, c in enumerate(widths):   # g <- g P_k; dB_k = grad(v, g); v <- v P_k (not after the last)
        if len(widths) > 1:
            steps.append(_pass(f"g <- g P_{k} (fp32 out)", s.n, s.d_in, c, e if k == 0 else 4, 4, False if k else half))
        steps.append(_pass_grad(f"dB_{k} = v^T g (c={c})", s.n, s.d_in, c, e if k == 0 else 4, half and k == 0))
        if k < len(widths) - 1:
            steps.append(_pass(f"v <- v P_{k} (fp32 out)", s.n, s.d_in, c, e if k == 0 else 4, 4, half and k == 0))
    if len(widths) == 1:
        steps.append(small("dB = grad(x, dx) B (c x c products)", 1))
    steps.append(small("pass blocks -> factor blocks -> parameters (autograd, torch)", 4 + 6 * factors))
    return tuple(steps)


def _householder_steps(s: Shape, k: int, n: int) -> tuple:
    """HRA / ETHER: z = x - ((x U) K) U^T (one program per row tile and block, x read twice: the
    second read an L2 hit), the base, dx through the same kernel with K^T, dU and dK from x, g,
    P, Q (torch: thin GEMMs for HRA, per-block sums for ETHER)."""
    e = s.elem
    fwd, bwd = base_steps(s)
    wy = 2 * 2.0 * s.n * s.d_in * k
    return (small("U, T (compact WY) from the parameters", 8),
            Step(f"z = x - ((x U) K) U^T, P (k={k})", s.n * s.d_in * 2 * e + s.n * n * k * 4, fp32_flops=wy,
                 kernel="_householder_fwd_kernel"),
            fwd, bwd,
            Step(f"dx = g - ((g U) K^T) U^T, Q (k={k})", s.n * s.d_in * 2 * e + s.n * n * k * 4, fp32_flops=wy,
                 kernel="_householder_fwd_kernel"),
            gemm("dU^T = K Q^T x + K^T P^T g (two thin GEMMs)", k, s.d_in, 2 * s.n, extra_bytes=0.0),
            small("dK, U and T backward (torch)", 10))


def _road_steps(s: Shape) -> tuple:
    e = s.elem
    fwd, bwd = base_steps(s)
    return (small("f, g from theta, alpha", 6),
            fwd,
            Step("y = R h (pairs)", 2 * s.n * s.d_out * e, kernel="_road_fwd_kernel"),
            Step("dh, df, dg: one read of dY and h", 3 * s.n * s.d_out * e, kernel="_road_bwd_kernel"),
            bwd,
            small("theta, alpha backward", 6))


def roofline(shape: Shape) -> list[Method]:
    from fastadapt.ops.butterfly_plan import plan
    out = []
    if shape.n <= shape.d_out:   # the paths below are the weight side (N > d_out): the benchmark shapes
        return out
    boft = [p.width for p in plan(shape.d_in, 8, 2).passes]
    for m in (1, 2):
        out.append(Method(f"BOFT b=8 m={m}", f"boft_b8_m{m}", _chain_steps(shape, boft, scale=True, factors=m),
                          GPU_TARGETS["boft"], note="weight side: W C^T and W_s C^T passes, no pass over the "
                                                    "activations but the block gradient"))
    if shape.d_in & (shape.d_in - 1) == 0:
        goft = [p.width for p in plan(shape.d_in, 2, shape.d_in.bit_length() - 1).passes]
        out.append(Method("GOFT (log2 d stages)", "goft", _chain_steps(shape, goft, scale=False,
                                                                       factors=shape.d_in.bit_length() - 1),
                          GPU_TARGETS["goft"], note="bf16 goft_theta: the walk's second pass in fp32"))
    out.append(Method("HRA r=8, bf16 hra_u", "hra_r8 (autocast_adapter_dtype=False)", _householder_steps(shape, 8, 1),
                      GPU_TARGETS["hra"], note="PEFT's default fp32 hra_u on a bf16 base runs x, W and the GEMMs in "
                                               "fp32 as PEFT does (not modelled: CUDA-core GEMMs)"))
    out.append(Method("ETHER n=32", "ether_n32", _householder_steps(shape, 1, 32)))
    out.append(Method("RoAd road_1", "road_1", _road_steps(shape), GPU_TARGETS["road"]))
    return out
