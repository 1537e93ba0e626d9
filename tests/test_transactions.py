"""Keys in the caller's transaction, lock timeouts, and the schema gate."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from idemstore import (
    AsyncIdempotencyStore,
    Duplicate,
    IdempotencyStore,
    LockTimeoutError,
    Reserved,
    SchemaNotReadyError,
    TenantContext,
)

T = TenantContext.explicit_user_workspace("org-a", "ws-a", None, "actor-a")
app_meta = sa.MetaData()
orders = sa.Table("app_orders", app_meta, sa.Column("id", sa.String, primary_key=True))


def _count_orders(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(orders)).scalar_one()


@pytest.fixture
def sync_setup(database):
    store = database.sync_store()
    engine = database.sync_engine()
    app_meta.create_all(engine)
    yield store, engine
    store.close()


@pytest.mark.parametrize("kind", ["connection", "session"])
@pytest.mark.parametrize("commit", [True, False])
def test_sync_caller_transaction(sync_setup, kind, commit):
    store, engine = sync_setup
    if kind == "connection":
        conn = engine.connect()
        handle = conn
    else:
        conn = Session(engine)
        handle = conn
    try:
        result = store.reserve(T, "order.create", "o-1", "api", "fp", connection=handle)
        assert isinstance(result, Reserved)
        conn.execute(orders.insert().values(id="o-1"))
        # Inside the transaction the key is visible...
        assert store.get(T, "order.create", "o-1", connection=handle) is not None
        conn.commit() if commit else conn.rollback()
    finally:
        conn.close()
    # ...and afterwards both rows exist, or neither does.
    assert (store.get(T, "order.create", "o-1") is not None) is commit
    assert _count_orders(engine) == (1 if commit else 0)
    again = store.reserve(T, "order.create", "o-1", "api", "fp")
    assert isinstance(again, Duplicate if commit else Reserved)


@pytest.mark.parametrize("kind", ["connection", "session"])
@pytest.mark.parametrize("commit", [True, False])
def test_async_caller_transaction(database, kind, commit):
    async def scenario() -> None:
        store = database.async_store()
        await store.migrate()
        engine = database.async_engine()
        async with engine.begin() as conn:
            await conn.run_sync(app_meta.create_all)
        try:
            handle = engine.connect() if kind == "connection" else AsyncSession(engine)
            if kind == "connection":
                handle = await handle.start()
            try:
                result = await store.reserve(
                    T, "order.create", "o-1", "api", "fp", connection=handle
                )
                assert isinstance(result, Reserved)
                await handle.execute(orders.insert().values(id="o-1"))
                assert await store.get(T, "order.create", "o-1", connection=handle) is not None
                await (handle.commit() if commit else handle.rollback())
            finally:
                await handle.close()
            assert (await store.get(T, "order.create", "o-1") is not None) is commit
            async with engine.connect() as conn:
                count = (
                    await conn.execute(sa.select(sa.func.count()).select_from(orders))
                ).scalar_one()
            assert count == (1 if commit else 0)
        finally:
            await store.close()
            await engine.dispose()

    asyncio.run(scenario())


def test_caller_connection_of_the_wrong_kind_is_refused(database):
    store = database.sync_store()
    with pytest.raises(TypeError, match="Connection or Session"):
        store.get(T, "op", "k", connection=object())
    store.close()


# -- SQLite lock timeout --------------------------------------------------------------------


def _hold_write_lock(path: str) -> sqlite3.Connection:
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    return blocker


def test_sync_lock_timeout_is_an_idemstore_error(make_database):
    db = make_database("sqlite")
    store = db.sync_store(busy_timeout_ms=150)
    store.get(T, "op", "k")  # schema checked before the lock is taken
    blocker = _hold_write_lock(sa.make_url(db.url).database)
    try:
        with pytest.raises(LockTimeoutError, match="busy_timeout=150 ms"):
            store.reserve(T, "op", "k", "owner", "fp")
        assert store.get(T, "op", "k") is None  # readers are not blocked (WAL)
    finally:
        blocker.rollback()
        blocker.close()
    assert isinstance(store.reserve(T, "op", "k", "owner", "fp"), Reserved)
    store.close()


def test_async_lock_timeout_is_an_idemstore_error(make_database):
    db = make_database("sqlite")

    async def scenario() -> None:
        store = db.async_store(busy_timeout_ms=150, migrate=True)
        await store.get(T, "op", "k")
        blocker = _hold_write_lock(sa.make_url(db.url).database)
        try:
            with pytest.raises(LockTimeoutError, match="locked"):
                await store.reserve(T, "op", "k", "owner", "fp")
        finally:
            blocker.rollback()
            blocker.close()
        assert isinstance(await store.reserve(T, "op", "k", "owner", "fp"), Reserved)
        await store.close()

    asyncio.run(scenario())


# -- schema gate ----------------------------------------------------------------------------


def test_unmigrated_database_names_the_command(database):
    store = database.sync_store(migrate=False)
    with pytest.raises(SchemaNotReadyError, match="idemstore migrate"):
        store.reserve(T, "op", "k", "owner", "fp")
    store.migrate()
    assert isinstance(store.reserve(T, "op", "k", "owner", "fp"), Reserved)
    store.close()


def test_async_unmigrated_and_migrate_on_open(database):
    async def scenario() -> None:
        plain = database.async_store()
        with pytest.raises(SchemaNotReadyError, match="has no idemstore schema"):
            await plain.get(T, "op", "k")
        await plain.close()
        migrating = database.async_store(migrate=True)
        assert isinstance(await migrating.reserve(T, "op", "k", "o", "fp"), Reserved)
        await migrating.close()

    asyncio.run(scenario())


def test_database_at_another_revision_is_refused(database):
    store = database.sync_store()
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE idemstore_alembic_version SET version_num = 'zzzz_future'")
    fresh = IdempotencyStore(store.engine)
    with pytest.raises(SchemaNotReadyError, match="revision 'zzzz_future'"):
        fresh.get(T, "op", "k")
    store.close()


def test_store_accepts_its_own_engine(database):
    engine = database.sync_engine()
    store = IdempotencyStore(engine)
    store.migrate()
    assert isinstance(store.reserve(T, "op", "k", "o", "fp"), Reserved)
    store.close()  # not ours to dispose
    assert engine.pool.checkedout() == 0

    async def scenario() -> None:
        aengine = database.async_engine()
        astore = AsyncIdempotencyStore(aengine, offload="greenlet")
        assert isinstance(await astore.reserve(T, "op", "k", "o", "fp"), Duplicate)
        await astore.close()
        await aengine.dispose()

    asyncio.run(scenario())


def test_conflict_history_goes_with_a_generation_replaced_in_the_same_transaction(sync_setup):
    """A record created, conflicted and replaced after its expiry inside one caller
    transaction: the new generation has no conflict history (the reserve tells an insert
    from an update, on PostgreSQL from the returned row's xmax, also within one transaction
    and a savepoint)."""
    store, engine = sync_setup
    with engine.connect() as conn, conn.begin():
        first = store.reserve(
            T, "op", "k", "o", "fp-a", now_ms=1_000, expires_at_ms=2_000, connection=conn
        )
        assert isinstance(first, Reserved)
        conflict = store.reserve(T, "op", "k", "o", "fp-b", now_ms=1_500, connection=conn)
        assert conflict.record.conflict_fingerprints == ("fp-b",)
        with conn.begin_nested():
            fresh = store.reserve(T, "op", "k", "o", "fp-c", now_ms=2_000, connection=conn)
        assert isinstance(fresh, Reserved)
        assert fresh.record.conflict_fingerprints == ()
        assert store.get(T, "op", "k", connection=conn).conflict_fingerprints == ()
    record = store.get(T, "op", "k")
    assert record is not None and record.conflict_fingerprints == ()
    assert record.request_fingerprint == "fp-c" and record.conflict_count == 0
