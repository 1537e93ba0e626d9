"""Where the async store runs its synchronous operations, and what cancellation and closing do
to them: :class:`GreenletTasks` (the AsyncEngine's own connections, through SQLAlchemy's
greenlet bridge) and :class:`WorkerThreads` (SQLite: the stdlib driver on worker threads).

Both keep the same promises, so the facade does not care which one runs:

- An operation in idemstore's own transaction is never interrupted half-way through a database
  round trip. A caller cancelled while it waits gets its ``CancelledError`` at once; the
  operation itself runs to its end (it commits or rolls back) and its connection goes back to
  the pool clean, or it had not started and never will. Nothing it raises goes unretrieved.
- :meth:`aclose` refuses new work (:class:`~idemstore.errors.StoreClosedError`), waits for the
  work already accepted, and never blocks the event loop while it does.

Group commit (SQLite, ``group_commit=True``) is here too, whole: :class:`WorkerThreads` then
sends writes to one writer thread, whose queue is where a group forms (whatever queued while
the last transaction ran), and :func:`run_group` runs a group in one transaction, each call in
a savepoint of its own, and settles every call after the one commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

import sqlalchemy as sa
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from ..errors import StoreClosedError
from .driver import Driver, is_disconnect, translated_errors
from .ops import Call
from .runner import ConnectionSource, run_owned

T = TypeVar("T")
Q = TypeVar("Q")

#: A worker thread that has had nothing to do for this long gives its connection back.
IDLE_GIVE_BACK_S: Final = 0.05

#: Group commit: at most this many writes share one transaction (the rest wait for the next).
#: It bounds how long one transaction holds the write lock and how many calls one failed
#: COMMIT fails. Measured with 128 callers at FULL (alternating 0.5 s rounds): a cap of 16
#: made 0.7x the reservations a second of 64; 128 and 256 were within the noise of 64 (two
#: identical settings differed by up to 30% on the shared 2-CPU machine).
MAX_GROUP: Final = 64


def closed_error() -> StoreClosedError:
    return StoreClosedError("the store is closed: open a new one (close() was called)")


class GreenletTasks:
    """Operations on ``engine`` (an AsyncEngine's ``sync_engine``) through the greenlet bridge,
    each as a task of its own, which a cancelled caller stops waiting for but does not cut.

    Why a task: a ``CancelledError`` thrown into a greenlet in the middle of a driver call
    leaves the driver half-way (asyncpg: a ``BEGIN`` sent whose transaction the adapter never
    recorded, so that every later statement ran in a savepoint of a transaction nobody
    committed). The caller may go; the round trip may not be cut. (``asyncio.shield`` would do
    the same with one more loop iteration per operation: the task settles the caller's future
    itself.)
    """

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in one hop on the greenlet bridge, run to its end whatever happens to
        the caller."""
        if self._closed:
            raise closed_error()
        result: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(_settle_with(result, fn, args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await result

    async def run_call(self, call: Call[T], busy_timeout_ms: int | None) -> T:
        """An operation in a transaction of its own."""
        return await self.run(run_owned, self._engine, call, busy_timeout_ms)

    async def aclose(self) -> None:
        """Refuse new work; wait (without blocking the loop) for the operations in flight."""
        self._closed = True
        while self._tasks:
            await asyncio.wait(set(self._tasks))


async def _settle_with(
    result: asyncio.Future[T], fn: Callable[..., T], args: tuple[Any, ...]
) -> None:
    """Run ``fn(*args)`` on the greenlet bridge to its end and hand its outcome to ``result``,
    unless the caller has gone (``result`` cancelled): then nothing is set on it, and nothing
    is left unretrieved. The task itself ends without an error (unless the loop cancels it,
    at shutdown, or a KeyboardInterrupt goes through it)."""
    try:
        value = await greenlet_spawn(fn, *args)
    except BaseException as error:
        if not result.done():
            if isinstance(error, asyncio.CancelledError):
                result.cancel()
            else:
                result.set_exception(error)
        if not isinstance(error, Exception):  # CancelledError, KeyboardInterrupt: the loop's to see
            raise
    else:
        if not result.done():
            result.set_result(value)


class _HeldConnection(ConnectionSource):
    """A worker thread's connection: kept checked out while the thread is busy (no pool
    checkout per operation), given back when it goes idle or an operation fails."""

    def __init__(self, engine: sa.Engine) -> None:
        super().__init__(engine)
        self._held: PoolProxiedConnection | None = None

    def acquire(self) -> PoolProxiedConnection:
        if self._held is None:
            self._held = self.engine.raw_connection()
        return self._held

    def release(self, pooled: PoolProxiedConnection, *, clean: bool) -> None:
        if not clean:  # back to the pool, which resets it
            self._held = None
            pooled.close()

    def discard(self, pooled: PoolProxiedConnection, error: BaseException) -> None:
        self._held = None
        super().discard(pooled, error)

    def give_back(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.close()


_WorkItem = tuple[
    Callable[..., Any], tuple[Any, ...], asyncio.AbstractEventLoop, "asyncio.Future[Any]"
]
#: A write waiting for the group-commit writer: the call, the lock wait, where to answer.
_WriteItem = tuple["Call[Any]", "int | None", asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class WorkerThreads:
    """SQLite's offload: each operation runs whole on a worker thread, one hop.

    Cheaper than ``loop.run_in_executor`` on a ThreadPoolExecutor (measured on 2 cores: about
    50 against 120 microseconds a hop): a plain queue in, ``call_soon_threadsafe`` out. A
    thread runs what it takes to its end; a caller cancelled before its operation started
    leaves nothing (the thread skips it), one cancelled later gets nothing delivered. Each
    thread keeps one pooled connection of ``engine`` while it has work
    (:class:`_HeldConnection`).

    Writes (``Call`` objects of mode ``"write"`` not marked ``alone``) go to one writer
    thread of their own (unless ``writer=False``: an in-memory database, whose one connection
    the one thread holds). SQLite runs one writer at a time anyway, and one connection that
    does all the writing keeps its page cache, which another connection's commit would
    have made it drop: one caller reserving at NORMAL, 160-170 against 190 us a reservation
    and 100 against 150 us of CPU, measured alternating 40-call chunks with the writes spread
    over the 4 threads (as before). Reads, and writes marked ``alone``, run on the other
    threads.

    With ``group_commit``, the writer takes the first write queued and every other already
    queued behind it (at most ``max_group``: no timer, nothing waited for), and runs them as
    one group (:func:`run_group`): one transaction, one COMMIT. A write that finds the writer
    idle runs alone, exactly as without group commit. Without it, each write has a
    transaction of its own, one after the other.
    """

    def __init__(
        self,
        engine: sa.Engine,
        count: int,
        *,
        writer: bool = True,
        group_commit: bool = False,
        max_group: int = MAX_GROUP,
    ) -> None:
        self._engine = engine
        self._count = count
        self._queue: queue.SimpleQueue[_WorkItem | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._closed = False
        self.writer = writer or group_commit
        self.group_commit = group_commit
        self._max_group = max(1, max_group) if group_commit else 1
        self._writes: queue.SimpleQueue[_WriteItem | None] = queue.SimpleQueue()
        #: Group commit so far: transactions that ran more than one write, and those writes.
        self.groups = 0
        self.grouped_calls = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a worker thread."""
        if not self._threads:
            self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:  # no item may follow the threads' stop signal
            if self._closed:
                raise closed_error()
            self._queue.put((fn, args, loop, future))
        return await future

    async def run_call(self, call: Call[T], busy_timeout_ms: int | None) -> T:
        """An operation in a transaction of its own, on the thread's connection (with group
        commit, a write in the transaction of its group)."""
        if self.writer and call.mode == "write" and not call.alone:
            if not self._threads:
                self._start()
            loop = asyncio.get_running_loop()
            future: asyncio.Future[T] = loop.create_future()
            with self._lock:
                if self._closed:
                    raise closed_error()
                self._writes.put((call, busy_timeout_ms, loop, future))
            return await future
        return await self.run(self._run_call, call, busy_timeout_ms)

    def _run_call(self, call: Call[T], busy_timeout_ms: int | None) -> T:
        source: _HeldConnection = self._local.source
        return run_owned(self._engine, call, busy_timeout_ms, source)

    def _start(self) -> None:
        with self._lock:
            if self._threads or self._closed:
                return
            for n in range(self._count):
                thread = threading.Thread(target=self._work, name=f"idemstore-{n}", daemon=True)
                thread.start()
                self._threads.append(thread)
            if self.writer:
                thread = threading.Thread(target=self._write, name="idemstore-writer", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _work(self) -> None:
        source = self._local.source = _HeldConnection(self._engine)
        try:
            while True:
                item = _next_or_give_back(self._queue, source)
                if item is None:
                    return
                fn, args, loop, future = item
                if future.cancelled():
                    continue
                try:
                    result = fn(*args)
                except BaseException as error:
                    _deliver(loop, future, None, error)
                else:
                    _deliver(loop, future, result, None)
                del item, fn, args, future
        finally:
            source.give_back()

    def _write(self) -> None:
        """The writer thread; with group commit, a group is whatever queued while the last
        one ran."""
        source = _HeldConnection(self._engine)
        try:
            while True:
                item = _next_or_give_back(self._writes, source)
                if item is None:
                    return
                group = [item]
                stop = False
                while len(group) < self._max_group:
                    try:
                        more = self._writes.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:  # closing: this group still runs
                        stop = True
                        break
                    group.append(more)
                # A caller cancelled before its group starts is dropped; one cancelled later
                # is committed or not with its group, and gets nothing delivered.
                live = [each for each in group if not each[3].cancelled()]
                if live:
                    self._commit_group(live, source)
                del item, group, live
                if stop:
                    return
        finally:
            source.give_back()

    def _commit_group(self, items: list[_WriteItem], source: _HeldConnection) -> None:
        busy_timeout_ms = items[0][1]
        if len(items) == 1:  # a lone write: its own transaction, as without group commit
            call, _, loop, future = items[0]
            try:
                result = run_owned(self._engine, call, busy_timeout_ms, source)
            except BaseException as error:
                _deliver(loop, future, None, error)
            else:
                _deliver(loop, future, result, None)
            return
        self.groups += 1
        self.grouped_calls += len(items)
        group = run_group([each[0] for each in items], self._engine.dialect, busy_timeout_ms)
        try:
            settled = run_owned(self._engine, group, busy_timeout_ms, source)
        except BaseException as error:  # BEGIN or COMMIT failed: no call of the group holds
            settled = [(None, error)] * len(items)
        # One wake-up of each event loop for the whole group, not one per call: 32 callers
        # at FULL made 1.22x the reservations a second (median of 8 alternating 0.5 s
        # rounds against per-call delivery, same store and file; 1.16x at NORMAL).
        by_loop: dict[asyncio.AbstractEventLoop, list[_Settling]] = {}
        for (_, _, loop, future), (result, failure) in zip(items, settled, strict=True):
            by_loop.setdefault(loop, []).append((future, result, failure))
        for loop, settling in by_loop.items():
            _deliver_all(loop, settling)

    async def aclose(self) -> None:
        """Refuse new work; let the threads finish what was queued, then give back their
        connections and close the engine's, all off the event loop."""
        with self._lock:
            self._closed = True
            threads, self._threads = self._threads, []
            for _ in range(self._count if threads else 0):
                self._queue.put(None)
            if threads and self.writer:
                self._writes.put(None)

        def stop() -> None:
            for thread in threads:
                thread.join()
            self._engine.dispose()  # closing SQLite's last connection checkpoints the WAL

        await off_loop(stop)


#: The savepoint each call of a group runs in (released before the next call starts).
GROUP_SAVEPOINT: Final = "idemstore_group_call"

Settled = tuple[Any, "BaseException | None"]


def run_group(
    calls: list[Call[Any]], dialect: sa.Dialect, busy_timeout_ms: int | None
) -> Call[list[Settled]]:
    """One ``Call`` that runs ``calls`` one after the other in one transaction, each in a
    savepoint of its own, and returns each one's ``(result, None)`` or ``(None, error)``.

    A call that fails on its own (a constraint, a trigger) is rolled back to its savepoint and
    gets its error (translated as :func:`~idemstore.db.driver.translated_errors` does); the
    others go on. A lost connection, or an error after which the savepoint cannot be rolled
    back to (SQLite rolled the whole transaction back: a full disk, an I/O error), fails the
    whole group: raised, so that :func:`~idemstore.db.runner.run_owned` rolls back (and runs
    the group again on another connection when nothing can have committed) and every call gets
    the error. The COMMIT is ``run_owned``'s: if it fails, every call gets its error.
    """

    def run(d: Driver) -> list[Settled]:
        settled: list[Settled] = []
        for call in calls:
            d.run_sql(f"SAVEPOINT {GROUP_SAVEPOINT}")
            try:
                result = call.run(d)
            except Exception as error:
                if is_disconnect(dialect, error, d.dbapi):
                    raise
                try:
                    d.run_sql(f"ROLLBACK TO SAVEPOINT {GROUP_SAVEPOINT}")
                    d.run_sql(f"RELEASE SAVEPOINT {GROUP_SAVEPOINT}")
                except Exception:
                    raise error from None
                settled.append((None, _translated(error, dialect, busy_timeout_ms)))
            else:
                d.run_sql(f"RELEASE SAVEPOINT {GROUP_SAVEPOINT}")
                settled.append((result, None))
        return settled

    return Call("write", run)


def _translated(error: Exception, dialect: sa.Dialect, busy_timeout_ms: int | None) -> Exception:
    """``error`` as the caller would have got it from a transaction of its own."""
    try:
        with translated_errors(dialect, busy_timeout_ms):
            raise error
    except Exception as translated:
        return translated


def _next_or_give_back(items: queue.SimpleQueue[Q], source: _HeldConnection) -> Q:
    """The next item of a worker's queue; a connection held for more than
    :data:`IDLE_GIVE_BACK_S` without work goes back to the pool while the worker waits."""
    try:
        return items.get(timeout=IDLE_GIVE_BACK_S)
    except queue.Empty:
        source.give_back()
        return items.get()


async def off_loop(fn: Callable[[], T]) -> T:
    """``fn()`` on a thread of its own, awaited without blocking the event loop."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        try:
            result = fn()
        except BaseException as error:
            _deliver(loop, future, None, error)
        else:
            _deliver(loop, future, result, None)

    threading.Thread(target=target, name="idemstore-close", daemon=True).start()
    return await future


_Settling = tuple["asyncio.Future[Any]", Any, "BaseException | None"]


def _deliver_all(loop: asyncio.AbstractEventLoop, settling: list[_Settling]) -> None:
    """:func:`_deliver` for many futures of one loop, in one call on it."""

    def settle() -> None:
        for future, result, error in settling:
            if future.cancelled():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(settle)


def _deliver(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any,
    error: BaseException | None,
) -> None:
    """Settle ``future`` on its loop, unless its caller has gone (cancelled): then nothing is
    set on it, so nothing can be left unretrieved."""

    def settle() -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(settle)
