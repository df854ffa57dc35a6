"""The Neumann series' divergence monitor: one warning per process when a block has ||Q||_2 >= 1.

PEFT's k-term series sum_j c_j Q^j approximates cayley(Q) = (I + Q)(I - Q)^{-1} only while it
converges, i.e. while every block has ||Q||_2 < 1 (Q skew: eigenvalues +/- i theta, ||Q||_2 =
max theta).  Past that the "rotation" is far from orthogonal and training silently degrades, so
the first divergent call warns once, with the measured orthogonality error max ||R^T R - I||_F.

Deciding ||Q||_2 < 1 must not cost an SVD per call.  With S = Q^2 = -Q^T Q (symmetric, negative
semidefinite; the series computes it anyway), ||Q||_2^2 = ||S||_2, and the tests, cheapest first:

    ||Q||_2   <= ||Q||_F                                      b^2 per block, no product
    ||Q||_2^2 <= ||S||_F                                      b^2 given S (b^2 sqrt(b) times tighter
                                                              than ||Q||_F^2 for a random Q)
    ||Q||_2^2 <= ||S||_1  (= ||S||_inf, S symmetric)          b^2
    exact:  ||Q||_2 < 1  <=>  I + S = I - Q^T Q is positive definite   (cholesky_ex's info: b^3 / 3
                                                              flops, less than one b x b product)

A bound below 1 settles the question; only blocks no bound settles reach the next test, and an
SVD (||Q||_2 itself, for the message) runs once, when the warning is issued.  A trained adapter
(entries ~5e-3 at b = 256: ||Q||_F ~ 1.3, ||S||_F ~ 0.2) is settled by the second bound.

Direct (CPU tensors): each bound is read on the host at once (a CPU read, no device sync).
Deferred (CUDA tensors, or ``deferred=True``): no call reads a value it produced.  A call queues
the values of one test level on the device and copies them to pinned host memory behind an event
(:class:`HostReading`); a later call judges them once the copy is done and sets the next level:
    level 0: [max ||Q||_F]
    level 1: [max ||S||_F, max ||S||_1]     (one b x b product, only after level 0 did not settle it)
    level 2: [any cholesky_ex failure of I + S, max ||R^T R - I||_F]
A settled reading returns to level 0, an unsettled one goes one level up, and a level-2 failure
warns (||Q||_2 then computed from that call's Q: one sync, at most once per process).  The warning
therefore comes a few calls after the divergent one.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Union

import torch


def orthogonality_error(R: torch.Tensor) -> torch.Tensor:
    """max over blocks of ||R^T R - I||_F for (..., b, b) blocks (fp32 or wider)."""
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    return torch.linalg.matrix_norm(R.transpose(-2, -1) @ R - eye).max()


class HostReading:
    """A few device values on their way to the host without a sync.

    CUDA: copied with non_blocking=True into pinned host memory, then a CUDA event is recorded on
    the same stream; ``ready()`` is event.query() (no sync) and ``values()`` reads the host copy
    once it is.  Any other device (the CPU stand-in of the tests) copies at once and is ready.
    ``keep`` holds device tensors the reader needs when the values call for them; ``terms`` is
    the series length they were measured for."""

    def __init__(self, values: torch.Tensor, terms: int, keep: tuple = ()):
        self.terms, self.keep, self.event = terms, keep, None
        if values.device.type == "cuda":
            with torch.cuda.device(values.device):
                self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
                self.host.copy_(values, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record()
        else:
            self.host = values.to("cpu", copy=True)

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def values(self) -> list:
        return self.host.tolist()


def _blocks(t: torch.Tensor) -> torch.Tensor:
    """(..., b, b) -> (n, b, b) float32 (or float64) blocks."""
    t = t.reshape(-1, *t.shape[-2:])
    return t if t.dtype == torch.float64 else t.float()


def _frobenius(t: torch.Tensor) -> torch.Tensor:
    """Per block ||t||_F."""
    return torch.linalg.vector_norm(t, dim=(-2, -1))


def _one_norm(t: torch.Tensor) -> torch.Tensor:
    """Per block ||t||_1 (largest absolute column sum)."""
    return t.abs().sum(-2).amax(-1)


def _not_contracting(S: torch.Tensor) -> torch.Tensor:
    """Per block: True where I + S (= I - Q^T Q) is not positive definite, i.e. ||Q||_2 >= 1."""
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    return torch.linalg.cholesky_ex(eye + S).info != 0


class NeumannMonitor:
    """Watches the series for ||Q||_2 >= 1 and warns once per process (module docstring)."""

    LEVELS = 3

    def __init__(self, deferred: Optional[bool] = None):
        self.deferred = deferred
        self.reset()

    def reset(self) -> None:
        """Forget everything (tests and benchmarks start from a fresh monitor)."""
        self.warned = False
        self.pending: Optional[HostReading] = None
        self.level = 0

    def check(self, Q: Union[torch.Tensor, Callable[[], torch.Tensor]], R: torch.Tensor, terms: int,
              S: Optional[torch.Tensor] = None) -> None:
        """Q: the skew blocks (..., b, b), or a function building them (not called once warned);
        R: the series' value; S: Q^2 where the caller has it (else computed when needed)."""
        if self.warned:
            return
        deferred = R.device.type == "cuda" if self.deferred is None else self.deferred
        with torch.no_grad():
            if deferred:
                self._check_deferred(Q, R, terms, S)
            else:
                self._check_now(Q() if callable(Q) else Q, R, terms, S)

    # -- direct ------------------------------------------------------------------------------

    def _check_now(self, Q, R, terms, S):
        Q = _blocks(Q)
        undecided = _frobenius(Q) >= 1.0
        if not undecided.any():
            return
        Q = Q[undecided]
        S = Q @ Q if S is None else _blocks(S)[undecided]
        for bound in (_frobenius, _one_norm):
            still = bound(S) >= 1.0
            if not still.any():
                return
            Q, S = Q[still], S[still]
        diverging = _not_contracting(S)
        if diverging.any():
            spectral = float(torch.linalg.matrix_norm(Q[diverging], ord=2).max())
            self._warn(terms, spectral, float(orthogonality_error(_blocks(R))))

    # -- deferred ----------------------------------------------------------------------------

    def _check_deferred(self, Q, R, terms, S):
        if self.pending is not None:
            if not self.pending.ready():
                return
            reading, self.pending = self.pending, None
            values = reading.values()
            if self.level == self.LEVELS - 1:
                failed, error = values
                if failed > 0:
                    spectral = float(torch.linalg.matrix_norm(reading.keep[0], ord=2).max())
                    self._warn(reading.terms, spectral, error)
                    return
                self.level = 0
            else:
                self.level = self.level + 1 if min(values) >= 1.0 else 0
        Qb = _blocks(Q() if callable(Q) else Q)
        keep = ()
        if self.level == 0:
            values = [_frobenius(Qb).max()]
        else:
            Sb = Qb @ Qb if S is None else _blocks(S)
            if self.level == 1:
                values = [_frobenius(Sb).max(), _one_norm(Sb).max()]
            else:
                values = [_not_contracting(Sb).any().to(Sb.dtype), orthogonality_error(_blocks(R))]
                keep = (Qb,)
        self.pending = HostReading(torch.stack(values), terms, keep)

    def _warn(self, terms, spectral, error):
        self.warned = True
        warnings.warn(f"Cayley-Neumann series with num_cayley_neumann_terms={terms} diverges: ||Q||_2 = "
                      f"{spectral:.3g} >= 1, orthogonality error max ||R^T R - I||_F = {error:.3g}. "
                      "use_cayley_neumann=False computes the exact rotation at the same cost.", stacklevel=5)


MONITOR = NeumannMonitor()
