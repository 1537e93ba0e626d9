"""Group commit (``AsyncIdempotencyStore(..., group_commit=True)``, SQLite): writes queued
while the writer is busy share one transaction, each in a savepoint of its own.

To form a group for certain, another connection holds SQLite's write lock: the first write
waits for it on the writer thread (``busy_timeout``) while the next ones queue behind it; when
the lock is let go, the first runs alone and the queued ones run as one group. The faults are
real ones of the database: a trigger that refuses one insert (the call fails on its own), a
deferred foreign key that SQLite checks only at COMMIT (the group's commit fails).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa

from idemstore import (
    AsyncIdempotencyStore,
    ConfigurationError,
    Conflict,
    Duplicate,
    Reserved,
    TenantContext,
)
from idemstore.db.offload import WorkerThreads

from .conftest import Database

T = TenantContext.explicit_user_workspace("org-a", "ws-a", None, "actor-a")
OP = "outbox.send"
#: Long enough for a thread to reach the point it is waiting for, on a loaded machine.
SETTLE_S = 0.2


def sqlite_path(db: Database) -> str:
    path = sa.make_url(db.url).database
    assert path
    return path


def stored_keys(db: Database) -> set[str]:
    with contextlib_closing(sqlite3.connect(sqlite_path(db))) as conn:
        return {row[0] for row in conn.execute("SELECT key FROM idemstore_records")}


@contextmanager
def contextlib_closing(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    try:
        yield conn
    finally:
        conn.close()


def offload(store: AsyncIdempotencyStore) -> WorkerThreads:
    worker = store._offload
    assert isinstance(worker, WorkerThreads)
    return worker


async def in_one_group(
    db: Database, store: AsyncIdempotencyStore, calls: list[Callable[[], Any]]
) -> tuple[Any, list[Any]]:
    """Run a first write alone while another connection holds the write lock, queue
    ``calls`` behind it, let the lock go. Returns the first's result and the others' results
    or errors; asserts that the others ran as one group."""
    worker = offload(store)
    groups_before, grouped_before = worker.groups, worker.grouped_calls
    holder = sqlite3.connect(sqlite_path(db), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        first = asyncio.ensure_future(store.reserve(T, OP, "first", "me", "fp"))
        await asyncio.sleep(SETTLE_S)  # the writer waits for the lock with "first"
        queued = [asyncio.ensure_future(call()) for call in calls]
        await asyncio.sleep(SETTLE_S)  # every call is queued behind it
        assert not first.done() and not any(q.done() for q in queued)
        holder.execute("ROLLBACK")
    finally:
        holder.close()
    first_result = await first
    results = await asyncio.gather(*queued, return_exceptions=True)
    assert worker.groups == groups_before + 1, "the queued calls did not run as one group"
    assert worker.grouped_calls == grouped_before + len(calls)
    return first_result, list(results)


@pytest.fixture
def sqlite_db(make_database: Callable[[str], Database]) -> Database:
    return make_database("sqlite")


def open_store(db: Database) -> AsyncIdempotencyStore:
    return db.async_store(group_commit=True)


def test_one_failing_call_rolls_back_only_its_savepoint(sqlite_db: Database) -> None:
    async def scenario() -> None:
        store = open_store(sqlite_db)
        await store.migrate()
        with contextlib_closing(sqlite3.connect(sqlite_path(sqlite_db))) as conn:
            conn.executescript(
                """
                CREATE TRIGGER poison BEFORE INSERT ON idemstore_records
                WHEN NEW.key = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned key'); END;
                CREATE TRIGGER poison_fp BEFORE INSERT ON idemstore_conflict_fingerprints
                WHEN NEW.fingerprint = 'poison-fp'
                BEGIN SELECT RAISE(ABORT, 'poisoned fingerprint'); END;
                """
            )
        try:
            # "poison" fails in its first statement; the last call fails in its second, after
            # its upsert counted a conflict on "a": its savepoint takes that back
            keys = ["a", "b", "poison", "c", "a", "a", "a"]
            fingerprints = ["fp", "fp", "fp", "fp", "fp", "other", "poison-fp"]
            first, results = await in_one_group(
                sqlite_db,
                store,
                [
                    lambda k=k, f=f: store.reserve(T, OP, k, "me", f)
                    for k, f in zip(keys, fingerprints, strict=True)
                ],
            )
            assert isinstance(first, Reserved)
            assert [type(r) for r in results] == [
                Reserved,
                Reserved,
                sa.exc.IntegrityError,
                Reserved,
                Duplicate,
                Conflict,
                sa.exc.IntegrityError,
            ]
            assert "poisoned key" in str(results[2])
            assert "poisoned fingerprint" in str(results[6])
            # the answers are those of the calls one after the other: the conflict was
            # counted once, in the same transaction as the reservation it conflicts with
            assert results[5].record.conflict_count == 1
            assert results[5].record.conflict_fingerprints == ("other",)
            assert stored_keys(sqlite_db) == {"first", "a", "b", "c"}
            record = await store.get(T, OP, "a")
            assert record is not None and record.conflict_count == 1
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_failed_commit_fails_every_call_of_the_group(sqlite_db: Database) -> None:
    async def scenario() -> None:
        store = open_store(sqlite_db)
        await store.migrate()
        with contextlib_closing(sqlite3.connect(sqlite_path(sqlite_db))) as conn:
            conn.executescript(
                """
                CREATE TABLE trap_target (id TEXT PRIMARY KEY);
                CREATE TABLE trap (ref TEXT REFERENCES trap_target (id)
                                   DEFERRABLE INITIALLY DEFERRED);
                CREATE TRIGGER trap_insert AFTER INSERT ON idemstore_records
                WHEN NEW.key = 'trap' BEGIN INSERT INTO trap VALUES ('nothing'); END;
                """
            )
        try:
            keys = ["a", "b", "trap", "c"]
            first, results = await in_one_group(
                sqlite_db, store, [lambda k=k: store.reserve(T, OP, k, "me", "fp") for k in keys]
            )
            assert isinstance(first, Reserved)
            # every call of the group gets the COMMIT's error, none was acknowledged ...
            assert all(isinstance(r, sa.exc.IntegrityError) for r in results), results
            assert all("FOREIGN KEY" in str(r) for r in results)
            # ... and none committed
            assert stored_keys(sqlite_db) == {"first"}
            # the writer goes on: the same keys, now without the trap, each alone
            for key in ("a", "b", "c"):
                assert isinstance(await store.reserve(T, OP, key, "me", "fp"), Reserved)
            assert stored_keys(sqlite_db) == {"first", "a", "b", "c"}
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_call_cancelled_before_its_group_started_leaves_nothing(sqlite_db: Database) -> None:
    async def scenario() -> None:
        store = open_store(sqlite_db)
        await store.migrate()
        try:
            holder = sqlite3.connect(sqlite_path(sqlite_db), isolation_level=None)
            try:
                holder.execute("BEGIN IMMEDIATE")
                first = asyncio.ensure_future(store.reserve(T, OP, "first", "me", "fp"))
                await asyncio.sleep(SETTLE_S)
                queued = {
                    k: asyncio.ensure_future(store.reserve(T, OP, k, "me", "fp"))
                    for k in ("a", "gone", "b")
                }
                await asyncio.sleep(SETTLE_S)
                queued["gone"].cancel()
                await asyncio.sleep(0)
                holder.execute("ROLLBACK")
            finally:
                holder.close()
            assert isinstance(await first, Reserved)
            assert isinstance(await queued["a"], Reserved)
            assert isinstance(await queued["b"], Reserved)
            assert queued["gone"].cancelled()
            assert stored_keys(sqlite_db) == {"first", "a", "b"}
            assert offload(store).grouped_calls == 2  # "a" and "b"; "gone" was dropped
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_lone_write_runs_in_a_transaction_of_its_own(sqlite_db: Database) -> None:
    async def scenario() -> None:
        store = open_store(sqlite_db)
        await store.migrate()
        try:
            assert store.group_commit
            for i in range(20):
                assert isinstance(await store.reserve(T, OP, f"k{i}", "me", "fp"), Reserved)
                assert isinstance(await store.reserve(T, OP, f"k{i}", "me", "fp"), Duplicate)
            assert offload(store).groups == 0
            assert stored_keys(sqlite_db) == {f"k{i}" for i in range(20)}
        finally:
            await store.close()

    asyncio.run(scenario())


def test_callers_transaction_bypasses_the_group(sqlite_db: Database) -> None:
    async def scenario() -> None:
        store = open_store(sqlite_db)
        await store.migrate()
        try:
            async with store.engine.connect() as conn:
                await store.reserve(T, OP, "mine", "me", "fp", connection=conn)
                await conn.rollback()
            assert await store.get(T, OP, "mine") is None
            async with store.engine.begin() as conn:
                await store.reserve(T, OP, "kept", "me", "fp", connection=conn)
            assert stored_keys(sqlite_db) == {"kept"}
            assert offload(store).groups == 0
        finally:
            await store.close()

    asyncio.run(scenario())


def test_group_commit_with_the_greenlet_offload_is_refused(sqlite_db: Database) -> None:
    with pytest.raises(ConfigurationError, match="offload='thread'"):
        AsyncIdempotencyStore.from_url(sqlite_db.url, group_commit=True, offload="greenlet")


def test_group_commit_on_postgresql_changes_nothing(
    make_database: Callable[[str], Database],
) -> None:
    db = make_database("postgresql")

    async def scenario() -> None:
        store = db.async_store(group_commit=True, migrate=True)
        try:
            assert not store.group_commit
            results = await asyncio.gather(
                *(store.reserve(T, OP, f"k{i % 4}", "me", f"fp{i % 3}") for i in range(24))
            )
            assert sum(isinstance(r, Reserved) for r in results) == 4
        finally:
            await store.close()

    asyncio.run(scenario())
