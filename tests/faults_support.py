"""What tests/test_faults_runtime.py needs to watch a store and break it: another client of
the database (:class:`Observer`), a store on each backend with its pools and connections
(:class:`Harness`), an event loop on a thread, a SQLite writer that holds the lock, a session
that holds a row lock, a sqlite3 connection that can be closed in the middle of a call."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
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
import sqlalchemy as sa

from idemstore import AsyncIdempotencyStore, IdempotencyStore, TenantContext, create_engine

from .conftest import Database

T = TenantContext.explicit_user_workspace("org-f", "ws-f", None, "actor-f")
OP = "faults.op"
OWNER = "faults"
FP = "sha256:faults"

#: How long a test waits for something that takes milliseconds when all is well.
PATIENCE = 10.0


class Interrupter:
    """Interrupts a synchronous call as Ctrl-C does: a real SIGALRM after a random delay, whose
    handler raises KeyboardInterrupt wherever the main thread is (idemstore's code, the
    driver's, a wait on the server).

    Except inside SQLAlchemy (its pool's checkout, checkin and reset; its garbage-collection
    callbacks): an exception raised there is SQLAlchemy's to survive, not idemstore's (it can
    lose the pool slot, invalidate the connection, or be ignored in a callback), so the handler
    lets that signal pass and the call ends normally. idemstore runs its statements on the
    DBAPI connection itself, so every round trip stays in reach."""

    def __init__(self, rng: random.Random, low: float, high: float) -> None:
        self.rng = rng
        self.low = low
        self.high = high
        self.armed = False
        self.previous: Any = None

    def __enter__(self) -> Interrupter:
        self.previous = signal.signal(signal.SIGALRM, self._on_alarm)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.previous)

    def _on_alarm(self, _signum: int, frame: Any) -> None:
        if self.armed and not _in_sqlalchemy(frame):
            self.armed = False
            raise KeyboardInterrupt

    def call(self, fn: Callable[..., Any], *args: Any) -> bool:
        """``fn(*args)``, interrupted after the random delay; whether it was."""
        try:
            self.armed = True
            signal.setitimer(signal.ITIMER_REAL, self.rng.uniform(self.low, self.high))
            try:
                fn(*args)
            finally:
                self.armed = False
                signal.setitimer(signal.ITIMER_REAL, 0)
        except KeyboardInterrupt:
            return True
        return False


def _in_sqlalchemy(frame: Any) -> bool:
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith("sqlalchemy."):
            return True
        frame = frame.f_back
    return False


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
            if sqlite_is_open(conn):
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
            busy = [c for c in self.dbapi_connections if sqlite_is_open(c) and c.in_transaction]
            assert not busy, f"{len(busy)} connection(s) of the store are in a transaction"

    def close(self) -> None:
        self.call("close")


def sqlite_is_open(conn: sqlite3.Connection) -> bool:
    try:
        conn.total_changes  # noqa: B018 -- raises on a closed connection
    except sqlite3.ProgrammingError:
        return False
    return True


@contextlib.contextmanager
def write_contention(path: str, seed: str) -> Iterator[None]:
    """SQLite: another connection takes the write lock again and again for 0.3-1.5 ms, so
    that the store's writes wait for it (milliseconds, as under load) and a cancellation after
    0.1-3 ms lands anywhere in them: queued, waiting for the lock, between statements."""
    stop = threading.Event()
    rng = random.Random(seed)
    failed: list[BaseException] = []

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
        except BaseException as error:
            failed.append(error)
        finally:
            conn.close()

    thread = threading.Thread(target=hog, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if failed:  # the contention stopped half-way: say so rather than pass on less of it
        raise failed[0]


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


CLOSE_ON: dict[str, str | None] = {"at": None}


class ClosingCursor(sqlite3.Cursor):
    """Closes its own connection just before the records upsert, when armed."""

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        if CLOSE_ON["at"] == "statement" and sql.lstrip().startswith("INSERT INTO idemstore_rec"):
            CLOSE_ON["at"] = None
            self.connection.close()
        return super().execute(sql, parameters)


class ClosingConnection(sqlite3.Connection):
    """A sqlite3 connection that can be closed underneath the store in the middle of an
    operation, on the thread that runs it. (Closing it from another thread while a statement
    runs crashes CPython's sqlite3 module, so that is no test.)"""

    def cursor(self, factory: Any = ClosingCursor) -> Any:  # type: ignore[override]
        return super().cursor(factory)

    def commit(self) -> None:
        if CLOSE_ON["at"] == "commit":
            CLOSE_ON["at"] = None
            self.close()
        super().commit()


class Harnesses:
    """Opens harnesses on fresh databases (``make_database``) and closes them all at the end."""

    def __init__(self, make_database: Callable[[str], Database]) -> None:
        self.make_database = make_database
        self.opened: list[Harness] = []

    def open(self, backend: str, **options: Any) -> Harness:
        """A migrated store on ``backend`` (``sqlite-sync`` ... ``postgresql-async``),
        ``options`` for its ``from_url`` / engine."""
        engine_name, flavour = backend.split("-")
        db = self.make_database(engine_name)
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
        self.opened.append(harness)
        harness.call("migrate")
        return harness

    def close_all(self) -> None:
        for harness in self.opened:
            try:
                harness.call("close")
            finally:
                harness.observer.close()
                if harness.loop is not None:
                    harness.loop.stop()
