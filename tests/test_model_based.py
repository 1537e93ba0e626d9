"""Model-based proof: random operation sequences give the same results as the Rust semantics.

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
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Database, SyncFacade
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from refmodel import U64_MAX, ModelInputError, RefModel

from idemstore import InvalidInputError, Outcome, TenantContext, TenantSource

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
OPERATIONS = ("outbox.send", " outbox.send\t", "webhook.provider_event", "\u3000webhook.provider_event", "  ")
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
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
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


class StoreMachine(RuleBasedStateMachine):
    """The store and the reference model, step by step."""

    def __init__(self, store: Any, wipe: Callable[[], None]) -> None:
        super().__init__()
        wipe()
        self.store = store
        self.model = RefModel()
        self.now = 0

    def same(self, model_call: Callable[[], Any], store_call: Callable[[], Any]) -> Any:
        try:
            expected = model_call()
        except ModelInputError:
            with pytest.raises(InvalidInputError):
                store_call()
            return None
        actual = store_call()
        assert actual == expected
        return actual

    @initialize(start=st.sampled_from((0, 1_782_900_000_000, U64_MAX - 12)))
    def start_clock(self, start: int) -> None:
        self.now = start

    @rule(step=st.sampled_from((0, 0, 1, 1, 2, 3, 7, 1000)))
    def tick(self, step: int) -> None:
        self.now = min(self.now + step, U64_MAX)

    @rule(
        tenant=st.sampled_from(TENANTS),
        operation=st.sampled_from(OPERATIONS),
        key=st.sampled_from(KEYS),
        owner=st.sampled_from(OWNERS),
        fingerprint=st.sampled_from(FINGERPRINTS),
        event_id=st.none() | st.sampled_from(("evt-1", "evt-2")),
        expires_in=st.none() | st.integers(-2, 6),
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
    ) -> None:
        expires = None if expires_in is None else max(0, min(self.now + expires_in, U64_MAX))
        kwargs = {"first_seen_event_id": event_id, "expires_at_ms": expires, "now_ms": self.now}
        self.same(
            lambda: self.model.reserve(tenant, operation, key, owner, fingerprint, **kwargs),
            lambda: self.store.reserve(tenant, operation, key, owner, fingerprint, **kwargs),
        )

    @rule(
        tenant=st.sampled_from(TENANTS),
        operation=st.sampled_from(OPERATIONS),
        key=st.sampled_from(KEYS),
        outcome=outcomes,
    )
    def complete(self, tenant: TenantContext, operation: str, key: str, outcome: Outcome) -> None:
        self.same(
            lambda: self.model.complete(tenant, operation, key, outcome, now_ms=self.now),
            lambda: self.store.complete(tenant, operation, key, outcome, now_ms=self.now),
        )

    @rule(
        tenant=st.sampled_from(TENANTS),
        operation=st.sampled_from((*OPERATIONS, "")),
        key=st.sampled_from((*KEYS, "")),
    )
    def get(self, tenant: TenantContext, operation: str, key: str) -> None:
        self.same(
            lambda: self.model.get(tenant, operation, key),
            lambda: self.store.get(tenant, operation, key),
        )

    @rule(
        tenant=st.sampled_from(TENANTS),
        operation=st.sampled_from(OPERATIONS),
        key=st.sampled_from(KEYS),
        fingerprint=st.sampled_from(FINGERPRINTS),
    )
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


@pytest.fixture
def proof_store(backend: str, make_database: Callable[[str], Database]) -> Iterator[Any]:
    engine_name, flavour = backend.split("-")
    db = make_database(engine_name)
    yield from open_store(db, flavour)


def wiper(db: Database) -> Callable[[], None]:
    engine = db.sync_engine(poolclass=sa.pool.NullPool)

    def wipe() -> None:
        with engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM idemstore_conflict_fingerprints")
            conn.exec_driver_sql("DELETE FROM idemstore_records")

    return wipe


def test_store_matches_reference_model(backend: str, make_database: Callable[[str], Database]) -> None:
    engine_name, flavour = backend.split("-")
    db = make_database(engine_name)
    wipe = wiper(db)
    for store in open_store(db, flavour):
        run_state_machine_as_test(
            lambda: StoreMachine(store, wipe),
            settings=settings(
                max_examples=max(1, int(20 * SCALE)),
                stateful_step_count=max(5, int(30 * SCALE)),
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=os.environ.get("IDEMSTORE_PROOF_DERANDOMIZE") == "1",
            ),
        )
