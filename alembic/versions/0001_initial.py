"""Initial schema: lease tokens, locks, records, versions, shards.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Every object lives in the configurable sessionstore schema (``_schema()``).
Bytes in ``versions.inline`` and ``shards.data`` are already zstd-compressed, so
their columns use ``STORAGE EXTERNAL``: out of line when large, never
recompressed by TOAST.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str:
    schema = op.get_context().version_table_schema
    assert schema, "env.py sets version_table_schema to the sessionstore schema"
    return str(schema)


def upgrade() -> None:
    s = _schema()
    op.execute(f'CREATE SCHEMA IF NOT EXISTS "{s}"')
    # Fencing tokens: strictly increasing, global to the schema.
    op.execute(f'CREATE SEQUENCE "{s}".lease_tokens AS bigint')

    op.create_table(
        "locks",
        sa.Column("store", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("holder", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("token", sa.BigInteger(), nullable=False),
        sa.Column(
            "acquired_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("clock_timestamp()"),
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("host", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.Column("pid", sa.Integer(), nullable=False, server_default=sa.text("0")),
        # The holder keeps a session advisory lock while alive: a row whose
        # holder lost it may be taken over at once instead of after expiry.
        sa.Column("liveness", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.PrimaryKeyConstraint("store", "key", name="locks_pkey"),
        schema=s,
    )
    op.create_index("locks_holder_idx", "locks", ["store", "holder"], schema=s)

    op.create_table(
        "records",
        sa.Column("store", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.Column("user_ids", postgresql.JSONB(), nullable=True),
        sa.PrimaryKeyConstraint("store", "key", name="records_pkey"),
        schema=s,
    )

    op.create_table(
        "versions",
        sa.Column("store", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("clock_timestamp()"),
        ),
        sa.Column("holder", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("token", sa.BigInteger(), nullable=False),
        sa.Column("codec", sa.SmallInteger(), nullable=False),
        sa.Column("raw_size", sa.BigInteger(), nullable=False),
        sa.Column("stored_size", sa.BigInteger(), nullable=False),
        sa.Column("checksum", sa.BigInteger(), nullable=False),
        sa.Column("shard_count", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("inline", postgresql.BYTEA(), nullable=True),
        sa.Column(
            "migrations",
            postgresql.JSONB(),
            nullable=False,
            server_default=sa.text("'[]'::jsonb"),
        ),
        sa.PrimaryKeyConstraint("store", "key", "version", name="versions_pkey"),
        schema=s,
    )
    op.execute(f'ALTER TABLE "{s}".versions ALTER COLUMN inline SET STORAGE EXTERNAL')

    op.create_table(
        "shards",
        sa.Column("store", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("data", postgresql.BYTEA(), nullable=False),
        sa.PrimaryKeyConstraint("store", "key", "version", "idx", name="shards_pkey"),
        sa.ForeignKeyConstraint(
            ["store", "key", "version"],
            [f"{s}.versions.store", f"{s}.versions.key", f"{s}.versions.version"],
            name="shards_version_fkey",
            ondelete="CASCADE",
        ),
        schema=s,
    )
    op.execute(f'ALTER TABLE "{s}".shards ALTER COLUMN data SET STORAGE EXTERNAL')


def downgrade() -> None:
    s = _schema()
    op.drop_table("shards", schema=s)
    op.drop_table("versions", schema=s)
    op.drop_table("records", schema=s)
    op.drop_index("locks_holder_idx", table_name="locks", schema=s)
    op.drop_table("locks", schema=s)
    op.execute(f'DROP SEQUENCE "{s}".lease_tokens')
