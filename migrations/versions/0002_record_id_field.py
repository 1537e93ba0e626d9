"""The record's own record_id field, where it is not its key.

A record imported from a JSON key file under a map key other than its own ``record_id`` field
(or with an empty one) keeps that field here, so that the export writes it back as the Rust
store would; NULL when the field equals the key (every record the store itself writes).

Revision ID: 0002_record_id_field
Revises: 0001_initial
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_record_id_field"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("idemstore_records", sa.Column("record_id_field", sa.String(), nullable=True))


def downgrade() -> None:
    # A plain ALTER TABLE ... DROP COLUMN on both engines (SQLite 3.35+): no table copy, which
    # on SQLite would drop the old table and, with foreign_keys=ON, cascade-delete every
    # conflict fingerprint.
    op.execute("ALTER TABLE idemstore_records DROP COLUMN record_id_field")
