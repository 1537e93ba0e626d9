"""The asyncio store: :class:`AsyncIdempotencyStore`.

It runs the very functions the sync store runs (:mod:`idemstore.db.ops` through
:mod:`idemstore.db.runner`), one hop per operation (:mod:`idemstore.db.offload`):

- SQLite (``offload="thread"``, the default there): the whole operation runs on a worker
  thread with the stdlib driver. aiosqlite pays a thread hop per driver call (begin, execute,
  fetch, commit: four or more per reservation); this pays one.
- PostgreSQL (``offload="greenlet"``): the operation runs on the AsyncEngine's own connection
  through SQLAlchemy's greenlet bridge (the mechanism behind ``AsyncConnection.run_sync``), as
  a task of its own that a cancelled caller does not interrupt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from .db import ops
from .db.engine import create_async_engine, create_engine, is_memory_sqlite
from .db.migrate import SchemaGate, migrate_engine
from .db.offload import GreenletTasks, WorkerThreads, closed_error
from .db.runner import run_in_caller
from .defaults import DEFAULT_BUSY_TIMEOUT_MS, DEFAULT_SYNCHRONOUS
from .errors import ConfigurationError
from .model import IdempotencyRecord, Outcome, Reservation, Stats, TenantContext
from .once import AsyncWork, run_once_async
from .rules import DEFAULT_PURGE_BATCH, Duration

T = TypeVar("T")
AsyncConnectionLike = AsyncConnection | AsyncSession
Offload = Literal["auto", "thread", "greenlet"]

#: Worker threads of the SQLite offload (writers serialise on the lock anyway; readers don't).
DEFAULT_SQLITE_WORKERS = 4


class AsyncIdempotencyStore:
    """Idempotency keys in a SQL database, for asyncio.

    Same methods as :class:`~idemstore.IdempotencyStore`, as coroutines. ``connection=`` takes
    an ``AsyncConnection`` or ``AsyncSession`` and runs inside the caller's transaction.

    Cancellation: a call in the store's own transaction that is cancelled (a timeout, a client
    gone) raises ``CancelledError`` at once, but its operation is not cut in the middle: it
    commits or rolls back, and its connection goes back to the pool clean (or it had not
    started and never runs). So a cancelled call committed or left nothing; only a returned
    result is an acknowledgement. With ``connection=`` the transaction is the caller's: a
    cancellation in the middle of a statement invalidates that connection, as SQLAlchemy does,
    and the caller must roll back.

    Lost connections: as :class:`~idemstore.IdempotencyStore` (a dead connection is discarded;
    an operation that cannot have committed runs again on another; otherwise
    :class:`~idemstore.ConnectionLostError`).

    The errors of every operation: :class:`~idemstore.StoreClosedError`,
    :class:`~idemstore.SchemaNotReadyError`, :class:`~idemstore.LockTimeoutError`,
    :class:`~idemstore.ConnectionLostError`, as the sync store's.
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
        connect_args: Mapping[str, Any] | None = None,
        group_commit: bool = False,
    ) -> None:
        """Use ``engine``. On SQLite, ``offload="thread"`` (the default) runs operations on a
        stdlib-driver engine of the same file with ``synchronous``/``busy_timeout_ms`` and
        ``connect_args`` (for :func:`sqlite3.connect`); ``"greenlet"`` runs them on ``engine``
        itself. On PostgreSQL the lock timeout is the engine's (``lock_timeout``: set by
        :func:`idemstore.create_async_engine`, not by an engine built otherwise; see
        :class:`~idemstore.IdempotencyStore`).

        ``group_commit=True`` (SQLite): writes that queue while the writer is busy share the
        next transaction, each in a savepoint of its own, and one COMMIT (one fsync) makes
        them all durable; each call keeps its own answer and atomicity and is acknowledged
        only after its group committed (if that COMMIT fails, every call of the group gets
        the error). A lone write runs as without it; at most
        :data:`~idemstore.db.offload.MAX_GROUP` share one transaction. Calls with
        ``connection=`` run in the caller's transaction and are never grouped. On PostgreSQL
        it changes nothing: the server already commits concurrent sessions together (measured:
        README, Performance); on an in-memory SQLite database there is no fsync to share.

        Raises :class:`~idemstore.ConfigurationError` for an offload the engine cannot use
        (also ``group_commit=True`` with ``offload="greenlet"`` on SQLite)."""
        self._engine = engine
        self._busy_timeout_ms: int | None = busy_timeout_ms
        self._dispose_engine = dispose_engine
        self._gate = SchemaGate()
        self._migrate_on_open = False
        self._migrating = asyncio.Lock()
        self._closed = False
        is_sqlite = engine.dialect.name == "sqlite"
        if offload == "auto":
            offload = "thread" if is_sqlite else "greenlet"
        if offload == "thread" and not is_sqlite:
            raise ConfigurationError("offload='thread' is for SQLite; PostgreSQL uses 'greenlet'")
        if offload not in ("thread", "greenlet"):
            raise ConfigurationError(f"offload must be auto, thread or greenlet, not {offload!r}")
        if group_commit and is_sqlite and offload != "thread":
            raise ConfigurationError(
                "group_commit=True runs on the SQLite worker threads: use offload='thread' "
                "(the default), or leave group_commit off"
            )
        self.offload: Literal["thread", "greenlet"] = offload
        self._sync_engine: sa.Engine
        self._offload: WorkerThreads | GreenletTasks
        if offload == "thread":
            self._sync_engine = create_engine(
                engine.url,
                synchronous=synchronous,
                busy_timeout_ms=busy_timeout_ms,
                connect_args=dict(connect_args or {}),
            )
            memory = is_memory_sqlite(engine.url)
            self._offload = WorkerThreads(
                self._sync_engine,
                1 if memory else max_workers,
                writer=not memory,
                group_commit=group_commit and not memory,
            )
        else:
            self._sync_engine = engine.sync_engine
            self._offload = GreenletTasks(self._sync_engine)
            if not is_sqlite:  # the engine's lock_timeout is not known (from_url knows it)
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
        group_commit: bool = False,
        **engine_options: Any,
    ) -> AsyncIdempotencyStore:
        """Open the store at ``url`` (see :meth:`IdempotencyStore.from_url`); with
        ``migrate=True`` the schema is upgraded before the first operation; ``group_commit``:
        see the constructor (SQLite: queued writes share one COMMIT). ``engine_options``
        go to :func:`idemstore.create_async_engine`; their ``connect_args`` also to the SQLite
        worker threads' connections."""
        engine = create_async_engine(
            url, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms, **engine_options
        )
        store = cls(
            engine,
            offload=offload,
            synchronous=synchronous,
            busy_timeout_ms=busy_timeout_ms,
            dispose_engine=True,
            connect_args=engine_options.get("connect_args"),
            group_commit=group_commit,
        )
        store._migrate_on_open = migrate
        store._busy_timeout_ms = busy_timeout_ms
        return store

    @property
    def engine(self) -> AsyncEngine:
        """The SQLAlchemy async engine the store was given (or created)."""
        return self._engine

    @property
    def group_commit(self) -> bool:
        """Whether writes share transactions (group commit is on, and does something here)."""
        return isinstance(self._offload, WorkerThreads) and self._offload.group_commit

    def _check_open(self) -> None:
        if self._closed:
            raise closed_error()

    # -- lifecycle ------------------------------------------------------------------------

    async def migrate(self) -> None:
        """Upgrade the database to the schema this version needs (``alembic upgrade head``).
        Calls at once on one store run one after the other.

        Raises :class:`~idemstore.StoreClosedError` after :meth:`close`."""
        self._check_open()
        async with self._migrating:
            await self._offload.run(migrate_engine, self._sync_engine)
        self._gate.mark_ready()

    async def check_schema(self) -> None:
        """Raise :class:`SchemaNotReadyError` unless the database is at idemstore's head
        (:class:`~idemstore.StoreClosedError` after :meth:`close`)."""
        self._check_open()
        if self._gate.ready:
            return
        if self._migrate_on_open:
            # The first calls of a store opened with migrate=True all get here: one migrates.
            # (Alembic's context is process-global: two upgrades interleaved on the greenlet
            # bridge ran each other's statements, and deadlocked.)
            async with self._migrating:
                if not self._gate.ready:
                    await self._offload.run(migrate_engine, self._sync_engine)
                    self._gate.mark_ready()
            return
        await self._offload.run(self._gate.check, self._sync_engine, self._busy_timeout_ms)

    async def close(self) -> None:
        """Close the store: later calls raise :class:`~idemstore.StoreClosedError`. Waits for
        the operations already under way (each commits or rolls back) without blocking the
        event loop, stops the worker threads and disposes the engines this store created.
        Closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        await self._offload.aclose()
        if self._dispose_engine:
            await self._engine.dispose()

    async def __aenter__(self) -> AsyncIdempotencyStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def run(self, call: ops.Call[T], *, connection: AsyncConnectionLike | None = None) -> T:
        """Run one prepared operation from :mod:`idemstore.db.ops`.

        Raises :class:`~idemstore.StoreClosedError` after :meth:`close`,
        :class:`~idemstore.LockTimeoutError` when a lock could not be had in time, and
        :class:`~idemstore.ConnectionLostError` when the connection was lost and the operation
        could not safely run again (see the class docstring)."""
        self._check_open()
        await self.check_schema()
        if connection is None:
            return await self._offload.run_call(call, self._busy_timeout_ms)
        if isinstance(connection, AsyncConnection | AsyncSession):
            # Both hand run_in_caller their sync Connection / Session.
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
        lease: Duration | None = None,
        ttl: Duration | None = None,
        connection: AsyncConnectionLike | None = None,
    ) -> Reservation:
        """Reserve ``key`` for one request (:meth:`IdempotencyStore.reserve`).

        Parameters: ``tenant``, ``operation``, ``key``, ``owner``, ``request_fingerprint``,
        ``first_seen_event_id``, ``expires_at_ms`` or ``ttl``, ``lease``, ``now_ms``,
        ``connection`` (an ``AsyncConnection`` or ``AsyncSession``), as the sync store's.

        Returns :class:`~idemstore.Reserved` ``(record, token)``,
        :class:`~idemstore.Duplicate` or :class:`~idemstore.Conflict`.

        Raises :class:`~idemstore.InvalidInputError` (bad arguments; nothing written), and the
        errors of every operation (class docstring)."""
        call = ops.reserve(
            tenant,
            operation,
            key,
            owner,
            request_fingerprint,
            first_seen_event_id=first_seen_event_id,
            expires_at_ms=expires_at_ms,
            now_ms=now_ms,
            lease=lease,
            ttl=ttl,
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
        token: str | None = None,
        connection: AsyncConnectionLike | None = None,
    ) -> IdempotencyRecord | None:
        """Store ``outcome`` on the record (:meth:`IdempotencyStore.complete`); with
        ``token``, only while that reservation still holds the key.

        Parameters: ``tenant``, ``operation``, ``key``, ``outcome``, ``now_ms``, ``token``,
        ``connection``.

        Returns the completed record, or None when this tenant has no such record (without
        ``token``).

        Raises :class:`~idemstore.LeaseLostError` (``token`` no longer holds the key; nothing
        written), :class:`~idemstore.InvalidInputError`, and the errors of every operation
        (class docstring)."""
        call = ops.complete(tenant, operation, key, outcome, now_ms=now_ms, token=token)
        return await self.run(call, connection=connection)

    async def get(
        self,
        tenant: TenantContext,
        operation: str,
        key: str,
        *,
        connection: AsyncConnectionLike | None = None,
    ) -> IdempotencyRecord | None:
        """The record of ``tenant``, ``operation`` and ``key`` (``connection``: in the
        caller's transaction).

        Returns the :class:`~idemstore.IdempotencyRecord`, or None (also for a blank
        operation or key).

        Raises :class:`~idemstore.InvalidInputError`, and the errors of every operation (class
        docstring)."""
        return await self.run(ops.get(tenant, operation, key), connection=connection)

    async def release(
        self,
        tenant: TenantContext,
        operation: str,
        key: str,
        request_fingerprint: str,
        *,
        token: str | None = None,
        connection: AsyncConnectionLike | None = None,
    ) -> bool:
        """Delete a record still ``reserved`` with ``request_fingerprint``
        (:meth:`IdempotencyStore.release`); with ``token``, only while that reservation still
        holds the key without an outcome, ``reserved`` or ``conflicted``.

        Parameters: ``tenant``, ``operation``, ``key``, ``request_fingerprint``, ``token``,
        ``connection``.

        Returns whether a record was deleted.

        Raises :class:`~idemstore.InvalidInputError`, and the errors of every operation (class
        docstring)."""
        call = ops.release(tenant, operation, key, request_fingerprint, token=token)
        return await self.run(call, connection=connection)

    async def renew(
        self,
        tenant: TenantContext,
        operation: str,
        key: str,
        token: str,
        *,
        lease: Duration,
        now_ms: int | None = None,
        connection: AsyncConnectionLike | None = None,
    ) -> int:
        """Extend the lease of the reservation ``token`` names to ``now + lease``
        (:meth:`IdempotencyStore.renew`).

        Parameters: ``tenant``, ``operation``, ``key``, ``token``, ``lease`` (``timedelta`` or
        int ms), ``now_ms``, ``connection``.

        Returns the new ``lease_expires_at_ms``.

        Raises :class:`~idemstore.LeaseLostError` (the token no longer holds the key, or it
        has an outcome; nothing written), :class:`~idemstore.InvalidInputError`, and the
        errors of every operation (class docstring)."""
        call = ops.renew(tenant, operation, key, token, lease=lease, now_ms=now_ms)
        return await self.run(call, connection=connection)

    async def run_once(
        self,
        tenant: TenantContext,
        operation: str,
        key: str,
        work: AsyncWork,
        *,
        owner: str,
        request_fingerprint: str,
        lease: Duration | None = None,
        ttl: Duration | None = None,
        wait: Duration | None = None,
        first_seen_event_id: str | None = None,
    ) -> Outcome:
        """Run ``work`` once for this key, whichever caller gets there first
        (:mod:`idemstore.once`). ``work`` is a callable returning an
        :class:`~idemstore.Outcome` or an awaitable of one (a plain function runs on the
        event loop).

        As :meth:`IdempotencyStore.run_once`, with the lease renewed from a task. Cancelled
        while ``work`` runs, the reservation is released with its token (the release runs to
        its end); cancelled while reserving, a reservation that committed is left to its
        lease end.

        Returns the key's one outcome. Raises :class:`~idemstore.InProgressError`,
        :class:`~idemstore.ConflictError`, :class:`~idemstore.LeaseLostError`,
        :class:`~idemstore.InvalidInputError` and ``work``'s own errors, as the sync store."""
        return await run_once_async(
            self,
            tenant,
            operation,
            key,
            work,
            owner=owner,
            request_fingerprint=request_fingerprint,
            lease=lease,
            ttl=ttl,
            wait=wait,
            first_seen_event_id=first_seen_event_id,
        )

    async def purge_expired(
        self,
        *,
        now_ms: int | None = None,
        batch_size: int = DEFAULT_PURGE_BATCH,
        connection: AsyncConnectionLike | None = None,
    ) -> int:
        """Delete the records whose ``expires_at_ms <= now``, ``batch_size`` per
        transaction (``now_ms``: default the clock; ``connection``: all in the caller's
        transaction).

        Returns how many records were deleted.

        Raises :class:`~idemstore.InvalidInputError`, and the errors of every operation (class
        docstring)."""
        call = ops.purge_expired(now_ms=now_ms, batch_size=batch_size)
        return await self.run(call, connection=connection)

    async def stats(self, *, connection: AsyncConnectionLike | None = None) -> Stats:
        """Record counts by operation and status (``connection``: in the caller's
        transaction).

        Returns :class:`~idemstore.Stats`.

        Raises the errors of every operation (class docstring)."""
        return await self.run(ops.stats(), connection=connection)
