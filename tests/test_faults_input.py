"""Bad input never gives a traceback, a raw stdlib/driver error or a file the Rust store cannot
read: outcome details and their nesting, numbers the Rust parser changes or refuses, and the
operations' argument checks.

The Rust store reads its file with ``serde_json::from_str::<Value>`` (whole file first), so
its limits count over the whole file: nesting 128 deep is refused (``recursion limit
exceeded``), integers beyond u64 (or below i64) become f64, numbers beyond f64 are refused
(``number out of range``), and an integer ``-0`` is the float ``-0.0``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from idemstore import (
    FileFormatError,
    InvalidInputError,
    Outcome,
    TenantContext,
    export_file,
    import_file,
)
from idemstore.bench import datagen
from idemstore.transfer.reader import read_records
from tests.badfiles import base_record
from tests.conftest import Database
from tests.faultkit import (
    DETAILS_LIMIT,
    RUST_REFUSES_DEPTH,
    max_depth,
    near_recursion_limit,
    nested,
    nested_text,
    one_line_error,
    run_cli,
)

TENANT = TenantContext.local_implicit()


def _reserved(store: Any, key: str = "k") -> None:
    store.reserve(TENANT, "op", key, "owner", "fp")


def test_the_limit_is_derived_from_the_rust_parser() -> None:
    from idemstore import jsonvalue

    assert DETAILS_LIMIT == 123
    assert jsonvalue.MAX_DETAILS_DEPTH == DETAILS_LIMIT
    assert jsonvalue.MAX_DEPTH == RUST_REFUSES_DEPTH - 1


# --------------------------------------------------------------------------------------------
# complete: details deeper than the Rust store reads back are refused


@pytest.mark.parametrize("depth", [DETAILS_LIMIT + 1, 500, 989, 990, 5000])
def test_complete_refuses_details_nested_deeper_than_the_limit(store: Any, depth: int) -> None:
    _reserved(store)
    with pytest.raises(InvalidInputError) as caught:
        store.complete(TENANT, "op", "k", Outcome("done", 1, details=nested(depth)))
    error = caught.value
    assert isinstance(error, ValueError)
    assert "nested" in str(error) and str(DETAILS_LIMIT) in str(error)
    assert "\n" not in str(error)
    record = store.get(TENANT, "op", "k")
    assert record is not None and record.outcome is None  # nothing written


def test_complete_refuses_circular_details(store: Any) -> None:
    _reserved(store)
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(InvalidInputError):
        store.complete(TENANT, "op", "k", Outcome("done", 1, details={"a": loop}))


@pytest.mark.parametrize("value", [10**400, -(10**309)])
def test_complete_refuses_integers_beyond_f64(store: Any, value: int) -> None:
    """serde_json refuses a number beyond f64's range (``number out of range``): an export of
    such details would be a file the Rust store cannot read."""
    _reserved(store)
    with pytest.raises(InvalidInputError) as caught:
        store.complete(TENANT, "op", "k", Outcome("done", 1, details={"n": [1, value]}))
    assert "n[1]" in str(caught.value) and "\n" not in str(caught.value)
    record = store.get(TENANT, "op", "k")
    assert record is not None and record.outcome is None
    big = {"n": [2**64, -(2**64), 10**300]}  # read back by Rust as floats, but readable
    store.complete(TENANT, "op", "k", Outcome("done", 1, details=big))
    record = store.get(TENANT, "op", "k")
    assert record is not None and record.outcome is not None and record.outcome.details == big


def test_details_at_the_limit_read_back_from_a_deep_stack(store: Any) -> None:
    details = nested(DETAILS_LIMIT)
    _reserved(store)
    store.complete(TENANT, "op", "k", Outcome("done", 1, details=details))
    got = near_recursion_limit(lambda: store.get(TENANT, "op", "k"))
    assert got is not None and got.outcome is not None
    assert got.outcome.details == details
    again = near_recursion_limit(lambda: store.reserve(TENANT, "op", "k", "owner", "fp"))
    assert again.record.outcome.details == details  # a Duplicate replays the outcome


def test_complete_at_the_limit_from_a_deep_stack(store: Any) -> None:
    details = nested(DETAILS_LIMIT)
    _reserved(store)
    near_recursion_limit(
        lambda: store.complete(TENANT, "op", "k", Outcome("done", 1, details=details))
    )
    got = store.get(TENANT, "op", "k")
    assert got is not None and got.outcome is not None and got.outcome.details == details


def test_export_at_the_limit_from_a_deep_stack_is_a_file_rust_reads(
    database: Database, tmp_path: Path
) -> None:
    store = database.sync_store()
    try:
        details = nested(DETAILS_LIMIT)
        for key in ("a", "b", "c"):
            _reserved(store, key)
        store.complete(TENANT, "op", "b", Outcome("done", 1, details=details))
        path = tmp_path / "out.json"
        assert near_recursion_limit(lambda: export_file(store, path)) == 3
    finally:
        store.close()
    text = path.read_text()
    assert max_depth(text) == RUST_REFUSES_DEPTH - 1  # as deep as the Rust parser reads
    (deep,) = [r for r in read_records(path) if r.record.outcome is not None]
    assert deep.record.outcome is not None and deep.record.outcome.details == details


def test_cli_get_of_a_record_at_the_limit(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'get.db'}"
    from idemstore import IdempotencyStore

    details = nested(DETAILS_LIMIT)
    with IdempotencyStore.from_url(url, migrate=True) as store:
        _reserved(store)
        store.complete(TENANT, "op", "k", Outcome("done", 1, details=details))
    proc = run_cli("--database-url", url, "get", "op", "k")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outcome"]["details"] == details


# --------------------------------------------------------------------------------------------
# import: the same limit, counted over the whole file


def _record(**outcome: Any) -> dict[str, Any]:
    record = base_record()
    record["status"] = "completed"
    record["outcome"] = {"outcome_kind": "done", "completed_at_ms": 5, **outcome}
    return record


def _versioned_text(record_text: str, *, extra: str = "") -> str:
    return (
        '{\n  "schema_version": 1,'
        + extra
        + '\n  "records": {\n    "idem_a": '
        + record_text
        + "\n  }\n}"
    )


def _with_details(details_text: str, *, legacy: bool = False, unknown: str | None = None) -> str:
    """A one-record file whose details (and optionally an unknown record field ``x``) are the
    given JSON texts; the details sit on their own line."""
    record = _record(details="@@DETAILS@@")
    if unknown is not None:
        record["x"] = "@@UNKNOWN@@"
    body = json.dumps(record, indent=2)
    body = body.replace('"@@DETAILS@@"', details_text).replace('"@@UNKNOWN@@"', unknown or "")
    if legacy:
        return '{\n  "idem_a": ' + body.replace("\n", "\n  ") + "\n}"
    return _versioned_text(body.replace("\n", "\n    "))


def _line_of(text: str, fragment: str) -> int:
    return text[: text.index(fragment)].count("\n") + 1


Importer = Callable[[Path], Any]


@pytest.fixture(params=[0, 2], ids=["in-process", "workers"])
def importer(request: pytest.FixtureRequest, database: Database) -> Any:
    store = database.sync_store()
    workers = request.param

    def run(path: Path) -> Any:
        return import_file(store, path, workers=workers)

    run.store = store  # type: ignore[attr-defined]
    yield run
    store.close()


def _refused(importer: Importer, path: Path) -> FileFormatError:
    with pytest.raises(FileFormatError) as caught:
        importer(path)
    error = caught.value
    assert error.path == str(path) and str(path) in str(error)
    assert error.record_id == "idem_a"
    assert importer.store.stats().total == 0  # type: ignore[attr-defined]
    return error


@pytest.mark.parametrize("legacy", [False, True], ids=["versioned", "legacy"])
def test_import_refuses_details_nested_deeper_than_the_limit(
    importer: Importer, tmp_path: Path, legacy: bool
) -> None:
    text = _with_details(nested_text(DETAILS_LIMIT + 1), legacy=legacy)
    path = tmp_path / "deep.json"
    path.write_text(text)
    error = _refused(importer, path)
    assert error.field == "outcome.details"
    assert error.line == _line_of(text, '"details"')
    assert str(DETAILS_LIMIT) in str(error)


def test_import_at_the_limit_exports_a_file_rust_reads(importer: Importer, tmp_path: Path) -> None:
    path = tmp_path / "limit.json"
    path.write_text(_with_details(nested_text(DETAILS_LIMIT)))
    assert importer(path).inserted == 1
    out = tmp_path / "out.json"
    export_file(importer.store, out)  # type: ignore[attr-defined]
    assert max_depth(out.read_text()) == RUST_REFUSES_DEPTH - 1
    (got,) = read_records(out)
    assert got.record.outcome is not None
    assert got.record.outcome.details == json.loads(nested_text(DETAILS_LIMIT))


@pytest.mark.parametrize("depth", [10_000, 1_000])
def test_import_of_very_deep_nesting_is_refused_with_its_line(
    importer: Importer, tmp_path: Path, depth: int
) -> None:
    text = _with_details(nested_text(depth))
    path = tmp_path / "deeper.json"
    path.write_text(text)
    error = _refused(importer, path)
    assert error.field is not None and error.field.startswith("outcome.details")
    assert error.line == _line_of(text, '"details"')


def test_whole_file_nesting_counts_unknown_fields(importer: Importer, tmp_path: Path) -> None:
    """An ignored field still has to parse: 128 levels anywhere in the file are refused, 127
    are read (here: file, records, record, then the field's own containers)."""
    refused = _with_details("null", unknown=nested_text(RUST_REFUSES_DEPTH - 3))
    assert max_depth(refused) == RUST_REFUSES_DEPTH
    path = tmp_path / "bad.json"
    path.write_text(refused)
    error = _refused(importer, path)
    assert "recursion limit exceeded" in str(error)
    assert error.field == "x"

    readable = _with_details("null", unknown=nested_text(RUST_REFUSES_DEPTH - 1 - 3))
    assert max_depth(readable) == RUST_REFUSES_DEPTH - 1
    path = tmp_path / "ok.json"
    path.write_text(readable)
    assert importer(path).inserted == 1


def test_top_level_unknown_field_nesting(database: Database, tmp_path: Path) -> None:
    store = database.sync_store()
    try:
        record = json.dumps(base_record())
        path = tmp_path / "top.json"
        for depth, refused in ((RUST_REFUSES_DEPTH - 1, True), (RUST_REFUSES_DEPTH - 2, False)):
            text = _versioned_text(record, extra='\n  "x": ' + nested_text(depth) + ",")
            assert max_depth(text) == depth + 1
            path.write_text(text)
            if refused:
                with pytest.raises(FileFormatError) as caught:
                    import_file(store, path)
                assert "recursion limit exceeded" in str(caught.value)
                assert caught.value.line == 3
                assert store.stats().total == 0
            else:
                assert import_file(store, path).inserted == 1
    finally:
        store.close()


# --------------------------------------------------------------------------------------------
# import: numbers as the Rust parser holds them


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("18446744073709551615", 2**64 - 1),
        ("18446744073709551616", 1.8446744073709552e19),
        ("-9223372036854775808", -(2**63)),
        ("-9223372036854775809", -9.223372036854776e18),
        ("-18446744073709551617", -1.8446744073709552e19),
        # serde_json (default features) keeps the first digits that fit a u64 and multiplies
        # by a power of ten in f64: float(9717091003164853852) * 1e2, one ulp above the
        # correctly rounded 9.717091003164854e20.
        ("971709100316485385285", 9.717091003164855e20),
        ("-0", -0.0),
        ("[-0, 0, -0.0]", [-0.0, 0, -0.0]),
    ],
)
def test_import_stores_numbers_as_the_rust_parser_holds_them(
    importer: Importer, tmp_path: Path, text: str, stored: Any
) -> None:
    path = tmp_path / "n.json"
    path.write_text(_with_details(text))
    assert importer(path).inserted == 1
    (record,) = [r.record for r in _exported(importer, tmp_path)]
    assert record.outcome is not None
    assert repr(record.outcome.details) == repr(stored)  # type, value, sign of zero


def _exported(importer: Importer, tmp_path: Path) -> Any:
    out = tmp_path / "exported.json"
    export_file(importer.store, out)  # type: ignore[attr-defined]
    return read_records(out)


@pytest.mark.parametrize(
    "number", ["1e400", "-1e400", "1" * 400, "9" * 5000, "1.5e309", "17976931348623159e292"]
)
def test_import_refuses_numbers_beyond_f64_with_file_line_and_field(
    importer: Importer, tmp_path: Path, number: str
) -> None:
    text = _with_details(
        '{\n            "a": [\n              ' + number + "\n            ]\n          }"
    )
    path = tmp_path / "range.json"
    path.write_text(text)
    error = _refused(importer, path)
    assert "number out of range" in str(error)
    assert error.field == "outcome.details.a[0]"
    assert error.line == _line_of(text, number)


def test_negative_zero_in_a_u64_field_is_refused(importer: Importer, tmp_path: Path) -> None:
    text = json.dumps({"schema_version": 1, "records": {"idem_a": base_record()}}, indent=2)
    text = text.replace('"conflict_count": 0', '"conflict_count": -0')
    path = tmp_path / "z.json"
    path.write_text(text)
    error = _refused(importer, path)
    assert error.field == "conflict_count" and "floating point `-0.0`" in str(error)


def test_chunked_file_with_special_numbers(database: Database, tmp_path: Path) -> None:
    """The bulk path (many records per decode) treats them the same: a -0 and a big integer
    among many ordinary records, in details and in an ignored field."""
    records = datagen.generate_records(600, seed=3)
    path = tmp_path / "many.json"
    datagen.write_versioned_file(path, records)
    with_outcome = sorted(r.record_id for r in records if r.outcome is not None)
    special = {with_outcome[100]: ("-0", -0.0), with_outcome[300]: ("10" + "0" * 19, 1e20)}
    text = path.read_text()
    for rid, (number, _) in special.items():
        start = text.index(f'"{rid}": {{')
        details_at = text.index('"details": ', start)
        end = text.index('\n      },\n      "conflict_count"', details_at)
        text = text[:details_at] + f'"details": {number},\n        "x": [{number}]' + text[end:]
    path.write_text(text)
    store = database.sync_store()
    try:
        for workers in (0, 2):
            report = import_file(store, path, workers=workers, replace=True)
            assert report.read == 600 and report.records_with_unknown_fields == 2
            out = tmp_path / "out.json"
            export_file(store, out)
            got = {r.map_key: r.record for r in read_records(out)}
            for rid, (_, value) in special.items():
                outcome = got[rid].outcome
                assert outcome is not None and repr(outcome.details) == repr(value)
    finally:
        store.close()


# --------------------------------------------------------------------------------------------
# PostgreSQL: what it cannot hold is refused with the file, line, record and field


def test_nul_in_a_key_on_postgresql_names_file_line_and_field(
    make_database: Callable[[str], Database], tmp_path: Path
) -> None:
    store = make_database("postgresql").sync_store()
    try:
        record = base_record()
        record["key"] = "a\u0000b"
        text = json.dumps({"schema_version": 1, "records": {"idem_a": record}}, indent=2)
        path = tmp_path / "nul.json"
        path.write_text(text)
        for workers in (0, 1):
            with pytest.raises(FileFormatError) as caught:
                import_file(store, path, workers=workers)
            error = caught.value
            assert (error.path, error.record_id, error.field) == (str(path), "idem_a", "key")
            assert error.line == _line_of(text, '"key"')
            assert "NUL" in str(error)
        assert store.stats().total == 0
    finally:
        store.close()


def test_nul_in_details_is_kept_on_postgresql(
    make_database: Callable[[str], Database], tmp_path: Path
) -> None:
    store = make_database("postgresql").sync_store()
    try:
        path = tmp_path / "nul.json"
        path.write_text(_with_details('"a\\u0000b"'))
        assert import_file(store, path).inserted == 1
    finally:
        store.close()


# --------------------------------------------------------------------------------------------
# Argument checks of the operations


def test_outcome_kind_with_a_lone_surrogate(store: Any) -> None:
    _reserved(store)
    for outcome in (Outcome("\ud800", 1), Outcome("ok", 1, primary_ref_id="\udfff")):
        with pytest.raises(InvalidInputError):
            store.complete(TENANT, "op", "k", outcome)
    record = store.get(TENANT, "op", "k")
    assert record is not None and record.outcome is None


@pytest.mark.parametrize("batch_size", [2**31, 2**63, 2**70])
def test_purge_batch_size_out_of_range(store: Any, batch_size: int) -> None:
    with pytest.raises(InvalidInputError) as caught:
        store.purge_expired(batch_size=batch_size)
    assert "batch_size" in str(caught.value)
    assert store.purge_expired(batch_size=2**31 - 1) == 0


def test_bad_tenant_source(store: Any) -> None:
    tenant = TenantContext("org", "ws", None, None, "bogus")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError) as caught:
        store.reserve(tenant, "op", "k", "owner", "fp")
    assert "source" in str(caught.value) and "local_implicit" in str(caught.value)


def test_negative_workers_is_bad_input(database: Database, tmp_path: Path) -> None:
    store = database.sync_store()
    try:
        path = tmp_path / "e.json"
        path.write_text("{}")
        with pytest.raises(InvalidInputError):
            import_file(store, path, workers=-1)
    finally:
        store.close()


def test_cli_import_of_deep_and_long_numbers_is_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert run_cli("--database-url", url, "migrate").returncode == 0
    for name, details in (
        ("deep", nested_text(10_000)),
        ("digits", "9" * 5000),
        ("huge", "1e400"),
    ):
        path = tmp_path / f"{name}.json"
        path.write_text(_with_details(details))
        line = one_line_error(run_cli("--database-url", url, "import", str(path)))
        assert str(path) in line and "idem_a" in line and "outcome.details" in line


# --------------------------------------------------------------------------------------------
# The decoders and encoders without recursion agree with Python's (used when those run out of
# stack)


def _random_value(rng: Any, depth: int = 0) -> Any:
    pick = rng.randrange(9 if depth < 6 else 6)
    if pick == 0:
        return None
    if pick == 1:
        return rng.random() < 0.5
    if pick == 2:
        return rng.randint(-(10**25), 10**25)
    if pick == 3:
        return rng.choice([-0.0, 1e-07, 1.5e300, rng.random() * 10 ** rng.randint(-30, 30)])
    if pick in (4, 5):
        return "".join(chr(rng.randrange(0, 0x3000)) for _ in range(rng.randrange(6)))
    if pick in (6, 7):
        return {
            f"k{rng.randrange(30)}": _random_value(rng, depth + 1) for _ in range(rng.randrange(4))
        }
    return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def test_codecs_without_recursion_agree_with_the_recursive_ones() -> None:
    import random

    from idemstore import jsonvalue
    from idemstore.rules import dump_details
    from idemstore.transfer import writer as jsonfile

    rng = random.Random(7)
    values = [_random_value(rng) for _ in range(2000)] + [nested(DETAILS_LIMIT), nested(300)]
    for value in values:
        compact = dump_details(value) if max_depth(json.dumps(value)) <= DETAILS_LIMIT else None
        if compact is not None:
            assert jsonvalue.dumps_compact(value) == compact
        for text in (json.dumps(value), json.dumps(value, indent=1, ensure_ascii=False)):
            decoded, end = jsonvalue.decode_iterative(text)
            assert end == len(text) and json.dumps(decoded) == json.dumps(json.loads(text))
        for sort in (False, True):
            pretty: list[str] = []
            iterative: list[str] = []
            jsonfile._dump(value, "    ", pretty, sort)
            jsonfile._dump_iterative(value, "    ", iterative, sort)
            assert "".join(iterative) == "".join(pretty)
