"""``fastadapt compare A.json B.json``: do two benchmark runs agree?

Every time ratio the two documents share (per case: each arm's fwd+bwd time over the frozen base's,
the published median ratio and the ratio of the fastest runs) is listed with its relative difference
|a - b| / min(a, b); the summary counts the ratios within ``--tolerance`` (default 10 %).  This is
how "two repeat runs agree within 10 % per ratio" is checked: run ``fastadapt bench --quick`` twice
and compare the two JSON files.

CPU runs also record the machine state of every timed round (:mod:`fastadapt.bench.states`).  Where
the two runs timed a case partly in one state, each ratio is also taken within that state (the one
with the most rounds in both) and compared there: ``difference_state``.  ``within_state`` counts each
ratio by that difference where the runs share a state, else by the medians' difference.
"""
from __future__ import annotations

import json
from pathlib import Path

from .states import split_threshold, state_names, state_ratio

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


def _rounds(doc: dict) -> dict:
    """case -> ({arm: samples_s}, state reads) for the cases whose rows recorded the state per round."""
    out = {}
    for row in doc.get("arm_rows", []):
        if row.get("arm") is not None and row.get("state_s") and row.get("samples_s"):
            arms, _ = out.setdefault(row["case"], ({}, row["state_s"]))
            arms[row["arm"]] = row["samples_s"]
    return out


def _state_ratios(case: str, arm: str, rounds_a: dict, rounds_b: dict, threshold: float | None) -> tuple:
    """(state, ratio in A, ratio in B) within the state with the most rounds in both runs, or Nones."""
    if threshold is None or case not in rounds_a or case not in rounds_b:
        return None, None, None
    (arms_a, reads_a), (arms_b, reads_b) = rounds_a[case], rounds_b[case]
    if arm not in arms_a or arm not in arms_b or "base" not in arms_a or "base" not in arms_b:
        return None, None, None
    names_a, names_b = state_names(reads_a, threshold), state_names(reads_b, threshold)
    shared = sorted(set(names_a) & set(names_b), key=lambda s: -min(names_a.count(s), names_b.count(s)))
    for state in shared:
        ra = state_ratio(arms_a[arm], arms_a["base"], names_a, state)
        rb = state_ratio(arms_b[arm], arms_b["base"], names_b, state)
        if ra is not None and rb is not None:
            return state, ra, rb
    return None, None, None


def compare_documents(a: dict, b: dict, tolerance: float = TOLERANCE) -> dict:
    """{"pairs": [...], "within": n, "within_fastest": n, "total": n} over the ratios both runs hold."""
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance={tolerance} must be a fraction in (0, 1), e.g. 0.1 for 10 %")
    ra, rb = _ratios(a), _ratios(b)
    rounds_a, rounds_b = _rounds(a), _rounds(b)
    threshold = split_threshold([r for rounds in (rounds_a, rounds_b) for _, reads in rounds.values() for r in reads])
    pairs = []
    for key in sorted(ra.keys() & rb.keys()):
        (ma, fa), (mb, fb) = ra[key], rb[key]
        state, sa, sb = _state_ratios(*key, rounds_a, rounds_b, threshold)
        pairs.append({"case": key[0], "arm": key[1], "a": ma, "b": mb, "difference": _difference(ma, mb),
                      "a_fastest": fa, "b_fastest": fb, "difference_fastest": _difference(fa, fb),
                      "state": state, "a_state": sa, "b_state": sb, "difference_state": _difference(sa, sb)})
    return {"pairs": pairs, "total": len(pairs), "tolerance": tolerance, "state_threshold": threshold,
            "within": sum(p["difference"] <= tolerance for p in pairs),
            "within_state": sum((p["difference"] if p["difference_state"] is None else p["difference_state"])
                                <= tolerance for p in pairs),
            "in_shared_state": sum(p["difference_state"] is not None for p in pairs),
            "within_fastest": sum(p["difference_fastest"] is not None and p["difference_fastest"] <= tolerance
                                  for p in pairs),
            "only_in_one": [f"{case} {arm}" for case, arm in sorted(ra.keys() ^ rb.keys())]}


def markdown(result: dict, names: tuple[str, str]) -> str:
    tol = result["tolerance"]
    lines = [f"# {names[0]} vs {names[1]}", "",
             f"{result['within']} of {result['total']} ratios agree within {tol:.0%} by their medians "
             f"(the published ratios), {result['within_fastest']} by their fastest runs.", ""]
    threshold = result.get("state_threshold")
    if threshold is None:
        lines += ["One machine state in both runs (or none recorded): no comparison within a state.", ""]
    else:
        lines += [f"Two machine states (the round probe split at {threshold * 1e3:.2f} ms): "
                  f"{result['within_state']} of {result['total']} agree within {tol:.0%} when each ratio is taken "
                  f"within the state both runs timed its case in ({result['in_shared_state']} ratios had one; the "
                  "others count by their medians).", ""]
    lines += ["| case | arm | A | B | difference | A fastest | B fastest | difference fastest | state | A in state "
              "| B in state | difference in state | within |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, spec=".3f"):
        return "-" if v is None else format(v, spec)
    for p in result["pairs"]:
        lines.append(f"| {p['case']} | {p['arm']} | {f(p['a'])} | {f(p['b'])} | {f(p['difference'], '.1%')} | "
                     f"{f(p['a_fastest'])} | {f(p['b_fastest'])} | {f(p['difference_fastest'], '.1%')} | "
                     f"{p['state'] or '-'} | {f(p['a_state'])} | {f(p['b_state'])} | "
                     f"{f(p['difference_state'], '.1%')} | {'yes' if p['difference'] <= tol else 'NO'} |")
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
