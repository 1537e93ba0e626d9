"""Database URL resolution and engine creation.

URL: the argument, else ``IDEMSTORE_DATABASE_URL``, else ``sqlite:///idemstore.db``. The same
URL serves the sync and the async store: the driver is swapped to the matching one
(``sqlite`` <-> ``sqlite+aiosqlite``, ``postgresql+psycopg`` <-> ``postgresql+asyncpg``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import StaticPool

from .dialects import (
    DEFAULT_BUSY_TIMEOUT_MS,
    install_postgresql_listeners,
    install_sqlite_listeners,
)
from .errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

ENV_VAR: Final = "IDEMSTORE_DATABASE_URL"
DEFAULT_URL: Final = "sqlite:///idemstore.db"
DEFAULT_SYNCHRONOUS: Final = "FULL"

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
    """The database URL: ``url``, else ``$IDEMSTORE_DATABASE_URL``, else the SQLite default."""
    raw = url if url is not None else os.environ.get(ENV_VAR) or DEFAULT_URL
    try:
        return make_url(raw)
    except ArgumentError as error:
        raise ConfigurationError(f"not a database URL: {error}") from None


def _with_driver(url: URL, drivers: dict[str, str], kind: str) -> URL:
    name = drivers.get(url.drivername)
    if name is None:
        raise ConfigurationError(
            f"no {kind} driver for {url.drivername!r}: idemstore supports sqlite, "
            "sqlite+aiosqlite, postgresql+psycopg and postgresql+asyncpg"
        )
    return url.set(drivername=name)


def sync_url(url: str | URL | None = None) -> URL:
    return _with_driver(resolve_url(url), _SYNC_DRIVERS, "synchronous")


def async_url(url: str | URL | None = None) -> URL:
    return _with_driver(resolve_url(url), _ASYNC_DRIVERS, "asyncio")


def safe_url(url: str | URL) -> str:
    """The URL as text with any password masked (for messages and logs)."""
    return make_url(url).render_as_string(hide_password=True)


def is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


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
    )


def create_engine(
    url: str | URL | None = None,
    *,
    synchronous: str = DEFAULT_SYNCHRONOUS,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
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
    """
    resolved = sync_url(url)
    if resolved.get_backend_name() == "sqlite":
        engine = sa.create_engine(resolved, **_sqlite_options(resolved, engine_options))
        _sqlite_events(engine, resolved, synchronous, busy_timeout_ms)
        return engine
    engine = sa.create_engine(resolved, **engine_options)
    install_postgresql_listeners(engine, busy_timeout_ms=busy_timeout_ms)
    return engine


def create_async_engine(
    url: str | URL | None = None,
    *,
    synchronous: str = DEFAULT_SYNCHRONOUS,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    **engine_options: Any,
) -> AsyncEngine:
    """An asyncio engine with idemstore's settings (see :func:`create_engine`)."""
    # Imported here: it brings asyncio and sqlalchemy.orm, which the sync store never needs.
    from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine

    resolved = async_url(url)
    if resolved.get_backend_name() == "sqlite":
        engine = sa_create_async_engine(resolved, **_sqlite_options(resolved, engine_options))
        _sqlite_events(engine.sync_engine, resolved, synchronous, busy_timeout_ms)
        return engine
    engine = sa_create_async_engine(resolved, **engine_options)
    install_postgresql_listeners(engine.sync_engine, busy_timeout_ms=busy_timeout_ms)
    return engine
