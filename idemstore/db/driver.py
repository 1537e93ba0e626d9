"""Running statements on the DBAPI connection, and what driver errors mean.

:class:`Statement` objects (defined in :mod:`idemstore.db.statements`) are SQLAlchemy
constructs built once per dialect and compiled once per driver; :class:`Driver` runs them on
the DBAPI connection that SQLAlchemy's pool hands out, so the hot path pays neither statement
building nor SQLAlchemy's per-execute bookkeeping (about four fifths of the cost of a
reservation on SQLite, measured). It also holds idemstore's transaction rules (``BEGIN
IMMEDIATE`` on SQLite, savepoints, commit between batches). :func:`translated_errors` turns
driver errors into idemstore's (lock timeouts, NUL in text) or SQLAlchemy's wrapper.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, Literal

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.elements import ClauseElement

from ..errors import ConfigurationError, InvalidInputError, LockTimeoutError

Row = Sequence[Any]


def insert_for(dialect: Dialect) -> Callable[[sa.Table], Insert]:
    """The dialect's ``INSERT`` construct that knows ``ON CONFLICT``."""
    # Imported here: the engine has loaded its own dialect's package, and only that one.
    if dialect.name == "sqlite":
        from sqlalchemy.dialects import sqlite

        return sqlite.insert
    if dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    raise ConfigurationError(
        f"idemstore supports SQLite and PostgreSQL, not {dialect.name!r} ({dialect.driver})"
    )


@dataclass(frozen=True, slots=True)
class CompiledStatement:
    """A statement's SQL text for one dialect and driver, and how to bind its parameters."""

    sql: str
    #: Bind names in positional order, or None for a named paramstyle.
    positional: tuple[str, ...] | None
    #: Values of the binds SQLAlchemy made itself (e.g. SQLite's ``OFFSET 0``).
    constants: Mapping[str, Any]


class Statement:
    """One SQL statement of the store: a SQLAlchemy construct built by ``build`` for a dialect,
    compiled once per dialect and driver and kept on this object (thread-safe). The object is
    the statement's identity; ``name`` only names it in messages.

    Binds are named ``p_<name>`` (filled from a mapping) or ``v0``, ``v1``, ... (filled in
    order: :meth:`Driver.execute_flat`, :meth:`Driver.executemany`).
    """

    __slots__ = ("_compiled", "_lock", "build", "name")

    def __init__(self, name: str, build: Callable[[Dialect], ClauseElement]) -> None:
        self.name = name
        self.build = build
        self._compiled: dict[tuple[str, str], CompiledStatement] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Statement({self.name!r})"

    def compiled(self, dialect: Dialect) -> CompiledStatement:
        """This statement for ``dialect`` (built and compiled on first use)."""
        cache_key = (dialect.name, dialect.driver)
        found = self._compiled.get(cache_key)
        if found is not None:
            return found
        with self._lock:
            found = self._compiled.get(cache_key)
            if found is None:
                found = self._compiled[cache_key] = self._compile(dialect)
        return found

    def _compile(self, dialect: Dialect) -> CompiledStatement:
        compiled = self.build(dialect).compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        constants = {}
        for key, bind in compiled.binds.items():
            if bind.unique:
                if bind.value is None:
                    raise RuntimeError(f"statement {self.name}: bind {key!r} has no name or value")
                constants[key] = bind.value
        positional = tuple(compiled.positiontup) if compiled.positiontup is not None else None
        return CompiledStatement(compiled.string, positional, constants)


def flat_names(n: int) -> tuple[str, ...]:
    """``("v0", ..., "v<n-1>")``: the bind names :meth:`Driver.execute_flat` fills in order."""
    names = _flat_name_cache.get(n)
    if names is None:
        names = _flat_name_cache[n] = tuple(f"v{i}" for i in range(n))
    return names


_flat_name_cache: dict[int, tuple[str, ...]] = {}
_flat_orders: dict[str, tuple[int, ...] | None] = {}


def _flat_order(stmt: CompiledStatement) -> tuple[int, ...] | None:
    """Positions of ``v<i>`` binds in the compiled SQL; None when already in order."""
    try:
        return _flat_orders[stmt.sql]
    except KeyError:
        pass
    assert stmt.positional is not None and not stmt.constants
    order = tuple(int(p[1:]) for p in stmt.positional)
    found = None if order == tuple(range(len(order))) else order
    _flat_orders[stmt.sql] = found
    return found


_row_orders: dict[str, tuple[tuple[str, ...], tuple[int, ...] | None]] = {}


def _row_order(stmt: CompiledStatement, names: tuple[str, ...]) -> tuple[int, ...] | None:
    """Positions in ``names`` of ``stmt``'s positional binds; None when they are in order."""
    found = _row_orders.get(stmt.sql)
    if found is not None and found[0] is names:
        return found[1]
    assert stmt.positional is not None
    order = tuple(names.index(p) for p in stmt.positional)
    result = None if order == tuple(range(len(names))) else order
    _row_orders[stmt.sql] = (names, result)
    return result


def _bound(stmt: CompiledStatement, params: Mapping[str, Any] | None) -> Any:
    """``params`` (``p_*`` names) as the driver takes them for ``stmt``."""
    if stmt.constants:
        params = {**stmt.constants, **(params or {})}
    if stmt.positional is not None:
        return tuple(params[p] for p in stmt.positional) if params else ()
    return params or {}


def _flat_bound(stmt: CompiledStatement, values: Sequence[Any]) -> Any:
    """``values`` of the binds ``v0``, ``v1``, ... as the driver takes them for ``stmt``."""
    if stmt.positional is not None:
        order = _flat_order(stmt)
        return values if order is None else [values[i] for i in order]
    return dict(zip(flat_names(len(values)), values, strict=True))


def is_sqlite(dialect: Dialect) -> bool:
    """Whether ``dialect`` is SQLite's."""
    return dialect.name == "sqlite"


#: SQLite page cache during a bulk load, in KiB.
BULK_CACHE_KIB: Final = 128 * 1024


class Driver:
    """A DBAPI connection of a known dialect, with idemstore's transaction rules.

    ``owns_transaction``: True when idemstore opened the transaction (it begins, commits and
    rolls back); False inside a caller's transaction (it never commits there).
    """

    __slots__ = (
        "_cursor",
        "_sqlite",
        "committed",
        "committing",
        "dbapi",
        "dialect",
        "owns_transaction",
    )

    def __init__(self, dbapi: Any, dialect: Dialect, *, owns_transaction: bool) -> None:
        self.dbapi = dbapi
        self.dialect = dialect
        self.owns_transaction = owns_transaction
        self._sqlite = is_sqlite(dialect)
        self._cursor: Any = None
        #: A COMMIT is on its way: a connection lost now leaves the outcome unknown.
        self.committing = False
        #: A COMMIT went through (a batch of a long operation, :meth:`checkpoint`).
        self.committed = False

    def execute(self, statement: Statement, params: Mapping[str, Any] | None = None) -> list[Row]:
        """Run ``statement`` with ``p_*`` binds from ``params``; its rows (fetched whole)."""
        stmt = statement.compiled(self.dialect)
        bound = _bound(stmt, params)
        # One cursor for all the statements of this Driver (closed by close()): each result
        # is fetched whole before the next statement runs.
        cursor = self._cursor
        if cursor is None:
            cursor = self._cursor = self.dbapi.cursor()
        cursor.execute(stmt.sql, bound)
        return cursor.fetchall() if cursor.description is not None else []

    def execute_row(
        self, statement: Statement, names: tuple[str, ...], values: Sequence[Any]
    ) -> list[Row]:
        """Run ``statement`` whose ``p_*`` binds are ``names``, with ``values`` in that order
        (a whole record row); its rows. The same as :meth:`execute` with
        ``dict(zip(names, values))``, without the dict where the driver binds by position
        (SQLite): the row goes as it is when the compiled order is the row's. Measured for
        the reserve's 27 binds, building them included: 4.0 against 1.4 us a call."""
        stmt = statement.compiled(self.dialect)
        if stmt.positional is None or stmt.constants:
            return self.execute(statement, dict(zip(names, values, strict=True)))
        order = _row_order(stmt, names)
        bound = values if order is None else tuple(values[i] for i in order)
        cursor = self._cursor
        if cursor is None:
            cursor = self._cursor = self.dbapi.cursor()
        cursor.execute(stmt.sql, bound)
        return cursor.fetchall() if cursor.description is not None else []

    def run_sql(self, sql: str) -> list[Row]:
        """A fixed statement without parameters (savepoints, pragmas)."""
        cursor = self._cursor
        if cursor is None:
            cursor = self._cursor = self.dbapi.cursor()
        cursor.execute(sql)
        return cursor.fetchall() if cursor.description is not None else []

    @contextlib.contextmanager
    def bulk_load(self) -> Iterator[None]:
        """Around a big insert of rows the caller has already validated (the importer). On
        SQLite: a page cache that holds the transaction's pages (instead of spilling them to
        the WAL as the 2 MB default fills), and no evaluation of CHECK constraints, whose rules
        the rows were checked against before (together: 0.80 -> 0.59 s for 100k rows, measured
        with ``executemany``). Both are connection settings, restored after."""
        if not self._sqlite:
            yield
            return
        ((cache_size,),) = self.run_sql("PRAGMA cache_size")
        ((ignore_checks,),) = self.run_sql("PRAGMA ignore_check_constraints")
        self.run_sql(f"PRAGMA cache_size = {-BULK_CACHE_KIB}")
        self.run_sql("PRAGMA ignore_check_constraints = ON")
        try:
            yield
        finally:
            self.run_sql(f"PRAGMA ignore_check_constraints = {1 if ignore_checks else 0}")
            self.run_sql(f"PRAGMA cache_size = {int(cache_size)}")

    @contextlib.contextmanager
    def savepoint(self, name: str) -> Iterator[Callable[[], None]]:
        """A savepoint inside the current transaction; yields the function that rolls back to
        it. An error in the block rolls back to it too (so that a caller's own transaction is
        left as it was), and is raised on; the savepoint is released at the end."""
        self.run_sql(f"SAVEPOINT {name}")

        def roll_back() -> None:
            self.run_sql(f"ROLLBACK TO SAVEPOINT {name}")

        try:
            yield roll_back
        except BaseException:
            with contextlib.suppress(Exception):  # the error that got here is the one to see
                roll_back()
                self.run_sql(f"RELEASE SAVEPOINT {name}")
            raise
        self.run_sql(f"RELEASE SAVEPOINT {name}")

    def close(self) -> None:
        """Close the cursor (the connection stays open)."""
        cursor, self._cursor = self._cursor, None
        if cursor is not None:
            cursor.close()

    def execute_flat(self, statement: Statement, values: Sequence[Any]) -> list[Row]:
        """Run a statement whose binds are named ``v0``, ``v1``, ... (a multi-row ``VALUES`` or
        ``IN`` list) with ``values`` in that order: no dict per row on positional drivers."""
        stmt = statement.compiled(self.dialect)
        bound = _flat_bound(stmt, values)
        cursor = self.dbapi.cursor()
        try:
            cursor.execute(stmt.sql, bound)
            return list(cursor.fetchall()) if cursor.description is not None else []
        finally:
            cursor.close()

    def executemany(self, statement: Statement, rows: Sequence[Sequence[Any]]) -> None:
        """Run a one-row statement whose binds are ``v0``, ``v1``, ... once per row of ``rows``
        (the driver's own batching: SQLite's prepared-statement loop in C, psycopg's pipeline,
        asyncpg's ``executemany``)."""
        if not rows:
            return
        stmt = statement.compiled(self.dialect)
        bound: Any = rows
        if stmt.positional is None or _flat_order(stmt) is not None:
            bound = [_flat_bound(stmt, row) for row in rows]
        cursor = self.dbapi.cursor()
        try:
            cursor.executemany(stmt.sql, bound)
        finally:
            cursor.close()

    def copy_rows(self, table: sa.Table, rows: Sequence[Sequence[Any]]) -> bool:
        """PostgreSQL's ``COPY ... FROM STDIN`` of whole rows (all columns, table order):
        psycopg's ``Cursor.copy``, asyncpg's ``copy_records_to_table``. False (nothing done)
        where there is no COPY (SQLite): use :meth:`executemany` then."""
        if self.dialect.name != "postgresql":
            return False
        if not rows:
            return True
        columns = [c.name for c in table.columns]
        driver = self.dialect.driver
        if driver == "psycopg":
            preparer = self.dialect.identifier_preparer
            names = ", ".join(preparer.quote(c) for c in columns)
            cursor = self.dbapi.cursor()
            try:
                with cursor.copy(
                    f"COPY {preparer.format_table(table)} ({names}) FROM STDIN"
                ) as copy:
                    for row in rows:
                        copy.write_row(row)
            finally:
                cursor.close()
            return True
        if driver == "asyncpg":
            from sqlalchemy.util import await_only

            raw = self.dbapi.driver_connection  # the asyncpg Connection behind the adapter
            await_only(raw.copy_records_to_table(table.name, records=rows, columns=columns))
            return True
        return False

    def stream(
        self,
        statement: Statement,
        params: Mapping[str, Any] | None = None,
        *,
        size: int = 1000,
    ) -> Iterator[list[Row]]:
        """Rows of a (big) query in lists of at most ``size``, without holding them all:
        SQLite steps its cursor; PostgreSQL reads through a server-side cursor (``DECLARE``
        / ``FETCH``), which needs a transaction: the caller's or idemstore's own."""
        stmt = statement.compiled(self.dialect)
        bound = _bound(stmt, params)
        cursor = self.dbapi.cursor()
        try:
            if self._sqlite:
                cursor.execute(stmt.sql, bound)
                while rows := cursor.fetchmany(size):
                    yield list(rows)
                return
            cursor.execute(f"DECLARE idemstore_stream NO SCROLL CURSOR FOR {stmt.sql}", bound)
            try:
                while True:
                    cursor.execute(f"FETCH FORWARD {int(size)} FROM idemstore_stream")
                    rows = cursor.fetchall()
                    if not rows:
                        return
                    yield list(rows)
            finally:
                # Gone with the transaction anyway; an aborted one refuses even CLOSE, and
                # that must not hide the error that aborted it.
                with contextlib.suppress(Exception):
                    cursor.execute("CLOSE idemstore_stream")
        finally:
            cursor.close()

    # -- transactions -------------------------------------------------------------------

    def begin(self, mode: Literal["read", "write"]) -> None:
        """Start idemstore's own transaction. SQLite writers take the lock up front."""
        if self._sqlite:
            self._sqlite_exec("BEGIN IMMEDIATE" if mode == "write" else "BEGIN")
        # psycopg and the asyncpg adapter begin implicitly on the first statement.

    def commit(self) -> None:
        """Commit; :attr:`committing` is True while the COMMIT is on its way."""
        self.committing = True
        self.dbapi.commit()
        self.committing = False
        self.committed = True

    def rollback(self) -> None:
        """Roll the transaction back."""
        self.dbapi.rollback()

    def checkpoint(self) -> None:
        """Between batches of a long operation: commit and go on in a new write transaction
        when idemstore owns the transaction; nothing inside a caller's transaction."""
        if self.owns_transaction:
            self.commit()
            self.begin("write")

    def join_for_write(self) -> None:
        """In a caller's transaction on SQLite: take the write lock now if no transaction has
        begun at the driver yet, rather than upgrading a deferred read later."""
        if self._sqlite and not sqlite_in_transaction(self.dbapi):
            self._sqlite_exec("BEGIN IMMEDIATE")

    def _sqlite_exec(self, sql: str) -> None:
        cursor = self._cursor
        if cursor is None:
            cursor = self._cursor = self.dbapi.cursor()
        cursor.execute(sql)


def sqlite_in_transaction(dbapi: Any) -> bool:
    # sqlite3.Connection has in_transaction; SQLAlchemy's aiosqlite adapter holds an
    # aiosqlite.Connection (which proxies it) as its public ``driver_connection``.
    if hasattr(dbapi, "in_transaction"):
        return bool(dbapi.in_transaction)
    return bool(dbapi.driver_connection.in_transaction)


#: PostgreSQL's ``lock_not_available``: ``lock_timeout`` ran out (or ``NOWAIT`` found a lock).
PG_LOCK_NOT_AVAILABLE: Final = "55P03"
#: SQLSTATEs of a session the server ended: admin_shutdown, crash_shutdown, cannot_connect_now
#: (class 08, connection_exception, counts whole).
_PG_SESSION_ENDED: Final = frozenset({"57P01", "57P02", "57P03"})


def _sqlstate(error: BaseException) -> str | None:
    # psycopg's errors and SQLAlchemy's asyncpg adapter errors both carry ``sqlstate``.
    state = getattr(getattr(error, "orig", error), "sqlstate", None)
    return state if isinstance(state, str) else None


def is_lock_timeout(error: BaseException) -> bool:
    """Whether a driver error means a lock could not be had in time: SQLite's busy timeout,
    PostgreSQL's ``lock_timeout`` (SQLSTATE 55P03)."""
    orig = getattr(error, "orig", error)
    if _sqlstate(orig) == PG_LOCK_NOT_AVAILABLE:
        return True
    if isinstance(orig, sqlite3.OperationalError) or type(orig).__name__ == "OperationalError":
        text = str(orig).lower()
        return (
            "database is locked" in text
            or "database table is locked" in text
            or ("busy" in text and "sqlite" in type(orig).__module__)
        )
    return False


def is_disconnect(dialect: Dialect, error: BaseException, dbapi_connection: Any) -> bool:
    """Whether ``error``, raised on ``dbapi_connection``, means the connection is lost: the
    dialect's own test (the one SQLAlchemy uses to invalidate), or a SQLSTATE that says so."""
    # SQLAlchemy's wrapper holds the DBAPI error in .orig (and the asyncpg adapter's error
    # holds asyncpg's own in .orig too: one level only).
    orig = error.orig if isinstance(error, sa.exc.DBAPIError) else error
    if not isinstance(orig, dialect.loaded_dbapi.Error):
        return False
    with contextlib.suppress(Exception):
        if dialect.is_disconnect(orig, dbapi_connection, None):
            return True
    state = _sqlstate(orig)
    return state is not None and (state.startswith("08") or state in _PG_SESSION_ENDED)


def interrupt_spoils_connection(dialect: Dialect) -> bool:
    """Whether an exit exception (``KeyboardInterrupt``, ``CancelledError``) in the middle of an
    operation can leave the connection unusable: a network driver's protocol state may be cut
    half-way (asyncpg, psycopg), so the connection is discarded. SQLite's calls run whole (a
    signal is handled between them), so its connection only needs the rollback that giving it
    back does, and a ``:memory:`` database is not thrown away with it."""
    return not is_sqlite(dialect)


def committed_nothing_when_lost(dialect: Dialect) -> bool:
    """Whether a connection lost even during COMMIT cannot have committed. SQLite: a closed
    connection refuses the COMMIT before running it, and closing rolled the transaction back.
    A server may have committed before the session ended: unknown."""
    return is_sqlite(dialect)


def is_nul_in_text(error: BaseException) -> bool:
    """Whether PostgreSQL refused a NUL character in text (SQLite, like Rust, stores it)."""
    text = str(getattr(error, "orig", error))
    return "cannot contain NUL" in text or ("invalid byte sequence" in text and "0x00" in text)


def lock_timeout_error(error: BaseException, busy_timeout_ms: int | None) -> LockTimeoutError:
    """The :class:`LockTimeoutError` for a lock timeout of either engine (``busy_timeout_ms``:
    the timeout, when known, for the message)."""
    orig = getattr(error, "orig", error)
    if _sqlstate(orig) == PG_LOCK_NOT_AVAILABLE:
        setting = f"lock_timeout={busy_timeout_ms} ms" if busy_timeout_ms is not None else ""
        return LockTimeoutError(
            f"PostgreSQL {setting or 'lock_timeout'} ran out: another session holds a lock "
            f"this operation needs (the same key, in a transaction not yet ended); nothing was "
            f"written, retry later ({orig})"
        )
    within = f" within busy_timeout={busy_timeout_ms} ms" if busy_timeout_ms is not None else ""
    return LockTimeoutError(
        f"SQLite database is locked: another connection held the write lock{within} ({orig})"
    )


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
