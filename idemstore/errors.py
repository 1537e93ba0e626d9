"""Exceptions raised by idemstore.

Every exception idemstore raises on purpose derives from :class:`IdemstoreError`, so a caller
can catch one type. Each class's docstring says what it means; its message says what happened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import IdempotencyRecord


class IdemstoreError(Exception):
    """Base class of every error idemstore raises on purpose."""


class InvalidInputError(IdemstoreError, ValueError):
    """An argument was rejected before anything was written (for example a blank key)."""


class LockTimeoutError(IdemstoreError):
    """The database's write lock could not be had within the busy timeout."""


class StoreClosedError(IdemstoreError):
    """The store was closed (``close()``); open a new one to go on. Nothing was done."""


class ConnectionLostError(IdemstoreError):
    """The database connection was lost during an operation (the server ended the session,
    the network dropped, the connection was closed underneath the store).

    ``may_have_committed`` says whether the write can have reached the database: True when the
    connection was lost while a ``COMMIT`` was on its way (or after an earlier batch of a long
    operation had committed); False when nothing of it can have committed (lost before
    ``COMMIT``, or inside the caller's own transaction, which is gone: roll it back). The message
    says the same in words. The store's next call uses a fresh connection.
    """

    def __init__(self, message: str, *, may_have_committed: bool) -> None:
        super().__init__(message)
        self.may_have_committed = may_have_committed


class SchemaNotReadyError(IdemstoreError):
    """The database schema is not at the revision this version of idemstore needs."""


class ConfigurationError(IdemstoreError, ValueError):
    """A database URL or engine option cannot be used."""


class FileFormatError(IdemstoreError, ValueError):
    """A JSON idempotency-key file cannot be read; the message names the file, record and field."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        record_id: str | None = None,
        field: str | None = None,
        line: int | None = None,
    ) -> None:
        self.path = path
        self.record_id = record_id
        self.field = field
        self.line = line
        self.reason = message
        where = []
        if path is not None:
            where.append(f"{path}" + (f":{line}" if line is not None else ""))
        if record_id is not None:
            where.append(f"record {record_id!r}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(": ".join([", ".join(where), message]) if where else message)


class LeaseLostError(IdemstoreError):
    """The reservation named by a token no longer holds the key: it was re-claimed after its
    lease ended, released, completed over by another holder, or replaced after it expired (or
    its key is gone). The ``complete``, ``renew`` or ``release`` that raised it wrote nothing;
    its work's outcome must not be taken as the key's."""


class InProgressError(IdemstoreError):
    """Another caller holds the key and is still working on it (``run_once`` found a live
    reservation and did not wait, or waited in vain). ``record`` is the key's record;
    ``lease_expires_at_ms`` when its holder's lease ends (None: reserved without a lease, no
    end known). Retry later."""

    def __init__(self, message: str, *, record: IdempotencyRecord) -> None:
        super().__init__(message)
        self.record = record
        self.lease_expires_at_ms = record.lease_expires_at_ms


class ConflictError(IdemstoreError):
    """The key was used before by a different request (another fingerprint): ``record`` is
    the key's record. Reject the request; do not run its work."""

    def __init__(self, message: str, *, record: IdempotencyRecord) -> None:
        super().__init__(message)
        self.record = record


__all__ = [
    "ConfigurationError",
    "ConflictError",
    "ConnectionLostError",
    "FileFormatError",
    "IdemstoreError",
    "InProgressError",
    "InvalidInputError",
    "LeaseLostError",
    "LockTimeoutError",
    "SchemaNotReadyError",
    "StoreClosedError",
]
