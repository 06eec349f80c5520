"""The scenarios, in the order they run. Each is ``run(bench) -> list[Row]``."""

from __future__ import annotations

from collections.abc import Callable

from ..context import Bench
from ..results import Row
from . import close, get, heartbeat, hotkey, large, load, memory, save, takeover, tx, update

__all__ = ["SCENARIOS"]

SCENARIOS: dict[str, Callable[[Bench], list[Row]]] = {
    "save": save.run,
    "load": load.run,
    "get": get.run,
    "update": update.run,
    "tx": tx.run,
    "hotkey": hotkey.run,
    "heartbeat": heartbeat.run,
    "close": close.run,
    "memory": memory.run,
    "large": large.run,
    "takeover": takeover.run,
}
