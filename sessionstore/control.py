"""The control connection: a holder's proof of life and its inbox.

Owns one long-lived session-mode connection per Store, on its own thread,
that (1) holds a session advisory lock on the holder id for as long as the
process lives, so that when the process dies PostgreSQL drops the lock and
other holders may take its leases at once, and (2) ``LISTEN``s on the
holder's channel (handoff requests from processes that want one of its
keys) and on the store's free channel (keys released or handed over, which
wakes loaders waiting for them). If the connection drops, the thread
reconnects and re-takes both within a short grace; loaders wait out that
grace, and see any sighting of the lock restart it, before they treat a
missing lock as a death (fencing keeps even a wrong guess safe).

Session advisory locks and LISTEN need a real session: behind PgBouncer in
transaction mode give the Store a ``control_dsn`` that bypasses it. Without
one, the lock and the LISTEN land on whichever server connection PgBouncer
lent for that statement, and stay there after it is lent to others: the
lock still looks held (for as long as that server connection lives, however
the process fares), and notifications never reach this connection.
:meth:`ControlConnection.hears` is how the Store finds out at start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ._storage.sql import ADVISORY_LOCK, listen
from .db import libpq_conninfo as libpq_url

__all__ = ["ControlConnection", "libpq_url"]

logger = logging.getLogger("sessionstore")


def _with_connect_timeout(conninfo: str) -> str:
    """``conninfo`` with ``connect_timeout=10`` unless it has one (the DSN wins, as for the engine).

    psycopg waits that long for each host of a multi-host DSN in turn: after a
    failover, a dead primary that does not answer (its machine down, rather
    than refusing) costs a whole timeout before the promoted standby is
    tried. A fixed 10 s here (it overrode the DSN's) kept the advisory lock
    off the new primary for 10 s, well past ``takeover_grace``, so other
    processes could take this live holder's keys (tests/test_failover.py).
    """
    if "connect_timeout" in conninfo_to_dict(conninfo):
        return conninfo
    return make_conninfo(conninfo, connect_timeout=10)


class ControlConnection:
    """Keeps the holder's advisory lock and delivers notifications to ``listeners``.

    ``listeners`` maps a channel to a callable taking the payload; it runs on
    this thread and must return at once (hand the work to another thread), as
    must ``on_reconnect``, called when the connection is back after a drop
    with the ``time.monotonic()`` at which the drop was seen.
    """

    def __init__(
        self,
        conninfo: str,
        holder: str,
        name: str,
        listeners: Mapping[str, Callable[[str], None]],
        *,
        liveness: bool,
        on_reconnect: Callable[[float], None] | None = None,
        reconnect_delay: float = 0.05,
        log_extra: Mapping[str, object] | None = None,
    ) -> None:
        self._conninfo = _with_connect_timeout(conninfo)
        self._holder = holder
        self._listeners = dict(listeners)
        self._liveness = liveness
        self._on_reconnect = on_reconnect
        self._connected_before = False
        self.down_since: float | None = None
        """When the connection was seen to drop (``time.monotonic()``); None while it is up."""
        self._log_extra = log_extra
        self._reconnect_delay = reconnect_delay
        self._stopped = threading.Event()
        self._ready = threading.Event()
        self._probes: dict[str, threading.Event] = {}
        self.last_error: Exception | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"sessionstore-control-{name}", daemon=True
        )
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the lock is held and the channels are listened to."""
        return self._ready.wait(timeout)

    def hears(self, channel: str, payload: str, send: Callable[[], None], timeout: float) -> bool:
        """Does a notification that ``send()`` makes from another session reach us in time?

        ``send`` NOTIFYs ``channel`` (one we listen on) with ``payload``, on
        another connection. A real session hears it within milliseconds; a
        connection behind a transaction pool never does. The payload is taken
        here, never given to the channel's listener, even if it comes late.
        """
        heard = self._probes.setdefault(f"{channel}\0{payload}", threading.Event())
        send()
        return heard.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _serve(self, conn: psycopg.Connection[object]) -> None:
        if self._liveness:
            conn.execute(ADVISORY_LOCK, (self._holder,))
        for channel in self._listeners:
            conn.execute(listen(channel))
        self._ready.set()
        dropped, self.down_since = self.down_since, None
        if self._connected_before and self._on_reconnect is not None:
            # Notifications sent while it was away are lost.
            self._on_reconnect(dropped if dropped is not None else time.monotonic())
        self._connected_before = True
        while not self._stopped.is_set():
            for notify in conn.notifies(timeout=0.1):
                probe = self._probes.get(f"{notify.channel}\0{notify.payload}")
                handler = self._listeners.get(notify.channel)
                if probe is not None:
                    probe.set()
                elif handler is not None:
                    handler(notify.payload)

    def _run(self) -> None:
        delay = self._reconnect_delay
        while not self._stopped.is_set():
            try:
                with psycopg.connect(
                    self._conninfo,
                    autocommit=True,
                    application_name="sessionstore-control",
                ) as conn:
                    delay = self._reconnect_delay
                    self._serve(conn)
            except Exception as exc:
                self.last_error = exc
                if self._stopped.is_set():
                    break
                self._ready.clear()
                if self._connected_before and self.down_since is None:
                    self.down_since = time.monotonic()
                logger.warning(
                    "%s: control connection lost, reconnecting: %s",
                    self._thread.name,
                    exc,
                    extra=self._log_extra,
                )
                time.sleep(delay)
                delay = min(delay * 2, 0.25)  # back well within a takeover grace
        self._ready.clear()
