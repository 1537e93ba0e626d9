"""Plain values of idemstore: tenants, records, outcomes and reservation results.

Field names are exactly those of the Rust module (``idempotency.rs``) and its JSON files, and
enum values are the JSON strings. Nothing here does SQL or I/O.
"""

from __future__ import annotations

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
    """One idempotency key, with every field of the Rust record."""

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

    def tenant_matches(self, tenant: TenantContext) -> bool:
        """Whether ``tenant`` may see this record (org, workspace, deployment)."""
        return self.tenant_context.matches(tenant)

    @property
    def is_orphaned_reservation(self) -> bool:
        """Still ``reserved`` with no outcome: the first caller may have died before completing."""
        return self.status is RecordStatus.RESERVED and self.outcome is None


@dataclass(frozen=True, slots=True)
class Reserved:
    """The caller holds the key: do the work, then ``complete`` (or ``release`` on failure)."""

    record: IdempotencyRecord


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The same request was seen before: replay ``record.outcome``.

    A duplicate still ``reserved`` with no outcome is an orphaned reservation
    (``record.is_orphaned_reservation``): the first caller may have died mid-work.
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
