"""The fast import paths: records decoded many at once (chunks) and files cut into parts read by
worker processes. Whatever path reads a file, the database, the report and the error must be
those of the plain in-process, record-by-record read; a failed import leaves nothing behind."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from idemstore import IdempotencyStore
from idemstore.bench import datagen
from idemstore.db.schema import conflict_fingerprints as F
from idemstore.db.schema import records as R
from idemstore.errors import FileFormatError, IdemstoreError
from idemstore.transfer import importer
from idemstore.transfer import parse as _parse
from idemstore.transfer import reader as jsonfile
from idemstore.transfer import rows as _rows
from idemstore.transfer.writer import record_to_json
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
    records = [*datagen.sample_records(), *datagen.generate_records(n, seed=1000 + seed)]
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
    assert len({k for k, _ in entries}) == len(entries)
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
    closing brace; the text must not close nested objects at record indent)."""
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
    """The report minus its timing."""
    view = report.as_json()
    del view["seconds"]
    return view


def _error(error: FileFormatError) -> tuple[Any, ...]:
    return (type(error), str(error), error.path, error.line, error.record_id, error.field)


def _fallbacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if FALLBACK_LOG in r.getMessage()]


@pytest.fixture
def parts_started(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many worker processes each parallel parse started (spies on WorkerParse.spawn)."""
    started: list[int] = []
    start = _parse.WorkerParse.spawn.__func__  # type: ignore[attr-defined]

    def spy(cls: type[_parse.WorkerParse], path: str, **options: Any) -> Any:
        parse = start(cls, path, **options)
        started.append(0 if parse is None else len(parse._workers))
        return parse

    monkeypatch.setattr(_parse.WorkerParse, "spawn", classmethod(spy))
    return started


# --------------------------------------------------------------------------------------------
# 1. The same database and report whatever the number of workers


def test_same_result_whatever_the_number_of_workers(
    realistic: tuple[Path, Built],
    sqlite_store: Callable[[str], IdempotencyStore],
    caplog: pytest.LogCaptureFixture,
    parts_started: list[int],
) -> None:
    path, built = realistic
    caplog.set_level(logging.INFO, logger="idemstore.import")
    results = {}
    for workers in (0, 1, 2, 3):
        store = sqlite_store(f"w{workers}")
        report = importer.import_file(store, path, workers=workers)
        results[workers] = (_report(report), _dump(store.engine))
    # Each run took the path it was asked for: no part failed, no worker was missing.
    assert parts_started == [1, 2, 3]
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
    parts_started: list[int],
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
        assert parts_started == [2]
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
        items = [(row[:-1], fps) for row, fps in _records_of(parse)]
        return items, parse.summary()


def _records_of(batches: Any) -> list[tuple[tuple[Any, ...], tuple[str, ...]]]:
    """(row, its fingerprints) for every row of a parse's batches."""
    out = []
    for rows, pairs, *_ in batches:
        fps: dict[str, list[str]] = {}
        for record_id, fp in pairs:
            fps.setdefault(record_id, []).append(fp)
        out += [(row, tuple(fps.get(row[0], ()))) for row in rows]
    return out


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
    like the end of a record to a reader going by the layout. The outcome comes last, its
    details last but one: the false end is near the true one."""
    outcome = value.pop("outcome")
    kind = outcome.pop("outcome_kind")
    outcome.pop("details", None)
    value["outcome"] = {**outcome, "details": {"marker": i, "list": [1, 2]}, "outcome_kind": kind}
    body = _body(value)
    at = body.index('"details": {')
    nested_end = "\n        },\n        "
    close = body.index(nested_end, at)
    return body[:close] + "\n    },\n    " + body[close + len(nested_end) :]


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


# --------------------------------------------------------------------------------------------
# 3. Errors are the same with workers, and leave the database as it was


@dataclass(frozen=True)
class ErrorBase:
    """A good file; the records on either side of the cut that makes two parts of it."""

    built: Built
    text: str
    end_of_first: str
    start_of_second: str


@pytest.fixture(scope="module")
def error_base(tmp_path_factory: pytest.TempPathFactory) -> ErrorBase:
    built = _realistic(3000, seed=31)
    text = _rust_text(built.entries)
    path = tmp_path_factory.mktemp("errors") / "good.json"
    path.write_text(text, encoding="utf-8")
    points = _parse.split_points(str(path), 2)
    assert points is not None
    ends = sorted(_record_ends(text, built.entries))
    at = ends.index(points[1])  # the comma after record ``at``
    return ErrorBase(built, text, built.entries[at][0], built.entries[at + 1][0])


def _prepopulate(store: IdempotencyStore, built: Built, path: Path) -> None:
    """Some records of the file as they are (unchanged on import), some with other content
    (kept), and records the file does not have."""
    same = built.entries[::40]
    changed = [(k, {**v, "owner": "someone else"}) for k, v in built.entries[20::80]]
    others = _realistic(20, seed=99).entries[8:]
    path.write_text(_rust_text([*same, *changed, *others]), encoding="utf-8")
    importer.import_file(store, path, workers=0)


def _edit_record(text: str, key: str, pattern: str, replacement: str) -> str:
    start, end = _record_span(text, key)
    region, n = re.subn(pattern, replacement, text[start:end], count=1)
    assert n == 1, (key, pattern)
    return text[:start] + region + text[end:]


def _bad_status(text: str, key: str) -> str:
    return _edit_record(text, key, r'"status": "\w+"', '"status": "Completed"')


def _string_timestamp(text: str, key: str) -> str:
    return _edit_record(text, key, r'"first_seen_at_ms": (\d+)', r'"first_seen_at_ms": "\1"')


def _part_of(text: str, key: str, points: list[int]) -> int:
    """The 0-based part (of ``points``, byte offsets) that holds record ``key``."""
    start, _ = _record_span(text, key)
    at = _byte_offset(text, start)
    return sum(1 for p in points[1:] if p <= at)


@dataclass(frozen=True)
class Case:
    text: str | bytes
    #: The record each part must hold (key -> part), to be sure the case is the one meant.
    parts: dict[str, int]
    #: What the error must say (None: the import succeeds).
    message: str | None
    record_id: str | None = None
    field: str | None = None


def _error_case(name: str, base: ErrorBase) -> Case:
    text, entries = base.text, base.built.entries
    n = len(entries)
    first, second = entries[n // 4][0], entries[3 * n // 4][0]
    edge_first, edge_second = base.end_of_first, base.start_of_second
    status = "unknown variant `Completed`"
    timestamp = 'invalid type: string "'
    if name == "first_part":
        return Case(_bad_status(text, first), {first: 0}, status, first, "status")
    if name == "second_part":
        bad = _string_timestamp(text, second)
        return Case(bad, {second: 1}, timestamp, second, "first_seen_at_ms")
    if name == "last_record_of_first_part":
        return Case(_bad_status(text, edge_first), {edge_first: 0}, status, edge_first, "status")
    if name == "first_record_of_second_part":
        bad = _string_timestamp(text, edge_second)
        return Case(bad, {edge_second: 1}, timestamp, edge_second, "first_seen_at_ms")
    if name == "both_parts":
        # The second part's worker meets its error first; the first part's comes first.
        both = _string_timestamp(_bad_status(text, edge_first), edge_second)
        return Case(both, {edge_first: 0, edge_second: 1}, status, edge_first, "status")
    if name == "cross_part_duplicate":
        twice = text.replace(f'\n    "{second}": {{', f'\n    "{first}": {{', 1)
        return Case(twice, {first: 0}, f"duplicate record id {first!r}", first)
    if name == "truncated":
        data = text.encode("utf-8")
        return Case(data[: len(data) * 4 // 5], {first: 0}, "unexpected end of file")
    if name == "trailing_garbage":
        return Case(text + "\n}", {first: 0, second: 1}, "trailing characters")
    if name == "records_twice":
        twice = text[: -len("\n}")] + ',\n  "records": {}\n}'
        return Case(twice, {first: 0, second: 1}, "duplicate field `records`", None, "records")
    assert name == "unknown_top_level_field"
    extra = text[: -len("\n}")] + ',\n  "comment": {"note": [1, "\u00e9"]}\n}'
    return Case(extra, {first: 0, second: 1}, None)


ERROR_CASES = (
    "first_part",
    "second_part",
    "last_record_of_first_part",
    "first_record_of_second_part",
    "both_parts",
    "cross_part_duplicate",
    "truncated",
    "trailing_garbage",
    "records_twice",
    "unknown_top_level_field",
)


@pytest.mark.parametrize("name", ERROR_CASES)
def test_errors_are_the_same_with_workers(
    name: str,
    error_base: ErrorBase,
    sqlite_store: Callable[[str], IdempotencyStore],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    built = error_base.built
    case = _error_case(name, error_base)
    path = tmp_path / f"{name}.json"
    if isinstance(case.text, bytes):
        path.write_bytes(case.text)
    else:
        path.write_text(case.text, encoding="utf-8")
    points = _parse.split_points(str(path), 2)
    assert points is not None and len(points) == 2
    decoded = path.read_bytes().decode("utf-8", "replace")
    assert {key: _part_of(decoded, key, points) for key in case.parts} == case.parts

    caplog.set_level(logging.INFO, logger="idemstore.import")
    outcomes = {}
    for workers in (2, 1, 0):
        store = sqlite_store(f"w{workers}")
        _prepopulate(store, built, tmp_path / f"pre{workers}.json")
        before = _dump(store.engine, tokens=True)
        caplog.clear()
        try:
            report = importer.import_file(store, path, workers=workers)
        except FileFormatError as error:
            assert _dump(store.engine, tokens=True) == before, f"workers={workers}"
            outcomes[workers] = _error(error)
            if workers == 2:
                assert _fallbacks(caplog), "the parts were not read by workers"
        else:
            outcomes[workers] = (_report(report), _dump(store.engine))
    assert outcomes[2] == outcomes[0]
    assert outcomes[1] == outcomes[0]

    if case.message is None:
        report_view = outcomes[0][0]
        assert report_view["unknown_fields"]["<file>.comment"] == 1
        assert report_view["read"] == len(built.entries)
        assert report_view["kept"] > 0 and report_view["unchanged"] > 0
        return
    _, message, error_path, _, record_id, field = outcomes[0]
    assert case.message in message
    assert (error_path, record_id, field) == (str(path), case.record_id, case.field)


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("IDEMSTORE_DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "idemstore", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def test_cli_reports_the_first_error_of_a_parallel_import(
    error_base: ErrorBase,
    sqlite_store: Callable[[str], IdempotencyStore],
    tmp_path: Path,
) -> None:
    """A file big enough for the CLI to pick workers by itself (on a machine with 2+ cores),
    with an error in its second part: exit status 2, the error on stderr, nothing written."""
    built = error_base.built
    padded = [(k, {**v, "padding": "p" * 2200}) for k, v in built.entries]
    key = padded[3 * len(padded) // 4][0]
    path = tmp_path / "padded.json"
    path.write_text(_string_timestamp(_rust_text(padded), key), encoding="utf-8")
    assert path.stat().st_size >= _parse.WORKER_MIN_BYTES
    store = sqlite_store("cli")
    _prepopulate(store, built, tmp_path / "pre.json")
    before = _dump(store.engine, tokens=True)
    with pytest.raises(FileFormatError) as expected:
        importer.import_file(store, path, workers=0)
    assert expected.value.record_id == key

    result = _run_cli("-v", "--database-url", str(store.engine.url), "import", str(path))
    assert result.returncode == 2, result.stderr
    assert f"idemstore: error: {expected.value}\n" in result.stderr
    if _parse.default_workers(path.stat().st_size) > 1:
        assert FALLBACK_LOG in result.stderr  # the workers found it first
    assert _dump(store.engine, tokens=True) == before


# --------------------------------------------------------------------------------------------
# 4. Cutting a file into parts


def _record_ends(text: str, entries: list[Entry]) -> set[int]:
    """Byte offsets of the comma after each record but the last (just before the next one)."""
    ends, at, byte_at = set(), 0, 0
    for key, _ in entries[1:]:
        found = text.index(f'\n    "{key}": {{', at)  # records are in file order
        byte_at += len(text[at:found].encode("utf-8"))
        ends.add(byte_at - 1)
        at = found
    return ends


def _read_part(path: Path, start: int = 0, stop: int | None = None) -> list[tuple[Any, ...]]:
    convert = _rows.Converter()
    with jsonfile.RecordReader(path, start=start, stop=stop) as reader:
        return [(row[:-1], fps) for row, fps in reader.convert_each(convert, convert.chunk)]


def test_split_points_none_unless_the_file_starts_as_rust_writes_it(tmp_path: Path) -> None:
    entries = _entries(200, seed=6)
    records = dict(entries)
    rust = _rust_text(entries)
    texts = {
        "legacy": json.dumps(records, indent=2),
        "compact": json.dumps({"schema_version": 1, "records": records}),
        "records_first": json.dumps({"records": records, "schema_version": 1}, indent=2),
        "field_between": rust.replace('1,\n  "records"', '1,\n  "note": 0,\n  "records"', 1),
        "crlf": rust.replace("\n", "\r\n"),
        "four_space_indent": json.dumps({"schema_version": 1, "records": records}, indent=4),
    }
    for name, text in texts.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text, encoding="utf-8")
        assert _parse.split_points(str(path), 2) is None, name
    # Rust's layout, but too few records for the parts asked for.
    path = tmp_path / "tiny.json"
    path.write_text(_rust_text(entries[:1]), encoding="utf-8")
    assert _parse.split_points(str(path), 2) is None
    path.write_text(_rust_text(entries[:3]), encoding="utf-8")
    assert _parse.split_points(str(path), 7) is None
    path.write_text(rust, encoding="utf-8")
    assert _parse.split_points(str(path), 2) is not None


def test_parts_hold_every_record_once_in_order(tmp_path: Path, chunks: list[int]) -> None:
    entries = _entries(600, seed=7)
    text = _rust_text(entries)
    path = tmp_path / "rust.json"
    path.write_text(text, encoding="utf-8")
    ends = _record_ends(text, entries)
    whole = _read_part(path)
    assert [row[0] for row, _ in whole] == [k for k, _ in entries]
    for parts in (2, 3, 4, 7):
        points = _parse.split_points(str(path), parts)
        assert points is not None and len(points) == parts
        assert points[0] == len(RUST_PREFIX.encode())
        assert points == sorted(set(points))
        assert set(points[1:]) <= ends, parts
        read = []
        for start, stop in zip(points, [*points[1:], None], strict=True):
            read += _read_part(path, start, stop)
        assert read == whole, parts
    assert sum(chunks) > len(entries)  # chunks were used inside parts too


def test_error_in_a_later_part_names_the_line_of_the_whole_file(tmp_path: Path) -> None:
    entries = _entries(600, seed=8)
    key = entries[len(entries) * 9 // 10][0]
    text = _string_timestamp(_rust_text(entries), key)
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    points = _parse.split_points(str(path), 3)
    assert points is not None and _part_of(text, key, points) == 2
    with pytest.raises(FileFormatError) as whole:
        _read_part(path)
    with pytest.raises(FileFormatError) as part:
        _read_part(path, points[2])
    assert _error(part.value) == _error(whole.value)
    at = text.index('"first_seen_at_ms": "', _record_span(text, key)[0])
    assert (whole.value.record_id, whole.value.line) == (key, text.count("\n", 0, at) + 1)


def test_a_cut_inside_a_record_is_found_out(
    tmp_path: Path,
    sqlite_store: Callable[[str], IdempotencyStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hand-indented file in Rust's layout where a nested object closes like a record: the
    cut may fall inside a record; the parts then fail and the file is read in one process."""
    entries, bodies = _false_boundary_entries(600, seed=6)
    text = _rust_text(entries, bodies=bodies)
    path = tmp_path / "false-cut.json"
    path.write_text(text, encoding="utf-8")
    points = _parse.split_points(str(path), 2)
    assert points is not None and points[1] not in _record_ends(text, entries)
    caplog.set_level(logging.INFO, logger="idemstore.import")
    results = []
    for workers in (0, 2):
        store = sqlite_store(f"w{workers}")
        report = importer.import_file(store, path, workers=workers)
        results.append((_report(report), _dump(store.engine)))
    assert _fallbacks(caplog)
    assert results[0] == results[1]
    assert results[0][0]["read"] == len(entries)


# --------------------------------------------------------------------------------------------
# 5. A worker that dies

needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def _parse_workers(path: Path) -> list[int]:
    """Pids of this process's live parse workers reading ``path`` (from /proc)."""
    me = os.getpid()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if (
            int(ppid) == me
            and state != "Z"
            and str(path).encode() in cmdline
            and any(b"worker_main" in a for a in cmdline)
        ):
            pids.append(int(entry.name))
    return sorted(pids)


@pytest.fixture(scope="module")
def many_batches(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A file of 8 batches: a worker is still sending when the first batch is in."""
    n = importer.BATCH_RECORDS * 8
    path = tmp_path_factory.mktemp("many") / "many.json"
    datagen.write_realistic_file(path, n)
    return path, n


def _killer(path: Path, killed: list[int]) -> importer.Progress:
    """A progress callback that SIGKILLs one parse worker, once."""

    def progress(records: int, done: int, total: int) -> None:
        if killed:
            return
        pids = _parse_workers(path)
        assert pids, "no parse worker is running"
        os.kill(pids[-1], signal.SIGKILL)
        killed.append(pids[-1])

    return progress


@needs_proc
def test_a_killed_worker_fails_the_import(
    many_batches: tuple[Path, int], sqlite_store: Callable[[str], IdempotencyStore], tmp_path: Path
) -> None:
    path, _ = many_batches
    store = sqlite_store("killed")
    _prepopulate(store, _realistic(50, seed=3), tmp_path / "pre.json")
    before = _dump(store.engine, tokens=True)
    killed: list[int] = []
    with pytest.raises(IdemstoreError) as caught:
        importer.import_file(store, path, workers=1, progress=_killer(path, killed))
    assert killed
    assert not isinstance(caught.value, FileFormatError)
    assert "parse worker" in str(caught.value) and "ended early" in str(caught.value)
    assert f"exit status {-signal.SIGKILL}" in str(caught.value)
    assert _dump(store.engine, tokens=True) == before
    assert not _parse_workers(path)


@needs_proc
def test_a_killed_worker_among_several_costs_only_time(
    many_batches: tuple[Path, int],
    sqlite_store: Callable[[str], IdempotencyStore],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path, n = many_batches
    caplog.set_level(logging.INFO, logger="idemstore.import")
    results = []
    for workers in (0, 2):
        store = sqlite_store(f"w{workers}")
        _prepopulate(store, _realistic(50, seed=3), tmp_path / f"pre{workers}.json")
        killed: list[int] = []
        progress = _killer(path, killed) if workers else None
        report = importer.import_file(store, path, workers=workers, progress=progress)
        results.append((_report(report), _dump(store.engine)))
        assert bool(killed) == bool(workers)
    assert _fallbacks(caplog)
    assert results[1] == results[0]
    assert results[0][0]["inserted"] == n
    assert not _parse_workers(path)


# --------------------------------------------------------------------------------------------
# 6. What the import changes for its duration only


@pytest.fixture
def good_and_bad(tmp_path: Path) -> tuple[Path, Path]:
    built = _realistic(600, seed=12)
    text = _rust_text(built.entries)
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(text, encoding="utf-8")
    bad.write_text(_bad_status(text, built.entries[-5][0]), encoding="utf-8")
    return good, bad


def test_gc_is_enabled_again_after_an_import(
    good_and_bad: tuple[Path, Path], sqlite_store: Callable[[str], IdempotencyStore]
) -> None:
    good, bad = good_and_bad
    store = sqlite_store("gc")
    assert gc.isenabled()
    for workers in (0, 1, 2):
        importer.import_file(store, good, workers=workers)
        assert gc.isenabled(), f"after an import, workers={workers}"
        with pytest.raises(FileFormatError):
            importer.import_file(store, bad, workers=workers)
        assert gc.isenabled(), f"after a failed import, workers={workers}"
    gc.disable()  # and left off by an import if it was off before
    try:
        importer.import_file(store, good, workers=2)
        assert not gc.isenabled()
        with pytest.raises(FileFormatError):
            importer.import_file(store, bad, workers=0)
        assert not gc.isenabled()
    finally:
        gc.enable()


def _pragmas(conn: sa.Connection) -> tuple[int, int]:
    cache = conn.exec_driver_sql("PRAGMA cache_size").scalar_one()
    ignore = conn.exec_driver_sql("PRAGMA ignore_check_constraints").scalar_one()
    return cache, ignore


@pytest.mark.parametrize("workers", (0, 2))
def test_sqlite_connection_settings_are_restored(
    good_and_bad: tuple[Path, Path],
    sqlite_store: Callable[[str], IdempotencyStore],
    workers: int,
) -> None:
    good, bad = good_and_bad
    store = sqlite_store("pragmas")
    with store.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA cache_size = -1234")
        before = _pragmas(conn)
        assert before == (-1234, 0)
        importer.import_file(store, good, connection=conn, workers=workers)
        assert _pragmas(conn) == before
        conn.commit()
        with pytest.raises(FileFormatError):
            importer.import_file(store, bad, connection=conn, workers=workers)
        assert _pragmas(conn) == before
        conn.rollback()
        # CHECK constraints hold again on this connection.
        with pytest.raises(sa.exc.IntegrityError):
            conn.exec_driver_sql("UPDATE idemstore_records SET status = 'bogus'")
        conn.rollback()


def test_sqlite_ignore_check_constraints_left_as_the_caller_had_it(
    good_and_bad: tuple[Path, Path], sqlite_store: Callable[[str], IdempotencyStore]
) -> None:
    good, _ = good_and_bad
    store = sqlite_store("ignore")
    with store.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA ignore_check_constraints = ON")
        before = _pragmas(conn)
        importer.import_file(store, good, connection=conn, workers=0)
        assert _pragmas(conn) == before
        conn.rollback()


@pytest.mark.parametrize("workers", (0, 2))
def test_failed_import_leaves_the_callers_transaction_as_it_was(
    database: Database, tmp_path: Path, workers: int
) -> None:
    built = _realistic(importer.BATCH_RECORDS + 300, seed=13)
    text = _rust_text(built.entries)
    path = tmp_path / "bad.json"
    path.write_text(_bad_status(text, built.entries[-3][0]), encoding="utf-8")
    store = database.sync_store()
    try:
        with store.engine.connect() as conn:
            tenant = datagen.LEGACY_TENANT
            store.reserve(tenant, "op", "mine", "owner", "fp", now_ms=1, connection=conn)
            before = conn.execute(sa.select(sa.func.count()).select_from(R)).scalar_one()
            with pytest.raises(FileFormatError):
                importer.import_file(store, path, connection=conn, workers=workers)
            after = conn.execute(sa.select(sa.func.count()).select_from(R)).scalar_one()
            conn.rollback()
        assert (before, after) == (1, 1)
    finally:
        store.close()
