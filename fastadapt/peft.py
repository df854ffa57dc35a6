"""The PEFT bridge: ``accelerate(model)`` patches PEFT tuner layers in place, ``revert`` undoes it.

One registry maps a PEFT tuner layer class to fused forwards.  Each kernel family lists its
entries in ``PEFT_BRIDGE`` inside its layers module ``fastadapt/layers/<family>.py``, found by
walking the ``fastadapt.layers`` package (adding a family adds a file; no list to edit).  A patched
layer keeps PEFT's own parameters and class, so save_pretrained, loading, merge_and_unload,
set_adapter and disable_adapter behave exactly as before; only the instance's ``forward`` is
shadowed.  Every call checks whether the fused path serves it exactly; if not, PEFT's own
forward runs and the report counts the reason.  Never a silently different result.
"""
from __future__ import annotations

import functools
import importlib
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ._catalog import entry as _catalog_entry

_ATTR_REPORT = "_fastadapt_report"


@dataclass(frozen=True)
class BridgeEntry:
    """One fused forward for one PEFT layer class.

    peft_class: dotted path of the PEFT layer class, e.g. "peft.tuners.oft.layer.Linear".
    method:     catalog name this entry serves.
    forward:    ``forward(layer, adapter_name, x) -> y``, the fused forward for one active adapter.
    applies:    ``applies(layer, adapter_name) -> bool``: does this entry serve the adapter's
                configuration (e.g. LoRA with use_dora)?  Entries of one class are tried in order.
    check:      ``check(layer, adapter_name, x) -> reason or None``: a per-call reason to run
                PEFT's forward instead (e.g. dropout in training on a path without it).
    base_classes: dotted class paths of the base layers ``forward`` handles exactly (a quantized
                or otherwise different base runs PEFT's forward).
    note:       ``note(layer, adapter_name, x) -> note or None``: for a call the fused path serves,
                a documented difference the user should see in the report (e.g. dropout masks
                drawn from fastadapt's own random stream: same distribution, other bits).
    autocast:   ``forward`` reproduces PEFT's forward under ``torch.autocast`` (casts, output dtype,
                values within the autocast dtype's row of the table); without it a call inside an
                autocast context runs PEFT's forward.
    forward_many: ``forward_many(layer, adapters, x, adapter_names) -> y`` for several adapters at
                once: the active ones (``adapter_names`` None) or a mixed-adapter batch (PEFT's
                ``adapter_names=[...]``, one name per sample; ``adapters`` the ones the layer holds).
                Without it such calls run PEFT's forward.
    check_many: ``check_many(layer, adapters, x, adapter_names) -> reason or None``: what a
                several-adapter call adds to each adapter's own ``check``.
    min_macs:   device type -> multiply-adds of the base layer per call (x.numel() x out_features)
                below which PEFT's own forward is faster than this entry's fused one (its host time:
                argument checks, the op's autograd wrapper, more Python per op, outweighs the work it
                saves); measured crossovers (benchmarks/NOTES.md, platform), none = always fused.
    small_forward: ``small_forward(layer, adapter_name, x) -> y`` for the calls below min_macs:
                PEFT's forward for one active adapter without its per-call Python (property lookups,
                argument plumbing, submodule ``__call__``s): the same torch ops in the same order on
                the same tensors, so the same numbers bit for bit, the same random draws and the same
                autograd graph.  The bridge calls it only for a call with no extra arguments, one
                active adapter that the layer holds and this entry applies to, adapters enabled and
                unmerged; it checks what else it relies on (``hookless`` on every submodule it
                bypasses, dtypes, the adapter's variant) and returns ``peft_forward(layer, x)`` where
                that does not hold.  Without it such calls run PEFT's forward.
    """

    peft_class: str
    method: str
    forward: Callable
    applies: Callable = lambda layer, adapter: True
    check: Optional[Callable] = None
    base_classes: tuple = ("torch.nn.modules.linear.Linear",)
    note: Optional[Callable] = None
    autocast: bool = False
    forward_many: Optional[Callable] = None
    check_many: Optional[Callable] = None
    min_macs: dict = field(default_factory=dict)
    small_forward: Optional[Callable] = None


def peft_forward(layer, x, *args, **kwargs):
    """PEFT's own forward of a (possibly patched) tuner layer."""
    return type(layer).forward(layer, x, *args, **kwargs)


_module_hooks = nn.modules.module


def hookless(*modules: nn.Module) -> bool:
    """Whether running these modules' forward math directly (``F.linear(x, m.weight, m.bias)`` for
    an nn.Linear ``m``, ...) is what calling them does: no forward or backward hooks on any of them
    and no global module hooks (the test ``nn.Module.__call__`` makes before its fast path)."""
    if (_module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks
            or _module_hooks._global_backward_hooks or _module_hooks._global_backward_pre_hooks):
        return False
    for m in modules:   # a plain loop: a generator inside any() costs more per call here
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return False
    return True


@dataclass
class AccelerationReport:
    """What ``accelerate`` did, kept up to date as the model runs.

    patched:   layer class -> number of patched layers.
    skipped:   PEFT tuner layer class -> reason it was not patched.
    fused_calls / fallbacks: forward calls served by the fused path / by PEFT, with the reason.
    notes:     fused calls that differ from PEFT in a documented way (not in value: e.g. the
               random stream of a dropout mask), with the difference.
    Calls run eagerly are counted; calls inside a ``torch.compile``'d graph are not (the graph makes
    the same per-call decisions, traced and guarded; counting there would recompile every call):
    run one step eagerly to see what a compiled model does.
    """

    patched: Counter = field(default_factory=Counter)
    skipped: dict = field(default_factory=dict)
    fused_calls: int = 0
    fallbacks: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)

    @property
    def num_patched(self) -> int:
        return sum(self.patched.values())

    def __str__(self) -> str:
        lines = [f"fastadapt: {self.num_patched} layer(s) patched"]
        lines += [f"  patched {n} x {cls}" for cls, n in sorted(self.patched.items())]
        lines += [f"  not patched {cls}: {why}" for cls, why in sorted(self.skipped.items())]
        lines.append(f"  calls: {self.fused_calls} fused, {sum(self.fallbacks.values())} PEFT fallback")
        lines += [f"    fallback x{n}: {why}" for why, n in self.fallbacks.most_common()]
        lines += [f"    fused x{n}, note: {what}" for what, n in self.notes.most_common()]
        return "\n".join(lines)


def _dotted(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def bridge_modules() -> list[str]:
    """Every ``fastadapt.layers.<name>`` module (private ones excluded), in name order."""
    import pkgutil

    from . import layers
    return [f"{layers.__name__}.{m.name}" for m in pkgutil.iter_modules(layers.__path__) if not m.name.startswith("_")]


def registry() -> dict[str, list[BridgeEntry]]:
    """PEFT class path -> its fused entries, from every layers module that defines ``PEFT_BRIDGE``."""
    table: dict[str, list[BridgeEntry]] = {}
    for name in bridge_modules():
        module = importlib.import_module(name)
        for e in getattr(module, "PEFT_BRIDGE", ()):
            table.setdefault(e.peft_class, []).append(e)
    return table


def bridged_methods() -> set[str]:
    return {e.method for entries in registry().values() for e in entries}


def _peft_base_tuner_layer():
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as exc:  # pragma: no cover - exercised only without peft
        raise ImportError("fastadapt.accelerate needs PEFT: pip install 'fastadapt[peft]'") from exc
    return BaseTunerLayer


def _common_reason(layer, args, kwargs) -> Optional[str]:
    """Reasons any fused path must defer to PEFT, whatever the method."""
    if args or set(kwargs) - {"adapter_names"}:
        return "extra forward arguments"
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "merged layer"
    return None


def _held(layer, names) -> list[str]:
    """``names`` (in order, once each) that the layer holds, as PEFT's loops skip the others: in
    any of PEFT's per-adapter containers ("lora_A", "oft_R", ...; LoKr's factored w1 lives in
    "lokr_w1_a", not "lokr_w1")."""
    containers = [getattr(layer, name) for name in layer.adapter_layer_names]
    if not containers:
        return list(dict.fromkeys(names))
    return [a for a in dict.fromkeys(names) if any(a in c for c in containers)]


def _choose(layer, x, adapters: list[str], adapter_names):
    """(entry, reason): the bridge entry serving ``adapters`` on this call, or why none does."""
    if not adapters:
        return None, ("no adapter of adapter_names on this layer" if adapter_names is not None else
                      "the active adapter is not on this layer (PEFT runs the base layer)")
    chosen = next((e for e in layer._fastadapt_entries if e.applies(layer, adapters[0])), None)
    if chosen is None:
        return None, "adapter configuration has no fused path"
    several = len(adapters) > 1 or adapter_names is not None
    if several and chosen.forward_many is None:
        return None, ("adapter_names (mixed-adapter batch)" if adapter_names is not None
                      else f"{len(adapters)} active adapters")
    if several and any(not chosen.applies(layer, a) for a in adapters[1:]):
        return None, "active adapters of different configurations"
    base = _dotted(type(layer.get_base_layer()))
    if base not in chosen.base_classes:
        return None, f"base layer {base} has no fused path (quantized or conv)"
    if not chosen.autocast and x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        return None, "torch.autocast context"
    if chosen.check is not None:
        for a in adapters:
            reason = chosen.check(layer, a, x)
            if reason is not None:
                return None, reason
    if several and chosen.check_many is not None:
        reason = chosen.check_many(layer, adapters, x, adapter_names)
        if reason is not None:
            return None, reason
    return chosen, None


SMALL_CALL_REASON = "small call: PEFT's math takes less host time there (below min_macs)"
_ATTR_MIN_MACS = "_fastadapt_min_macs"
_ATTR_SMALL_PLANS = "_fastadapt_small_plans"


def measured_crossover(layer, x) -> int:
    """``BridgeEntry.min_macs`` of the entry serving the layer's first active adapter, for x's
    device type (0 where nothing is measured)."""
    active = layer.active_adapters
    entry = next((e for e in layer._fastadapt_entries if e.applies(layer, active[0])), None) if active else None
    return 0 if entry is None else entry.min_macs.get(x.device.type, 0)


def _small_plan(layer, x) -> tuple:
    """(bound, lean) for the layer's active adapters on x's kind of device: a call is small iff
    x.numel() < bound (x.numel() x out_features below the crossover, as x.numel() < ceil(min_macs /
    out_features)); lean = (small_forward, adapter) that serves a small call, or None (PEFT's
    forward).  Kept per (active adapters, CUDA or not); a stale plan (an adapter's configuration
    changed under the same name, another non-CUDA device after the CPU) only moves the choice between
    paths that give the same result: each small_forward checks the configuration it relies on.  Kept
    lean: this runs before every eager call."""
    state = layer.__dict__
    active = layer.active_adapter   # a name, or a list of names
    key = (active if isinstance(active, str) else tuple(active), x.is_cuda)
    cache = state[_ATTR_SMALL_PLANS]
    plan = cache.get(key)
    if plan is None:
        min_macs = state[_ATTR_MIN_MACS]
        plan = cache[key] = (_element_bound(layer, measured_crossover(layer, x) if min_macs is None else min_macs),
                             _lean_forward(layer))
    return plan


def _element_bound(layer, min_macs: int) -> int:
    """ceil(min_macs / out_features): a call is small iff x.numel() is below it (0: never)."""
    if not min_macs:
        return 0
    out = getattr(layer, "out_features", None)
    return -(-min_macs // out) if out else 1   # no out_features known: only an empty x counts as small


# PEFT releases (major.minor) whose forwards the entries' small_forwards reproduce op for op, as
# tests/test_peft_sweep.py ("small") checks bit for bit; under another release small calls run
# PEFT's own forward (its internals may have changed).
SMALL_FORWARD_PEFT_RELEASES = ("0.21",)


@functools.cache
def peft_release() -> str:
    """The installed PEFT's major.minor release (read once: a package's metadata lookup is slow)."""
    from importlib.metadata import version
    return ".".join(version("peft").split(".")[:2])


def _lean_forward(layer) -> Optional[tuple]:
    """(small_forward, adapter) of the entry serving the layer's one active adapter, if it has one
    and the installed PEFT is a release the small_forwards reproduce."""
    active = layer.active_adapters
    if len(active) != 1 or not _held(layer, active) or peft_release() not in SMALL_FORWARD_PEFT_RELEASES:
        return None
    entry = next((e for e in layer._fastadapt_entries if e.applies(layer, active[0])), None)
    return None if entry is None or entry.small_forward is None else (entry.small_forward, active[0])


def _patched_forward(layer, x, *args, **kwargs):
    # The crossover weighs eager host time per call; a compiled graph runs no Python per call, so
    # inside torch.compile every call takes the fused path (its ops trace; PEFT's forward may not:
    # LoHa's module dropout branches on a random tensor).
    compiling = torch.compiler.is_compiling()
    if not compiling:
        bound, lean = _small_plan(layer, x)
        if x.numel() < bound:   # first and alone: this path is all host time
            layer.__dict__[_ATTR_REPORT].fallbacks[SMALL_CALL_REASON] += 1
            if lean is None or args or kwargs or layer._disable_adapters or layer.merged_adapters:
                return type(layer).forward(layer, x, *args, **kwargs)
            return lean[0](layer, lean[1], x)
    report: AccelerationReport = layer.__dict__[_ATTR_REPORT]
    reason = _common_reason(layer, args, kwargs)
    adapter_names = kwargs.get("adapter_names")
    chosen, adapters = None, []
    if reason is None:
        adapters = _held(layer, layer.active_adapters if adapter_names is None else adapter_names)
        chosen, reason = _choose(layer, x, adapters, adapter_names)
    # Inside torch.compile the counters stay untouched: dynamo would guard on their values and
    # recompile on every call.  The decision itself is traced (and guarded) like any Python branch.
    counting = not compiling
    if reason is not None:
        if counting:
            report.fallbacks[reason] += 1
        return type(layer).forward(layer, x, *args, **kwargs)
    if counting:
        report.fused_calls += 1
        if chosen.note is not None:
            note = next((n for n in (chosen.note(layer, a, x) for a in adapters) if n is not None), None)
            if note is not None:
                report.notes[note] += 1
    if len(adapters) == 1 and adapter_names is None:
        return chosen.forward(layer, adapters[0], x)
    return chosen.forward_many(layer, adapters, x, adapter_names)


DROPOUT_STREAMS = ("auto", "philox", "torch")
_ATTR_DROPOUT = "_fastadapt_dropout_stream"
_ATTR_CPU_DROPOUT = "_fastadapt_cpu_dropout_stream"   # what "auto" is on the CPU, fixed by accelerate


def dropout_stream(layer, x: Optional[torch.Tensor] = None) -> str:
    """The dropout mask stream ``accelerate`` chose for a patched layer ("auto" if unpatched); with
    ``x``, "auto" as it resolves for x's device: "philox", except on a CPU whose Philox masks would
    come from the pure-torch fallback (no compiler for csrc/, or FASTADAPT_BACKEND=torch when
    ``accelerate`` ran), where it is "torch"."""
    stream = layer.__dict__.get(_ATTR_DROPOUT, "auto")
    if stream != "auto" or x is None:
        return stream
    return layer.__dict__.get(_ATTR_CPU_DROPOUT, "philox") if x.device.type == "cpu" else "philox"


def accelerate(model: nn.Module, methods=None, *, dropout: str = "auto",
               min_macs: Optional[int] = None) -> AccelerationReport:
    """Patch every supported PEFT tuner layer of ``model`` in place; returns the live report.

    methods: optional iterable of catalog names to restrict patching to (e.g. ["oft"]).
    dropout: where fused dropout masks come from.  "philox": fastadapt's Philox stream,
        regenerated from one seed in backward and never stored, the same bits on CPU (csrc/) and
        CUDA (Triton) for a seed; nn.Dropout's distribution and scaling, not its bits (the report
        notes such calls).  "torch": nn.Dropout's own draw from the default generator,
        bit-identical to PEFT on CPU (the mask is kept as 1 bit per element for backward); on
        other devices such calls run PEFT's forward.  "auto" (default): "philox", except on a CPU
        where its masks would come from the pure-torch fallback (csrc/ not built: no compiler, or
        FASTADAPT_BACKEND=torch; about 3x PEFT's dropout cost there), where CPU calls take "torch";
        decided when ``accelerate`` runs.
    min_macs: a call whose base layer does fewer multiply-adds (x.numel() x out_features) runs
        PEFT's own math, which costs less host time than a fused call there (the report counts it
        with SMALL_CALL_REASON): the entry's ``small_forward`` where it has one (PEFT's ops without
        PEFT's per-call Python), else PEFT's forward.  None (default): the method's measured crossover on x's device
        (``BridgeEntry.min_macs``); 0: every call fused.  Inside torch.compile every call is fused
        (a compiled graph pays no host time per call).
    Calling it again first reverts, then patches afresh.
    """
    if dropout not in DROPOUT_STREAMS:
        raise ValueError(f"dropout={dropout!r} is not a mask stream; valid choices: {list(DROPOUT_STREAMS)}")
    if min_macs is not None and (isinstance(min_macs, bool) or not isinstance(min_macs, int) or min_macs < 0):
        raise ValueError(f"min_macs={min_macs!r} must be None (the device's measured crossover) or an int >= 0, "
                         "e.g. 0 to fuse every call")
    base_tuner_layer = _peft_base_tuner_layer()
    wanted = None if methods is None else {_catalog_entry(m).name for m in methods}
    if dropout == "auto":
        from .ops.dropout import philox_compiled
        cpu_auto = "philox" if philox_compiled("cpu") else "torch"
    revert(model)
    table = registry()
    report = AccelerationReport()
    for module in model.modules():
        if not isinstance(module, base_tuner_layer):
            continue
        cls = _dotted(type(module))
        entries = [e for e in table.get(cls, []) if wanted is None or e.method in wanted]
        if not entries:
            report.skipped[cls] = ("not among methods=" + str(sorted(wanted)) if wanted is not None and cls in table
                                   else "no fused path registered for this layer class")
            continue
        module._fastadapt_entries = entries
        module.__dict__[_ATTR_DROPOUT] = dropout
        if dropout == "auto":
            module.__dict__[_ATTR_CPU_DROPOUT] = cpu_auto
        module.__dict__[_ATTR_MIN_MACS] = min_macs
        module.__dict__[_ATTR_SMALL_PLANS] = {}
        setattr(module, _ATTR_REPORT, report)
        module.forward = types.MethodType(_patched_forward, module)
        report.patched[cls] += 1
    setattr(model, _ATTR_REPORT, report)
    return report


def revert(model: nn.Module) -> int:
    """Undo ``accelerate``; returns the number of layers restored."""
    restored = 0
    for module in model.modules():
        if hasattr(module, "_fastadapt_entries"):
            del module.forward
            del module._fastadapt_entries
            module.__dict__.pop(_ATTR_DROPOUT, None)
            module.__dict__.pop(_ATTR_CPU_DROPOUT, None)
            module.__dict__.pop(_ATTR_MIN_MACS, None)
            module.__dict__.pop(_ATTR_SMALL_PLANS, None)
            delattr(module, _ATTR_REPORT)
            restored += 1
    if _ATTR_REPORT in vars(model):
        delattr(model, _ATTR_REPORT)
    return restored
