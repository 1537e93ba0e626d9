"""Import and export of JSON key files: all or nothing, re-run safe, round trips, CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from idemstore import IdempotencyStore, cli, rules
from idemstore.bench import datagen
from idemstore.cli import transfer as cli_transfer
from idemstore.db import codec, statements
from idemstore.db.schema import conflict_fingerprints as F
from idemstore.db.schema import records as R
from idemstore.errors import FileFormatError
from idemstore.ids import idempotency_record_id
from idemstore.model import IdempotencyRecord, Outcome, RecordStatus, TenantContext
from idemstore.transfer import exporter, importer, scan, validate
from idemstore.transfer import parse as _parse
from idemstore.transfer import rows as _rows
from idemstore.transfer.reader import read_records
from idemstore.transfer.writer import record_to_json, write_records
from tests.badfiles import BAD_FILES, RECORD_ID, BadFile
from tests.conftest import ENGINES, Database

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
SAMPLES = ("sample_versioned.json", "sample_legacy.json")


class Transfer:
    """Import/export through the sync or the async store of one database; inspection through
    a sync store."""

    def __init__(self, db: Database, flavour: str) -> None:
        self.db = db
        self.flavour = flavour
        self.store = db.sync_store()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.astore: Any = None
        if flavour == "async":
            self.loop = asyncio.new_event_loop()
            self.astore = db.async_store()

    def import_(self, path: Path, **options: Any) -> importer.ImportReport:
        if self.loop is not None:
            return self.loop.run_until_complete(
                importer.import_file_async(self.astore, path, **options)
            )
        return importer.import_file(self.store, path, **options)

    def export(self, path: Path) -> int:
        if self.loop is not None:
            return self.loop.run_until_complete(exporter.export_file_async(self.astore, path))
        return exporter.export_file(self.store, path)

    def dump(self, *, tokens: bool = True) -> tuple[list[tuple[Any, ...]], list[tuple[str, str]]]:
        """Every row of both tables (fingerprints per record in first-seen order)."""
        columns = [c for c in R.columns if tokens or c.name != "reservation_token"]
        with self.store.engine.connect() as conn:
            records = [tuple(r) for r in conn.execute(sa.select(*columns).order_by(R.c.record_id))]
            fps = [
                (r.record_id, r.fingerprint)
                for r in conn.execute(sa.select(F.c.record_id, F.c.fingerprint).order_by(F.c.id))
            ]
        return records, sorted(fps, key=lambda p: p[0])  # stable: keeps first-seen order

    def close(self) -> None:
        if self.loop is not None:
            self.loop.run_until_complete(self.astore.close())
            self.loop.close()
        self.store.close()


@pytest.fixture(params=("sync", "async"))
def transfer(request: pytest.FixtureRequest, database: Database) -> Iterator[Transfer]:
    t = Transfer(database, request.param)
    yield t
    t.close()


def _get(store: IdempotencyStore, record: IdempotencyRecord) -> IdempotencyRecord | None:
    return store.get(record.tenant_context, record.operation, record.key)


def _write(path: Path, records: list[IdempotencyRecord]) -> Path:
    write_records(path, records)
    return path


# --------------------------------------------------------------------------------------------
# The fast path agrees with the precise one


def _pairs(value: Any) -> Any:
    """A record value as the reader's C scanner decodes it (objects as tuples of pairs)."""
    decoded, _ = scan.PAIRS_SCAN(json.dumps(value), 0)
    return decoded


def test_fast_row_matches_precise_row() -> None:
    records = [*datagen.sample_records(), *datagen.generate_records(300, seed=3)]
    for record in records:
        for value in (record_to_json(record), datagen.legacy_record_json(record)):
            convert = _rows.Converter()
            fast, fast_fps = convert._fast(record.record_id, _pairs(value))
            slow, fps = convert._precise(record.record_id, json.loads(json.dumps(value)))
            assert fast[:-1] == slow[:-1]  # the last column is a random reservation token
            assert fast_fps == fps == record.conflict_fingerprints
            params = statements.record_params(record, 0)
            assert fast[:-1] == tuple(params[f"p_{c}"] for c in codec.RECORD_COLUMNS[:-1])
            assert 0 <= fast[-1] < 2**63 and 0 <= slow[-1] < 2**63


@pytest.mark.parametrize(
    ("details", "stored"),
    [
        (None, "null"),
        ("s\u00e9\n", '"s\u00e9\\n"'),
        (1, "1"),
        (-0.0, "-0.0"),
        (1e-07, "1e-07"),
        (2**64 - 1, "18446744073709551615"),
        ([], "[]"),
        ({}, "{}"),
        ({"b": [1.5, None], "a": {"\u2603": 1}}, '{"a":{"\u2603":1},"b":[1.5,null]}'),
    ],
)
def test_details_are_stored_compact_with_sorted_keys(details: Any, stored: str) -> None:
    assert rules.dump_details(details) == stored


@pytest.mark.parametrize("bad", BAD_FILES, ids=[b.name for b in BAD_FILES])
def test_fast_path_never_accepts_what_serde_refuses(bad: BadFile) -> None:
    try:
        decoded = json.loads(bad.data)
    except (ValueError, UnicodeDecodeError):
        return
    records = decoded.get("records", decoded) if isinstance(decoded, dict) else None
    value = records.get(RECORD_ID) if isinstance(records, dict) else None
    try:
        pairs = _pairs(value)
    except scan.NonFinite:
        return  # the reader refuses NaN before any conversion
    try:
        validate.validate_value(value)
    except validate.RecordProblem:
        with pytest.raises((_rows._Slow, validate.RecordProblem)):
            _rows.Converter()._fast(RECORD_ID, pairs)


# --------------------------------------------------------------------------------------------
# Importing


@pytest.mark.parametrize("name", SAMPLES)
def test_import_samples(transfer: Transfer, name: str) -> None:
    report = transfer.import_(DATA / name)
    expected = datagen.sample_records()
    assert (report.read, report.inserted, report.unchanged, report.kept) == (len(expected),) * 2 + (
        0,
        0,
    )
    assert report.form == ("versioned" if "versioned" in name else "legacy")
    assert report.id_mismatches == 0
    for record in expected:
        assert _get(transfer.store, record) == record


def test_import_generated_files_both_forms(transfer: Transfer, tmp_path: Path) -> None:
    records = datagen.generate_records(400, seed=11)
    versioned = _write(tmp_path / "v.json", records)
    legacy = tmp_path / "l.json"
    datagen.write_legacy_file(legacy, records)
    assert transfer.import_(versioned).inserted == 400
    again = transfer.import_(legacy)
    assert (again.read, again.unchanged, again.inserted, again.kept) == (400, 400, 0, 0)
    for record in records[::7]:
        assert _get(transfer.store, record) == record


def test_empty_files(transfer: Transfer, tmp_path: Path) -> None:
    for i, text in enumerate(("", "  \n", "{}", " {}\n", '{"schema_version": 1, "records": {}}')):
        path = tmp_path / f"e{i}.json"
        path.write_text(text)
        report = transfer.import_(path)
        assert report.read == 0
    assert transfer.dump() == ([], [])


def test_legacy_tenant_default(transfer: Transfer, tmp_path: Path) -> None:
    """A record without tenant_context gets local/default/system/explicit, not local_implicit."""
    value = datagen.legacy_record_json(datagen.sample_records()[1])
    assert "tenant_context" not in value
    path = tmp_path / "legacy.json"
    path.write_text(json.dumps({value["record_id"]: value}))
    transfer.import_(path)
    legacy = TenantContext.explicit_user_workspace("local", "default", None, "system")
    record = transfer.store.get(legacy, "op", "k")
    assert record is not None and record.tenant_context == legacy
    assert transfer.store.get(TenantContext.local_implicit(), "op", "k") is None


def test_unknown_fields_are_counted(transfer: Transfer, tmp_path: Path) -> None:
    records = datagen.generate_records(3, seed=1)
    values = {r.record_id: record_to_json(r) for r in records}
    first, second, _ = values.values()
    first["extra"] = 1
    first["tenant_context"]["region"] = "eu"  # type: ignore[index]
    second["extra"] = [1, 2]
    path = tmp_path / "u.json"
    path.write_text(json.dumps({"schema_version": 1, "records": values, "comment": "x"}))
    report = transfer.import_(path)
    assert report.inserted == 3
    assert report.records_with_unknown_fields == 2
    assert report.unknown_fields == {
        "extra": 2,
        "tenant_context.region": 1,
        "<file>.comment": 1,
    }


@pytest.mark.parametrize("engine_name", ENGINES)
@pytest.mark.parametrize("flavour", ("sync", "async"))
def test_bad_files_leave_the_database_unchanged(
    make_database: Callable[[str], Database], tmp_path: Path, flavour: str, engine_name: str
) -> None:
    t = Transfer(make_database(engine_name), flavour)
    try:
        t.import_(DATA / "sample_versioned.json")
        before = t.dump()
        assert len(before[0]) == 8
        for bad in BAD_FILES:
            path = tmp_path / f"{bad.name}.json"
            path.write_bytes(bad.data)
            with pytest.raises(FileFormatError) as caught:
                t.import_(path)
            error = caught.value
            assert bad.message in str(error), bad.name
            assert error.path == str(path), bad.name
            assert error.field == bad.field, bad.name
            assert error.line == bad.line, bad.name
            assert t.dump() == before, bad.name
    finally:
        t.close()


def test_error_after_many_good_records_rolls_back(transfer: Transfer, tmp_path: Path) -> None:
    """A bad record after several full batches: the batches already inserted go too."""
    records = datagen.generate_records(importer.BATCH_RECORDS * 2 + 10, seed=5)
    path = _write(tmp_path / "big.json", records)
    text = path.read_text()
    last = sorted(r.record_id for r in records)[-1]
    at = text.index(f'"{last}": {{')
    at = text.index('"status": "', at) + len('"status": "')
    path.write_text(text[:at] + "Completed" + text[at + text[at:].index('"') :])
    with pytest.raises(FileFormatError) as caught:
        transfer.import_(path)
    assert caught.value.record_id == last
    assert caught.value.field == "status"
    assert transfer.dump() == ([], [])


def test_progress_is_reported(transfer: Transfer, tmp_path: Path) -> None:
    path = _write(tmp_path / "p.json", datagen.generate_records(importer.BATCH_RECORDS + 5))
    calls: list[tuple[int, int, int]] = []
    transfer.import_(path, progress=lambda *a: calls.append(a))
    size = path.stat().st_size
    assert calls[-1] == (importer.BATCH_RECORDS + 5, size, size)
    assert calls[0][0] == importer.BATCH_RECORDS


# --------------------------------------------------------------------------------------------
# Re-runs, replace, dry run, strict


def _changed(record: IdempotencyRecord, **changes: Any) -> IdempotencyRecord:
    return IdempotencyRecord(**{**{f: getattr(record, f) for f in record.__slots__}, **changes})


def test_reimport_keep_then_replace(transfer: Transfer, tmp_path: Path) -> None:
    records = datagen.generate_records(50, seed=2)
    original = _write(tmp_path / "a.json", records)
    assert transfer.import_(original).inserted == 50
    first = transfer.dump()
    again = transfer.import_(original)
    assert (again.unchanged, again.inserted, again.kept, again.replaced) == (50, 0, 0, 0)
    assert transfer.dump() == first  # tokens too: nothing was rewritten

    conflicted = next(r for r in records if r.status is RecordStatus.CONFLICTED)
    plain = next(r for r in records if r is not conflicted)
    edited = [
        _changed(
            conflicted, conflict_fingerprints=("sha256:new", *conflicted.conflict_fingerprints)
        )
        if r is conflicted
        else _changed(r, owner="someone else")
        if r is plain
        else r
        for r in records
    ]
    extra = datagen.generate_records(1, seed=99)[0]
    changed = _write(tmp_path / "b.json", [*edited, extra])

    kept = transfer.import_(changed)
    assert (kept.read, kept.unchanged, kept.inserted, kept.kept, kept.replaced) == (51, 48, 1, 2, 0)
    assert sorted(kept.kept_ids) == sorted([conflicted.record_id, plain.record_id])
    assert _get(transfer.store, plain) == plain
    assert _get(transfer.store, conflicted) == conflicted

    replaced = transfer.import_(changed, replace=True)
    assert (replaced.unchanged, replaced.replaced, replaced.kept, replaced.inserted) == (
        49,
        2,
        0,
        0,
    )
    for record in [*edited, extra]:
        assert _get(transfer.store, record) == record
    final = transfer.import_(changed)
    assert final.unchanged == 51


def test_dry_run_writes_nothing(transfer: Transfer, tmp_path: Path) -> None:
    records = datagen.generate_records(30, seed=4)
    path = _write(tmp_path / "a.json", records)
    report = transfer.import_(path, dry_run=True)
    assert report.dry_run and (report.read, report.inserted) == (30, 30)
    assert transfer.dump() == ([], [])
    transfer.import_(path)
    before = transfer.dump()
    changed = _write(tmp_path / "b.json", [_changed(records[0], owner="x"), *records[1:]])
    report = transfer.import_(changed, dry_run=True, replace=True)
    assert (report.replaced, report.unchanged) == (1, 29)
    assert transfer.dump() == before


def _mismatched_file(tmp_path: Path) -> tuple[Path, IdempotencyRecord, str]:
    record = datagen.generate_records(1, seed=8)[0]
    value = record_to_json(record)
    other = "idem_" + "0" * 64
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"schema_version": 1, "records": {other: value}}, indent=2))
    return path, record, other


def test_id_mismatch_reported_and_strict_refuses(transfer: Transfer, tmp_path: Path) -> None:
    path, record, other = _mismatched_file(tmp_path)
    with pytest.raises(FileFormatError) as caught:
        transfer.import_(path, strict=True)
    message = str(caught.value)
    assert other in message and record.record_id in message
    assert caught.value.record_id == other and caught.value.field == "record_id"
    assert transfer.dump() == ([], [])

    report = transfer.import_(path)
    assert report.id_mismatches == 1
    assert report.mismatches == [importer.IdMismatch(other, record.record_id, record.record_id)]
    # stored under the map key, which is what the Rust store looked it up by
    assert _get(transfer.store, record) is None
    rows, _ = transfer.dump()
    assert [r[0] for r in rows] == [other]


def test_recomputed_id_mismatch(transfer: Transfer, tmp_path: Path) -> None:
    record = datagen.generate_records(1, seed=9)[0]
    value = record_to_json(record)
    value["key"] = "another key"
    path = tmp_path / "k.json"
    path.write_text(json.dumps({record.record_id: value}))
    report = transfer.import_(path)
    computed = idempotency_record_id(record.tenant_context, record.operation, "another key")
    assert report.mismatches == [importer.IdMismatch(record.record_id, record.record_id, computed)]
    with pytest.raises(FileFormatError, match=computed):
        transfer.import_(path, strict=True)


def test_duplicate_key_nested_in_an_array_is_refused(transfer: Transfer, tmp_path: Path) -> None:
    record = datagen.generate_records(1, seed=1)[0]
    value = record_to_json(record)
    value["outcome"] = {"outcome_kind": "x", "completed_at_ms": 1, "details": [[{}], {"b": 1}]}
    text = json.dumps({record.record_id: value}, indent=2)
    path = tmp_path / "dup.json"
    path.write_text(text.replace('"b": 1', '"b": 1,\n"b": 2', 1))
    with pytest.raises(FileFormatError, match="duplicate field `b`") as caught:
        transfer.import_(path)
    assert caught.value.field == "outcome.details[1].b"
    assert transfer.dump() == ([], [])


def test_missing_file_is_refused_clearly(transfer: Transfer, tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match="cannot read the file") as caught:
        transfer.import_(tmp_path / "nope.json")
    assert caught.value.path == str(tmp_path / "nope.json")


def test_duplicate_fingerprints_refused(transfer: Transfer, tmp_path: Path) -> None:
    record = datagen.generate_records(1, seed=1)[0]
    value = record_to_json(record)
    value["conflict_fingerprints"] = ["a", "b", "a"]
    path = tmp_path / "d.json"
    path.write_text(json.dumps({record.record_id: value}, indent=2))
    with pytest.raises(FileFormatError, match="appears twice") as caught:
        transfer.import_(path)
    assert caught.value.field == "conflict_fingerprints[2]"


# --------------------------------------------------------------------------------------------
# Round trips


def test_export_of_import_is_byte_identical(transfer: Transfer, tmp_path: Path) -> None:
    transfer.import_(DATA / "sample_versioned.json")
    out = tmp_path / "out.json"
    assert transfer.export(out) == 8
    assert out.read_bytes() == (DATA / "sample_versioned.json").read_bytes()

    legacy_db = tmp_path / "legacy-out.json"
    transfer.import_(DATA / "sample_legacy.json")  # same records: unchanged
    transfer.export(legacy_db)
    assert [r.record for r in read_records(legacy_db)] == [
        r.record for r in sorted(read_records(DATA / "sample_legacy.json"), key=lambda r: r.map_key)
    ]


def test_import_of_export_gives_the_same_database(
    transfer: Transfer, make_database: Callable[[str], Database], tmp_path: Path
) -> None:
    store = transfer.store
    transfer.import_(_write(tmp_path / "a.json", datagen.generate_records(200, seed=6)))
    tenant = TenantContext.explicit_user_workspace("org", "ws", None, "actor")
    for i in range(5):
        store.reserve(tenant, "op", f"k{i}", "owner", "fp-1", now_ms=1000)
        store.reserve(tenant, "op", f"k{i}", "owner", "fp-2", now_ms=1001)
        store.reserve(tenant, "op", f"k{i}", "owner", "fp-0", now_ms=1002)
    store.complete(tenant, "op", "k0", Outcome("accepted", 5, details={"b": 1.5, "a": [None]}))
    exported = tmp_path / "export.json"
    assert transfer.export(exported) == 205

    other = Transfer(make_database(transfer.db.engine_name), transfer.flavour)
    try:
        report = other.import_(exported)
        assert report.inserted == 205
        assert other.dump(tokens=False) == transfer.dump(tokens=False)
        again = tmp_path / "again.json"
        other.export(again)
        assert again.read_bytes() == exported.read_bytes()
    finally:
        other.close()


def test_export_of_empty_database(transfer: Transfer, tmp_path: Path) -> None:
    out = tmp_path / "empty.json"
    assert transfer.export(out) == 0
    assert read_records(out) == []
    assert not (tmp_path / "empty.json.tmp").exists()


# --------------------------------------------------------------------------------------------
# A real process killed mid-import, then a clean re-run


@pytest.fixture(scope="session")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    n = 60_000
    path = tmp_path_factory.mktemp("big") / "big.json"
    datagen.write_realistic_file(path, n)
    return path, n


def _cli(*args: str, **kw: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("IDEMSTORE_DATABASE_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "idemstore", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=kw.get("cwd", ROOT),
    )


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    proc = _cli(*args)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _parse_workers_of(path: Path) -> list[int]:
    """Pids of live parse workers reading ``path`` (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if (
            state != "Z"
            and str(path).encode() in cmdline
            and any(b"worker_main" in a for a in cmdline)
        ):
            pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_killed_import_leaves_nothing(tmp_path: Path, big_file: tuple[Path, int]) -> None:
    path, n = big_file
    db = tmp_path / "kill.db"
    url = f"sqlite:///{db}"
    IdempotencyStore.from_url(url, migrate=True).close()
    killed = 0
    # SIGKILL the importer at several points of its run (its parse workers are running then).
    for delay in (0.3, 0.6, 0.9):
        proc = _cli("--database-url", url, "import", str(path))
        time.sleep(delay)
        if proc.poll() is not None:
            proc.communicate()  # it finished already: start again from an empty table
            _empty(db)
            continue
        workers = _parse_workers_of(path)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        killed += 1
        # Its workers see the pipe close and end; nothing is left running.
        deadline = time.monotonic() + 20
        while _parse_workers_of(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _parse_workers_of(path), f"parse workers {workers} outlived the importer"

        conn = sqlite3.connect(db)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            count = conn.execute("SELECT count(*) FROM idemstore_records").fetchone()[0]
            # All or nothing: only a kill after the commit can leave the file's records.
            assert count in (0, n)
        finally:
            conn.close()
        _empty(db)
    assert killed, "every import finished before it could be killed"

    with IdempotencyStore.from_url(url) as store:
        report = importer.import_file(store, path)
        assert (report.read, report.inserted) == (n, n)
        assert store.stats().total == n


def _empty(db: Path) -> None:
    conn = sqlite3.connect(db)
    try:
        conn.execute("DELETE FROM idemstore_conflict_fingerprints")
        conn.execute("DELETE FROM idemstore_records")
        conn.commit()
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# The command line


def test_cli_import_table_json_and_exit_codes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert _run("--database-url", url, "migrate").returncode == 0
    sample = str(DATA / "sample_versioned.json")

    dry = _run("--database-url", url, "import", "--dry-run", sample)
    assert dry.returncode == 0, dry.stderr
    assert "dry run" in dry.stdout

    first = _run("--database-url", url, "import", sample)
    assert first.returncode == 0, first.stderr
    header = first.stdout.splitlines()[0].split()
    assert header == ["file", "form", *cli_transfer._COUNTS, "unknown"]
    row = first.stdout.splitlines()[2].split()
    assert row[:5] == [sample, "versioned", "8", "8", "0"]

    second = _run(
        "--database-url", url, "import", "--json", sample, str(DATA / "sample_legacy.json")
    )
    assert second.returncode == 0, second.stderr
    payload = json.loads(second.stdout)
    assert [f["unchanged"] for f in payload["files"]] == [8, 8]
    assert payload["totals"]["read"] == 16 and payload["totals"]["inserted"] == 0

    bad = tmp_path / "bad.json"
    bad.write_bytes(next(b for b in BAD_FILES if b.name == "status_wrong_case").data)
    refused = _run("--database-url", url, "import", str(bad))
    assert refused.returncode == 2
    assert "record 'idem_a'" in refused.stderr and "field 'status'" in refused.stderr
    assert f"{bad}:16" in refused.stderr

    good = tmp_path / "good.json"
    _write(good, datagen.generate_records(3, seed=12))
    mixed = _run("--database-url", url, "import", "--json", str(bad), str(good))
    assert mixed.returncode == 2
    payload = json.loads(mixed.stdout)
    assert payload["totals"]["inserted"] == 3 and payload["failed"][0]["path"] == str(bad)

    out = tmp_path / "export.json"
    exported = _run("--database-url", url, "export", str(out))
    assert exported.returncode == 0, exported.stderr
    assert "exported 11 record(s)" in exported.stdout
    assert len(read_records(out)) == 11

    strict_path, _, _ = _mismatched_file(tmp_path)
    strict = _run("--database-url", url, "import", "--strict", str(strict_path))
    assert strict.returncode == 2 and "id mismatch" in strict.stderr
    loose = _run("--database-url", url, "import", str(strict_path))
    assert loose.returncode == 0 and "id mismatch: map key idem_000" in loose.stdout


@pytest.fixture
def spawns(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every start of parse workers, as (file, workers asked for)."""
    calls: list[tuple[str, int]] = []
    spawn = _parse.WorkerParse.spawn.__func__  # type: ignore[attr-defined]

    def counted(cls: Any, path: str, **kw: Any) -> Any:
        calls.append((path, kw["workers"]))
        return spawn(cls, path, **kw)

    monkeypatch.setattr(_parse.WorkerParse, "spawn", classmethod(counted))
    return calls


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["import", "{big}"], ("{big}", False, 2)),
        (
            ["--database-url", "sqlite:///x.db", "-v", "import", "--json", "{big}"],
            ("{big}", False, 2),
        ),
        (["import", "--strict", "--dry-run", "{big}", "{small}"], ("{big}", True, 2)),
        (["import", "--workers", "3", "{big}"], ("{big}", False, 3)),
        (["import", "--workers", "0", "{big}"], None),
        (["import", "{small}"], None),  # too small to be worth workers
        (["import", "--help"], None),
        (["import", "--unknown", "{big}"], None),  # an option it does not know: leave it
        (["stats"], None),
        (["--database-url", "import", "stats"], None),  # "import" is the URL here
        (["import", "{missing}"], None),
    ],
)
def test_prestart_reads_only_what_it_knows(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    spawns: list[tuple[str, int]],
    argv: list[str],
    expected: tuple[str, bool, int] | None,
) -> None:
    monkeypatch.setattr(_parse, "WORKER_MIN_BYTES", 1000)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    big, small = tmp_path / "big.json", tmp_path / "small.json"
    datagen.write_realistic_file(big, 20)
    small.write_text("{}")
    names = {"big": str(big), "small": str(small), "missing": str(tmp_path / "none.json")}
    started = cli.prestart([a.format(**names) for a in argv])
    try:
        if expected is None:
            assert started is None and spawns == []
        else:
            assert started is not None
            path, strict, workers = expected
            assert (started.path, started.strict) == (path.format(**names), strict)
            assert spawns == [(path.format(**names), workers)]
    finally:
        if started is not None:
            started.close()


def test_command_uses_the_workers_it_started_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spawns: list[tuple[str, int]]
) -> None:
    monkeypatch.setattr(_parse, "WORKER_MIN_BYTES", 1000)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    url = f"sqlite:///{tmp_path / 'early.db'}"
    IdempotencyStore.from_url(url, migrate=True).close()
    path = tmp_path / "keys.json"
    datagen.write_realistic_file(path, 300)
    early: list[Any] = []
    prestart = cli.prestart

    def recorded(argv: list[str]) -> Any:
        early.append(prestart(argv))
        return early[-1]

    monkeypatch.setattr(cli, "prestart", recorded)
    assert cli.main(["--database-url", url, "import", "--json", str(path)]) == 0
    # Started once, by prestart (before the command loaded the database layer), and those
    # workers did the import: no second start.
    assert len(early) == 1 and early[0] is not None
    assert spawns == [(str(path), 2)]
    with IdempotencyStore.from_url(url) as store:
        assert store.stats().total == 300

    spawns.clear()
    second = tmp_path / "second.json"
    datagen.write_realistic_file(second, 5)
    assert cli.main(["--database-url", url, "import", "--workers", "0", str(second)]) == 0
    assert spawns == []  # --workers 0: parsed in the importing process


def test_import_inside_a_callers_transaction(database: Database) -> None:
    store = database.sync_store()
    try:
        engine = store.engine
        with engine.connect() as conn:
            report = importer.import_file(store, DATA / "sample_versioned.json", connection=conn)
            assert report.inserted == 8
            conn.rollback()
        assert store.stats().total == 0
        with engine.begin() as conn:
            importer.import_file(store, DATA / "sample_versioned.json", connection=conn)
        assert store.stats().total == 8
    finally:
        store.close()


def test_details_equal_in_python_but_not_in_json_are_kept_apart(tmp_path: Path) -> None:
    # 1 == True == 1.0 and 0 == -0.0 == False in Python (same hash too): a cache keyed on the
    # decoded values would store one record's details text for another's.
    variants: list[Any] = [
        *(1, True, 1.0, 0, False, -0.0, 0.0, "1", None, "None", [1], [True]),
        *({"a": 1}, {"a": True}, {"a": "x"}, {"a": None}),
    ]
    base = datagen.generate_records(1, seed=21)[0]
    records = []
    for i, value in enumerate(variants):
        key = f"k{i}"
        tenant = base.tenant_context
        records.append(
            dataclasses.replace(
                base,
                record_id=idempotency_record_id(tenant, base.operation, key),
                key=key,
                status=RecordStatus.COMPLETED,
                outcome=Outcome("accepted", 5, details={"flag": value}),
            )
        )
    path = _write(tmp_path / "details.json", records)
    with IdempotencyStore.from_url(f"sqlite:///{tmp_path / 'd.db'}", migrate=True) as store:
        importer.import_file(store, path, workers=0)
        for record in records:
            got = _get(store, record)
            assert got is not None and got.outcome is not None
            assert json.dumps(got.outcome.details) == json.dumps(record.outcome.details)  # type: ignore[union-attr]
