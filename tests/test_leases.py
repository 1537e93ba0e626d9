"""Leases, fencing tokens and ttl (issue 11), on every backend, with ``now_ms`` given.

- a reservation with ``lease`` holds the key until ``now + lease``: the same request gets
  ``Duplicate`` while the lease runs, and re-claims it (``Reserved``, a new token, the new
  owner, ``first_seen_*`` kept) once ``lease_expires_at_ms <= now``;
- another fingerprint is a ``Conflict`` whatever the lease, and does not keep a dead holder's
  key: a ``conflicted`` reservation without outcome whose lease ended is re-claimed too (its
  status and conflict history kept); no lease is the Rust store exactly;
- ``complete``/``release``/``renew`` with a token write only while it holds the key
  (``LeaseLostError`` / ``False`` and nothing written otherwise), conflicted or not: a fenced
  ``release`` deletes the holder's reservation (and its conflict fingerprints) while it has no
  outcome;
- ``ttl`` sets ``expires_at_ms = now + ttl``; bad leases and ttls are refused with one line.
And the migration that adds the column keeps every row, up and down, on both engines.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from idemstore import (
    Conflict,
    Duplicate,
    IdempotencyStore,
    IdemstoreError,
    InvalidInputError,
    LeaseLostError,
    Outcome,
    RecordStatus,
    Reserved,
    TenantContext,
    export_file,
    import_file,
)
from idemstore.db import migrate as idem_migrate
from tests.conftest import Database
from tests.test_record_id_field import _populate_0001, _rows

OP = "outbox.send"
KEY = "send-1"
FP = "fp-a"
T0 = 1_000_000


def tenant() -> TenantContext:
    return TenantContext.explicit_user_workspace("org-a", "ws-a", None, "actor-a")


def reserve(store: Any, *, now: int, owner: str = "w1", fp: str = FP, **kw: Any) -> Any:
    return store.reserve(
        tenant(), OP, KEY, owner, fp, first_seen_event_id="evt-1", now_ms=now, **kw
    )


def done(at: int = T0 + 10) -> Outcome:
    return Outcome("accepted", completed_at_ms=at, primary_ref_kind="delivery", details={"a": 1})


def test_a_lease_is_recorded_as_now_plus_lease(store: Any) -> None:
    r = reserve(store, now=T0, lease=timedelta(seconds=30))
    assert isinstance(r, Reserved)
    assert r.record.lease_expires_at_ms == T0 + 30_000
    assert r.record.in_progress_until_ms == T0 + 30_000
    assert isinstance(r.token, str) and r.token
    assert store.get(tenant(), OP, KEY) == r.record
    # int milliseconds too
    other = store.reserve(tenant(), OP, "k2", "w1", FP, now_ms=T0, lease=250)
    assert other.record.lease_expires_at_ms == T0 + 250


def test_duplicate_while_the_lease_runs_then_reclaimed_when_it_ends(store: Any) -> None:
    first = reserve(store, now=T0, lease=100)
    live = reserve(store, now=T0 + 99, owner="w2", lease=100)
    assert isinstance(live, Duplicate)
    assert live.record.owner == "w1"
    assert live.record.lease_expires_at_ms == T0 + 100
    assert live.record.last_seen_at_ms == T0 + 99
    # lease_expires_at_ms <= now: re-claimed, in the same upsert
    again = reserve(store, now=T0 + 100, owner="w2", lease=500)
    assert isinstance(again, Reserved)
    assert again.token != first.token
    rec = again.record
    assert (rec.owner, rec.lease_expires_at_ms, rec.last_seen_at_ms) == ("w2", T0 + 600, T0 + 100)
    assert (rec.first_seen_at_ms, rec.first_seen_event_id) == (T0, "evt-1")
    assert rec.status is RecordStatus.RESERVED and rec.outcome is None
    assert store.get(tenant(), OP, KEY) == rec
    # a re-claim without a lease leaves none: from then on the Rust rule (never re-claimed)
    third = reserve(store, now=T0 + 600, owner="w3")
    assert isinstance(third, Reserved) and third.token not in (first.token, again.token)
    assert third.record.lease_expires_at_ms is None
    assert third.record.in_progress_until_ms is None
    assert isinstance(reserve(store, now=T0 + 10**9, owner="w4", lease=5), Duplicate)


def test_a_reclaim_keeps_the_expiry_and_the_conflict_history_rules(store: Any) -> None:
    reserve(store, now=T0, lease=100, ttl=10_000)
    again = reserve(store, now=T0 + 100, owner="w2", lease=100, ttl=50)
    assert isinstance(again, Reserved)
    assert again.record.expires_at_ms == T0 + 10_000  # the key's, not the re-claimer's ttl
    assert again.record.conflict_count == 0 and again.record.conflict_fingerprints == ()


def test_a_token_is_new_on_every_reserved(store: Any) -> None:
    tokens = set()
    now = T0
    for _ in range(5):
        r = reserve(store, now=now, lease=1)
        assert isinstance(r, Reserved)
        tokens.add(r.token)
        now += 1
    assert len(tokens) == 5


def test_conflict_whatever_the_lease(store: Any) -> None:
    reserve(store, now=T0, lease=100)
    live = reserve(store, now=T0 + 1, fp="fp-b", lease=100)
    assert isinstance(live, Conflict)
    ended = reserve(store, now=T0 + 1000, fp="fp-c", lease=100)
    assert isinstance(ended, Conflict)
    assert ended.record.conflict_count == 2
    assert ended.record.conflict_fingerprints == ("fp-b", "fp-c")
    assert ended.record.owner == "w1" and ended.record.lease_expires_at_ms == T0 + 100
    # a conflict does not keep the key: the same request re-claims it once the lease ended
    # (test_a_conflict_does_not_keep_a_dead_holders_key)
    assert isinstance(reserve(store, now=T0 + 2000, lease=100), Reserved)


def test_a_conflict_does_not_keep_a_dead_holders_key(store: Any) -> None:
    # w1 reserves with a 30 s lease and dies; a request with another fingerprint arrives
    first = reserve(store, now=T0, lease=timedelta(seconds=30))
    conflict = reserve(store, now=T0 + 10, owner="w2", fp="fp-b", lease=100)
    assert isinstance(conflict, Conflict) and conflict.record.status is RecordStatus.CONFLICTED
    # the same request while the lease runs: in progress, until the lease ends
    live = reserve(store, now=T0 + 29_999, owner="w3", lease=100)
    assert isinstance(live, Duplicate) and live.record.owner == "w1"
    assert live.record.in_progress_until_ms == T0 + 30_000
    # the lease ended: w1's retry (or anyone with the same request) re-claims the key
    again = reserve(store, now=T0 + 30_000, owner="w3", lease=500)
    assert isinstance(again, Reserved) and again.token != first.token
    rec = again.record
    assert rec.status is RecordStatus.CONFLICTED and rec.outcome is None  # Rust data kept
    assert (rec.conflict_count, rec.conflict_fingerprints) == (1, ("fp-b",))
    assert (rec.owner, rec.lease_expires_at_ms, rec.last_seen_at_ms) == (
        "w3",
        T0 + 30_500,
        T0 + 30_000,
    )
    assert (rec.first_seen_at_ms, rec.first_seen_event_id) == (T0, "evt-1")
    assert rec.in_progress_until_ms == T0 + 30_500
    assert store.get(tenant(), OP, KEY) == rec
    # the dead holder's token no longer holds it
    with pytest.raises(LeaseLostError):
        store.complete(tenant(), OP, KEY, done(), now_ms=T0 + 30_001, token=first.token)
    with pytest.raises(LeaseLostError):
        store.renew(tenant(), OP, KEY, first.token, lease=100, now_ms=T0 + 30_001)
    assert store.release(tenant(), OP, KEY, FP, token=first.token) is False
    assert store.get(tenant(), OP, KEY) == rec
    # the new holder renews and completes its conflicted reservation by its token
    more = reserve(store, now=T0 + 30_002, owner="w4", fp="fp-c", lease=100)
    assert isinstance(more, Conflict) and more.record.conflict_count == 2
    assert store.renew(tenant(), OP, KEY, again.token, lease=1000, now_ms=T0 + 30_003) == (
        T0 + 31_003
    )
    assert isinstance(reserve(store, now=T0 + 31_002, owner="w5", lease=100), Duplicate)
    completed = store.complete(tenant(), OP, KEY, done(), now_ms=T0 + 31_010, token=again.token)
    assert completed.status is RecordStatus.COMPLETED and completed.outcome == done()
    assert (completed.conflict_count, completed.conflict_fingerprints) == (2, ("fp-b", "fp-c"))
    assert completed.in_progress_until_ms is None
    with pytest.raises(LeaseLostError):  # an outcome: no lease left to renew
        store.renew(tenant(), OP, KEY, again.token, lease=100, now_ms=T0 + 31_011)
    replay = reserve(store, now=T0 + 10**6, owner="w6", lease=100)
    assert isinstance(replay, Duplicate) and replay.record.outcome == done()


def test_a_holder_renews_and_completes_through_a_conflict(store: Any) -> None:
    held = reserve(store, now=T0, lease=100)
    assert isinstance(reserve(store, now=T0 + 1, owner="w2", fp="fp-b"), Conflict)
    # the holder is alive: its token still holds the conflicted reservation
    assert store.get(tenant(), OP, KEY).in_progress_until_ms == T0 + 100
    assert store.renew(tenant(), OP, KEY, held.token, lease=100, now_ms=T0 + 90) == T0 + 190
    assert isinstance(reserve(store, now=T0 + 150, owner="w3", lease=100), Duplicate)
    rec = store.complete(tenant(), OP, KEY, done(), now_ms=T0 + 160, token=held.token)
    assert rec.status is RecordStatus.COMPLETED and rec.owner == "w1"
    assert (rec.conflict_count, rec.conflict_fingerprints) == (1, ("fp-b",))


def test_a_conflicted_record_with_an_outcome_or_without_a_lease_is_never_reclaimed(
    store: Any,
) -> None:
    # without a lease: the Rust store exactly
    plain = store.reserve(tenant(), OP, "plain", "w1", FP, now_ms=T0)
    assert isinstance(store.reserve(tenant(), OP, "plain", "w2", "fp-b", now_ms=T0 + 1), Conflict)
    d = store.reserve(tenant(), OP, "plain", "w3", FP, now_ms=T0 + 10**9, lease=5)
    assert isinstance(d, Duplicate) and d.record.status is RecordStatus.CONFLICTED
    assert d.record.owner == "w1" and d.record.in_progress_until_ms is None
    assert store.release(tenant(), OP, "plain", FP) is False  # unfenced: only "reserved"
    assert store.release(tenant(), OP, "plain", FP, token=plain.token) is True
    # with an outcome: replayed, never re-claimed, never released
    r = reserve(store, now=T0, lease=100)
    store.complete(tenant(), OP, KEY, done(), now_ms=T0 + 10, token=r.token)
    assert isinstance(reserve(store, now=T0 + 20, owner="w2", fp="fp-b"), Conflict)
    later = reserve(store, now=T0 + 10_000, owner="w3", lease=100)
    assert isinstance(later, Duplicate) and later.record.outcome == done()
    assert later.record.status is RecordStatus.CONFLICTED
    assert later.record.in_progress_until_ms is None
    assert store.release(tenant(), OP, KEY, FP, token=r.token) is False
    assert store.get(tenant(), OP, KEY) == later.record


def test_a_fenced_release_frees_a_conflicted_reservation_of_its_own(store: Any) -> None:
    held = reserve(store, now=T0, lease=100)
    other = store.reserve(tenant(), OP, "other-key", "w1", FP, now_ms=T0, lease=100)
    assert isinstance(reserve(store, now=T0 + 1, owner="w2", fp="fp-b"), Conflict)
    before = store.get(tenant(), OP, KEY)
    assert store.release(tenant(), OP, KEY, FP) is False  # without a token: Rust's rule
    assert store.release(tenant(), OP, KEY, FP, token=other.token) is False  # not its token
    assert store.release(tenant(), OP, KEY, "fp-b", token=held.token) is False  # not its request
    assert store.get(tenant(), OP, KEY) == before
    # the work failed: the holder releases its reservation, conflicted or not
    assert store.release(tenant(), OP, KEY, FP, token=held.token) is True
    assert store.get(tenant(), OP, KEY) is None
    fresh = reserve(store, now=T0 + 2, owner="w3", lease=100)
    assert isinstance(fresh, Reserved) and fresh.record.status is RecordStatus.RESERVED
    assert (fresh.record.conflict_count, fresh.record.conflict_fingerprints) == (0, ())
    assert fresh.record.first_seen_at_ms == T0 + 2
    # a re-claimed conflicted reservation is released by its new token
    assert isinstance(reserve(store, now=T0 + 3, owner="w2", fp="fp-c"), Conflict)
    again = reserve(store, now=T0 + 102, owner="w4", lease=100)
    assert isinstance(again, Reserved) and again.record.status is RecordStatus.CONFLICTED
    assert store.release(tenant(), OP, KEY, FP, token=fresh.token) is False
    assert store.release(tenant(), OP, KEY, FP, token=again.token) is True
    assert store.get(tenant(), OP, KEY) is None


def test_a_fenced_release_takes_the_conflict_fingerprints_with_it(database: Database) -> None:
    store = database.sync_store()
    try:
        held = reserve(store, now=T0, lease=100)
        for fp in ("fp-b", "fp-c"):
            reserve(store, now=T0 + 1, owner="w2", fp=fp)
        store.reserve(tenant(), OP, "kept", "w1", FP, now_ms=T0)
        store.reserve(tenant(), OP, "kept", "w2", "fp-b", now_ms=T0)

        def fingerprints() -> int:
            with store.engine.connect() as conn:
                return int(
                    conn.execute(
                        sa.text("SELECT count(*) FROM idemstore_conflict_fingerprints")
                    ).scalar_one()
                )

        assert fingerprints() == 3
        assert store.release(tenant(), OP, KEY, FP, token=held.token) is True
        assert fingerprints() == 1  # the released record's are gone, the other key's stay
        assert store.get(tenant(), OP, "kept").conflict_fingerprints == ("fp-b",)
    finally:
        store.close()


def test_no_lease_is_the_rust_store(store: Any) -> None:
    first = reserve(store, now=T0)
    assert first.record.lease_expires_at_ms is None
    for now in (T0 + 1, T0 + 10**6, 2**64 - 2):
        d = reserve(store, now=now, owner="w2", lease=1)
        assert isinstance(d, Duplicate)
        assert d.record.owner == "w1" and d.record.lease_expires_at_ms is None


def test_a_completed_record_is_replayed_after_its_lease(store: Any) -> None:
    r = reserve(store, now=T0, lease=100)
    store.complete(tenant(), OP, KEY, done(), now_ms=T0 + 10, token=r.token)
    later = reserve(store, now=T0 + 10_000, owner="w2", lease=100)
    assert isinstance(later, Duplicate)
    assert later.record.outcome == done()
    assert later.record.in_progress_until_ms is None


def test_expiry_comes_before_the_lease(store: Any) -> None:
    first = reserve(store, now=T0, lease=100, expires_at_ms=T0 + 50)
    fresh = reserve(store, now=T0 + 50, owner="w2", lease=100)
    assert isinstance(fresh, Reserved) and fresh.token != first.token
    assert fresh.record.first_seen_at_ms == T0 + 50  # a new record, not a re-claim
    assert fresh.record.expires_at_ms is None
    assert fresh.record.lease_expires_at_ms == T0 + 150


def test_fenced_complete(store: Any) -> None:
    first = reserve(store, now=T0, lease=100)
    second = reserve(store, now=T0 + 100, owner="w2", lease=100)
    before = store.get(tenant(), OP, KEY)
    # the first holder, late: refused, nothing written
    with pytest.raises(LeaseLostError, match="no longer holds"):
        store.complete(tenant(), OP, KEY, done(), now_ms=T0 + 150, token=first.token)
    assert store.get(tenant(), OP, KEY) == before
    # the holder: written
    rec = store.complete(tenant(), OP, KEY, done(), now_ms=T0 + 160, token=second.token)
    assert rec.status is RecordStatus.COMPLETED and rec.outcome == done()
    assert rec.last_seen_at_ms == T0 + 160
    assert store.get(tenant(), OP, KEY) == rec
    # a token of another tenant's view, or of a key that is gone: refused too
    assert store.release(tenant(), OP, KEY, FP) is False  # completed: Rust's release declines
    with pytest.raises(LeaseLostError):
        store.complete(tenant(), OP, "other-key", done(), token=second.token)


def test_complete_without_a_token_is_rusts(store: Any) -> None:
    reserve(store, now=T0, lease=100)
    reserve(store, now=T0 + 100, owner="w2", lease=100)
    rec = store.complete(tenant(), OP, KEY, done(), now_ms=T0 + 150)
    assert rec.status is RecordStatus.COMPLETED
    assert store.complete(tenant(), OP, "missing", done()) is None


def test_a_lease_ended_but_not_reclaimed_still_belongs_to_its_token(store: Any) -> None:
    r = reserve(store, now=T0, lease=100)
    rec = store.complete(tenant(), OP, KEY, done(), now_ms=T0 + 5_000, token=r.token)
    assert rec.outcome == done()


def test_fenced_release(store: Any) -> None:
    first = reserve(store, now=T0, lease=100)
    second = reserve(store, now=T0 + 100, owner="w2", lease=100)
    before = store.get(tenant(), OP, KEY)
    assert store.release(tenant(), OP, KEY, FP, token=first.token) is False
    assert store.get(tenant(), OP, KEY) == before
    assert store.release(tenant(), OP, KEY, FP, token=second.token) is True
    assert store.get(tenant(), OP, KEY) is None
    assert store.release(tenant(), OP, KEY, FP, token=second.token) is False
    # a new reservation after the release: the old token does not hold it
    third = reserve(store, now=T0 + 200, lease=100)
    assert store.release(tenant(), OP, KEY, FP, token=second.token) is False
    assert store.release(tenant(), OP, KEY, FP, token=third.token) is True


def test_renew(store: Any) -> None:
    r = reserve(store, now=T0, lease=100)
    assert store.renew(tenant(), OP, KEY, r.token, lease=100, now_ms=T0 + 90) == T0 + 190
    assert store.get(tenant(), OP, KEY).lease_expires_at_ms == T0 + 190
    # renewed: no re-claim at the old end
    assert isinstance(reserve(store, now=T0 + 150, owner="w2", lease=100), Duplicate)
    assert (
        store.renew(tenant(), OP, KEY, r.token, lease=timedelta(seconds=1), now_ms=T0 + 180)
        == T0 + 1180
    )
    again = reserve(store, now=T0 + 1180, owner="w2", lease=100)
    assert isinstance(again, Reserved)
    before = store.get(tenant(), OP, KEY)
    with pytest.raises(LeaseLostError):
        store.renew(tenant(), OP, KEY, r.token, lease=100, now_ms=T0 + 1181)
    assert store.get(tenant(), OP, KEY) == before
    # a completed reservation has no lease left to renew
    store.complete(tenant(), OP, KEY, done(), now_ms=T0 + 1190, token=again.token)
    with pytest.raises(LeaseLostError):
        store.renew(tenant(), OP, KEY, again.token, lease=100, now_ms=T0 + 1191)


def test_ttl_sets_expires_at(store: Any) -> None:
    r = reserve(store, now=T0, ttl=timedelta(hours=24))
    assert r.record.expires_at_ms == T0 + 24 * 3600 * 1000
    r2 = store.reserve(tenant(), OP, "k2", "w1", FP, now_ms=T0, ttl=5)
    assert r2.record.expires_at_ms == T0 + 5
    assert isinstance(store.reserve(tenant(), OP, "k2", "w1", FP, now_ms=T0 + 5), Reserved)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lease": 0}, "lease must be at least 1 millisecond"),
        ({"lease": -5}, "lease must be at least 1 millisecond"),
        ({"lease": timedelta(microseconds=999)}, "lease must be at least 1 millisecond"),
        ({"lease": 1.5}, "lease must be a timedelta or an int of milliseconds"),
        ({"lease": True}, "lease must be a timedelta or an int of milliseconds"),
        ({"lease": 2**64}, "lease ends after 2\\^64-1"),
        ({"ttl": 0}, "ttl must be at least 1 millisecond"),
        ({"ttl": "1h"}, "ttl must be a timedelta"),
        ({"ttl": 5, "expires_at_ms": T0 + 9}, "pass ttl or expires_at_ms, not both"),
    ],
)
def test_bad_leases_and_ttls_are_refused(store: Any, kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        reserve(store, now=T0, **kwargs)
    assert store.get(tenant(), OP, KEY) is None


def test_bad_tokens_are_refused(store: Any) -> None:
    reserve(store, now=T0, lease=100)
    for token in ("", "not-a-token", "0x12", "A", "1" * 17, 12):
        with pytest.raises(InvalidInputError, match="token must be a token"):
            store.complete(tenant(), OP, KEY, done(), token=token)
        with pytest.raises(InvalidInputError, match="token must be a token"):
            store.renew(tenant(), OP, KEY, token, lease=10)
    with pytest.raises(InvalidInputError, match="lease must be at least"):
        store.renew(tenant(), OP, KEY, "1", lease=0)
    assert store.get(tenant(), OP, KEY).outcome is None


def test_errors_are_idemstore_errors() -> None:
    import idemstore

    for name in ("LeaseLostError", "InProgressError", "ConflictError"):
        assert issubclass(getattr(idemstore, name), IdemstoreError)
        assert name in idemstore.__all__


def test_reserved_matches_with_its_token(store: Any) -> None:
    match reserve(store, now=T0, lease=100):
        case Reserved(record, token):
            assert record.key == KEY and isinstance(token, str)
        case _:
            pytest.fail("not Reserved")


def test_export_drops_the_lease_and_import_sets_none(database: Database, tmp_path) -> None:
    store = database.sync_store()
    try:
        with_lease = reserve(store, now=T0, lease=100).record
        store.reserve(tenant(), OP, "plain", "w1", FP, first_seen_event_id="evt-1", now_ms=T0)
        leased_file, plain_file = tmp_path / "leased.json", tmp_path / "plain.json"
        export_file(store, leased_file)
        # the same records as the Rust store would have them (no lease) give the same file
        store.release(tenant(), OP, KEY, FP)
        store.reserve(tenant(), OP, KEY, "w1", FP, first_seen_event_id="evt-1", now_ms=T0)
        export_file(store, plain_file)
        assert leased_file.read_bytes() == plain_file.read_bytes()
        assert b"lease" not in leased_file.read_bytes()
    finally:
        store.close()
    fresh = IdempotencyStore.from_url(
        f"sqlite:///{tmp_path / 'fresh.db'}", migrate=True
    )  # a new database of the same file's records
    try:
        import_file(fresh, leased_file)
        imported = fresh.get(tenant(), OP, KEY)
        assert imported == replace(with_lease, lease_expires_at_ms=None)
        # an imported reservation is never re-claimed (it has no lease)
        assert isinstance(reserve(fresh, now=T0 + 10**9, owner="w2", lease=5), Duplicate)
    finally:
        fresh.close()


# -- the migration ------------------------------------------------------------------------------


def test_migration_0003_keeps_every_row_up_and_down(database: Database) -> None:
    engine = database.sync_engine()
    with engine.begin() as conn:
        idem_migrate.upgrade(conn, "0001_initial")
        _populate_0001(conn)
        idem_migrate.upgrade(conn, "0002_record_id_field")
        conn.execute(sa.text("UPDATE idemstore_records SET record_id_field = 'f' || record_id"))
        before = _rows(conn), _fields(conn)
    with engine.begin() as conn:
        idem_migrate.upgrade(conn, "0003_leases")
        assert idem_migrate.current_revision(conn) == "0003_leases"
        assert (_rows(conn), _fields(conn)) == before
        assert conn.execute(
            sa.text("SELECT count(*) FROM idemstore_records WHERE lease_expires_at_ms IS NULL")
        ).scalar() == len(before[0][0])
    with engine.begin() as conn:
        idem_migrate.downgrade(conn, "0002_record_id_field")
        assert idem_migrate.current_revision(conn) == "0002_record_id_field"
        assert (_rows(conn), _fields(conn)) == before
        columns = {c["name"] for c in sa.inspect(conn).get_columns("idemstore_records")}
        assert "lease_expires_at_ms" not in columns and "record_id_field" in columns


def _fields(conn: sa.Connection) -> list[Any]:
    return list(
        conn.execute(
            sa.text("SELECT record_id, record_id_field FROM idemstore_records ORDER BY record_id")
        ).all()
    )
