"""Record ids and fingerprints, byte-identical to the Rust module's."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from .errors import InvalidInputError
from .model import TenantContext


def _length_prefixed_sha256(parts: Iterable[str]) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        try:
            data = part.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError(f"{part!r} is not valid Unicode (lone surrogate)") from None
        hasher.update(len(data).to_bytes(8, "big"))
        hasher.update(data)
    return hasher.hexdigest()


def idempotency_record_id(tenant: TenantContext, operation: str, key: str) -> str:
    """``"idem_" + hex(sha256)`` over org, workspace, deployment (or ``""``), operation, key.

    Like the Rust function, it hashes ``operation`` and ``key`` as given; the store trims them
    before it calls this.
    """
    return "idem_" + _length_prefixed_sha256(
        (
            tenant.org_id,
            tenant.workspace_id,
            tenant.deployment_id or "",
            operation,
            key,
        )
    )


def idempotency_fingerprint(parts: Iterable[str]) -> str:
    """``"sha256:" + hex`` of the length-prefixed SHA-256 over any number of parts."""
    return "sha256:" + _length_prefixed_sha256(parts)
