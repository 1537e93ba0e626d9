"""Every SQL statement of the store, as :class:`~idemstore.db.driver.Statement` objects, and
the bind values they take.

Binds are named ``p_<column>`` (the single-record statements) or ``v0``, ``v1``, ... filled in
order (the bulk statements: :meth:`Driver.execute_flat`, ``executemany``); id lists have a fixed
length (:data:`BULK_ROWS`, padded), so every statement compiles once per dialect and driver.
"""

from __future__ import annotations

from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.elements import ClauseElement

from ..model import IdempotencyRecord, Outcome, RecordStatus, TenantContext
from .codec import RECORD_COLUMNS, U64_MAX_STORED, encode_u64, full_row, stored_outcome
from .driver import Statement, insert_for
from .schema import VERSION_TABLE
from .schema import conflict_fingerprints as F
from .schema import records as R

#: Ids per ``IN (...)`` list of the batch look-ups and deletes.
BULK_ROWS: Final = 500
#: Position, in a row :data:`RESERVE` returns, of whether the upsert inserted it (after the
#: record's columns).
INSERTED: Final = len(RECORD_COLUMNS)
#: Bind names of a whole record row, in row order.
RECORD_PARAMS: Final = tuple(f"p_{name}" for name in RECORD_COLUMNS)


# -- bind values ------------------------------------------------------------------------------


def record_params(
    record: IdempotencyRecord, token: int, record_id: str | None = None
) -> dict[str, Any]:
    """Binds (``p_<column>``) of a whole record row with ``token``, stored under
    ``record_id`` (default: the record's own)."""
    return dict(zip(RECORD_PARAMS, full_row(record, token, record_id), strict=True))


def tenant_params(tenant: TenantContext, record_id: str) -> dict[str, Any]:
    """Binds of :func:`_tenant_match`: the record id and the tenant's org, workspace and
    deployment."""
    return {
        "p_record_id": record_id,
        "p_org_id": tenant.org_id,
        "p_workspace_id": tenant.workspace_id,
        "p_deployment_id": tenant.deployment_id,
    }


def complete_params(
    tenant: TenantContext, record_id: str, outcome: Outcome, now: int, token: int | None = None
) -> dict[str, Any]:
    """Binds of :data:`COMPLETE` (and, with ``token``, :data:`COMPLETE_FENCED`)."""
    params = tenant_params(tenant, record_id)
    params.update({f"p_{name}": value for name, value in stored_outcome(outcome).items()})
    params["p_now"] = encode_u64(now)
    if token is not None:
        params["p_reservation_token"] = token
    return params


def renew_params(
    tenant: TenantContext, record_id: str, token: int, lease_expires_at_ms: int
) -> dict[str, Any]:
    """Binds of :data:`RENEW`."""
    params = tenant_params(tenant, record_id)
    params["p_reservation_token"] = token
    params["p_lease_expires_at_ms"] = encode_u64(lease_expires_at_ms)
    return params


# -- building blocks --------------------------------------------------------------------------


def _p(name: str, type_: sa.types.TypeEngine[Any] | None = None) -> sa.BindParameter[Any]:
    return sa.bindparam(f"p_{name}", type_=type_)


def _lit(sql: str) -> sa.ColumnElement[Any]:
    return sa.literal_column(sql)


def _details_param(name: str = "p_outcome_details") -> sa.ColumnElement[Any]:
    # Bound as text, cast to the column's type (JSON on PostgreSQL, TEXT on SQLite).
    return sa.cast(sa.bindparam(name, type_=sa.Text()), R.c.outcome_details.type)


def _returning() -> list[sa.ColumnElement[Any]]:
    # The whole row in codec order; details come back as text on every driver (psycopg would
    # parse JSON, asyncpg not).
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


def _ids(n: int) -> list[sa.BindParameter[Any]]:
    return [sa.bindparam(f"v{i}", type_=sa.String()) for i in range(n)]


# -- the operations' statements ---------------------------------------------------------------

#: Columns a reservation writes afresh when it replaces an expired record.
_FRESH: Final = tuple(
    c.name
    for c in R.columns
    if c.name not in {"record_id", "status", "last_seen_at_ms", "conflict_count"}
)
#: Columns a reservation takes over when it re-claims a reservation whose lease ended (the
#: new holder's; ``last_seen_at_ms`` is every reservation's; ``first_seen_*`` and the rest kept).
_RECLAIMED: Final = frozenset({"owner", "lease_expires_at_ms", "reservation_token"})


def _build_reserve(dialect: Dialect) -> ClauseElement:
    values: dict[str, Any] = {c.name: _p(c.name) for c in R.columns}
    values["outcome_details"] = _details_param()
    stmt = insert_for(dialect)(R).values(values)
    new = stmt.excluded  # type: ignore[attr-defined]
    # The four branches of the Rust reserve, in its order, against the existing row:
    expired = sa.and_(R.c.expires_at_ms.is_not(None), R.c.expires_at_ms <= new.last_seen_at_ms)
    same = R.c.request_fingerprint == new.request_fingerprint
    # idemstore's lease (none on a record reserved without one: then the Rust rules alone):
    # the same request finds a reservation without outcome whose lease ended, and takes it;
    # a conflicted one too (a request with another fingerprint must not keep a dead holder's
    # key), keeping its status and conflict history.
    reclaim = sa.and_(
        same,
        sa.or_(
            R.c.status == _lit(f"'{RecordStatus.RESERVED.value}'"),
            R.c.status == _lit(f"'{RecordStatus.CONFLICTED.value}'"),
        ),
        R.c.outcome_kind.is_(None),
        R.c.lease_expires_at_ms.is_not(None),
        R.c.lease_expires_at_ms <= new.last_seen_at_ms,
    )
    set_: dict[str, Any] = {
        name: sa.case((expired, new[name]), (reclaim, new[name]), else_=R.c[name])
        if name in _RECLAIMED
        else sa.case((expired, new[name]), else_=R.c[name])
        for name in _FRESH
    }
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
    return upsert.returning(*_returning(), _inserted(dialect))  # type: ignore[no-any-return]


def _inserted(dialect: Dialect) -> sa.ColumnElement[Any]:
    """After the reserve's row, whether the upsert inserted it (no older generation of the
    record, so no conflict history to delete). PostgreSQL: ``xmax = 0`` on the returned
    version (an update by ON CONFLICT, even in the same transaction or a savepoint, leaves
    its transaction or multixact id there); saves the history ``DELETE``, a round trip per
    fresh key. SQLite: unknown (false), the ``DELETE`` runs: measured on bare sqlite3, it
    costs about what any test of the same question in the statement would (2.6 us)."""
    if dialect.name == "postgresql":
        return (sa.literal_column("xmax") == sa.literal_column("0")).label("inserted")
    return sa.false().label("inserted")


def _fenced() -> sa.ColumnElement[bool]:
    # The reservation a token names still holds the key: every new generation of a record
    # (created, replaced after expiry, re-claimed) writes a new random token.
    return R.c.reservation_token == _p("reservation_token", sa.BigInteger())


def _build_complete(dialect: Dialect, fenced: bool = False) -> ClauseElement:
    where = [_tenant_match(), _fenced()] if fenced else [_tenant_match()]
    return (
        sa.update(R)
        .where(*where)
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


def _build_release(dialect: Dialect, fenced: bool = False) -> ClauseElement:
    # Unfenced, the Rust rule: only a ``reserved`` record. Fenced, the holder's reservation
    # whatever its status while it has no outcome (a conflicted reservation is still the
    # holder's). Its conflict fingerprints go with it (ON DELETE CASCADE).
    where = [_tenant_match(), R.c.request_fingerprint == _p("request_fingerprint")]
    if fenced:
        where += [_fenced(), R.c.outcome_kind.is_(None)]
    else:
        where.append(R.c.status == _lit(f"'{RecordStatus.RESERVED.value}'"))
    return sa.delete(R).where(*where).returning(R.c.record_id)


def _build_renew(dialect: Dialect) -> ClauseElement:
    # Only a reservation still awaiting its outcome has a lease to renew.
    return (
        sa.update(R)
        .where(_tenant_match(), _fenced(), R.c.outcome_kind.is_(None))
        .values(lease_expires_at_ms=_p("lease_expires_at_ms"))
        .returning(R.c.lease_expires_at_ms)
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


def _build_fingerprints_insert(dialect: Dialect) -> ClauseElement:
    stmt = insert_for(dialect)(F).values(record_id=_p("record_id"), fingerprint=_p("fingerprint"))
    return stmt.on_conflict_do_nothing(index_elements=[F.c.record_id, F.c.fingerprint])  # type: ignore[attr-defined, no-any-return]


def _build_stats(dialect: Dialect) -> ClauseElement:
    return (
        sa.select(R.c.operation, R.c.status, sa.func.count())
        .group_by(R.c.operation, R.c.status)
        .order_by(R.c.operation, R.c.status)
    )


#: One upsert whose CASE expressions are the Rust reserve's four branches and the lease
#: re-claim; returns the row, then whether it inserted it (:data:`INSERTED`).
RESERVE: Final = Statement("reserve", _build_reserve)
COMPLETE: Final = Statement("complete", _build_complete)
#: :data:`COMPLETE` only while the reservation of ``p_reservation_token`` holds the key.
COMPLETE_FENCED: Final = Statement("complete_fenced", lambda d: _build_complete(d, fenced=True))
GET: Final = Statement("get", lambda d: sa.select(*_returning()).where(_tenant_match()))
GET_BY_ID: Final = Statement(
    "get_by_id", lambda d: sa.select(*_returning()).where(R.c.record_id == _p("record_id"))
)
RELEASE: Final = Statement("release", _build_release)
#: The reservation of ``p_reservation_token``, while it holds the key without an outcome,
#: whatever its status (:data:`RELEASE` is Rust's: ``reserved`` only).
RELEASE_FENCED: Final = Statement("release_fenced", lambda d: _build_release(d, fenced=True))
#: A new ``lease_expires_at_ms`` for the reservation of ``p_reservation_token``, still
#: without an outcome; returns it (no row: the token no longer holds).
RENEW: Final = Statement("renew", _build_renew)
PURGE: Final = Statement("purge", _build_purge)
STATS: Final = Statement("stats", _build_stats)
FINGERPRINTS_SELECT: Final = Statement(
    "fingerprints_select",
    lambda d: sa.select(F.c.fingerprint).where(F.c.record_id == _p("record_id")).order_by(F.c.id),
)
FINGERPRINTS_INSERT: Final = Statement("fingerprints_insert", _build_fingerprints_insert)
FINGERPRINTS_DELETE: Final = Statement(
    "fingerprints_delete", lambda d: sa.delete(F).where(F.c.record_id == _p("record_id"))
)
SCHEMA_REVISION: Final = Statement(
    "schema_revision",
    lambda d: sa.select(sa.column("version_num")).select_from(sa.table(VERSION_TABLE)),
)


# -- bulk import and export -------------------------------------------------------------------


def _build_bulk_insert(dialect: Dialect) -> ClauseElement:
    """A one-row ``INSERT`` of a whole record row (binds ``v0``.. in row order), for
    ``executemany``."""
    values: dict[str, Any] = {}
    for j, name in enumerate(RECORD_COLUMNS):
        if name == "outcome_details":
            values[name] = _details_param(f"v{j}")
        else:
            values[name] = sa.bindparam(f"v{j}")
    return insert_for(dialect)(R).values(values)


def _binary_order(dialect: Dialect, column: sa.ColumnElement[str]) -> sa.ColumnElement[str]:
    # Byte order of the UTF-8 text, i.e. code point order, like Rust's and Python's str order.
    return column.collate("C") if dialect.name == "postgresql" else column


BULK_INSERT: Final = Statement("bulk_insert", _build_bulk_insert)
#: A one-row ``INSERT`` of ``(record_id, fingerprint)`` (binds ``v0``, ``v1``).
BULK_FINGERPRINT: Final = Statement(
    "bulk_fingerprints",
    lambda d: insert_for(d)(F).values(record_id=sa.bindparam("v0"), fingerprint=sa.bindparam("v1")),
)
RECORDS_BY_IDS: Final = Statement(
    "records_by_ids",
    lambda d: sa.select(*_returning()).where(R.c.record_id.in_(_ids(BULK_ROWS))),
)
FINGERPRINTS_BY_IDS: Final = Statement(
    "fingerprints_by_ids",
    lambda d: (
        sa.select(F.c.record_id, F.c.fingerprint)
        .where(F.c.record_id.in_(_ids(BULK_ROWS)))
        .order_by(F.c.id)
    ),
)
FINGERPRINTS_DELETE_IDS: Final = Statement(
    "fingerprints_delete_ids", lambda d: sa.delete(F).where(F.c.record_id.in_(_ids(BULK_ROWS)))
)
RECORDS_DELETE_IDS: Final = Statement(
    "records_delete_ids", lambda d: sa.delete(R).where(R.c.record_id.in_(_ids(BULK_ROWS)))
)
ANY_RECORD: Final = Statement("any_record", lambda d: sa.select(R.c.record_id).limit(1))
#: Every record in binary ``record_id`` order (the export).
ALL_IN_ID_ORDER: Final = Statement(
    "export", lambda d: sa.select(*_returning()).order_by(_binary_order(d, R.c.record_id))
)
