"""Database URL resolution and engine creation, with each database's connection settings.

URL: the argument, else ``IDEMSTORE_DATABASE_URL``, else ``sqlite:///idemstore.db``. The same
URL serves the sync and the async store: the driver is swapped to the matching one
(``sqlite`` <-> ``sqlite+aiosqlite``, ``postgresql+psycopg`` <-> ``postgresql+asyncpg``).

A URL is shown only through :func:`safe_url`, which masks the password and every query
parameter named like a secret.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote, quote_plus, unquote

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import StaticPool

from ..defaults import (
    DEFAULT_BUSY_TIMEOUT_MS,
    DEFAULT_SYNCHRONOUS,
    SQLITE_SYNCHRONOUS,
    url_text,
)
from ..errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

_SYNC_DRIVERS: Final = {
    "sqlite": "sqlite",
    "sqlite+pysqlite": "sqlite",
    "sqlite+aiosqlite": "sqlite",
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
    "postgresql+asyncpg": "postgresql+psycopg",
}
_ASYNC_DRIVERS: Final = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+pysqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+psycopg": "postgresql+psycopg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}


def resolve_url(url: str | URL | None = None) -> URL:
    """The database URL: ``url``, else ``$IDEMSTORE_DATABASE_URL``, else the SQLite default.

    Raises :class:`ConfigurationError` for text that is not a URL (without repeating it: it
    may hold a password)."""
    raw = url if isinstance(url, URL) else url_text(url)
    try:
        return make_url(raw)
    except (ArgumentError, ValueError, TypeError):
        raise ConfigurationError(
            "not a database URL: expected dialect+driver://user:password@host:port/database "
            "(percent-encode @, : and / inside a password), or sqlite:///path/to/file.db"
        ) from None


def _with_driver(url: URL, drivers: dict[str, str], kind: str) -> URL:
    name = drivers.get(url.drivername)
    if name is None:
        raise ConfigurationError(
            f"no {kind} driver for {url.drivername!r}: idemstore supports sqlite, "
            "sqlite+aiosqlite, postgresql+psycopg and postgresql+asyncpg"
        )
    if name.startswith("sqlite") and (url.username or url.password or url.host or url.port):
        raise ConfigurationError(
            f"a SQLite URL names a file, not a user or host: {safe_url(url)} (use "
            "sqlite:///relative/path.db or sqlite:////absolute/path.db)"
        )
    return url.set(drivername=name)


def sync_url(url: str | URL | None = None) -> URL:
    """The URL (see :func:`resolve_url`) with the synchronous driver of its database."""
    return _with_driver(resolve_url(url), _SYNC_DRIVERS, "synchronous")


def async_url(url: str | URL | None = None) -> URL:
    """The URL (see :func:`resolve_url`) with the asyncio driver of its database."""
    return _with_driver(resolve_url(url), _ASYNC_DRIVERS, "asyncio")


#: A query parameter whose name matches this holds a secret (libpq/psycopg ``password``,
#: ``sslpassword``, ``passfile``, ``sslkey``; asyncpg ``password``; any ``*token*``,
#: ``*secret*``, ``*key*``, ``*pwd*``, ``*auth*``, ``*cred*``; a whole ``dsn``/``conninfo``).
_SECRET_NAME: Final = re.compile(r"pass|pwd|secret|token|key|auth|cred|dsn|conninfo", re.I)
#: A query value that itself carries ``name=value`` settings with a secret among them.
_SECRET_SETTING: Final = re.compile(r"(pass|pwd|secret|token|key)\w*\s*[=:]", re.I)
MASK: Final = "***"


def _is_secret(name: str, value: str) -> bool:
    return bool(_SECRET_NAME.search(name) or _SECRET_SETTING.search(value))


def safe_url(url: str | URL) -> str:
    """The URL as text for messages and logs: the password and every query parameter that may
    hold a secret (see ``_SECRET_NAME``) shown as ``***``. A SQLite file that idemstore opened
    read-only (:func:`read_only_url`) is shown as the plain ``sqlite:///`` URL of the file.
    Text that is not a URL is not repeated."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return "(not a database URL)"
    plain = _plain_sqlite(parsed)
    if plain is not None:
        parsed = plain
    text = parsed.set(query={}).render_as_string(hide_password=True)
    if not parsed.query:
        return text
    pairs = []
    for name in sorted(parsed.query):
        values = parsed.query[name]
        values = (values,) if isinstance(values, str) else tuple(values)
        if any(_is_secret(name, value) for value in values):
            pairs.append(f"{quote_plus(name)}={MASK}")
        else:
            pairs.extend(f"{quote_plus(name)}={quote_plus(value)}" for value in values)
    return f"{text}?{'&'.join(pairs)}"


def redact(text: str, url: str | URL) -> str:
    """``text`` (a driver's message) with every secret of ``url`` replaced by ``***``, in
    case the driver repeated one."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return text
    secrets = [str(parsed.password)] if parsed.password else []
    for name, values in parsed.query.items():
        for value in (values,) if isinstance(values, str) else values:
            if _is_secret(name, value):
                secrets.append(value)
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 3:
            text = text.replace(secret, MASK)
    return text


#: The package that brings each database's drivers.
_EXTRAS: Final = {"postgresql": "pip install 'idemstore[postgresql]'"}


def _driver_missing(url: URL, error: ImportError) -> ConfigurationError:
    """The error for a driver module that cannot be imported (an extra not installed)."""
    backend = url.get_backend_name()
    fix = _EXTRAS.get(backend, f"install the {url.get_driver_name()} package")
    module = error.name or str(error)
    return ConfigurationError(
        f"the {url.drivername} driver cannot be imported ({module}: {error}): {fix}"
    )


def is_memory_sqlite(url: URL) -> bool:
    """Whether ``url`` is an in-memory SQLite database."""
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _uri_query(url: URL) -> dict[str, Any] | None:
    """The query of a SQLite URI URL (``?uri=true``), or None for a plain file URL."""
    uri = str(url.query.get("uri", "")).lower()
    return dict(url.query) if uri in ("1", "true", "yes", "on") else None


def read_only_url(url: URL) -> URL:
    """``url`` for reading only. A SQLite file becomes SQLite's ``mode=ro`` URI
    (``sqlite:///file:PATH?mode=ro&uri=true``): opening it never creates the file, and nothing
    can write to it. Other URLs (PostgreSQL, in-memory SQLite) are returned as they are."""
    if url.get_backend_name() != "sqlite" or is_memory_sqlite(url):
        return url
    query = _uri_query(url)
    if query is not None:
        if query.get("mode") == "memory":
            return url
        return url.set(query={**query, "mode": "ro"})
    path = quote(str(url.database), safe="/")
    return url.set(database=f"file:{path}", query={**url.query, "mode": "ro", "uri": "true"})


def is_read_only_sqlite(url: URL) -> bool:
    """Whether ``url`` opens a SQLite file read-only (``mode=ro`` in a URI URL)."""
    query = _uri_query(url)
    return url.get_backend_name() == "sqlite" and query is not None and query.get("mode") == "ro"


def sqlite_file(url: URL) -> str | None:
    """The path of the SQLite file ``url`` opens (relative to the working directory, as
    SQLite takes it), or None for an in-memory database or another backend."""
    if url.get_backend_name() != "sqlite" or is_memory_sqlite(url):
        return None
    database = str(url.database)
    query = _uri_query(url)
    if query is None or not database.startswith("file:"):
        return database
    if query.get("mode") == "memory":
        return None
    path = database[len("file:") :].split("?", 1)[0].split("#", 1)[0]
    if path.startswith("//"):  # file://host/path: SQLite takes only an empty host or localhost
        path = "/" + path[2:].partition("/")[2]
    path = unquote(path)
    return None if path in ("", ":memory:") else path


def _plain_sqlite(url: URL) -> URL | None:
    """``sqlite:///PATH`` for a URL that :func:`read_only_url` made of it, else None."""
    query = _uri_query(url)
    if query is None or set(query) != {"uri", "mode"} or query["mode"] != "ro":
        return None
    path = sqlite_file(url)
    return None if path is None else url.set(database=path, query={})


def _sqlite_options(url: URL, engine_options: dict[str, Any]) -> dict[str, Any]:
    options = dict(engine_options)
    connect_args = dict(options.pop("connect_args", {}))
    # Connections move between the caller's and the store's worker threads; idemstore never
    # uses one connection from two threads at once.
    connect_args.setdefault("check_same_thread", False)
    options["connect_args"] = connect_args
    if is_memory_sqlite(url):
        options.setdefault("poolclass", StaticPool)
    return options


def _sqlite_events(engine: sa.Engine, url: URL, synchronous: str, busy_timeout_ms: int) -> None:
    install_sqlite_listeners(
        engine,
        synchronous=synchronous,
        busy_timeout_ms=busy_timeout_ms,
        memory=is_memory_sqlite(url),
        read_only=is_read_only_sqlite(url),
    )


def _read_only_transactions(engine: sa.Engine) -> None:
    """Every transaction on ``engine``'s PostgreSQL connections is ``READ ONLY``."""
    # Imported here: only a PostgreSQL engine gets here, and it has loaded the dialect.
    from sqlalchemy.dialects.postgresql.base import PGDialect

    dialect = engine.dialect
    assert isinstance(dialect, PGDialect)
    # psycopg: ``Connection.read_only``; asyncpg: the adapter's transactions (untyped there).
    set_readonly: Callable[[Any, bool], None] = dialect.set_readonly

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        set_readonly(dbapi_connection, True)


def create_engine(
    url: str | URL | None = None,
    *,
    synchronous: str = DEFAULT_SYNCHRONOUS,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    read_only: bool = False,
    **engine_options: Any,
) -> sa.Engine:
    """A synchronous engine with idemstore's settings.

    On SQLite every connection gets WAL, ``busy_timeout``, ``foreign_keys=ON`` and
    ``synchronous`` (FULL by default, as durable as the JSON store it replaces, which fsyncs
    every write; NORMAL in WAL mode can lose the last commits on power loss, never corrupt).
    SQLAlchemy transactions begin with ``BEGIN IMMEDIATE``. On PostgreSQL every connection
    sets ``lock_timeout`` to ``busy_timeout_ms`` when it opens, so that a statement waits at
    most that long for a row lock (then :class:`~idemstore.errors.LockTimeoutError`). Other
    options go to :func:`sqlalchemy.create_engine`.

    ``read_only=True`` opens the database for reading only: a SQLite file through SQLite's
    ``mode=ro`` (a missing file is not created, the journal mode is left as it is, a write
    fails with the driver's "readonly database" error); on PostgreSQL every transaction is
    ``READ ONLY``. A SQLite URL that already says ``mode=ro&uri=true`` is read-only too.
    Raises :class:`ConfigurationError` for a URL idemstore cannot use.
    """
    resolved = sync_url(url)
    if read_only:
        resolved = read_only_url(resolved)
    try:
        if resolved.get_backend_name() == "sqlite":
            engine = sa.create_engine(resolved, **_sqlite_options(resolved, engine_options))
            _sqlite_events(engine, resolved, synchronous, busy_timeout_ms)
            return engine
        engine = sa.create_engine(resolved, **engine_options)
    except ImportError as error:
        raise _driver_missing(resolved, error) from None
    install_postgresql_listeners(engine, busy_timeout_ms=busy_timeout_ms)
    if read_only:
        _read_only_transactions(engine)
    return engine


def create_async_engine(
    url: str | URL | None = None,
    *,
    synchronous: str = DEFAULT_SYNCHRONOUS,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    read_only: bool = False,
    **engine_options: Any,
) -> AsyncEngine:
    """An asyncio engine with idemstore's settings (see :func:`create_engine`, also for
    ``read_only``)."""
    # Imported here: it brings asyncio and sqlalchemy.orm, which the sync store never needs.
    from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine

    resolved = async_url(url)
    if read_only:
        resolved = read_only_url(resolved)
    try:
        if resolved.get_backend_name() == "sqlite":
            engine = sa_create_async_engine(resolved, **_sqlite_options(resolved, engine_options))
            _sqlite_events(engine.sync_engine, resolved, synchronous, busy_timeout_ms)
            return engine
        engine = sa_create_async_engine(resolved, **engine_options)
    except ImportError as error:
        raise _driver_missing(resolved, error) from None
    install_postgresql_listeners(engine.sync_engine, busy_timeout_ms=busy_timeout_ms)
    if read_only:
        _read_only_transactions(engine.sync_engine)
    return engine


# -- SQLite connection setup ---------------------------------------------------------------


def sqlite_connect_pragmas(
    *, synchronous: str, busy_timeout_ms: int, memory: bool, read_only: bool = False
) -> list[str]:
    """The pragmas every idemstore SQLite connection runs when it opens. WAL is switched on
    for a file opened read-write only: ``read_only`` leaves the journal mode as it is."""
    level = synchronous.upper()
    if level not in SQLITE_SYNCHRONOUS:
        raise ConfigurationError(
            f"synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS)}, not {synchronous!r}"
        )
    if busy_timeout_ms < 0:
        raise ConfigurationError(f"busy_timeout_ms must be >= 0, not {busy_timeout_ms}")
    pragmas = [f"PRAGMA busy_timeout = {int(busy_timeout_ms)}", "PRAGMA foreign_keys = ON"]
    if not memory and not read_only:
        pragmas.append("PRAGMA journal_mode = WAL")
    pragmas.append(f"PRAGMA synchronous = {level}")
    return pragmas


def run_sqlite_pragma(cursor: Any, pragma: str, busy_timeout_ms: int) -> None:
    """Run ``pragma``, waiting up to ``busy_timeout_ms`` while the database is locked.

    SQLite's busy handler does not cover the switch of a fresh file to WAL: a process that
    runs ``PRAGMA journal_mode = WAL`` while another one does gets "database is locked" at
    once (4 processes opening 150 fresh files together: a few opens failed in every run,
    ``tests/test_faults_schema.py::test_processes_opening_a_fresh_sqlite_file_at_once_all_get_wal``).
    So the pragmas wait as a statement would."""
    deadline = time.monotonic() + busy_timeout_ms / 1000
    delay = 0.001
    while True:
        try:
            cursor.execute(pragma)
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def install_sqlite_listeners(
    engine: sa.Engine,
    *,
    synchronous: str,
    busy_timeout_ms: int,
    memory: bool,
    read_only: bool = False,
) -> None:
    """Make every connection of ``engine`` use idemstore's SQLite settings, and make
    SQLAlchemy transactions real ones that begin with ``BEGIN IMMEDIATE``.

    The driver's own implicit transactions are turned off (``isolation_level = None``), the
    recipe in SQLAlchemy's pysqlite/aiosqlite documentation, so that a ``Connection.begin()``
    takes the write lock up front instead of upgrading a deferred read.
    """
    pragmas = sqlite_connect_pragmas(
        synchronous=synchronous, busy_timeout_ms=busy_timeout_ms, memory=memory, read_only=read_only
    )

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for pragma in pragmas:
                run_sqlite_pragma(cursor, pragma, busy_timeout_ms)
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


# -- PostgreSQL connection setup -----------------------------------------------------------


def postgresql_lock_timeout(busy_timeout_ms: int) -> str:
    """The ``SET lock_timeout`` every PostgreSQL connection of an idemstore engine runs when it
    opens: a statement waits at most ``busy_timeout_ms`` for a lock (a row of the same key
    that another transaction holds), as SQLite's busy timeout bounds its wait for the write
    lock. 0 gives up at once as on SQLite (PostgreSQL's own 0 would mean no limit: 1 ms)."""
    if busy_timeout_ms < 0:
        raise ConfigurationError(f"busy_timeout_ms must be >= 0, not {busy_timeout_ms}")
    return f"SET lock_timeout = {max(1, int(busy_timeout_ms))}"


def install_postgresql_listeners(engine: sa.Engine, *, busy_timeout_ms: int) -> None:
    """Set ``lock_timeout`` once per connection of ``engine`` when it opens (nothing per
    operation). Works for psycopg and for the asyncpg adapter alike."""
    statement = postgresql_lock_timeout(busy_timeout_ms)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(statement)
        finally:
            cursor.close()
        dbapi_connection.commit()  # a SET in a transaction that rolls back is undone
