"""The store's behaviour, on every backend (see conftest): the Rust module's rules."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from idemstore import (
    Conflict,
    Duplicate,
    IdempotencyRecord,
    InvalidInputError,
    Outcome,
    RecordStatus,
    Reserved,
    TenantContext,
    TenantSource,
    idempotency_record_id,
)
from idemstore.db.codec import encode_u64
from idemstore.db.driver import Statement
from idemstore.db.ops import Call
from idemstore.db.schema import records as records_table
from idemstore.model import U64_MAX

OP = "outbox.send"


def tenant(org: str = "org-a", workspace: str = "workspace-a", deployment=None, actor="actor-a"):
    return TenantContext.explicit_user_workspace(org, workspace, deployment, actor)


def reserve(store, fingerprint="fingerprint-a", *, t=None, op=OP, key="send-1", now=1_000, **kw):
    return store.reserve(
        t or tenant(),
        op,
        key,
        "test-owner",
        fingerprint,
        first_seen_event_id="event-a",
        now_ms=now,
        **kw,
    )


def accepted(at: int = 1_100, **details) -> Outcome:
    return Outcome(
        outcome_kind="accepted",
        completed_at_ms=at,
        primary_ref_kind="delivery",
        primary_ref_id="delivery-a",
        secondary_ref_kind="run",
        secondary_ref_id="run-a",
        details=details or {"dedupe_result": "accepted"},
    )


def set_conflict_count(store, record_id: str, value: int) -> None:
    """Put a record's counter where no reservation sequence in a test can reach."""

    def build(dialect):
        return (
            sa.update(records_table)
            .where(records_table.c.record_id == sa.bindparam("p_id"))
            .values(conflict_count=sa.bindparam("p_count"))
        )

    def run(d):
        d.execute(
            Statement("test_set_conflict_count", build),
            {"p_id": record_id, "p_count": encode_u64(value)},
        )

    store.run(Call("write", run))


# -- the three Rust tests, ported ---------------------------------------------------------


def test_duplicate_reservation_returns_original_outcome(store):
    first = reserve(store)
    assert isinstance(first, Reserved)
    completed = store.complete(tenant(), OP, "send-1", accepted(), now_ms=1_100)
    assert completed is not None

    duplicate = reserve(store)
    assert isinstance(duplicate, Duplicate)
    assert duplicate.record.record_id == first.record.record_id
    assert duplicate.record.outcome is not None
    assert duplicate.record.outcome.primary_ref_id == "delivery-a"
    assert duplicate.record.outcome.secondary_ref_id == "run-a"


def test_idempotency_keys_are_tenant_scoped(store):
    first = reserve(store, "fingerprint-a", t=tenant("org-a"), op="wait.wake", key="wake-1")
    second = reserve(store, "fingerprint-b", t=tenant("org-b"), op="wait.wake", key="wake-1")
    assert isinstance(first, Reserved)
    assert isinstance(second, Reserved)
    assert first.record.record_id != second.record.record_id


def test_conflicting_key_reuse_is_recorded(store):
    reserve(store, "fingerprint-a")
    conflict = reserve(store, "fingerprint-b")
    assert isinstance(conflict, Conflict)
    assert conflict.record.status is RecordStatus.CONFLICTED
    assert conflict.record.conflict_count == 1
    assert conflict.record.conflict_fingerprints == ("fingerprint-b",)
    stored = store.get(tenant(), OP, "send-1")
    assert stored is not None
    assert stored.status is RecordStatus.CONFLICTED


# -- reserve: the four branches ----------------------------------------------------------------


def test_fresh_reservation_holds_every_input(store):
    t = tenant(deployment="dep-1", actor="actor-z")
    result = store.reserve(
        t,
        f"  {OP} ",
        " send-1\n",
        " owner-a ",
        " fp-a ",
        first_seen_event_id="evt-1",
        expires_at_ms=9_000,
        now_ms=1_234,
    )
    assert isinstance(result, Reserved)
    assert result.record == IdempotencyRecord(
        record_id=idempotency_record_id(t, OP, "send-1"),
        tenant_context=t,
        operation=OP,
        key="send-1",
        owner="owner-a",
        request_fingerprint="fp-a",
        status=RecordStatus.RESERVED,
        first_seen_at_ms=1_234,
        last_seen_at_ms=1_234,
        first_seen_event_id="evt-1",
        expires_at_ms=9_000,
    )
    assert store.get(t, OP, "send-1") == result.record


def test_duplicate_updates_last_seen_only(store):
    first = reserve(store, now=1_000).record
    duplicate = reserve(store, now=2_000)
    assert isinstance(duplicate, Duplicate)
    assert duplicate.record.last_seen_at_ms == 2_000
    assert duplicate.record.first_seen_at_ms == 1_000
    assert duplicate.record.status is RecordStatus.RESERVED
    assert duplicate.record.outcome is None
    assert duplicate.record.in_progress_until_ms is None  # no lease: no end known (Rust)
    with pytest.deprecated_call():
        assert duplicate.record.is_orphaned_reservation
    assert duplicate.record == IdempotencyRecord(**{**_fields(first), "last_seen_at_ms": 2_000})


def test_same_millisecond_is_still_exact(store):
    first = reserve(store, now=5_000)
    second = reserve(store, now=5_000)
    third = reserve(store, "other", now=5_000)
    assert (type(first), type(second), type(third)) == (Reserved, Duplicate, Conflict)


def test_duplicate_of_a_conflicted_record_is_a_duplicate(store):
    reserve(store, "fp-a")
    reserve(store, "fp-b")
    again = reserve(store, "fp-a", now=3_000)
    assert isinstance(again, Duplicate)
    assert again.record.status is RecordStatus.CONFLICTED
    assert again.record.conflict_count == 1
    assert again.record.conflict_fingerprints == ("fp-b",)


def test_repeated_conflicting_fingerprint_is_recorded_once_in_first_seen_order(store):
    reserve(store, "fp-a")
    for fp in ("fp-c", "fp-b", "fp-c", "fp-d", "fp-b"):
        result = reserve(store, fp)
        assert isinstance(result, Conflict)
    record = store.get(tenant(), OP, "send-1")
    assert record.conflict_count == 5
    assert record.conflict_fingerprints == ("fp-c", "fp-b", "fp-d")


def test_completed_record_turns_conflicted_and_keeps_its_outcome(store):
    reserve(store, "fp-a")
    store.complete(tenant(), OP, "send-1", accepted(), now_ms=1_100)
    conflict = reserve(store, "fp-b", now=1_200)
    assert isinstance(conflict, Conflict)
    assert conflict.record.status is RecordStatus.CONFLICTED
    assert conflict.record.outcome == accepted()
    assert conflict.record.last_seen_at_ms == 1_200


def test_conflict_count_saturates_at_u64_max(store):
    record_id = reserve(store, "fp-a").record.record_id
    set_conflict_count(store, record_id, U64_MAX - 1)
    assert reserve(store, "fp-b").record.conflict_count == U64_MAX
    assert reserve(store, "fp-c").record.conflict_count == U64_MAX
    record = store.get(tenant(), OP, "send-1")
    assert record.conflict_count == U64_MAX
    assert record.conflict_fingerprints == ("fp-b", "fp-c")


def test_expiry_at_exactly_now_gives_a_fresh_reservation(store):
    old_tenant = tenant(actor="old-actor")
    reserve(store, "fp-a", t=old_tenant, now=1_000, expires_at_ms=2_000)
    reserve(store, "fp-b", t=old_tenant, now=1_500)
    store.complete(old_tenant, OP, "send-1", accepted(), now_ms=1_600)

    new_tenant = TenantContext("org-a", "workspace-a", None, None, TenantSource.LOCAL_IMPLICIT)
    fresh = store.reserve(new_tenant, OP, "send-1", "owner-2", "fp-c", now_ms=2_000)
    assert isinstance(fresh, Reserved)
    assert fresh.record == IdempotencyRecord(
        record_id=fresh.record.record_id,
        tenant_context=new_tenant,
        operation=OP,
        key="send-1",
        owner="owner-2",
        request_fingerprint="fp-c",
        status=RecordStatus.RESERVED,
        first_seen_at_ms=2_000,
        last_seen_at_ms=2_000,
    )
    # The conflict history went with the old generation.
    assert store.get(new_tenant, OP, "send-1") == fresh.record
    conflict = reserve(store, "fp-b", now=2_100)
    assert conflict.record.conflict_fingerprints == ("fp-b",)
    assert conflict.record.conflict_count == 1


def test_not_yet_expired_is_a_duplicate(store):
    reserve(store, now=1_000, expires_at_ms=2_000)
    assert isinstance(reserve(store, now=1_999), Duplicate)
    assert isinstance(reserve(store, "other", now=1_999), Conflict)


def test_expired_record_replaced_even_for_another_fingerprint(store):
    reserve(store, "fp-a", now=1_000, expires_at_ms=1_500)
    result = reserve(store, "fp-b", now=1_500)
    assert isinstance(result, Reserved)
    assert result.record.request_fingerprint == "fp-b"


def test_u64_extremes_round_trip(store):
    result = reserve(store, now=U64_MAX, expires_at_ms=U64_MAX)
    assert result.record.first_seen_at_ms == U64_MAX
    assert isinstance(reserve(store, now=U64_MAX), Reserved)  # expires_at <= now
    zero = reserve(store, key="zero", now=0, expires_at_ms=0)
    assert zero.record.first_seen_at_ms == 0
    assert isinstance(reserve(store, key="zero", now=0), Reserved)
    store.complete(tenant(), OP, "zero", Outcome("accepted", U64_MAX), now_ms=U64_MAX)
    assert store.get(tenant(), OP, "zero").outcome.completed_at_ms == U64_MAX


def test_actor_and_source_are_not_part_of_the_match(store):
    reserve(store, t=tenant(actor="actor-a"))
    other_actor = TenantContext(
        "org-a", "workspace-a", None, "actor-b", TenantSource.LOCAL_IMPLICIT
    )
    duplicate = reserve(store, t=other_actor)
    assert isinstance(duplicate, Duplicate)
    assert duplicate.record.tenant_context.actor_id == "actor-a"  # the stored one
    assert store.get(other_actor, OP, "send-1") is not None
    assert store.complete(other_actor, OP, "send-1", accepted()) is not None


def test_deployment_is_part_of_the_match(store):
    reserve(store, t=tenant(deployment="dep-1"))
    assert store.get(tenant(deployment="dep-2"), OP, "send-1") is None
    assert store.get(tenant(deployment=None), OP, "send-1") is None
    assert isinstance(reserve(store, t=tenant(deployment="dep-2")), Reserved)


def test_empty_deployment_shares_the_id_but_not_the_tenant_match(store):
    # Rust: the id hashes None and "" alike, the match compares Option<String>.
    reserve(store, t=tenant(deployment=None))
    empty = tenant(deployment="")
    assert isinstance(reserve(store, t=empty), Duplicate)
    assert store.get(empty, OP, "send-1") is None
    assert store.complete(empty, OP, "send-1", accepted()) is None


# -- complete ---------------------------------------------------------------------------------


def test_complete_sets_outcome_status_and_last_seen(store):
    reserve(store)
    outcome = accepted(1_100, delivery_id="d-1", nested={"z": [1, 2.5, None, True], "a": "ü"})
    completed = store.complete(tenant(), OP, "send-1", outcome, now_ms=1_200)
    assert completed.status is RecordStatus.COMPLETED
    assert completed.outcome == outcome
    assert completed.last_seen_at_ms == 1_200
    assert store.get(tenant(), OP, "send-1") == completed


def test_complete_with_null_details(store):
    reserve(store)
    completed = store.complete(tenant(), OP, "send-1", Outcome("rejected", 5), now_ms=6)
    assert completed.outcome == Outcome("rejected", 5)
    assert store.get(tenant(), OP, "send-1").outcome.details is None


def test_complete_turns_a_conflicted_record_completed(store):
    reserve(store, "fp-a")
    reserve(store, "fp-b")
    completed = store.complete(tenant(), OP, "send-1", accepted())
    assert completed.status is RecordStatus.COMPLETED
    assert completed.conflict_count == 1
    assert completed.conflict_fingerprints == ("fp-b",)


def test_complete_from_another_tenant_is_refused(store):
    reserve(store)
    before = store.get(tenant(), OP, "send-1")
    assert store.complete(tenant("org-b"), OP, "send-1", accepted()) is None
    assert store.complete(tenant(workspace="other"), OP, "send-1", accepted()) is None
    assert store.get(tenant(), OP, "send-1") == before


def test_complete_without_record_returns_none(store):
    assert store.complete(tenant(), OP, "missing", accepted()) is None
    assert store.get(tenant(), OP, "missing") is None


def test_complete_twice_overwrites_the_outcome(store):
    reserve(store)
    store.complete(tenant(), OP, "send-1", accepted(1, n=1), now_ms=1)
    second = store.complete(tenant(), OP, "send-1", accepted(2, n=2), now_ms=2)
    assert second.outcome.details == {"n": 2}


# -- get --------------------------------------------------------------------------------------


def test_get_trims_and_blank_operation_or_key_is_none(store):
    reserve(store)
    assert store.get(tenant(), f" {OP} ", "\tsend-1 ") is not None
    assert store.get(tenant(), "  ", "send-1") is None
    assert store.get(tenant(), OP, "") is None
    assert store.get(tenant("org-b"), OP, "send-1") is None


# -- release ----------------------------------------------------------------------------------


def test_release_deletes_a_reserved_record_with_the_same_fingerprint(store):
    reserve(store, "fp-a")
    assert store.release(tenant(), OP, "send-1", "fp-b") is False
    assert store.release(tenant("org-b"), OP, "send-1", "fp-a") is False
    assert store.release(tenant(), OP, "send-1", " fp-a ") is True
    assert store.get(tenant(), OP, "send-1") is None
    assert store.release(tenant(), OP, "send-1", "fp-a") is False
    assert isinstance(reserve(store, "fp-a"), Reserved)


def test_release_leaves_completed_and_conflicted_records(store):
    reserve(store, "fp-a", key="done")
    store.complete(tenant(), OP, "done", accepted())
    assert store.release(tenant(), OP, "done", "fp-a") is False
    reserve(store, "fp-a", key="fought")
    reserve(store, "fp-b", key="fought")
    assert store.release(tenant(), OP, "fought", "fp-a") is False
    assert store.get(tenant(), OP, "done") is not None
    assert store.get(tenant(), OP, "fought") is not None


# -- purge_expired ----------------------------------------------------------------------------


def test_purge_expired_removes_only_expired_records_in_batches(store):
    for i in range(7):
        reserve(store, key=f"exp-{i}", now=1_000, expires_at_ms=2_000 + i)
    reserve(store, key="later", now=1_000, expires_at_ms=10_000)
    reserve(store, key="never", now=1_000)
    reserve(store, "fp-a", key="exp-0", now=1_001)
    reserve(store, "fp-b", key="exp-0", now=1_002)  # has a conflict fingerprint
    assert store.purge_expired(now_ms=2_005, batch_size=2) == 6
    remaining = {k for k in ["later", "never", "exp-6"] if store.get(tenant(), OP, k)}
    assert remaining == {"later", "never", "exp-6"}
    assert store.get(tenant(), OP, "exp-0") is None
    assert store.purge_expired(now_ms=2_005) == 0
    assert store.stats().total == 3
    again = reserve(store, "fp-x", key="exp-0", now=3_000)
    assert isinstance(again, Reserved)
    assert reserve(store, "fp-y", key="exp-0", now=3_001).record.conflict_fingerprints == ("fp-y",)


# -- input rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((OP, " ", "owner", "fp"), "idempotency key cannot be empty"),
        (("", "k", "owner", "fp"), "idempotency operation cannot be empty"),
        ((OP, "k", "\t", "fp"), "idempotency owner cannot be empty"),
        ((OP, "k", "owner", "  "), "idempotency fingerprint cannot be empty"),
        (("", "", "", ""), "idempotency key cannot be empty"),  # Rust checks the key first
    ],
)
def test_reserve_rejects_blank_inputs_and_writes_nothing(store, args, message):
    with pytest.raises(InvalidInputError, match=f"^{message}$") as raised:
        store.reserve(tenant(), *args, now_ms=1)
    assert isinstance(raised.value, ValueError)
    assert store.stats().total == 0


def test_complete_and_release_reject_blank_inputs(store):
    with pytest.raises(InvalidInputError, match="idempotency operation cannot be empty"):
        store.complete(tenant(), " ", "k", accepted())
    with pytest.raises(InvalidInputError, match="idempotency key cannot be empty"):
        store.complete(tenant(), OP, "", accepted())
    with pytest.raises(InvalidInputError, match="idempotency fingerprint cannot be empty"):
        store.release(tenant(), OP, "k", "")


@pytest.mark.parametrize("bad", [-1, U64_MAX + 1, 1.5, True, "1"])
def test_out_of_range_times_are_rejected(store, bad):
    with pytest.raises(InvalidInputError, match="now_ms"):
        reserve(store, now=bad)
    with pytest.raises(InvalidInputError, match="expires_at_ms"):
        reserve(store, now=1, expires_at_ms=bad)
    assert store.stats().total == 0


def test_details_that_are_not_json_are_rejected(store):
    reserve(store)
    with pytest.raises(InvalidInputError, match="JSON"):
        store.complete(tenant(), OP, "send-1", Outcome("accepted", 1, details={"x": object()}))
    with pytest.raises(InvalidInputError, match="JSON"):
        store.complete(tenant(), OP, "send-1", Outcome("accepted", 1, details=float("nan")))
    assert store.get(tenant(), OP, "send-1").status is RecordStatus.RESERVED


def test_stats_counts_by_operation_and_status(store):
    reserve(store, key="a")
    reserve(store, key="b")
    reserve(store, "other", key="b")
    reserve(store, op="webhook.provider_event", key="c")
    store.complete(tenant(), "webhook.provider_event", "c", accepted())
    stats = store.stats()
    assert stats.total == 3
    assert stats.by_status() == {
        RecordStatus.RESERVED: 1,
        RecordStatus.COMPLETED: 1,
        RecordStatus.CONFLICTED: 1,
    }
    assert stats.by_operation() == {OP: 2, "webhook.provider_event": 1}


def _fields(record: IdempotencyRecord) -> dict:
    return {name: getattr(record, name) for name in IdempotencyRecord.__dataclass_fields__}


def test_lone_surrogates_are_rejected_before_anything_is_written(store):
    with pytest.raises(InvalidInputError, match="idempotency key is not valid Unicode"):
        reserve(store, key="k\ud800")
    with pytest.raises(InvalidInputError, match="tenant org_id is not valid Unicode"):
        reserve(store, t=tenant("\udfff"))
    reserve(store)
    with pytest.raises(InvalidInputError, match="outcome details is not valid Unicode"):
        store.complete(tenant(), OP, "send-1", Outcome("accepted", 1, details={"x": "\ud800"}))
    assert store.stats().total == 1


def test_nul_in_a_key(store, backend):
    # Rust and SQLite keep NUL in strings; PostgreSQL text cannot hold it.
    if backend.startswith("postgresql"):
        with pytest.raises(InvalidInputError, match="NUL"):
            reserve(store, key="k\x00")
        assert store.stats().total == 0
    else:
        assert isinstance(reserve(store, key="k\x00"), Reserved)
        assert store.get(tenant(), OP, "k\x00").key == "k\x00"
        assert store.get(tenant(), OP, "k") is None
