"""Prometheus metrics from ``Store.stats()`` (``pip install sessionstore[prometheus]``).

Owns the translation of a Store's stats into Prometheus metric families, as
a custom collector (prometheus_client's documented pattern for values read
at scrape time): nothing is counted twice, and a scrape costs one
``stats()`` call per Store. Counters carry the ``_total`` suffix, gauges
the key counts, and the save latency percentiles are gauges in seconds::

    from prometheus_client import REGISTRY
    from sessionstore.contrib.prometheus import StoreCollector

    REGISTRY.register(StoreCollector(store))          # or several stores

Every metric has a ``store`` label (the Store's name). A Store that is
closed is skipped, so a collector left registered never fails a scrape.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..errors import StoreClosedError

__all__ = ["StoreCollector"]

_GAUGES = {
    "loaded": "Keys loaded (held) by this process",
    "dirty": "Loaded keys with changes not yet written",
    "save_p50": "Median seconds per write statement, over recent writes",
    "save_p99": "99th percentile seconds per write statement, over recent writes",
}
_COUNTERS = {
    "saves": "Keys written (versions saved)",
    "save_failures": "Keys whose write failed (kept dirty for the next save)",
    "lost_leases": "Leases lost (sessions closed under the process)",
    "handoffs_in": "Keys handed over to this process by a live holder",
    "handoffs_out": "Keys this process handed over to another",
    "messages_applied": "Messages applied by message_handler",
    "durable_writes": "Group-commit writes of durable updates",
    "durable_keys": "Keys carried by group-commit writes",
}


class StoreCollector(Collector):
    """Collects ``stats()`` of the given Stores at each scrape."""

    def __init__(self, *stores: Any, prefix: str = "sessionstore") -> None:
        self._stores = list(stores)
        self._prefix = prefix

    def add(self, store: Any) -> None:
        """Collect this Store too (e.g. one created after the collector was registered)."""
        self._stores.append(store)

    def collect(self) -> Iterator[Metric]:
        gauges = {
            name: GaugeMetricFamily(f"{self._prefix}_{name}", doc, labels=["store"])
            for name, doc in _GAUGES.items()
        }
        counters = {
            name: CounterMetricFamily(f"{self._prefix}_{name}", doc, labels=["store"])
            for name, doc in _COUNTERS.items()
        }
        for store, stats in self._stats():
            for name, family in gauges.items():
                family.add_metric([store], float(stats[name]))
            for name, counter in counters.items():
                counter.add_metric([store], float(stats[name]))
        yield from gauges.values()
        yield from counters.values()

    def _stats(self) -> Iterable[tuple[str, dict[str, Any]]]:
        for store in self._stores:
            try:
                yield store.name, store.stats()
            except StoreClosedError:
                continue
