"""Stats: what a Store has done in this process, for ``Store.stats()`` and metrics.

Owns the counters the save path, the heartbeat, handoffs and messages bump
(docs/operations.md, "Stats and metrics"), and a window of recent write
latencies for the percentiles. Counting is a few integer additions under
one lock per event, never I/O; ``snapshot`` adds the gauges read off the
key registry (loaded and dirty keys).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

__all__ = ["STAT_KEYS", "Stats"]

_WINDOW = 2048
"""Recent writes the latency percentiles are taken over."""

STAT_KEYS = (
    "loaded",
    "dirty",
    "saves",
    "save_failures",
    "lost_leases",
    "handoffs_in",
    "handoffs_out",
    "messages_applied",
    "save_p50",
    "save_p99",
    "durable_writes",
    "durable_keys",
)
"""The keys of ``Store.stats()``, in order (docs/api.md lists their meaning)."""


class Stats:
    """Counters of one Store core (thread-safe)."""

    __slots__ = ("_counts", "_latencies", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(
            (
                "saves",
                "save_failures",
                "lost_leases",
                "handoffs_in",
                "handoffs_out",
                "messages_applied",
                "durable_writes",
                "durable_keys",
            ),
            0,
        )
        self._latencies: deque[float] = deque(maxlen=_WINDOW)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def wrote(self, seconds: float, written: int, failed: int) -> None:
        """One write statement (or streamed write) of ``written`` keys took ``seconds``."""
        with self._lock:
            self._counts["saves"] += written
            self._counts["save_failures"] += failed
            self._latencies.append(seconds)

    def snapshot(self, loaded: int, dirty: int) -> dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
            latencies = sorted(self._latencies)
        return {
            "loaded": loaded,
            "dirty": dirty,
            **{k: counts[k] for k in STAT_KEYS[2:8]},
            "save_p50": _percentile(latencies, 0.50),
            "save_p99": _percentile(latencies, 0.99),
            "durable_writes": counts["durable_writes"],
            "durable_keys": counts["durable_keys"],
        }


def _percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted values (0.0 when there are none)."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
