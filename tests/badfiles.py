"""Files the reader must refuse, as data, so the importer tests can replay them on a database.

Each case: ``BadFile(name, data, message, field, line)``: the file's bytes, a fragment the error
message must contain, the dotted field the error must name (``None``: no field) and its 1-based
line. Most cases are mutations of one small versioned file, :data:`BASE_TEXT`, whose lines are::

     1 {
     2   "schema_version": 1,
     3   "records": {
     4     "idem_a": {
     5       "schema_version": 1,
     6       "record_id": "idem_a",
     7       "tenant_context": {
     8         "org_id": "local",
     9         "workspace_id": "local",
    10         "source": "local_implicit"
    11       },
    12       "operation": "op",
    13       "key": "k",
    14       "owner": "o",
    15       "request_fingerprint": "fp",
    16       "status": "reserved",
    17       "first_seen_at_ms": 1000,
    18       "last_seen_at_ms": 1000,
    19       "conflict_count": 0
    20     }
    21   }
    22 }
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple


class BadFile(NamedTuple):
    name: str
    data: bytes
    message: str
    field: str | None
    line: int


RECORD_ID = "idem_a"


def base_record() -> dict[str, Any]:
    return {
        "schema_version": 1,
        "record_id": RECORD_ID,
        "tenant_context": {"org_id": "local", "workspace_id": "local", "source": "local_implicit"},
        "operation": "op",
        "key": "k",
        "owner": "o",
        "request_fingerprint": "fp",
        "status": "reserved",
        "first_seen_at_ms": 1000,
        "last_seen_at_ms": 1000,
        "conflict_count": 0,
    }


def versioned(record: object, *, version: object = 1) -> str:
    return json.dumps({"schema_version": version, "records": {RECORD_ID: record}}, indent=2)


BASE_TEXT = versioned(base_record())


def mutated(**changes: Any) -> bytes:
    """BASE_TEXT with record fields replaced (``None`` as a value means JSON null)."""
    record = base_record()
    record.update(changes)
    return versioned(record).encode()


def without(field: str) -> bytes:
    record = base_record()
    del record[field]
    return versioned(record).encode()


def replace(old: str, new: str, text: str = BASE_TEXT) -> bytes:
    assert old in text, old
    return text.replace(old, new, 1).encode()


def _outcome_case(**outcome: Any) -> bytes:
    # "outcome" comes after "conflict_count" (line 19): "outcome": { on 20, its members from 21
    record = base_record()
    record["outcome"] = {"outcome_kind": "accepted", "completed_at_ms": 5, **outcome}
    return versioned(record).encode()


def _nested(depth: int) -> str:
    """Compact JSON nested ``depth`` containers deep (arrays and objects alternating)."""
    return (
        "".join("[" if i % 2 else '{"k":' for i in range(depth))
        + "1"
        + "".join("]" if i % 2 else "}" for i in reversed(range(depth)))
    )


def _details_case(details_text: str) -> bytes:
    """An outcome whose details are the given JSON text, on line 23."""
    return replace('"details": 0', '"details": ' + details_text, _outcome_case(details=0).decode())


def _two_records_same_id() -> bytes:
    # The second "idem_a" key is on line 21 (the first record spans lines 4-20).
    text = BASE_TEXT
    body = text[text.index('    "idem_a"') : text.rindex("\n  }\n}")]
    return (text[: text.rindex("\n  }\n}")] + ",\n" + body + "\n  }\n}").encode()


BAD_FILES: list[BadFile] = [
    BadFile(
        "truncated_between_fields",
        BASE_TEXT[: BASE_TEXT.index('"owner"')].encode(),
        "unexpected end of file",
        None,
        14,
    ),
    BadFile(
        "truncated_inside_string",
        BASE_TEXT[: BASE_TEXT.index('"fp"') + 2].encode(),
        "unexpected end of file",
        None,
        15,
    ),
    BadFile(
        "truncated_top_level", b'{\n  "schema_version": 1,\n', "unexpected end of file", None, 3
    ),
    BadFile("top_level_array", b"[]", "expected a JSON object at the top level", None, 1),
    BadFile("top_level_null", b"\n null", "invalid type: null, expected a JSON object", None, 2),
    BadFile("byte_order_mark", b"\xef\xbb\xbf{}", "expected a JSON object", None, 1),
    BadFile("trailing_characters", b'{"schema_version": 1}\n}', "trailing characters", None, 2),
    BadFile(
        "status_wrong_case",
        mutated(status="Reserved"),
        "unknown variant `Reserved`",
        "status",
        16,
    ),
    BadFile("status_not_string", mutated(status=1), "invalid type: integer `1`", "status", 16),
    BadFile(
        "negative_integer",
        mutated(first_seen_at_ms=-1),
        "invalid value: integer `-1`, expected u64",
        "first_seen_at_ms",
        17,
    ),
    BadFile(
        "fractional_integer",
        replace('"last_seen_at_ms": 1000', '"last_seen_at_ms": 1.0'),
        "invalid type: floating point `1.0`, expected u64",
        "last_seen_at_ms",
        18,
    ),
    BadFile(
        "exponent_integer",
        replace('"first_seen_at_ms": 1000', '"first_seen_at_ms": 1e3'),
        "floating point",
        "first_seen_at_ms",
        17,
    ),
    BadFile(
        "integer_above_u64",
        mutated(conflict_count=2**64),
        "invalid value: integer `18446744073709551616`, expected u64",
        "conflict_count",
        19,
    ),
    BadFile(
        "boolean_for_number",
        mutated(first_seen_at_ms=True),
        "invalid type: boolean `true`, expected u64",
        "first_seen_at_ms",
        17,
    ),
    BadFile(
        "string_for_number",
        mutated(last_seen_at_ms="1000"),
        'invalid type: string "1000", expected u64',
        "last_seen_at_ms",
        18,
    ),
    BadFile(
        "record_schema_version_above_u32",
        mutated(schema_version=2**32),
        "expected u32",
        "schema_version",
        5,
    ),
    BadFile(
        "record_schema_version_null",
        mutated(schema_version=None),
        "invalid type: null, expected u32",
        "schema_version",
        5,
    ),
    BadFile(
        "newer_schema_version",
        versioned(base_record(), version=2).encode(),
        "idempotency keys schema version 2 is newer than supported version 1",
        "schema_version",
        2,
    ),
    BadFile(
        "newer_schema_version_after_records",
        b'{\n  "records": {},\n  "schema_version": 7\n}',
        "idempotency keys schema version 7 is newer than supported version 1",
        "schema_version",
        3,
    ),
    BadFile(
        "file_schema_version_null",
        versioned(base_record(), version=None).encode(),
        "invalid type: null, expected u32",
        "schema_version",
        2,
    ),
    BadFile(
        "file_schema_version_string",
        versioned(base_record(), version="1").encode(),
        'invalid type: string "1", expected u32',
        "schema_version",
        2,
    ),
    BadFile(
        "records_not_a_map",
        b'{\n  "schema_version": 1,\n  "records": []\n}',
        "expected a map",
        "records",
        3,
    ),
    BadFile(
        "duplicate_record_id", _two_records_same_id(), "duplicate record id 'idem_a'", None, 21
    ),
    BadFile(
        "duplicate_field_in_record",
        replace('"status": "reserved",', '"status": "reserved",\n      "status": "completed",'),
        "duplicate field `status`",
        "status",
        17,
    ),
    BadFile(
        "duplicate_top_level_field",
        b'{\n  "schema_version": 1,\n  "records": {},\n  "records": {}\n}',
        "duplicate field `records`",
        "records",
        4,
    ),
    BadFile(
        "invalid_utf8",
        replace('"key": "k"', '"key": "k\\xff"').replace(b"\\xff", b"\xff"),
        "valid UTF-8",
        None,
        13,
    ),
    BadFile(
        "record_not_an_object",
        versioned("nope").encode(),
        "expected struct IdempotencyKeyRecord",
        None,
        4,
    ),
    BadFile("missing_required_field", without("owner"), "missing field `owner`", "owner", 4),
    BadFile("missing_status", without("status"), "missing field `status`", "status", 4),
    BadFile(
        "null_conflict_count",
        mutated(conflict_count=None),
        "invalid type: null, expected u64",
        "conflict_count",
        19,
    ),
    BadFile(
        # "conflict_fingerprints": [ on line 20, "a" on 21, 5 on 22
        "fingerprint_not_string",
        mutated(conflict_fingerprints=["a", 5]),
        "invalid type: integer `5`, expected a string",
        "conflict_fingerprints[1]",
        22,
    ),
    BadFile(
        "fingerprints_null",
        mutated(conflict_fingerprints=None),
        "invalid type: null, expected a sequence",
        "conflict_fingerprints",
        20,
    ),
    BadFile(
        "tenant_context_not_object",
        mutated(tenant_context="local"),
        "expected struct TenantContext",
        "tenant_context",
        7,
    ),
    BadFile(
        "tenant_context_null",
        mutated(tenant_context=None),
        "invalid type: null, expected struct TenantContext",
        "tenant_context",
        7,
    ),
    BadFile(
        "tenant_bad_source",
        replace('"source": "local_implicit"', '"source": "Explicit"'),
        "unknown variant `Explicit`",
        "tenant_context.source",
        10,
    ),
    BadFile(
        "tenant_source_null",
        replace('"source": "local_implicit"', '"source": null'),
        "invalid type: null",
        "tenant_context.source",
        10,
    ),
    BadFile(
        "tenant_missing_org",
        replace('        "org_id": "local",\n', ""),
        "missing field `org_id`",
        "tenant_context.org_id",
        7,
    ),
    BadFile(
        "option_wrong_type",
        mutated(first_seen_event_id=5),
        "invalid type: integer `5`, expected a string",
        "first_seen_event_id",
        20,
    ),
    BadFile(
        "outcome_not_object",
        mutated(outcome=[]),
        "expected struct IdempotencyKeyOutcome",
        "outcome",
        20,
    ),
    BadFile(
        "outcome_completed_at_string",
        _outcome_case(completed_at_ms="5"),
        'invalid type: string "5", expected u64',
        "outcome.completed_at_ms",
        22,
    ),
    BadFile(
        "outcome_missing_kind",
        replace('"outcome_kind": "accepted",', '"kind": "accepted",', _outcome_case().decode()),
        "missing field `outcome_kind`",
        "outcome.outcome_kind",
        20,
    ),
    BadFile(
        "duplicate_key_in_details",
        replace(
            '"details": {}',
            '"details": {\n          "a": 1,\n          "a": 2\n        }',
            _outcome_case(details={}).decode(),
        ),
        "duplicate field `a`",
        "outcome.details.a",
        25,
    ),
    BadFile(
        "nan_in_details",
        replace('"details": 0', '"details": NaN', _outcome_case(details=0).decode()),
        "NaN is not valid JSON",
        "outcome.details",
        23,
    ),
    BadFile(
        "nan_in_unknown_top_level_field",
        b'{\n  "schema_version": 1,\n  "x": {\n    "y": [\n      -Infinity\n    ]\n  }\n}',
        "-Infinity is not valid JSON",
        None,
        5,
    ),
    BadFile(
        "nan_in_legacy_record",
        b'{\n  "idem_a": {\n    "foo": NaN\n  }\n}',
        "NaN is not valid JSON",
        None,
        3,
    ),
    BadFile(
        "lone_surrogate",
        replace('"key": "k"', '"key": "k\\ud800"'),
        "lone surrogate",
        "key",
        13,
    ),
    BadFile(
        "trailing_comma_in_records",
        replace("\n    }\n  }\n}", "\n    },\n  }\n}"),
        "expected a string key",
        None,
        21,
    ),
    # The Rust parser's limits (serde_json, counted over the whole file): 128 levels of
    # nesting; numbers beyond f64; details deeper than 123 (4 containers down in the file
    # an export writes) are refused because the export would be unreadable.
    BadFile(
        "details_nested_124_levels",
        _details_case(_nested(124)),
        "nested more than 123 levels deep",
        "outcome.details",
        23,
    ),
    BadFile(
        "ignored_field_nested_to_128_in_the_file",
        replace('"conflict_count": 0', '"conflict_count": 0,\n      "x": ' + _nested(125)),
        "recursion limit exceeded",
        "x",
        20,
    ),
    BadFile(
        "top_level_field_nested_to_128",
        b'{\n  "schema_version": 1,\n  "x": ' + _nested(127).encode() + b',\n  "records": {}\n}',
        "recursion limit exceeded",
        None,
        3,
    ),
    BadFile(
        "float_out_of_range_in_details",
        _details_case('{"a": 1e400}'),
        "number out of range",
        "outcome.details.a",
        23,
    ),
    BadFile(
        "integer_out_of_range_in_details",
        _details_case("[1" + "0" * 400 + "]"),
        "number out of range",
        "outcome.details[0]",
        23,
    ),
    BadFile(
        "integer_of_5000_digits",
        _details_case("9" * 5000),
        "number out of range",
        "outcome.details",
        23,
    ),
    BadFile(
        "negative_zero_for_a_u64",
        replace('"conflict_count": 0', '"conflict_count": -0'),
        "invalid type: floating point `-0.0`, expected u64",
        "conflict_count",
        19,
    ),
    BadFile(
        "legacy_bad_record",
        (
            b'{\n  "idem_a": {\n    "record_id": "idem_a",\n    "operation": "op", "key": "k",'
            b' "owner": "o", "request_fingerprint": "fp",\n    "status": "COMPLETED",\n'
            b'    "first_seen_at_ms": 1, "last_seen_at_ms": 1\n  }\n}'
        ),
        "unknown variant `COMPLETED`",
        "status",
        5,
    ),
]
