"""One training step of a tiny Llama, measured: time and where the memory goes.

``fastadapt memory`` and ``fastadapt bench --budget`` run this for every method, as fastadapt,
PEFT and torch.compile(PEFT) arms of the same trained adapter.  A step is forward, loss,
backward, ``AdamW.step()`` and ``zero_grad(set_to_none=True)``; one warm-up step runs first (it
compiles, and creates the optimizer state).  What a step holds, in bytes:

- parameters:      every parameter of the model (frozen base and adapter), unique storages;
- gradients:       the ``.grad`` of the trainable parameters after backward;
- optimizer state: AdamW's ``exp_avg`` / ``exp_avg_sq`` / ``step`` tensors after the step;
- saved activations: unique storages autograd saves for backward during the forward, minus
                   parameters and buffers (:func:`fastadapt.bench.saved_bytes_during`);
- peak:            parameters + optimizer state (held before the step) + the highest allocation
                   above that level during the step (:func:`fastadapt.bench.peak_bytes_during`:
                   CPU profiler allocator records, CUDA max_memory_allocated).
The stacked chart draws the first four and the rest of the peak ("other": temporaries, the
logits, the loss graph's non-saved buffers).  On CUDA the step is also recorded with the
allocator's history (``torch.cuda.memory._record_memory_history``) into a timeline of allocated
bytes per event.
"""
from __future__ import annotations

import statistics
import time
from typing import Optional

import torch
from torch import nn

from .measure import dense_parts, peak_bytes_during, saved_bytes_during
from .training import train_adapter_

# Every Linear of a Llama block: what "all-linear" adapts.
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEP_LR = 1e-4
# At most this many points of the CUDA timeline go into the JSON.
TIMELINE_POINTS = 2000


def bench_llama(hidden: int = 256, *, layers: int = 2, vocab: int = 512, dtype=torch.float32,
                device="cpu", seed: int = 0) -> nn.Module:
    """A LlamaForCausalLM from a config (nothing downloaded): ``hidden`` wide, intermediate
    2 * hidden, heads of 64 (at least one), eager attention, no cache, weights drawn from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    heads = max(1, hidden // 64)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=4096, use_cache=False, attn_implementation="eager")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype)


def token_batch(tokens: int, vocab: int, device, *, seed: int = 0, seq: int = 256) -> dict:
    """input_ids = labels of shape (max(1, tokens // seq), min(tokens, seq)), drawn from ``seed``."""
    seq = min(tokens, seq)
    ids = torch.randint(vocab, (max(1, tokens // seq), seq), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)
    return {"input_ids": ids, "labels": ids}


def _unique_bytes(tensors) -> int:
    seen = {}
    for part in (part for t in tensors for part in dense_parts(t)):
        s = part.untyped_storage()
        seen[(s.data_ptr(), s.device)] = s.nbytes()
    return sum(seen.values())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def timeline_from_snapshot(snapshot: dict, device_index: int = 0) -> list[tuple[float, int]]:
    """(time in us, bytes allocated) after each allocator event of ``torch.cuda.memory._snapshot()``'s
    trace for one device (alloc adds its size, free_completed removes it), decimated to at most
    TIMELINE_POINTS points (the running maximum of each stretch is kept, so the peak survives).
    Events without ``time_us`` are placed by their index."""
    traces = snapshot.get("device_traces", [])
    events = traces[device_index] if device_index < len(traces) else []
    points, allocated = [], 0
    for i, event in enumerate(events):
        if event["action"] == "alloc":
            allocated += event["size"]
        elif event["action"] == "free_completed":
            allocated -= event["size"]
        else:
            continue
        points.append((float(event.get("time_us", i)), allocated))
    if len(points) <= TIMELINE_POINTS:
        return points
    stride = -(-len(points) // TIMELINE_POINTS)
    return [max(points[i:i + stride], key=lambda p: p[1]) for i in range(0, len(points), stride)]


def measure_step(model: nn.Module, batch: dict, *, iters: int = 3, timeline: bool = False,
                 params_of: Optional[nn.Module] = None) -> dict:
    """Time and memory of one training step of ``model`` on ``batch`` (see the module docstring).

    params_of: the module owning the parameters when ``model`` wraps it (torch.compile's
    OptimizedModule); default ``model``.  Returns step_ms (median of ``iters`` steps),
    trainable_params, parameters_bytes, gradients_bytes, optimizer_bytes, saved_bytes,
    peak_bytes, and on CUDA with ``timeline`` a "timeline" list of (us, bytes).
    """
    owner = params_of or model
    params = list(owner.parameters())
    trainable = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=STEP_LR)
    device = params[0].device

    def forward():
        return model(**batch).loss

    def step():
        forward().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    step()  # warm-up: compiles, creates the optimizer state
    held = _unique_bytes(params) + _unique_bytes(_optimizer_tensors(optimizer))
    saved = saved_bytes_during(forward, exclude=[*params, *owner.buffers()])
    forward().backward()
    gradients = _unique_bytes([p.grad for p in trainable if p.grad is not None])
    optimizer.zero_grad(set_to_none=True)
    peak = held + peak_bytes_during(step, device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    result = {"step_ms": statistics.median(times) * 1e3,
              "trainable_params": sum(p.numel() for p in trainable),
              "parameters_bytes": _unique_bytes(params), "gradients_bytes": gradients,
              "optimizer_bytes": _unique_bytes(_optimizer_tensors(optimizer)), "saved_bytes": saved,
              "peak_bytes": peak}
    if timeline and device.type == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=100_000)
        try:
            step()
            torch.cuda.synchronize(device)
            snapshot = torch.cuda.memory._snapshot()
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        result["timeline"] = timeline_from_snapshot(snapshot, device.index or 0)
    return result


def step_arms(config, *, hidden: int, tokens: int, dtype, device, compile: bool, compile_backend: str = "inductor",
              fused: bool, iters: int = 3, timeline: bool = False, progress=None) -> dict[str, dict]:
    """``measure_step`` of the tiny Llama adapted by PEFT with ``config`` (its adapter trained a
    few steps by :func:`fastadapt.bench.train_adapter_`), per arm: "fastadapt" (an
    ``accelerate``-patched model, when ``fused``; its rows add fused_calls and fallbacks),
    "peft" and "peft_compile".  An arm that fails gives {"error": message}."""
    import copy

    from peft import get_peft_model

    import fastadapt
    base = bench_llama(hidden, dtype=dtype, device=device)
    batch = token_batch(tokens, base.config.vocab_size, device)
    trained = get_peft_model(base, config)
    train_adapter_(trained, {"input_ids": batch["input_ids"]})
    arms: dict[str, dict] = {}
    plan = (["fastadapt"] if fused else []) + ["peft"] + (["peft_compile"] if compile else [])
    for arm in plan:
        if progress is not None:
            progress(arm)
        model = copy.deepcopy(trained)
        try:
            if arm == "fastadapt":
                # the fused path itself: a tiny Llama's calls sit below the CPU crossovers (BridgeEntry.min_macs)
                report = fastadapt.accelerate(model, min_macs=0)
                arms[arm] = measure_step(model, batch, iters=iters, timeline=timeline)
                arms[arm].update(fused_calls=report.fused_calls, fallbacks=sum(report.fallbacks.values()),
                                 fallback_reasons=dict(report.fallbacks))
            elif arm == "peft":
                arms[arm] = measure_step(model, batch, iters=iters, timeline=timeline)
            else:
                torch._dynamo.reset()
                arms[arm] = measure_step(torch.compile(model, backend=compile_backend), batch, iters=iters,
                                         timeline=timeline, params_of=model)
        except Exception as exc:
            arms[arm] = {"error": f"{type(exc).__name__}: {exc}"}
    return arms
