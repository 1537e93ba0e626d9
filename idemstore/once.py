"""Work that runs once: :func:`run_once` (sync store), :func:`run_once_async` (async store)
and the :func:`idempotent` decorator, on top of the facades' ``reserve``/``renew``/``complete``/
``release`` (both facades also have them as the method ``run_once``).

What it does with each answer of ``reserve``:

- ``Reserved(record, token)``: runs ``work``; with a lease, renews it every third of the
  lease while ``work`` runs; then ``complete(..., token=token)`` and returns the outcome. A
  lease lost meanwhile (the holder stalled past its end and another caller re-claimed the
  key) makes that ``complete`` write nothing and raise :class:`~idemstore.LeaseLostError`:
  never a silent overwrite. ``work`` is not interrupted when a renewal fails; its outcome is
  refused. If ``work`` raises (or the call is interrupted or cancelled while it runs), the
  reservation is released with the token (the key is free for a retry at once) and the error
  propagates.
- ``Duplicate`` with an outcome: the stored outcome, without calling ``work``.
- ``Duplicate`` without an outcome (someone else's live reservation): with ``wait``, polls
  the record (a read, with back-off from 20 ms up to 500 ms, never sleeping past the
  holder's lease end or the wait) until it has an outcome (returned) or its lease ends (then
  reserves again: the re-claim); otherwise, or when ``wait`` runs out,
  :class:`~idemstore.InProgressError` with the record and its lease end.
- ``Conflict``: :class:`~idemstore.ConflictError` with the record.

Renewal: the sync store renews from a daemon thread (``idemstore-renew``, one for the
process, see :class:`_Renewer`), each renewal a transaction of its own on a connection of the
store's pool (not the thread that runs ``work``, whose own transaction it never touches); the
async store from a task on the same loop. A renewal that fails for another reason than a
lost lease (a lock timeout, a lost connection) is tried again at the next interval; the
``complete`` at the end is what decides.

Cancellation (async): cancelled while ``work`` runs, the reservation is released with the
token (the release itself runs to its end even if the caller goes). Cancelled while reserving,
a reservation that had committed is left to its lease (then re-claimed) or, without a lease,
stays reserved as in the Rust store. Cancelled while completing, the completion commits or
not as a whole.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from . import rules
from .errors import ConflictError, InProgressError, InvalidInputError, LeaseLostError
from .model import Conflict, IdempotencyRecord, Outcome, Reserved, TenantContext

if TYPE_CHECKING:
    from .aio import AsyncIdempotencyStore
    from .store import IdempotencyStore

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

#: ``work`` of the sync store, and of the async store (an ``Outcome`` or an awaitable of one).
Work = Callable[[], Outcome]
AsyncWork = Callable[[], Outcome | Awaitable[Outcome]]
#: Polls of a live reservation start this far apart (seconds) and double up to the maximum.
FIRST_POLL_S = 0.02
MAX_POLL_S = 0.5


def _wait_s(wait: rules.Duration | None) -> float | None:
    """``wait`` in seconds; None (or 0) for "do not wait"."""
    if wait is None or (isinstance(wait, int | timedelta) and not wait):
        return None
    return rules.duration_ms(wait, "wait") / 1000


class _Waiting:
    """The polling of another caller's live reservation: when to look again, and when to stop."""

    def __init__(self, wait: rules.Duration | None) -> None:
        seconds = _wait_s(wait)
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.delay = FIRST_POLL_S

    def next_sleep(self, record: IdempotencyRecord) -> float:
        """How long to sleep before looking at ``record`` again; raises
        :class:`InProgressError` when the wait is over (or there is none)."""
        left = None if self.deadline is None else self.deadline - time.monotonic()
        if left is None or left <= 0:
            raise _in_progress(record)
        sleep = min(self.delay * random.uniform(0.5, 1.0), left)
        lease_end = record.in_progress_until_ms
        if lease_end is not None:  # look again right when the lease ends
            sleep = min(sleep, max(0.001, (lease_end - rules.now_ms() + 1) / 1000))
        self.delay = min(self.delay * 2, MAX_POLL_S)
        return sleep


def _in_progress(record: IdempotencyRecord) -> InProgressError:
    until = record.in_progress_until_ms
    when = (
        f"its lease ends at {until} ms since the epoch"
        if until is not None
        else "it was reserved without a lease (no end known)"
    )
    return InProgressError(
        f"{record.operation!r} key {record.key!r} is in progress by {record.owner!r}: {when}; "
        "retry later (or pass wait=)",
        record=record,
    )


def _conflict(record: IdempotencyRecord) -> ConflictError:
    return ConflictError(
        f"{record.operation!r} key {record.key!r} was used for another request (fingerprint "
        f"{record.request_fingerprint!r}): use another key for this one",
        record=record,
    )


def _look_again(record: IdempotencyRecord | None, fingerprint: str) -> bool | Outcome:
    """After a poll: the outcome to return, True to reserve again (gone, replaced, expired or
    lease ended: the reserve decides), False to keep waiting."""
    if record is None or record.request_fingerprint != fingerprint:
        return True
    now = rules.now_ms()
    if record.expires_at_ms is not None and record.expires_at_ms <= now:
        return True
    if record.outcome is not None:
        return record.outcome
    until = record.in_progress_until_ms
    return until is not None and until <= now


def _renew_every_s(lease: rules.Duration) -> float:
    return rules.duration_ms(lease, "lease") / 3000


def _release_quietly(release: Callable[[], object], error: BaseException) -> None:
    try:
        release()
    except Exception as release_error:  # the work's error is the one to see
        error.add_note(f"idemstore: releasing the reservation failed too: {release_error}")


def run_once(
    store: IdempotencyStore,
    tenant: TenantContext,
    operation: str,
    key: str,
    work: Work,
    *,
    owner: str,
    request_fingerprint: str,
    lease: rules.Duration | None = None,
    ttl: rules.Duration | None = None,
    wait: rules.Duration | None = None,
    first_seen_event_id: str | None = None,
) -> Outcome:
    """Run ``work`` once for this key (see the module docstring for each case).

    Parameters are ``reserve``'s; ``work`` is a callable returning an
    :class:`~idemstore.Outcome`; ``wait`` (``timedelta`` or int ms, None or 0: do not wait)
    bounds the wait for another caller's live reservation.

    Returns the key's outcome: the one ``work`` produced, or the one stored before.

    Raises :class:`~idemstore.InProgressError` (another caller holds the key, past ``wait``),
    :class:`~idemstore.ConflictError` (the key belongs to another request),
    :class:`~idemstore.LeaseLostError` (this call's lease ended and another caller
    re-claimed the key: ``work``'s outcome was not stored), ``work``'s own exception (after
    releasing the key), :class:`~idemstore.InvalidInputError` for bad arguments."""
    if not callable(work):
        raise InvalidInputError(f"work must be a callable returning an Outcome, not {work!r}")
    waiting = _Waiting(wait)
    while True:
        result = store.reserve(
            tenant,
            operation,
            key,
            owner,
            request_fingerprint,
            first_seen_event_id=first_seen_event_id,
            lease=lease,
            ttl=ttl,
        )
        if isinstance(result, Reserved):
            return _hold(store, tenant, operation, key, request_fingerprint, result, work, lease)
        if isinstance(result, Conflict):
            raise _conflict(result.record)
        record: IdempotencyRecord | None = result.record
        while True:
            assert record is not None
            if record.outcome is not None:
                return record.outcome
            time.sleep(waiting.next_sleep(record))
            found = store.get(tenant, operation, key)
            verdict = _look_again(found, record.request_fingerprint)
            if isinstance(verdict, Outcome):
                return verdict
            if verdict:
                break
            record = found


@dataclass(eq=False)
class _Held:
    """One ``run_once`` call's reservation whose lease the renewer keeps alive."""

    store: IdempotencyStore
    tenant: TenantContext
    operation: str
    key: str
    token: str
    lease: rules.Duration
    every: float
    next_at: float
    dropped: bool = False


class _Renewer:
    """The leases of the sync store's ``run_once`` calls in flight, renewed from one daemon
    thread (``idemstore-renew``) for the whole process, each renewal a transaction of its own
    on a pooled connection. The thread starts with the first lease and ends after
    :data:`RENEWER_IDLE_S` without any.

    Why one thread and not one per call: starting, stopping and joining a thread cost 136 us
    per ``run_once`` (median of 2000 on the 2-CPU development machine, busy with other work),
    as much as its reserve and complete together; handing a lease to this thread costs a lock
    and a notify. (``idemstore bench --sections leases`` measures ``run_once`` against the
    plain reserve.) One thread renews serially: a renewal that waits for a lock delays the
    others, by at most the store's lock timeout, well inside a lease of seconds.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: set[_Held] = set()
        self._running = False
        #: When the thread wakes anyway: a lease due later needs no notify (waking the thread
        #: on every call cost as much as the thread did, in GIL hand-overs).
        self._wake_at = 0.0

    def hold(self, held: _Held) -> None:
        with self._cond:
            self._held.add(held)
            if not self._running:
                self._running = True
                self._wake_at = 0.0
                threading.Thread(target=self._run, name="idemstore-renew", daemon=True).start()
            elif held.next_at < self._wake_at:
                self._cond.notify()

    def drop(self, held: _Held) -> None:
        with self._cond:
            held.dropped = True
            self._held.discard(held)

    def _due(self) -> list[_Held] | None:
        """Wait for the next renewals due (None: idle long enough, the thread ends)."""
        with self._cond:
            while True:
                now = time.monotonic()
                if not self._held:
                    self._wake_at = now + RENEWER_IDLE_S
                    self._cond.wait(RENEWER_IDLE_S)
                    if not self._held:
                        self._running = False
                        return None
                    continue
                wake = min(h.next_at for h in self._held)
                if wake <= now:
                    self._wake_at = 0.0  # renewing: a new lease due earlier is seen next
                    due = [h for h in self._held if h.next_at <= now]
                    for h in due:
                        h.next_at = now + h.every
                    return due
                self._wake_at = wake
                self._cond.wait(wake - now)

    def _run(self) -> None:
        while (due := self._due()) is not None:
            for h in due:
                if h.dropped:
                    continue
                try:
                    h.store.renew(h.tenant, h.operation, h.key, h.token, lease=h.lease)
                except LeaseLostError:
                    self.drop(h)  # the complete will say so
                except Exception as error:  # try again at the next interval
                    log.warning(
                        "renewing the lease of %r key %r failed: %s", h.operation, h.key, error
                    )


#: A renewer thread with nothing to renew for this long ends (a new lease starts another).
RENEWER_IDLE_S = 1.0
_RENEWER = _Renewer()


def _hold(
    store: IdempotencyStore,
    tenant: TenantContext,
    operation: str,
    key: str,
    fingerprint: str,
    reserved: Reserved,
    work: Work,
    lease: rules.Duration | None,
) -> Outcome:
    token = reserved.token
    held = None
    if lease is not None:
        every = _renew_every_s(lease)
        held = _Held(store, tenant, operation, key, token, lease, every, time.monotonic() + every)
        _RENEWER.hold(held)
    try:
        try:
            outcome = work()
        finally:
            if held is not None:
                _RENEWER.drop(held)
        if not isinstance(outcome, Outcome):
            raise InvalidInputError(f"work must return an Outcome, not {type(outcome).__name__}")
    except BaseException as error:
        _release_quietly(
            lambda: store.release(tenant, operation, key, fingerprint, token=token), error
        )
        raise
    store.complete(tenant, operation, key, outcome, token=token)
    return outcome


async def run_once_async(
    store: AsyncIdempotencyStore,
    tenant: TenantContext,
    operation: str,
    key: str,
    work: AsyncWork,
    *,
    owner: str,
    request_fingerprint: str,
    lease: rules.Duration | None = None,
    ttl: rules.Duration | None = None,
    wait: rules.Duration | None = None,
    first_seen_event_id: str | None = None,
) -> Outcome:
    """:func:`run_once` for the async store: ``work`` is a callable returning an
    :class:`~idemstore.Outcome` or an awaitable of one (a plain function is called on the
    event loop: keep it short, or make it async). The lease is renewed from a task; cancelled
    while ``work`` runs, the reservation is released with its token. Same results and errors
    as :func:`run_once`."""
    if not callable(work):
        raise InvalidInputError(f"work must be a callable returning an Outcome, not {work!r}")
    waiting = _Waiting(wait)
    while True:
        result = await store.reserve(
            tenant,
            operation,
            key,
            owner,
            request_fingerprint,
            first_seen_event_id=first_seen_event_id,
            lease=lease,
            ttl=ttl,
        )
        if isinstance(result, Reserved):
            return await _hold_async(
                store, tenant, operation, key, request_fingerprint, result, work, lease
            )
        if isinstance(result, Conflict):
            raise _conflict(result.record)
        record: IdempotencyRecord | None = result.record
        while True:
            assert record is not None
            if record.outcome is not None:
                return record.outcome
            await asyncio.sleep(waiting.next_sleep(record))
            found = await store.get(tenant, operation, key)
            verdict = _look_again(found, record.request_fingerprint)
            if isinstance(verdict, Outcome):
                return verdict
            if verdict:
                break
            record = found


async def _hold_async(
    store: AsyncIdempotencyStore,
    tenant: TenantContext,
    operation: str,
    key: str,
    fingerprint: str,
    reserved: Reserved,
    work: AsyncWork,
    lease: rules.Duration | None,
) -> Outcome:
    token = reserved.token
    renewer = None
    if lease is not None:
        every = _renew_every_s(lease)

        async def renew() -> None:
            while True:
                await asyncio.sleep(every)
                try:
                    await store.renew(tenant, operation, key, token, lease=lease)
                except LeaseLostError:
                    return  # the complete will say so
                except Exception as error:  # try again at the next interval
                    log.warning("renewing the lease of %r key %r failed: %s", operation, key, error)

        renewer = asyncio.create_task(renew(), name="idemstore-renew")
    try:
        try:
            produced = work()
            outcome = await produced if inspect.isawaitable(produced) else produced
        finally:
            if renewer is not None:
                renewer.cancel()
                await asyncio.gather(renewer, return_exceptions=True)
        if not isinstance(outcome, Outcome):
            raise InvalidInputError(f"work must return an Outcome, not {type(outcome).__name__}")
    except BaseException as error:
        try:
            await store.release(tenant, operation, key, fingerprint, token=token)
        except Exception as release_error:
            error.add_note(f"idemstore: releasing the reservation failed too: {release_error}")
        raise
    await store.complete(tenant, operation, key, outcome, token=token)
    return outcome


def idempotent(
    store: IdempotencyStore | AsyncIdempotencyStore,
    tenant: TenantContext,
    operation: str,
    *,
    key: Callable[..., str],
    request_fingerprint: Callable[..., str],
    owner: str,
    lease: rules.Duration | None = None,
    ttl: rules.Duration | None = None,
    wait: rules.Duration | None = None,
) -> Callable[[Callable[P, Any]], Callable[P, Any]]:
    """Decorator: the decorated function (returning an :class:`~idemstore.Outcome`; a
    coroutine function with the async store) runs through ``store.run_once``. ``key`` and
    ``request_fingerprint`` are called with the function's arguments to name the key and the
    request. The decorated function returns the key's outcome and raises what ``run_once``
    raises."""

    def decorate(fn: Callable[P, Any]) -> Callable[P, Any]:
        def options(*args: Any, **kwargs: Any) -> dict[str, Any]:
            return {
                "owner": owner,
                "request_fingerprint": request_fingerprint(*args, **kwargs),
                "lease": lease,
                "ttl": ttl,
                "wait": wait,
            }

        if inspect.iscoroutinefunction(store.run_once):

            @functools.wraps(fn)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Outcome:
                work = functools.partial(fn, *args, **kwargs)
                k = key(*args, **kwargs)
                return await store.run_once(tenant, operation, k, work, **options(*args, **kwargs))  # type: ignore[no-any-return, misc]

            return run_async

        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> Outcome:
            work = functools.partial(fn, *args, **kwargs)
            k = key(*args, **kwargs)
            return store.run_once(tenant, operation, k, work, **options(*args, **kwargs))  # type: ignore[return-value]

        return run

    return decorate


__all__ = ["AsyncWork", "Work", "idempotent", "run_once", "run_once_async"]
