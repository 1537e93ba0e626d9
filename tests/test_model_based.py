"""Model-based proof: random operation sequences give the same results as the Rust semantics
(and idemstore's leases: reserve with ``lease``/``ttl``, ``renew``, ``complete`` and ``release``
with a token, tokens of every generation drawn again later, stale ones included).

A Hypothesis state machine drives the store (on every backend) and :mod:`refmodel` side by
side: reserve / complete / get / release / purge / stats over several tenants (deployment
``None``, ``""`` and a value; same org with another actor or source), operations and keys with
whitespace to trim, fingerprints, and a clock that steps by 0 (equal timestamps), small steps
(expiries landing exactly on now) and big ones, starting near 0, now or 2^64-1. Every result
must be identical: the kind (Reserved / Duplicate / Conflict / None / bool / count / error)
and the whole record, conflict fingerprints in order.

``IDEMSTORE_PROOF_SCALE`` (default 1) multiplies the number of examples and steps.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from idemstore import (
    InvalidInputError,
    LeaseLostError,
    Outcome,
    Reserved,
    TenantContext,
    TenantSource,
)
from tests.conftest import Database, SyncFacade
from tests.refmodel import U64_MAX, ModelInputError, ModelLeaseLost, RefModel

SCALE = float(os.environ.get("IDEMSTORE_PROOF_SCALE", "1"))

TENANTS = (
    TenantContext.explicit_user_workspace("org-a", "ws-a", None, "actor-1"),
    # same org/workspace/deployment: another actor, another source (neither is compared)
    TenantContext.explicit_user_workspace("org-a", "ws-a", None, "actor-2"),
    TenantContext("org-a", "ws-a", None, None, TenantSource.LOCAL_IMPLICIT),
    # deployment "" hashes like None (same record id) but does not match it
    TenantContext.explicit_user_workspace("org-a", "ws-a", "", "actor-1"),
    TenantContext.explicit_user_workspace("org-a", "ws-a", "dep-1", "actor-1"),
    TenantContext.explicit_user_workspace("org-b", "ws-a", None, "actor-1"),
    TenantContext.local_implicit(),
)
OPERATIONS = (
    "outbox.send",
    " outbox.send\t",
    "webhook.provider_event",
    "\u3000webhook.provider_event",
    "  ",
)
# "\x1c".."\x1f" are whitespace to Python's str.strip() but not to Rust's str::trim.
KEYS = ("k1", " k1 ", "k2", "k1\x1c", "\x1fk2", "ключ\u2003", "\t")
FINGERPRINTS = ("fp-a", "fp-b", "fp-c", " fp-a\n", "\x1e")
OWNERS = ("mailer", " mailer ", "other")

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
optional_ref = st.none() | st.sampled_from(("delivery", "run", "d-1", ""))
outcomes = st.builds(
    Outcome,
    outcome_kind=st.sampled_from(("accepted", "duplicate", "conflict", "woken", "rejected")),
    completed_at_ms=st.integers(0, U64_MAX),
    primary_ref_kind=optional_ref,
    primary_ref_id=optional_ref,
    secondary_ref_kind=optional_ref,
    secondary_ref_id=optional_ref,
    details=json_values,
)


# Half the draws come from a small core, so that keys collide often enough to reach every
# branch; the rest from everything.
tenants = st.sampled_from(TENANTS[:4]) | st.sampled_from(TENANTS)
operations = st.sampled_from(OPERATIONS[:2]) | st.sampled_from(OPERATIONS)
keys = st.sampled_from(KEYS[:2]) | st.sampled_from(KEYS)
fingerprints = st.sampled_from(FINGERPRINTS[:2]) | st.sampled_from(FINGERPRINTS)
expiries = st.none() | st.none() | st.integers(-2, 6)
mostly_none = st.none() | st.none() | st.none()
#: Leases and ttls in ms: mostly none (the Rust store), short ones ending on the clock's steps.
leases = st.none() | st.integers(1, 8)
ttls = st.none() | st.none() | st.none() | st.integers(1, 6)
Slot = tuple[TenantContext, str, str, str]
BUSY: Slot = (TENANTS[0], OPERATIONS[0], "busy", FINGERPRINTS[0])  # only the busy_* rules


class StoreMachine(RuleBasedStateMachine):
    """The store and the reference model, step by step."""

    slots = Bundle("slots")

    def __init__(self, store: Any, wipe: Callable[[], None]) -> None:
        super().__init__()
        wipe()
        self.store = store
        self.model = RefModel()
        self.now = 0
        #: the model's tokens, in issue order, and the store's token for each
        self.issued: list[str] = []
        self.store_token: dict[str, str] = {"m0": "7"}  # m0: never issued by either

    def same(self, model_call: Callable[[], Any], store_call: Callable[[], Any]) -> Any:
        try:
            expected = model_call()
        except ModelInputError:
            with pytest.raises(InvalidInputError):
                store_call()
            return None
        except ModelLeaseLost:
            with pytest.raises(LeaseLostError):
                store_call()
            event("LeaseLost")
            return None
        actual = store_call()
        if isinstance(expected, Reserved):  # tokens are random: the test maps them
            assert isinstance(actual, Reserved) and isinstance(actual.token, str) and actual.token
            assert actual.token not in self.store_token.values()  # new on every Reserved
            self.issued.append(expected.token)
            self.store_token[expected.token] = actual.token
            actual = Reserved(actual.record, expected.token)
        assert actual == expected
        event(f"{type(expected).__name__} {expected if isinstance(expected, bool) else ''}")
        if isinstance(expected, Reserved) and expected.record.conflict_count:
            event("Reserved: a conflicted reservation re-claimed")
        return actual

    @initialize(start=st.sampled_from((0, 1_782_900_000_000, U64_MAX - 12)))
    def start_clock(self, start: int) -> None:
        self.now = start

    @rule(step=st.sampled_from((0, 0, 1, 1, 2, 3, 7, 1000)))
    def tick(self, step: int) -> None:
        self.now = min(self.now + step, U64_MAX)

    @rule(
        target=slots,
        tenant=tenants,
        operation=operations,
        key=keys,
        owner=st.sampled_from(OWNERS),
        fingerprint=fingerprints,
        event_id=st.none() | st.sampled_from(("evt-1", "evt-2")),
        expires_in=expiries,
        lease=leases,
        ttl=ttls,
    )
    def reserve(
        self,
        tenant: TenantContext,
        operation: str,
        key: str,
        owner: str,
        fingerprint: str,
        event_id: str | None,
        expires_in: int | None,
        lease: int | None,
        ttl: int | None,
    ) -> Any:
        self._reserve(tenant, operation, key, owner, fingerprint, event_id, expires_in, lease, ttl)
        return (tenant, operation, key, fingerprint)

    @rule(
        slot=slots,
        tenant=mostly_none | tenants,
        fingerprint=mostly_none | fingerprints,
        owner=st.sampled_from(OWNERS),
        event_id=st.none() | st.sampled_from(("evt-1", "evt-2")),
        expires_in=expiries,
        lease=leases,
        ttl=ttls,
    )
    def reserve_again(
        self,
        slot: Slot,
        tenant: TenantContext | None,
        fingerprint: str | None,
        owner: str,
        event_id: str | None,
        expires_in: int | None,
        lease: int | None,
        ttl: int | None,
    ) -> None:
        """The same key again: same request (duplicate, or a re-claim once its lease ended),
        another (conflict), another tenant."""
        tenant = tenant or slot[0]
        fingerprint = fingerprint or slot[3]
        self._reserve(
            tenant, slot[1], slot[2], owner, fingerprint, event_id, expires_in, lease, ttl
        )

    def _reserve(
        self,
        tenant: TenantContext,
        operation: str,
        key: str,
        owner: str,
        fingerprint: str,
        event_id: str | None,
        expires_in: int | None,
        lease: int | None = None,
        ttl: int | None = None,
    ) -> None:
        expires = None if expires_in is None else max(0, min(self.now + expires_in, U64_MAX))
        kwargs: dict[str, Any] = {
            "first_seen_event_id": event_id,
            "expires_at_ms": expires,
            "now_ms": self.now,
        }
        if lease is not None:
            kwargs["lease"] = lease
        if ttl is not None:
            kwargs["ttl"] = ttl
        self.same(
            lambda: self.model.reserve(tenant, operation, key, owner, fingerprint, **kwargs),
            lambda: self.store.reserve(
                tenant, operation, key, owner, fingerprint, **self._as_timedelta(kwargs)
            ),
        )

    # One busy key, so that leases run out, get re-claimed, renewed and fenced often (the
    # rules above spread over many keys and reach these paths rarely).

    @rule(
        steps=st.lists(
            st.tuples(
                st.sampled_from(OWNERS),
                st.integers(1, 8) | st.none(),  # (Hypothesis leans to the first choices)
                st.integers(1, 30) | st.none(),
                st.sampled_from((8, 3, 1, 0)),
                st.sampled_from((BUSY[3], BUSY[3], FINGERPRINTS[1])),
            ),
            min_size=1,
            max_size=4,
        )
    )
    def busy_reserve(self, steps: list[tuple[str, int | None, int | None, int, str]]) -> None:
        """The busy key, a few times, a little later each: a duplicate while a lease runs, a
        re-claim once it ended; now and then another request (a conflict, which must not keep
        a dead holder's key from its re-claim); a ttl makes the key start afresh after a
        while."""
        for owner, lease, ttl, later, fingerprint in steps:
            self.tick(later)
            self._reserve(*BUSY[:3], owner, fingerprint, None, None, lease, ttl)

    @rule(outcome=outcomes, pick=st.integers(0, 6))
    def busy_complete(self, outcome: Outcome, pick: int) -> None:
        self.complete_fenced(BUSY, None, outcome, pick)

    @rule(pick=st.integers(0, 6))
    def busy_release(self, pick: int) -> None:
        self.release_fenced(BUSY, None, None, pick)

    @rule(pick=st.integers(0, 6), lease=st.integers(1, 8))
    def busy_renew(self, pick: int, lease: int) -> None:
        self.renew(BUSY, None, pick, lease)

    def _as_timedelta(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        # The store takes int milliseconds or a timedelta: every other lease as a timedelta.
        lease = kwargs.get("lease")
        if lease is not None and lease % 2:
            return {**kwargs, "lease": timedelta(milliseconds=lease)}
        return kwargs

    def _token(self, pick: int) -> str:
        """A token drawn from every one issued so far (mostly the latest ones), or one that
        was never issued."""
        if not self.issued or pick == 0:
            return "m0"
        return self.issued[-1 - (pick - 1) % min(len(self.issued), 4)]

    @rule(slot=slots, tenant=mostly_none | tenants, outcome=outcomes)
    def complete_slot(self, slot: Slot, tenant: TenantContext | None, outcome: Outcome) -> None:
        self.complete(tenant or slot[0], slot[1], slot[2], outcome)

    @rule(tenant=tenants, operation=operations, key=keys, outcome=outcomes)
    def complete(self, tenant: TenantContext, operation: str, key: str, outcome: Outcome) -> None:
        self.same(
            lambda: self.model.complete(tenant, operation, key, outcome, now_ms=self.now),
            lambda: self.store.complete(tenant, operation, key, outcome, now_ms=self.now),
        )

    @rule(slot=slots, tenant=mostly_none | tenants, outcome=outcomes, pick=st.integers(0, 6))
    def complete_fenced(
        self, slot: Slot, tenant: TenantContext | None, outcome: Outcome, pick: int
    ) -> None:
        tenant, token = tenant or slot[0], self._token(pick)
        self.same(
            lambda: self.model.complete(
                tenant, slot[1], slot[2], outcome, now_ms=self.now, token=token
            ),
            lambda: self.store.complete(
                tenant, slot[1], slot[2], outcome, now_ms=self.now, token=self.store_token[token]
            ),
        )

    @rule(
        slot=slots,
        tenant=mostly_none | tenants,
        fingerprint=mostly_none | fingerprints,
        pick=st.integers(0, 6),
    )
    def release_fenced(
        self, slot: Slot, tenant: TenantContext | None, fingerprint: str | None, pick: int
    ) -> None:
        tenant, fingerprint, token = tenant or slot[0], fingerprint or slot[3], self._token(pick)
        self.same(
            lambda: self.model.release(tenant, slot[1], slot[2], fingerprint, token=token),
            lambda: self.store.release(
                tenant, slot[1], slot[2], fingerprint, token=self.store_token[token]
            ),
        )

    @rule(
        slot=slots,
        tenant=mostly_none | tenants,
        pick=st.integers(0, 6),
        lease=st.integers(1, 8) | st.just(U64_MAX),
    )
    def renew(self, slot: Slot, tenant: TenantContext | None, pick: int, lease: int) -> None:
        tenant, token = tenant or slot[0], self._token(pick)
        self.same(
            lambda: self.model.renew(tenant, slot[1], slot[2], token, lease=lease, now_ms=self.now),
            lambda: self.store.renew(
                tenant, slot[1], slot[2], self.store_token[token], lease=lease, now_ms=self.now
            ),
        )

    @rule(slot=slots, tenant=mostly_none | tenants)
    def get_slot(self, slot: Slot, tenant: TenantContext | None) -> None:
        self.get(tenant or slot[0], slot[1], slot[2])

    @rule(tenant=tenants, operation=operations | st.just(""), key=keys | st.just(""))
    def get(self, tenant: TenantContext, operation: str, key: str) -> None:
        self.same(
            lambda: self.model.get(tenant, operation, key),
            lambda: self.store.get(tenant, operation, key),
        )

    @rule(slot=slots, tenant=mostly_none | tenants, fingerprint=mostly_none | fingerprints)
    def release_slot(
        self, slot: Slot, tenant: TenantContext | None, fingerprint: str | None
    ) -> None:
        self.release(tenant or slot[0], slot[1], slot[2], fingerprint or slot[3])

    @rule(tenant=tenants, operation=operations, key=keys, fingerprint=fingerprints)
    def release(self, tenant: TenantContext, operation: str, key: str, fingerprint: str) -> None:
        self.same(
            lambda: self.model.release(tenant, operation, key, fingerprint),
            lambda: self.store.release(tenant, operation, key, fingerprint),
        )

    @rule(batch_size=st.integers(1, 3), lag=st.sampled_from((0, 0, 1, 5)))
    def purge_expired(self, batch_size: int, lag: int) -> None:
        now = max(0, self.now - lag)
        self.same(
            lambda: self.model.purge_expired(now_ms=now),
            lambda: self.store.purge_expired(now_ms=now, batch_size=batch_size),
        )

    @rule()
    def stats(self) -> None:
        assert dict(self.store.stats().counts) == self.model.stats()

    @invariant()
    def clock_in_range(self) -> None:
        assert 0 <= self.now <= U64_MAX

    def teardown(self) -> None:
        # Every record the model holds is in the store, whole; and nothing else is.
        for record in self.model.records.values():
            found = self.store.get(record.tenant_context, record.operation, record.key)
            assert found == record
        assert self.store.stats().total == len(self.model.records)


@contextmanager
def open_store(db: Database, flavour: str) -> Iterator[Any]:
    """A migrated store on ``db`` with the sync interface (async through SyncFacade)."""
    if flavour == "sync":
        sync_store = db.sync_store()
        try:
            yield sync_store
        finally:
            sync_store.close()
        return
    loop = asyncio.new_event_loop()
    async_store = db.async_store()
    try:
        loop.run_until_complete(async_store.migrate())
        yield SyncFacade(async_store, loop)
    finally:
        loop.run_until_complete(async_store.close())
        loop.close()


def wiper(db: Database) -> Callable[[], None]:
    engine = db.sync_engine(poolclass=sa.pool.NullPool)

    def wipe() -> None:
        with engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM idemstore_conflict_fingerprints")
            conn.exec_driver_sql("DELETE FROM idemstore_records")

    return wipe


def test_store_matches_reference_model(
    backend: str, make_database: Callable[[str], Database]
) -> None:
    engine_name, flavour = backend.split("-")
    db = make_database(engine_name)
    wipe = wiper(db)
    with open_store(db, flavour) as store:
        run_state_machine_as_test(
            lambda: StoreMachine(store, wipe),
            settings=settings(
                max_examples=max(1, int(30 * SCALE)),
                stateful_step_count=max(5, int(40 * SCALE)),
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=os.environ.get("IDEMSTORE_PROOF_DERANDOMIZE") == "1",
            ),
        )


def test_trimming_is_rusts(store: Any) -> None:
    """Regression: ``str.strip()`` also strips U+001C..U+001F, Rust's ``trim`` does not, so
    such a key got another record id than the Rust store gives it (and "\\x1e" was rejected
    as a blank fingerprint)."""
    tenant = TenantContext.explicit_user_workspace("org-a", "ws-a", None, "actor-1")
    from idemstore import Reserved, idempotency_record_id

    first = store.reserve(tenant, " op\u3000", "k1\x1c ", "owner", "\x1e", now_ms=5)
    assert isinstance(first, Reserved)
    assert first.record.key == "k1\x1c"
    assert first.record.operation == "op"
    assert first.record.request_fingerprint == "\x1e"
    assert first.record.record_id == idempotency_record_id(tenant, "op", "k1\x1c")
    assert isinstance(store.reserve(tenant, "op", "k1", "owner", "fp", now_ms=6), Reserved)
    assert store.get(tenant, "op", "\x1fk1\x1c") is None
    assert store.get(tenant, "op\n", " k1\x1c\t") == first.record
    assert store.release(tenant, "op", "k1\x1c", "\x1e")
