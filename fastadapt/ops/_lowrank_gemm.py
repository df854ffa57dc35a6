"""The GEMM primitives of low-rank adapter ops, one set per backend with one signature and one
numerics contract, so that an op's body is written once and each backend's implementation is that
body with its set (``fused_op(...)`` registers ``body(TORCH, ...)`` and ``body(triton(), ...)``).

    lowrank_gemm(x, y, u, v, *, k_scale, out_scale, bias, with_pre, round_base, residual,
                 out_dtype, bias_in_base)
        C = out_scale o (x diag(k_scale) y + u v) + bias   (see triton_kernels/lowrank_gemm.py,
        scaled_lowrank_gemm, for every option); the Triton kernel, or the torch twin below
    acc_matmul(a, b, *, mask_a, mask_b)
        fl_acc(a) fl_acc(b) in the accumulation dtype (float32; float64 for float64): half
        operands converted to float32 (tile by tile in the kernel, no float32 copy), the optional
        dropout mask (fastadapt.ops._dropout_mask.DropoutMask) applied to that operand after the
        conversion (in-kernel for a Philox mask)
    acc_operand(t)
        an operand that several acc_matmul calls share, as they read it: torch converts a half t
        to float32 once; Triton passes t itself (its kernels convert tile by tile)

The torch twins are the CPU path and the reference of the kernels: the same roundings (a half
base product rounded where ``round_base`` says, ``k_scale`` applied to a half x before rounding it
to x's dtype), float32 / float64 inputs computed the cheapest way BLAS allows (the base GEMM
accumulates onto the low-rank term, beta = 1; ``k_scale`` scales y's rows, a K x N pass, not
x's).  float64 has no tl.dot: the Triton set runs the torch twin there.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch

from ._policy import acc_dtype


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` (``t`` itself when it has it: no dispatcher call on the hot path)."""
    return t if t.dtype == dtype else t.to(dtype)


def lowrank_gemm(x: torch.Tensor, y: torch.Tensor, u: torch.Tensor, v: torch.Tensor, *,
                 k_scale: Optional[torch.Tensor] = None, out_scale: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None, with_pre: bool = False, round_base: bool = False,
                 residual: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None,
                 bias_in_base: bool = False):
    """torch twin of ``triton_kernels.lowrank_gemm.scaled_lowrank_gemm`` (same arguments, same
    outputs: C, or (C, C_pre) with ``with_pre``)."""
    acc = acc_dtype(x.dtype)
    out_dtype = out_dtype or x.dtype
    bias_in_pre = bias is not None and bias_in_base
    if x.dtype == acc:  # float32 / float64: no rounding to place, the cheapest order
        yk = y if k_scale is None else y * cast(k_scale, y.dtype)[:, None]
        u, v = cast(u, acc), cast(v, acc)
        if residual is None:
            # C = x y + u v + b with nothing after it: the bias as the beta term as well
            bias_in_pre = bias_in_pre or (bias is not None and out_scale is None and not with_pre)
            pre = torch.addmm(bias, u, v) if bias_in_pre else u @ v
            pre.addmm_(x, yk)                                  # beta = 1: C written once
            base = None
        else:
            base = torch.addmm(bias, x, yk) if bias_in_pre else x @ yk
            pre = torch.addmm(base, u, v)
    else:  # half x: the base product in x's dtype, rounded (round_base) before u v joins in float32
        xk = x if k_scale is None else (x.to(acc) * k_scale).to(x.dtype)
        if round_base:
            base = (torch.addmm(bias, xk, y) if bias_in_pre else xk @ y).to(acc)
        else:
            base = xk.to(acc) @ y.to(acc)
            if bias_in_pre:
                base.add_(bias)
        # base is this call's own float32 tensor: u v accumulates into it unless the residual reads it after
        pre = (torch.addmm(base, cast(u, acc), cast(v, acc)) if residual is not None
               else base.addmm_(cast(u, acc), cast(v, acc)))
    bias_left = bias is not None and not bias_in_pre
    if with_pre and residual is None and out_scale is not None:   # DoRA's y from y_pre: one pass
        out = torch.addcmul(bias, pre, out_scale) if bias_left else pre * out_scale
    else:
        out = pre.clone() if with_pre else pre
        if out_scale is not None:
            out.mul_(out_scale)
        if residual is not None:
            out.add_(cast(residual, acc) - base)
        if bias_left:
            out.add_(bias)
    out = cast(out, out_dtype)
    return (out, cast(pre, x.dtype)) if with_pre else out


def acc_matmul(a: torch.Tensor, b: torch.Tensor, *, mask_a=None, mask_b=None) -> torch.Tensor:
    """torch twin of the accumulation-dtype product (module docstring): (M, K) x (K, N)."""
    acc = acc_dtype(a.dtype) if a.dtype == b.dtype else torch.promote_types(acc_dtype(a.dtype), acc_dtype(b.dtype))
    a, b = cast(a, acc), cast(b, acc)
    if mask_a is not None:
        a = mask_a.apply(a)
    if mask_b is not None:
        b = mask_b.apply(b)
    return a @ b


def acc_operand(t: torch.Tensor) -> torch.Tensor:
    """torch twin: ``t`` converted to the accumulation dtype once, for an operand that several
    ``acc_matmul`` calls read (each would convert a half operand again)."""
    return cast(t, acc_dtype(t.dtype))


def _triton_lowrank_gemm(x, y, u, v, **options):
    if x.dtype == torch.float64:
        return lowrank_gemm(x, y, u, v, **options)
    from ..triton_kernels import lowrank_gemm as kernels
    for name in ("k_scale", "out_scale"):
        if options.get(name) is not None:
            options[name] = options[name].to(torch.float32)
    return kernels.scaled_lowrank_gemm(x, y, u, v, **options)


def _triton_acc_matmul(a, b, *, mask_a=None, mask_b=None):
    masks = [(name, m) for name, m in (("a", mask_a), ("b", mask_b)) if m is not None]
    if torch.float64 in (a.dtype, b.dtype) or len(masks) > 1 or any(m.philox_seed is None for _, m in masks):
        return acc_matmul(a, b, mask_a=mask_a, mask_b=mask_b)  # float64, or nn.Dropout's bits
    from ..triton_kernels import lowrank_gemm as kernels
    dropout = (masks[0][0], masks[0][1].philox_seed, masks[0][1].p) if masks else None
    return kernels.float32_matmul(a, b, dropout=dropout)


def thin_pass_runs() -> bool:
    """True when csrc/ builds (loading it registers torch.ops.fastadapt_cpu) and this CPU runs
    csrc/lora.cpp's thin-product pass (AVX-512F): the "cpp" backward of LoRA and DoRA."""
    from .. import _cpp
    return _cpp.extension() is not None and _avx512_cpu()


def thin_pass_takes(rank: int, rows: tuple, others: tuple) -> bool:
    """True when csrc/lora.cpp's pass takes a backward: CPU float32 / float64 tensors all in the
    first row tensor's dtype, rank >= 2 (rank 1 is BLAS's matrix-vector product, faster), the (N, d)
    ``rows`` tensors with a unit column stride (a column-strided view runs the torch body rather
    than pay a copy), and :func:`thin_pass_runs`."""
    dtype = rows[0].dtype
    return (rows[0].device.type == "cpu" and dtype in (torch.float32, torch.float64) and rank > 1
            and all(t.dtype == dtype for t in (*rows, *others))
            and all(t.shape[1] <= 1 or t.stride(1) == 1 for t in rows) and thin_pass_runs())


@functools.lru_cache(maxsize=None)
def _avx512_cpu() -> bool:
    return bool(torch.ops.fastadapt_cpu.lora_thin_supported())


class Kernels(NamedTuple):
    """One backend's GEMM primitives (module docstring)."""

    lowrank_gemm: Callable
    acc_matmul: Callable
    acc_operand: Callable


TORCH = Kernels(lowrank_gemm, acc_matmul, acc_operand)


@functools.lru_cache(maxsize=None)
def triton() -> Kernels:
    """The Triton set (imports nothing until asked: triton is optional)."""
    return Kernels(_triton_lowrank_gemm, _triton_acc_matmul, lambda t: t)   # the kernels convert tile by tile
