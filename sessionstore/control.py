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
transaction mode give the Store a ``control_dsn`` that bypasses it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

import psycopg

from ._storage.sql import ADVISORY_LOCK, listen
from .db import libpq_conninfo as libpq_url

__all__ = ["ControlConnection", "libpq_url"]

logger = logging.getLogger("sessionstore")


class ControlConnection:
    """Keeps the holder's advisory lock and delivers notifications to ``listeners``.

    ``listeners`` maps a channel to a callable taking the payload; it runs on
    this thread and must return at once (hand the work to another thread), as
    must ``on_reconnect``, called when the connection is back after a drop.
    """

    def __init__(
        self,
        conninfo: str,
        holder: str,
        name: str,
        listeners: Mapping[str, Callable[[str], None]],
        *,
        liveness: bool,
        on_reconnect: Callable[[], None] | None = None,
        reconnect_delay: float = 0.05,
        log_extra: Mapping[str, object] | None = None,
    ) -> None:
        self._conninfo = conninfo
        self._holder = holder
        self._listeners = dict(listeners)
        self._liveness = liveness
        self._on_reconnect = on_reconnect
        self._connected_before = False
        self._log_extra = log_extra
        self._reconnect_delay = reconnect_delay
        self._stopped = threading.Event()
        self._ready = threading.Event()
        self.last_error: Exception | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"sessionstore-control-{name}", daemon=True
        )
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the lock is held and the channels are listened to."""
        return self._ready.wait(timeout)

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
        if self._connected_before and self._on_reconnect is not None:
            self._on_reconnect()  # notifications sent while it was away are lost
        self._connected_before = True
        while not self._stopped.is_set():
            for notify in conn.notifies(timeout=0.1):
                handler = self._listeners.get(notify.channel)
                if handler is not None:
                    handler(notify.payload)

    def _run(self) -> None:
        delay = self._reconnect_delay
        while not self._stopped.is_set():
            try:
                with psycopg.connect(
                    self._conninfo,
                    autocommit=True,
                    application_name="sessionstore-control",
                    connect_timeout=10,
                ) as conn:
                    delay = self._reconnect_delay
                    self._serve(conn)
            except Exception as exc:
                self.last_error = exc
                if self._stopped.is_set():
                    break
                self._ready.clear()
                logger.warning(
                    "%s: control connection lost, reconnecting: %s",
                    self._thread.name,
                    exc,
                    extra=self._log_extra,
                )
                time.sleep(delay)
                delay = min(delay * 2, 0.25)  # back well within a takeover grace
        self._ready.clear()
