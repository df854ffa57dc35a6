"""Compile variants of fastadapt/triton_kernels/circulant.py (C3A and FourierFT), as the launchers call
them at the GPU standard shape (N = 8192 tokens, d = 4096), and the family's roofline.

C3A: the merged-weight tiles (b = 64, 256; adapter in the base dtype or PEFT's float32 on a half base),
the block DFT of dY / x (float32 spectra with IEEE dots for a float32 adapter, half spectra with
tensor-core dots for a half adapter) and the per-frequency contraction.  FourierFT: the merged-weight
tiles (n = 1000: IEEE dots on a float32 W, half dots on a half W whatever the spectrum's dtype) and
the bin gather-reduce over the float32 row spectra.
"""
from __future__ import annotations

from benchmarks.compile_report import FEATURES, HALF_DTYPES, ROWS, Variant, mock_tensor
from benchmarks.roofline import Method, Shape, Step, gemm, small

BLOCK_SIZES = (64, 256)
N_FREQUENCY = 1000
C3A_GPU_TARGET, FOURIERFT_GPU_TARGET = 1.20, 1.30
FP16_SPECTRA_REASON = ("float16 activations: float32 block spectra and IEEE fp32 dots, since a b-long DFT of float16 "
                       "values can leave float16's range (4 N d (b + 2) + 4 N d^2 / b FLOPs on CUDA cores)")


def variants() -> dict[str, list[Variant]]:
    import triton

    from fastadapt.triton_kernels import circulant as C
    f = mock_tensor
    out = {"_c3a_weight_fwd_kernel": [], "_block_dft_fwd_kernel": [], "_c3a_bwd_kernel": [],
           "_fourierft_weight_fwd_kernel": [], "_fourierft_bwd_kernel": []}
    tile = 64   # c3a_weight_forward's and fourierft_weight_forward's CUDA tiles
    weight_grid = (triton.cdiv(FEATURES, tile), triton.cdiv(FEATURES, tile))

    def c3a_weight(b, fp32_adapter):
        def build(dtype):
            kernel = "float32" if fp32_adapter else dtype
            args = (f(dtype), f(kernel), f(dtype), FEATURES, FEATURES, b, FEATURES // b, FEATURES, 1, 1.0 / FEATURES)
            return args, dict(BLOCK_O=tile, BLOCK_I=tile)
        return build

    def spectra_dtype(dtype):   # fastadapt.ops.circulant's rule: bfloat16 spectra for bfloat16 x, float32 otherwise
        return "bfloat16" if dtype == "bfloat16" else "float32"

    def block_dft(b, fp32_spectra):
        nb, nf = FEATURES // b, b // 2 + 1

        def build(dtype):
            spectra = spectra_dtype(dtype)
            args = (f(dtype), f("float32"), f(spectra), ROWS, nb, b, nf, FEATURES, 1)
            ieee = spectra == "float32"
            return args, dict(IEEE=ieee, **C.block_dft_tiles(b, ieee, cuda=True))
        tiles = C.block_dft_tiles(b, fp32_spectra, cuda=True)    # the grid does not depend on IEEE
        return build, (triton.cdiv(ROWS, tiles["BLOCK_T"]), nb, triton.cdiv(nf, tiles["BLOCK_F"]))

    def contraction(b, fp32_spectra):
        m, nf = FEATURES // b, b // 2 + 1

        def plan(ieee):
            config = C.c3a_bwd_tiles(m, m, ieee, cuda=True)
            tiles = triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(m, config["BLOCK_N"])
            return config, tiles, C.token_split(ROWS, nf * tiles, config["BLOCK_T"])

        def build(dtype):
            spectra = spectra_dtype(dtype)
            config, _, (_, t_per_split) = plan(spectra == "float32")
            args = (f(spectra), f(spectra), f("float32"), ROWS, m, m, nf, t_per_split)
            return args, dict(IEEE=spectra == "float32", **config)
        _, tiles, (split, _) = plan(fp32_spectra)
        return build, (nf, tiles, split)

    for b in BLOCK_SIZES:
        out["_c3a_weight_fwd_kernel"].append(Variant(f"b={b} W + dW", c3a_weight(b, False), grid=weight_grid,
                                                     scope="parameters", standard=True))
        out["_c3a_weight_fwd_kernel"].append(Variant(f"b={b} W + dW, float32 kernel", c3a_weight(b, True),
                                                     HALF_DTYPES, grid=weight_grid, scope="parameters",
                                                     standard=True))
        for dtypes, what, reason in ((("bfloat16",), "bfloat16 spectra", ""),
                                     (("float32", "float16"), "float32 spectra", FP16_SPECTRA_REASON)):
            fp32_spectra = dtypes != ("bfloat16",)
            build, grid = block_dft(b, fp32_spectra)
            out["_block_dft_fwd_kernel"].append(Variant(f"b={b}, {what}", build, dtypes, grid=grid, standard=True,
                                                        ieee_reason=reason))
            build, grid = contraction(b, fp32_spectra)
            out["_c3a_bwd_kernel"].append(Variant(f"b={b}, {what}", build, dtypes, grid=grid, standard=True,
                                                  ieee_reason=reason))

    def fourierft_weight(fp32_spectrum):
        def build(dtype):
            spectrum = "float32" if fp32_spectrum else dtype
            args = (f(dtype), f("int64"), f("int64"), f(spectrum), f("float32"), f("float32"), f(dtype),
                    FEATURES, FEATURES, N_FREQUENCY, FEATURES, 1, 150.0 / FEATURES ** 2)
            return args, dict(IEEE=dtype == "float32", **C.fourierft_weight_tiles(dtype == "float32", cuda=True))
        return build

    for dtypes in (("float32",), HALF_DTYPES):
        tiles = C.fourierft_weight_tiles(dtypes == ("float32",), cuda=True)
        grid = (triton.cdiv(FEATURES, tiles["BLOCK_O"]), triton.cdiv(FEATURES, tiles["BLOCK_I"]))
        tile_name = "x".join(str(tiles[k]) for k in ("BLOCK_O", "BLOCK_I", "BLOCK_K"))
        out["_fourierft_weight_fwd_kernel"].append(Variant(f"n={N_FREQUENCY} W + dW, {tile_name}",
                                                           fourierft_weight(False), dtypes, grid=grid,
                                                           scope="parameters", standard=True))
    out["_fourierft_weight_fwd_kernel"].append(Variant(f"n={N_FREQUENCY} W + dW, float32 spectrum",
                                                       fourierft_weight(True), HALF_DTYPES, grid=weight_grid,
                                                       scope="parameters", standard=True))
    blocks = triton.cdiv(N_FREQUENCY, C.FOURIERFT_BWD_TILES["BLOCK_K"])
    split, t_per_split = C.token_split(ROWS, blocks, C.FOURIERFT_BWD_TILES["BLOCK_T"])
    bins = FEATURES // 2 + 1

    def fourierft_bwd(dtype):
        args = (f("float32"), f("float32"), f("int64"), f("int64"), f("float32"), ROWS, N_FREQUENCY, 2 * bins,
                2 * bins, t_per_split)
        return args, dict(C.FOURIERFT_BWD_TILES)

    out["_fourierft_bwd_kernel"].append(Variant(f"n={N_FREQUENCY} (float32 row spectra)", fourierft_bwd,
                                                ("float32",), grid=(blocks, split), standard=True))
    return out


# --------------------------------------------------------------------------------------------
# roofline

def _c3a(shape: Shape, b: int, fp32_adapter: bool) -> tuple:
    """bf16 activations: bf16 block spectra and tensor-core dots whatever the kernel's dtype."""
    s = shape
    nf = b // 2 + 1
    spec = s.elem
    weight = s.d_out * s.d_in
    build = Step("W_eff = W + dW (circulant tiles)", bytes=2 * weight * s.elem + weight // b * (4 if fp32_adapter else 2),
                 kernel="_c3a_weight_fwd_kernel")

    def dft(rows_of, d):
        flops = 2.0 * s.n * d * 2 * nf          # cos and sin parts, b-long dots per frequency
        return Step(f"block DFT of {rows_of}", bytes=s.n * d * s.elem + 2 * nf * (d // b) * s.n * spec,
                    tensor_flops=flops, kernel="_block_dft_fwd_kernel")

    flops = 8.0 * nf * (s.d_out // b) * (s.d_in // b) * s.n      # 4 real dots per frequency
    contraction = Step("per-frequency contraction over tokens", bytes=2 * nf * (s.d_out + s.d_in) // b * s.n * spec,
                       tensor_flops=flops, kernel="_c3a_bwd_kernel")
    return (build, gemm("y = x W_eff^T", s.n, s.d_out, s.d_in),
            build, gemm("dx = dY W_eff", s.n, s.d_in, s.d_out),
            dft("dY", s.d_out), dft("x", s.d_in), contraction,
            small("partials sum, complex, irfft, cast (dK)", 4))


def _fourierft(shape: Shape, n_frequency: int) -> tuple:
    s = shape
    weight = s.d_out * s.d_in
    build = Step("W_eff = W + dW (cos / sin tiles, 2 dots over the coefficients)", bytes=2 * weight * s.elem,
                 tensor_flops=4.0 * n_frequency * weight, kernel="_fourierft_weight_fwd_kernel")
    rows = []
    for name, d in (("dY", s.d_out), ("x", s.d_in)):
        rows += [Step(f"{name}.float()", bytes=s.n * d * (s.elem + 4)),
                 Step(f"rfft rows of {name} (cuFFT)", bytes=s.n * d * 4 + s.n * (d // 2 + 1) * 8)]
    # 8-byte (re, im) pairs gathered column by column: a 32-byte sector per pair and operand
    gather = Step("bin gather-reduce over tokens", bytes=2 * s.n * n_frequency * 32, kernel="_fourierft_bwd_kernel")
    return (small("index plan (bins, signs)", 6), build, gemm("y = x W_eff^T", s.n, s.d_out, s.d_in),
            build, gemm("dx = dY W_eff", s.n, s.d_in, s.d_out), *rows, gather,
            small("partials sum, combine, cast (dc)", 4))


def roofline(shape: Shape) -> list[Method]:
    fp32_note = "PEFT's default float32 kernel on the bf16 base: the same bf16 spectra, a float32 kernel table"
    found = []
    for b in BLOCK_SIZES:
        if shape.d_in % b or shape.d_out % b:
            continue
        found.append(Method(f"C3A b={b}, fp32 adapter (PEFT default)", f"c3a_b{b}", _c3a(shape, b, True),
                            C3A_GPU_TARGET, note=fp32_note))
        if b == 64:
            found.append(Method(f"C3A b={b}, bf16 adapter", f"c3a_b{b}_adapter_in_input_dtype", _c3a(shape, b, False),
                                C3A_GPU_TARGET))
    found.append(Method(f"FourierFT n={N_FREQUENCY}", f"fourierft_n{N_FREQUENCY}", _fourierft(shape, N_FREQUENCY),
                        FOURIERFT_GPU_TARGET,
                        note="dW built once per forward and once per backward: 4 n d^2 tensor FLOPs each, "
                             "independent of N; row FFTs by cuFFT in float32"))
    return found
