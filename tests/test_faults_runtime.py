"""Faults in the runtime: cancellation, lost connections, row locks and closing.

On SQLite and PostgreSQL, sync and async:

- a call cancelled at a random point (asyncio cancellation for the async store; for the sync
  one a real SIGALRM whose handler raises KeyboardInterrupt, as Ctrl-C does) committed or left
  nothing; every acknowledged write is visible to other connections at once; no session is
  left in a transaction, no connection checked out, no exception unretrieved;
- a lost connection (PostgreSQL: ``pg_terminate_backend``; SQLite, which has no server: the
  store's DBAPI connections closed underneath it) costs at most the call in flight, which
  fails with :class:`ConnectionLostError` only when it cannot be retried safely;
- a PostgreSQL reserve waits at most the lock timeout; ``close()`` never blocks the event loop;
  a closed store raises :class:`StoreClosedError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import random
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from idemstore import (
    AsyncIdempotencyStore,
    ConnectionLostError,
    IdempotencyStore,
    IdemstoreError,
    LockTimeoutError,
    Outcome,
    Reserved,
    StoreClosedError,
    TenantContext,
    create_async_engine,
    create_engine,
    ops,
)

from .conftest import BACKENDS, ENGINES, Database

T = TenantContext.explicit_user_workspace("org-f", "ws-f", None, "actor-f")
OP = "faults.op"
OWNER = "faults"
FP = "sha256:faults"
ROUNDS = 200
#: How long a test waits for something that takes milliseconds when all is well.
PATIENCE = 10.0


def wait_until(condition: Callable[[], Any], what: str, timeout: float = PATIENCE) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class LoopThread:
    """An event loop running on a thread of its own, so that the test thread may block (on a
    row lock, on a terminated backend) while the async store works."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class Observer:
    """Another client of the same database: what everybody else sees. On PostgreSQL it also
    reads ``pg_stat_activity`` and terminates backends."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.pg: psycopg.Connection[Any] | None = None
        self.sqlite: sqlite3.Connection | None = None
        if db.schema is not None:
            url = sa.make_url(db.url).set(drivername="postgresql")
            self.pg = psycopg.connect(
                url.render_as_string(hide_password=False),
                autocommit=True,
                options=f"-csearch_path={db.schema}",
            )
        else:
            self.sqlite = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)

    @property
    def path(self) -> str:
        database = sa.make_url(self.db.url).database
        assert database is not None
        return database

    def keys(self, keys: list[str]) -> set[str]:
        """Which of ``keys`` are committed."""
        if self.pg is not None:
            rows = self.pg.execute(
                "SELECT key FROM idemstore_records WHERE operation = %s AND key = ANY(%s)",
                (OP, keys),
            ).fetchall()
        else:
            assert self.sqlite is not None
            marks = ", ".join("?" * len(keys))
            rows = self.sqlite.execute(
                f"SELECT key FROM idemstore_records WHERE operation = ? AND key IN ({marks})",
                (OP, *keys),
            ).fetchall()
        return {row[0] for row in rows}

    def sessions(self, app_name: str) -> list[tuple[int, str, str | None, str]]:
        """PostgreSQL: (pid, state, wait_event_type, query) of the sessions of ``app_name``."""
        assert self.pg is not None
        rows = self.pg.execute(
            "SELECT pid, state, wait_event_type, query FROM pg_stat_activity "
            "WHERE application_name = %s",
            (app_name,),
        ).fetchall()
        return [(int(r[0]), str(r[1]), r[2], str(r[3])) for r in rows]

    def waiting_on_a_lock(
        self,
        app_name: str,
        pending: concurrent.futures.Future[Any],
        *,
        query: str = "",
        other_than: int | None = None,
    ) -> int:
        """The pid of the session of ``app_name`` that waits on a lock (running ``query``)."""

        def found() -> int | None:
            if pending.done():  # it did not wait: show why
                raise AssertionError(f"the call ended instead of waiting: {pending.result()!r}")
            for pid, state, wait, text in self.sessions(app_name):
                waiting = state == "active" and wait == "Lock" and pid != other_than
                if waiting and query.lower() in text.lower():
                    return pid
            return None

        return int(wait_until(found, f"a session of {app_name} waiting on a lock"))

    def terminate(self, app_name: str) -> list[int]:
        """Terminate every session of ``app_name``; return their pids once they are gone."""
        pids = [pid for pid, *_ in self.sessions(app_name)]
        for pid in pids:
            self.terminate_pid(pid)
        return pids

    def terminate_pid(self, pid: int) -> None:
        assert self.pg is not None
        self.pg.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_until(
            lambda: (
                not self.pg.execute(  # type: ignore[union-attr]
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchall()
            ),
            f"backend {pid} to end",
        )

    def write_lock_is_free(self) -> bool:
        """SQLite: whether another connection can take the write lock at once."""
        other = sqlite3.connect(self.path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:
            return False
        finally:
            other.close()

    def close(self) -> None:
        if self.pg is not None:
            self.pg.close()
        if self.sqlite is not None:
            self.sqlite.close()


@dataclass
class Harness:
    """A store on one backend, with what a test needs to watch and break it."""

    backend: str
    db: Database
    store: Any
    app_name: str
    observer: Observer
    #: SQLite: every DBAPI connection the store's engine opened.
    dbapi_connections: list[sqlite3.Connection] = field(default_factory=list)
    loop: LoopThread | None = None
    pools: list[sa.pool.Pool] = field(default_factory=list)

    @property
    def is_async(self) -> bool:
        return self.loop is not None

    @property
    def is_postgresql(self) -> bool:
        return self.db.schema is not None

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self.store, method)
        if self.loop is not None:
            return self.loop.run(fn(*args, **kwargs))
        return fn(*args, **kwargs)

    def submit(self, method: str, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Start a call without waiting for it (sync store: on a thread of its own)."""
        fn = getattr(self.store, method)
        if self.loop is not None:
            return self.loop.submit(fn(*args, **kwargs))
        pool = concurrent.futures.ThreadPoolExecutor(1)
        future = pool.submit(fn, *args, **kwargs)
        pool.shutdown(wait=False)
        return future

    def reserve(self, key: str) -> Any:
        return self.call("reserve", T, OP, key, OWNER, FP)

    def reserve_at_once(self, keys: list[str]) -> list[Any]:
        """Reserve ``keys`` concurrently, so that the pool opens several connections."""
        if self.loop is not None:

            async def together() -> list[Any]:
                return list(
                    await asyncio.gather(*(self.store.reserve(T, OP, k, OWNER, FP) for k in keys))
                )

            return list(self.loop.run(together()))
        futures = [self.submit("reserve", T, OP, k, OWNER, FP) for k in keys]
        return [f.result(PATIENCE) for f in futures]

    def checked_out(self) -> int:
        return sum(pool.checkedout() for pool in self.pools if hasattr(pool, "checkedout"))

    def kill_connections(self) -> int:
        """Kill the store's connections: PostgreSQL terminates its backends; SQLite (no
        server) closes its DBAPI connections underneath it. How many."""
        if self.is_postgresql:
            return len(self.observer.terminate(self.app_name))
        killed = 0
        for conn in self.dbapi_connections:
            if _sqlite_is_open(conn):
                conn.close()
                killed += 1
        return killed

    def assert_quiet(self) -> None:
        """Nothing checked out, no session of the store in a transaction."""
        wait_until(lambda: self.checked_out() == 0, "every connection back in the pool")
        if self.is_postgresql:
            states = [s[1] for s in self.observer.sessions(self.app_name)]
            assert not [s for s in states if s.startswith("idle in transaction")], states
        else:
            assert self.observer.write_lock_is_free()
            busy = [c for c in self.dbapi_connections if _sqlite_is_open(c) and c.in_transaction]
            assert not busy, f"{len(busy)} connection(s) of the store are in a transaction"

    def close(self) -> None:
        self.call("close")


def _sqlite_is_open(conn: sqlite3.Connection) -> bool:
    try:
        conn.total_changes  # noqa: B018 -- raises on a closed connection
    except sqlite3.ProgrammingError:
        return False
    return True


@pytest.fixture
def open_harness(make_database: Callable[[str], Database]) -> Iterator[Callable[..., Harness]]:
    """Factory: ``open_harness(backend, **store_options)`` -> a migrated store on ``backend``."""
    opened: list[Harness] = []

    def open_(backend: str, **options: Any) -> Harness:
        engine_name, flavour = backend.split("-")
        db = make_database(engine_name)
        app_name = f"idemstore-test-{uuid.uuid4().hex[:12]}"
        loop = LoopThread() if flavour == "async" else None
        connections: list[sqlite3.Connection] = []
        store: Any
        if engine_name == "postgresql":
            if flavour == "sync":
                connect_args: dict[str, Any] = {
                    "options": f"-csearch_path={db.schema}",
                    "application_name": app_name,
                }
                store = IdempotencyStore.from_url(db.url, connect_args=connect_args, **options)
                pools = [store.engine.pool]
                db.engines.append(store.engine)
            else:
                settings = {"search_path": db.schema, "application_name": app_name}
                store = AsyncIdempotencyStore.from_url(
                    db.url, connect_args={"server_settings": settings}, **options
                )
                pools = [store.engine.sync_engine.pool]
                db.engines.append(store.engine.sync_engine)
        else:
            if flavour == "sync":
                connect_args = options.pop("connect_args", {})
                engine = create_engine(db.url, connect_args=connect_args, **options)
                store = IdempotencyStore(
                    engine,
                    busy_timeout_ms=options.get("busy_timeout_ms"),
                    dispose_engine=True,
                )
                sync_engine = engine
            else:
                store = AsyncIdempotencyStore.from_url(db.url, **options)
                sync_engine = store._sync_engine
                db.engines.append(store.engine.sync_engine)
            sa.event.listen(sync_engine, "connect", lambda dbapi, _rec: connections.append(dbapi))
            pools = [sync_engine.pool]
            db.engines.append(sync_engine)
        harness = Harness(backend, db, store, app_name, Observer(db), connections, loop, pools)
        opened.append(harness)
        harness.call("migrate")
        return harness

    yield open_
    for harness in opened:
        try:
            harness.call("close")
        finally:
            harness.observer.close()
            if harness.loop is not None:
                harness.loop.stop()


# -- cancellation ------------------------------------------------------------------------------


async def _cancelled_rounds_async(h: Harness, rng: random.Random) -> int:
    """Each round: a reserve cancelled after 0.1-3 ms, then a reserve that must be acknowledged
    and visible. Returns how many were cancelled before they ended."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    cancelled = 0
    try:
        for i in range(ROUNDS):
            try:
                await asyncio.wait_for(
                    h.store.reserve(T, OP, f"cancelled-{i}", OWNER, FP), rng.uniform(1e-4, 3e-3)
                )
            except TimeoutError:
                cancelled += 1
            key = f"acked-{i}"
            assert isinstance(await h.store.reserve(T, OP, key, OWNER, FP), Reserved)
            assert h.observer.keys([key]) == {key}, f"round {i}: acknowledged but not committed"
        await asyncio.sleep(0.05)
        gc.collect()  # a future dropped with its exception reports it when it is collected
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert reported == [], f"the event loop reported: {reported[:3]}"
    return cancelled


def _interrupted_rounds_sync(h: Harness, rng: random.Random) -> int:
    """The sync rounds: a real SIGALRM after 0.1-3 ms whose handler raises KeyboardInterrupt
    wherever the reserve happens to be: idemstore's code, the driver's, a wait on the server.

    Not inside SQLAlchemy's pool bookkeeping (from a checkout until the ``checkout`` event,
    from the ``reset`` of a checkin until the next checkout): an exception raised there loses
    the pool slot inside SQLAlchemy itself, which no caller of the pool can repair, so the
    handler lets that signal pass (the call then ends normally)."""
    armed = [False]
    in_pool = [True]
    for pool in h.pools:
        sa.event.listen(pool, "checkout", lambda *_: in_pool.__setitem__(0, False))
        sa.event.listen(pool, "reset", lambda *_: in_pool.__setitem__(0, True))

    def on_alarm(_signum: int, _frame: Any) -> None:
        if armed[0] and not in_pool[0]:
            armed[0] = False
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, on_alarm)
    interrupted = 0
    try:
        for i in range(ROUNDS):
            try:
                armed[0] = True
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-4, 3e-3))
                try:
                    h.store.reserve(T, OP, f"cancelled-{i}", OWNER, FP)
                finally:
                    armed[0] = False
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except KeyboardInterrupt:
                interrupted += 1
            key = f"acked-{i}"
            assert isinstance(h.store.reserve(T, OP, key, OWNER, FP), Reserved)
            assert h.observer.keys([key]) == {key}, f"round {i}: acknowledged but not committed"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return interrupted


@contextlib.contextmanager
def write_contention(path: str, seed: str) -> Iterator[None]:
    """SQLite: another connection takes the write lock again and again for 0.3-1.5 ms, so
    that the store's writes wait for it (milliseconds, as under load) and a cancellation after
    0.1-3 ms lands anywhere in them: queued, waiting for the lock, between statements."""
    stop = threading.Event()
    rng = random.Random(seed)

    def hog() -> None:
        # The test's SIGALRM is for the main thread (as in a program whose other threads
        # leave signals to it).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        conn = sqlite3.connect(path, isolation_level=None, timeout=0)
        try:
            while not stop.is_set():
                try:  # grab the lock the moment it is free (the store sleeps in its busy wait)
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError:
                    time.sleep(5e-5)
                    continue
                time.sleep(rng.uniform(3e-4, 1.5e-3))
                conn.execute("COMMIT")
                time.sleep(rng.uniform(2e-4, 1e-3))
        finally:
            conn.close()

    thread = threading.Thread(target=hog, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cancelled_call_committed_or_left_nothing(
    backend: str, open_harness: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    h = open_harness(backend)
    rng = random.Random(f"cancel-{backend}")
    caplog.set_level(logging.WARNING)
    contention = (
        contextlib.nullcontext() if h.is_postgresql else write_contention(h.observer.path, backend)
    )
    with contention:
        if h.loop is not None:
            cancelled = h.loop.run(_cancelled_rounds_async(h, rng), timeout=120)
        else:
            cancelled = _interrupted_rounds_sync(h, rng)
    assert cancelled >= 10, f"only {cancelled} of {ROUNDS} calls were cancelled: no proof"
    h.assert_quiet()
    # A cancelled reserve committed or left nothing, and the store agrees with everybody else.
    cancelled_keys = [f"cancelled-{i}" for i in range(ROUNDS)]
    committed = h.observer.keys(cancelled_keys)
    for key in cancelled_keys:
        record = h.call("get", T, OP, key)
        assert (record is not None) == (key in committed), key
    assert h.observer.keys([f"acked-{i}" for i in range(ROUNDS)]) == {
        f"acked-{i}" for i in range(ROUNDS)
    }
    h.assert_quiet()
    never_retrieved = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert never_retrieved == []
    # No connection went back to the pool half-used: its reset would have failed and logged.
    # (A sync interrupt that lands in SQLAlchemy's own checkin is logged there, and SQLAlchemy
    # discards that connection: the test's interrupt, not a bad reset.)
    bad_resets = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("sqlalchemy.pool")
        and r.levelno >= logging.ERROR
        and not (r.exc_info and isinstance(r.exc_info[1], KeyboardInterrupt))
    ]
    assert bad_resets == []


# -- lost connections --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_connections_lost_between_calls_cost_no_call(
    backend: str, open_harness: Callable[..., Harness]
) -> None:
    """Every idle connection of the store dies; the next calls all succeed (the dead
    connections are discarded, not handed out again)."""
    h = open_harness(backend)
    assert all(isinstance(r, Reserved) for r in h.reserve_at_once([f"warm-{i}" for i in range(4)]))
    assert h.kill_connections() >= 1
    for i in range(6):
        key = f"after-{i}"
        assert isinstance(h.reserve(key), Reserved), key
        assert h.observer.keys([key]) == {key}
    h.assert_quiet()
    # And once more: the replacement connections die too.
    assert h.kill_connections() >= 1
    assert h.call("get", T, OP, "after-0") is not None
    h.assert_quiet()


class RowLockHolder:
    """Another session that has reserved ``key`` in a transaction it has not ended: a reserve
    of the same key waits on its row lock."""

    def __init__(self, db: Database, key: str) -> None:
        self.engine = db.sync_engine(poolclass=sa.pool.NullPool)
        self.connection = self.engine.connect()
        IdempotencyStore(self.engine).reserve(T, OP, key, "holder", FP, connection=self.connection)
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if not self.connection.closed:
                self.connection.rollback()
                self.connection.close()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_postgresql_connection_lost_while_waiting_is_retried(
    flavour: str, open_harness: Callable[..., Harness]
) -> None:
    """The call's backend is terminated while it waits on a row lock: nothing was committed,
    so the store runs it again on a fresh connection, and the caller sees one result."""
    h = open_harness(f"postgresql-{flavour}")
    holder = RowLockHolder(h.db, "locked")
    try:
        pending = h.submit("reserve", T, OP, "locked", OWNER, FP)
        first = h.observer.waiting_on_a_lock(h.app_name, pending)
        h.observer.terminate_pid(first)
        h.observer.waiting_on_a_lock(h.app_name, pending, other_than=first)  # the retry
    finally:
        holder.release()
    assert isinstance(pending.result(PATIENCE), Reserved)
    assert h.observer.keys(["locked"]) == {"locked"}
    assert isinstance(h.reserve("next"), Reserved)
    h.assert_quiet()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_postgresql_connection_lost_during_commit_may_have_committed(
    flavour: str, open_harness: Callable[..., Harness]
) -> None:
    """Lost while COMMIT is on its way: the outcome is unknown, so it is not retried; the
    error says the write may have committed. The next call succeeds."""
    h = open_harness(f"postgresql-{flavour}")
    assert h.observer.pg is not None
    # A deferred trigger that waits at COMMIT for an advisory lock the observer holds.
    h.observer.pg.execute(
        "CREATE FUNCTION hold_commit() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_advisory_xact_lock(424242); RETURN NULL; END $$"
    )
    h.observer.pg.execute(
        "CREATE CONSTRAINT TRIGGER hold_commit AFTER INSERT ON idemstore_records "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION hold_commit()"
    )
    h.observer.pg.execute("SELECT pg_advisory_lock(424242)")
    try:
        pending = h.submit("reserve", T, OP, "at-commit", OWNER, FP)
        pid = h.observer.waiting_on_a_lock(h.app_name, pending, query="COMMIT")
        h.observer.terminate_pid(pid)
        with pytest.raises(ConnectionLostError, match="may have committed") as lost:
            pending.result(PATIENCE)
        assert lost.value.may_have_committed is True
    finally:
        h.observer.pg.execute("SELECT pg_advisory_unlock(424242)")
    h.observer.pg.execute("DROP TRIGGER hold_commit ON idemstore_records")
    # The server rolled it back: the key is free, and the store says so.
    assert h.observer.keys(["at-commit"]) == set()
    assert isinstance(h.reserve("at-commit"), Reserved)
    h.assert_quiet()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_postgresql_connection_lost_in_the_callers_transaction(
    flavour: str, open_harness: Callable[..., Harness]
) -> None:
    """In the caller's transaction: ConnectionLostError (nothing committed); the caller's
    connection is invalidated as SQLAlchemy does it, so a rollback makes it usable again."""
    h = open_harness(f"postgresql-{flavour}")
    caller_app = f"{h.app_name}-caller"
    assert h.db.schema is not None
    if flavour == "sync":
        connect_args = {"options": f"-csearch_path={h.db.schema}", "application_name": caller_app}
        engine = create_engine(h.db.url, connect_args=connect_args)
        h.db.engines.append(engine)
        with engine.connect() as conn:
            assert isinstance(h.store.reserve(T, OP, "tx-1", OWNER, FP, connection=conn), Reserved)
            assert h.observer.terminate(caller_app)
            with pytest.raises(ConnectionLostError, match="did not commit") as lost:
                h.store.reserve(T, OP, "tx-2", OWNER, FP, connection=conn)
            assert lost.value.may_have_committed is False
            conn.rollback()
            assert isinstance(h.store.reserve(T, OP, "tx-3", OWNER, FP, connection=conn), Reserved)
            conn.commit()
    else:
        settings = {"search_path": h.db.schema, "application_name": caller_app}
        aengine = create_async_engine(h.db.url, connect_args={"server_settings": settings})
        h.db.engines.append(aengine.sync_engine)

        async def scenario() -> None:
            async with aengine.connect() as conn:
                first = await h.store.reserve(T, OP, "tx-1", OWNER, FP, connection=conn)
                assert isinstance(first, Reserved)
                await asyncio.to_thread(h.observer.terminate, caller_app)
                with pytest.raises(ConnectionLostError, match="did not commit") as lost:
                    await h.store.reserve(T, OP, "tx-2", OWNER, FP, connection=conn)
                assert lost.value.may_have_committed is False
                await conn.rollback()
                third = await h.store.reserve(T, OP, "tx-3", OWNER, FP, connection=conn)
                assert isinstance(third, Reserved)
                await conn.commit()
            await aengine.dispose()

        assert h.loop is not None
        h.loop.run(scenario())
    assert h.observer.keys(["tx-1", "tx-2", "tx-3"]) == {"tx-3"}


_close_on: dict[str, str | None] = {"at": None}


class ClosingCursor(sqlite3.Cursor):
    """Closes its own connection just before the records upsert, when armed."""

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        if _close_on["at"] == "statement" and sql.lstrip().startswith("INSERT INTO idemstore_rec"):
            _close_on["at"] = None
            self.connection.close()
        return super().execute(sql, parameters)


class ClosingConnection(sqlite3.Connection):
    """A sqlite3 connection that can be closed underneath the store in the middle of an
    operation, on the thread that runs it. (Closing it from another thread while a statement
    runs crashes CPython's sqlite3 module, so that is no test.)"""

    def cursor(self, factory: Any = ClosingCursor) -> Any:  # type: ignore[override]
        return super().cursor(factory)

    def commit(self) -> None:
        if _close_on["at"] == "commit":
            _close_on["at"] = None
            self.close()
        super().commit()


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("at", ["statement", "commit"])
def test_sqlite_connection_closed_during_a_call_is_retried(
    flavour: str, at: str, open_harness: Callable[..., Harness]
) -> None:
    """SQLite's connection closed in the middle of a reserve (after BEGIN IMMEDIATE took the
    write lock, or at COMMIT): closing rolled the transaction back, so the store runs the call
    again on a fresh connection and the caller sees one result."""
    h = open_harness(f"sqlite-{flavour}", connect_args={"factory": ClosingConnection})
    assert isinstance(h.reserve("before"), Reserved)
    opened = len(h.dbapi_connections)
    _close_on["at"] = at
    try:
        assert isinstance(h.reserve("during"), Reserved)
    finally:
        armed, _close_on["at"] = _close_on["at"], None
    assert armed is None, "the connection was not closed: no proof"
    closed = [c for c in h.dbapi_connections if not _sqlite_is_open(c)]
    assert len(closed) == 1
    assert len(h.dbapi_connections) > opened  # a new one took its place
    assert h.observer.keys(["during"]) == {"during"}
    assert isinstance(h.reserve("after"), Reserved)
    h.assert_quiet()


# -- row locks -----------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_postgresql_reserve_waits_at_most_the_lock_timeout(
    flavour: str, open_harness: Callable[..., Harness]
) -> None:
    h = open_harness(f"postgresql-{flavour}", busy_timeout_ms=300)
    holder = RowLockHolder(h.db, "locked")
    guard = threading.Timer(8, holder.release)  # without a lock timeout the call waits this long
    guard.start()
    try:
        started = time.monotonic()
        with pytest.raises(LockTimeoutError, match="lock_timeout=300 ms"):
            h.reserve("locked")
        waited = time.monotonic() - started
    finally:
        guard.cancel()
        holder.release()
    assert 0.25 <= waited < 5, waited
    assert isinstance(h.reserve("locked"), Reserved)
    h.assert_quiet()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_postgresql_lock_timeout_of_a_users_engine_and_transaction(
    flavour: str, make_database: Callable[[str], Database]
) -> None:
    """An engine the user built with a lock_timeout of his own, a reserve in his own
    transaction: the timeout is a LockTimeoutError there too, not a raw driver error."""
    db = make_database("postgresql")
    db.sync_store().close()  # migrated
    holder = RowLockHolder(db, "locked")
    guard = threading.Timer(8, holder.release)
    guard.start()
    url = sa.make_url(db.url)
    try:
        if flavour == "sync":
            engine = sa.create_engine(
                url.set(drivername="postgresql+psycopg"),
                connect_args={"options": f"-csearch_path={db.schema} -clock_timeout=200"},
            )
            db.engines.append(engine)
            store = IdempotencyStore(engine)
            with pytest.raises(LockTimeoutError, match="lock_timeout"):
                store.reserve(T, OP, "locked", OWNER, FP)
            with engine.connect() as conn, pytest.raises(LockTimeoutError):
                store.reserve(T, OP, "locked", OWNER, FP, connection=conn)
        else:
            from sqlalchemy.ext.asyncio import create_async_engine as sa_async_engine

            settings = {"search_path": db.schema, "lock_timeout": "200"}
            aengine = sa_async_engine(
                url.set(drivername="postgresql+asyncpg"),
                connect_args={"server_settings": settings},
            )
            db.engines.append(aengine.sync_engine)

            async def scenario() -> None:
                store = AsyncIdempotencyStore(aengine)
                with pytest.raises(LockTimeoutError, match="lock_timeout"):
                    await store.reserve(T, OP, "locked", OWNER, FP)
                async with aengine.connect() as conn:
                    with pytest.raises(LockTimeoutError):
                        await store.reserve(T, OP, "locked", OWNER, FP, connection=conn)
                await store.close()
                await aengine.dispose()

            asyncio.run(scenario())
    finally:
        guard.cancel()
        holder.release()


# -- closing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("engine_name", ENGINES)
def test_close_waits_for_queued_work_without_blocking_the_loop(
    engine_name: str, make_database: Callable[[str], Database]
) -> None:
    """close() with work queued: every call already made completes (and is committed), and
    the event loop keeps running meanwhile (a 1 ms ticker measures its lag)."""
    db = make_database(engine_name)
    db.sync_store().close()  # migrated
    count = 1000 if engine_name == "sqlite" else 400  # about 0.3 s of work either way

    async def scenario() -> tuple[float, float, list[Any]]:
        store = db.async_store()
        await store.check_schema()
        calls = [
            asyncio.ensure_future(store.reserve(T, OP, f"queued-{i}", OWNER, FP))
            for i in range(count)
        ]
        await asyncio.sleep(0.005)  # the calls are queued and running
        lags: list[float] = []
        closing = True

        async def ticker() -> None:
            last = time.monotonic()
            while closing:
                await asyncio.sleep(0.001)
                now = time.monotonic()
                lags.append(now - last)
                last = now

        ticking = asyncio.ensure_future(ticker())
        await asyncio.sleep(0.01)  # ticking
        started = time.monotonic()
        await store.close()
        took = time.monotonic() - started
        closing = False
        await ticking
        return max(lags), took, await asyncio.gather(*calls, return_exceptions=True)

    lag, took, results = asyncio.run(scenario())
    assert all(isinstance(r, Reserved) for r in results), {type(r).__name__ for r in results}
    observer = Observer(db)
    try:
        assert len(observer.keys([f"queued-{i}" for i in range(count)])) == count
    finally:
        observer.close()
    assert lag < 0.1, f"close() ({took:.3f} s) blocked the event loop for {lag * 1000:.0f} ms"


def _every_call(store: Any) -> dict[str, Callable[[], Any]]:
    outcome = Outcome("accepted", completed_at_ms=1)
    return {
        "reserve": lambda: store.reserve(T, OP, "k", OWNER, FP),
        "complete": lambda: store.complete(T, OP, "k", outcome),
        "get": lambda: store.get(T, OP, "k"),
        "release": lambda: store.release(T, OP, "k", FP),
        "purge_expired": lambda: store.purge_expired(),
        "stats": lambda: store.stats(),
        "run": lambda: store.run(ops.get(T, OP, "k")),
        "migrate": lambda: store.migrate(),
        "check_schema": lambda: store.check_schema(),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["from_url", "engine"])
def test_a_closed_store_raises_store_closed_error(
    backend: str, source: str, make_database: Callable[[str], Database]
) -> None:
    engine_name, flavour = backend.split("-")
    db = make_database(engine_name)
    db.sync_store().close()  # migrated
    if flavour == "sync":
        store = db.sync_store() if source == "from_url" else IdempotencyStore(db.sync_engine())
        assert store.get(T, OP, "k") is None
        store.close()
        store.close()  # idempotent
        for name, call in _every_call(store).items():
            with pytest.raises(StoreClosedError, match="closed") as raised:
                call()
            assert isinstance(raised.value, IdemstoreError), name
        return

    async def scenario() -> None:
        if source == "from_url":
            astore = db.async_store()
        else:
            astore = AsyncIdempotencyStore(db.async_engine())
        assert await astore.get(T, OP, "k") is None
        await astore.close()
        await astore.close()
        for name, call in _every_call(astore).items():
            with pytest.raises(StoreClosedError, match="closed"):
                await call()
            assert name
        if source == "engine":
            await astore.engine.dispose()

    asyncio.run(scenario())
