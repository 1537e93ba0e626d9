"""THE record codec: the only place that knows the layout of a record's row.

A row is a tuple of the ``idemstore_records`` columns in :data:`RECORD_COLUMNS` order: u64
values shifted to their stored form, outcome details as their stored text, the random
``reservation_token`` last. The store's statements, the importer's rows (also those its parse
workers build) and the exporter all go through here, so a column is added here once (see
docs/ARCHITECTURE.md).

This is the row's logical order. Statements always name their columns, so the order in which
a database holds them (a migration appends a column) does not matter.

Rust's ``u64`` (timestamps, ``conflict_count``) can reach 2^64-1, which no portable SQL integer
holds: it is stored in a signed BIGINT as ``value - 2^63`` (:func:`encode_u64`), which keeps the
order, so ``expires_at_ms <= now`` and its index work on stored values directly.

No SQLAlchemy here: the parse worker processes build rows without loading the database layer.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Final

from .. import jsonvalue
from ..model import (
    U64_MAX,
    U64_SHIFT,
    IdempotencyRecord,
    Outcome,
    RecordStatus,
    TenantContext,
    TenantSource,
)
from ..rules import dump_details

Row = tuple[Any, ...]
#: The tenant's columns, and the outcome's as :func:`make_row` takes them.
TenantColumns = tuple[str, str, str | None, str | None, str]
OutcomeColumns = tuple[
    str | None, int | None, str | None, str | None, str | None, str | None, str | None
]

#: The ``idemstore_records`` columns, in row order. A new column goes before
#: ``reservation_token``, which stays last (a row without it is the record's content).
RECORD_COLUMNS: Final = (
    "record_id",
    "schema_version",
    "org_id",
    "workspace_id",
    "deployment_id",
    "actor_id",
    "tenant_source",
    "operation",
    "key",
    "owner",
    "request_fingerprint",
    "status",
    "first_seen_at_ms",
    "last_seen_at_ms",
    "first_seen_event_id",
    "expires_at_ms",
    "outcome_kind",
    "outcome_completed_at_ms",
    "outcome_primary_ref_kind",
    "outcome_primary_ref_id",
    "outcome_secondary_ref_kind",
    "outcome_secondary_ref_id",
    "outcome_details",
    "conflict_count",
    "record_id_field",
    "lease_expires_at_ms",
    "reservation_token",
)
#: Columns holding a Rust ``u64``, stored shifted (:func:`encode_u64`).
U64_COLUMNS: Final = frozenset(
    (
        "first_seen_at_ms",
        "last_seen_at_ms",
        "expires_at_ms",
        "outcome_completed_at_ms",
        "conflict_count",
        "lease_expires_at_ms",
    )
)
#: The tenant's five columns and the outcome's seven, each in row order.
TENANT_COLUMNS: Final = RECORD_COLUMNS[2:7]
OUTCOME_COLUMNS: Final = tuple(c for c in RECORD_COLUMNS if c.startswith("outcome_"))
#: Positions in a row of what the operations read without decoding the record.
KEY: Final = RECORD_COLUMNS.index("record_id")
FINGERPRINT: Final = RECORD_COLUMNS.index("request_fingerprint")
TOKEN: Final = RECORD_COLUMNS.index("reservation_token")
STATUS: Final = RECORD_COLUMNS.index("status")
CONFLICT_COUNT: Final = RECORD_COLUMNS.index("conflict_count")


def token_text(token: int) -> str:
    """The opaque token a caller is handed (``Reserved.token``) for a stored
    ``reservation_token``."""
    return format(token, "x")


def token_value(text: str) -> int | None:
    """The stored ``reservation_token`` a caller's token names; None if it names none (it is
    not a token :func:`token_text` made)."""
    if not isinstance(text, str) or not 0 < len(text) <= 16:
        return None
    try:
        value = int(text, 16)
    except ValueError:
        return None
    return value if token_text(value) == text and value < 2**63 else None


def encode_u64(value: int) -> int:
    """A u64 as stored: ``value - 2^63``, in a signed 64-bit column, order kept."""
    return value - U64_SHIFT


def decode_u64(stored: int) -> int:
    """Inverse of :func:`encode_u64`."""
    return int(stored) + U64_SHIFT


#: Stored form of the largest u64 (the conflict-count saturation point).
U64_MAX_STORED: Final = encode_u64(U64_MAX)


def make_row(
    record_id: str,
    schema_version: int,
    org_id: str,
    workspace_id: str,
    deployment_id: str | None,
    actor_id: str | None,
    tenant_source: str,
    operation: str,
    key: str,
    owner: str,
    request_fingerprint: str,
    status: str,
    first_seen_at_ms: int,
    last_seen_at_ms: int,
    first_seen_event_id: str | None,
    expires_at_ms: int | None,
    outcome_kind: str | None,
    outcome_completed_at_ms: int | None,
    outcome_primary_ref_kind: str | None,
    outcome_primary_ref_id: str | None,
    outcome_secondary_ref_kind: str | None,
    outcome_secondary_ref_id: str | None,
    outcome_details: str | None,
    conflict_count: int,
    record_id_field: str | None,
    lease_expires_at_ms: int | None,
    reservation_token: int,
) -> Row:
    """A row from its values as the record holds them (u64 values as they are, details as
    stored text, enums as their strings): the one place a row tuple is built. The parameters
    are the columns; callers on a hot path (the importer) pass them by position."""
    return (
        record_id,
        schema_version,
        org_id,
        workspace_id,
        deployment_id,
        actor_id,
        tenant_source,
        operation,
        key,
        owner,
        request_fingerprint,
        status,
        first_seen_at_ms - U64_SHIFT,
        last_seen_at_ms - U64_SHIFT,
        first_seen_event_id,
        None if expires_at_ms is None else expires_at_ms - U64_SHIFT,
        outcome_kind,
        None if outcome_completed_at_ms is None else outcome_completed_at_ms - U64_SHIFT,
        outcome_primary_ref_kind,
        outcome_primary_ref_id,
        outcome_secondary_ref_kind,
        outcome_secondary_ref_id,
        outcome_details,
        conflict_count - U64_SHIFT,
        record_id_field,
        None if lease_expires_at_ms is None else lease_expires_at_ms - U64_SHIFT,
        reservation_token,
    )


if tuple(inspect.signature(make_row).parameters) != RECORD_COLUMNS:  # pragma: no cover
    raise RuntimeError("codec: make_row's parameters must be RECORD_COLUMNS, in order")


#: The outcome columns of a record without one.
NO_OUTCOME: Final[OutcomeColumns] = (None, None, None, None, None, None, None)


def tenant_values(tenant: TenantContext) -> TenantColumns:
    """The tenant's five columns (:data:`TENANT_COLUMNS`)."""
    return (
        tenant.org_id,
        tenant.workspace_id,
        tenant.deployment_id,
        tenant.actor_id,
        TenantSource(tenant.source).value,
    )


def outcome_values(outcome: Outcome | None) -> OutcomeColumns:
    """The outcome's seven columns as :func:`make_row` takes them (``completed_at_ms``
    not shifted yet; details as stored text, checked by :func:`~idemstore.rules.dump_details`)."""
    if outcome is None:
        return NO_OUTCOME
    return (
        outcome.outcome_kind,
        outcome.completed_at_ms,
        outcome.primary_ref_kind,
        outcome.primary_ref_id,
        outcome.secondary_ref_kind,
        outcome.secondary_ref_id,
        dump_details(outcome.details),
    )


def stored_outcome(outcome: Outcome | None) -> dict[str, Any]:
    """The outcome's columns as stored (:data:`OUTCOME_COLUMNS` -> value), e.g. for the
    ``UPDATE`` of a completion."""
    kind, completed, *rest = outcome_values(outcome)
    stored = (kind, None if completed is None else encode_u64(completed), *rest)
    return dict(zip(OUTCOME_COLUMNS, stored, strict=True))


def field_of(key: str, record_id: str) -> str | None:
    """The ``record_id_field`` column of a record stored under ``key`` whose own
    ``record_id`` field is ``record_id``: NULL when they are equal (every record the store
    writes itself), else the field as the file had it."""
    return None if record_id == key else record_id


def full_row(record: IdempotencyRecord, token: int, key: str | None = None) -> Row:
    """A record's whole row with its reservation ``token``, stored under ``key`` (default: its
    own ``record_id``; another key keeps the record's own field in ``record_id_field``)."""
    key = record.record_id if key is None else key
    return make_row(
        key,
        record.schema_version,
        *tenant_values(record.tenant_context),
        record.operation,
        record.key,
        record.owner,
        record.request_fingerprint,
        RecordStatus(record.status).value,
        record.first_seen_at_ms,
        record.last_seen_at_ms,
        record.first_seen_event_id,
        record.expires_at_ms,
        # mypy (1.x) misaligns a fixed-length tuple unpacked after positional arguments
        *outcome_values(record.outcome),  # type: ignore[arg-type]
        record.conflict_count,
        field_of(key, record.record_id),
        record.lease_expires_at_ms,
        token,
    )


def record_row(record: IdempotencyRecord, key: str | None = None) -> Row:
    """A record's row without its token (its content: what two copies of a record must
    share to be the same), stored under ``key`` (default: its own ``record_id``)."""
    return full_row(record, 0, key)[:TOKEN]


def content(row: Sequence[Any]) -> Row:
    """A row without its reservation token (the token is random per reservation)."""
    return tuple(row[:TOKEN])


def record_from_row(row: Sequence[Any], fingerprints: Sequence[str] = ()) -> IdempotencyRecord:
    """The :class:`IdempotencyRecord` of a row (in :data:`RECORD_COLUMNS` order, details as
    text), with its conflict fingerprints in first-seen order. Its ``record_id`` is the
    record's own field, as the Rust store holds it: ``record_id_field`` where the row has one,
    else the key it is stored under."""
    (
        record_id,
        schema_version,
        org_id,
        workspace_id,
        deployment_id,
        actor_id,
        tenant_source,
        operation,
        key,
        owner,
        request_fingerprint,
        status,
        first_seen_at_ms,
        last_seen_at_ms,
        first_seen_event_id,
        expires_at_ms,
        outcome_kind,
        outcome_completed_at_ms,
        primary_ref_kind,
        primary_ref_id,
        secondary_ref_kind,
        secondary_ref_id,
        details,
        conflict_count,
        record_id_field,
        lease_expires_at_ms,
        _token,
    ) = row
    outcome = None
    if outcome_kind is not None:
        outcome = Outcome(
            outcome_kind=outcome_kind,
            completed_at_ms=decode_u64(outcome_completed_at_ms),
            primary_ref_kind=primary_ref_kind,
            primary_ref_id=primary_ref_id,
            secondary_ref_kind=secondary_ref_kind,
            secondary_ref_id=secondary_ref_id,
            details=None if details is None else jsonvalue.loads(details),
        )
    return IdempotencyRecord(
        schema_version=int(schema_version),
        record_id=record_id if record_id_field is None else record_id_field,
        tenant_context=TenantContext(
            org_id, workspace_id, deployment_id, actor_id, TenantSource(tenant_source)
        ),
        operation=operation,
        key=key,
        owner=owner,
        request_fingerprint=request_fingerprint,
        status=RecordStatus(status),
        first_seen_at_ms=decode_u64(first_seen_at_ms),
        last_seen_at_ms=decode_u64(last_seen_at_ms),
        first_seen_event_id=first_seen_event_id,
        expires_at_ms=None if expires_at_ms is None else decode_u64(expires_at_ms),
        outcome=outcome,
        conflict_count=decode_u64(conflict_count),
        conflict_fingerprints=tuple(fingerprints),
        lease_expires_at_ms=None
        if lease_expires_at_ms is None
        else decode_u64(lease_expires_at_ms),
    )


__all__ = [
    "FINGERPRINT",
    "KEY",
    "NO_OUTCOME",
    "OUTCOME_COLUMNS",
    "RECORD_COLUMNS",
    "TENANT_COLUMNS",
    "TOKEN",
    "U64_COLUMNS",
    "U64_MAX_STORED",
    "OutcomeColumns",
    "Row",
    "TenantColumns",
    "content",
    "decode_u64",
    "encode_u64",
    "field_of",
    "full_row",
    "make_row",
    "outcome_values",
    "record_from_row",
    "record_row",
    "stored_outcome",
    "tenant_values",
    "token_text",
    "token_value",
]
