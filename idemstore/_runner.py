"""Running a :class:`~idemstore.ops.Call`: in a transaction of idemstore's own, or in the
caller's. Synchronous; the async store reaches it in one hop per operation."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeAlias, TypeGuard, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect

from . import ops
from .config import safe_url, sqlite_file
from .dialects import Driver, is_lock_timeout, is_nul_in_text, lock_timeout_error
from .errors import InvalidInputError, SchemaNotReadyError
from .migrate import check_revisions

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    SyncConnectionLike: TypeAlias = sa.Connection | Session

T = TypeVar("T")

logger = logging.getLogger("idemstore")


@contextmanager
def translated_errors(dialect: Dialect, busy_timeout_ms: int | None) -> Iterator[None]:
    """SQLite lock timeouts become :class:`LockTimeoutError`; other driver errors are wrapped
    as SQLAlchemy wraps them (``sqlalchemy.exc.DBAPIError`` subclasses, ``.orig`` the
    driver's), so callers catch one family whichever path ran the statement."""
    try:
        yield
    except Exception as error:
        if is_lock_timeout(error):
            raise lock_timeout_error(error, busy_timeout_ms) from error
        if is_nul_in_text(error):
            raise InvalidInputError(
                "text containing NUL (\\x00) cannot be stored in PostgreSQL; nothing was written"
            ) from error
        driver_error = dialect.loaded_dbapi.Error
        if isinstance(error, driver_error) and not isinstance(error, sa_exc.DBAPIError):
            raise sa_exc.DBAPIError.instance(None, None, error, driver_error) from error
        raise


def run_in_transaction(dbapi: Any, dialect: Dialect, call: ops.Call[T]) -> T:
    """Run ``call`` in a transaction of its own on the DBAPI connection ``dbapi`` (which is in
    no transaction), commit, return its result; roll back on any error."""
    driver = Driver(dbapi, dialect, owns_transaction=True)
    try:
        driver.begin(call.mode)
        try:
            result = call.run(driver)
            driver.commit()
        except BaseException:
            driver.rollback()
            raise
        return result
    finally:
        driver.close()


def run_owned(engine: sa.Engine, call: ops.Call[T], busy_timeout_ms: int | None) -> T:
    """Run ``call`` in a transaction of its own on a pooled connection, commit, return it."""
    with translated_errors(engine.dialect, busy_timeout_ms):
        pooled = engine.raw_connection()
        try:
            return run_in_transaction(pooled.dbapi_connection, engine.dialect, call)
        finally:
            pooled.close()


def _is_session(connection: object) -> TypeGuard[Session]:
    # Whoever holds a Session has imported sqlalchemy.orm; the store itself never needs it.
    orm = sys.modules.get("sqlalchemy.orm")
    return orm is not None and isinstance(connection, orm.Session)


def sync_connection(connection: SyncConnectionLike) -> sa.Connection:
    """The SQLAlchemy Connection behind a caller's Connection or Session, in a transaction."""
    if _is_session(connection):
        return connection.connection()
    if isinstance(connection, sa.Connection):
        if not connection.in_transaction():
            connection.begin()
        return connection
    raise TypeError(
        "connection must be a sqlalchemy Connection or Session "
        f"(AsyncConnection / AsyncSession for the async store), not {type(connection).__name__}"
    )


def run_in_caller(
    connection: SyncConnectionLike, call: ops.Call[T], busy_timeout_ms: int | None
) -> T:
    """Run ``call`` inside the caller's transaction: it commits or rolls back with theirs."""
    conn = sync_connection(connection)
    with translated_errors(conn.dialect, busy_timeout_ms):
        driver = Driver(conn.connection.dbapi_connection, conn.dialect, owns_transaction=False)
        try:
            if call.mode == "write":
                driver.join_for_write()
            return call.run(driver)
        finally:
            driver.close()


class SchemaGate:
    """Checks once per store that the database is at the revision this package needs
    (:func:`idemstore.migrate.check_revisions`), with one plain ``SELECT`` of the version
    table: no Alembic, nothing written, and a missing SQLite file is reported, not created."""

    def __init__(self) -> None:
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    def mark_ready(self) -> None:
        self._ready = True

    def check(self, engine: sa.Engine, busy_timeout_ms: int | None) -> None:
        # Idempotent and cheap, so racing first calls may both run it: no lock (a thread lock
        # would block the event loop under the async store's greenlet bridge).
        if self._ready:
            return
        where = safe_url(engine.url)
        path = sqlite_file(engine.url)
        if path is not None and not os.path.exists(path):
            # Connecting would create an empty database there (or fail, read-only).
            raise SchemaNotReadyError(
                f"database {where} has no idemstore schema: its file {os.path.abspath(path)} "
                "does not exist; run `idemstore migrate` to create it (or open the store with "
                "migrate=True), or check the URL"
            )
        # Connect first, so that a database that can't be reached is reported as such...
        with translated_errors(engine.dialect, busy_timeout_ms):
            engine.raw_connection().close()
        try:
            found = run_owned(engine, ops.schema_revisions(), busy_timeout_ms)
        except sa_exc.DBAPIError as error:  # ...and a failing statement as no version table.
            logger.debug("schema check failed on %s: %s", where, error)
            found = ()
        check_revisions(found, where)
        self._ready = True
