"""The tables: the one source of truth that the Alembic migrations match.

``idemstore_records`` has the columns of :data:`idemstore.db.codec.RECORD_COLUMNS`, in that
order (checked here: the codec is the only place that knows a row's layout). Unsigned 64-bit
values are stored shifted (:func:`~idemstore.db.codec.encode_u64`); :class:`UInt64` does the
shift for Core queries of your own.
"""

from __future__ import annotations

from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from .codec import RECORD_COLUMNS, decode_u64, encode_u64

#: Every Alembic revision this version of the package knows, oldest first: one line per
#: script in ``migrations/versions`` (a test keeps them equal). Opening a store compares the
#: version table with these, without loading Alembic.
SCHEMA_REVISIONS: Final[tuple[str, ...]] = (
    "0001_initial",
    "0002_record_id_field",
    "0003_leases",
    "0004_partial_expiry_index",
)
#: The revision this version of the package needs: the head of ``migrations/``.
SCHEMA_REVISION: Final = SCHEMA_REVISIONS[-1]
#: Alembic's version table for idemstore, kept apart from a host app's ``alembic_version``.
VERSION_TABLE: Final = "idemstore_alembic_version"


class UInt64(sa.TypeDecorator[int]):
    """A Rust ``u64`` column, stored order-preserving in a signed BIGINT (see the codec)."""

    impl = sa.BigInteger
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Dialect) -> int | None:
        return None if value is None else encode_u64(value)

    def process_result_value(self, value: Any | None, dialect: Dialect) -> int | None:
        return None if value is None else decode_u64(value)


metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

records = sa.Table(
    "idemstore_records",
    metadata,
    sa.Column("record_id", sa.String, primary_key=True),
    sa.Column("schema_version", sa.BigInteger, nullable=False),
    sa.Column("org_id", sa.String, nullable=False),
    sa.Column("workspace_id", sa.String, nullable=False),
    sa.Column("deployment_id", sa.String, nullable=True),
    sa.Column("actor_id", sa.String, nullable=True),
    sa.Column("tenant_source", sa.String(16), nullable=False),
    sa.Column("operation", sa.String, nullable=False),
    sa.Column("key", sa.String, nullable=False),
    sa.Column("owner", sa.String, nullable=False),
    sa.Column("request_fingerprint", sa.String, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("first_seen_at_ms", UInt64, nullable=False),
    sa.Column("last_seen_at_ms", UInt64, nullable=False),
    sa.Column("first_seen_event_id", sa.String, nullable=True),
    sa.Column("expires_at_ms", UInt64, nullable=True),
    sa.Column("outcome_kind", sa.String, nullable=True),
    sa.Column("outcome_completed_at_ms", UInt64, nullable=True),
    sa.Column("outcome_primary_ref_kind", sa.String, nullable=True),
    sa.Column("outcome_primary_ref_id", sa.String, nullable=True),
    sa.Column("outcome_secondary_ref_kind", sa.String, nullable=True),
    sa.Column("outcome_secondary_ref_id", sa.String, nullable=True),
    # JSON exactly as written (compact, keys sorted): TEXT on SQLite (a column declared JSON
    # there has NUMERIC affinity and would turn "1.50" into 1.5), JSON on PostgreSQL (which
    # keeps the text as given, unlike JSONB). The generic sa.JSON: PostgreSQL's dialect maps
    # it to its own JSON, and importing that dialect here would cost every SQLite user.
    sa.Column("outcome_details", sa.Text().with_variant(sa.JSON(), "postgresql"), nullable=True),
    sa.Column("conflict_count", UInt64, nullable=False),
    # The record's own record_id field where it is not its key (a record imported under
    # another map key, or with an empty field); NULL otherwise (revision 0002).
    sa.Column("record_id_field", sa.String, nullable=True),
    # idemstore's own (not in the Rust file): until when the reservation's holder has the key;
    # NULL for a reservation without a lease, never re-claimed (revision 0003).
    sa.Column("lease_expires_at_ms", UInt64, nullable=True),
    # Random per reservation: tells the caller whose upsert created the current generation,
    # so Reserved vs Duplicate is exact even within one millisecond.
    sa.Column("reservation_token", sa.BigInteger, nullable=False),
    sa.CheckConstraint("status IN ('reserved', 'completed', 'conflicted')", name="status"),
    sa.CheckConstraint("tenant_source IN ('local_implicit', 'explicit')", name="tenant_source"),
    sa.CheckConstraint(
        "(outcome_kind IS NULL) = (outcome_completed_at_ms IS NULL)", name="outcome_complete"
    ),
    # Only where set (revision 0004): purge_expired's ``expires_at_ms <= now`` implies it,
    # and a reservation without expiry writes no index entry. PostgreSQL has the same WHERE
    # (the migration's); declaring it here as ``postgresql_where`` would load SQLAlchemy's
    # PostgreSQL dialect on every SQLite path (tests/test_imports.py), and Alembic's
    # models-vs-migrations comparison does not look at an index's WHERE on either engine.
    sa.Index(
        "ix_idemstore_records_expires_at_ms_set",
        "expires_at_ms",
        sqlite_where=sa.text("expires_at_ms IS NOT NULL"),
    ),
)

conflict_fingerprints = sa.Table(
    "idemstore_conflict_fingerprints",
    metadata,
    # Insertion order = first-seen order.
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        sa.Identity(),
        primary_key=True,
    ),
    sa.Column(
        "record_id",
        sa.String,
        sa.ForeignKey(records.c.record_id, ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("fingerprint", sa.String, nullable=False),
    sa.UniqueConstraint("record_id", "fingerprint"),
)

if tuple(records.c.keys()) != RECORD_COLUMNS:  # pragma: no cover - a column added to one only
    raise RuntimeError("idemstore_records must have the codec's RECORD_COLUMNS, in order")

__all__ = [
    "SCHEMA_REVISION",
    "SCHEMA_REVISIONS",
    "VERSION_TABLE",
    "UInt64",
    "conflict_fingerprints",
    "metadata",
    "records",
]
