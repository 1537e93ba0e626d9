"""The JSON key file: reading like serde, writing like serde_json::to_string_pretty."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from idemstore.bench import datagen
from idemstore.errors import FileFormatError, InvalidInputError
from idemstore.model import (
    U64_MAX,
    IdempotencyRecord,
    Outcome,
    RecordStatus,
    TenantContext,
    TenantSource,
)
from idemstore.transfer import source
from idemstore.transfer import writer as jsonwriter
from idemstore.transfer.reader import FileHeader, open_records, read_records
from idemstore.transfer.validate import record_from_json
from idemstore.transfer.writer import dumps_records, record_to_json, write_records
from tests.badfiles import BAD_FILES, BadFile, base_record, versioned

DATA = Path(__file__).parent / "data"
MINIMAL_ID = "idem_79ff466be32b62424b02f1333fcfd686707e4a20e306918221582d30b9bab661"

# The FORMAT.md minimal file.
FORMAT_MD_FILE = """{
  "schema_version": 1,
  "records": {
    "%(id)s": {
      "schema_version": 1,
      "record_id": "%(id)s",
      "tenant_context": {"org_id": "local", "workspace_id": "local", "source": "local_implicit"},
      "operation": "webhook.provider_event",
      "key": "trigger:whtr_0123456789abcdef0123456789abcdef:provider_event:evt_123",
      "owner": "automation_webhook:whtr_0123456789abcdef0123456789abcdef",
      "request_fingerprint": "FINGERPRINT",
      "status": "completed",
      "first_seen_at_ms": 1782900000000,
      "last_seen_at_ms": 1782900000042,
      "first_seen_event_id": "evt_123",
      "outcome": {
        "outcome_kind": "accepted",
        "completed_at_ms": 1782900000042,
        "primary_ref_kind": "delivery",
        "primary_ref_id": "delivery-5f0c",
        "secondary_ref_kind": "run",
        "secondary_ref_id": "run-9b2d",
        "details": {"dedupe_reason_code": "accepted_provider_event_id", "dedupe_result": "accepted"}
      },
      "conflict_count": 0
    }
  }
}""".replace("%(id)s", MINIMAL_ID).replace(
    "FINGERPRINT", "sha256:0e41819062db3e1afad95ac174e3cf1c4d447edcf49c07c1760996f34e977d87"
)

FORMAT_MD_RECORD = IdempotencyRecord(
    schema_version=1,
    record_id=MINIMAL_ID,
    tenant_context=TenantContext.local_implicit(),
    operation="webhook.provider_event",
    key="trigger:whtr_0123456789abcdef0123456789abcdef:provider_event:evt_123",
    owner="automation_webhook:whtr_0123456789abcdef0123456789abcdef",
    request_fingerprint="sha256:0e41819062db3e1afad95ac174e3cf1c4d447edcf49c07c1760996f34e977d87",
    status=RecordStatus.COMPLETED,
    first_seen_at_ms=1782900000000,
    last_seen_at_ms=1782900000042,
    first_seen_event_id="evt_123",
    outcome=Outcome(
        "accepted",
        1782900000042,
        "delivery",
        "delivery-5f0c",
        "run",
        "run-9b2d",
        {"dedupe_reason_code": "accepted_provider_event_id", "dedupe_result": "accepted"},
    ),
)


def write(tmp_path: Path, data: bytes | str, name: str = "keys.json") -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# ------------------------------------------------------------------------------------------
# The FORMAT.md example


def test_format_md_minimal_file_parses(tmp_path: Path) -> None:
    with open_records(write(tmp_path, FORMAT_MD_FILE)) as reader:
        assert reader.header == FileHeader("versioned", 1, ())
        records = list(reader)
    assert len(records) == 1
    assert records[0].map_key == MINIMAL_ID
    assert records[0].record == FORMAT_MD_RECORD
    assert records[0].line == 4
    assert records[0].unknown_fields == ()


def test_format_md_minimal_file_reserializes_to_same_structure(tmp_path: Path) -> None:
    text = dumps_records([FORMAT_MD_RECORD])
    assert json.loads(text) == json.loads(FORMAT_MD_FILE)


# The FORMAT.md record with every optional field filled, written by hand the way
# serde_json::to_string_pretty lays it out (Rust field order, details keys sorted).
EVERY_FIELD_RECORD = IdempotencyRecord(
    schema_version=1,
    record_id=MINIMAL_ID,
    tenant_context=TenantContext.explicit_user_workspace("local", "local", "dep-1", "actor-1"),
    operation="webhook.provider_event",
    key="trigger:whtr_0123456789abcdef0123456789abcdef:provider_event:evt_123",
    owner="automation_webhook:whtr_0123456789abcdef0123456789abcdef",
    request_fingerprint="sha256:0e41819062db3e1afad95ac174e3cf1c4d447edcf49c07c1760996f34e977d87",
    status=RecordStatus.CONFLICTED,
    first_seen_at_ms=1782900000000,
    last_seen_at_ms=1782900000042,
    first_seen_event_id="evt_123",
    expires_at_ms=1782986400000,
    outcome=Outcome(
        "accepted",
        1782900000042,
        "delivery",
        "delivery-5f0c",
        "run",
        "run-9b2d",
        {
            "dedupe_result": "accepted",
            "dedupe_reason_code": "accepted_provider_event_id",
            "woken_wait_id": None,
            "delivery_id": "d\u00e9livr\u00e9 \U0001f680",
            "nested": {"b": [1, True], "a": {}},
        },
    ),
    conflict_count=2,
    conflict_fingerprints=("sha256:aa", "sha256:bb"),
)

EVERY_FIELD_EXPECTED = (
    "{\n"
    '  "schema_version": 1,\n'
    '  "records": {\n'
    f'    "{MINIMAL_ID}": {{\n'
    '      "schema_version": 1,\n'
    f'      "record_id": "{MINIMAL_ID}",\n'
    '      "tenant_context": {\n'
    '        "org_id": "local",\n'
    '        "workspace_id": "local",\n'
    '        "deployment_id": "dep-1",\n'
    '        "actor_id": "actor-1",\n'
    '        "source": "explicit"\n'
    "      },\n"
    '      "operation": "webhook.provider_event",\n'
    '      "key": "trigger:whtr_0123456789abcdef0123456789abcdef:provider_event:evt_123",\n'
    '      "owner": "automation_webhook:whtr_0123456789abcdef0123456789abcdef",\n'
    '      "request_fingerprint": '
    '"sha256:0e41819062db3e1afad95ac174e3cf1c4d447edcf49c07c1760996f34e977d87",\n'
    '      "status": "conflicted",\n'
    '      "first_seen_at_ms": 1782900000000,\n'
    '      "last_seen_at_ms": 1782900000042,\n'
    '      "first_seen_event_id": "evt_123",\n'
    '      "expires_at_ms": 1782986400000,\n'
    '      "outcome": {\n'
    '        "outcome_kind": "accepted",\n'
    '        "completed_at_ms": 1782900000042,\n'
    '        "primary_ref_kind": "delivery",\n'
    '        "primary_ref_id": "delivery-5f0c",\n'
    '        "secondary_ref_kind": "run",\n'
    '        "secondary_ref_id": "run-9b2d",\n'
    '        "details": {\n'
    '          "dedupe_reason_code": "accepted_provider_event_id",\n'
    '          "dedupe_result": "accepted",\n'
    '          "delivery_id": "d\u00e9livr\u00e9 \U0001f680",\n'
    '          "nested": {\n'
    '            "a": {},\n'
    '            "b": [\n'
    "              1,\n"
    "              true\n"
    "            ]\n"
    "          },\n"
    '          "woken_wait_id": null\n'
    "        }\n"
    "      },\n"
    '      "conflict_count": 2,\n'
    '      "conflict_fingerprints": [\n'
    '        "sha256:aa",\n'
    '        "sha256:bb"\n'
    "      ]\n"
    "    }\n"
    "  }\n"
    "}"
)


def test_writer_is_byte_exact_for_a_record_with_every_field(tmp_path: Path) -> None:
    assert dumps_records([EVERY_FIELD_RECORD]) == EVERY_FIELD_EXPECTED
    path = tmp_path / "keys.json"
    assert write_records(path, [EVERY_FIELD_RECORD]) == 1
    assert path.read_bytes() == EVERY_FIELD_EXPECTED.encode("utf-8")
    assert not (tmp_path / "keys.json.tmp").exists()
    assert [r.record for r in read_records(path)] == [EVERY_FIELD_RECORD]


def test_writer_omits_absent_options_and_writes_null_details() -> None:
    record = datagen.sample_records()[2]  # completed, outcome without refs or details
    assert record.outcome is not None and record.outcome.details is None
    text = dumps_records([record])
    assert '"details": null' in text
    for absent in (
        "first_seen_event_id",
        "expires_at_ms",
        "primary_ref_kind",
        "conflict_fingerprints",
        "deployment_id",
        "actor_id",
    ):
        assert absent not in text
    assert '"conflict_count": 0' in text
    assert '"source": "local_implicit"' in text


def test_empty_store_is_written_like_serde() -> None:
    assert dumps_records([]) == '{\n  "schema_version": 1,\n  "records": {}\n}'


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.0, "1.0"),
        (2.5, "2.5"),
        (-0.0, "-0.0"),
        (1e-7, "1e-7"),
        (1e-6, "1e-6"),
        (1e-5, "0.00001"),
        (0.000123, "0.000123"),
        (1e15, "1000000000000000.0"),
        (1e16, "1e16"),
        (1e21, "1e21"),
        (1.5e300, "1.5e300"),
        (123456.789, "123456.789"),
        (5e-324, "5e-324"),
    ],
)
def test_floats_in_details_are_written_like_ryu(value: float, expected: str) -> None:
    assert jsonwriter._format_float(value) == expected


# ------------------------------------------------------------------------------------------
# Round trips and fixtures


def test_round_trip_generated_records(tmp_path: Path) -> None:
    records = datagen.generate_records(300, seed=3)
    path = tmp_path / "keys.json"
    assert write_records(path, records) == 300
    got = read_records(path)
    assert {r.map_key: r.record for r in got} == {r.record_id: r for r in records}
    assert [r.map_key for r in got] == sorted(r.record_id for r in records)
    # read then write gives the canonical bytes again
    again = tmp_path / "again.json"
    write_records(again, [r.record for r in got])
    assert again.read_bytes() == path.read_bytes()


def test_round_trip_legacy_form(tmp_path: Path) -> None:
    records = datagen.sample_records() + datagen.generate_records(100, seed=4)
    path = tmp_path / "legacy.json"
    datagen.write_legacy_file(path, records)
    with open_records(path) as reader:
        assert reader.header == FileHeader("legacy", None, ())
        got = list(reader)
    assert [r.record for r in got] == records
    assert dumps_records([r.record for r in got]) == dumps_records(records)


@pytest.mark.parametrize("name", sorted(datagen.SAMPLE_FILES))
def test_committed_samples_regenerate_identically(tmp_path: Path, name: str) -> None:
    datagen.write_samples(tmp_path)
    assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes()


def test_committed_samples_read_back() -> None:
    expected = {r.record_id: r for r in datagen.sample_records()}
    for name in datagen.SAMPLE_FILES:
        got = read_records(DATA / name)
        assert {r.map_key: r.record for r in got} == expected


def test_versioned_sample_is_canonical() -> None:
    got = read_records(DATA / "sample_versioned.json")
    text = dumps_records([r.record for r in got])
    assert text.encode() == (DATA / "sample_versioned.json").read_bytes()


def test_records_span_many_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny chunks: every record, key and number crosses chunk boundaries.
    monkeypatch.setattr(source, "_CHUNK_BYTES", 7)
    monkeypatch.setattr(source, "_READ_AHEAD", 3)
    records = datagen.sample_records()
    for form, writer in (
        ("versioned", datagen.write_versioned_file),
        ("legacy", datagen.write_legacy_file),
    ):
        path = tmp_path / f"{form}.json"
        writer(path, records)
        got = read_records(path)
        assert sorted((r.record for r in got), key=lambda r: r.record_id) == sorted(
            records, key=lambda r: r.record_id
        )
        text = path.read_text(encoding="utf-8")
        for r in got:
            line_text = text.splitlines()[r.line - 1]
            assert json.dumps(r.map_key, ensure_ascii=form == "legacy") in line_text


# ------------------------------------------------------------------------------------------
# Semantics


@pytest.mark.parametrize(
    "data", [b"", b"  \n\t", b"{}", b"\n{}\n", b"{ }", b"\xc2\xa0{}\xe2\x80\xa8"]
)
def test_empty_files(tmp_path: Path, data: bytes) -> None:
    with open_records(write(tmp_path, data)) as reader:
        assert reader.header.form == "empty"
        assert list(reader) == []


def test_versioned_without_records_is_empty(tmp_path: Path) -> None:
    with open_records(write(tmp_path, '{"schema_version": 1}')) as reader:
        assert reader.header == FileHeader("versioned", 1, ())
        assert list(reader) == []


def test_schema_version_zero_is_accepted(tmp_path: Path) -> None:
    with open_records(write(tmp_path, versioned(base_record(), version=0))) as reader:
        assert reader.header.schema_version == 0
        assert len(list(reader)) == 1


def test_legacy_tenant_default(tmp_path: Path) -> None:
    record = base_record()
    del record["tenant_context"]
    del record["schema_version"]
    del record["conflict_count"]
    path = write(tmp_path, json.dumps({"idem_a": record}))
    with open_records(path) as reader:
        assert reader.header.form == "legacy"
        (got,) = list(reader)
    assert got.record.tenant_context == TenantContext.explicit_user_workspace(
        "local", "default", None, "system"
    )
    assert got.record.tenant_context.source is TenantSource.EXPLICIT
    assert got.record.schema_version == 1
    assert got.record.conflict_count == 0


def test_tenant_source_defaults_to_local_implicit(tmp_path: Path) -> None:
    record = base_record()
    record["tenant_context"] = {"org_id": "o", "workspace_id": "w"}
    (got,) = read_records(write(tmp_path, versioned(record)))
    assert got.record.tenant_context == TenantContext("o", "w", None, None)
    assert got.record.tenant_context.source is TenantSource.LOCAL_IMPLICIT


def test_null_is_absent_for_options(tmp_path: Path) -> None:
    record = base_record()
    record.update(first_seen_event_id=None, expires_at_ms=None, outcome=None)
    record["tenant_context"] = {
        "org_id": "o",
        "workspace_id": "w",
        "deployment_id": None,
        "actor_id": None,
        "source": "explicit",
    }
    (got,) = read_records(write(tmp_path, versioned(record)))
    assert got.record.first_seen_event_id is None
    assert got.record.expires_at_ms is None
    assert got.record.outcome is None
    assert got.record.tenant_context == TenantContext("o", "w", None, None, TenantSource.EXPLICIT)
    record["outcome"] = {
        "outcome_kind": "accepted",
        "completed_at_ms": 1,
        "primary_ref_kind": None,
        "primary_ref_id": None,
        "secondary_ref_kind": None,
        "secondary_ref_id": None,
        "details": None,
    }
    (got,) = read_records(write(tmp_path, versioned(record)))
    assert got.record.outcome == Outcome("accepted", 1)


def test_unknown_fields_are_reported_not_fatal(tmp_path: Path) -> None:
    record = base_record()
    record["foo"] = {"anything": [1, 2]}
    record["tenant_context"]["bar"] = 1
    record["outcome"] = {"outcome_kind": "accepted", "completed_at_ms": 1, "baz": None}
    text = json.dumps(
        {"extra": True, "schema_version": 1, "records": {"idem_a": record}, "later": {"x": 1}},
        indent=2,
    )
    with open_records(write(tmp_path, text)) as reader:
        (got,) = list(reader)
        assert reader.header == FileHeader("versioned", 1, ("extra", "later"))
    assert got.unknown_fields == ("foo", "outcome.baz", "tenant_context.bar")
    assert got.record.outcome == Outcome("accepted", 1)
    # schema_version first (the Rust layout): unknown top-level fields known after iterating
    text = json.dumps({"schema_version": 1, "records": {"idem_a": record}, "later": 1})
    with open_records(write(tmp_path, text)) as reader:
        assert len(list(reader)) == 1
        assert reader.header.unknown_fields == ("later",)


def test_map_key_is_kept_even_when_it_differs_from_record_id(tmp_path: Path) -> None:
    (got,) = read_records(write(tmp_path, json.dumps({"other": base_record()})))
    assert got.map_key == "other"
    assert got.record.record_id == "idem_a"


def test_records_before_schema_version_and_legacy_key_named_records(tmp_path: Path) -> None:
    # versioned: schema_version after records
    text = json.dumps({"records": {"idem_a": base_record()}, "schema_version": 1})
    with open_records(write(tmp_path, text)) as reader:
        assert reader.header == FileHeader("versioned", 1, ())
        assert [r.map_key for r in reader] == ["idem_a"]
    # legacy: a record whose id happens to be "records"
    text = json.dumps({"records": base_record()})
    with open_records(write(tmp_path, text)) as reader:
        assert reader.header.form == "legacy"
        assert [r.map_key for r in reader] == ["records"]


def test_newer_schema_version_refused_before_any_record(tmp_path: Path) -> None:
    path = write(tmp_path, versioned(base_record(), version=2))
    with pytest.raises(FileFormatError) as caught:
        open_records(path)
    assert caught.value.reason == (
        "idempotency keys schema version 2 is newer than supported version 1"
    )


def test_details_any_json_value(tmp_path: Path) -> None:
    for details in ("text", 5, [1, {"a": None}], True, {"big": 2**70, "f": 0.1}):
        record = base_record()
        record["outcome"] = {"outcome_kind": "k", "completed_at_ms": 1, "details": details}
        (got,) = read_records(write(tmp_path, versioned(record)))
        assert got.record.outcome is not None
        assert got.record.outcome.details == details


def test_record_from_json_and_to_json() -> None:
    record = record_from_json(base_record(), map_key="idem_a")
    assert record.status is RecordStatus.RESERVED
    assert record_to_json(record) == base_record()
    bad = base_record()
    bad["status"] = "Completed"
    with pytest.raises(FileFormatError) as caught:
        record_from_json(bad, map_key="idem_a")
    assert caught.value.field == "status"
    assert caught.value.record_id == "idem_a"


def test_writer_orders_and_checks_iterators(tmp_path: Path) -> None:
    records = datagen.generate_records(20, seed=1)
    path = tmp_path / "keys.json"
    write_records(path, records)  # a list: sorted by the writer
    keys = [r.map_key for r in read_records(path)]
    assert keys == sorted(keys)
    with pytest.raises(InvalidInputError, match="ascending"):
        write_records(path, iter(records[::-1]))
    # the failed write left the old file alone and no temp file behind
    assert [r.map_key for r in read_records(path)] == keys
    assert not os.path.exists(str(path) + ".tmp")
    with pytest.raises(InvalidInputError, match="duplicate"):
        write_records(path, [records[0], records[0]])


def test_writer_refuses_non_finite_floats() -> None:
    record = datagen.sample_records()[2]
    bad = IdempotencyRecord(
        **{
            **{f: getattr(record, f) for f in record.__dataclass_fields__},
            "outcome": Outcome("x", 1, details={"f": float("nan")}),
        }
    )
    with pytest.raises(InvalidInputError):
        dumps_records([bad])


def test_u64_max_values_round_trip(tmp_path: Path) -> None:
    record = base_record()
    record.update(first_seen_at_ms=U64_MAX, last_seen_at_ms=U64_MAX, conflict_count=U64_MAX)
    (got,) = read_records(write(tmp_path, versioned(record)))
    assert got.record.first_seen_at_ms == U64_MAX
    assert got.record.conflict_count == U64_MAX


# ------------------------------------------------------------------------------------------
# The bad files


def test_corpus_is_big_enough() -> None:
    assert len(BAD_FILES) >= 20
    assert len({b.name for b in BAD_FILES}) == len(BAD_FILES)


@pytest.mark.parametrize("bad", BAD_FILES, ids=[b.name for b in BAD_FILES])
def test_bad_file_is_refused(tmp_path: Path, bad: BadFile) -> None:
    path = write(tmp_path, bad.data)
    with pytest.raises(FileFormatError) as caught:
        read_records(path)
    error = caught.value
    assert bad.message in str(error)
    assert error.field == bad.field
    assert error.line == bad.line
    assert error.path == str(path)
    assert str(path) in str(error)
