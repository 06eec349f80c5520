"""The scenarios, in the order they run. Each is ``run(bench) -> list[Row]``."""

from __future__ import annotations

from collections.abc import Callable

from ..context import Bench
from ..results import Row
from . import (
    batch,
    citus,
    close,
    durable,
    export,
    firstread,
    fleet,
    get,
    handoff,
    heartbeat,
    hotkey,
    idempotency,
    keys,
    large,
    load,
    memory,
    messages,
    offline,
    pgbouncer,
    save,
    sessions100k,
    takeover,
    tx,
    update,
)

__all__ = ["SCENARIOS"]

SCENARIOS: dict[str, Callable[[Bench], list[Row]]] = {
    "save": save.run,
    "load": load.run,
    "get": get.run,
    "update": update.run,
    "tx": tx.run,
    "hotkey": hotkey.run,
    "durable": durable.run,
    "idempotency": idempotency.run,
    "messages": messages.run,
    "heartbeat": heartbeat.run,
    "close": close.run,
    "memory": memory.run,
    "large": large.run,
    "takeover": takeover.run,
    "batch": batch.run,
    "offline": offline.run,
    "keys": keys.run,
    "export": export.run,
    "pgbouncer": pgbouncer.run,
    "citus": citus.run,
    # Last, so that the rows before stay comparable with earlier runs: these
    # leave the server 10,000 more keys (fleet) and the process a large heap
    # (100,000 sessions; documents of 30 and 100 MB), which slowed the
    # scenarios after them (load_many: 5.0x alone, 6.4x after fleet).
    "handoff": handoff.run,
    "fleet": fleet.run,
    "firstread": firstread.run,
    "sessions100k": sessions100k.run,
}
