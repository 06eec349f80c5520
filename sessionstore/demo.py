"""The README demo: two processes, one key, one lease.

Owns nothing but the demo. Process A loads ``player:1``, gives it coins and
saves; a second, real process then tries to load the same key, is refused
with :class:`sessionstore.LockUnavailableError` while A holds the lease, and
succeeds (seeing A's coins) once A has unloaded it.

Run it with ``sessionstore demo`` (or ``python -m sessionstore.demo``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import sessionstore as ss

__all__ = ["main"]

STORE = "demo_players"
KEY = "player:1"
TEMPLATE: dict[str, Any] = {"coins": 0, "inventory": []}


def _add_coins(data: dict[str, Any]) -> bool:
    data["coins"] += 10
    data["inventory"].append(f"gem #{len(data['inventory']) + 1}")
    return True


def _second(dsn: str | None) -> int:
    """Process B: try to load the key, waiting at most one second."""
    pid = os.getpid()
    with ss.Store(name=STORE, template=TEMPLATE, dsn=dsn, lock_timeout=1.0) as store:
        try:
            store.load(KEY)
        except ss.LockUnavailableError:
            print(
                f"  [B pid {pid}] load({KEY!r}) refused: LockUnavailableError (A holds the lease)"
            )
            return 0
        data = store.get(KEY)
        print(
            f"  [B pid {pid}] loaded {KEY!r}: {data['coins']} coins, {len(data['inventory'])} items"
        )
        store.unload(KEY)
    return 0


def _run_second(dsn: str) -> None:
    env = {**os.environ, "SESSIONSTORE_DSN": dsn}
    subprocess.run([sys.executable, "-m", "sessionstore.demo", "--second"], env=env, check=True)


def main(dsn: str | None = None) -> int:
    """Run the demo against ``dsn`` (default ``$SESSIONSTORE_DSN``, else embedded)."""
    from sessionstore.db import resolve_url

    url = resolve_url(dsn)  # starts the embedded server if needed; B reuses this URL
    pid = os.getpid()
    print(f"sessionstore demo: store {STORE!r}, key {KEY!r}")
    store = ss.Store(
        name=STORE,
        template=TEMPLATE,
        dsn=url,
        on_handoff_request=lambda key: False,  # A keeps its keys while it runs
    )
    try:
        store.load(KEY)
        print(f"  [A pid {pid}] loaded {KEY!r}: {store.get(KEY)['coins']} coins")
        store.update(KEY, _add_coins)
        store.save(KEY)
        print(f"  [A pid {pid}] added 10 coins and saved: {store.get(KEY)['coins']} coins")

        print("  starting process B while A holds the lease...")
        _run_second(url)

        store.unload(KEY)
        print(f"  [A pid {pid}] unloaded {KEY!r} (final save, lease released)")

        print("  starting process B again...")
        _run_second(url)
    finally:
        store.close()
    print("done: each run adds 10 coins; run it again to see them add up.")
    return 0


def _cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sessionstore.demo")
    parser.add_argument("--dsn", default=None)
    parser.add_argument("--second", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.second:
        return _second(args.dsn)
    return main(args.dsn)


if __name__ == "__main__":
    sys.exit(_cli())
