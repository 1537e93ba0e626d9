"""Running an operation (a :class:`~idemstore.db.ops.Call`): in a transaction of idemstore's
own on a pooled connection (a lost connection discarded, the operation run again when nothing
can have committed), or in the caller's. Synchronous; the async store reaches it in one hop
per operation (:mod:`idemstore.db.offload`)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Final, TypeAlias, TypeGuard, TypeVar

import sqlalchemy as sa
from sqlalchemy.pool import PoolProxiedConnection, QueuePool

from ..errors import ConnectionLostError
from .driver import (
    Driver,
    committed_nothing_when_lost,
    interrupt_spoils_connection,
    is_disconnect,
    sqlite_in_transaction,
    translated_errors,
)
from .engine import safe_url
from .ops import Call

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    SyncConnectionLike: TypeAlias = sa.Connection | Session

T = TypeVar("T")

logger = logging.getLogger("idemstore")


def run_in_transaction(driver: Driver, call: Call[T]) -> T:
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
        """A pooled connection for one operation."""
        return self.engine.raw_connection()

    def release(self, pooled: PoolProxiedConnection, *, clean: bool) -> None:
        """Give back a connection that is alive (``clean``: the transaction ended)."""
        pooled.close()

    def discard(self, pooled: PoolProxiedConnection, error: BaseException) -> None:
        """Throw away a dead or half-used connection: the pool opens a new one in its place."""
        pooled.invalidate(error)

    def idle(self) -> int:
        """How many connections this source holds idle (each may be as dead as the last)."""
        return 0

    def close(self) -> None:
        """Give back whatever this source holds (nothing here)."""


#: At most this many connections a :class:`ReusedConnections` keeps between operations.
REUSED_MAX: Final = 4
#: A :class:`ReusedConnections` gives its idle connections back to the pool once no
#: operation took one for this long (as the async store's worker threads do).
REUSED_IDLE_S: Final = 0.05


class ReusedConnections(ConnectionSource):
    """SQLite: a connection whose transaction ended (committed or rolled back by idemstore)
    stays checked out of the pool, idle here, for the next operation of any thread (at most
    ``keep`` of them), until no operation took one for :data:`REUSED_IDLE_S` (a thread of
    its own then gives them back to the pool and ends); anything else goes back through the
    pool as before (``close``: the pool's reset rolls it back) or is discarded. See
    :func:`connection_source`."""

    def __init__(self, engine: sa.Engine, keep: int) -> None:
        super().__init__(engine)
        self._idle: list[PoolProxiedConnection] = []
        self._keep = keep
        self._lock = threading.Lock()
        self._closed = False
        self._uses = 0
        self._returning = False  # the thread that gives idle connections back is running
        self._pid = os.getpid()
        #: Connections a parent process held when this one was forked: never used, closed or
        #: given back here (SQLite forbids carrying one across a fork), only kept referenced.
        self._inherited: list[PoolProxiedConnection] = []

    def acquire(self) -> PoolProxiedConnection:
        if self._pid != os.getpid():
            self._forked()
        self._uses += 1  # a lost increment still changes it: all the give-back looks at
        try:
            return self._idle.pop()  # atomic: no two threads get the same one
        except IndexError:
            return self.engine.raw_connection()

    def release(self, pooled: PoolProxiedConnection, *, clean: bool) -> None:
        if clean and not sqlite_in_transaction(pooled.dbapi_connection):
            with self._lock:
                if not self._closed and len(self._idle) < self._keep:
                    self._idle.append(pooled)
                    if not self._returning:
                        self._returning = True
                        threading.Thread(
                            target=self._give_back_when_idle, name="idemstore-idle", daemon=True
                        ).start()
                    return
        pooled.close()

    def _forked(self) -> None:
        # In a child process: the parent's idle connections are not this process's to use,
        # and the parent's give-back thread did not come along.
        self._inherited.extend(self._idle)
        self._idle = []
        self._lock = threading.Lock()
        self._returning = False
        self._pid = os.getpid()

    def _give_back_when_idle(self) -> None:
        while True:
            seen = self._uses
            time.sleep(REUSED_IDLE_S)
            with self._lock:
                if self._uses != seen and not self._closed:
                    continue
                self._returning = False
            self._give_back_idle()
            return

    def _give_back_idle(self) -> None:
        # One pop at a time: a pop is atomic, so a connection an operation is taking at this
        # moment is either its or given back here, never both.
        while True:
            try:
                pooled = self._idle.pop()
            except IndexError:
                return
            with contextlib.suppress(Exception):
                pooled.close()

    def idle(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        """Give every idle connection back to the pool; later ones go straight back too."""
        with self._lock:
            self._closed = True
        self._give_back_idle()


def connection_source(engine: sa.Engine) -> ConnectionSource:
    """Where the sync store's operations get their connections: the one place of this speed
    trick. On SQLite with a :class:`~sqlalchemy.pool.QueuePool` (a file database's default)
    of more than one connection and no pool ``checkout``/``checkin``/``reset`` listeners of
    the caller's, :class:`ReusedConnections` keeping up to ``min(REUSED_MAX, pool_size - 1)``
    (the pool keeps room for others); elsewhere one pool checkout per operation.

    Measured (``timeit``, best of 5 x 20k calls, SQLite file, this machine): a pool checkout
    and return (``raw_connection()`` + ``close()``, with its reset rollback) 5.4-5.8 us, an
    acquire and release here 0.4 us; a fresh reservation at ``synchronous=NORMAL`` (p50) took
    69 us before this and the positional binds (:meth:`Driver.execute_row`), 56-58 after
    (``idemstore bench --sections ops``). PostgreSQL keeps the pool's path: a round trip is
    50+ us there, and the pool's own checks (``pool_pre_ping``, recycle, when a caller's
    engine has them) and the retry count over idle connections stay as they are.
    """
    pool = engine.pool
    if engine.dialect.name != "sqlite" or not isinstance(pool, QueuePool):
        return ConnectionSource(engine)
    dispatch = pool.dispatch
    if dispatch.checkout or dispatch.checkin or dispatch.reset:
        return ConnectionSource(engine)
    keep = min(REUSED_MAX, pool.size() - 1)
    return ReusedConnections(engine, keep) if keep > 0 else ConnectionSource(engine)


def run_owned(
    engine: sa.Engine,
    call: Call[T],
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
                        retries = _idle_connections(engine) + source.idle() + 1
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


def run_in_caller(connection: SyncConnectionLike, call: Call[T], busy_timeout_ms: int | None) -> T:
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
