"""What the multi-process scenarios (handoff, fleet) share: reading their children's reports."""

from __future__ import annotations

import queue
from multiprocessing.queues import Queue
from typing import Any

__all__ = ["expect"]


def expect(ready: Queue[Any], what: str, timeout: float, scenario: str) -> tuple[int, Any]:
    """The next ``(pid, payload)`` a child process sent, which must say ``what``."""
    try:
        kind, pid, payload = ready.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(
            f"{scenario}: no child process said {what!r} in {timeout:g} s"
        ) from None
    if kind != what:
        raise AssertionError(f"{scenario}: child {pid} failed: {payload}")
    return pid, payload
