"""Every operation of the store, written once.

Each public function checks its arguments (:mod:`idemstore.rules`, raising before anything is
written) and returns a :class:`Call`: whether it writes, and a synchronous function over a
:class:`~idemstore.db.driver.Driver`. The sync store runs it directly, the async store in one
hop (a worker thread, or SQLAlchemy's greenlet bridge), both also inside a caller's
transaction (:mod:`idemstore.db.runner`). The SQL is in :mod:`idemstore.db.statements`; rows
become records in :mod:`idemstore.db.codec`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from .. import rules
from ..errors import InvalidInputError, LeaseLostError
from ..ids import idempotency_record_id
from ..model import (
    Conflict,
    Duplicate,
    IdempotencyRecord,
    Outcome,
    RecordStatus,
    Reservation,
    Reserved,
    Stats,
    TenantContext,
)
from ..rules import DEFAULT_PURGE_BATCH, Duration
from . import statements as S
from .codec import (
    CONFLICT_COUNT,
    FINGERPRINT,
    STATUS,
    TOKEN,
    decode_u64,
    encode_u64,
    full_row,
    record_from_row,
    token_text,
    token_value,
)
from .driver import Driver

T = TypeVar("T")
Mode = Literal["read", "write"]


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One operation, ready to run: ``mode`` says which transaction it needs; ``alone``, that
    it runs in a transaction of its own, never in a group commit nor on the async store's
    writer thread (it commits between batches, or is big: purge, import)."""

    mode: Mode
    run: Callable[[Driver], T]
    alone: bool = False


def _fingerprints(d: Driver, record_id: str) -> list[str]:
    return [row[0] for row in d.execute(S.FINGERPRINTS_SELECT, {"p_record_id": record_id})]


def _token(token: str) -> int:
    value = token_value(token)
    if value is None:
        raise InvalidInputError(f"token must be a token a reservation handed out, not {token!r}")
    return value


def _lost(what: str, operation: str, key: str) -> LeaseLostError:
    return LeaseLostError(
        f"{what}: the reservation of {operation!r} key {key!r} this token named no longer "
        "holds it (its lease ended and it was re-claimed, or it was released, replaced or "
        "removed); nothing was written"
    )


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
    lease_expires_at_ms: int | None = None,
) -> IdempotencyRecord:
    """The record a reservation writes when it creates a key (inputs already checked)."""
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
        lease_expires_at_ms=lease_expires_at_ms,
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
    lease: Duration | None = None,
    ttl: Duration | None = None,
) -> Call[Reservation]:
    """Reserve a key: one upsert whose CASE expressions are the Rust reserve's four branches
    and the re-claim of a reservation whose lease ended (same fingerprint, ``reserved`` or
    ``conflicted``, no outcome, ``lease_expires_at_ms <= now``: a new owner, lease and token,
    the rest kept, status and conflict history included).

    Raises :class:`~idemstore.InvalidInputError` for a blank key, operation, owner or
    fingerprint (the Rust messages), a value out of range, a lease or ttl under 1 ms, or both
    ``ttl`` and ``expires_at_ms``."""
    key = rules.non_empty(key, "idempotency key")
    operation = rules.non_empty(operation, "idempotency operation")
    owner = rules.non_empty(owner, "idempotency owner")
    fingerprint = rules.non_empty(request_fingerprint, "idempotency fingerprint")
    tenant = rules.tenant(tenant)
    rules.optional_str(first_seen_event_id, "first_seen_event_id")
    if expires_at_ms is not None:
        rules.u64(expires_at_ms, "expires_at_ms")
    now = rules.now_or(now_ms)
    if ttl is not None:
        if expires_at_ms is not None:
            raise InvalidInputError("pass ttl or expires_at_ms, not both (ttl sets expires_at_ms)")
        expires_at_ms = rules.after(now, ttl, "ttl")
    fresh = fresh_record(
        tenant,
        operation,
        key,
        owner,
        fingerprint,
        now,
        first_seen_event_id=first_seen_event_id,
        expires_at_ms=expires_at_ms,
        lease_expires_at_ms=None if lease is None else rules.after(now, lease, "lease"),
    )
    record_id = fresh.record_id

    def run(d: Driver) -> Reservation:
        token = secrets.randbits(63)
        (returned,) = d.execute_row(S.RESERVE, S.RECORD_PARAMS, full_row(fresh, token))
        row = returned[: S.INSERTED]
        if row[TOKEN] == token:
            # This call holds the current generation: new, an expired record replaced, or a
            # reservation whose lease ended re-claimed. A new or replaced one is "reserved"
            # with no conflict: any conflict history is the old generation's, and goes (none
            # when the upsert inserted the row: the history goes with a deleted record, ON
            # DELETE CASCADE). A re-claimed conflicted one keeps its history (the Rust data
            # of that record).
            if row[STATUS] == RecordStatus.RESERVED.value and decode_u64(row[CONFLICT_COUNT]) == 0:
                if not returned[S.INSERTED]:
                    d.execute(S.FINGERPRINTS_DELETE, {"p_record_id": record_id})
                return Reserved(record_from_row(row), token_text(token))
            return Reserved(record_from_row(row, _fingerprints(d, record_id)), token_text(token))
        if row[FINGERPRINT] == fingerprint:
            return Duplicate(record_from_row(row, _fingerprints(d, record_id)))
        d.execute(S.FINGERPRINTS_INSERT, {"p_record_id": record_id, "p_fingerprint": fingerprint})
        return Conflict(record_from_row(row, _fingerprints(d, record_id)))

    return Call("write", run)


def complete(
    tenant: TenantContext,
    operation: str,
    key: str,
    outcome: Outcome,
    *,
    now_ms: int | None = None,
    token: str | None = None,
) -> Call[IdempotencyRecord | None]:
    """Set a record of the same tenant to completed with ``outcome``, whatever its status;
    the record, or None when this tenant has none. With ``token``, only while the
    reservation it names holds the key (one ``UPDATE ... WHERE reservation_token = ...``),
    else :class:`~idemstore.LeaseLostError` and nothing written. Raises
    :class:`~idemstore.InvalidInputError` for bad arguments (details included)."""
    operation = rules.non_empty(operation, "idempotency operation")
    key = rules.non_empty(key, "idempotency key")
    tenant = rules.tenant(tenant)
    outcome = rules.outcome(outcome)
    now = rules.now_or(now_ms)
    record_id = idempotency_record_id(tenant, operation, key)
    fence = None if token is None else _token(token)
    params = S.complete_params(tenant, record_id, outcome, now, fence)
    statement = S.COMPLETE if fence is None else S.COMPLETE_FENCED

    def run(d: Driver) -> IdempotencyRecord | None:
        rows = d.execute(statement, params)
        if not rows:
            if fence is not None:
                raise _lost("complete refused", operation, key)
            return None
        return record_from_row(rows[0], _fingerprints(d, record_id))

    return Call("write", run)


def get(tenant: TenantContext, operation: str, key: str) -> Call[IdempotencyRecord | None]:
    """The record of this tenant, operation and key; None for a blank operation or key."""
    tenant = rules.tenant(tenant)
    if not isinstance(operation, str) or not isinstance(key, str):
        raise InvalidInputError("operation and key must be strings")
    operation, key = rules.rust_trim(operation), rules.rust_trim(key)
    record_id = idempotency_record_id(tenant, operation, key)
    params = S.tenant_params(tenant, record_id)

    def run(d: Driver) -> IdempotencyRecord | None:
        if not operation or not key:
            return None
        rows = d.execute(S.GET, params)
        if not rows:
            return None
        return record_from_row(rows[0], _fingerprints(d, record_id))

    return Call("read", run)


def get_by_record_id(record_id: str) -> Call[IdempotencyRecord | None]:
    """The record stored under ``record_id`` (the key of the JSON file's ``records`` map;
    the indexed column; not trimmed), whatever its tenant; None when there is none. Raises
    :class:`~idemstore.InvalidInputError` for a blank id."""
    if not isinstance(record_id, str) or not record_id.strip():
        raise InvalidInputError("record id cannot be empty")
    rules.check_unicode(record_id, "record id")  # as stored: a file's map key is kept whole
    params = {"p_record_id": record_id}

    def run(d: Driver) -> IdempotencyRecord | None:
        rows = d.execute(S.GET_BY_ID, params)
        if not rows:
            return None
        return record_from_row(rows[0], _fingerprints(d, record_id))

    return Call("read", run)


def release(
    tenant: TenantContext,
    operation: str,
    key: str,
    request_fingerprint: str,
    *,
    token: str | None = None,
) -> Call[bool]:
    """Delete a record of this tenant whose fingerprint matches (the work failed: a retry
    starts clean): without ``token``, while it is still ``reserved`` (Rust); with ``token``,
    while the reservation it names holds the key without an outcome, ``reserved`` or
    ``conflicted`` (its conflict fingerprints go with it). Returns whether a record was
    deleted."""
    operation = rules.non_empty(operation, "idempotency operation")
    key = rules.non_empty(key, "idempotency key")
    fingerprint = rules.non_empty(request_fingerprint, "idempotency fingerprint")
    tenant = rules.tenant(tenant)
    record_id = idempotency_record_id(tenant, operation, key)
    params = {**S.tenant_params(tenant, record_id), "p_request_fingerprint": fingerprint}
    statement = S.RELEASE
    if token is not None:
        params["p_reservation_token"] = _token(token)
        statement = S.RELEASE_FENCED

    def run(d: Driver) -> bool:
        return bool(d.execute(statement, params))

    return Call("write", run)


def renew(
    tenant: TenantContext,
    operation: str,
    key: str,
    token: str,
    *,
    lease: Duration,
    now_ms: int | None = None,
) -> Call[int]:
    """Move the lease of the reservation ``token`` names to ``now + lease``; returns the new
    ``lease_expires_at_ms``. One ``UPDATE ... WHERE reservation_token = ...``: when the token
    no longer holds the key, or the record has its outcome already,
    :class:`~idemstore.LeaseLostError` and nothing written. A lease that ended but was not
    re-claimed yet is still the token's, and renews. Raises
    :class:`~idemstore.InvalidInputError` for bad arguments."""
    operation = rules.non_empty(operation, "idempotency operation")
    key = rules.non_empty(key, "idempotency key")
    tenant = rules.tenant(tenant)
    end = rules.after(rules.now_or(now_ms), lease, "lease")
    record_id = idempotency_record_id(tenant, operation, key)
    params = S.renew_params(tenant, record_id, _token(token), end)

    def run(d: Driver) -> int:
        rows = d.execute(S.RENEW, params)
        if not rows:
            raise _lost("renew refused", operation, key)
        return decode_u64(rows[0][0])

    return Call("write", run)


def purge_expired(*, now_ms: int | None = None, batch_size: int = DEFAULT_PURGE_BATCH) -> Call[int]:
    """Delete records whose ``expires_at_ms <= now``, ``batch_size`` per transaction when the
    store owns the transaction. Returns how many were deleted."""
    now = rules.now_or(now_ms)
    params = {"p_now": encode_u64(now), "p_limit": rules.purge_batch(batch_size)}

    def run(d: Driver) -> int:
        total = 0
        while True:
            deleted = len(d.execute(S.PURGE, params))
            total += deleted
            if deleted < batch_size:
                return total
            d.checkpoint()

    return Call("write", run, alone=True)


def stats() -> Call[Stats]:
    """Record counts by operation and status."""

    def run(d: Driver) -> Stats:
        rows = d.execute(S.STATS)
        return Stats({(op, RecordStatus(status)): int(n) for op, status, n in rows})

    return Call("read", run)


def schema_revisions() -> Call[tuple[str, ...]]:
    """Every row of idemstore's Alembic version table, sorted: one when the database is at a
    revision, none before the first migration (raises if the version table is missing)."""

    def run(d: Driver) -> tuple[str, ...]:
        return tuple(sorted(str(row[0]) for row in d.execute(S.SCHEMA_REVISION)))

    return Call("read", run)


__all__ = [
    "Call",
    "complete",
    "fresh_record",
    "get",
    "get_by_record_id",
    "purge_expired",
    "release",
    "renew",
    "reserve",
    "schema_revisions",
    "stats",
]
