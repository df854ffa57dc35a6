"""``fastadapt compare A.json B.json``: do two benchmark runs agree?

Every time ratio the two documents share (per case: each arm's fwd+bwd time over the frozen base's,
the published median ratio and the ratio of the fastest runs) is listed with its relative difference
|a - b| / min(a, b); the summary counts the ratios within ``--tolerance`` (default 10 %).  This is
how "two repeat runs agree within 10 % per ratio" is checked: run ``fastadapt bench --quick`` twice
and compare the two JSON files.
"""
from __future__ import annotations

import json
from pathlib import Path

ARMS = ("fastadapt", "peft", "peft_compile", "lycoris")
TOLERANCE = 0.10


def _ratios(doc: dict) -> dict:
    """(case, arm) -> (median ratio, fastest-run ratio or None) for every timed arm of a bench document."""
    out = {}
    for row in doc.get("rows", []):
        base_fast = row.get("base_min_ms")
        for arm in ARMS:
            ratio = row.get(f"{arm}_ratio")
            if ratio is None:
                continue
            fast = row.get(f"{arm}_min_ms")
            out[row["case"], arm] = (ratio, fast / base_fast if fast and base_fast else None)
    return out


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else abs(a - b) / min(a, b)


def compare_documents(a: dict, b: dict, tolerance: float = TOLERANCE) -> dict:
    """{"pairs": [...], "within": n, "within_fastest": n, "total": n} over the ratios both runs hold."""
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance={tolerance} must be a fraction in (0, 1), e.g. 0.1 for 10 %")
    ra, rb = _ratios(a), _ratios(b)
    pairs = []
    for key in sorted(ra.keys() & rb.keys()):
        (ma, fa), (mb, fb) = ra[key], rb[key]
        pairs.append({"case": key[0], "arm": key[1], "a": ma, "b": mb, "difference": _difference(ma, mb),
                      "a_fastest": fa, "b_fastest": fb, "difference_fastest": _difference(fa, fb)})
    return {"pairs": pairs, "total": len(pairs), "tolerance": tolerance,
            "within": sum(p["difference"] <= tolerance for p in pairs),
            "within_fastest": sum(p["difference_fastest"] is not None and p["difference_fastest"] <= tolerance
                                  for p in pairs),
            "only_in_one": [f"{case} {arm}" for case, arm in sorted(ra.keys() ^ rb.keys())]}


def markdown(result: dict, names: tuple[str, str]) -> str:
    tol = result["tolerance"]
    lines = [f"# {names[0]} vs {names[1]}", "",
             f"{result['within']} of {result['total']} ratios agree within {tol:.0%} by their medians "
             f"(the published ratios), {result['within_fastest']} by their fastest runs.", "",
             "| case | arm | A | B | difference | A fastest | B fastest | difference fastest | within |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(v, spec=".3f"):
        return "-" if v is None else format(v, spec)
    for p in result["pairs"]:
        lines.append(f"| {p['case']} | {p['arm']} | {f(p['a'])} | {f(p['b'])} | {f(p['difference'], '.1%')} | "
                     f"{f(p['a_fastest'])} | {f(p['b_fastest'])} | {f(p['difference_fastest'], '.1%')} | "
                     f"{'yes' if p['difference'] <= tol else 'NO'} |")
    if result["only_in_one"]:
        lines += ["", "Ratios in one run only: " + ", ".join(result["only_in_one"])]
    return "\n".join(lines) + "\n"


def compare_command(args) -> int:
    docs = [json.loads(Path(p).read_text()) for p in (args.a, args.b)]
    for path, doc in zip((args.a, args.b), docs):
        if doc.get("kind") != "bench":
            raise SystemExit(f"{path} is a {doc.get('kind')!r} document; compare takes two `fastadapt bench` JSON files")
    result = compare_documents(*docs, tolerance=args.tolerance)
    print(markdown(result, (Path(args.a).name, Path(args.b).name)), end="")
    return 1 if args.strict and result["within"] < result["total"] else 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("compare", help="do two `fastadapt bench` runs agree? every shared ratio, within --tolerance")
    p.add_argument("a", help="results .json of one run")
    p.add_argument("b", help="results .json of another run")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="relative difference allowed (default 0.10)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a ratio differs by more than the tolerance")
    p.set_defaults(func=compare_command)
