"""Reservation leases: until when a reservation's holder has the key.

``lease_expires_at_ms`` (a u64 stored shifted like the other timestamps, in a nullable BIGINT)
is set by ``reserve(..., lease=...)`` and ``renew``; a ``reserve`` with the same fingerprint
re-claims a ``reserved`` record without outcome once it has passed. NULL (every existing row,
every reservation without a lease) keeps the Rust store's rule: never re-claimed.

Revision ID: 0003_leases
Revises: 0002_record_id_field
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_leases"
down_revision: str | None = "0002_record_id_field"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "idemstore_records", sa.Column("lease_expires_at_ms", sa.BigInteger(), nullable=True)
    )


def downgrade() -> None:
    # A plain ALTER TABLE ... DROP COLUMN on both engines (SQLite 3.35+), as 0002 does: a
    # table copy would, with foreign_keys=ON, cascade-delete every conflict fingerprint.
    op.execute("ALTER TABLE idemstore_records DROP COLUMN lease_expires_at_ms")
