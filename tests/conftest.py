"""One behaviour suite over every backend.

``store`` is parametrized over SQLite sync, SQLite async (aiosqlite URL, worker-thread
offload), PostgreSQL sync (psycopg) and PostgreSQL async (asyncpg). The async store is driven
through :class:`SyncFacade`, so one test body covers both. PostgreSQL runs where
``IDEMSTORE_TEST_POSTGRES_URL`` is set (each test gets a fresh schema) and is skipped otherwise,
unless ``IDEMSTORE_REQUIRE_POSTGRES=1``, which turns the skip into a failure.

After each test every pool must have all its connections checked in.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from idemstore import AsyncIdempotencyStore, IdempotencyStore, create_async_engine, create_engine

POSTGRES_ENV = "IDEMSTORE_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_ENV = "IDEMSTORE_REQUIRE_POSTGRES"

ENGINES = ("sqlite", "postgresql")
BACKENDS = ("sqlite-sync", "sqlite-async", "postgresql-sync", "postgresql-async")


def postgres_url_or_skip() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if url:
        return url
    reason = f"PostgreSQL tests need {POSTGRES_ENV} (e.g. postgresql://postgres@127.0.0.1/test)"
    if os.environ.get(REQUIRE_POSTGRES_ENV) == "1":
        pytest.fail(f"{REQUIRE_POSTGRES_ENV}=1 but {reason}")
    pytest.skip(reason)


@dataclass
class Database:
    """A fresh, empty database (a SQLite file, or a PostgreSQL schema) for one test."""

    engine_name: str
    url: str
    schema: str | None = None
    engines: list[Any] = field(default_factory=list)

    def sync_options(self) -> dict[str, Any]:
        if self.schema is None:
            return {}
        return {"connect_args": {"options": f"-csearch_path={self.schema}"}}

    def async_options(self) -> dict[str, Any]:
        if self.schema is None:
            return {}
        return {"connect_args": {"server_settings": {"search_path": self.schema}}}

    def sync_engine(self, **options: Any) -> sa.Engine:
        engine = create_engine(self.url, **{**self.sync_options(), **options})
        self.engines.append(engine)
        return engine

    def async_engine(self, **options: Any) -> Any:
        engine = create_async_engine(self.url, **{**self.async_options(), **options})
        self.engines.append(engine.sync_engine)
        return engine

    def sync_store(self, *, migrate: bool = True, **options: Any) -> IdempotencyStore:
        store = IdempotencyStore.from_url(
            self.url, migrate=migrate, **{**self.sync_options(), **options}
        )
        self.engines.append(store.engine)
        return store

    def async_store(self, **options: Any) -> AsyncIdempotencyStore:
        store = AsyncIdempotencyStore.from_url(self.url, **{**self.async_options(), **options})
        self.engines.append(store.engine.sync_engine)
        self.engines.append(store._sync_engine)
        return store

    def assert_no_leaked_connections(self) -> None:
        for engine in self.engines:
            pool = engine.pool
            checkedout = pool.checkedout() if hasattr(pool, "checkedout") else 0
            assert checkedout == 0, f"{checkedout} connection(s) still checked out of {engine.url}"


def _sqlite_database(tmp_path: Path) -> Database:
    return Database("sqlite", f"sqlite:///{tmp_path / 'idemstore.db'}")


@pytest.fixture
def make_database(tmp_path: Path) -> Iterator[Callable[[str], Database]]:
    """Factory: ``make_database("sqlite" | "postgresql")`` -> a fresh :class:`Database`."""
    created: list[Database] = []
    admin_engines: list[sa.Engine] = []

    def make(engine_name: str) -> Database:
        if engine_name == "sqlite":
            db = _sqlite_database(tmp_path / f"db{len(created)}")
            (tmp_path / f"db{len(created)}").mkdir()
        else:
            url = postgres_url_or_skip()
            schema = f"t_{uuid.uuid4().hex[:16]}"
            admin = create_engine(url, poolclass=sa.pool.NullPool)
            admin_engines.append(admin)
            with admin.begin() as conn:
                conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
            db = Database("postgresql", url, schema)
        created.append(db)
        return db

    yield make
    for db in created:
        db.assert_no_leaked_connections()
        for engine in db.engines:
            engine.dispose()
    for db, admin in zip([d for d in created if d.schema], admin_engines, strict=True):
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{db.schema}" CASCADE')
        admin.dispose()


@pytest.fixture(params=ENGINES)
def database(request: pytest.FixtureRequest, make_database: Callable[[str], Database]) -> Database:
    """A fresh database on each engine."""
    return make_database(request.param)


class SyncFacade:
    """Drives an :class:`AsyncIdempotencyStore` from synchronous test code, on one loop."""

    def __init__(self, store: AsyncIdempotencyStore, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.store, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            return self.loop.run_until_complete(attribute(*args, **kwargs))

        return call


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(backend: str, make_database: Callable[[str], Database]) -> Iterator[Any]:
    """A migrated store on ``backend``, with the sync store's interface."""
    engine_name, flavour = backend.split("-")
    db = make_database(engine_name)
    if flavour == "sync":
        sync_store = db.sync_store()
        yield sync_store
        sync_store.close()
        return
    loop = asyncio.new_event_loop()
    async_store = db.async_store()
    loop.run_until_complete(async_store.migrate())
    yield SyncFacade(async_store, loop)
    loop.run_until_complete(async_store.close())
    loop.close()
