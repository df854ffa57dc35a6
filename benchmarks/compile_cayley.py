"""Compile variants and roofline of fastadapt/triton_kernels/cayley.py (OFT, PSOFT, SSVD, AntiPaSTO).

``variants()``: every kernel as its launcher calls it at the standard shape (N = 8192, d = 4096),
tiles and warps from the launcher's own helpers.  ``roofline(shape)``: the launches of each
benchmark case (benchmarks/cases_cayley.py) in one forward + backward on the GPU path, as
fastadapt/ops/cayley.py and fastadapt/layers/cayley.py run them today.
"""
from __future__ import annotations

import dataclasses

from benchmarks.compile_report import FEATURES, FLOAT_DTYPES, HALF_DTYPES, ROWS, Variant, mock_tensor
from benchmarks.roofline import ACHIEVABLE, H200, Method, Shape, Step, base_steps, gemm, small

TILE_REASON = ("b x b tiles in fp32 whatever the parameter dtype (R orthogonal to fp32 rounding); "
               "parameter-sized: d / b programs of O(b^3), independent of the tokens")
TILE_SPILL = ("IEEE fp32 (B, B) tile products at B >= 64: 3-4 live fp32 tiles per program, ptxas settles at "
              "32 registers and a stack.  Parameter-sized (d / b programs, independent of N).  To remove: the "
              "b >= 64 products on tensor cores (tf32x3 / bf16x3 splits: the b = 128 programs then need > 227 KB "
              "of shared memory) or split over K; the GPU run's benchmarks/cayley_solvers.py times them first")
# Work per block of each Cayley launch as the kernels run it: (FLOPs in units of one b x b x b product,
# 2 b^3; the dependent chain that keeps a block in one program).  Newton-Schulz: per iteration (its
# count depends on ||Q||: 3 at ||Q||_2 ~ 0.5, module docstring of triton_kernels/cayley.py).
BLOCK_WORK = {
    "exact elimination": (2, "b pivots, each a rank-1 update of two tiles that needs the previous pivot's"),
    "exact newton_schulz": (2, "per iteration 2 tile products, each needing the previous"),
    "neumann 5": (3, "3 chained tile products (Q^2, Q^3, Q^4)"),
    "exact": (2, "2 chained tile products (N^T G, then times N^T) and the skew adjoint dQ - dQ^T, which "
                 "pairs entry (r, c) with (c, r)"),
    "neumann 5 (closed form)": (5, "5 tile products in 3 dependent rounds and the skew adjoint"),
    "neumann 7 (Horner)": (15, "5 Horner steps of 3 tile products, each step needing the previous"),
}


def block_launch_reason(b: int, what: str) -> str:
    """Why a Cayley launch keeps one program per b x b block (d / b programs), with the microseconds
    at stake: the block's FFMA work on one SM each against the same work spread over all the SMs
    (the roofline's achievable fp32 rate); elimination: its b dependent pivots set a latency floor."""
    n = FEATURES // b
    products, chain = BLOCK_WORK[what]
    flops = products * 2.0 * b ** 3
    rate = H200.fp32_flops * ACHIEVABLE.fp32
    on_blocks, spread = flops / (rate / H200.sms), n * flops / rate
    per = " per iteration" if "newton" in what else ""
    text = (f"one program per {b} x {b} rotation block ({n} at d = {FEATURES}): {chain}; splitting a block over "
            f"programs needs its intermediate tiles exchanged between programs at every dependent step (a launch "
            f"each) or recomputed in each; {flops / 1e6:.2f} MFLOP per block{per}: "
            f"{on_blocks * 1e6:.2f} us on {n} SMs vs {spread * 1e6:.2f} us spread over {H200.sms} (fp32 FFMA at the "
            f"roofline's achievable rate): {(on_blocks - spread) * 1e6:.2f} us at stake{per}")
    if what == "exact elimination":
        text += (f"; latency-bound anyway: {b} pivots x {ELIMINATION_STEP_S * 1e6:.1f} us = "
                 f"{b * ELIMINATION_STEP_S * 1e6:.1f} us whatever the SM count")
    elif on_blocks - spread < H200.launch_gap_s:
        text += f", under the {H200.launch_gap_s * 1e6:.0f} us launch gap"
    else:
        text += "; the b >= 64 fp32 tiles spill too (accepted_spill): benchmarks/cayley_solvers.py times them first"
    return text


HORNER_SPILL = ("Neumann k != 5 only (PEFT's default k = 5 runs the closed form): the Horner step keeps S, dQ, "
                "G and P live; parameter-sized")


def variants() -> dict[str, list[Variant]]:
    from fastadapt.triton_kernels import cayley as C
    out = {"_cayley_fwd_kernel": [], "_cayley_bwd_kernel": [], "_block_rotate_fwd_kernel": [],
           "_block_rotate_bwd_weight_kernel": [], "_svd_core_fwd_kernel": []}

    def fwd(b, terms, solver):
        BLOCK = C._block_width(b)

        def build(dtype):
            args = (mock_tensor(dtype), mock_tensor(dtype), b, b * (b - 1) // 2, b * b)
            return args, dict(BLOCK=BLOCK, NEUMANN_TERMS=terms, NEUMANN_TOP=max(3, terms - 1),
                              SOLVER=C.EXACT_SOLVERS[solver], NS_MAX_ITERS=C.NS_MAX_ITERS, NS_TOL=C.NS_TOL,
                              num_warps=C._tile_warps(BLOCK))
        return build

    def bwd(b, terms):
        BLOCK = C._block_width(b)

        def build(dtype):
            src_stride = b * b if terms == 0 else b * (b - 1) // 2     # R (exact) or packed (Neumann)
            args = (mock_tensor(dtype), mock_tensor(dtype), mock_tensor(dtype), b, src_stride, b * b, b, 1,
                    b * (b - 1) // 2)
            return args, dict(BLOCK=BLOCK, NEUMANN_TERMS=terms, NEUMANN_TOP=max(3, terms - 1),
                              num_warps=C._tile_warps(BLOCK))
        return build

    def rotate(b, transposed, split=False):
        BLOCK = C._block_width(b)

        def build(dtype):
            r_strides = (b * b, 1, b) if transposed else (b * b, b, 1)   # dx runs on R^T (a view)
            r_dtype = "float32" if split else dtype   # split: PEFT's float32 R on a half x
            args = (mock_tensor(dtype), mock_tensor(r_dtype), mock_tensor(dtype), ROWS, b, FEATURES, 1, *r_strides,
                    FEATURES)
            return args, dict(BLOCK_M=16 if BLOCK >= 128 else 64, BLOCK=BLOCK, IEEE=dtype == "float32", SPLIT=split)
        return build

    def rotate_grid(b):
        return (-(-ROWS // (16 if C._block_width(b) >= 128 else 64)), FEATURES // b)

    def rotate_weight(b):
        import triton
        BLOCK = C._block_width(b)
        BLOCK_M = 16 if BLOCK >= 128 else 32
        n = FEATURES // b
        splits = max(1, min(triton.cdiv(ROWS, 4 * BLOCK_M), triton.cdiv(256, n)))
        rows_per_split = triton.cdiv(triton.cdiv(ROWS, splits), BLOCK_M) * BLOCK_M

        def build(dtype):
            args = (mock_tensor(dtype), mock_tensor(dtype), mock_tensor("float32"), ROWS, b, rows_per_split,
                    FEATURES, 1, FEATURES, 1, n * b * b, b * b)
            return args, dict(BLOCK_M=BLOCK_M, BLOCK=BLOCK, IEEE=dtype == "float32", num_warps=C._tile_warps(BLOCK))
        return build, (n, triton.cdiv(ROWS, rows_per_split))

    def svd_core(r, split=False):
        def build(dtype):
            adapter = "float32" if split else dtype   # split: PEFT's float32 A, C (and z, u) on a half x
            args = (mock_tensor(dtype), *(mock_tensor(adapter) for _ in range(4)), ROWS, FEATURES, r, FEATURES, 1,
                    FEATURES, 1, r, 1, r)
            return args, dict(IEEE=dtype == "float32", SPLIT=split, **C.svd_core_tiles(r))
        return build

    # The tile kernels compute in fp32 whatever the parameter dtype (it only changes the load and
    # store conversions), and the (B, B) fp32 IEEE tl.dot at B = 64 / 128 unrolls into ~16k FMA per
    # thread per dot: 10-110 s of ptxas each.  So half dtypes at b <= 32 by default, all with --exhaustive.
    for b in (16, 32, 64, 128):
        dtypes, extra = (FLOAT_DTYPES, ()) if b <= 32 else (("float32",), HALF_DTYPES)
        tiles = dict(grid=(FEATURES // b,), scope="parameters", ieee_reason=TILE_REASON)
        spill = {t: TILE_SPILL for t in FLOAT_DTYPES} if b >= 64 else None
        def launch(what):
            return block_launch_reason(b, what) if FEATURES // b < H200.sms else ""
        for solver in C.EXACT_SOLVERS:
            out["_cayley_fwd_kernel"].append(Variant(
                f"b={b} exact {solver}", fwd(b, 0, solver), dtypes, extra, **tiles,
                standard=b in (32, 128) and solver == C.DEFAULT_EXACT_SOLVER,
                accepted_spill=spill if solver == "newton_schulz" else None, accepted_launch=launch(f"exact {solver}")))
        out["_cayley_fwd_kernel"].append(Variant(f"b={b} neumann 5", fwd(b, 5, C.DEFAULT_EXACT_SOLVER), dtypes, extra,
                                                 **tiles, standard=b in (32, 128), accepted_spill=spill,
                                                 accepted_launch=launch("neumann 5")))
        out["_cayley_bwd_kernel"].append(Variant(f"b={b} exact", bwd(b, 0), dtypes, extra, **tiles,   # 2 products
                                                 standard=b in (32, 128), accepted_spill=spill if b >= 128 else None,
                                                 accepted_launch=launch("exact")))
        out["_cayley_bwd_kernel"].append(Variant(f"b={b} neumann 5 (closed form)", bwd(b, 5), dtypes, extra, **tiles,
                                                 standard=b in (32, 128), accepted_spill=spill,
                                                 accepted_launch=launch("neumann 5 (closed form)")))
        horner = (dtypes, extra) if b <= 64 else ((), FLOAT_DTYPES)   # PEFT's default is 5 terms
        horner_spill = {t: TILE_SPILL if b >= 64 else HORNER_SPILL for t in FLOAT_DTYPES} if b >= 32 else None
        out["_cayley_bwd_kernel"].append(Variant(f"b={b} neumann 7 (Horner)", bwd(b, 7), *horner, **tiles,
                                                 accepted_spill=horner_spill,
                                                 accepted_launch=launch("neumann 7 (Horner)")))
    for b in (32, 128):
        grid = rotate_grid(b)
        out["_block_rotate_fwd_kernel"].append(Variant(f"b={b} y = x R", rotate(b, False), grid=grid, standard=True))
        out["_block_rotate_fwd_kernel"].append(Variant(f"b={b} dx = dy R^T", rotate(b, True), grid=grid,
                                                       standard=True))
        for what, transposed in (("y = x R", False), ("dx = dy R^T", True)):
            out["_block_rotate_fwd_kernel"].append(Variant(
                f"b={b} {what}, float32 R split in two half products", rotate(b, transposed, split=True),
                HALF_DTYPES, grid=grid, standard=True))
        build, grid = rotate_weight(b)
        out["_block_rotate_bwd_weight_kernel"].append(Variant(f"b={b} dR", build, grid=grid, standard=True))
    for r in (32, 128):
        grid = (-(-ROWS // C.svd_core_tiles(r)["BLOCK_M"]),)
        launch = svd_core_launch_reason(r) if grid[0] < H200.sms else ""
        out["_svd_core_fwd_kernel"].append(Variant(
            f"r={r}", svd_core(r), grid=grid, standard=r == 32,
            ieee_reason="the r x r core product u = z C^T stays IEEE fp32 on the fp32 accumulator z "
                        "(2 N r^2 FLOPs: r / d of z = x A^T's)", accepted_launch=launch))
        out["_svd_core_fwd_kernel"].append(Variant(
            f"r={r}, float32 A and C split in two half products", svd_core(r, split=True), HALF_DTYPES, grid=grid,
            standard=r == 32, ieee_reason="u = z C^T on the fp32 z, as above", accepted_launch=launch))
    return out


def svd_core_launch_reason(r: int, elem: int = 2) -> str:
    """Why svd_core keeps its row tiles when N / BLOCK_M is just under the SMs (128 of 132 at the
    standard shape): the microseconds the idle SMs can cost against the L2 reads halving the tile adds."""
    from fastadapt.triton_kernels import cayley as C
    block_m = C.svd_core_tiles(r)["BLOCK_M"]
    programs = -(-ROWS // block_m)
    x_bytes = ROWS * FEATURES * elem
    floor = x_bytes / H200.hbm_bytes_per_s
    a_reads = programs * C.svd_core_tiles(r)["BLOCK_R"] * FEATURES * elem
    return (f"{block_m}-row tiles: {programs} programs, {H200.sms - programs} of {H200.sms} SMs idle; the pass streams "
            f"x ({x_bytes / 2 ** 20:.0f} MiB: {floor * 1e6:.1f} us at 4.8 TB/s), so at most "
            f"{(H200.sms - programs) / H200.sms:.0%} of it, {floor * (H200.sms - programs) / H200.sms * 1e6:.2f} us, "
            f"is at stake; {block_m // 2}-row tiles ({2 * programs} programs) would double A's reads from L2 "
            f"(every program reads all of A: {a_reads / 2 ** 20:.0f} -> {2 * a_reads / 2 ** 20:.0f} MiB beside x's "
            f"{x_bytes / 2 ** 20:.0f} MiB), and a split over K needs z whole before u = z C^T (a second launch)")


# --------------------------------------------------------------------------------------------
# roofline: what each benchmark case launches on the GPU path

ELIMINATION_STEP_S = 0.2e-6   # assumed: one pivot step = 3 block-wide reductions + barriers (~400 cycles)
GPU_TARGETS = {32: 1.12}      # DESIGN section 7: OFT b=32 GPU bf16 <= 1.12 (no GPU row for b = 128)


def _cayley_steps(n: int, b: int, neumann: bool) -> list[Step]:
    """packed -> R and dL/dR -> dL/dpacked: one program per block, fp32 (B, B) tiles (B = b here).
    Neumann mode keeps no R: its backward reruns the forward launch before the adjoint's."""
    packed_and_r = n * (b * (b - 1) // 2 + b * b) * 4
    if neumann:   # forward: 3 tile products; backward closed form: 5
        forward = Step(f"R = Neumann-5(Q), {n} blocks", packed_and_r, fp32_flops=n * 3 * 2 * b ** 3,
                       kernel="_cayley_fwd_kernel", programs=n)
        backward = Step(f"dL/dpacked, Neumann-5 adjoint, {n} blocks", packed_and_r + n * b * b * 4,
                        fp32_flops=n * 5 * 2 * b ** 3, kernel="_cayley_bwd_kernel", programs=n)
        monitor = small("Neumann divergence monitor (skew, norms, copy to host)", 8, 4 * n * b * b * 4)
        rerun = dataclasses.replace(forward, what=f"R = Neumann-5(Q) rerun in the backward, {n} blocks")
        return [forward, monitor, rerun, backward]
    forward = Step(f"R = cayley(Q) by elimination, {n} blocks", packed_and_r, fp32_flops=n * 4 * b ** 3,
                   kernel="_cayley_fwd_kernel", programs=n, latency_s=b * ELIMINATION_STEP_S)
    backward = Step(f"dL/dpacked = skew(2 N^T G N^T), {n} blocks", 2 * packed_and_r, fp32_flops=n * 2 * 2 * b ** 3,
                    kernel="_cayley_bwd_kernel", programs=n)
    return [forward, small("negate packed (R = cayley(-Q)) and its gradient", 2), backward]


def _cayley_forward_steps(n: int, b: int, neumann: bool) -> list[Step]:
    """The forward's share of :func:`_cayley_steps` (R, and the negation or the monitor)."""
    return _cayley_steps(n, b, neumann)[:2]


def _cayley_backward_steps(n: int, b: int, neumann: bool) -> list[Step]:
    """The backward's share (Neumann: the rerun of R, then dL/dpacked)."""
    return _cayley_steps(n, b, neumann)[2:]


def _block_grad_steps(s: Shape, b: int, elem: int) -> list[Step]:
    """dR_i = x_i^T g_i: the split-M kernel over x and g, then the partial sum."""
    import triton
    n = s.d_in // b
    block_m = 16 if b >= 128 else 32
    splits = max(1, min(triton.cdiv(s.n, 4 * block_m), triton.cdiv(256, n)))
    partial = splits * n * b * b * 4
    fp32 = elem == 4
    flops = 2.0 * s.n * s.d_in * b
    return [Step(f"dR = x^T g per block ({splits} splits)", 2 * s.n * s.d_in * elem + partial,
                 tensor_flops=0.0 if fp32 else flops, fp32_flops=flops if fp32 else 0.0,
                 kernel="_block_rotate_bwd_weight_kernel", programs=n * splits),
            small("sum the dR partials, cast", 2, partial + 2 * n * b * b * 4)]


def _rotate(what: str, rows: int, d: int, b: int, elem: int, out_elem: int | None = None,
            split: bool = False) -> Step:
    """The block rotation kernel over ``rows`` x d: IEEE fp32 dots (FFMA) for fp32 data, half
    tensor-core dots for half data; ``split``: a float32 R on half data, two half dots."""
    flops = 2.0 * rows * d * b
    fp32 = elem == 4
    return Step(what, rows * d * (elem + (out_elem or elem)), tensor_flops=0.0 if fp32 else flops * (2 if split else 1),
                fp32_flops=flops if fp32 else 0.0, kernel="_block_rotate_fwd_kernel")


def _oft_fp32_adapter(s: Shape, b: int, neumann: bool) -> tuple:
    """PEFT's default (fp32 oft_R on a bf16 base): the oft_linear ops in the mixed layout
    (fastadapt/ops/cayley_oft.py): R in fp32; forward rotates W when N > d_out, else x, R split
    into two bf16 operands (two tensor-core dots), rounded once to bf16; backward (x side, as for
    any half x) g = dY W, dR from x and g (half dots, fp32 accumulation, fp32 out), dx = g R^T
    (split again).  No fp32 copy of x or of the gradient."""
    e, n = s.elem, s.d_in // b
    base_fwd, base_bwd = base_steps(s)
    rotate_fwd = (_rotate("W' = W R_bd^T (fp32 R, split)", s.d_out, s.d_in, b, e, split=True) if s.n > s.d_out
                  else _rotate("x R_bd (fp32 R, split)", s.n, s.d_in, b, e, split=True))
    return tuple([
        *_cayley_forward_steps(n, b, neumann),
        rotate_fwd,
        base_fwd,
        base_bwd,
        *_block_grad_steps(s, b, e),
        _rotate("dx = g R_bd^T (fp32 R, split)", s.n, s.d_in, b, e, split=True),
        *_cayley_backward_steps(n, b, neumann),
    ])


def _oft_same_dtype(s: Shape, b: int, neumann: bool) -> tuple:
    """packed in the input dtype (autocast_adapter_dtype=False): the oft_linear ops' triton
    implementation: forward rotates W when N > d_out, else x; backward g = dY W, dR from x and g,
    dx = g R^T (bf16 never takes the orthogonal weight-side shortcut)."""
    e, n = s.elem, s.d_in // b
    base_fwd, base_bwd = base_steps(s)
    weight_side = s.n > s.d_out
    rotate_fwd = (_rotate("W' = W R_bd^T", s.d_out, s.d_in, b, e) if weight_side
                  else _rotate("x R_bd", s.n, s.d_in, b, e))
    return tuple([
        *_cayley_forward_steps(n, b, neumann),
        rotate_fwd,
        base_fwd,
        base_bwd,
        *_block_grad_steps(s, b, e),
        _rotate("dx = g R_bd^T", s.n, s.d_in, b, e),
        *_cayley_backward_steps(n, b, neumann),
    ])


def _psoft(s: Shape, r: int = 32) -> tuple:
    """PSOFT with x, A, B, W and psoft_R in one dtype: svd_core (z, u in one pass over x), the base
    GEMM plus u B^T accumulated into y, backward dy B, dz = du C, dx = dY W + dz A, dC = du^T z."""
    e = s.elem
    base_fwd, base_bwd = base_steps(s)
    return tuple([
        small("psoft_core: vectors, scaling, Cayley of the r x r core", 10),
        Step(f"z = x A^T, u = z C^T (r={r})", s.n * s.d_in * e + 2 * s.n * r * e,
             tensor_flops=2.0 * s.n * s.d_in * r, fp32_flops=2.0 * s.n * r * r, kernel="_svd_core_fwd_kernel"),
        base_fwd,
        gemm("y += u B^T (beta = 1)", s.n, s.d_out, r, extra_bytes=s.n * s.d_out * e),
        gemm("du = dY B", s.n, r, s.d_out),
        small("dz = du C, dC = du^T z", 2, 4 * s.n * r * e),
        base_bwd,
        gemm("dx += dz A (beta = 1)", s.n, s.d_in, r, extra_bytes=s.n * s.d_in * e),
        Step("dL/dpacked of the core, 1 block", fp32_flops=2 * 2 * r ** 3, kernel="_cayley_bwd_kernel", programs=1),
        small("psoft_core backward", 10),
    ])


def roofline(shape: Shape) -> list[Method]:
    out = []
    for b in (32, 128):
        for neumann in (True, False):
            mode = "Neumann-5" if neumann else "exact"
            case = f"oft_b{b}{'' if neumann else '_exact'}"
            out.append(Method(f"OFT b={b} {mode}, fp32 oft_R (PEFT default)", case,
                              _oft_fp32_adapter(shape, b, neumann), GPU_TARGETS.get(b),
                              note="the oft_linear ops' mixed layout: the fp32 R split into two bf16 operands "
                                   "(two tensor-core dots per rotation), no fp32 copies"))
            out.append(Method(f"OFT b={b} {mode}, bf16 oft_R", f"{case} (autocast_adapter_dtype=False)",
                              _oft_same_dtype(shape, b, neumann), GPU_TARGETS.get(b),
                              note="no benchmark case runs this dtype yet: the fused bf16 path as the kernels give it"))
    out.append(Method("PSOFT r=32, bf16 psoft_R", "psoft_r32 (autocast_adapter_dtype=False)", _psoft(shape),
                      note="the same-dtype path; the benchmark's psoft_r32 keeps PEFT's fp32 psoft_R, A, B on the "
                           "bf16 base, which runs fused in the mixed layout (svd_core with A split into two bf16 "
                           "operands, the rank-r update added in fp32 and rounded once): not modelled here"))
    return out
