"""Machine states of a shared CPU VM, read once per timed round, and ratios taken within one state.

On the 2-vCPU VM this project measures on, a 64 MiB copy takes either ~2.4 ms or ~3.7 ms, switching
every few tens of seconds (presumably where the hypervisor places the two vCPUs).  The frozen base's
large GEMMs and fastadapt's fused arms run at the same speed in both states, but code made of many
small dependent products does not: PEFT's C3A and HRA run 10-25 % slower in the fast-copy state.  A
run that spends most of a case in the other state than a second run then reports a PEFT ratio 10-15 %
away, which no estimator over that case's rounds can remove.  The state does not explain every
difference: PEFT's C3A also moves by 10-17 % between runs that timed it in one state.

So ``fastadapt bench`` reads :class:`CopyProbe` at the start of every timed CPU round (``state_ms`` in
its rows, one read per round, aligned with ``samples_s``), and ``fastadapt compare`` compares two runs
within the state both of them timed a case in (:func:`state_ratio`), beside the published medians over
all rounds.  Which reads form two states is decided from the reads themselves
(:func:`split_threshold`): nothing here assumes this VM's numbers.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

PROBE_BYTES = 64 << 20    # twice this VM's 32 MiB L3: the copy streams from memory
STATE_SPLIT = 1.25        # two states when the two clusters' medians differ by at least this factor
MIN_SHARE = 0.1           # ... and each holds at least this share of the reads (and MIN_STATE_ROUNDS)
MIN_STATE_ROUNDS = 5      # rounds a state needs in each run before a ratio is taken within it


class CopyProbe:
    """Seconds of the faster of two copies of a PROBE_BYTES float32 buffer (torch's parallel copy).

    About 0.6 % of a standard-shape CPU round (~2.5-4 ms per read against ~0.3-0.6 s per round)."""

    def __init__(self, nbytes: int = PROBE_BYTES):
        if nbytes < 4:
            raise ValueError(f"nbytes={nbytes} must be >= 4, e.g. {PROBE_BYTES}")
        self._src = torch.ones(nbytes // 4)
        self._dst = torch.empty_like(self._src)
        self._dst.copy_(self._src)   # the pages are touched here, not in the first read

    def __call__(self) -> float:
        best = math.inf
        for _ in range(2):
            start = time.perf_counter()
            self._dst.copy_(self._src)
            best = min(best, time.perf_counter() - start)
        return best


def split_threshold(reads: list[float]) -> float | None:
    """The read separating two machine states, or None when ``reads`` show one.

    The best two-cluster split of the sorted log reads (least within-cluster squared deviation) counts
    as two states when the clusters' medians differ by at least STATE_SPLIT and each holds at least
    MIN_SHARE of the reads and MIN_STATE_ROUNDS; the threshold is the geometric mean of the two reads
    either side of the split."""
    values = sorted(r for r in reads if r > 0)
    n = len(values)
    smallest = max(MIN_STATE_ROUNDS, math.ceil(MIN_SHARE * n))
    if n < 2 * smallest:
        return None
    logs = [math.log(v) for v in values]
    prefix, prefix_sq = [0.0], [0.0]
    for v in logs:
        prefix.append(prefix[-1] + v)
        prefix_sq.append(prefix_sq[-1] + v * v)

    def spread(lo: int, hi: int) -> float:   # sum of squared deviations of logs[lo:hi]
        total = prefix[hi] - prefix[lo]
        return prefix_sq[hi] - prefix_sq[lo] - total * total / (hi - lo)
    cut = min(range(smallest, n - smallest + 1), key=lambda k: spread(0, k) + spread(k, n))
    if statistics.median(values[cut:]) < STATE_SPLIT * statistics.median(values[:cut]):
        return None
    return math.sqrt(values[cut - 1] * values[cut])


def state_names(reads: list[float], threshold: float | None) -> list[str]:
    """Each read's state: "fast copy" below ``threshold``, "slow copy" at or above it, "one state" without one."""
    if threshold is None:
        return ["one state"] * len(reads)
    return ["fast copy" if r < threshold else "slow copy" for r in reads]


def state_ratio(arm_samples: list[float], base_samples: list[float], states: list[str], state: str) -> float | None:
    """median(arm) / median(base) over the rounds in ``state`` (None with fewer than MIN_STATE_ROUNDS)."""
    picked = [(a, b) for a, b, s in zip(arm_samples, base_samples, states) if s == state]
    if len(picked) < MIN_STATE_ROUNDS:
        return None
    return statistics.median(a for a, _ in picked) / statistics.median(b for _, b in picked)


def state_summary(reads: list[float]) -> str | None:
    """One line for a results file: the probe's range, and the split and shares when there are two states."""
    if not reads:
        return None
    line = f"{min(reads) * 1e3:.2f}-{max(reads) * 1e3:.2f} ms over {len(reads)} rounds"
    threshold = split_threshold(reads)
    if threshold is None:
        return line + ", one state"
    fast = sum(r < threshold for r in reads) / len(reads)
    return line + f", two states split at {threshold * 1e3:.2f} ms: {fast:.0%} of the rounds in the fast-copy state"
