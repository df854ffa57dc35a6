"""Charts drawn from results JSON only (benchmarks write data; plots read it).  Needs matplotlib.

One chart per document kind, every arm in one colour throughout (fastadapt blue, PEFT orange,
torch.compile(PEFT) green, LyCORIS purple, other fastadapt modes cyan, the frozen base grey):

- bench / host_overhead: bars grouped by case; left panel fwd+bwd time / frozen base (the base
  is the dashed line at 1.0), right panel peak memory of fwd+bwd in MiB (the base's bar included);
- sweep: per method, time and peak memory against the swept size, log-log, one line per arm;
- memory: per method and arm, a stacked bar of a training step's memory (parameters, gradients,
  optimizer state, saved activations, other up to the peak);
- budget: per method at the equal parameter budget, step time and peak memory per arm.
Several bench documents (e.g. CPU and GPU) can share one chart; their cases are tagged.
"""
from __future__ import annotations

import json
from pathlib import Path

MiB = 2 ** 20
ARM_COLORS = {"base": "0.65", "fastadapt": "tab:blue", "peft": "tab:orange", "peft_compile": "tab:green",
              "lycoris": "tab:purple"}
ARM_LABELS = {"base": "frozen base", "fastadapt": "fastadapt", "peft": "PEFT", "peft_compile": "torch.compile(PEFT)",
              "lycoris": "LyCORIS (bypass)"}
PART_COLORS = {"parameters": "0.7", "gradients": "tab:red", "optimizer state": "tab:olive",
               "saved activations": "tab:cyan", "other (to peak)": "0.9"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("fastadapt plot needs matplotlib: pip install 'fastadapt[bench]' "
                         "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def arm_color(arm: str) -> str:
    if arm in ARM_COLORS:
        return ARM_COLORS[arm]
    return "tab:cyan" if arm.startswith("fastadapt") else "tab:brown"


def arm_order(arms) -> list[str]:
    """The base, fastadapt and its modes, PEFT, compiled PEFT, peers: the same order in every chart."""
    rank = {"base": 0, "fastadapt": 1, "peft": 3, "peft_compile": 4, "lycoris": 5}
    return sorted(arms, key=lambda a: (rank.get(a, 2 if a.startswith("fastadapt") else 6), a))


def arm_rows_of(result: dict) -> list[dict]:
    """Per-arm rows of a bench document (``arm_rows``; older files keep them in ``rows``)."""
    rows = result.get("arm_rows")
    if rows is None:
        rows = [r for r in result["rows"] if "arm" in r]
    return [r for r in rows if r.get("arm") is not None]


def _save(fig, plt, output: Path) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return output


def _grouped_barh(ax, groups: list[str], arms: list[str], value) -> None:
    """Horizontal bars, one group per entry of ``groups`` (top to bottom), one bar per arm (in order,
    top to bottom), each labelled with its value."""
    height = 0.8 / max(1, len(arms))
    for i, group in enumerate(groups):
        for j, arm in enumerate(arms):
            v = value(group, arm)
            if v is None:
                continue
            y = -i + 0.4 - height * (j + 0.5)  # the first arm on top
            ax.barh(y, v, height=height * 0.92, color=arm_color(arm))
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=6)
    ax.set_yticks([-i for i in range(len(groups))])
    ax.set_yticklabels(groups, fontsize=8)
    ax.set_ylim(-len(groups) + 0.5, 0.5)


def _legend(fig, arms: list[str]) -> None:
    from matplotlib.patches import Patch
    handles = [Patch(color=arm_color(a), label=ARM_LABELS.get(a, a)) for a in arms]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 6), fontsize=8,
               frameon=False)


def plot_bench(results: list[dict], output: Path) -> Path:
    plt = _pyplot()
    table: dict[tuple[str, str], dict] = {}
    groups: list[str] = []
    for result in results:
        cfg = result["config"]
        tag = f"  [{cfg['device']} {cfg['dtype']} d={cfg['d']} n={cfg['n']}]" if len(results) > 1 else ""
        for row in arm_rows_of(result):
            group = row["case"] + tag
            if group not in groups:
                groups.append(group)
            table[(group, row["arm"])] = row
    if not any(r.get("ratio") is not None for r in table.values()):
        raise SystemExit("no timed rows in the results given")
    arms = arm_order({arm for _, arm in table})
    timed = [a for a in arms if a != "base"]
    with_peak = any(r.get("peak_bytes") is not None for r in table.values())
    fig, axes = plt.subplots(1, 2 if with_peak else 1, figsize=(13 if with_peak else 8, 0.32 * len(groups) * len(timed) ** 0.5 + 2),
                             sharey=True, squeeze=False)
    ratio = lambda g, a: table.get((g, a), {}).get("ratio")  # noqa: E731
    _grouped_barh(axes[0][0], groups, timed, ratio)
    axes[0][0].axvline(1.0, color="black", linestyle="--", linewidth=1)
    axes[0][0].set_xlabel("fwd+bwd time / frozen base (1.0, dashed; lower is better)")
    if with_peak:
        peak = lambda g, a: None if table.get((g, a), {}).get("peak_bytes") is None else table[(g, a)]["peak_bytes"] / MiB  # noqa: E731
        _grouped_barh(axes[0][1], groups, arms, peak)
        axes[0][1].set_xlabel("peak memory of fwd+bwd, MiB (lower is better)")
    cfg = results[0]["config"]
    title = "host time per call" if results[0].get("kind") == "host_overhead" else "forward+backward"
    fig.suptitle(f"fastadapt {title}: {cfg['device']} {cfg['dtype']} d={cfg['d']} n={cfg['n']}"
                 if len(results) == 1 else f"fastadapt {title}", fontsize=10)
    _legend(fig, arms if with_peak else timed)
    fig.tight_layout()
    return _save(fig, plt, output)


def plot_sweep(result: dict, output: Path) -> Path:
    plt = _pyplot()
    rows = arm_rows_of(result)
    cases = list(dict.fromkeys(r["case"] for r in rows))
    arms = arm_order({r["arm"] for r in rows})
    fig, axes = plt.subplots(2, len(cases), figsize=(4 * len(cases) + 1, 7), squeeze=False)
    for k, case in enumerate(cases):
        for arm in arms:
            points = sorted((r["sweep"]["value"], r) for r in rows if r["case"] == case and r["arm"] == arm)
            xs = [x for x, _ in points]
            for row_i, key, scale in ((0, "time_s", 1e3), (1, "peak_bytes", 1 / MiB)):
                ys = [r.get(key) for _, r in points]
                if any(y is None for y in ys) or not ys:
                    continue
                axes[row_i][k].plot(xs, [y * scale for y in ys], marker="o", color=arm_color(arm),
                                    linestyle="--" if arm == "base" else "-")
        axes[0][k].set_title(case, fontsize=9)
        for row_i, label in ((0, "fwd+bwd ms"), (1, "peak MiB")):
            ax = axes[row_i][k]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_xlabel(result["config"]["sweep"])
            if k == 0:
                ax.set_ylabel(label)
    _legend(fig, arms)
    cfg = result["config"]
    fig.suptitle(f"cost against {cfg['sweep']} (log-log): {cfg['device']} {cfg['dtype']}", fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, output)


def plot_memory(result: dict, output: Path) -> Path:
    plt = _pyplot()
    rows = [r for r in result["rows"] if r.get("arm") is not None and not r.get("error")]
    if not rows:
        raise SystemExit("no measured rows in the memory document")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    arms = arm_order({r["arm"] for r in rows})
    timelines = [r for r in rows if r.get("timeline")]
    fig, axes = plt.subplots(1, 2 if timelines else 1, figsize=(max(7, 1.6 * len(methods) * len(arms) / 2) + (6 if timelines else 0), 5),
                             squeeze=False)
    ax = axes[0][0]
    width = 0.8 / len(arms)
    ticks, labels = [], []
    for i, method in enumerate(methods):
        for j, arm in enumerate(arms):
            row = next((r for r in rows if r["method"] == method and r["arm"] == arm), None)
            if row is None:
                continue
            x = i + width * (j - (len(arms) - 1) / 2)
            parts = {"parameters": row["parameters_bytes"], "gradients": row["gradients_bytes"],
                     "optimizer state": row["optimizer_bytes"], "saved activations": row["saved_bytes"]}
            parts["other (to peak)"] = max(0, row["peak_bytes"] - sum(parts.values()))
            bottom = 0.0
            for part, nbytes in parts.items():
                ax.bar(x, nbytes / MiB, width * 0.9, bottom=bottom, color=PART_COLORS[part],
                       edgecolor=arm_color(arm), linewidth=1.5)
                bottom += nbytes / MiB
            ticks.append(x)
            labels.append(f"{method}\n{ARM_LABELS.get(arm, arm)}")
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, fontsize=7, rotation=90 if len(labels) > 8 else 0)
    ax.set_ylabel("MiB during one training step (bar top = peak)")
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color=c, label=p) for p, c in PART_COLORS.items()], fontsize=7, loc="upper left")
    if timelines:
        ax2 = axes[0][1]
        for r in timelines:
            t0 = r["timeline"][0][0]
            ax2.plot([(t - t0) / 1e3 for t, _ in r["timeline"]], [b / MiB for _, b in r["timeline"]],
                     color=arm_color(r["arm"]), label=f"{r['method']} {ARM_LABELS.get(r['arm'], r['arm'])}", linewidth=1)
        ax2.set_xlabel("ms since the step started (CUDA allocator history)")
        ax2.set_ylabel("MiB allocated")
        ax2.legend(fontsize=6)
    cfg = result["config"]
    fig.suptitle(f"training-step memory, Llama hidden {cfg['d']}, {cfg['n']} tokens, {cfg['dtype']} on {cfg['device']}"
                 " (bar outline: arm colour)", fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, output)


def plot_budget(result: dict, output: Path) -> Path:
    plt = _pyplot()
    rows = [r for r in result["rows"] if r.get("arm") is not None and not r.get("error")]
    if not rows:
        raise SystemExit("no measured rows in the budget document")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    arms = arm_order({r["arm"] for r in rows})
    table = {(r["method"], r["arm"]): r for r in rows}
    first = {m: next(r for r in rows if r["method"] == m) for m in methods}
    groups = [f"{m} ({first[m]['size_name']}={first[m]['size']}, {first[m]['trainable_params']:,d})" for m in methods]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(methods) * len(arms) ** 0.5 + 2), sharey=True, squeeze=False)
    by_group = dict(zip(groups, methods))
    _grouped_barh(axes[0][0], groups, arms, lambda g, a: table.get((by_group[g], a), {}).get("step_ms"))
    axes[0][0].set_xlabel("training step ms")
    _grouped_barh(axes[0][1], groups, arms,
                  lambda g, a: None if (by_group[g], a) not in table else table[(by_group[g], a)]["peak_bytes"] / MiB)
    axes[0][1].set_xlabel("peak MiB of the step")
    cfg = result["config"]
    fig.suptitle(f"equal budget: {cfg['budget']:,d} trainable parameters ({cfg['budget_text']}), Llama hidden {cfg['d']}",
                 fontsize=10)
    _legend(fig, arms)
    fig.tight_layout()
    return _save(fig, plt, output)


def plot_results(paths: list[Path], output: Path) -> Path:
    """Draw the chart of the documents at ``paths`` (several only for bench documents)."""
    results = []
    for path in paths:
        try:
            results.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"cannot read results {path}: {exc}") from None
    kinds = {r.get("kind", "bench") for r in results}
    if kinds <= {"bench", "host_overhead"}:
        return plot_bench(results, output)
    if len(results) != 1:
        raise SystemExit(f"{sorted(kinds)} documents are drawn one per chart; got {len(results)} files")
    draw = {"sweep": plot_sweep, "memory": plot_memory, "budget": plot_budget}.get(results[0]["kind"])
    if draw is None:
        raise SystemExit(f"unknown results kind {results[0]['kind']!r}")
    return draw(results[0], output)
