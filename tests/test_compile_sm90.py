"""Every Triton kernel compiles for sm_90 (H100 / H200) on a machine without a GPU.

The other kernel tests run through the interpreter here, which never lowers a kernel: illegal
constructs, tl.dot shape / dtype rules and shared-memory overflow only show up in the compiler.
This lowers a small subset (the first specialisation of each kernel in benchmarks/compile_report.py,
float32 and bfloat16 where the kernel takes them) through TTIR -> TTGIR -> LLVM -> PTX and the
bundled ptxas, in a subprocess: conftest.py sets TRITON_INTERPRET=1 before triton is imported, and
@triton.jit kernels are interpreter stand-ins for the rest of this process.  Registers and spills of
every variant: ``python -m benchmarks.compile_report`` (benchmarks/results/compile/).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[1]


def _ptxas_missing_reason() -> str | None:
    if "nvidia" not in triton.backends.backends:
        return f"triton {triton.__version__} has no NVIDIA backend"
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        get_ptxas(90)   # resolves TRITON_PTXAS_BLACKWELL_PATH or the bundled binary by running --version
    except RuntimeError as error:
        return f"triton's NVIDIA backend finds no ptxas: {error}"
    return None


@pytest.fixture(scope="module")
def compile_rows(tmp_path_factory):
    reason = _ptxas_missing_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"       # the current default, stated (silences triton's warning)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--smoke", "--workers", "1",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    reports = list(out.glob("sm90_*_smoke.json"))
    assert len(reports) == 1, f"compile_report wrote no report (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(reports[0].read_text())["rows"]


def test_every_kernel_has_a_specialisation(compile_rows):
    stale = [f"{r['kernel']} [{r['variant']}]: {r['error']}" for r in compile_rows if r["status"] == "stale-table"]
    assert not stale, "benchmarks/compile_report.py VARIANT_TABLES does not match the kernels:\n" + "\n".join(stale)


def test_kernels_compile_for_sm90(compile_rows):
    kernels = {r["kernel"] for r in compile_rows}
    assert {"_cayley_fwd_kernel", "_cayley_bwd_kernel", "_block_rotate_fwd_kernel",
            "_dora_norm_fwd_kernel", "_scaled_lowrank_gemm_kernel", "_seeded_dropout_kernel"} <= kernels
    failed = [f"{r['kernel']} [{r['variant']}, {r['dtype']}]: {r['error_detail'] or r['error']}"
              for r in compile_rows if r["status"] == "compile-error"]
    assert not failed, "kernels that do not compile for sm_90:\n" + "\n\n".join(failed)
    for r in compile_rows:
        if r["status"] == "ok":   # ptxas ran and reported its register allocation
            assert 0 < r["registers"] <= 255 and r["num_warps"] > 0, r
