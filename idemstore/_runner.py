"""Running a :class:`~idemstore.ops.Call`: in a transaction of idemstore's own, or in the
caller's. Synchronous; the async store reaches it in one hop per operation."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeAlias, TypeGuard, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.pool import PoolProxiedConnection

from . import ops
from .config import safe_url, sqlite_file
from .dialects import (
    Driver,
    committed_nothing_when_lost,
    interrupt_spoils_connection,
    is_disconnect,
    is_lock_timeout,
    is_nul_in_text,
    lock_timeout_error,
)
from .errors import ConnectionLostError, InvalidInputError, SchemaNotReadyError
from .migrate import check_revisions

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    SyncConnectionLike: TypeAlias = sa.Connection | Session

T = TypeVar("T")

logger = logging.getLogger("idemstore")


@contextmanager
def translated_errors(dialect: Dialect, busy_timeout_ms: int | None) -> Iterator[None]:
    """Lock timeouts (SQLite's busy timeout, PostgreSQL's ``lock_timeout``) become
    :class:`LockTimeoutError`; other driver errors are wrapped as SQLAlchemy wraps them
    (``sqlalchemy.exc.DBAPIError`` subclasses, ``.orig`` the driver's), so callers catch one
    family whichever path ran the statement."""
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


def run_in_transaction(driver: Driver, call: ops.Call[T]) -> T:
    """Run ``call`` in a transaction of its own on ``driver`` (whose connection is in no
    transaction), commit, return its result. An error rolls back (a rollback that fails too,
    on a dead connection, does not hide the error); an exit exception (``KeyboardInterrupt``,
    ``CancelledError``) does not touch the connection, whose owner must discard it."""
    driver.begin(call.mode)
    try:
        result = call.run(driver)
        driver.commit()
    except Exception:
        with contextlib.suppress(Exception):
            driver.rollback()
        raise
    return result


class ConnectionSource:
    """Where an operation in idemstore's own transaction gets its pooled connection and gives
    it back: by default, one checkout of ``engine``'s pool per operation."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def acquire(self) -> PoolProxiedConnection:
        return self.engine.raw_connection()

    def release(self, pooled: PoolProxiedConnection, *, clean: bool) -> None:
        """Give back a connection that is alive (``clean``: the transaction ended)."""
        pooled.close()

    def discard(self, pooled: PoolProxiedConnection, error: BaseException) -> None:
        """Throw away a dead or half-used connection: the pool opens a new one in its place."""
        pooled.invalidate(error)


def run_owned(
    engine: sa.Engine,
    call: ops.Call[T],
    busy_timeout_ms: int | None,
    source: ConnectionSource | None = None,
) -> T:
    """Run ``call`` in a transaction of its own on a pooled connection, commit, return it.

    A lost connection (the server ended the session, the network dropped, SQLite's connection
    was closed) is discarded, never given back to the pool. If it was lost before ``COMMIT`` was
    sent, nothing can have committed (the server rolls back a dead session), so the operation
    runs again on another connection, until one is not dead (at most once per connection that
    was idle in the pool, plus one new; then :class:`ConnectionLostError` with
    ``may_have_committed=False``). Lost during ``COMMIT``, or after an earlier batch of a long
    operation committed: :class:`ConnectionLostError` with ``may_have_committed=True``. An exit
    exception (``KeyboardInterrupt``, ``CancelledError``) discards a PostgreSQL connection too:
    a round trip cut in the middle leaves the driver in no state to reuse (a SQLite one is
    rolled back and given back).
    """
    source = source if source is not None else ConnectionSource(engine)
    dialect = engine.dialect
    retries: int | None = None
    with translated_errors(dialect, busy_timeout_ms):
        while True:
            lease = _Lease(source)
            try:  # whatever escapes below with the connection still leased discards it
                pooled = lease.acquire()
                driver = Driver(pooled.dbapi_connection, dialect, owns_transaction=True)
                try:
                    result = run_in_transaction(driver, call)
                except Exception as error:
                    _close_quietly(driver)
                    if not is_disconnect(dialect, error, pooled.dbapi_connection):
                        lease.release(clean=False)
                        raise
                    lease.discard(error)
                    lost = _lost(engine, driver, error)
                    if lost is not None:
                        raise lost from error
                    if retries is None:
                        retries = _idle_connections(engine) + 1
                    if retries <= 0:
                        raise ConnectionLostError(
                            f"the connection to {safe_url(engine.url)} was lost, and so were "
                            f"new ones: nothing was committed; is the database up? ({error})",
                            may_have_committed=False,
                        ) from error
                    retries -= 1
                    logger.warning(
                        "connection to %s lost before commit; running the operation again on "
                        "another one: %s",
                        safe_url(engine.url),
                        error,
                    )
                    continue
                driver.close()
                lease.release(clean=True)
                return result
            except BaseException as error:
                if interrupt_spoils_connection(dialect):
                    lease.discard(error)
                else:
                    lease.release(clean=False)  # the pool's reset rolls it back
                raise


class _Lease:
    """The pooled connection one attempt of :func:`run_owned` holds, until it is released or
    discarded (exactly once, whatever interrupts the attempt)."""

    __slots__ = ("pooled", "source")

    def __init__(self, source: ConnectionSource) -> None:
        self.source = source
        self.pooled: PoolProxiedConnection | None = None

    def acquire(self) -> PoolProxiedConnection:
        self.pooled = pooled = self.source.acquire()
        return pooled

    def release(self, *, clean: bool) -> None:
        pooled, self.pooled = self.pooled, None
        if pooled is not None:
            self.source.release(pooled, clean=clean)

    def discard(self, error: BaseException) -> None:
        pooled, self.pooled = self.pooled, None
        if pooled is not None:
            self.source.discard(pooled, error)


def _lost(engine: sa.Engine, driver: Driver, error: Exception) -> ConnectionLostError | None:
    """The error for a connection lost when running the operation again is not safe (something
    may have committed); None when it is."""
    where = safe_url(engine.url)
    if driver.committed:
        return ConnectionLostError(
            f"the connection to {where} was lost after part of the operation had committed "
            f"(a batch); run it again to finish it ({error})",
            may_have_committed=True,
        )
    if driver.committing and not committed_nothing_when_lost(engine.dialect):
        return ConnectionLostError(
            f"the connection to {where} was lost while committing: the write may have "
            f"committed; read it back before retrying ({error})",
            may_have_committed=True,
        )
    return None


def _close_quietly(driver: Driver) -> None:
    with contextlib.suppress(Exception):
        driver.close()


def _idle_connections(engine: sa.Engine) -> int:
    """How many connections wait in ``engine``'s pool (each may be as dead as the last)."""
    checkedin = getattr(engine.pool, "checkedin", None)
    return int(checkedin()) if callable(checkedin) else 0


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
    """Run ``call`` inside the caller's transaction: it commits or rolls back with theirs.

    If the connection is lost, the caller's transaction is gone: :class:`ConnectionLostError`
    (``may_have_committed=False``), and the caller's ``Connection`` is invalidated as SQLAlchemy
    does it (on PostgreSQL also after an exit exception such as ``CancelledError`` in the middle
    of a statement): roll back, then go on, on a new connection.
    """
    conn = sync_connection(connection)
    with translated_errors(conn.dialect, busy_timeout_ms):
        dbapi = conn.connection.dbapi_connection
        driver = Driver(dbapi, conn.dialect, owns_transaction=False)
        try:
            if call.mode == "write":
                driver.join_for_write()
            return call.run(driver)
        except Exception as error:
            if not is_disconnect(conn.dialect, error, dbapi):
                raise
            conn.invalidate(error)
            raise ConnectionLostError(
                "the connection was lost inside the caller's transaction, which did not "
                f"commit and is gone: roll it back and run it again ({error})",
                may_have_committed=False,
            ) from error
        except BaseException as error:
            if interrupt_spoils_connection(conn.dialect):
                conn.invalidate(error)
            raise
        finally:
            _close_quietly(driver)


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
