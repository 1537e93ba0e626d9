"""idemstore: idempotency keys in SQL (SQLite and PostgreSQL) through SQLAlchemy 2."""

from .aio import AsyncIdempotencyStore
from .config import create_async_engine, create_engine
from .errors import (
    ConfigurationError,
    FileFormatError,
    IdemstoreError,
    InvalidInputError,
    LockTimeoutError,
    SchemaNotReadyError,
)
from .ids import idempotency_fingerprint, idempotency_record_id
from .importer import (
    ImportReport,
    export_file,
    export_file_async,
    import_file,
    import_file_async,
)
from .model import (
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
from .ops import Stats
from .store import IdempotencyStore

__version__ = "0.1.0"

__all__ = [
    "AsyncIdempotencyStore",
    "ConfigurationError",
    "Conflict",
    "Duplicate",
    "FileFormatError",
    "IdempotencyRecord",
    "IdempotencyStore",
    "IdemstoreError",
    "ImportReport",
    "InvalidInputError",
    "LockTimeoutError",
    "Outcome",
    "RecordStatus",
    "Reservation",
    "Reserved",
    "SchemaNotReadyError",
    "Stats",
    "TenantContext",
    "TenantSource",
    "create_async_engine",
    "create_engine",
    "export_file",
    "export_file_async",
    "idempotency_fingerprint",
    "idempotency_record_id",
    "import_file",
    "import_file_async",
]
