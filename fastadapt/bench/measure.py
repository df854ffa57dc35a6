"""Measurements of one layer: fwd+bwd time, saved-activation bytes, peak memory, machine ceilings.

Definitions:

- Overhead ratio = median forward+backward time of the adapted layer / the same for the frozen
  base layer on the same input ``x`` (``x`` requires grad).  Arms run interleaved (iteration i
  runs every arm once, in an order rotated by i) so drift in clock speed or background load hits
  every arm alike.  Backward is ``out.backward(grad_out)`` with one fixed random ``grad_out`` per
  output shape (not ``out.sum()``, whose expanded-ones gradient is unrepresentative).  Gradients
  are reset to None between runs (outside the timed region), as ``zero_grad(set_to_none=True)``.
- On CUDA every timed run starts with a flushed L2 (a buffer twice the L2 size is zeroed) and a
  synchronize; :func:`device_time_arms` adds the profiler's device time (the sum of the durations
  of all CUDA kernels / memcpys / memsets of one fwd+bwd) beside the wall time.
- Saved activations = bytes of the unique storages packed by autograd during ``fn(x)`` that are
  still alive right before backward, minus parameters and buffers, as a multiple of bytes(x).
- Peak memory: CUDA ``max_memory_allocated`` delta; on CPU the running total of the profiler's
  allocation records (see :func:`peak_bytes_during`).
"""
from __future__ import annotations

import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn


@dataclass(frozen=True)
class OverheadResult:
    """Median fwd+bwd seconds of the adapted and the base layer, and their ratio."""

    adapted_s: float
    base_s: float
    ratio: float


# --------------------------------------------------------------------------------------------
# timing

def _leaf_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when it is a leaf that requires grad, else a detached leaf that does."""
    if x.requires_grad and x.is_leaf:
        return x
    return x.detach().requires_grad_(True)


def _trainable(arm: Callable) -> list[torch.Tensor]:
    """Parameters whose ``.grad`` a run fills (only visible when ``arm`` is an nn.Module)."""
    return [p for p in arm.parameters() if p.requires_grad] if isinstance(arm, nn.Module) else []


class _GradOut:
    """One fixed random ``grad_out`` per (shape, dtype, device), shared by every arm."""

    def __init__(self, seed: int = 0):
        self._seed = seed
        self._cache: dict = {}

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        key = (tuple(out.shape), out.dtype, out.device)
        if key not in self._cache:
            g = torch.Generator().manual_seed(self._seed)
            self._cache[key] = torch.randn(out.shape, generator=g).to(out.dtype).to(out.device)
        return self._cache[key]


def _step(arm: Callable, x: torch.Tensor, grad_out: _GradOut) -> None:
    out = arm(x)
    out.backward(grad_out(out))


def _clear_grads(x: torch.Tensor, params: list[torch.Tensor]) -> None:
    x.grad = None
    for p in params:
        p.grad = None


_FLUSH_BUFFERS: dict = {}


def flush_l2(device: torch.device) -> None:
    """Evict the L2 cache of CUDA ``device`` by zeroing a buffer twice its size (>= 64 MiB)."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _FLUSH_BUFFERS:
        l2 = torch.cuda.get_device_properties(index).L2_cache_size
        _FLUSH_BUFFERS[index] = torch.empty(max(2 * l2, 64 << 20), dtype=torch.uint8,
                                            device=f"cuda:{index}")
    _FLUSH_BUFFERS[index].zero_()


def _rotations(names: list[str], iters: int):
    for i in range(iters):
        k = i % len(names)
        yield names[k:] + names[:k]


# Rounds added while an arm's median is this uncertain (relative standard error of the median,
# estimated as 1.253 x 1.4826 x MAD / (median x sqrt(rounds)) for roughly normal samples).
MEDIAN_RSE_TARGET = 0.01


def median_rse(samples: list[float]) -> float:
    """Estimated relative standard error of the median of ``samples`` (0 for fewer than 3)."""
    if len(samples) < 3:
        return 0.0
    med = statistics.median(samples)
    mad = statistics.median(abs(s - med) for s in samples)
    return 1.8581 * mad / (med * len(samples) ** 0.5) if med > 0 else 0.0


def time_arm_samples(arms: dict[str, Callable], x: torch.Tensor, *, iters: int = 20,
                     warmup: int = 3, max_iters: int | None = None) -> dict[str, list[float]]:
    """Forward+backward seconds of each arm on ``x``, ``iters`` runs each, interleaved
    (:func:`time_arm_rounds` without a round probe)."""
    return time_arm_rounds(arms, x, iters=iters, warmup=warmup, max_iters=max_iters)[0]


def time_arm_rounds(arms: dict[str, Callable], x: torch.Tensor, *, iters: int = 20, warmup: int = 3,
                    max_iters: int | None = None,
                    round_probe: Callable[[], float] | None = None) -> tuple[dict[str, list[float]], list[float]]:
    """Forward+backward seconds of each arm on ``x``, ``iters`` runs each, interleaved, and the reads
    of ``round_probe`` (called at the start of every timed round; [] without one), so that
    ``samples[arm][i]`` ran in the machine state ``reads[i]`` saw (:mod:`fastadapt.bench.states`).

    Each arm is a callable (usually an nn.Module) mapping ``x`` to one tensor.  ``warmup``
    interleaved rounds run first (this is where torch.compile compiles).  On CUDA every run is
    preceded by an L2 flush and bracketed by synchronizes.  With ``max_iters`` > ``iters``, more
    interleaved rounds follow (iters // 2 at a time, at least 2) while some arm's median is less
    certain than MEDIAN_RSE_TARGET (:func:`median_rse`), up to ``max_iters`` rounds: noisy cases
    get more samples, quiet ones cost nothing extra.
    """
    if not arms:
        raise ValueError("arms is empty; pass at least one {name: callable}")
    if iters < 1:
        raise ValueError(f"iters={iters} must be >= 1")
    if max_iters is not None and max_iters < iters:
        raise ValueError(f"max_iters={max_iters} must be None or >= iters={iters}")
    x = _leaf_input(x)
    cuda = x.device.type == "cuda"
    grad_out = _GradOut()
    params = {name: _trainable(arm) for name, arm in arms.items()}
    names = list(arms)
    for order in _rotations(names, warmup):
        for name in order:
            _step(arms[name], x, grad_out)
            _clear_grads(x, params[name])
    samples: dict[str, list[float]] = {name: [] for name in names}
    reads: list[float] = []

    def rounds(count: int) -> None:
        for order in _rotations(names, count):
            if round_probe is not None:
                reads.append(round_probe())
            for name in order:
                if cuda:
                    flush_l2(x.device)
                    torch.cuda.synchronize(x.device)
                start = time.perf_counter()
                _step(arms[name], x, grad_out)
                if cuda:
                    torch.cuda.synchronize(x.device)
                samples[name].append(time.perf_counter() - start)
                _clear_grads(x, params[name])

    rounds(iters)
    done, limit = iters, max_iters or iters
    while done < limit and max(median_rse(s) for s in samples.values()) > MEDIAN_RSE_TARGET:
        more = min(max(iters // 2, 2), limit - done)
        rounds(more)
        done += more
    return samples, reads


def batched_product_probe(reps: int = 9) -> float:
    """Median seconds of one small batched product on the CPU, 33 x (16 x 2048) @ (2048 x 16) float32
    (the shape of C3A's gradient reduction at the standard shape, 35 MFLOP): on a shared 2-vCPU VM
    such OpenMP-parallel products have a slow state, about 2x for minutes, that large GEMMs, FFTs and
    copies do not show.  ``fastadapt bench`` reads it before each CPU case (``probe_ms``)."""
    a, b = torch.randn(33, 16, 2048), torch.randn(33, 2048, 16)
    torch.bmm(a, b)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.bmm(a, b)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_arms(arms: dict[str, Callable], x: torch.Tensor, *, iters: int = 20,
              warmup: int = 3) -> dict[str, float]:
    """Median forward+backward seconds of each arm on ``x`` (:func:`time_arm_samples`)."""
    return {name: statistics.median(s) for name, s in time_arm_samples(arms, x, iters=iters, warmup=warmup).items()}


def device_time_arms(arms: dict[str, Callable], x: torch.Tensor, *, iters: int = 10) -> dict[str, float]:
    """Median device seconds of one forward+backward per arm (CUDA only), from the profiler.

    Each run is profiled on its own (the L2 flush and the synchronize stay outside the profiled
    region) and its device time is the sum of the durations of every CUDA event the profiler
    records: kernels, memcpys and memsets.  Call after :func:`time_arms` so the arms are warm.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    x = _leaf_input(x)
    if x.device.type != "cuda":
        raise ValueError(f"device_time_arms needs a CUDA input; x is on {x.device}")
    grad_out = _GradOut()
    params = {name: _trainable(arm) for name, arm in arms.items()}
    names = list(arms)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for order in _rotations(names, iters):
        for name in order:
            flush_l2(x.device)
            torch.cuda.synchronize(x.device)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                _step(arms[name], x, grad_out)
                torch.cuda.synchronize(x.device)
            busy_us = sum(e.time_range.elapsed_us() for e in prof.events()
                          if e.device_type == DeviceType.CUDA)
            samples[name].append(busy_us * 1e-6)
            _clear_grads(x, params[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def overhead_ratio(adapted: Callable, base: Callable, x: torch.Tensor, *, iters: int = 20,
                   warmup: int = 3) -> OverheadResult:
    """fwd+bwd time of ``adapted`` / fwd+bwd time of ``base`` on ``x`` (interleaved medians)."""
    times = time_arms({"adapted": adapted, "base": base}, x, iters=iters, warmup=warmup)
    return OverheadResult(times["adapted"], times["base"], times["adapted"] / times["base"])


# --------------------------------------------------------------------------------------------
# saved activations

def dense_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The strided tensors holding ``t``'s data: ``t`` itself, or a sparse tensor's index and
    value tensors (a sparse tensor has no storage of its own; PEFT's SHiRA saves one)."""
    if t.layout == torch.sparse_coo:
        return [t._indices(), t._values()]
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return [t.crow_indices(), t.col_indices(), t.values()]
    if t.layout in (torch.sparse_csc, torch.sparse_bsc):
        return [t.ccol_indices(), t.row_indices(), t.values()]
    return [t]


def _storage_key(t: torch.Tensor) -> tuple:
    s = t.untyped_storage()
    return (s.device, s.data_ptr(), s.nbytes())


def _excluded_owner(fn) -> nn.Module | None:
    """The module whose parameters and buffers ``fn`` uses: ``fn`` itself or its bound ``self``."""
    if isinstance(fn, nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def saved_bytes_during(run: Callable[[], object], *, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the unique storages autograd saves for backward while ``run()`` executes.

    Every tensor autograd packs (torch.autograd.graph.saved_tensors_hooks) is traced to its
    storage; a storage counts once however many views of it were saved.  Not counted: storages
    of any packed ``nn.Parameter`` and of ``exclude``; and storages no longer alive when ``run``
    has returned (saved by graph branches it discarded), checked through weak references so the
    measurement itself keeps nothing alive.  ``run``'s result is held until then (it owns the
    graph) and dropped after.  Tensors an autograd Function stashes as ``ctx`` attributes bypass
    the hooks and are not seen: save through ``ctx.save_for_backward``.
    """
    excluded = {_storage_key(part) for t in exclude for part in dense_parts(t)}
    packed: list[tuple[weakref.ref, tuple]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        for part in dense_parts(t):
            key = _storage_key(part)
            if isinstance(t, nn.Parameter):
                excluded.add(key)
            packed.append((weakref.ref(part.untyped_storage()), key))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    alive = {key for ref, key in packed if ref() is not None and key not in excluded}
    del out
    return sum(nbytes for _, _, nbytes in alive)


def saved_activation_bytes(fn: Callable, x: torch.Tensor, *,
                           exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the unique storages autograd saves for backward during ``fn(x)``
    (:func:`saved_bytes_during`), not counting the storages of ``fn``'s parameters and buffers
    (when ``fn`` is an nn.Module or a bound method of one), of any packed ``nn.Parameter`` and of
    ``exclude``.  ``x`` is made a leaf requiring grad.
    """
    x = _leaf_input(x)
    owner = _excluded_owner(fn)
    owned = [*owner.parameters(), *owner.buffers()] if owner is not None else []
    return saved_bytes_during(lambda: fn(x), exclude=[*exclude, *owned])


def saved_activation_ratio(fn: Callable, x: torch.Tensor, *,
                           exclude: Iterable[torch.Tensor] = ()) -> float:
    """:func:`saved_activation_bytes` as a multiple of bytes(x) (``numel * element_size``)."""
    return saved_activation_bytes(fn, x, exclude=exclude) / (x.numel() * x.element_size())


# --------------------------------------------------------------------------------------------
# peak memory

def peak_bytes_during(run: Callable[[], object], device) -> int:
    """Peak bytes allocated on ``device`` above the level at the start while ``run()`` executes.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
    allocation before the call.  CPU: the CPU allocator records every allocation and free while
    ``torch.profiler.profile(profile_memory=True)`` runs; this sorts those records by time and
    returns the maximum of their running sum (memory allocated before the call is not seen,
    which is what a delta means).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    records = [e for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    running = peak = 0
    for e in sorted(records, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def peak_memory(fn: Callable, x: torch.Tensor) -> int:
    """Peak bytes allocated above the starting level during ``fn(x)`` and its backward
    (:func:`peak_bytes_during`).  Backward is ``out.backward(grad_out)`` with a random
    ``grad_out`` created before the measured region (from one unmeasured forward)."""
    x = _leaf_input(x)
    out = fn(x)  # in grad mode, as measured: a compiled arm sees no new mode to recompile for
    grad_out = torch.randn_like(out)
    del out
    return peak_bytes_during(lambda: fn(x).backward(grad_out), x.device)


# --------------------------------------------------------------------------------------------
# machine ceilings

def _median_seconds(run: Callable[[], None], device: torch.device, reps: int) -> float:
    cuda = device.type == "cuda"
    run()
    samples = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def machine_ceilings(device="cpu", *, dtype: torch.dtype = torch.float32, reps: int = 5) -> dict:
    """Measured copy bandwidth and matmul rate on ``device``, recorded beside results.

    copy: ``dst.copy_(src)`` of 64 MiB (CPU) / 1 GiB (CUDA) float32; GB/s counts read + write.
    matmul: ``a @ b`` of two n x n ``dtype`` matrices, n = 1024 (CPU) / 8192 (CUDA);
    GFLOP/s counts 2 n^3.  Medians of ``reps`` runs after one warm-up run.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    numel = (1 << 28) if cuda else (1 << 24)
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), device, reps)
    n = 8192 if cuda else 1024
    a = torch.rand(n, n, device=device).to(dtype)
    b = torch.rand(n, n, device=device).to(dtype)
    matmul_s = _median_seconds(lambda: a @ b, device, reps)
    return {
        "copy_GBps": 2 * src.nbytes / copy_s / 1e9,
        "copy_bytes": src.nbytes,
        "matmul_GFLOPps": 2 * n ** 3 / matmul_s / 1e9,
        "matmul_n": n,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }
