"""Every Triton kernel compiles for sm_90 (H100 / H200) on a machine without a GPU, and its machine
code keeps the properties the speed depends on.

The other kernel tests run through the interpreter here, which never lowers a kernel: illegal
constructs, tl.dot shape / dtype rules, shared-memory overflow, register spills and whether a dot
runs on tensor cores only show up in the compiler.  ``python -m benchmarks.compile_report --standard``
lowers the first specialisation of each kernel in float32 and every specialisation a benchmark case
launches at the GPU standard shape (``Variant.standard``) in bfloat16 through TTIR -> TTGIR -> LLVM -> PTX,
the bundled ptxas and cuobjdump, in a subprocess: conftest.py sets TRITON_INTERPRET=1 before
triton is imported, and @triton.jit kernels are interpreter stand-ins for the rest of this process.
Not covered here (compile time): the fp32-only b = 64 / 128 Cayley tiles (40-110 s of ptxas each);
``python -m benchmarks.compile_report`` compiles every variant (benchmarks/results/compile/).
"""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # benchmarks/ is a folder of the source tree, not an installed package
    sys.path.insert(0, str(ROOT))
from benchmarks import compile_report as report  # noqa: E402
from benchmarks import roofline  # noqa: E402


def _ptxas_missing_reason() -> str | None:
    if "nvidia" not in triton.backends.backends:
        return f"triton {triton.__version__} has no NVIDIA backend"
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        get_ptxas(90)   # resolves TRITON_PTXAS_BLACKWELL_PATH or the bundled binary by running --version
    except RuntimeError as error:
        return f"triton's NVIDIA backend finds no ptxas: {error}"
    return None


def _compiler_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"       # the current default, stated (silences triton's warning)
    return env


@pytest.fixture(scope="module")
def compile_rows(tmp_path_factory):
    reason = _ptxas_missing_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("compile")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--standard", "--workers", "2",
                           "--out", str(out)], cwd=ROOT, env=_compiler_env(), capture_output=True, text=True,
                          timeout=600)
    reports = list(out.glob("sm90_*_standard.json"))
    assert len(reports) == 1, f"compile_report wrote no report (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(reports[0].read_text())["rows"]


def _where(r: dict) -> str:
    return f"{r['kernel']} [{r['variant']}, {r['dtype']}]"


def test_every_kernel_has_a_specialisation(compile_rows):
    stale = [f"{_where(r)}: {r['error']}" for r in compile_rows if r["status"] == "stale-table"]
    assert not stale, "benchmarks/compile_<module>.py variants() do not match the kernels:\n" + "\n".join(stale)


def test_kernels_compile_for_sm90(compile_rows):
    kernels = {r["kernel"] for r in compile_rows}
    assert {"_cayley_fwd_kernel", "_cayley_bwd_kernel", "_block_rotate_fwd_kernel",
            "_dora_norm_fwd_kernel", "_scaled_lowrank_gemm_kernel", "_seeded_dropout_kernel"} <= kernels
    failed = [f"{_where(r)}: {r['error_detail'] or r['error']}" for r in compile_rows
              if r["status"] in ("compile-error", "disasm-error")]
    assert not failed, "kernels that do not compile (or disassemble) for sm_90:\n" + "\n\n".join(failed)
    for r in compile_rows:
        if r["status"] == "ok":   # ptxas ran and reported its register allocation
            assert 0 < r["registers"] <= 255 and r["num_warps"] > 0, r


def test_half_precision_dots_run_on_tensor_cores(compile_rows):
    """Every variant with a bf16 / fp16 (or tf32) tl.dot lowers to HGMMA / HMMA, not FFMA."""
    half = [r for r in compile_rows if r["status"] == "ok" and (r["dots"]["half"] or r["dots"]["tf32"])]
    assert len(half) >= 20, f"only {len(half)} half-precision dot variants compiled: the selection shrank"
    left = [f"{_where(r)}: {r['dots']}, SASS {r['sass']}" for r in half if not r["sass"]["mma"]]
    assert not left, "half-precision dots that left the tensor cores:\n" + "\n".join(left)


def test_an_ieee_fp32_dot_is_reported_as_ffma(compile_rows):
    """The tensor-core check can fail: an fp32 variant whose dots are IEEE (on purpose, like torch's
    fp32 matmul) shows FFMA and no MMA, while its bfloat16 twin runs on tensor cores."""
    rows = {(r["kernel"], r["variant"], r["dtype"]): r for r in compile_rows if r["status"] == "ok"}
    pairs = [(r, rows.get((r["kernel"], r["variant"], "bfloat16"))) for r in rows.values()
             if r["dtype"] == "float32" and r["dots"]["ieee"] and not r["dots"]["half"] and not r["dots"]["tf32"]]
    pairs = [(fp32, bf16) for fp32, bf16 in pairs if bf16 is not None and bf16["dots"]["half"]]
    assert pairs, "no IEEE fp32 variant with a bfloat16 tensor-core twin in the compiled set"
    for fp32, bf16 in pairs:
        assert fp32["sass"]["mma"] == 0 and fp32["sass"]["ffma"] >= 64, _where(fp32)
        assert fp32["math"].startswith("FFMA") and fp32.get("ieee_reason"), fp32["math"]
        assert bf16["sass"]["mma"] > 0 and bf16["math"].startswith("tensor cores"), _where(bf16)


def test_no_spill_above_the_budget(compile_rows):
    """Spill stores per thread within report.SPILL_BUDGET (0 B for kernels streaming activations,
    512 B for parameter-sized ones), unless the variant states the spill it accepts and why."""
    over = [f"{_where(r)}: {f}" for r in compile_rows for f in r["findings"] if f.startswith(("spills", "accepted"))]
    assert not over, "\n".join(over)


def test_ieee_fp32_in_a_half_dtype_states_its_reason(compile_rows):
    missing = [f"{_where(r)}: {f}" for r in compile_rows for f in r["findings"] if "IEEE" in f]
    assert not missing, "\n".join(missing)


def test_standard_half_variants_fill_the_sms_or_state_why(compile_rows):
    """Every standard half-precision variant launches at least one program per H200 SM at the
    standard shape, or states Variant.accepted_launch (with the microseconds at stake), and no
    stated reason is stale."""
    missing = [f"{_where(r)}: {f}" for r in compile_rows for f in r["findings"] if "SMs idle" in f
               or f.startswith("accepted_launch")]
    assert not missing, "\n".join(missing)
    half = [r for r in compile_rows if r["status"] == "ok" and r["standard"] and r["dtype"] in report.HALF_DTYPES]
    assert all(r["programs"] >= roofline.H200.sms or r.get("accepted_launch") for r in half)
    filled = {r["kernel"] for r in half if r["programs"] >= roofline.H200.sms}
    assert {"_dora_norm_fwd_kernel", "_dora_dy_row_pass_kernel"} <= filled, filled


def test_a_launch_under_one_wave_is_a_finding():
    """The launch check can fail: a standard bfloat16 variant with 64 programs is a finding; the
    same with accepted_launch is recorded and listed in the report; a stated reason on a launch that
    fills the SMs is a finding; a variant outside the standard set is a note."""
    reason = _ptxas_missing_reason()
    if reason:
        pytest.skip(reason)
    script = textwrap.dedent("""
        import dataclasses, json
        from benchmarks import compile_report as R
        from benchmarks.compile_cayley import variants
        good = variants()["_block_rotate_fwd_kernel"][0]
        table = {"_block_rotate_fwd_kernel": [
            dataclasses.replace(good, name="small", grid=(64,), standard=True, accepted_launch=""),
            dataclasses.replace(good, name="small, accepted", grid=(64,), standard=True, accepted_launch="why"),
            dataclasses.replace(good, name="full, stale reason", grid=(264,), standard=True, accepted_launch="why"),
            dataclasses.replace(good, name="small, not standard", grid=(64,), standard=False, accepted_launch="")]}
        R.variants_for = lambda module: table
        jobs = [("fastadapt.triton_kernels.cayley", "_block_rotate_fwd_kernel", v.name, "bfloat16", "")
                for v in table["_block_rotate_fwd_kernel"]]
        rows = R._run(jobs, 90, 1, True)
        markdown = R._markdown({"target": "cuda sm_90"}, rows)
        print(json.dumps([[r["status"], r["findings"], r.get("accepted_launch"), r["notes"]] for r in rows]
                         + ["accepted with a reason" in markdown and "why" in markdown]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_compiler_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    small, accepted, stale, other, listed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [row[0] for row in (small, accepted, stale, other)] == ["ok"] * 4
    assert len(small[1]) == 1 and "64 programs for 132 SMs" in small[1][0] and "accepted_launch" in small[1][0]
    assert accepted[1] == [] and accepted[2] == "why" and accepted[3] == []
    assert len(stale[1]) == 1 and stale[1][0].startswith("accepted_launch is stated")
    assert other[1] == [] and other[3] == ["64 programs for 132 SMs: 68 SMs idle at the standard shape"]
    assert listed


def test_occupancy_and_waves_of_every_variant(compile_rows):
    for r in (r for r in compile_rows if r["status"] == "ok"):
        assert r["blocks_per_sm"] >= 1, f"{_where(r)} cannot be resident on an H200 SM: {r}"
        assert r["grid"] and r["programs"] == math.prod(r["grid"]) and r["waves"] > 0, \
            f"{_where(r)}: Variant(grid=...) must state the programs the launcher starts at the standard shape"


def test_a_variant_that_fails_is_a_row_and_the_others_go_on():
    """A kernel that does not compile, and one whose SASS cannot be read, each give a row saying why."""
    reason = _ptxas_missing_reason()
    if reason:
        pytest.skip(reason)
    script = textwrap.dedent("""
        import json
        from benchmarks import compile_report as R
        from benchmarks.compile_cayley import variants
        good = variants()["_block_rotate_fwd_kernel"][0]
        def broken(dtype):   # BLOCK = 8: tl.dot needs every dimension >= 16
            args, kwargs = good.build(dtype)
            return args, dict(kwargs, BLOCK=8)
        table = {"_block_rotate_fwd_kernel": [good, R.Variant("broken", broken, grid=good.grid)]}
        R.variants_for = lambda module: table
        module = "fastadapt.triton_kernels.cayley"
        jobs = [(module, "_block_rotate_fwd_kernel", name, "bfloat16", "") for name in ("broken", good.name)]
        rows = R._run(jobs, 90, 1, True)
        def unreadable(cubin):
            raise RuntimeError("cuobjdump -sass exit 1: not a cubin")
        R.disassemble = unreadable
        rows += R._run(jobs[1:], 90, 1, True)
        print(json.dumps([(r["status"], r["error"]) for r in rows]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_compiler_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (broken, broken_error), (good, _), (unread, unread_error) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert broken == "compile-error" and broken_error, broken_error
    assert good == "ok"
    assert unread == "disasm-error" and "not a cubin" in unread_error


# --------------------------------------------------------------------------------------------
# the parsers and models (no compiler needed)

SASS = """
        Function : _demo_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;                       /* 0x00000a00ff017b82 */
        /*0010*/              @!P0 LDG.E.128 R4, desc[UR6][R2.64] ;             /* 0x000000060204a981 */
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;  /* 0x01e00000081879f0 */
        /*0030*/                   HFMA2.MMA R57, -RZ, RZ, 0, 0 ;                /* 0x00000000ff397435 */
        /*0040*/               @P1 FFMA R0, R1, R2, R0 ;                        /* 0x0000000201007223 */
        /*0050*/                   STL [R1], R0 ;                               /* 0x0000000001007387 */
        /*0060*/                   SYNCS.ARRIVE.TRANS64.RED.A1T0 RZ, [UR4] ;    /* 0x000000ffff0079a7 */
        /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;                /* 0x0000000000007b1d */
"""


def test_sass_opcodes_strip_predicates_and_modifiers():
    ops = report.sass_opcodes(SASS)
    assert ops == {"LDC": 1, "LDG": 1, "HGMMA": 1, "HFMA2": 1, "FFMA": 1, "STL": 1, "SYNCS": 1, "BAR": 1}
    assert report.math_unit({"half": 1, "tf32": 0, "tf32x3": 0, "ieee": 0}, ops) == "tensor cores (HGMMA)"
    # HFMA2.MMA is a move on the MMA pipe, not a tensor-core product
    assert report.math_unit({"half": 1, "tf32": 0, "tf32x3": 0, "ieee": 0}, {"HFMA2": 4, "FFMA": 9}).startswith(
        "FFMA: half/tf32 dots left")


def test_ttir_dots_by_operand_precision():
    ttir = """
    %a = tt.dot %x, %y, %acc, inputPrecision = tf32 : tensor<128x64xbf16> * tensor<64x128xbf16> -> tensor<128x128xf32>
    %b = tt.dot %p, %q, %acc : tensor<64x16xf32> * tensor<16x16xf32> -> tensor<64x16xf32>
    %c = tt.dot %p, %q, %acc, inputPrecision = tf32 : tensor<64x16xf32> * tensor<16x16xf32> -> tensor<64x16xf32>
    %d = tt.dot %p, %q, %acc, inputPrecision = tf32x3 : tensor<64x16xf32> * tensor<16x16xf32> -> tensor<64x16xf32>
    """
    assert report.ttir_dots(ttir) == {"half": 1, "tf32": 1, "tf32x3": 1, "ieee": 1}


def test_occupancy_on_the_h200():
    gemm = report.occupancy(registers=148, shared=96 * 1024, warps=8)     # 152 x 32 x 8 registers per block
    assert gemm == dict(blocks_per_sm=1, warps_per_sm=8, occupancy=0.125, limiter="registers")
    small = report.occupancy(registers=32, shared=0, warps=4)            # 16 by registers and by warps
    assert small["blocks_per_sm"] == 16 and small["occupancy"] == 1.0
    assert report.occupancy(registers=40, shared=100 * 1024, warps=4)["limiter"] == "shared"   # 2 x 101 KB
    assert report.occupancy(registers=40, shared=228 * 1024, warps=4)["blocks_per_sm"] == 0   # > 227 KB per block
    assert report.waves((264,), 1) == dict(programs=264, waves=2.0, tail=0.0, sms_busy=132)
    assert report.waves((100,), 2)["sms_busy"] == 100


def test_disassembling_garbage_says_why():
    if _ptxas_missing_reason():
        pytest.skip(_ptxas_missing_reason())
    with pytest.raises(RuntimeError, match="cuobjdump"):
        report.disassemble(b"not a cubin")


def test_variant_tables_are_found_by_file_name():
    modules = report.variant_modules()
    assert modules, "no kernel modules found"
    for kernel_module, variants_module in modules.items():
        short = kernel_module.rsplit(".", 1)[-1]
        assert variants_module == f"benchmarks.compile_{short}", \
            f"{kernel_module} has no benchmarks/compile_{short}.py defining variants()"
    assert not report.orphan_variant_files()


def test_roofline_of_every_family_at_every_standard_shape():
    kernels = {k for names in report.discover_kernels().values() for k in names}
    for shape in roofline.SHAPES:
        methods, errors = roofline.methods(shape)
        assert not errors, errors
        assert {"oft_b32", "dora_r16"} <= {m.case for m in methods}
        for method in methods:
            row = roofline.predict(method, shape)
            # every method does at least the frozen base's two GEMMs of 2 N d_in d_out FLOPs
            assert row["tensor_GFLOP"] >= 4 * shape.n * shape.d_in * shape.d_out / 1e9 - 1e-6, method.name
            assert 1.0 <= row["floor_ratio"] < 5 and 1.0 <= row["predicted_ratio"] < 5, row
            unknown = {s.kernel for s in method.steps if s.kernel} - kernels
            assert not unknown, f"{method.name} names kernels that do not exist: {unknown}"


def test_roofline_base_is_two_gemms_at_the_rates():
    shape = roofline.SHAPES[0]
    base = roofline.base_steps(shape)
    flops = 2 * 2.0 * shape.n * shape.d_in * shape.d_out
    assert sum(s.tensor_flops for s in base) == flops
    assert roofline.path_time(base, rates=roofline.PEAK) == pytest.approx(flops / roofline.H200.bf16_tensor_flops)
