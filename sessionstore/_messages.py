"""Messages to keys: sending, and applying them where the key is held.

Owns ``send_message`` and the holder's side of it (docs/messages.md). A
message is stored durably by the sender; the key's live holder is woken by
a NOTIFY on its message channel and runs ``message_handler(key, data,
message)`` on the callback lane, inside an update of the key. An applied
message is recorded on the session, and the next write of the key deletes
its row in the same statement that stores its effect, so the effect lands
exactly once in the stored data: a holder that dies before that write
leaves the message in place, and the next holder applies it again to the
data as it was last saved. A key nobody holds gets its messages at its next
load, in send order, before changed callbacks fire. A handler that returns
``False`` or raises leaves the message waiting until the key is loaded
again. The autosave pass sweeps the held keys for messages a missed NOTIFY
left behind.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from ._background import DeliverMessages
from ._registry import KeyState
from ._storage import Message
from .errors import MessageQueueFullError, SessionStoreError
from .frozen import JSON, encode, thaw

if TYPE_CHECKING:
    from ._core import StoreCore
    from .session import Change, Session

__all__ = ["Messages"]

_SWEEP_BATCH = 1000
"""Held keys asked about per statement when sweeping for missed messages."""


class Messages:
    """The message path of one Store core."""

    def __init__(self, core: StoreCore) -> None:
        self._core = core
        self._lock = threading.Lock()
        # Keys whose NOTIFY came while they were loading: delivered once LIVE.
        self._early: set[str] = set()

    # -- sending --------------------------------------------------------------

    def send(self, key: str, message: JSON) -> int:
        """Store ``message`` for ``key`` (durable on return) and wake its holder; its id."""
        core = self._core
        body = encode(thaw(message)).decode()
        found = core.repo.send_message(key, body, core.config.max_pending_messages)
        if found is None:
            raise MessageQueueFullError(
                f"{core.describe(key)}: {core.config.max_pending_messages} messages are "
                "already waiting (max_pending_messages)"
            )
        return found

    # -- the holder's side --------------------------------------------------------

    def on_notify(self, key: str) -> None:
        """A message for ``key`` arrived (control thread: returns at once)."""
        core = self._core
        if core.config.message_handler is None or core.closing:
            return
        entry = core.table.get(key)
        if entry is None:
            return
        with self._lock:
            self._early.add(key)  # before the state check: see loaded()
        if entry.state is KeyState.LIVE:
            core.lane.submit(DeliverMessages(core, key))

    def loaded(self, key: str) -> None:
        """``key`` just became LIVE: deliver what was announced while it loaded."""
        with self._lock:
            if key not in self._early:
                return
            self._early.discard(key)
        self._core.lane.submit(DeliverMessages(self._core, key))

    def forget(self, key: str) -> None:
        with self._lock:
            self._early.discard(key)

    def apply_at_load(self, session: Session) -> None:
        """Apply every waiting message to a key being loaded (the loading thread)."""
        if self._core.config.message_handler is not None:
            self._apply(session, announce=False)

    def deliver(self, key: str) -> None:
        """Apply new messages to a held key (the callback lane)."""
        with self._lock:
            self._early.discard(key)
        entry = self._core.table.get(key)
        if entry is None or entry.state is not KeyState.LIVE or entry.session is None:
            return
        try:
            self._apply(entry.session, announce=True)
        except SessionStoreError as exc:  # the database, or the key went meanwhile
            self._core.log(logging.WARNING, key, "message delivery stopped: %s", exc)

    def _apply(self, session: Session, *, announce: bool) -> None:
        core = self._core
        limit = core.config.max_pending_messages
        while True:
            batch = core.repo.pending_messages(session.key, session.seen_message, limit)
            for message in batch:
                change = self._apply_one(session, message)
                if announce and change is not None:
                    core.announce(session, change)
            if len(batch) < limit:
                return

    def _apply_one(self, session: Session, message: Message) -> Change | None:
        core = self._core
        handler = core.config.message_handler
        assert handler is not None
        key = session.key

        def transform(data: Any) -> Any:
            return handler(key, data, message.body)

        try:
            committed, change = session.update(transform, message_id=message.id)
        except SessionStoreError as exc:
            if session.closed or session.entry.state is KeyState.UNLOADING:
                raise
            core.log(
                logging.ERROR,
                key,
                "message_handler failed on message %d; it stays waiting: %s",
                message.id,
                exc,
                exc_info=True,
            )
            session.skip_message(message.id)
            committed, change = False, None
        if committed:
            core.stats.add("messages_applied")
        return change

    def sweep(self) -> None:
        """Deliver messages to held keys whose NOTIFY was missed (worker, after autosave)."""
        core = self._core
        if core.config.message_handler is None:
            return
        held = [e.key for e in core.table.entries(KeyState.LIVE)]
        for start in range(0, len(held), _SWEEP_BATCH):
            try:
                waiting = core.repo.keys_with_messages(held[start : start + _SWEEP_BATCH])
            except SessionStoreError as exc:
                core.log(logging.WARNING, None, "message sweep failed: %s", exc)
                return
            for key in sorted(waiting):
                core.lane.submit(DeliverMessages(core, key))
