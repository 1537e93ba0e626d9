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

A later "group commit" (queued SQLite writes sharing one transaction) belongs in
:class:`WorkerThreads`: its queue is where the batch forms.
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
from .ops import Call
from .runner import ConnectionSource, run_owned

T = TypeVar("T")

#: A worker thread that has had nothing to do for this long gives its connection back.
IDLE_GIVE_BACK_S: Final = 0.05


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


class WorkerThreads:
    """SQLite's offload: each operation runs whole on a worker thread, one hop.

    Cheaper than ``loop.run_in_executor`` on a ThreadPoolExecutor (measured on 2 cores: about
    50 against 120 microseconds a hop): a plain queue in, ``call_soon_threadsafe`` out. A
    thread runs what it takes to its end; a caller cancelled before its operation started
    leaves nothing (the thread skips it), one cancelled later gets nothing delivered. Each
    thread keeps one pooled connection of ``engine`` while it has work
    (:class:`_HeldConnection`).
    """

    def __init__(self, engine: sa.Engine, count: int) -> None:
        self._engine = engine
        self._count = count
        self._queue: queue.SimpleQueue[_WorkItem | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._closed = False

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
        """An operation in a transaction of its own, on the thread's connection."""
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

    def _work(self) -> None:
        source = self._local.source = _HeldConnection(self._engine)
        try:
            while True:
                try:
                    item = self._queue.get(timeout=IDLE_GIVE_BACK_S)
                except queue.Empty:
                    source.give_back()
                    item = self._queue.get()
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

    async def aclose(self) -> None:
        """Refuse new work; let the threads finish what was queued, then give back their
        connections and close the engine's, all off the event loop."""
        with self._lock:
            self._closed = True
            threads, self._threads = self._threads, []
            for _ in threads:
                self._queue.put(None)

        def stop() -> None:
            for thread in threads:
                thread.join()
            self._engine.dispose()  # closing SQLite's last connection checkpoints the WAL

        await off_loop(stop)


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
