"""Records and their conflict fingerprints.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # u64 columns are BIGINT holding value - 2^63 (see idemstore.db.codec).
    op.create_table(
        "idemstore_records",
        sa.Column("record_id", sa.String(), nullable=False),
        sa.Column("schema_version", sa.BigInteger(), nullable=False),
        sa.Column("org_id", sa.String(), nullable=False),
        sa.Column("workspace_id", sa.String(), nullable=False),
        sa.Column("deployment_id", sa.String(), nullable=True),
        sa.Column("actor_id", sa.String(), nullable=True),
        sa.Column("tenant_source", sa.String(length=16), nullable=False),
        sa.Column("operation", sa.String(), nullable=False),
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("request_fingerprint", sa.String(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("first_seen_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("first_seen_event_id", sa.String(), nullable=True),
        sa.Column("expires_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("outcome_kind", sa.String(), nullable=True),
        sa.Column("outcome_completed_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("outcome_primary_ref_kind", sa.String(), nullable=True),
        sa.Column("outcome_primary_ref_id", sa.String(), nullable=True),
        sa.Column("outcome_secondary_ref_kind", sa.String(), nullable=True),
        sa.Column("outcome_secondary_ref_id", sa.String(), nullable=True),
        sa.Column(
            "outcome_details",
            sa.Text().with_variant(postgresql.JSON(), "postgresql"),
            nullable=True,
        ),
        sa.Column("conflict_count", sa.BigInteger(), nullable=False),
        sa.Column("reservation_token", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "status IN ('reserved', 'completed', 'conflicted')",
            name=op.f("ck_idemstore_records_status"),
        ),
        sa.CheckConstraint(
            "tenant_source IN ('local_implicit', 'explicit')",
            name=op.f("ck_idemstore_records_tenant_source"),
        ),
        sa.CheckConstraint(
            "(outcome_kind IS NULL) = (outcome_completed_at_ms IS NULL)",
            name=op.f("ck_idemstore_records_outcome_complete"),
        ),
        sa.PrimaryKeyConstraint("record_id", name=op.f("pk_idemstore_records")),
    )
    op.create_index("ix_idemstore_records_expires_at_ms", "idemstore_records", ["expires_at_ms"])
    op.create_table(
        "idemstore_conflict_fingerprints",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(),
            nullable=False,
        ),
        sa.Column("record_id", sa.String(), nullable=False),
        sa.Column("fingerprint", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(
            ["record_id"],
            ["idemstore_records.record_id"],
            name=op.f("fk_idemstore_conflict_fingerprints_record_id_idemstore_records"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idemstore_conflict_fingerprints")),
        sa.UniqueConstraint(
            "record_id",
            "fingerprint",
            name=op.f("uq_idemstore_conflict_fingerprints_record_id_fingerprint"),
        ),
    )


def downgrade() -> None:
    op.drop_table("idemstore_conflict_fingerprints")
    op.drop_index("ix_idemstore_records_expires_at_ms", table_name="idemstore_records")
    op.drop_table("idemstore_records")
