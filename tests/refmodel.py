"""A reference model of the Rust store (``seed/idempotency.rs``), in plain Python.

One dict of records keyed by record id, and each operation written straight from the Rust
module, branch for branch, so that the SQL store can be compared against it step by step.
``release`` and ``purge_expired`` follow the store's documented contract (the Rust module of
0.6.5 has neither: ``release`` is 0.7's ``release_reserved_idempotency_key``).

Leases, tokens, ``renew``, ``ttl`` and the fenced ``complete``/``release`` are idemstore's own
(issue 11), written here from the issue's words: a reservation made with ``lease`` holds the
key until ``now + lease``; the same fingerprint finding it ``reserved`` or ``conflicted``,
without outcome and ``lease_expires_at_ms <= now`` re-claims it (new token, owner, last seen
and lease; first seen, status and conflict history kept: a conflicting request does not keep a
dead holder's key); a token fences: ``complete``/``renew`` with a token that is not the key's
current generation raise, ``release`` returns False. A ``release`` with the key's token deletes
it whatever its status while it has no outcome; without a token only a ``reserved`` one.
Tokens here are the model's own names (``m1``, ``m2``, ...); the test maps them to the
store's.

Nothing here touches a database or reuses the store's code, except the record-id hash
(:func:`idemstore.idempotency_record_id`, tested against the Rust vectors elsewhere) and the
plain value classes the store returns, so results compare with ``==``.
"""

from __future__ import annotations

from dataclasses import replace

from idemstore import (
    Conflict,
    Duplicate,
    IdempotencyRecord,
    Outcome,
    RecordStatus,
    Reservation,
    Reserved,
    TenantContext,
    idempotency_record_id,
)

U64_MAX = 2**64 - 1

#: Rust's ``str::trim``: the Unicode ``White_Space`` property (PropList.txt). Unlike Python's
#: ``str.strip()`` it does not include U+001C..U+001F.
RUST_WHITESPACE = (
    "\u0009\u000a\u000b\u000c\u000d\u0020\u0085\u00a0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)


class ModelInputError(ValueError):
    """The Rust module's ``anyhow::bail!("{name} cannot be empty")``."""


class ModelLeaseLost(Exception):
    """The token does not name the key's current reservation."""


def ends(now_ms: int, duration: int | None, name: str) -> int | None:
    if duration is None:
        return None
    if duration < 1 or now_ms + duration > U64_MAX:
        raise ModelInputError(f"{name} out of range")
    return now_ms + duration


def rust_trim(value: str) -> str:
    return value.strip(RUST_WHITESPACE)


def normalized_non_empty(value: str, name: str) -> str:
    normalized = rust_trim(value)
    if not normalized:
        raise ModelInputError(f"{name} cannot be empty")
    return normalized


def tenant_context_matches(left: TenantContext, right: TenantContext) -> bool:
    # org, workspace, deployment; never actor or source. ``None`` != ``Some("")``.
    return (
        left.org_id == right.org_id
        and left.workspace_id == right.workspace_id
        and left.deployment_id == right.deployment_id
    )


class RefModel:
    """The Rust store's behaviour over an in-memory map ``record_id -> record``."""

    def __init__(self) -> None:
        self.records: dict[str, IdempotencyRecord] = {}
        #: record id -> the token of its current generation
        self.tokens: dict[str, str] = {}
        self.issued = 0
        self.reclaims = 0  # how many re-claims happened (the test reports it)

    def _new_token(self, record_id: str) -> str:
        self.issued += 1
        self.tokens[record_id] = f"m{self.issued}"
        return self.tokens[record_id]

    def _held(self, tenant: TenantContext, record_id: str, token: str) -> IdempotencyRecord:
        record = self.records.get(record_id)
        if (
            record is None
            or not tenant_context_matches(record.tenant_context, tenant)
            or self.tokens.get(record_id) != token
        ):
            raise ModelLeaseLost(token)
        return record

    def reserve(
        self,
        tenant: TenantContext,
        operation: str,
        key: str,
        owner: str,
        request_fingerprint: str,
        *,
        first_seen_event_id: str | None = None,
        expires_at_ms: int | None = None,
        now_ms: int,
        lease: int | None = None,
        ttl: int | None = None,
    ) -> Reservation:
        # Same validation order as Rust: key, operation, owner, fingerprint.
        key = normalized_non_empty(key, "idempotency key")
        operation = normalized_non_empty(operation, "idempotency operation")
        owner = normalized_non_empty(owner, "idempotency owner")
        request_fingerprint = normalized_non_empty(request_fingerprint, "idempotency fingerprint")
        if ttl is not None:
            if expires_at_ms is not None:
                raise ModelInputError("ttl and expires_at_ms")
            expires_at_ms = ends(now_ms, ttl, "ttl")
        lease_end = ends(now_ms, lease, "lease")
        record_id = idempotency_record_id(tenant, operation, key)
        existing = self.records.get(record_id)

        def fresh() -> IdempotencyRecord:
            return IdempotencyRecord(
                schema_version=1,
                record_id=record_id,
                tenant_context=tenant,
                operation=operation,
                key=key,
                owner=owner,
                request_fingerprint=request_fingerprint,
                status=RecordStatus.RESERVED,
                first_seen_at_ms=now_ms,
                last_seen_at_ms=now_ms,
                first_seen_event_id=first_seen_event_id,
                expires_at_ms=expires_at_ms,
                outcome=None,
                conflict_count=0,
                conflict_fingerprints=(),
                lease_expires_at_ms=lease_end,
            )

        # 1. expired: replaced by a fresh reservation (conflict history gone)
        if (
            existing is not None
            and existing.expires_at_ms is not None
            and existing.expires_at_ms <= now_ms
        ):
            record = fresh()
            self.records[record_id] = record
            return Reserved(record, self._new_token(record_id))
        # 2a. same fingerprint, a reservation without outcome whose lease ended: re-claimed,
        # also after a conflict (status and conflict history stay as they are)
        if (
            existing is not None
            and existing.request_fingerprint == request_fingerprint
            and existing.status in (RecordStatus.RESERVED, RecordStatus.CONFLICTED)
            and existing.outcome is None
            and existing.lease_expires_at_ms is not None
            and existing.lease_expires_at_ms <= now_ms
        ):
            record = replace(
                existing, owner=owner, last_seen_at_ms=now_ms, lease_expires_at_ms=lease_end
            )
            self.records[record_id] = record
            self.reclaims += 1
            return Reserved(record, self._new_token(record_id))
        # 2. same fingerprint: touch, whatever the status
        if existing is not None and existing.request_fingerprint == request_fingerprint:
            record = replace(existing, last_seen_at_ms=now_ms)
            self.records[record_id] = record
            return Duplicate(record)
        # 3. other fingerprint: conflicted, count saturating, fingerprint appended once
        if existing is not None:
            fingerprints = existing.conflict_fingerprints
            if request_fingerprint not in fingerprints:
                fingerprints = (*fingerprints, request_fingerprint)
            record = replace(
                existing,
                status=RecordStatus.CONFLICTED,
                last_seen_at_ms=now_ms,
                conflict_count=min(existing.conflict_count + 1, U64_MAX),
                conflict_fingerprints=fingerprints,
            )
            self.records[record_id] = record
            return Conflict(record)
        # 4. no record
        record = fresh()
        self.records[record_id] = record
        return Reserved(record, self._new_token(record_id))

    def complete(
        self,
        tenant: TenantContext,
        operation: str,
        key: str,
        outcome: Outcome,
        *,
        now_ms: int,
        token: str | None = None,
    ) -> IdempotencyRecord | None:
        operation = normalized_non_empty(operation, "idempotency operation")
        key = normalized_non_empty(key, "idempotency key")
        record_id = idempotency_record_id(tenant, operation, key)
        if token is not None:
            self._held(tenant, record_id, token)
        existing = self.records.get(record_id)
        if existing is None or not tenant_context_matches(existing.tenant_context, tenant):
            return None
        record = replace(
            existing, status=RecordStatus.COMPLETED, outcome=outcome, last_seen_at_ms=now_ms
        )
        self.records[record_id] = record
        return record

    def get(self, tenant: TenantContext, operation: str, key: str) -> IdempotencyRecord | None:
        operation = rust_trim(operation)
        key = rust_trim(key)
        if not operation or not key:
            return None
        record = self.records.get(idempotency_record_id(tenant, operation, key))
        if record is None or not tenant_context_matches(record.tenant_context, tenant):
            return None
        return record

    def release(
        self,
        tenant: TenantContext,
        operation: str,
        key: str,
        request_fingerprint: str,
        *,
        token: str | None = None,
    ) -> bool:
        operation = normalized_non_empty(operation, "idempotency operation")
        key = normalized_non_empty(key, "idempotency key")
        request_fingerprint = normalized_non_empty(request_fingerprint, "idempotency fingerprint")
        record_id = idempotency_record_id(tenant, operation, key)
        record = self.records.get(record_id)
        if (
            record is None
            or not tenant_context_matches(record.tenant_context, tenant)
            or record.request_fingerprint != request_fingerprint
        ):
            return False
        if token is None:
            if record.status is not RecordStatus.RESERVED:  # Rust: a reserved record only
                return False
        elif self.tokens.get(record_id) != token or record.outcome is not None:
            return False  # not the holder's, or done: conflicted or not, the holder's goes
        del self.records[record_id]
        del self.tokens[record_id]
        return True

    def renew(
        self,
        tenant: TenantContext,
        operation: str,
        key: str,
        token: str,
        *,
        lease: int,
        now_ms: int,
    ) -> int:
        operation = normalized_non_empty(operation, "idempotency operation")
        key = normalized_non_empty(key, "idempotency key")
        end = ends(now_ms, lease, "lease")
        assert end is not None
        record_id = idempotency_record_id(tenant, operation, key)
        record = self._held(tenant, record_id, token)
        if record.outcome is not None:  # completed: no lease left to renew
            raise ModelLeaseLost(token)
        self.records[record_id] = replace(record, lease_expires_at_ms=end)
        return end

    def purge_expired(self, *, now_ms: int) -> int:
        expired = [
            record_id
            for record_id, record in self.records.items()
            if record.expires_at_ms is not None and record.expires_at_ms <= now_ms
        ]
        for record_id in expired:
            del self.records[record_id]
            del self.tokens[record_id]
        return len(expired)

    def stats(self) -> dict[tuple[str, RecordStatus], int]:
        counts: dict[tuple[str, RecordStatus], int] = {}
        for record in self.records.values():
            name = (record.operation, record.status)
            counts[name] = counts.get(name, 0) + 1
        return counts
