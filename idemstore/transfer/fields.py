"""The Rust file format's field tables: which fields a record, its tenant and its outcome
have, in the order Rust writes them, and the defaults a file may leave out. Shared inside
``idemstore.transfer`` (the reader, the validator, the fast row converter and the writer)."""

from __future__ import annotations

from typing import Final

from ..model import RecordStatus, TenantContext, TenantSource
from ..rules import RUST_WHITESPACE

#: The newest file ``schema_version`` this package reads (and the one it writes).
SUPPORTED_SCHEMA_VERSION: Final = 1

#: A record's fields, in the order Rust declares (and writes) them.
RECORD_FIELDS: Final = (
    "schema_version",
    "record_id",
    "tenant_context",
    "operation",
    "key",
    "owner",
    "request_fingerprint",
    "status",
    "first_seen_at_ms",
    "last_seen_at_ms",
    "first_seen_event_id",
    "expires_at_ms",
    "outcome",
    "conflict_count",
    "conflict_fingerprints",
)
RECORD_FIELD_SET: Final = frozenset(RECORD_FIELDS)
TENANT_FIELD_SET: Final = frozenset(
    ("org_id", "workspace_id", "deployment_id", "actor_id", "source")
)
OUTCOME_FIELDS: Final = (
    "outcome_kind",
    "completed_at_ms",
    "primary_ref_kind",
    "primary_ref_id",
    "secondary_ref_kind",
    "secondary_ref_id",
    "details",
)
OUTCOME_FIELD_SET: Final = frozenset(OUTCOME_FIELDS)

#: The Rust default tenant of a record without ``tenant_context`` (not ``local_implicit``).
LEGACY_TENANT: Final = TenantContext.explicit_user_workspace("local", "default", None, "system")
STATUS: Final = {s.value: s for s in RecordStatus}
SOURCE: Final = {s.value: s for s in TenantSource}
#: char::is_whitespace in Rust (Unicode White_Space), used only by the "blank file" rule,
#: because the Rust reader tests ``raw.trim().is_empty() || raw.trim() == "{}"``.
RUST_WS: Final = frozenset(RUST_WHITESPACE)

#: Text fields of a record (dotted paths): what PostgreSQL stores in ``text`` columns, which
#: cannot hold NUL (details are stored as JSON, where NUL stays an escape).
TEXT_FIELDS: Final = (
    "record_id",
    "tenant_context.org_id",
    "tenant_context.workspace_id",
    "tenant_context.deployment_id",
    "tenant_context.actor_id",
    "operation",
    "key",
    "owner",
    "request_fingerprint",
    "first_seen_event_id",
    "outcome.outcome_kind",
    "outcome.primary_ref_kind",
    "outcome.primary_ref_id",
    "outcome.secondary_ref_kind",
    "outcome.secondary_ref_id",
)
#: The message for NUL in a text field when the database is PostgreSQL.
NUL_REFUSED: Final = (
    "text containing NUL (\\u0000) cannot be stored in PostgreSQL (only in details)"
)
