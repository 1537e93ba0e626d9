"""Everything that differs per database: upsert constructs, SQLite pragmas and transactions.

The rest of the package is dialect-neutral. Statements are SQLAlchemy constructs built once per
dialect and compiled once per driver; :class:`Driver` runs them on the DBAPI connection that
SQLAlchemy's pool hands out, so the hot path pays neither statement building nor SQLAlchemy's
per-execute bookkeeping (about four fifths of the cost of a reservation on SQLite, measured).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.elements import ClauseElement

from .errors import ConfigurationError, LockTimeoutError

SQLITE_SYNCHRONOUS: Final = ("OFF", "NORMAL", "FULL", "EXTRA")
DEFAULT_BUSY_TIMEOUT_MS: Final = 5000

Row = Sequence[Any]


def insert_for(dialect: Dialect) -> Callable[[sa.Table], Insert]:
    """The dialect's ``INSERT`` construct that knows ``ON CONFLICT``."""
    if dialect.name == "sqlite":
        return sqlite.insert
    if dialect.name == "postgresql":
        return postgresql.insert
    raise ConfigurationError(
        f"idemstore supports SQLite and PostgreSQL, not {dialect.name!r} ({dialect.driver})"
    )


@dataclass(frozen=True, slots=True)
class CompiledStatement:
    sql: str
    #: Bind names in positional order, or None for a named paramstyle.
    positional: tuple[str, ...] | None
    #: Values of the binds SQLAlchemy made itself (e.g. SQLite's ``OFFSET 0``).
    constants: Mapping[str, Any]


StatementBuilder = Callable[[Dialect], ClauseElement]

_compiled: dict[tuple[str, str, str], CompiledStatement] = {}
_compiled_lock = threading.Lock()


def compile_statement(name: str, build: StatementBuilder, dialect: Dialect) -> CompiledStatement:
    """Build and compile a statement once per dialect and driver (thread-safe, cached)."""
    cache_key = (name, dialect.name, dialect.driver)
    found = _compiled.get(cache_key)
    if found is not None:
        return found
    with _compiled_lock:
        found = _compiled.get(cache_key)
        if found is None:
            compiled = build(dialect).compile(dialect=dialect)
            assert isinstance(compiled, SQLCompiler)
            constants = {}
            for key, bind in compiled.binds.items():
                if bind.unique:
                    if bind.value is None:
                        raise RuntimeError(f"statement {name}: bind {key!r} has no name or value")
                    constants[key] = bind.value
            positional = tuple(compiled.positiontup) if compiled.positiontup is not None else None
            found = CompiledStatement(compiled.string, positional, constants)
            _compiled[cache_key] = found
    return found


def is_sqlite(dialect: Dialect) -> bool:
    return dialect.name == "sqlite"


class Driver:
    """A DBAPI connection of a known dialect, with idemstore's transaction rules.

    ``owns_transaction``: True when idemstore opened the transaction (it begins, commits and
    rolls back); False inside a caller's transaction (it never commits there).
    """

    __slots__ = ("_cursor", "_sqlite", "dbapi", "dialect", "owns_transaction")

    def __init__(self, dbapi: Any, dialect: Dialect, *, owns_transaction: bool) -> None:
        self.dbapi = dbapi
        self.dialect = dialect
        self.owns_transaction = owns_transaction
        self._sqlite = is_sqlite(dialect)
        self._cursor: Any = None

    def execute(
        self, name: str, build: StatementBuilder, params: Mapping[str, Any] | None = None
    ) -> list[Row]:
        stmt = compile_statement(name, build, self.dialect)
        bound: Any
        if stmt.constants:
            params = {**stmt.constants, **(params or {})}
        if stmt.positional is not None:
            bound = tuple(params[p] for p in stmt.positional) if params else ()
        else:
            bound = params or {}
        # One cursor for all the statements of this Driver (closed by close()): each result
        # is fetched whole before the next statement runs.
        cursor = self._cursor
        if cursor is None:
            cursor = self._cursor = self.dbapi.cursor()
        cursor.execute(stmt.sql, bound)
        return cursor.fetchall() if cursor.description is not None else []

    def close(self) -> None:
        """Close the cursor (the connection stays open)."""
        cursor, self._cursor = self._cursor, None
        if cursor is not None:
            cursor.close()

    # -- transactions -------------------------------------------------------------------

    def begin(self, mode: Literal["read", "write"]) -> None:
        """Start idemstore's own transaction. SQLite writers take the lock up front."""
        if self._sqlite:
            self._sqlite_exec("BEGIN IMMEDIATE" if mode == "write" else "BEGIN")
        # psycopg and the asyncpg adapter begin implicitly on the first statement.

    def commit(self) -> None:
        self.dbapi.commit()

    def rollback(self) -> None:
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
        if self._sqlite and not _sqlite_in_transaction(self.dbapi):
            self._sqlite_exec("BEGIN IMMEDIATE")

    def _sqlite_exec(self, sql: str) -> None:
        cursor = self._cursor
        if cursor is None:
            cursor = self._cursor = self.dbapi.cursor()
        cursor.execute(sql)


def _sqlite_in_transaction(dbapi: Any) -> bool:
    # sqlite3.Connection has in_transaction; SQLAlchemy's aiosqlite adapter wraps an
    # aiosqlite.Connection (which proxies it) in ``_connection``.
    if hasattr(dbapi, "in_transaction"):
        return bool(dbapi.in_transaction)
    return bool(dbapi._connection.in_transaction)


def is_lock_timeout(error: BaseException) -> bool:
    """Whether a driver error means SQLite's busy timeout ran out on a lock."""
    orig = getattr(error, "orig", error)
    if isinstance(orig, sqlite3.OperationalError) or type(orig).__name__ == "OperationalError":
        text = str(orig).lower()
        return (
            "database is locked" in text
            or "database table is locked" in text
            or ("busy" in text and "sqlite" in type(orig).__module__)
        )
    return False


def is_nul_in_text(error: BaseException) -> bool:
    """Whether PostgreSQL refused a NUL character in text (SQLite, like Rust, stores it)."""
    text = str(getattr(error, "orig", error))
    return "cannot contain NUL" in text or ("invalid byte sequence" in text and "0x00" in text)


def lock_timeout_error(error: BaseException, busy_timeout_ms: int | None) -> LockTimeoutError:
    within = f" within busy_timeout={busy_timeout_ms} ms" if busy_timeout_ms is not None else ""
    return LockTimeoutError(
        f"SQLite database is locked: another connection held the write lock{within} "
        f"({getattr(error, 'orig', error)})"
    )


# -- SQLite connection setup ---------------------------------------------------------------


def sqlite_connect_pragmas(*, synchronous: str, busy_timeout_ms: int, memory: bool) -> list[str]:
    """The pragmas every idemstore SQLite connection runs when it opens."""
    level = synchronous.upper()
    if level not in SQLITE_SYNCHRONOUS:
        raise ConfigurationError(
            f"synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS)}, not {synchronous!r}"
        )
    if busy_timeout_ms < 0:
        raise ConfigurationError(f"busy_timeout_ms must be >= 0, not {busy_timeout_ms}")
    pragmas = [f"PRAGMA busy_timeout = {int(busy_timeout_ms)}", "PRAGMA foreign_keys = ON"]
    if not memory:
        pragmas.append("PRAGMA journal_mode = WAL")
    pragmas.append(f"PRAGMA synchronous = {level}")
    return pragmas


def install_sqlite_listeners(
    engine: sa.Engine, *, synchronous: str, busy_timeout_ms: int, memory: bool
) -> None:
    """Make every connection of ``engine`` use idemstore's SQLite settings, and make
    SQLAlchemy transactions real ones that begin with ``BEGIN IMMEDIATE``.

    The driver's own implicit transactions are turned off (``isolation_level = None``), the
    recipe in SQLAlchemy's pysqlite/aiosqlite documentation, so that a ``Connection.begin()``
    takes the write lock up front instead of upgrading a deferred read.
    """
    pragmas = sqlite_connect_pragmas(
        synchronous=synchronous, busy_timeout_ms=busy_timeout_ms, memory=memory
    )

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for pragma in pragmas:
                cursor.execute(pragma)
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
