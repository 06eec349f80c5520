"""SQL fragments shared by the storage layer's statements, and channel names.

Owns the pieces every statement must spell the same way: the lease check
that fences the end of a streamed write (:data:`LEASE_HELD`; every other
fenced write is a server function of revision 0004), the advisory lock the
control connection takes (its proof of life, which the ``holder_alive``
function of revision 0004 looks for), and the LISTEN/NOTIFY channel names. Statements
themselves live beside the code that runs them (``leases``, ``files``).
Identifiers spliced into SQL are validated schema names; every value is a
bound parameter.
"""

from __future__ import annotations

import hashlib

__all__ = [
    "ADVISORY_LOCK",
    "LEASE_HELD",
    "free_channel",
    "holder_channel",
    "listen",
    "message_channel",
    "one_lease",
]

LEASE_HELD = (
    "l.store = {store} AND l.holder = CAST({holder} AS uuid) AND {match} "
    "AND l.expires_at > clock_timestamp()"
)
"""The fence: the lease row ``l`` still carries our holder and token and has not
expired on the database clock. ``match`` picks the keys and tokens
(:func:`one_lease` for one key); the other placeholders are the statement's
own parameters. The streamed write's last statement uses it; the server
functions (revision 0004) spell the same check in PL/pgSQL."""


def one_lease(key: str, token: str) -> str:
    """The ``match`` of :data:`LEASE_HELD` for one key and token (SQL placeholders)."""
    return f"l.key = {key} AND l.token = {token}"


# The two-int4 form of the advisory lock shows in pg_locks as classid/objid
# with objsubid = 2; a hash collision can only make a dead holder look alive
# (then its leases are taken when they expire), never the reverse.
ADVISORY_LOCK = "SELECT pg_advisory_lock(hashtext('sessionstore.holder'), hashtext(%s))"


def holder_channel(holder: str) -> str:
    """The channel a holder listens on for handoff requests (a valid identifier)."""
    return "sessionstore_" + holder.replace("-", "")


def message_channel(holder: str) -> str:
    """The channel a holder listens on for messages to its keys (payload: the key)."""
    return "sessionstore_m" + holder.replace("-", "")


def free_channel(schema: str, store: str) -> str:
    """The channel on which releases and handovers of a store's keys are announced.

    One per (schema, store): a loader waiting for a key wakes when it is free.
    Hashed to stay within PostgreSQL's 63-byte identifiers.
    """
    digest = hashlib.blake2b(f"{schema}\0{store}".encode(), digest_size=12).hexdigest()
    return "sessionstore_free_" + digest


def listen(channel: str) -> str:
    """``LISTEN`` for a channel made by one of the ``*_channel`` functions here."""
    if not channel.replace("_", "").isalnum():  # pragma: no cover - our own names only
        raise ValueError(f"bad channel name {channel!r}")
    return f'LISTEN "{channel}"'
