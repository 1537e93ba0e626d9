"""Every operation of the store, written once: the only place SQL runs.

Each public function validates its arguments (raising before anything is written) and returns
a :class:`Call`: whether it writes, and a synchronous function over a :class:`Driver`. The sync
store runs it directly, the async store in one hop (a worker thread, or SQLAlchemy's greenlet
bridge), and both also inside a caller's transaction. The statements are SQLAlchemy constructs,
built and compiled once per dialect (see :mod:`idemstore.dialects`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, Literal, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.elements import ClauseElement

from . import jsonvalue
from ._rows import check_unicode as _unicode
from ._rows import dump_details, outcome_values, record_row
from .dialects import Driver, Row, insert_for
from .errors import InvalidInputError
from .ids import idempotency_record_id
from .model import (
    U64_MAX,
    Conflict,
    Duplicate,
    IdempotencyRecord,
    Outcome,
    RecordStatus,
    Reservation,
    Reserved,
    TenantContext,
    TenantSource,
)
from .schema import (
    U64_MAX_STORED,
    VERSION_TABLE,
    decode_u64,
    encode_u64,
)
from .schema import conflict_fingerprints as F
from .schema import records as R

T = TypeVar("T")
Mode = Literal["read", "write"]

#: Records deleted per transaction by ``purge_expired``.
DEFAULT_PURGE_BATCH: Final = 1000
#: The largest ``batch_size``: the purge's ``LIMIT`` is bound as an SQL ``INTEGER``.
MAX_PURGE_BATCH: Final = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One operation, ready to run: ``mode`` says which transaction it needs."""

    mode: Mode
    run: Callable[[Driver], T]


# -- input rules (the Rust module's) ------------------------------------------------------

#: What Rust's ``str::trim`` removes: the Unicode ``White_Space`` property. Python's
#: ``str.strip()`` also removes U+001C..U+001F, which would trim keys the Rust store keeps
#: (and so give them another record id).
RUST_WHITESPACE: Final = (
    "\u0009\u000a\u000b\u000c\u000d\u0020\u0085\u00a0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)


def rust_trim(value: str) -> str:
    """``value`` trimmed as Rust's ``str::trim`` trims it."""
    return value.strip(RUST_WHITESPACE)


def _non_empty(value: str, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"{name} must be a string, not {type(value).__name__}")
    normalized = rust_trim(_unicode(value, name))
    if not normalized:
        raise InvalidInputError(f"{name} cannot be empty")
    return normalized


def _u64(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U64_MAX:
        raise InvalidInputError(f"{name} must be an integer from 0 to 2^64-1, not {value!r}")
    return value


def _optional_str(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInputError(f"{name} must be a string or None, not {type(value).__name__}")
    return _unicode(value, name)


def _tenant(tenant: TenantContext) -> TenantContext:
    if not isinstance(tenant, TenantContext):
        raise InvalidInputError(f"tenant must be a TenantContext, not {type(tenant).__name__}")
    for name in ("org_id", "workspace_id"):
        value = getattr(tenant, name)
        if not isinstance(value, str):
            raise InvalidInputError(f"tenant {name} must be a string")
        _unicode(value, f"tenant {name}")
    _optional_str(tenant.deployment_id, "tenant deployment_id")
    _optional_str(tenant.actor_id, "tenant actor_id")
    if not isinstance(tenant.source, str) or tenant.source not in _SOURCES:
        raise InvalidInputError(
            f"tenant source must be one of {', '.join(sorted(_SOURCES))}, not {tenant.source!r}"
        )
    return tenant


_SOURCES: Final = frozenset(s.value for s in TenantSource)


def now_ms() -> int:
    """Milliseconds since the Unix epoch, the store's clock."""
    return time.time_ns() // 1_000_000


def _now(value: int | None) -> int:
    return now_ms() if value is None else _u64(value, "now_ms")


def _outcome(outcome: Outcome) -> Outcome:
    if not isinstance(outcome, Outcome):
        raise InvalidInputError(f"outcome must be an Outcome, not {type(outcome).__name__}")
    if not isinstance(outcome.outcome_kind, str):
        raise InvalidInputError("outcome_kind must be a string")
    _unicode(outcome.outcome_kind, "outcome_kind")
    _u64(outcome.completed_at_ms, "completed_at_ms")
    for name in ("primary_ref_kind", "primary_ref_id", "secondary_ref_kind", "secondary_ref_id"):
        _optional_str(getattr(outcome, name), name)
    return outcome


# -- rows <-> values ------------------------------------------------------------------------


def record_params(
    record: IdempotencyRecord, token: int, record_id: str | None = None
) -> dict[str, Any]:
    """Bind values (``p_<column>``) for a whole record row, u64 columns encoded."""
    params = dict(zip(_RECORD_PARAMS, record_row(record, record_id), strict=False))
    params["p_reservation_token"] = token
    return params


def _outcome_params(outcome: Outcome | None) -> dict[str, Any]:
    return dict(zip(_OUTCOME_PARAMS, outcome_values(outcome), strict=True))


def record_from_row(row: Row, fingerprints: Sequence[str] = ()) -> IdempotencyRecord:
    """An :class:`IdempotencyRecord` from a row in ``records`` column order."""
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
        record_id=record_id,
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
    )


_TOKEN_INDEX: Final = list(R.c.keys()).index("reservation_token")
_RECORD_PARAMS: Final = tuple(f"p_{c.name}" for c in R.columns)
_OUTCOME_PARAMS: Final = tuple(f"p_{c.name}" for c in R.columns if c.name.startswith("outcome_"))
_FINGERPRINT_INDEX: Final = list(R.c.keys()).index("request_fingerprint")


# -- statements -----------------------------------------------------------------------------


def _p(name: str, type_: sa.types.TypeEngine[Any] | None = None) -> sa.BindParameter[Any]:
    return sa.bindparam(f"p_{name}", type_=type_)


def _lit(sql: str) -> sa.ColumnElement[Any]:
    return sa.literal_column(sql)


def _details_param() -> sa.ColumnElement[Any]:
    # Bound as text, cast to the column's type (JSON on PostgreSQL, TEXT on SQLite).
    return sa.cast(_p("outcome_details", sa.Text()), R.c.outcome_details.type)


def _returning() -> list[sa.ColumnElement[Any]]:
    # Details come back as text on every driver (psycopg would parse JSON, asyncpg not).
    return [
        sa.cast(c, sa.Text()).label(c.name) if c.name == "outcome_details" else c for c in R.columns
    ]


def _tenant_match() -> sa.ColumnElement[bool]:
    return sa.and_(
        R.c.record_id == _p("record_id"),
        R.c.org_id == _p("org_id"),
        R.c.workspace_id == _p("workspace_id"),
        R.c.deployment_id.is_not_distinct_from(_p("deployment_id", sa.String())),
    )


#: Columns a reservation writes afresh when it replaces an expired record.
_FRESH: Final = tuple(
    c.name
    for c in R.columns
    if c.name not in {"record_id", "status", "last_seen_at_ms", "conflict_count"}
)


def _build_reserve(dialect: Dialect) -> ClauseElement:
    values: dict[str, Any] = {c.name: _p(c.name) for c in R.columns}
    values["outcome_details"] = _details_param()
    stmt = insert_for(dialect)(R).values(values)
    new = stmt.excluded  # type: ignore[attr-defined]
    # The four branches of the Rust reserve, in its order, against the existing row:
    expired = sa.and_(R.c.expires_at_ms.is_not(None), R.c.expires_at_ms <= new.last_seen_at_ms)
    same = R.c.request_fingerprint == new.request_fingerprint
    set_: dict[str, Any] = {name: sa.case((expired, new[name]), else_=R.c[name]) for name in _FRESH}
    set_["status"] = sa.case(
        (expired, new.status), (same, R.c.status), else_=_lit(f"'{RecordStatus.CONFLICTED.value}'")
    )
    set_["last_seen_at_ms"] = new.last_seen_at_ms
    set_["conflict_count"] = sa.case(
        (expired, new.conflict_count),
        (same, R.c.conflict_count),
        (R.c.conflict_count >= _lit(str(U64_MAX_STORED)), R.c.conflict_count),  # saturating
        else_=R.c.conflict_count + _lit("1"),
    )
    upsert = stmt.on_conflict_do_update(index_elements=[R.c.record_id], set_=set_)  # type: ignore[attr-defined]
    return upsert.returning(*_returning())  # type: ignore[no-any-return]


def _build_complete(dialect: Dialect) -> ClauseElement:
    return (
        sa.update(R)
        .where(_tenant_match())
        .values(
            status=_lit(f"'{RecordStatus.COMPLETED.value}'"),
            outcome_kind=_p("outcome_kind"),
            outcome_completed_at_ms=_p("outcome_completed_at_ms"),
            outcome_primary_ref_kind=_p("outcome_primary_ref_kind"),
            outcome_primary_ref_id=_p("outcome_primary_ref_id"),
            outcome_secondary_ref_kind=_p("outcome_secondary_ref_kind"),
            outcome_secondary_ref_id=_p("outcome_secondary_ref_id"),
            outcome_details=_details_param(),
            last_seen_at_ms=_p("now"),
        )
        .returning(*_returning())
    )


def _build_get(dialect: Dialect) -> ClauseElement:
    return sa.select(*_returning()).where(_tenant_match())


def _build_release(dialect: Dialect) -> ClauseElement:
    return (
        sa.delete(R)
        .where(
            _tenant_match(),
            R.c.status == _lit(f"'{RecordStatus.RESERVED.value}'"),
            R.c.request_fingerprint == _p("request_fingerprint"),
        )
        .returning(R.c.record_id)
    )


def _build_purge(dialect: Dialect) -> ClauseElement:
    batch = (
        sa.select(R.c.record_id)
        .where(R.c.expires_at_ms <= _p("now"))
        .order_by(R.c.expires_at_ms)
        .limit(_p("limit", sa.Integer()))
    )
    # The condition is repeated so that a row refreshed by a concurrent reservation after the
    # sub-select (PostgreSQL, READ COMMITTED re-checks it) is left alone.
    return (
        sa.delete(R)
        .where(R.c.record_id.in_(batch), R.c.expires_at_ms <= _p("now"))
        .returning(R.c.record_id)
    )


def _build_fingerprints_select(dialect: Dialect) -> ClauseElement:
    return sa.select(F.c.fingerprint).where(F.c.record_id == _p("record_id")).order_by(F.c.id)


def _build_fingerprints_insert(dialect: Dialect) -> ClauseElement:
    stmt = insert_for(dialect)(F).values(record_id=_p("record_id"), fingerprint=_p("fingerprint"))
    return stmt.on_conflict_do_nothing(index_elements=[F.c.record_id, F.c.fingerprint])  # type: ignore[attr-defined, no-any-return]


def _build_fingerprints_delete(dialect: Dialect) -> ClauseElement:
    return sa.delete(F).where(F.c.record_id == _p("record_id"))


def _build_stats(dialect: Dialect) -> ClauseElement:
    return (
        sa.select(R.c.operation, R.c.status, sa.func.count())
        .group_by(R.c.operation, R.c.status)
        .order_by(R.c.operation, R.c.status)
    )


def _build_schema_revision(dialect: Dialect) -> ClauseElement:
    return sa.select(sa.column("version_num")).select_from(sa.table(VERSION_TABLE))


def _fingerprints(d: Driver, record_id: str) -> list[str]:
    rows = d.execute("fingerprints_select", _build_fingerprints_select, {"p_record_id": record_id})
    return [row[0] for row in rows]


def _tenant_params(tenant: TenantContext, record_id: str) -> dict[str, Any]:
    return {
        "p_record_id": record_id,
        "p_org_id": tenant.org_id,
        "p_workspace_id": tenant.workspace_id,
        "p_deployment_id": tenant.deployment_id,
    }


# -- operations -----------------------------------------------------------------------------


def fresh_record(
    tenant: TenantContext,
    operation: str,
    key: str,
    owner: str,
    request_fingerprint: str,
    now: int,
    *,
    first_seen_event_id: str | None = None,
    expires_at_ms: int | None = None,
) -> IdempotencyRecord:
    """The record a reservation writes when it creates a key (inputs already validated)."""
    return IdempotencyRecord(
        record_id=idempotency_record_id(tenant, operation, key),
        tenant_context=tenant,
        operation=operation,
        key=key,
        owner=owner,
        request_fingerprint=request_fingerprint,
        status=RecordStatus.RESERVED,
        first_seen_at_ms=now,
        last_seen_at_ms=now,
        first_seen_event_id=first_seen_event_id,
        expires_at_ms=expires_at_ms,
    )


def reserve(
    tenant: TenantContext,
    operation: str,
    key: str,
    owner: str,
    request_fingerprint: str,
    *,
    first_seen_event_id: str | None = None,
    expires_at_ms: int | None = None,
    now_ms: int | None = None,
) -> Call[Reservation]:
    """Reserve a key: one upsert whose CASE expressions are the Rust reserve's four branches."""
    key = _non_empty(key, "idempotency key")
    operation = _non_empty(operation, "idempotency operation")
    owner = _non_empty(owner, "idempotency owner")
    fingerprint = _non_empty(request_fingerprint, "idempotency fingerprint")
    tenant = _tenant(tenant)
    _optional_str(first_seen_event_id, "first_seen_event_id")
    if expires_at_ms is not None:
        _u64(expires_at_ms, "expires_at_ms")
    now = _now(now_ms)
    fresh = fresh_record(
        tenant,
        operation,
        key,
        owner,
        fingerprint,
        now,
        first_seen_event_id=first_seen_event_id,
        expires_at_ms=expires_at_ms,
    )
    record_id = fresh.record_id

    def run(d: Driver) -> Reservation:
        token = secrets.randbits(63)
        (row,) = d.execute("reserve", _build_reserve, record_params(fresh, token))
        if row[_TOKEN_INDEX] == token:
            # This call created the current generation (new, or an expired record replaced):
            # its conflict history, if any, goes with the old generation.
            d.execute("fingerprints_delete", _build_fingerprints_delete, {"p_record_id": record_id})
            return Reserved(record_from_row(row))
        if row[_FINGERPRINT_INDEX] == fingerprint:
            return Duplicate(record_from_row(row, _fingerprints(d, record_id)))
        d.execute(
            "fingerprints_insert",
            _build_fingerprints_insert,
            {"p_record_id": record_id, "p_fingerprint": fingerprint},
        )
        return Conflict(record_from_row(row, _fingerprints(d, record_id)))

    return Call("write", run)


def complete(
    tenant: TenantContext,
    operation: str,
    key: str,
    outcome: Outcome,
    *,
    now_ms: int | None = None,
) -> Call[IdempotencyRecord | None]:
    """Set a record of the same tenant to completed with ``outcome``, whatever its status."""
    operation = _non_empty(operation, "idempotency operation")
    key = _non_empty(key, "idempotency key")
    tenant = _tenant(tenant)
    outcome = _outcome(outcome)
    now = _now(now_ms)
    record_id = idempotency_record_id(tenant, operation, key)
    params = {**_tenant_params(tenant, record_id), **_outcome_params(outcome)}
    params["p_now"] = encode_u64(now)

    def run(d: Driver) -> IdempotencyRecord | None:
        rows = d.execute("complete", _build_complete, params)
        if not rows:
            return None
        return record_from_row(rows[0], _fingerprints(d, record_id))

    return Call("write", run)


def get(tenant: TenantContext, operation: str, key: str) -> Call[IdempotencyRecord | None]:
    """The record of this tenant, operation and key; None for a blank operation or key."""
    tenant = _tenant(tenant)
    if not isinstance(operation, str) or not isinstance(key, str):
        raise InvalidInputError("operation and key must be strings")
    operation, key = rust_trim(operation), rust_trim(key)
    record_id = idempotency_record_id(tenant, operation, key)
    params = _tenant_params(tenant, record_id)

    def run(d: Driver) -> IdempotencyRecord | None:
        if not operation or not key:
            return None
        rows = d.execute("get", _build_get, params)
        if not rows:
            return None
        return record_from_row(rows[0], _fingerprints(d, record_id))

    return Call("read", run)


def release(
    tenant: TenantContext, operation: str, key: str, request_fingerprint: str
) -> Call[bool]:
    """Delete a record of this tenant while it is still ``reserved`` and the fingerprint
    matches (the work failed: a retry starts clean). Returns whether a record was deleted."""
    operation = _non_empty(operation, "idempotency operation")
    key = _non_empty(key, "idempotency key")
    fingerprint = _non_empty(request_fingerprint, "idempotency fingerprint")
    tenant = _tenant(tenant)
    record_id = idempotency_record_id(tenant, operation, key)
    params = {**_tenant_params(tenant, record_id), "p_request_fingerprint": fingerprint}

    def run(d: Driver) -> bool:
        return bool(d.execute("release", _build_release, params))

    return Call("write", run)


def purge_expired(*, now_ms: int | None = None, batch_size: int = DEFAULT_PURGE_BATCH) -> Call[int]:
    """Delete records whose ``expires_at_ms <= now``, ``batch_size`` per transaction when the
    store owns the transaction. Returns how many were deleted."""
    now = _now(now_ms)
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or not 1 <= batch_size <= MAX_PURGE_BATCH
    ):
        raise InvalidInputError(
            f"batch_size must be an integer from 1 to {MAX_PURGE_BATCH}, not {batch_size!r}"
        )
    params = {"p_now": encode_u64(now), "p_limit": batch_size}

    def run(d: Driver) -> int:
        total = 0
        while True:
            deleted = len(d.execute("purge", _build_purge, params))
            total += deleted
            if deleted < batch_size:
                return total
            d.checkpoint()

    return Call("write", run)


@dataclass(frozen=True, slots=True)
class Stats:
    """Record counts by operation and status."""

    counts: Mapping[tuple[str, RecordStatus], int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_status(self) -> dict[RecordStatus, int]:
        result = dict.fromkeys(RecordStatus, 0)
        for (_, status), count in self.counts.items():
            result[status] += count
        return result

    def by_operation(self) -> dict[str, int]:
        result: dict[str, int] = {}
        for (operation, _), count in self.counts.items():
            result[operation] = result.get(operation, 0) + count
        return result


def stats() -> Call[Stats]:
    def run(d: Driver) -> Stats:
        rows = d.execute("stats", _build_stats)
        return Stats({(op, RecordStatus(status)): int(n) for op, status, n in rows})

    return Call("read", run)


def schema_revisions() -> Call[tuple[str, ...]]:
    """Every row of idemstore's Alembic version table, sorted: one when the database is at a
    revision, none before the first migration (raises if the version table is missing)."""

    def run(d: Driver) -> tuple[str, ...]:
        rows = d.execute("schema_revision", _build_schema_revision)
        return tuple(sorted(str(row[0]) for row in rows))

    return Call("read", run)


# -- bulk import and export ---------------------------------------------------------------
#
# Rows travel as tuples in ``records`` column order (:data:`RECORD_COLUMNS`), u64 columns
# already encoded, details as their stored text, ``reservation_token`` last. Binds are named
# ``v0``, ``v1``, ... and filled in order (:meth:`Driver.execute_flat`, ``executemany``); id
# lists have a fixed length (padded), so every statement compiles once per dialect.

#: ``records`` columns in table order: the layout of a row tuple.
RECORD_COLUMNS: Final = tuple(R.c.keys())
#: Ids per ``IN (...)`` list of the batch look-ups and deletes.
BULK_ROWS: Final = 500


def _build_bulk_insert(dialect: Dialect) -> ClauseElement:
    """A one-row ``INSERT`` of a whole record row (binds ``v0``.. in column order), for
    ``executemany``."""
    values: dict[str, Any] = {}
    for j, name in enumerate(RECORD_COLUMNS):
        if name == "outcome_details":
            values[name] = sa.cast(sa.bindparam(f"v{j}", type_=sa.Text()), R.c.outcome_details.type)
        else:
            values[name] = sa.bindparam(f"v{j}")
    return insert_for(dialect)(R).values(values)


def _build_bulk_fingerprint(dialect: Dialect) -> ClauseElement:
    """A one-row ``INSERT`` of ``(record_id, fingerprint)`` (binds ``v0``, ``v1``)."""
    return insert_for(dialect)(F).values(
        record_id=sa.bindparam("v0"), fingerprint=sa.bindparam("v1")
    )


def _ids(n: int) -> list[sa.BindParameter[Any]]:
    return [sa.bindparam(f"v{i}", type_=sa.String()) for i in range(n)]


def _build_records_by_ids(dialect: Dialect) -> ClauseElement:
    return sa.select(*_returning()).where(R.c.record_id.in_(_ids(BULK_ROWS)))


def _build_fingerprints_by_ids(dialect: Dialect) -> ClauseElement:
    return (
        sa.select(F.c.record_id, F.c.fingerprint)
        .where(F.c.record_id.in_(_ids(BULK_ROWS)))
        .order_by(F.c.id)
    )


def _build_fingerprints_delete_ids(dialect: Dialect) -> ClauseElement:
    return sa.delete(F).where(F.c.record_id.in_(_ids(BULK_ROWS)))


def _build_records_delete_ids(dialect: Dialect) -> ClauseElement:
    return sa.delete(R).where(R.c.record_id.in_(_ids(BULK_ROWS)))


def _binary_order(dialect: Dialect, column: sa.ColumnElement[str]) -> sa.ColumnElement[str]:
    # Byte order of the UTF-8 text, i.e. code point order, like Rust's and Python's str order.
    return column.collate("C") if dialect.name == "postgresql" else column


def _build_export(dialect: Dialect) -> ClauseElement:
    return sa.select(*_returning()).order_by(_binary_order(dialect, R.c.record_id))


def _id_chunks(ids: Sequence[str]) -> list[list[str]]:
    """``ids`` in lists of exactly :data:`BULK_ROWS`, the last padded with its first id."""
    chunks = []
    for i in range(0, len(ids), BULK_ROWS):
        chunk = list(ids[i : i + BULK_ROWS])
        chunk.extend([chunk[0]] * (BULK_ROWS - len(chunk)))
        chunks.append(chunk)
    return chunks


def _fingerprints_of(d: Driver, ids: Sequence[str]) -> dict[str, list[str]]:
    """Conflict fingerprints of the records with these ids, each list in first-seen order."""
    fingerprints: dict[str, list[str]] = {}
    for chunk in _id_chunks(ids):
        for record_id, fingerprint in d.execute_flat(
            "fingerprints_by_ids", _build_fingerprints_by_ids, chunk
        ):
            fingerprints.setdefault(record_id, []).append(fingerprint)
    return fingerprints


def fetch_existing(
    d: Driver, ids: Sequence[str]
) -> dict[str, tuple[tuple[Any, ...], tuple[str, ...]]]:
    """Rows (as tuples, token last) and conflict fingerprints of those of ``ids`` that exist."""
    found: dict[str, tuple[Any, ...]] = {}
    for chunk in _id_chunks(ids):
        for row in d.execute_flat("records_by_ids", _build_records_by_ids, chunk):
            found[row[0]] = tuple(row)
    if not found:
        return {}
    fingerprints = _fingerprints_of(d, list(found))
    return {k: (row, tuple(fingerprints.get(k, ()))) for k, row in found.items()}


def _build_any_record(dialect: Dialect) -> ClauseElement:
    return sa.select(R.c.record_id).limit(1)


def has_records(d: Driver) -> bool:
    """Whether the records table holds any row."""
    return bool(d.execute("any_record", _build_any_record))


def delete_records(d: Driver, ids: Sequence[str]) -> None:
    """Delete the records (and their conflict fingerprints) with these ids."""
    for chunk in _id_chunks(ids):
        d.execute_flat("fingerprints_delete_ids", _build_fingerprints_delete_ids, chunk)
        d.execute_flat("records_delete_ids", _build_records_delete_ids, chunk)


def insert_rows(
    d: Driver, rows: Sequence[tuple[Any, ...]], fingerprints: Sequence[tuple[str, str]]
) -> None:
    """Insert whole record rows, then ``(record_id, fingerprint)`` pairs in first-seen order:
    ``COPY`` on PostgreSQL, the driver's ``executemany`` of a one-row ``INSERT`` otherwise
    (fingerprints always, so their identity column numbers them in order)."""
    if not d.copy_rows(R, rows):
        d.executemany("bulk_insert", _build_bulk_insert, rows)
    d.executemany("bulk_fingerprints", _build_bulk_fingerprint, fingerprints)


def iter_records_in_id_order(
    d: Driver, page_size: int = 1000
) -> Generator[IdempotencyRecord, None, None]:
    """Every record, in binary ``record_id`` order, streamed ``page_size`` rows at a time."""
    for page in d.stream("export", _build_export, size=page_size):
        fingerprints = _fingerprints_of(d, [row[0] for row in page])
        for row in page:
            yield record_from_row(row, fingerprints.get(row[0], ()))


__all__ = [
    "BULK_ROWS",
    "DEFAULT_PURGE_BATCH",
    "MAX_PURGE_BATCH",
    "RECORD_COLUMNS",
    "Call",
    "Stats",
    "complete",
    "delete_records",
    "dump_details",
    "fetch_existing",
    "fresh_record",
    "get",
    "has_records",
    "insert_rows",
    "iter_records_in_id_order",
    "now_ms",
    "purge_expired",
    "record_from_row",
    "record_params",
    "release",
    "reserve",
    "rust_trim",
    "schema_revisions",
    "stats",
]
