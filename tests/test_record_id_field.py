"""A record whose own ``record_id`` field is not its map key (or is empty) keeps that field as
the file has it: stored (migration 0002, NULL when it equals the key), returned by the store,
written back by the export as Rust would write it (the map key as the key, the field as it
was). And the migration that adds the column keeps every row, up and down, on both engines."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from idemstore import FileFormatError, IdempotencyRecord, IdempotencyStore, import_file
from idemstore.bench import datagen
from idemstore.db import migrate as idem_migrate
from idemstore.transfer.exporter import export_file
from idemstore.transfer.reader import read_records
from idemstore.transfer.writer import write_entries
from tests.conftest import Database

OTHER_KEY = "idem_" + "0" * 64


def _rust_file(path: Path, entries: list[tuple[str, IdempotencyRecord]]) -> str:
    """``entries`` as the Rust store writes its file (what ``idemstore export`` must give
    back), keys in order."""
    write_entries(path, sorted(entries, key=lambda entry: entry[0]))
    return path.read_text(encoding="utf-8")


def _entries() -> list[tuple[str, IdempotencyRecord]]:
    records = datagen.generate_records(4, seed=31)
    plain = [(r.record_id, r) for r in records[:2]]
    # One stored under another map key, one whose field is empty (under its own key).
    return [
        *plain,
        (OTHER_KEY, records[2]),
        (records[3].record_id, replace(records[3], record_id="")),
    ]


def _store(database: Database) -> IdempotencyStore:
    return database.sync_store()


def test_the_record_id_field_survives_import_and_export(database: Database, tmp_path: Path):
    source = tmp_path / "in.json"
    text = _rust_file(source, _entries())
    store = _store(database)
    try:
        report = import_file(store, source)
        assert (report.inserted, report.id_mismatches) == (4, 2)  # still reported
        out = tmp_path / "out.json"
        assert export_file(store, out) == 4
        # Byte for byte what Rust would write back: each key with its record's own field.
        assert json.loads(out.read_text(encoding="utf-8")) == json.loads(text)
        assert out.read_text(encoding="utf-8") == text
        # The store gives the record's own field, as the Rust store holds it.
        (record,) = [r.record for r in read_records(source) if r.record.record_id == ""]
        got = store.get(record.tenant_context, record.operation, record.key)
        assert got is not None and got.record_id == ""
    finally:
        store.close()


def test_running_the_import_again_finds_it_unchanged(database: Database, tmp_path: Path):
    source = tmp_path / "in.json"
    _rust_file(source, _entries())
    store = _store(database)
    try:
        import_file(store, source)
        again = import_file(store, source)
        assert (again.unchanged, again.kept, again.inserted) == (4, 0, 0)
        replaced = import_file(store, source, replace=True)
        assert (replaced.unchanged, replaced.replaced) == (4, 0)
        with pytest.raises(FileFormatError, match="id mismatch"):
            import_file(store, source, strict=True)
    finally:
        store.close()


def test_a_fresh_reservation_after_expiry_drops_the_old_field(database: Database, tmp_path):
    records = datagen.generate_records(1, seed=5)
    record = records[0]
    hand = replace(record, record_id="written-by-hand", expires_at_ms=10)
    source = tmp_path / "in.json"
    _rust_file(source, [(record.record_id, hand)])
    store = _store(database)
    try:
        import_file(store, source)
        got = store.get(record.tenant_context, record.operation, record.key)
        assert got is not None and got.record_id == "written-by-hand"
        fresh = store.reserve(
            record.tenant_context, record.operation, record.key, "owner", "fp", now_ms=11
        )
        assert fresh.record.record_id == record.record_id  # a new record: the computed id
        got = store.get(record.tenant_context, record.operation, record.key)
        assert got is not None and got.record_id == record.record_id
    finally:
        store.close()


# -- the migration ------------------------------------------------------------------------------

_COLUMNS_0001 = (
    "record_id, schema_version, org_id, workspace_id, deployment_id, actor_id, tenant_source, "
    "operation, key, owner, request_fingerprint, status, first_seen_at_ms, last_seen_at_ms, "
    "first_seen_event_id, expires_at_ms, outcome_kind, outcome_completed_at_ms, "
    "outcome_primary_ref_kind, outcome_primary_ref_id, outcome_secondary_ref_kind, "
    "outcome_secondary_ref_id, outcome_details, conflict_count, reservation_token"
)


def _populate_0001(conn: sa.Connection) -> None:
    names = [c.strip() for c in _COLUMNS_0001.split(",")]
    for i in range(3):
        values: dict[str, Any] = dict.fromkeys(names)
        values.update(
            record_id=f"idem_{i}",
            schema_version=1,
            org_id="o",
            workspace_id="w",
            tenant_source="explicit",
            operation="op",
            key=f"k{i}",
            owner="owner",
            request_fingerprint="fp",
            status="completed" if i else "conflicted",
            first_seen_at_ms=-(2**63) + i,
            last_seen_at_ms=2**63 - 1,
            outcome_kind="done" if i else None,
            outcome_completed_at_ms=5 if i else None,
            outcome_details='{"a":[1,2.5,null]}' if i else None,
            conflict_count=i - 2**63,
            reservation_token=1000 + i,
        )
        conn.execute(
            sa.text(
                f"INSERT INTO idemstore_records ({_COLUMNS_0001}) "
                f"VALUES ({', '.join(':' + n for n in names)})"
            ),
            values,
        )
    for fp in ("a", "b"):
        conn.execute(
            sa.text(
                "INSERT INTO idemstore_conflict_fingerprints (record_id, fingerprint) "
                "VALUES ('idem_0', :fp)"
            ),
            {"fp": fp},
        )


def _rows(conn: sa.Connection) -> tuple[list[Any], list[Any]]:
    records = conn.execute(
        sa.text(
            f"SELECT {_COLUMNS_0001.replace('outcome_details', 'CAST(outcome_details AS TEXT)')} "
            "FROM idemstore_records ORDER BY record_id"
        )
    ).all()
    fps = conn.execute(
        sa.text(
            "SELECT id, record_id, fingerprint FROM idemstore_conflict_fingerprints ORDER BY id"
        )
    ).all()
    return [tuple(r) for r in records], [tuple(r) for r in fps]


def test_migration_0002_keeps_every_row_up_and_down(database: Database):
    engine = database.sync_engine()
    with engine.begin() as conn:
        idem_migrate.upgrade(conn, "0001_initial")
        _populate_0001(conn)
        before = _rows(conn)
    with engine.begin() as conn:
        idem_migrate.upgrade(conn, "0002_record_id_field")
        assert idem_migrate.current_revision(conn) == "0002_record_id_field"
        assert _rows(conn) == before
        assert conn.execute(
            sa.text("SELECT count(*) FROM idemstore_records WHERE record_id_field IS NULL")
        ).scalar() == len(before[0])
    with engine.begin() as conn:
        idem_migrate.downgrade(conn, "0001_initial")
        assert idem_migrate.current_revision(conn) == "0001_initial"
        assert _rows(conn) == before
        columns = {c["name"] for c in sa.inspect(conn).get_columns("idemstore_records")}
        assert "record_id_field" not in columns
