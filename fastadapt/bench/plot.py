"""Charts drawn from results JSON (benchmarks write data; plots read it).  Needs matplotlib."""
from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("fastadapt plot needs matplotlib: pip install 'fastadapt[bench]' "
                         "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_results(paths: list[Path], output: Path) -> Path:
    """One horizontal bar per (file, case, arm): fwd+bwd time / frozen base, base arms omitted.

    The dashed line at 1.0 is the frozen base; each bar is labelled with its ratio and
    saved-activation ratio.  Several files (e.g. CPU and GPU runs) share one chart.
    """
    plt = _pyplot()
    labels, ratios, notes = [], [], []
    for path in paths:
        result = json.loads(Path(path).read_text())
        cfg = result["config"]
        tag = f"{cfg['device']} {cfg['dtype']} d={cfg['d']} n={cfg['n']}"
        for row in result["rows"]:
            if row.get("arm") in (None, "base") or row.get("ratio") is None:
                continue
            labels.append(f"{row['case']} / {row['arm']}" + (f"  [{tag}]" if len(paths) > 1 else ""))
            ratios.append(row["ratio"])
            saved = row.get("saved_ratio")
            notes.append(f"{row['ratio']:.2f}" + ("" if saved is None else f"  saved {saved:.2f}x"))
    if not ratios:
        raise SystemExit(f"no timed rows in {[str(p) for p in paths]}")
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(ratios) + 1.5))
    ypos = list(range(len(ratios)))[::-1]
    ax.barh(ypos, ratios, color="tab:blue")
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    for y, r, note in zip(ypos, ratios, notes):
        ax.text(r, y, " " + note, va="center", fontsize=8)
    ax.set_yticks(ypos)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("forward+backward time / frozen base (lower is better)")
    ax.set_xlim(0, max(ratios) * 1.35)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output
