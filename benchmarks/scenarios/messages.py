"""Messages to a live holder: ``send_message`` to the change applied in the holder's memory.

Two Stores of one name in one process, as two processes would be: a sender,
and a holder of the key with a ``message_handler``. The holder is woken by
NOTIFY and applies the message on its callback thread; its changed callback
(which runs once the change is committed in memory) stops the clock. The
targets are absolute latencies (the issue states them so): there is no
baseline to make them relative.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

from ..context import Bench
from ..results import Figure, Row, Target
from ..timing import Spread

_SAVE_EVERY = 50
"""The holder saves after this many messages (untimed), as its autosave would:
an applied message's row is deleted by the save that stores its effect, and
``max_pending_messages`` counts the rows still there."""
_WARMUP = 5


class _Inbox:
    """The holder's side: count messages into the document, signal each applied one."""

    def __init__(self) -> None:
        self.applied = threading.Event()
        self.expected = 0

    def handle(self, key: str, data: Any, message: Any) -> bool:
        data["messages"] += 1
        data["last"] = message["n"]
        return True

    def changed(self, key: str, new: Any, old: Any) -> None:
        if new["messages"] >= self.expected:
            self.applied.set()


def _latencies(bench: Bench, count: int) -> list[float]:
    """Seconds from each ``send_message`` call until the holder has applied it."""
    name = bench.fresh_name()
    inbox = _Inbox()
    holder = bench.store(
        {"messages": 0, "last": -1},
        name=name,
        message_handler=inbox.handle,
        changed_callbacks=[inbox.changed],
    )
    sender = bench.store({"messages": 0, "last": -1}, name=name)
    holder.load("inbox")
    samples: list[float] = []
    for n in range(_WARMUP + count):
        inbox.applied.clear()
        inbox.expected = n + 1
        started = time.perf_counter()
        sender.send_message("inbox", {"n": n})
        if not inbox.applied.wait(10.0):
            raise AssertionError(f"messages: message {n} was not applied within 10 s")
        samples.append(time.perf_counter() - started)
        if (n + 1) % _SAVE_EVERY == 0:
            holder.save("inbox")
    if holder.get("inbox")["last"] != _WARMUP + count - 1:
        raise AssertionError("messages: the holder did not apply the last message")
    holder.close()
    sender.close()
    return samples[_WARMUP:]


def run(bench: Bench) -> list[Row]:
    count = 40 if bench.sizes.scale < 1 else 400
    samples = _latencies(bench, count)
    p99 = statistics.quantiles(samples, n=100, method="inclusive")[98]
    measure = "send → applied in the holder's memory"
    baseline = "none: absolute targets (the issue's)"
    note = (
        f"{count} messages one after another, two Stores of one name (sender, holder) "
        "in one process; to the holder's changed callback"
    )
    extra = {"samples_s": samples, "p99_s": p99, "max_s": max(samples)}
    return [
        Row(
            "messages",
            f"{measure}, median",
            Figure.of(Spread.of(samples), "s"),
            baseline_name=baseline,
            target=Target("<=", 0.05, "< 50 ms", absolute=True),
            note=note,
            extra=extra,
        ),
        Row(
            "messages",
            f"{measure}, p99",
            Figure.exact(p99, "s"),
            baseline_name=baseline,
            target=Target("<=", 0.1, "< 100 ms", absolute=True),
            note=f"max {max(samples) * 1000:.3g} ms",
        ),
    ]
