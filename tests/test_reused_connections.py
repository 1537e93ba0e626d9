"""The sync store on SQLite keeps a connection whose transaction ended for its next operation
(no pool checkout per operation), gives it back to the pool once idle, and sends every other
connection back through the pool or away as before."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from idemstore import IdempotencyStore, LeaseLostError, Reserved, TenantContext, create_engine
from idemstore.db.runner import REUSED_MAX

T = TenantContext.explicit_user_workspace("org-a", "ws-a", None, "actor-a")


def _store(tmp_path: Path, **engine_options: object) -> tuple[IdempotencyStore, sa.Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'keys.db'}", **engine_options)
    store = IdempotencyStore(engine)
    store.migrate()
    return store, engine


def _wait_for(condition: object, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.005)
    return False


def test_one_connection_serves_a_run_of_operations_then_goes_back(tmp_path: Path) -> None:
    store, engine = _store(tmp_path)
    connects = []
    sa.event.listen(engine, "connect", lambda *_: connects.append(1))
    for i in range(50):
        assert isinstance(store.reserve(T, "op", f"k{i}", "o", "fp"), Reserved)
        # Kept between operations, in no transaction, not another connection each time.
        assert engine.pool.checkedout() == 1
    assert len(connects) <= 1
    # Idle: back in the pool, out of any transaction.
    assert _wait_for(lambda: engine.pool.checkedout() == 0)
    with engine.connect() as conn:
        assert conn.connection.dbapi_connection.in_transaction is False  # type: ignore[union-attr]
    store.close()
    engine.dispose()


def test_close_gives_idle_connections_back_at_once(tmp_path: Path) -> None:
    store, engine = _store(tmp_path)
    store.reserve(T, "op", "k", "o", "fp")
    assert engine.pool.checkedout() == 1
    store.close()
    assert engine.pool.checkedout() == 0
    engine.dispose()


def test_a_failed_operation_sends_its_connection_back_through_the_pool(tmp_path: Path) -> None:
    store, engine = _store(tmp_path)
    reserved = store.reserve(T, "op", "k", "o", "fp", lease=60_000)
    assert isinstance(reserved, Reserved)
    assert engine.pool.checkedout() == 1
    with pytest.raises(LeaseLostError):
        store.renew(T, "op", "k", "1", lease=60_000)  # a token that names no reservation
    # Not kept: the pool took it back (and its reset rolled it back) at once.
    assert engine.pool.checkedout() == 0
    store.close()
    engine.dispose()


def test_threads_share_the_kept_connections_without_sharing_one(tmp_path: Path) -> None:
    store, engine = _store(tmp_path)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(100):
                assert isinstance(store.reserve(T, "op", f"t{n}-{i}", "o", "fp"), Reserved)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert store.stats().total == 600
    assert engine.pool.checkedout() <= REUSED_MAX
    assert _wait_for(lambda: engine.pool.checkedout() == 0)
    store.close()
    engine.dispose()


@pytest.mark.parametrize("option", ["small pool", "caller's checkout listener"])
def test_no_reuse_where_the_pool_has_no_room_or_the_caller_watches_it(
    tmp_path: Path, option: str
) -> None:
    if option == "small pool":
        store, engine = _store(tmp_path, pool_size=1)
    else:
        engine = create_engine(f"sqlite:///{tmp_path / 'keys.db'}")
        seen = []
        sa.event.listen(engine.pool, "checkout", lambda *_: seen.append(1))
        store = IdempotencyStore(engine)
        store.migrate()
    store.reserve(T, "op", "k", "o", "fp")
    assert engine.pool.checkedout() == 0
    if option != "small pool":
        before = len(seen)
        store.reserve(T, "op", "k2", "o", "fp")
        assert len(seen) == before + 1  # the caller's listener saw this operation's checkout
    store.close()
    engine.dispose()


def test_a_forked_child_never_uses_the_parents_kept_connection(tmp_path: Path) -> None:
    """After ``fork`` (a pre-forking server), the child opens its own connections: SQLite
    forbids carrying one across a fork, and the parent keeps using its own."""
    import os

    store, engine = _store(tmp_path)
    store.reserve(T, "op", "parent-1", "o", "fp")
    assert engine.pool.checkedout() == 1  # kept
    source = store._source  # the store's connection source
    parents = {id(p.dbapi_connection) for p in source._idle}  # type: ignore[attr-defined]
    assert parents
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        code = 1
        try:
            taken = source.acquire()
            fresh = id(taken.dbapi_connection) not in parents
            source.release(taken, clean=True)
            reserved = isinstance(store.reserve(T, "op", "child-1", "o", "fp"), Reserved)
            code = 0 if fresh and reserved else 2
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"\x00"
    os.close(read)
    # The parent goes on with its own kept connection.
    assert isinstance(store.reserve(T, "op", "parent-2", "o", "fp"), Reserved)
    assert sorted(
        r.key for r in [store.get(T, "op", k) for k in ("parent-1", "child-1", "parent-2")] if r
    ) == ["child-1", "parent-1", "parent-2"]
    store.close()
    engine.dispose()
