"""idemstore: idempotency keys in SQL (SQLite and PostgreSQL) through SQLAlchemy 2.

The public names are imported on first use (PEP 562), so ``import idemstore.model`` (or the
JSON file reader) does not pay for SQLAlchemy, Alembic or asyncio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .aio import AsyncIdempotencyStore
    from .db.engine import create_async_engine, create_engine
    from .errors import (
        ConfigurationError,
        ConflictError,
        ConnectionLostError,
        FileFormatError,
        IdemstoreError,
        InProgressError,
        InvalidInputError,
        LeaseLostError,
        LockTimeoutError,
        SchemaNotReadyError,
        StoreClosedError,
    )
    from .ids import idempotency_fingerprint, idempotency_record_id
    from .model import (
        Conflict,
        Duplicate,
        IdempotencyRecord,
        Outcome,
        RecordStatus,
        Reservation,
        Reserved,
        Stats,
        TenantContext,
        TenantSource,
    )
    from .once import idempotent
    from .rules import now_ms
    from .store import IdempotencyStore
    from .transfer.exporter import export_file, export_file_async
    from .transfer.importer import ImportReport, import_file, import_file_async

from .version import __version__ as __version__

#: Public name -> the submodule that defines it.
_SOURCES: dict[str, str] = {
    "AsyncIdempotencyStore": "aio",
    "create_async_engine": "db.engine",
    "create_engine": "db.engine",
    "ConfigurationError": "errors",
    "ConflictError": "errors",
    "ConnectionLostError": "errors",
    "FileFormatError": "errors",
    "IdemstoreError": "errors",
    "InProgressError": "errors",
    "InvalidInputError": "errors",
    "LeaseLostError": "errors",
    "LockTimeoutError": "errors",
    "SchemaNotReadyError": "errors",
    "StoreClosedError": "errors",
    "idempotency_fingerprint": "ids",
    "idempotency_record_id": "ids",
    "idempotent": "once",
    "ImportReport": "transfer.importer",
    "export_file": "transfer.exporter",
    "export_file_async": "transfer.exporter",
    "import_file": "transfer.importer",
    "import_file_async": "transfer.importer",
    "Conflict": "model",
    "Duplicate": "model",
    "IdempotencyRecord": "model",
    "Outcome": "model",
    "RecordStatus": "model",
    "Reservation": "model",
    "Reserved": "model",
    "TenantContext": "model",
    "TenantSource": "model",
    "Stats": "model",
    "now_ms": "rules",
    "IdempotencyStore": "store",
}

__all__ = [
    "AsyncIdempotencyStore",
    "ConfigurationError",
    "Conflict",
    "ConflictError",
    "ConnectionLostError",
    "Duplicate",
    "FileFormatError",
    "IdempotencyRecord",
    "IdempotencyStore",
    "IdemstoreError",
    "ImportReport",
    "InProgressError",
    "InvalidInputError",
    "LeaseLostError",
    "LockTimeoutError",
    "Outcome",
    "RecordStatus",
    "Reservation",
    "Reserved",
    "SchemaNotReadyError",
    "Stats",
    "StoreClosedError",
    "TenantContext",
    "TenantSource",
    "create_async_engine",
    "create_engine",
    "export_file",
    "export_file_async",
    "idempotency_fingerprint",
    "idempotency_record_id",
    "idempotent",
    "import_file",
    "import_file_async",
    "now_ms",
]


def __getattr__(name: str) -> object:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{source}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, "__version__"})
