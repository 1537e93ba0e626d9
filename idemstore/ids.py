"""Record ids and fingerprints, byte-identical to the Rust module's."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable
from typing import Any

from .errors import InvalidInputError
from .model import TenantContext


def _update(hasher: Any, part: str) -> None:
    """Hash one part as Rust does: its UTF-8 length (u64, big-endian), then its bytes."""
    try:
        data = part.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(f"{part!r} is not valid Unicode (lone surrogate)") from None
    hasher.update(len(data).to_bytes(8, "big") + data)


@functools.lru_cache(maxsize=1024)
def record_id_hasher(
    org_id: str, workspace_id: str, deployment_id: str | None, operation: str
) -> Callable[[str], str]:
    """The record id of a key under this tenant and operation, as a function of the key.

    Tenants and operations repeat: the four parts are hashed once, and each id then hashes
    only its key, on a copy (the importer keeps these functions per tenant and operation).
    """
    prefix = hashlib.sha256()
    for part in (org_id, workspace_id, deployment_id or "", operation):
        _update(prefix, part)
    copy = prefix.copy

    def record_id(key: str) -> str:
        hasher = copy()
        _update(hasher, key)
        digest: str = hasher.hexdigest()
        return "idem_" + digest

    return record_id


def record_id_from_parts(
    org_id: str, workspace_id: str, deployment_id: str | None, operation: str, key: str
) -> str:
    """:func:`idempotency_record_id` from the tenant's parts."""
    return record_id_hasher(org_id, workspace_id, deployment_id, operation)(key)


def idempotency_record_id(tenant: TenantContext, operation: str, key: str) -> str:
    """``"idem_" + hex(sha256)`` over org, workspace, deployment (or ``""``), operation, key.

    Like the Rust function, it hashes ``operation`` and ``key`` as given; the store trims them
    before it calls this.
    """
    return record_id_from_parts(
        tenant.org_id, tenant.workspace_id, tenant.deployment_id, operation, key
    )


def idempotency_fingerprint(parts: Iterable[str]) -> str:
    """``"sha256:" + hex`` of the length-prefixed SHA-256 over any number of parts."""
    hasher = hashlib.sha256()
    for part in parts:
        _update(hasher, part)
    return "sha256:" + hasher.hexdigest()
