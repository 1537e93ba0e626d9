"""The fast import paths: records decoded many at once (chunks) and files cut into parts read by
worker processes. Whatever path reads a file, the database, the report and the error must be
those of the plain in-process, record-by-record read; a failed import leaves nothing behind."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from idemstore import IdempotencyStore, _parse, _rows, importer, jsonfile
from idemstore.errors import FileFormatError
from idemstore.jsonfile import record_to_json
from idemstore.schema import conflict_fingerprints as F
from idemstore.schema import records as R
from tests import datagen
from tests.conftest import Database

ROOT = Path(__file__).parent.parent
RUST_PREFIX = '{\n  "schema_version": 1,\n  "records": {'
RUST_END = "\n  }\n}"
#: What the importer logs when a parallel parse failed and the file is read in-process instead.
FALLBACK_LOG = "reading it in one process"

Entry = tuple[str, dict[str, Any]]


# --------------------------------------------------------------------------------------------
# Files


def _body(value: object) -> str:
    """A record value as serde_json's pretty printer lays it out at record depth."""
    return json.dumps(value, indent=2, ensure_ascii=False).replace("\n", "\n    ")


def _rust_text(entries: list[Entry], *, bodies: dict[str, str] | None = None) -> str:
    """A versioned file laid out exactly as Rust writes it (records in the given order);
    ``bodies`` overrides the text of some records (by map key)."""
    bodies = bodies or {}
    members = ",".join(f"\n    {json.dumps(k)}: {bodies.get(k) or _body(v)}" for k, v in entries)
    return RUST_PREFIX + members + (RUST_END if entries else "}\n}")


@dataclass(frozen=True)
class Built:
    """Records for a file, in file order, and what an import must report about them."""

    entries: list[Entry]
    unknown_fields: dict[str, int]
    records_with_unknown_fields: int
    id_mismatches: int


def _realistic(n: int, seed: int) -> Built:
    """``n`` generated records (plus the samples) in a shuffled, hash-map-like order; some in
    the legacy shape (defaults left out), some with unknown fields, id mismatches (map key or
    recomputed id), nested unicode details."""
    rng = random.Random(seed)
    records = [*datagen.sample_records(), *datagen.generate_records(n, seed=seed)]
    entries: list[Entry] = []
    unknown: dict[str, int] = {}
    with_unknown = mismatches = 0
    for i, record in enumerate(records):
        value = datagen.legacy_record_json(record) if i % 5 == 1 else record_to_json(record)
        key = record.record_id
        outcome = value.get("outcome")
        found: list[str] = []
        if i % 23 == 2:
            value["extra"] = {"nested": [1, {"\u00fc": None}], "n": i}
            found.append("extra")
        if i % 31 == 3 and "tenant_context" in value:
            value["tenant_context"]["region"] = "eu"
            found.append("tenant_context.region")
        if i % 29 == 4 and outcome is not None:
            outcome["note"] = [i]
            found.append("outcome.note")
        if i % 19 == 7 and outcome is not None:
            outcome["details"] = {
                "z": {"deep": [[{"\u00e9t\u00e9": "\u2603 \U0001f600"}]], "empty": {}},
                "a": [None, True, 1.5, -3],
                "n": i,
            }
        if i % 43 == 5:
            key = "idem_" + hashlib.sha256(f"other-{i}".encode()).hexdigest()
            mismatches += 1
        elif i % 47 == 6:
            value["key"] += "#edited"  # the id recomputed from it differs
            mismatches += 1
        for name in found:
            unknown[name] = unknown.get(name, 0) + 1
        with_unknown += bool(found)
        entries.append((key, value))
    rng.shuffle(entries)
    return Built(entries, dict(sorted(unknown.items())), with_unknown, mismatches)


@pytest.fixture(scope="module")
def realistic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Built]:
    built = _realistic(4000, seed=21)
    path = tmp_path_factory.mktemp("realistic") / "keys.json"
    path.write_text(_rust_text(built.entries), encoding="utf-8")
    return path, built


def _record_span(text: str, key: str) -> tuple[int, int]:
    """Where the record ``key`` of a Rust-laid-out text starts (its member) and ends (after its
    closing brace)."""
    start = text.index(f'\n    "{key}": {{')
    return start, text.index("\n    }", start) + len("\n    }")


def _byte_offset(text: str, char_offset: int) -> int:
    return len(text[:char_offset].encode("utf-8"))


# --------------------------------------------------------------------------------------------
# Databases, dumps, reports


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Callable[[str], IdempotencyStore]]:
    """Factory of migrated stores, each on a SQLite file of its own."""
    stores: list[IdempotencyStore] = []

    def make(name: str) -> IdempotencyStore:
        store = IdempotencyStore.from_url(f"sqlite:///{tmp_path / name}.db", migrate=True)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


Dump = tuple[list[tuple[Any, ...]], list[tuple[str, str]]]


def _dump(engine: sa.Engine, *, tokens: bool = False) -> Dump:
    """Every row of both tables (fingerprints per record in first-seen order)."""
    columns = [c for c in R.columns if tokens or c.name != "reservation_token"]
    with engine.connect() as conn:
        rows = sorted(tuple(r) for r in conn.execute(sa.select(*columns)))
        fps = [
            (r.record_id, r.fingerprint)
            for r in conn.execute(sa.select(F.c.record_id, F.c.fingerprint).order_by(F.c.id))
        ]
    return rows, sorted(fps, key=itemgetter(0))  # stable: keeps first-seen order


def _report(report: importer.ImportReport) -> dict[str, Any]:
    """The report minus its timing (kept ids as a set: their order follows batch arrival)."""
    view = report.as_json()
    del view["seconds"]
    view["kept_ids"] = sorted(view["kept_ids"])
    return view


def _error(error: FileFormatError) -> tuple[Any, ...]:
    return (type(error), str(error), error.path, error.line, error.record_id, error.field)


def _fallbacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if FALLBACK_LOG in r.getMessage()]


# --------------------------------------------------------------------------------------------
# 1. The same database and report whatever the number of workers


def test_same_result_whatever_the_number_of_workers(
    realistic: tuple[Path, Built],
    sqlite_store: Callable[[str], IdempotencyStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    path, built = realistic
    assert len(_parse.split_points(str(path), 2) or ()) == 2  # the file can be cut
    assert len(_parse.split_points(str(path), 3) or ()) == 3
    caplog.set_level(logging.INFO, logger="idemstore.import")
    results = {}
    for workers in (0, 1, 2, 3):
        store = sqlite_store(f"w{workers}")
        report = importer.import_file(store, path, workers=workers)
        results[workers] = (_report(report), _dump(store.engine))
    # No part failed, no worker was missing: each run took the path it was asked for.
    assert not [r for r in caplog.records if r.levelno >= logging.INFO], caplog.text

    report, (rows, fps) = results[0]
    n = len(built.entries)
    assert (report["read"], report["inserted"], report["form"]) == (n, n, "versioned")
    assert len(rows) == n
    assert report["unknown_fields"] == built.unknown_fields
    assert report["records_with_unknown_fields"] == built.records_with_unknown_fields
    assert report["id_mismatches"] == len(report["mismatches"]) == built.id_mismatches
    file_order = [k for k, _ in built.entries]
    assert [m["map_key"] for m in report["mismatches"]] == [
        k for k in file_order if k in {m["map_key"] for m in report["mismatches"]}
    ]
    assert len(fps) == sum(len(v.get("conflict_fingerprints", ())) for _, v in built.entries)
    for workers in (1, 2, 3):
        assert results[workers][0] == results[0][0], f"report with workers={workers}"
        assert results[workers][1] == results[0][1], f"database with workers={workers}"


@pytest.mark.parametrize("flavour", ("sync", "async"))
def test_two_workers_on_every_backend(
    database: Database,
    make_database: Callable[[str], Database],
    realistic: tuple[Path, Built],
    flavour: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """workers=2 through the sync or async store (PostgreSQL: COPY) gives what workers=0 gives
    on a database of the same engine."""
    path, built = realistic
    caplog.set_level(logging.INFO, logger="idemstore.import")
    reference = make_database(database.engine_name).sync_store()
    target = database.sync_store()
    try:
        expected = importer.import_file(reference, path, workers=0)
        if flavour == "sync":
            report = importer.import_file(target, path, workers=2)
        else:
            astore = database.async_store()

            async def run() -> importer.ImportReport:
                try:
                    return await importer.import_file_async(astore, path, workers=2)
                finally:
                    await astore.close()

            report = asyncio.run(run())
        assert not _fallbacks(caplog)
        assert report.inserted == len(built.entries)
        assert _report(report) == _report(expected)
        assert _dump(target.engine) == _dump(reference.engine)
    finally:
        reference.close()
        target.close()


# --------------------------------------------------------------------------------------------
# 2. Chunks of records vs one record at a time


def _precise(path: Path) -> tuple[list[tuple[Any, ...]], _rows.Converter]:
    """Rows (minus token) and fingerprints by the precise validator, record by record."""
    data = json.loads(path.read_text(encoding="utf-8"))
    records = data["records"] if "schema_version" in data else data
    convert = _rows.Converter()
    items = []
    for map_key, value in records.items():
        row, fps = convert._precise(map_key, value)
        convert._commit()
        items.append((row[:-1], fps))
    return items, convert


@pytest.fixture
def chunks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Small chunks (a few records each); the list of what each ``Converter.chunk`` call took
    (0: refused)."""
    monkeypatch.setattr(jsonfile, "_CHUNK_CHARS", 3000)
    taken: list[int] = []
    chunk = _rows.Converter.chunk

    def spy(self: _rows.Converter, pairs: Any) -> Any:
        items = chunk(self, pairs)
        taken.append(0 if items is None else len(items))
        return items

    monkeypatch.setattr(_rows.Converter, "chunk", spy)
    return taken


def _file_parse(path: Path) -> tuple[list[tuple[Any, ...]], _parse.ParseSummary]:
    with _parse.FileParse(str(path), strict=False, batch_records=50) as parse:
        items = [(row[:-1], fps) for batch, _ in parse for row, fps in batch]
        return items, parse.summary()


def _assert_same_as_precise(path: Path, n: int) -> None:
    items, summary = _file_parse(path)
    expected, convert = _precise(path)
    assert len(items) == len(expected) == n
    for got, want in zip(items, expected, strict=True):
        assert got == want, want[0][0]
    assert summary.unknown_fields == dict(sorted(convert.unknown.items()))
    assert summary.records_with_unknown_fields == convert.records_with_unknown_fields
    assert summary.mismatches == convert.mismatches


def _entries(n: int, seed: int) -> list[Entry]:
    return _realistic(n, seed).entries


def test_chunks_match_the_precise_path_on_a_rust_file(tmp_path: Path, chunks: list[int]) -> None:
    """The control case: in the layout Rust writes, most records go through chunks."""
    entries = _entries(300, seed=1)
    path = tmp_path / "rust.json"
    path.write_text(_rust_text(entries), encoding="utf-8")
    _assert_same_as_precise(path, len(entries))
    assert sum(chunks) > len(entries) // 2


@pytest.mark.parametrize("form", ("versioned", "legacy"))
def test_compact_file_is_read_record_by_record(
    tmp_path: Path, chunks: list[int], form: str
) -> None:
    entries = _entries(200, seed=2)
    records = dict(entries)
    top = {"schema_version": 1, "records": records} if form == "versioned" else records
    path = tmp_path / "compact.json"
    path.write_text(json.dumps(top, ensure_ascii=False), encoding="utf-8")
    assert "\n" not in path.read_text(encoding="utf-8")
    _assert_same_as_precise(path, len(entries))
    assert sum(chunks) == 0


def test_records_with_unicode_escapes(tmp_path: Path, chunks: list[int]) -> None:
    entries = _entries(300, seed=3)
    bodies = {}
    for i, (key, value) in enumerate(entries):
        if i % 7 == 0:
            value["owner"] += " caf\u00e9 \U0001f600"
            bodies[key] = json.dumps(value, indent=2, ensure_ascii=True).replace("\n", "\n    ")
        elif i % 11 == 0:
            value["owner"] += " bell \x07 unit \x1f"  # control chars: always \u-escaped
    # A map key with an escape (not the record's id: an id mismatch).
    odd_key, odd = "idem_\u00e9t\u00e9", entries[5][1]
    entries.insert(6, (odd_key, odd))
    bodies[odd_key] = _body(odd)
    text = _rust_text(entries, bodies=bodies)
    path = tmp_path / "escapes.json"
    path.write_text(text, encoding="utf-8")
    assert "\\u00e9" in text and "\\u0007" in text and '"idem_\\u00e9t\\u00e9"' in text
    _assert_same_as_precise(path, len(entries))
    assert 0 < sum(chunks) < len(entries)


def test_lone_surrogate_in_a_chunk_is_refused_with_its_line(
    tmp_path: Path, chunks: list[int]
) -> None:
    """Escapes are checked per record: a lone surrogate inside what would be a chunk is found,
    with the same error as when reading with chunks as large as the file."""
    entries = _entries(200, seed=4)
    key, value = entries[120]
    value["owner"] = "owner \ud800 half"
    path = tmp_path / "surrogate.json"
    path.write_text(_rust_text(entries).replace("\ud800", "\\ud800"), encoding="utf-8")
    text = path.read_text(encoding="utf-8")
    line = text.count("\n", 0, text.index("\\ud800")) + 1
    with pytest.raises(FileFormatError, match="lone surrogate") as caught:
        _file_parse(path)
    assert (caught.value.record_id, caught.value.field, caught.value.line) == (key, "owner", line)


def _false_boundary_body(value: dict[str, Any], i: int) -> str:
    """A record (with an outcome) whose outcome details close at the indent of a record's
    closing brace, followed by ``},`` and a key at record indent: valid JSON, but it looks
    like the end of a record to a reader going by the layout."""
    rest = {k: v for k, v in value["outcome"].items() if k != "details"}
    value["outcome"] = {"details": {"marker": i, "list": [1, 2]}, **rest}
    body = _body(value)
    at = body.index('"details": {')
    close = body.index("\n        },\n        ", at)
    return body[:close] + "\n    },\n    " + body[close + len("\n        },\n        ") :]


def _false_boundary_entries(n: int, seed: int) -> tuple[list[Entry], dict[str, str]]:
    entries = _entries(n, seed)
    bodies = {
        k: _false_boundary_body(v, i)
        for i, (k, v) in enumerate(entries)
        if v.get("outcome") is not None and i % 3 != 2
    }
    return entries, bodies


def test_nested_object_closing_at_record_indent(tmp_path: Path, chunks: list[int]) -> None:
    entries, bodies = _false_boundary_entries(300, seed=5)
    assert len(bodies) > 50
    path = tmp_path / "false-boundary.json"
    text = _rust_text(entries, bodies=bodies)
    path.write_text(text, encoding="utf-8")
    assert text.count("\n    },\n    ") > len(entries) + 50  # false boundaries
    _assert_same_as_precise(path, len(entries))
    assert 0 < sum(chunks) < len(entries)


def test_every_optional_field_absent_or_present(tmp_path: Path, chunks: list[int]) -> None:
    samples = datagen.sample_records()
    full, minimal = samples[0], samples[1]
    values: list[dict[str, Any]] = []
    for record in samples:
        values.append(record_to_json(record))  # present where set
        values.append(datagen.legacy_record_json(record))  # defaults left out
    nulls = record_to_json(full)
    nulls.update(first_seen_event_id=None, expires_at_ms=None, conflict_count=0)
    nulls["conflict_fingerprints"] = []
    nulls["tenant_context"] = {"org_id": "o", "workspace_id": "w", "deployment_id": None}
    nulls["tenant_context"]["actor_id"] = None  # source absent: its default
    nulls["outcome"] = {
        "outcome_kind": "accepted",
        "completed_at_ms": 5,
        "primary_ref_kind": None,
        "primary_ref_id": None,
        "secondary_ref_kind": None,
        "secondary_ref_id": None,
        "details": None,
    }
    no_details = record_to_json(minimal)
    no_details["outcome"] = {"outcome_kind": "accepted", "completed_at_ms": 5}
    null_outcome = record_to_json(minimal)
    null_outcome["outcome"] = None
    no_version = datagen.legacy_record_json(full)
    values += [nulls, no_details, null_outcome, no_version]
    # Many copies of each under other map keys, so that chunks hold every shape.
    entries = [
        (f"idem_{n:04d}_{i}", json.loads(json.dumps(v)))
        for n in range(12)
        for i, v in enumerate(values)
    ]
    path = tmp_path / "optional.json"
    path.write_text(_rust_text(entries), encoding="utf-8")
    _assert_same_as_precise(path, len(entries))
    assert sum(chunks) > len(entries) // 2
