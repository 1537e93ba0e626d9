"""Plain values of idemstore: tenants, records, outcomes and reservation results.

Field names are exactly those of the Rust module (``idempotency.rs``) and its JSON files, and
enum values are the JSON strings. Nothing here does SQL or I/O.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, TypeAlias, Union

#: Largest value of a Rust ``u64``: counters saturate here, timestamps may not exceed it.
U64_MAX: Final = 2**64 - 1
#: A u64 is stored in a signed 64-bit column as ``value - U64_SHIFT`` (see ``db.codec``).
U64_SHIFT: Final = 2**63
#: The record/file schema version the Rust module writes.
RECORD_SCHEMA_VERSION: Final = 1

JSONValue: TypeAlias = Union[bool, int, float, str, list["JSONValue"], dict[str, "JSONValue"], None]


class TenantSource(StrEnum):
    """Where a tenant context came from. Stored, never compared."""

    LOCAL_IMPLICIT = "local_implicit"
    EXPLICIT = "explicit"


class RecordStatus(StrEnum):
    """Status of an idempotency record."""

    RESERVED = "reserved"
    COMPLETED = "completed"
    CONFLICTED = "conflicted"


@dataclass(frozen=True, slots=True)
class TenantContext:
    """The tenant a key belongs to.

    Org, workspace and deployment are part of the record id and of the tenant match;
    ``actor_id`` and ``source`` are stored with a new record but never compared.
    """

    org_id: str
    workspace_id: str
    deployment_id: str | None = None
    actor_id: str | None = None
    source: TenantSource = TenantSource.LOCAL_IMPLICIT

    @classmethod
    def local_implicit(cls) -> TenantContext:
        """The default tenant: org ``local``, workspace ``local``, source ``local_implicit``."""
        return cls("local", "local", None, None, TenantSource.LOCAL_IMPLICIT)

    @classmethod
    def explicit_user_workspace(
        cls, org_id: str, workspace_id: str, deployment_id: str | None, actor_id: str
    ) -> TenantContext:
        """A tenant named by the caller, with its actor; source ``explicit``."""
        return cls(org_id, workspace_id, deployment_id, actor_id, TenantSource.EXPLICIT)

    def matches(self, other: TenantContext) -> bool:
        """Tenant match of the Rust module: org, workspace and deployment only."""
        return (
            self.org_id == other.org_id
            and self.workspace_id == other.workspace_id
            and self.deployment_id == other.deployment_id
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the work guarded by a key produced; replayed to duplicates."""

    outcome_kind: str
    completed_at_ms: int
    primary_ref_kind: str | None = None
    primary_ref_id: str | None = None
    secondary_ref_kind: str | None = None
    secondary_ref_id: str | None = None
    details: JSONValue = None


@dataclass(frozen=True, slots=True, kw_only=True)
class IdempotencyRecord:
    """One idempotency key, with every field of the Rust record, and idemstore's own
    ``lease_expires_at_ms``.

    ``lease_expires_at_ms`` (milliseconds since the Unix epoch, or None) is set by a
    ``reserve(..., lease=...)`` and moved on by ``renew``: until then the reservation's holder
    is working on it; from then on (``lease_expires_at_ms <= now``) a ``reserve`` with the same
    fingerprint re-claims it. None: reserved without a lease, never re-claimed (the Rust
    store's rule). It is not part of the Rust JSON file: an export drops it, an import sets
    none.
    """

    schema_version: int = RECORD_SCHEMA_VERSION
    record_id: str
    tenant_context: TenantContext
    operation: str
    key: str
    owner: str
    request_fingerprint: str
    status: RecordStatus
    first_seen_at_ms: int
    last_seen_at_ms: int
    first_seen_event_id: str | None = None
    expires_at_ms: int | None = None
    outcome: Outcome | None = None
    conflict_count: int = 0
    conflict_fingerprints: tuple[str, ...] = field(default=())
    lease_expires_at_ms: int | None = None

    def tenant_matches(self, tenant: TenantContext) -> bool:
        """Whether ``tenant`` may see this record (org, workspace, deployment)."""
        return self.tenant_context.matches(tenant)

    @property
    def in_progress_until_ms(self) -> int | None:
        """Until when the reservation's holder is working on it: its ``lease_expires_at_ms``
        while the record has no outcome and is ``reserved`` or ``conflicted`` (a request with
        another fingerprint came meanwhile: the reservation is still its holder's), else None.

        At or after that time (``now_ms() >= in_progress_until_ms``) the holder's lease has
        ended and a ``reserve`` with the same fingerprint re-claims the key, conflicted or
        not. None without an outcome (status ``reserved`` or ``conflicted``) means a
        reservation made without a lease: no one can tell whether its holder is still working
        (the Rust store's rule; it is never re-claimed, only released, completed or
        expired)."""
        if self.outcome is None and self.status in (RecordStatus.RESERVED, RecordStatus.CONFLICTED):
            return self.lease_expires_at_ms
        return None

    @property
    def is_orphaned_reservation(self) -> bool:
        """Deprecated (it never knew): True when the record is ``reserved`` without an outcome,
        whether its holder is still working or died. Use :attr:`in_progress_until_ms` and
        reservations with a ``lease``, which say until when the holder has the key."""
        warnings.warn(
            "is_orphaned_reservation is deprecated: it is true for every reservation without an "
            "outcome, live or not; reserve with lease= and read in_progress_until_ms",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.status is RecordStatus.RESERVED and self.outcome is None


@dataclass(frozen=True, slots=True)
class Reserved:
    """The caller holds the key: do the work, then ``complete`` (or ``release`` on failure),
    passing ``token`` to both so that they write only while this reservation still holds.

    ``token`` is an opaque string naming this reservation: a new one on every ``Reserved``,
    also when a reservation whose lease ended is re-claimed (``match r: case
    Reserved(record, token)``)."""

    record: IdempotencyRecord
    token: str


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The same request was seen before: replay ``record.outcome``.

    A duplicate without an outcome is a reservation still in progress: with a lease, its
    holder has the key until ``record.in_progress_until_ms`` (then a ``reserve`` re-claims
    it); without one, no one can tell whether its holder is still working.
    """

    record: IdempotencyRecord


@dataclass(frozen=True, slots=True)
class Conflict:
    """The key was used before by a different request (another fingerprint): reject this one."""

    record: IdempotencyRecord


#: The result of ``reserve``: exactly one of the three kinds.
Reservation: TypeAlias = Union[Reserved, Duplicate, Conflict]


@dataclass(frozen=True, slots=True)
class Stats:
    """Record counts by operation and status (what ``stats()`` returns)."""

    counts: Mapping[tuple[str, RecordStatus], int]

    @property
    def total(self) -> int:
        """Every record."""
        return sum(self.counts.values())

    def by_status(self) -> dict[RecordStatus, int]:
        """Counts per status (every status, 0 where none)."""
        result = dict.fromkeys(RecordStatus, 0)
        for (_, status), count in self.counts.items():
            result[status] += count
        return result

    def by_operation(self) -> dict[str, int]:
        """Counts per operation."""
        result: dict[str, int] = {}
        for (operation, _), count in self.counts.items():
            result[operation] = result.get(operation, 0) + count
        return result
