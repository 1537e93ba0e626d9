"""The asyncio store: :class:`AsyncIdempotencyStore`.

It runs the very functions the sync store runs (:mod:`idemstore.ops` through
:mod:`idemstore._runner`), one hop per operation:

- SQLite (``offload="thread"``, the default there): the whole operation runs on a worker
  thread with the stdlib driver. aiosqlite pays a thread hop per driver call (begin, execute,
  fetch, commit: four or more per reservation); this pays one.
- PostgreSQL (``offload="greenlet"``): the operation runs on the AsyncEngine's own connection
  through SQLAlchemy's greenlet bridge (the mechanism behind ``AsyncConnection.run_sync``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.util import greenlet_spawn

from . import ops
from ._runner import SchemaGate, run_in_caller, run_owned
from .config import DEFAULT_SYNCHRONOUS, create_async_engine, create_engine
from .dialects import DEFAULT_BUSY_TIMEOUT_MS
from .errors import ConfigurationError
from .model import IdempotencyRecord, Outcome, Reservation, TenantContext
from .store import migrate_engine

T = TypeVar("T")
AsyncConnectionLike = AsyncConnection | AsyncSession
Offload = Literal["auto", "thread", "greenlet"]

#: Worker threads of the SQLite offload (writers serialise on the lock anyway; readers don't).
DEFAULT_SQLITE_WORKERS = 4


class AsyncIdempotencyStore:
    """Idempotency keys in a SQL database, for asyncio.

    Same methods as :class:`~idemstore.IdempotencyStore`, as coroutines. ``connection=`` takes
    an ``AsyncConnection`` or ``AsyncSession`` and runs inside the caller's transaction.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        offload: Offload = "auto",
        synchronous: str = DEFAULT_SYNCHRONOUS,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        dispose_engine: bool = False,
        max_workers: int = DEFAULT_SQLITE_WORKERS,
    ) -> None:
        """Use ``engine``. On SQLite, ``offload="thread"`` (the default) runs operations on a
        stdlib-driver engine of the same file with ``synchronous``/``busy_timeout_ms``;
        ``"greenlet"`` runs them on ``engine`` itself."""
        self._engine = engine
        self._busy_timeout_ms: int | None = busy_timeout_ms
        self._dispose_engine = dispose_engine
        self._gate = SchemaGate()
        self._migrate_on_open = False
        is_sqlite = engine.dialect.name == "sqlite"
        if offload == "auto":
            offload = "thread" if is_sqlite else "greenlet"
        if offload == "thread" and not is_sqlite:
            raise ConfigurationError("offload='thread' is for SQLite; PostgreSQL uses 'greenlet'")
        if offload not in ("thread", "greenlet"):
            raise ConfigurationError(f"offload must be auto, thread or greenlet, not {offload!r}")
        self.offload: Literal["thread", "greenlet"] = offload
        self._executor: ThreadPoolExecutor | None = None
        self._sync_engine: sa.Engine
        if offload == "thread":
            self._sync_engine = create_engine(
                engine.url, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms
            )
            self._executor = ThreadPoolExecutor(
                max_workers=1 if engine.url.database in (None, "", ":memory:") else max_workers,
                thread_name_prefix="idemstore",
            )
        else:
            self._sync_engine = engine.sync_engine
            if not is_sqlite:
                self._busy_timeout_ms = None

    @classmethod
    def from_url(
        cls,
        url: str | URL | None = None,
        *,
        migrate: bool = False,
        synchronous: str = DEFAULT_SYNCHRONOUS,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        offload: Offload = "auto",
        **engine_options: Any,
    ) -> AsyncIdempotencyStore:
        """Open the store at ``url`` (see :meth:`IdempotencyStore.from_url`); with
        ``migrate=True`` the schema is upgraded before the first operation."""
        engine = create_async_engine(
            url, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms, **engine_options
        )
        store = cls(
            engine,
            offload=offload,
            synchronous=synchronous,
            busy_timeout_ms=busy_timeout_ms,
            dispose_engine=True,
        )
        store._migrate_on_open = migrate
        return store

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def _hop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the synchronous ``fn(*args)`` in one hop: a worker thread or the greenlet."""
        if self._executor is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args))
        return await greenlet_spawn(fn, *args)

    # -- lifecycle ------------------------------------------------------------------------

    async def migrate(self) -> None:
        """Upgrade the database to the schema this version needs (``alembic upgrade head``)."""
        await self._hop(migrate_engine, self._sync_engine)
        self._gate.mark_ready()

    async def check_schema(self) -> None:
        """Raise :class:`SchemaNotReadyError` unless the database is at idemstore's head."""
        if self._gate.ready:
            return
        if self._migrate_on_open:
            await self.migrate()
            return
        await self._hop(self._gate.check, self._sync_engine, self._busy_timeout_ms)

    async def close(self) -> None:
        """Stop the worker threads; dispose the engines this store created."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._sync_engine.dispose()
        if self._dispose_engine:
            await self._engine.dispose()

    async def __aenter__(self) -> AsyncIdempotencyStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def run(self, call: ops.Call[T], *, connection: AsyncConnectionLike | None = None) -> T:
        """Run one prepared operation from :mod:`idemstore.ops`."""
        await self.check_schema()
        if connection is None:
            return await self._hop(run_owned, self._sync_engine, call, self._busy_timeout_ms)
        if isinstance(connection, AsyncSession):
            return await connection.run_sync(run_in_caller, call, self._busy_timeout_ms)
        if isinstance(connection, AsyncConnection):
            return await connection.run_sync(run_in_caller, call, self._busy_timeout_ms)
        raise TypeError(
            "connection must be a sqlalchemy AsyncConnection or AsyncSession "
            f"(Connection / Session for the sync store), not {type(connection).__name__}"
        )

    # -- operations -----------------------------------------------------------------------

    async def reserve(
        self,
        tenant: TenantContext,
        operation: str,
        key: str,
        owner: str,
        request_fingerprint: str,
        *,
        first_seen_event_id: str | None = None,
        expires_at_ms: int | None = None,
        now_ms: int | None = None,
        connection: AsyncConnectionLike | None = None,
    ) -> Reservation:
        """Reserve ``key``: :class:`Reserved`, :class:`Duplicate` or :class:`Conflict`."""
        call = ops.reserve(
            tenant,
            operation,
            key,
            owner,
            request_fingerprint,
            first_seen_event_id=first_seen_event_id,
            expires_at_ms=expires_at_ms,
            now_ms=now_ms,
        )
        return await self.run(call, connection=connection)

    async def complete(
        self,
        tenant: TenantContext,
        operation: str,
        key: str,
        outcome: Outcome,
        *,
        now_ms: int | None = None,
        connection: AsyncConnectionLike | None = None,
    ) -> IdempotencyRecord | None:
        """Record the outcome; None when this tenant has no such record."""
        call = ops.complete(tenant, operation, key, outcome, now_ms=now_ms)
        return await self.run(call, connection=connection)

    async def get(
        self,
        tenant: TenantContext,
        operation: str,
        key: str,
        *,
        connection: AsyncConnectionLike | None = None,
    ) -> IdempotencyRecord | None:
        """The record, or None (also for a blank operation or key)."""
        return await self.run(ops.get(tenant, operation, key), connection=connection)

    async def release(
        self,
        tenant: TenantContext,
        operation: str,
        key: str,
        request_fingerprint: str,
        *,
        connection: AsyncConnectionLike | None = None,
    ) -> bool:
        """Delete a still-``reserved`` record whose fingerprint matches; whether it did."""
        call = ops.release(tenant, operation, key, request_fingerprint)
        return await self.run(call, connection=connection)

    async def purge_expired(
        self,
        *,
        now_ms: int | None = None,
        batch_size: int = ops.DEFAULT_PURGE_BATCH,
        connection: AsyncConnectionLike | None = None,
    ) -> int:
        """Delete records with ``expires_at_ms <= now`` in batches; how many."""
        call = ops.purge_expired(now_ms=now_ms, batch_size=batch_size)
        return await self.run(call, connection=connection)

    async def stats(self, *, connection: AsyncConnectionLike | None = None) -> ops.Stats:
        """Record counts by operation and status."""
        return await self.run(ops.stats(), connection=connection)
