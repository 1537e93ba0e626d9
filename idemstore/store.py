"""The synchronous store: :class:`IdempotencyStore`, one line per operation into
:mod:`idemstore.db.ops`, run by :mod:`idemstore.db.runner`."""

from __future__ import annotations

import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import URL

from .db import ops
from .db.engine import create_engine
from .db.migrate import SchemaGate, migrate_engine
from .db.runner import connection_source, run_in_caller, run_owned
from .defaults import DEFAULT_BUSY_TIMEOUT_MS, DEFAULT_SYNCHRONOUS
from .errors import ConfigurationError, StoreClosedError
from .model import IdempotencyRecord, Outcome, Reservation, Stats, TenantContext
from .once import Work, run_once
from .rules import DEFAULT_PURGE_BATCH, Duration

if TYPE_CHECKING:
    from .db.runner import SyncConnectionLike

T = TypeVar("T")


class IdempotencyStore:
    """Idempotency keys in a SQL database, synchronously.

    Every method runs in one transaction of its own, or, given ``connection=`` (a SQLAlchemy
    ``Connection`` or ``Session``), inside the caller's transaction, so that a key and the
    caller's own writes commit or roll back together.

    Lost connections: a dead connection is discarded, never given back to the pool. An
    operation in the store's own transaction whose connection was lost before ``COMMIT`` was
    sent cannot have committed, so it runs again on another connection; lost during
    ``COMMIT`` it raises :class:`~idemstore.ConnectionLostError` with
    ``may_have_committed=True``. Inside the caller's transaction a lost connection raises
    :class:`~idemstore.ConnectionLostError` (``may_have_committed=False``: the transaction is
    gone; roll back and run it again). An interrupt (``KeyboardInterrupt``) in the middle of an
    operation discards its connection too.

    The errors of every operation: :class:`~idemstore.StoreClosedError` (after
    :meth:`close`), :class:`~idemstore.SchemaNotReadyError` (the database is not migrated to
    this version's schema: :meth:`migrate`), :class:`~idemstore.LockTimeoutError` (a lock not
    had within ``busy_timeout_ms``), :class:`~idemstore.ConnectionLostError` (above).
    """

    def __init__(
        self,
        engine: sa.Engine,
        *,
        busy_timeout_ms: int | None = None,
        dispose_engine: bool = False,
    ) -> None:
        """Use ``engine``. Build it with :func:`idemstore.create_engine` for idemstore's
        settings: SQLite's pragmas and ``BEGIN IMMEDIATE``, PostgreSQL's ``lock_timeout``. An
        engine built otherwise keeps its own: on PostgreSQL without a ``lock_timeout`` (e.g.
        ``connect_args={"options": "-c lock_timeout=5000"}``) a reserve waits for another
        session's row lock for as long as that session holds it. ``busy_timeout_ms`` only feeds
        error messages; ``dispose_engine`` makes :meth:`close` dispose it."""
        self._engine = engine
        self._busy_timeout_ms = busy_timeout_ms
        self._dispose_engine = dispose_engine
        self._gate = SchemaGate()
        self._closed = False
        self._source = connection_source(engine)
        # A store dropped without close() still gives its idle connections back to the pool.
        weakref.finalize(self, self._source.close)

    @classmethod
    def from_url(
        cls,
        url: str | URL | None = None,
        *,
        migrate: bool = False,
        synchronous: str = DEFAULT_SYNCHRONOUS,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        read_only: bool = False,
        **engine_options: Any,
    ) -> IdempotencyStore:
        """Open the store at ``url`` (else ``$IDEMSTORE_DATABASE_URL``, else
        ``sqlite:///idemstore.db``). ``migrate=True`` upgrades the schema to head first;
        ``synchronous`` is SQLite's durability setting (FULL, NORMAL, OFF, EXTRA);
        ``read_only=True`` opens the database for reading only (see
        :func:`idemstore.create_engine`): no file is created, nothing is written.
        ``busy_timeout_ms`` bounds a wait for a lock: SQLite's busy timeout on the write lock,
        PostgreSQL's ``lock_timeout`` on a row lock (0 gives up at once on both); then
        :class:`~idemstore.LockTimeoutError`. ``engine_options`` go to
        :func:`idemstore.create_engine`.

        Raises :class:`~idemstore.ConfigurationError` for a URL or option that cannot be
        used."""
        if migrate and read_only:
            raise ConfigurationError("migrate=True writes the schema: open without read_only")
        engine = create_engine(
            url,
            synchronous=synchronous,
            busy_timeout_ms=busy_timeout_ms,
            read_only=read_only,
            **engine_options,
        )
        store = cls(engine, busy_timeout_ms=busy_timeout_ms, dispose_engine=True)
        if migrate:
            try:
                store.migrate()
            except BaseException:
                store.close()
                raise
        return store

    @property
    def engine(self) -> sa.Engine:
        """The SQLAlchemy engine the store runs on."""
        return self._engine

    # -- lifecycle ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the store is closed: open a new one (close() was called)")

    def migrate(self) -> None:
        """Upgrade the database to the schema this version needs (``alembic upgrade head``).

        Raises :class:`~idemstore.StoreClosedError` after :meth:`close`."""
        self._check_open()
        migrate_engine(self._engine)
        self._gate.mark_ready()

    def check_schema(self) -> None:
        """Raise :class:`SchemaNotReadyError` unless the database is at idemstore's head
        (:class:`~idemstore.StoreClosedError` after :meth:`close`)."""
        self._check_open()
        self._gate.check(self._engine, self._busy_timeout_ms)

    def close(self) -> None:
        """Close the store: later calls raise :class:`~idemstore.StoreClosedError`. Disposes
        the engine if this store created it. Closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        self._source.close()
        if self._dispose_engine:
            self._engine.dispose()

    def __enter__(self) -> IdempotencyStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def run(self, call: ops.Call[T], *, connection: SyncConnectionLike | None = None) -> T:
        """Run one prepared operation from :mod:`idemstore.db.ops`.

        Raises :class:`~idemstore.StoreClosedError` after :meth:`close`,
        :class:`~idemstore.LockTimeoutError` when a lock could not be had in time, and
        :class:`~idemstore.ConnectionLostError` when the connection was lost and the operation
        could not safely run again (see the class docstring)."""
        self.check_schema()
        if connection is not None:
            return run_in_caller(connection, call, self._busy_timeout_ms)
        return run_owned(self._engine, call, self._busy_timeout_ms, self._source)

    # -- operations -----------------------------------------------------------------------

    def reserve(
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
        connection: SyncConnectionLike | None = None,
    ) -> Reservation:
        """Reserve ``key`` for one request: the Rust store's ``reserve``, one upsert.

        Parameters: ``tenant`` (org, workspace and deployment name the record; actor and
        source are stored), ``operation`` and ``key`` (trimmed as Rust trims, not empty),
        ``owner`` (who holds it), ``request_fingerprint`` (what the request was, e.g.
        :func:`~idemstore.idempotency_fingerprint`), ``first_seen_event_id``,
        ``expires_at_ms`` (ms since the epoch; from then on the key is reserved afresh) or
        ``ttl`` (``timedelta`` or int ms: ``expires_at_ms = now + ttl``), ``lease``
        (``timedelta`` or int ms: the holder has the key until ``now + lease``; after that
        the same request re-claims it while it has no outcome, conflicted or not),
        ``now_ms`` (default: :func:`~idemstore.now_ms`),
        ``connection`` (run in the caller's transaction).

        Returns :class:`~idemstore.Reserved` ``(record, token)`` (this call holds the key: do
        the work, then ``complete(..., token=token)``), :class:`~idemstore.Duplicate` (the
        same request before: replay ``record.outcome``, or it is still in progress until
        ``record.in_progress_until_ms``) or :class:`~idemstore.Conflict` (the key belongs to
        another request). See the README's table for what to do with each.

        Raises :class:`~idemstore.InvalidInputError` (a blank key, operation, owner or
        fingerprint, a value out of range, a lease or ttl under 1 ms, ``ttl`` with
        ``expires_at_ms``; nothing written), and the errors of every operation (class
        docstring)."""
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
        return self.run(call, connection=connection)

    def complete(
        self,
        tenant: TenantContext,
        operation: str,
        key: str,
        outcome: Outcome,
        *,
        now_ms: int | None = None,
        token: str | None = None,
        connection: SyncConnectionLike | None = None,
    ) -> IdempotencyRecord | None:
        """Store ``outcome`` on the record: status ``completed``, ``last_seen_at_ms`` now.

        Parameters: ``tenant``, ``operation``, ``key`` (as for :meth:`reserve`), ``outcome``
        (what the work produced; replayed to duplicates), ``now_ms``, ``token`` (the
        ``Reserved.token``: write only while that reservation still holds the key; without
        it, the Rust store's rule: any record of this tenant, whatever its status),
        ``connection``.

        Returns the completed record, or None when this tenant has no such record (without
        ``token``).

        Raises :class:`~idemstore.LeaseLostError` (with ``token``: the reservation no longer
        holds the key, e.g. re-claimed after its lease ended; nothing written),
        :class:`~idemstore.InvalidInputError` (bad arguments, details the Rust store could not
        hold), and the errors of every operation (class docstring)."""
        return self.run(
            ops.complete(tenant, operation, key, outcome, now_ms=now_ms, token=token),
            connection=connection,
        )

    def get(
        self,
        tenant: TenantContext,
        operation: str,
        key: str,
        *,
        connection: SyncConnectionLike | None = None,
    ) -> IdempotencyRecord | None:
        """The record of ``tenant``, ``operation`` and ``key`` (``connection``: read in the
        caller's transaction).

        Returns the :class:`~idemstore.IdempotencyRecord`, or None when there is none for
        this tenant (also for a blank operation or key).

        Raises :class:`~idemstore.InvalidInputError` (a tenant or names that are not
        strings), and the errors of every operation (class docstring)."""
        return self.run(ops.get(tenant, operation, key), connection=connection)

    def release(
        self,
        tenant: TenantContext,
        operation: str,
        key: str,
        request_fingerprint: str,
        *,
        token: str | None = None,
        connection: SyncConnectionLike | None = None,
    ) -> bool:
        """Delete the record with this ``request_fingerprint``: the work failed, a retry
        starts clean. Without ``token``, only while it is still ``reserved`` (Rust); with
        ``token``, while that reservation holds the key without an outcome, ``reserved`` or
        ``conflicted`` (a request with another fingerprint came meanwhile), with its conflict
        fingerprints.

        Parameters: ``tenant``, ``operation``, ``key``, ``request_fingerprint`` (as reserved),
        ``token`` (the ``Reserved.token``: delete only while that reservation still holds the
        key), ``connection``.

        Returns whether a record was deleted (False: none, another fingerprint, another status
        or an outcome, or ``token`` no longer holds it).

        Raises :class:`~idemstore.InvalidInputError` (bad arguments), and the errors of every
        operation (class docstring)."""
        return self.run(
            ops.release(tenant, operation, key, request_fingerprint, token=token),
            connection=connection,
        )

    def renew(
        self,
        tenant: TenantContext,
        operation: str,
        key: str,
        token: str,
        *,
        lease: Duration,
        now_ms: int | None = None,
        connection: SyncConnectionLike | None = None,
    ) -> int:
        """Extend a lease: the reservation ``token`` names holds the key until
        ``now + lease``.

        Parameters: ``tenant``, ``operation``, ``key``, ``token`` (the ``Reserved.token``),
        ``lease`` (``timedelta`` or int ms, at least 1 ms), ``now_ms``, ``connection``. A
        lease that ended but was not re-claimed yet is still the token's and renews.

        Returns the new ``lease_expires_at_ms``.

        Raises :class:`~idemstore.LeaseLostError` (the token no longer holds the key, or its
        record has an outcome already; nothing written), :class:`~idemstore.InvalidInputError`
        (bad arguments), and the errors of every operation (class docstring)."""
        call = ops.renew(tenant, operation, key, token, lease=lease, now_ms=now_ms)
        return self.run(call, connection=connection)

    def run_once(
        self,
        tenant: TenantContext,
        operation: str,
        key: str,
        work: Work,
        *,
        owner: str,
        request_fingerprint: str,
        lease: Duration | None = None,
        ttl: Duration | None = None,
        wait: Duration | None = None,
        first_seen_event_id: str | None = None,
    ) -> Outcome:
        """Run ``work`` (a callable returning an :class:`~idemstore.Outcome`) once for this
        key, whichever caller gets there first (:mod:`idemstore.once`).

        Reserves with ``owner``, ``request_fingerprint``, ``lease``, ``ttl`` and
        ``first_seen_event_id`` (see :meth:`reserve`). Reserved: runs ``work``, renewing the
        lease every third of it from a daemon thread (one per process; each renewal a
        transaction on a pooled connection, not ``work``'s) while it runs, completes with
        the token and returns the outcome; if ``work`` raises, releases the key with the token
        and re-raises. A duplicate with an outcome: returns it, ``work`` not called. Someone
        else's live reservation: waits up to ``wait`` (``timedelta`` or int ms; None: do not
        wait) for its outcome or its lease end (then re-claims), polling with back-off.

        Returns the key's one outcome. Raises :class:`~idemstore.InProgressError` (held by
        another caller past ``wait``), :class:`~idemstore.ConflictError` (the key is another
        request's), :class:`~idemstore.LeaseLostError` (this call's lease ended and another
        caller re-claimed the key: ``work``'s outcome was not stored),
        :class:`~idemstore.InvalidInputError` for bad arguments, and ``work``'s own errors."""
        return run_once(
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

    def purge_expired(
        self,
        *,
        now_ms: int | None = None,
        batch_size: int = DEFAULT_PURGE_BATCH,
        connection: SyncConnectionLike | None = None,
    ) -> int:
        """Delete the records whose ``expires_at_ms <= now``.

        Parameters: ``now_ms`` (default: the clock), ``batch_size`` (records per transaction
        when the store owns the transaction; 1 to 2^31-1), ``connection`` (all in the
        caller's transaction).

        Returns how many records were deleted.

        Raises :class:`~idemstore.InvalidInputError` (bad arguments), and the errors of every
        operation (class docstring)."""
        return self.run(
            ops.purge_expired(now_ms=now_ms, batch_size=batch_size), connection=connection
        )

    def stats(self, *, connection: SyncConnectionLike | None = None) -> Stats:
        """Record counts by operation and status (``connection``: in the caller's
        transaction).

        Returns :class:`~idemstore.Stats` (``counts``, ``total``, ``by_status()``,
        ``by_operation()``).

        Raises the errors of every operation (class docstring)."""
        return self.run(ops.stats(), connection=connection)
