"""``run_once`` (issue 11) on every backend: work runs once, a stored outcome is replayed, a
failure releases, a live reservation of someone else is waited for (its outcome, or its lease
end and a re-claim) or reported, a conflict is refused, the lease is renewed while work runs,
and a lost lease surfaces as ``LeaseLostError`` with nothing overwritten. Then the async
store's own cases: awaitable work, cancellation, the decorator."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from idemstore import (
    Conflict,
    ConflictError,
    Duplicate,
    IdempotencyStore,
    InProgressError,
    InvalidInputError,
    LeaseLostError,
    Outcome,
    RecordStatus,
    Reserved,
    TenantContext,
    idempotent,
    now_ms,
)
from tests.conftest import Database, SyncFacade

OP = "outbox.send"
KEY = "send-1"
FP = "fp-a"
TENANT = TenantContext.explicit_user_workspace("org-a", "ws-a", None, "actor-a")


def outcome(who: str = "me") -> Outcome:
    return Outcome("accepted", completed_at_ms=1, primary_ref_id=who, details={"by": who})


class Counter:
    """A piece of work that counts its calls and returns ``outcome(who)``."""

    def __init__(
        self, who: str = "me", *, sleep: float = 0.0, side: Callable[[], Any] | None = None
    ) -> None:
        self.who, self.sleep, self.side, self.calls = who, sleep, side, 0

    def __call__(self) -> Outcome:
        self.calls += 1
        if self.side is not None:
            self.side()
        time.sleep(self.sleep)
        return outcome(self.who)


@pytest.fixture
def stores(backend: str, make_database: Callable[[str], Database]) -> Iterator[tuple[Any, Any]]:
    """The store under test on ``backend`` (sync interface) and another, sync, store on the
    same database: the other caller."""
    engine_name, flavour = backend.split("-")
    db = make_database(engine_name)
    other = db.sync_store()
    if flavour == "sync":
        store = db.sync_store()
        yield store, other
        store.close()
    else:
        loop = asyncio.new_event_loop()
        async_store = db.async_store()
        loop.run_until_complete(async_store.migrate())
        yield SyncFacade(async_store, loop), other
        loop.run_until_complete(async_store.close())
        loop.close()
    other.close()


def run(store: Any, work: Any, **kw: Any) -> Outcome:
    return store.run_once(TENANT, OP, KEY, work, owner="me", request_fingerprint=FP, **kw)


def test_work_runs_once_and_the_outcome_is_replayed(stores: tuple[Any, Any]) -> None:
    store, _ = stores
    work = Counter()
    assert run(store, work, lease=1000) == outcome()
    assert work.calls == 1
    record = store.get(TENANT, OP, KEY)
    assert record.status is RecordStatus.COMPLETED and record.outcome == outcome()
    again = Counter("again")
    assert run(store, again, lease=1000) == outcome()
    assert again.calls == 0


def test_without_a_lease_and_with_ttl(stores: tuple[Any, Any]) -> None:
    store, _ = stores
    before = now_ms()
    assert run(store, Counter(), ttl=60_000) == outcome()
    record = store.get(TENANT, OP, KEY)
    assert record.lease_expires_at_ms is None
    assert before + 60_000 <= record.expires_at_ms <= now_ms() + 60_000


def test_a_failing_work_releases_the_key_and_raises(stores: tuple[Any, Any]) -> None:
    store, _ = stores

    def boom() -> Outcome:
        raise RuntimeError("provider down")

    with pytest.raises(RuntimeError, match="provider down"):
        run(store, boom, lease=1000)
    assert store.get(TENANT, OP, KEY) is None  # released: a retry starts clean
    work = Counter()
    assert run(store, work, lease=1000) == outcome() and work.calls == 1


def test_work_must_return_an_outcome(stores: tuple[Any, Any]) -> None:
    store, _ = stores
    with pytest.raises(InvalidInputError, match="work must return an Outcome, not dict"):
        run(store, lambda: {"kind": "accepted"}, lease=1000)
    assert store.get(TENANT, OP, KEY) is None


def test_a_conflict_raises_conflict_error(stores: tuple[Any, Any]) -> None:
    store, other = stores
    other.reserve(TENANT, OP, KEY, "other", "fp-other")
    work = Counter()
    with pytest.raises(ConflictError, match="another request") as caught:
        run(store, work, lease=1000)
    assert caught.value.record.request_fingerprint == "fp-other"
    assert caught.value.record.status is RecordStatus.CONFLICTED
    assert work.calls == 0


def test_a_live_reservation_without_wait_is_in_progress(stores: tuple[Any, Any]) -> None:
    store, other = stores
    held = other.reserve(TENANT, OP, KEY, "other", FP, lease=60_000)
    work = Counter()
    with pytest.raises(InProgressError, match="in progress by 'other'") as caught:
        run(store, work, lease=1000)
    assert caught.value.lease_expires_at_ms == held.record.lease_expires_at_ms
    assert caught.value.record.owner == "other"
    started = time.monotonic()
    with pytest.raises(InProgressError):
        run(store, work, lease=1000, wait=150)
    assert 0.14 <= time.monotonic() - started < 2
    assert work.calls == 0
    # without a lease: no end known
    other.reserve(TENANT, OP, "k2", "other", FP)
    with pytest.raises(InProgressError, match="without a lease") as caught:
        store.run_once(TENANT, OP, "k2", work, owner="me", request_fingerprint=FP)
    assert caught.value.lease_expires_at_ms is None


def test_waits_for_the_holder_to_complete(stores: tuple[Any, Any]) -> None:
    store, other = stores
    held = other.reserve(TENANT, OP, KEY, "other", FP, lease=60_000)
    timer = threading.Timer(
        0.2, lambda: other.complete(TENANT, OP, KEY, outcome("other"), token=held.token)
    )
    timer.start()
    work = Counter()
    try:
        assert run(store, work, lease=1000, wait=5_000) == outcome("other")
    finally:
        timer.join()
    assert work.calls == 0


def test_waits_while_the_holder_fails_then_runs_the_work(stores: tuple[Any, Any]) -> None:
    store, other = stores
    held = other.reserve(TENANT, OP, KEY, "other", FP, lease=60_000)
    timer = threading.Timer(0.2, lambda: other.release(TENANT, OP, KEY, FP, token=held.token))
    timer.start()
    work = Counter()
    try:
        assert run(store, work, lease=1000, wait=5_000) == outcome()
    finally:
        timer.join()
    assert work.calls == 1
    assert store.get(TENANT, OP, KEY).owner == "me"


@pytest.mark.parametrize("backend", ["sqlite-sync", "postgresql-sync"])  # the sync store's
def test_an_interrupted_work_releases_the_key(stores: tuple[Any, Any]) -> None:
    store, _ = stores

    def interrupted() -> Outcome:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(store, interrupted, lease=1000)
    assert store.get(TENANT, OP, KEY) is None


def test_waits_for_the_lease_end_then_reclaims(stores: tuple[Any, Any]) -> None:
    store, other = stores
    held = other.reserve(TENANT, OP, KEY, "other", FP, lease=300)  # then "dies"
    work = Counter()
    started = time.monotonic()
    assert run(store, work, lease=1000, wait=5_000) == outcome()
    assert work.calls == 1
    assert time.monotonic() - started >= 0.25
    # the first holder, back late: refused, the key keeps the re-claimer's outcome
    with pytest.raises(LeaseLostError):
        other.complete(TENANT, OP, KEY, outcome("other"), token=held.token)
    assert store.get(TENANT, OP, KEY).outcome == outcome()


def test_a_conflicting_request_does_not_keep_a_dead_holders_key(stores: tuple[Any, Any]) -> None:
    store, other = stores
    other.reserve(TENANT, OP, KEY, "other", FP, lease=400)  # then "dies", never completes
    work = Counter()
    with pytest.raises(ConflictError):  # a request with another body, meanwhile
        store.run_once(TENANT, OP, KEY, work, owner="b", request_fingerprint="fp-b", lease=1000)
    with pytest.raises(InProgressError, match="its lease ends at") as caught:
        run(store, work, lease=1000)  # the lease still runs: the holder may be alive
    assert caught.value.record.status is RecordStatus.CONFLICTED
    started = time.monotonic()
    assert run(store, work, lease=1000, wait=5_000) == outcome()  # the lease ended: re-claimed
    assert work.calls == 1 and time.monotonic() - started < 3
    record = store.get(TENANT, OP, KEY)
    assert record.outcome == outcome() and record.owner == "me"
    assert (record.conflict_count, record.conflict_fingerprints) == (1, ("fp-b",))


def test_a_failing_work_releases_its_key_through_a_conflict(stores: tuple[Any, Any]) -> None:
    store, other = stores

    def conflict_then_fail() -> Outcome:
        assert isinstance(other.reserve(TENANT, OP, KEY, "other", "fp-b"), Conflict)
        raise RuntimeError("provider down")

    with pytest.raises(RuntimeError, match="provider down"):
        run(store, conflict_then_fail, lease=60_000)
    assert store.get(TENANT, OP, KEY) is None  # released with the token: a retry starts clean
    work = Counter()
    assert run(store, work, lease=1000) == outcome() and work.calls == 1


def test_the_lease_is_renewed_while_work_runs(stores: tuple[Any, Any]) -> None:
    store, other = stores
    seen: list[Any] = []

    def meanwhile() -> None:
        time.sleep(0.5)  # past the first lease (300 ms): renewed, so still held
        seen.append(other.reserve(TENANT, OP, KEY, "other", FP, lease=300))
        time.sleep(0.35)
        seen.append(other.get(TENANT, OP, KEY))

    # The other caller runs beside the work; the work waits for it (the async store's work
    # awaits, so that the renewing task runs: a blocking one would starve it).
    def sync_work() -> Outcome:
        thread = threading.Thread(target=meanwhile)
        thread.start()
        thread.join()
        return outcome()

    async def async_work() -> Outcome:
        await asyncio.to_thread(meanwhile)
        return outcome()

    started = now_ms()
    work = async_work if isinstance(store, SyncFacade) else sync_work
    assert run(store, work, lease=300) == outcome()
    assert isinstance(seen[0], Duplicate) and seen[0].record.owner == "me"
    assert seen[1].lease_expires_at_ms > started + 600  # renewed more than once
    assert store.get(TENANT, OP, KEY).outcome == outcome()


def test_a_lost_lease_is_lease_lost_error_and_overwrites_nothing(stores: tuple[Any, Any]) -> None:
    store, other = stores
    taken: list[Any] = []

    def stall() -> None:
        # As if this holder stalled past its lease: another caller re-claims the key.
        record = other.get(TENANT, OP, KEY)
        taken.append(
            other.reserve(
                TENANT, OP, KEY, "other", FP, lease=60_000, now_ms=record.lease_expires_at_ms
            )
        )

    work = Counter(side=stall)
    with pytest.raises(LeaseLostError, match="no longer holds"):
        run(store, work, lease=60_000)
    assert work.calls == 1 and isinstance(taken[0], Reserved)
    record = store.get(TENANT, OP, KEY)
    assert record.owner == "other" and record.outcome is None  # nothing written over it
    other.complete(TENANT, OP, KEY, outcome("other"), token=taken[0].token)
    assert run(store, Counter(), lease=1000) == outcome("other")  # the key's one outcome


# -- the async store's own ----------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, make_database: Callable[[str], Database]) -> Database:
    return make_database(str(request.param))


def test_a_forked_child_renews_its_leases(database: Database) -> None:
    """A pre-fork server: the parent ran run_once (its renewer thread is up), then forks; the
    child's leases are renewed all the same (a fork copies no thread)."""
    store = database.sync_store()
    try:
        assert store.run_once(TENANT, OP, "k0", Counter(), owner="me", request_fingerprint=FP,
                              lease=300) == outcome()  # fmt: skip
        pid = os.fork()
        if pid == 0:  # the child: a store of its own, a work longer than two leases
            code = 1
            try:
                child = database.sync_store(migrate=False)
                child.run_once(TENANT, OP, "k1", Counter("child", sleep=1.0), owner="child",
                               request_fingerprint=FP, lease=300)  # fmt: skip
                code = 0
            finally:
                os._exit(code)
        time.sleep(0.8)  # past two of the child's leases: still held, renewed
        assert isinstance(store.reserve(TENANT, OP, "k1", "parent", FP, lease=300), Duplicate)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert store.get(TENANT, OP, "k1").outcome == outcome("child")
    finally:
        store.close()


def test_async_work_may_be_a_coroutine_and_cancellation_releases(database: Database) -> None:
    async def main() -> None:
        store = database.async_store()
        await store.migrate()
        try:

            async def work() -> Outcome:
                await asyncio.sleep(0.05)
                return outcome("async")

            got = await store.run_once(
                TENANT, OP, KEY, work, owner="me", request_fingerprint=FP, lease=300
            )
            assert got == outcome("async")
            assert (await store.get(TENANT, OP, KEY)).outcome == outcome("async")

            started = asyncio.Event()

            async def slow() -> Outcome:
                started.set()
                await asyncio.sleep(30)
                return outcome("never")

            task = asyncio.create_task(
                store.run_once(
                    TENANT, OP, "k2", slow, owner="me", request_fingerprint=FP, lease=300
                )
            )
            await started.wait()
            assert (await store.get(TENANT, OP, "k2")).status is RecordStatus.RESERVED
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # cancelled while the work ran: released with its token, a retry starts clean
            assert await store.get(TENANT, OP, "k2") is None
        finally:
            await store.close()

    asyncio.run(main())


def test_the_decorator(database: Database) -> None:
    sync_store: IdempotencyStore = database.sync_store()
    calls: list[str] = []
    try:

        @idempotent(
            sync_store,
            TENANT,
            "mail.send",
            key=lambda to, body: f"mail:{to}",
            request_fingerprint=lambda to, body: f"sha:{to}:{body}",
            owner="mailer",
            lease=1000,
        )
        def send(to: str, body: str) -> Outcome:
            calls.append(to)
            return outcome(to)

        assert send("a@x", "hi") == outcome("a@x")
        assert send("a@x", "hi") == outcome("a@x")
        assert calls == ["a@x"]
        with pytest.raises(ConflictError):
            send("a@x", "other body")
    finally:
        sync_store.close()

    async def main() -> None:
        store = database.async_store()

        @idempotent(
            store,
            TENANT,
            "mail.send",
            key=lambda to: f"mail:{to}",
            request_fingerprint=lambda to: f"sha:{to}:hi",
            owner="mailer",
        )
        async def send_async(to: str) -> Outcome:
            calls.append(to)
            return outcome(to)

        try:
            assert await send_async("b@x") == outcome("b@x")
            assert await send_async("b@x") == outcome("b@x")
        finally:
            await store.close()

    asyncio.run(main())
    assert calls == ["a@x", "b@x"]
