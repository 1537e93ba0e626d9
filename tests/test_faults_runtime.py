"""Faults in the runtime: cancellation, lost connections, row locks and closing.

On SQLite and PostgreSQL, sync and async:

- a call cancelled at a random point (asyncio cancellation for the async store; for the sync
  one a real SIGALRM whose handler raises KeyboardInterrupt, as Ctrl-C does) committed or left
  nothing, with group commit too (the others of its group acknowledged and committed); every
  acknowledged write is visible to other connections at once; no session is left in a
  transaction, no connection checked out, no exception unretrieved;
- a lost connection (PostgreSQL: ``pg_terminate_backend``; SQLite, which has no server: the
  store's DBAPI connections closed underneath it) costs at most the call in flight, which
  fails with :class:`ConnectionLostError` only when it cannot be retried safely;
- a PostgreSQL reserve waits at most the lock timeout; ``close()`` never blocks the event loop;
  a closed store raises :class:`StoreClosedError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

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
    create_async_engine,
    create_engine,
)
from idemstore.db import ops

from .conftest import BACKENDS, ENGINES, Database
from .faults_support import (
    CLOSE_ON,
    FP,
    OP,
    OWNER,
    PATIENCE,
    ClosingConnection,
    Harness,
    Harnesses,
    Interrupter,
    Observer,
    RowLockHolder,
    T,
    sqlite_is_open,
    write_contention,
)

#: Rounds of the cancellation tests.
ROUNDS = 200


@pytest.fixture
def open_harness(make_database: Callable[[str], Database]) -> Iterator[Callable[..., Harness]]:
    """Factory: ``open_harness(backend, **store_options)`` -> a migrated store on ``backend``."""
    harnesses = Harnesses(make_database)
    yield harnesses.open
    harnesses.close_all()


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
    """The sync rounds: a reserve interrupted after 0.1-3 ms (:class:`Interrupter`: a real
    SIGALRM raising KeyboardInterrupt), then a reserve that must be acknowledged and
    visible. Returns how many were interrupted before they ended."""
    interrupted = 0
    with Interrupter(rng, 1e-4, 3e-3) as interrupter:
        for i in range(ROUNDS):
            interrupted += interrupter.call(h.store.reserve, T, OP, f"cancelled-{i}", OWNER, FP)
            key = f"acked-{i}"
            assert isinstance(h.store.reserve(T, OP, key, OWNER, FP), Reserved)
            assert h.observer.keys([key]) == {key}, f"round {i}: acknowledged but not committed"
    return interrupted


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
    bad_resets = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("sqlalchemy.pool") and r.levelno >= logging.ERROR
    ]
    assert bad_resets == []


async def _cancelled_group_rounds(h: Harness, rng: random.Random) -> int:
    """Group commit: each round, 8 reserves at once (they queue behind the writer and share
    transactions), a random half of them cancelled after 0.1-3 ms; the others must be
    acknowledged and visible. Returns how many were cancelled before they ended."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    cancelled = 0
    try:
        for i in range(ROUNDS // 4):
            calls = []
            for j in range(8):
                call = h.store.reserve(T, OP, f"cancelled-{i}-{j}", OWNER, FP)
                if rng.random() < 0.5:
                    call = asyncio.wait_for(call, rng.uniform(1e-4, 3e-3))
                calls.append(call)
            acked = []
            for j, result in enumerate(await asyncio.gather(*calls, return_exceptions=True)):
                if isinstance(result, TimeoutError):
                    cancelled += 1
                else:
                    assert isinstance(result, Reserved), result
                    acked.append(f"cancelled-{i}-{j}")
            assert h.observer.keys(acked) == set(acked), f"round {i}: acknowledged, not committed"
        await asyncio.sleep(0.05)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert reported == [], f"the event loop reported: {reported[:3]}"
    return cancelled


def test_a_cancelled_call_in_a_group_committed_or_left_nothing(
    open_harness: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    h = open_harness("sqlite-async", group_commit=True)
    rng = random.Random("cancel-group")
    caplog.set_level(logging.WARNING)
    assert h.loop is not None
    with write_contention(h.observer.path, "sqlite-async-group"):
        cancelled = h.loop.run(_cancelled_group_rounds(h, rng), timeout=120)
    assert cancelled >= 10, f"only {cancelled} calls were cancelled: no proof"
    assert h.store._offload.grouped_calls >= 50, "the calls did not share transactions"
    h.assert_quiet()
    keys = [f"cancelled-{i}-{j}" for i in range(ROUNDS // 4) for j in range(8)]
    committed = h.observer.keys(keys)
    for key in keys:
        record = h.call("get", T, OP, key)
        assert (record is not None) == (key in committed), key
    never_retrieved = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert never_retrieved == []


@pytest.mark.parametrize("engine_name", ENGINES)
def test_a_cancelled_call_in_the_callers_transaction_breaks_nothing(
    engine_name: str, open_harness: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    """With ``connection=`` the transaction is the caller's: a call cancelled at a random point
    is not shielded; the caller rolls back, and nothing of it stays, on the server or in the
    caller's pool (the connection, cut in the middle of a round trip, is discarded)."""
    h = open_harness(f"{engine_name}-async")
    caller_app = f"{h.app_name}-caller"
    if h.db.schema is not None:
        settings = {"search_path": h.db.schema, "application_name": caller_app}
        aengine = create_async_engine(h.db.url, connect_args={"server_settings": settings})
    else:
        aengine = create_async_engine(h.db.url)
    h.db.engines.append(aengine.sync_engine)
    rng = random.Random(f"caller-cancel-{engine_name}")
    completed: list[str] = []

    async def rounds() -> int:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        cancelled = 0
        for i in range(ROUNDS // 2):
            key = f"cancelled-{i}"
            async with aengine.connect() as conn:
                try:
                    # A fresh key in the caller's transaction on PostgreSQL is one round
                    # trip (no history DELETE since the reserve tells an insert): the window
                    # stays inside the call.
                    await asyncio.wait_for(
                        h.store.reserve(T, OP, key, OWNER, FP, connection=conn),
                        rng.uniform(5e-5, 1.5e-3),
                    )
                except TimeoutError:
                    cancelled += 1
                    await conn.rollback()
                else:
                    await conn.commit()
                    completed.append(key)
            async with aengine.begin() as conn:
                acked = await h.store.reserve(T, OP, f"acked-{i}", OWNER, FP, connection=conn)
                assert isinstance(acked, Reserved)
            assert h.observer.keys([f"acked-{i}"]) == {f"acked-{i}"}, f"round {i}"
        gc.collect()
        await asyncio.sleep(0)
        loop.set_exception_handler(None)
        assert reported == []
        assert aengine.sync_engine.pool.checkedout() == 0
        if h.db.schema is not None:  # the caller's pooled sessions: none left in a transaction
            states = [state for _, state, *_ in h.observer.sessions(caller_app)]
            assert not [s for s in states if s.startswith("idle in transaction")], states
        await aengine.dispose()
        return cancelled

    assert h.loop is not None
    with contextlib.ExitStack() as stack:
        if h.db.schema is None:
            stack.enter_context(write_contention(h.observer.path, engine_name))
        cancelled = h.loop.run(rounds(), timeout=120)
    assert cancelled >= 10, f"only {cancelled} calls were cancelled: no proof"
    # Exactly the calls whose caller committed are there.
    all_cancelled = [f"cancelled-{i}" for i in range(ROUNDS // 2)]
    assert h.observer.keys(all_cancelled) == set(completed)
    if h.db.schema is None:
        assert h.observer.write_lock_is_free()
    assert [r for r in caplog.records if "never retrieved" in r.getMessage()] == []


def test_an_interrupt_keeps_a_memory_database() -> None:
    """An interrupt in the middle of a SQLite operation rolls it back and keeps the connection:
    with ``sqlite://`` (in memory, one connection) discarding it would throw the database
    away."""
    store = IdempotencyStore.from_url("sqlite://", migrate=True)
    assert isinstance(store.reserve(T, OP, "kept", OWNER, FP), Reserved)
    interrupted = 0
    with Interrupter(random.Random("memory"), 1e-5, 3e-4) as interrupter:
        for i in range(ROUNDS):
            interrupted += interrupter.call(store.reserve, T, OP, f"interrupted-{i}", OWNER, FP)
    assert interrupted >= 10, f"only {interrupted} calls were interrupted: no proof"
    assert store.get(T, OP, "kept") is not None
    store.close()


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
    CLOSE_ON["at"] = at
    try:
        assert isinstance(h.reserve("during"), Reserved)
    finally:
        armed, CLOSE_ON["at"] = CLOSE_ON["at"], None
    assert armed is None, "the connection was not closed: no proof"
    closed = [c for c in h.dbapi_connections if not sqlite_is_open(c)]
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


@pytest.mark.parametrize("engine_name", ENGINES)
def test_first_calls_at_once_migrate_once(
    engine_name: str, make_database: Callable[[str], Database]
) -> None:
    """A store opened with migrate=True whose first calls come all at once: one migration,
    every call answered (two Alembic upgrades interleaved on one event loop deadlock)."""
    db = make_database(engine_name)

    async def scenario() -> list[Any]:
        store = db.async_store(migrate=True)
        try:
            calls = (store.reserve(T, OP, f"first-{i}", OWNER, FP) for i in range(8))
            return list(await asyncio.wait_for(asyncio.gather(*calls), PATIENCE))
        finally:
            await store.close()

    assert all(isinstance(r, Reserved) for r in asyncio.run(scenario()))
