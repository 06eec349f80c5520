"""Applied request ids and messages to keys.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

``applied_requests`` keeps the idempotency keys each key has applied: a row
is written in the same statement as the version carrying the request's
effect (``version``; ``idx`` orders the ids of one version), and the newest
``idempotency_retention`` per key are kept. ``messages`` holds messages sent
to a key (docs/messages.md) until the save that carries their effect
deletes them, in that save's statement. Both are keyed by ``(store, key,
...)`` like every other table, so they distribute by key with the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str:
    schema = op.get_context().version_table_schema
    assert schema, "env.py sets version_table_schema to the sessionstore schema"
    return str(schema)


def upgrade() -> None:
    s = _schema()
    op.create_table(
        "applied_requests",
        sa.Column("store", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column(
            "applied_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("clock_timestamp()"),
        ),
        sa.PrimaryKeyConstraint("store", "key", "request_id", name="applied_requests_pkey"),
        schema=s,
    )
    # Newest first, for the load (the newest N ids) and the retention prune.
    op.create_index(
        "applied_requests_order_idx",
        "applied_requests",
        ["store", "key", "version", "idx"],
        schema=s,
    )

    op.create_table(
        "messages",
        sa.Column("store", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        # Send order across all keys: one sequence (the coordinator's on Citus).
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("body", postgresql.JSONB(), nullable=False),
        # The sender's id for this send: a retry of a send whose commit was
        # not acknowledged finds its row instead of storing a second one.
        sa.Column("nonce", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column(
            "sent_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("clock_timestamp()"),
        ),
        sa.PrimaryKeyConstraint("store", "key", "id", name="messages_pkey"),
        sa.UniqueConstraint("store", "key", "nonce", name="messages_nonce_key"),
        schema=s,
    )


def downgrade() -> None:
    s = _schema()
    op.drop_table("messages", schema=s)
    op.drop_index("applied_requests_order_idx", table_name="applied_requests", schema=s)
    op.drop_table("applied_requests", schema=s)
