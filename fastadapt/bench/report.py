"""Markdown tables of results documents (what ``fastadapt bench | memory`` print and write as .md).

Every results document is a JSON object with ``kind`` ("bench", "host_overhead", "sweep",
"memory", "budget"), ``config``, ``machine``, ``versions``, ``date`` and ``rows``; the Markdown
is derived from it alone (as are the charts, :mod:`fastadapt.bench.plot`).
"""
from __future__ import annotations

from .measure import MEDIAN_RSE_TARGET
from .states import state_summary

MiB = 2 ** 20


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mib(nbytes) -> str:
    return fmt(None if nbytes is None else nbytes / MiB, ".2f")


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


def _other_arms(row: dict) -> str:
    named = {"base", "fastadapt", "peft", "peft_compile", "lycoris"}
    extra = [f"{name} {fmt(arm['ratio'], '.3f')}" for name, arm in row.get("arms", {}).items() if name not in named]
    return ", ".join(extra) or "-"


def bench_table(rows: list[dict]) -> str:
    """One line per case (summary rows): ratios to the frozen base, memory, accuracy, fallbacks."""
    header = ["case", "base ms", "fastadapt", "PEFT", "compiled PEFT", "LyCORIS", "other arms",
              "saved / bytes(x) fastadapt, PEFT, compiled", "peak MiB fastadapt, PEFT, compiled",
              "max rel err", "fallbacks"]
    body = []
    for r in rows:
        if r.get("error"):
            body.append([r["case"], "ERROR", r["error"].replace("|", "/").replace("\n", " ")] + [""] * (len(header) - 3))
            continue
        body.append([
            r["case"], fmt(r["base_ms"], ".2f"), fmt(r["fastadapt_ratio"], ".3f"), fmt(r["peft_ratio"], ".3f"),
            fmt(r["peft_compile_ratio"], ".3f"), fmt(r["lycoris_ratio"], ".3f"), _other_arms(r),
            ", ".join(fmt(r[k], ".2f") for k in ("saved_ratio", "peft_saved_ratio", "peft_compile_saved_ratio")),
            ", ".join(_mib(r[k]) for k in ("peak_bytes", "peft_peak_bytes", "peft_compile_peak_bytes")),
            fmt(r["max_rel_err"], ".1e"), fmt(r["fallbacks"], "d")])
    lines = _table(header, body)
    metrics = {r["case"]: r["metrics"] for r in rows if r.get("metrics")}
    if metrics:
        lines += ["", "Case metrics:"]
        lines += [f"- {case}: " + ", ".join(f"{k} {v:.2e}" for k, v in m.items()) for case, m in metrics.items()]
    return "\n".join(lines)


def host_overhead_table(rows: list[dict]) -> str:
    """Per-call fwd+bwd microseconds at a tiny shape, where the whole step is host time: the
    fastest of the interleaved runs (a run the scheduler interrupted costs milliseconds more
    here), the median beside it."""
    arms = ("base", "fastadapt", "peft", "peft_compile")
    header = ["method", "case", "base us", "fastadapt us", "PEFT us", "compiled PEFT us", "fastadapt - PEFT us",
              "fastadapt <= PEFT", "median us fastadapt, PEFT, compiled"]
    body = []
    for r in rows:
        if r.get("error"):
            body.append([fmt(r.get("method"), "s"), r["case"], "ERROR", r["error"].replace("|", "/")] + [""] * 5)
            continue
        us = {a: None if r[f"{a}_min_ms"] is None else r[f"{a}_min_ms"] * 1e3 for a in arms}
        gap = None if us["fastadapt"] is None or us["peft"] is None else us["fastadapt"] - us["peft"]
        medians = ", ".join(fmt(None if r[f"{a}_ms"] is None else r[f"{a}_ms"] * 1e3, ".0f") for a in arms[1:])
        body.append([fmt(r["method"], "s"), r["case"], fmt(us["base"], ".0f"), fmt(us["fastadapt"], ".0f"),
                     fmt(us["peft"], ".0f"), fmt(us["peft_compile"], ".0f"), fmt(gap, "+.0f"),
                     "-" if gap is None else ("yes" if gap <= 0 else "no"), medians])
    return "\n".join(_table(header, body))


def sweep_table(rows: list[dict]) -> str:
    """Time (ms) and peak MiB per swept size, one line per (case, size)."""
    header = ["case", "size", "base ms", "fastadapt ms", "PEFT ms", "compiled PEFT ms",
              "peak MiB fastadapt, PEFT, compiled"]
    body = []
    for r in rows:
        size = f"{r['sweep']['knob']}={r['sweep']['value']}"
        if r.get("error"):
            body.append([r["case"], size, "ERROR", r["error"].replace("|", "/")] + [""] * 3)
            continue
        body.append([r["case"], size] + [fmt(r[f"{a}_ms"], ".2f") for a in ("base", "fastadapt", "peft", "peft_compile")]
                    + [", ".join(_mib(r[k]) for k in ("peak_bytes", "peft_peak_bytes", "peft_compile_peak_bytes"))])
    return "\n".join(_table(header, body))


STEP_PARTS = ("parameters_bytes", "gradients_bytes", "optimizer_bytes", "saved_bytes")


def memory_table(rows: list[dict]) -> str:
    """One line per (method, arm): a training step's memory in MiB by part, its peak and time."""
    header = ["method", "size", "arm", "trainable", "parameters", "gradients", "optimizer state",
              "saved activations", "peak", "step ms", "fallbacks"]
    body = []
    for r in rows:
        size = f"{r['size_name']}={r['size']}"
        if r.get("error"):
            body.append([r["method"], size, fmt(r.get("arm"), "s"), "ERROR", r["error"].replace("|", "/")] + [""] * 6)
            continue
        body.append([r["method"], size, r["arm"], fmt(r["trainable_params"], ",d")]
                    + [_mib(r[k]) for k in (*STEP_PARTS, "peak_bytes")]
                    + [fmt(r["step_ms"], ".1f"), fmt(r.get("fallbacks"), "d")])
    return "\n".join(_table(header, body))


def budget_table(rows: list[dict], budget: int, tolerance: float) -> str:
    """Per method: the size meeting the budget, its parameter count, and step time / peak per arm."""
    by_method: dict[str, dict] = {}
    for r in rows:
        by_method.setdefault(r["method"], {})[r.get("arm")] = r
    header = ["method", "size", "trainable", "vs budget", f"within {tolerance:.0%}", "step ms fastadapt, PEFT, compiled",
              "peak MiB fastadapt, PEFT, compiled"]
    body = []
    for method, arms in by_method.items():
        measured = [r for r in arms.values() if not r.get("error")]
        if not measured:  # the method failed before any arm ran, or every arm failed
            error = next(iter(arms.values()))["error"]
            body.append([method, "ERROR", error.replace("|", "/").replace("\n", " ")] + [""] * 4)
            continue
        first = measured[0]
        get = lambda arm, key: arms.get(arm, {}).get(key)  # noqa: E731
        body.append([method, f"{first['size_name']}={first['size']}", fmt(first["trainable_params"], ",d"),
                     f"{first['trainable_params'] / budget - 1:+.1%}",
                     "yes" if abs(first["trainable_params"] / budget - 1) <= tolerance else "no (coarse knob)",
                     ", ".join(fmt(get(a, "step_ms"), ".1f") for a in ("fastadapt", "peft", "peft_compile")),
                     ", ".join(_mib(get(a, "peak_bytes")) for a in ("fastadapt", "peft", "peft_compile"))])
    return "\n".join(_table(header, body))


def header_lines(result: dict, title: str) -> list[str]:
    cfg, m, v = result["config"], result["machine"], result["versions"]
    lines = [f"# {title} {result['date'][:16].replace('T', ' ')} UTC", "",
             f"- machine: {m.get('gpu', m['cpu'])}, {m['cores']} cores, {m['torch_threads']} torch threads; "
             f"torch {v['torch']}, triton {v['triton']}, peft {v['peft']}, lycoris {v['lycoris']}"]
    if m.get("load_start") is not None:
        lines.append(f"- load average (1 min) at start / end: {m['load_start']} / {m.get('load_end', '-')} on "
                     f"{m['cores']} cores (other processes: timings with more threads than free cores measure waits)")
    if result.get("ceilings"):
        c = result["ceilings"]
        lines.append(f"- ceilings: copy {c['copy_GBps']:.1f} GB/s, matmul {c['matmul_GFLOPps']:.1f} GFLOP/s "
                     f"({c['matmul_dtype']}, n={c['matmul_n']})")
    if cfg.get("command"):
        lines.append(f"- command: `{cfg['command']}`")
    return lines


def _probe_lines(result: dict) -> list[str]:
    """The machine-state probes of a CPU run: the one read before each case (and the cases measured
    again) and the one read at the start of every timed round (bench.states)."""
    rows = result["rows"]
    probes = [r["probe_ms"] for r in rows if r.get("probe_ms") is not None]
    if not probes:
        return []
    lines = [f"- probe (a small batched product, ms, read before each case; this VM's slow state about doubles it): "
             f"{min(probes):.2f}-{max(probes):.2f}"]
    again = [f"{r['case']} ({r['first_probe_ms']:.2f} -> {r['probe_ms']:.2f})" for r in rows if r.get("first_probe_ms")]
    if again:
        lines.append("- measured again at the end of the run, the probe having read slow at first: " + ", ".join(again))
    reads = [t for r in result.get("arm_rows", []) if r.get("arm") == "base" for t in r.get("state_s", [])]
    summary = state_summary(reads)
    if summary:
        lines.append(f"- machine state (a 64 MiB copy at the start of every timed round; `fastadapt compare` compares "
                     f"two runs within the state both timed a case in): {summary}")
    return lines


def document_markdown(result: dict) -> str:
    """The whole Markdown file for a results document."""
    kind, cfg = result["kind"], result["config"]
    shape = f"x ({cfg['n']}, {cfg['d']}) {cfg['dtype']} on {cfg['device']}"
    if kind == "bench":
        lines = header_lines(result, "fastadapt benchmark")
        extended = (f", up to {cfg['max_iters']} while a median's relative standard error exceeds {MEDIAN_RSE_TARGET:.0%}"
                    if cfg.get("max_iters", cfg["iters"]) > cfg["iters"] else "")
        lines += [f"- shape: {shape}, iters {cfg['iters']}{extended} (median, interleaved), compile {cfg['compile']}",
                  "- columns: fwd+bwd time / frozen base fwd+bwd time per arm; saved = bytes saved for backward "
                  "(parameters and buffers excluded) / bytes(x); peak = highest allocation above the start during "
                  "fwd+bwd; error vs float64 reference in eval mode; fallbacks = PEFT forwards run instead of the "
                  "fused path; adapters trained a few AdamW steps from PEFT's init", *_probe_lines(result), "",
                  bench_table(result["rows"])]
    elif kind == "host_overhead":
        lines = header_lines(result, "fastadapt host overhead")
        lines += [f"- shape: {shape} (the whole step is host time), iters {cfg['iters']} (median, interleaved)",
                  "- one representative case per bridged method; per-call fwd+bwd microseconds, the fastest of the "
                  "interleaved runs (the median beside it)", "",
                  host_overhead_table(result["rows"])]
    elif kind == "sweep":
        lines = header_lines(result, f"fastadapt sweep over {cfg['sweep']}")
        lines += [f"- shape: {shape} except the swept {cfg['sweep']}, iters {cfg['iters']}", "",
                  sweep_table(result["rows"])]
    elif kind == "memory":
        lines = header_lines(result, "fastadapt training-step memory")
        lines += [f"- model: Llama hidden {cfg['d']}, {cfg['layers']} layers, {cfg['n']} tokens, {cfg['dtype']} on "
                  f"{cfg['device']}, adapters on {', '.join(cfg['targets'])}; AdamW; MiB", "",
                  memory_table(result["rows"])]
    elif kind == "budget":
        lines = header_lines(result, "fastadapt equal-budget comparison")
        lines += [f"- budget: {cfg['budget']:,d} trainable parameters ({cfg['budget_text']}) on a Llama hidden "
                  f"{cfg['d']}, {cfg['layers']} layers, adapters on {', '.join(cfg['targets'])}; each method's size "
                  "is the one whose count is nearest the budget (vs budget: the remaining difference)",
                  f"- one training step on {cfg['n']} tokens, {cfg['dtype']} on {cfg['device']}", "",
                  budget_table(result["rows"], cfg["budget"], cfg["tolerance"])]
    else:
        raise ValueError(f"kind={kind!r} unknown; valid choices: bench, host_overhead, sweep, memory, budget")
    return "\n".join(lines) + "\n"
