"""The audit log of operator actions.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

``audit`` keeps one row per operator action taken with the command line
(``sessionstore unlock``: a lease stolen from its holder, with the reason
given). It records who held the key (``old_holder``, ``old_token`` and the
holder's host and pid), the token the action put in its place
(``new_token``), who acted (``actor``: the OS user and host of the command
line) and when (``at``, the database clock). Keyed by ``(store, key, id)``
like every other table, so it distributes by key with the rest; ``id``
comes from one identity sequence, so it grows in the order of the actions.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str:
    schema = op.get_context().version_table_schema
    assert schema, "env.py sets version_table_schema to the sessionstore schema"
    return str(schema)


def upgrade() -> None:
    s = _schema()
    op.create_table(
        "audit",
        sa.Column("store", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("old_holder", postgresql.UUID(as_uuid=True), nullable=True),
        sa.Column("old_token", sa.BigInteger(), nullable=True),
        sa.Column("old_host", sa.Text(), nullable=True),
        sa.Column("old_pid", sa.Integer(), nullable=True),
        sa.Column("new_token", sa.BigInteger(), nullable=True),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column(
            "at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("clock_timestamp()"),
        ),
        sa.PrimaryKeyConstraint("store", "key", "id", name="audit_pkey"),
        schema=s,
    )
    # `sessionstore audit STORE`: a store's actions in order, whatever the key.
    op.create_index("audit_store_id_idx", "audit", ["store", "id"], schema=s)


def downgrade() -> None:
    s = _schema()
    op.drop_index("audit_store_id_idx", table_name="audit", schema=s)
    op.drop_table("audit", schema=s)
