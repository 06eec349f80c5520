"""The one timing helper every scenario uses: interleaved, repeated, per-operation.

A :class:`Case` is something to time (``run``), optionally with untimed work
before each call (``prepare``). :func:`interleave` runs several cases round by
round, alternating their order (A B, B A, ...) so that drifting machine noise
hits them alike, and returns per-operation seconds for each round; the samples
of round *i* of two cases are a pair, so their ratio can be taken per round.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Case", "Spread", "interleave", "paired"]


@dataclass(frozen=True)
class Case:
    """One thing to time.

    ``run`` is timed ``inner`` times per sample; ``prepare`` (if any) runs
    untimed before each call. ``ops`` is how many operations one ``run``
    performs, so the sample is seconds per operation.
    """

    label: str
    run: Callable[[], object]
    prepare: Callable[[], object] | None = None
    inner: int = 1
    ops: int = 1


@dataclass(frozen=True)
class Spread:
    """Median and quartiles of some samples."""

    median: float
    q1: float
    q3: float
    samples: tuple[float, ...]

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @classmethod
    def of(cls, samples: Sequence[float]) -> Spread:
        values = tuple(samples)
        if len(values) == 1:
            return cls(values[0], values[0], values[0], values)
        q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(median, q1, q3, values)

    def map(self, fn: Callable[[float], float]) -> Spread:
        """The spread of ``fn`` of every sample (``fn`` monotonic)."""
        return Spread.of([fn(value) for value in self.samples])


def _sample(case: Case) -> float:
    gc.collect()
    clock = time.perf_counter
    if case.prepare is None:
        run = case.run
        started = clock()
        for _ in range(case.inner):
            run()
        elapsed = clock() - started
    else:
        elapsed = 0.0
        for _ in range(case.inner):
            case.prepare()
            started = clock()
            case.run()
            elapsed += clock() - started
    return elapsed / (case.inner * case.ops)


def interleave(cases: Sequence[Case], *, repeats: int, warmup: int = 1) -> list[Spread]:
    """Per-operation seconds of each case over ``repeats`` interleaved rounds."""
    samples: list[list[float]] = [[] for _ in cases]
    for round_ in range(warmup + repeats):
        order = range(len(cases)) if round_ % 2 == 0 else reversed(range(len(cases)))
        for index in order:
            seconds = _sample(cases[index])
            if round_ >= warmup:
                samples[index].append(seconds)
    return [Spread.of(values) for values in samples]


def paired(a: Spread, b: Spread, fn: Callable[[float, float], float]) -> Spread:
    """The spread of ``fn(a_i, b_i)`` over rounds (samples of the same round pair up)."""
    return Spread.of([fn(x, y) for x, y in zip(a.samples, b.samples, strict=True)])
