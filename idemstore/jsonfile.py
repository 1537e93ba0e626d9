"""Streaming reader and writer of the Rust store's JSON idempotency-key file.

The Rust module (``idempotency.rs``) keeps ``{"schema_version": 1, "records": {...}}`` (or,
in old files, a bare ``{"<record_id>": {record}}`` map) and reads it with serde. This module
reads and writes the same files without loading them whole: the top-level object is walked by
hand over a decoded text buffer, and record values are decoded with the C JSON scanner (one at
a time, or many per call where the file's layout shows where records end, see
:meth:`RecordReader._chunk`), then validated the way serde's derived ``Deserialize`` would.

Reading::

    with open_records(path) as reader:
        print(reader.header.form)
        for file_record in reader:
            ...

Every problem raises :class:`~idemstore.errors.FileFormatError` naming the file, the record
(map key), the field as a dotted path (``outcome.completed_at_ms``, ``conflict_fingerprints[1]``)
and the 1-based line. Records already yielded before an error are not taken back: a caller that
imports must do so in one transaction.

Writing (:func:`write_records`) produces what ``serde_json::to_string_pretty`` writes for the
versioned form, records sorted by record id, atomically through ``<path>.tmp``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, NoReturn, TextIO, TypeVar, cast

from . import jsonvalue
from .errors import FileFormatError, InvalidInputError
from .jsonvalue import MAX_DEPTH, MAX_DETAILS_DEPTH, DuplicateKey, OutOfRange, TooDeep
from .model import (
    RECORD_SCHEMA_VERSION,
    U64_MAX,
    IdempotencyRecord,
    JSONValue,
    Outcome,
    RecordStatus,
    TenantContext,
    TenantSource,
)

__all__ = [
    "DETAILS_TOO_DEEP",
    "NUL_REFUSED",
    "SUPPORTED_SCHEMA_VERSION",
    "FileHeader",
    "FileIdentity",
    "FileRecord",
    "RecordProblem",
    "RecordReader",
    "check_record_text",
    "check_unchanged",
    "check_writable",
    "details_value",
    "dumps_records",
    "file_changed",
    "file_identity",
    "open_records",
    "open_regular",
    "plain_value",
    "read_records",
    "record_from_json",
    "record_text",
    "record_to_json",
    "unknown_fields",
    "unreadable",
    "validate_value",
    "write_records",
]

#: The newest file ``schema_version`` this module reads (and the one it writes).
SUPPORTED_SCHEMA_VERSION: Final = 1
U32_MAX: Final = 2**32 - 1

_CHUNK_BYTES: Final = 1 << 20
_READ_AHEAD: Final = 1 << 16
#: The records decoded at once by the chunk path are at least this many characters.
_CHUNK_CHARS: Final = 1 << 16
_JSON_WS: Final = " \t\n\r"
# char::is_whitespace in Rust (Unicode White_Space), used only by the "blank file" rule,
# because the Rust reader tests ``raw.trim().is_empty() || raw.trim() == "{}"``.
_RUST_WS: Final = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_WS_RE: Final = re.compile(r"[ \t\n\r]*")
_COMMA_RE: Final = re.compile(r"[ \t\n\r]*,")
_INDENT_RE: Final = re.compile(r"\n([ \t]*)\Z")
# `, "key": ` where the key has no escapes (the common case of the member loop)
_NEXT_KEY_RE: Final = re.compile(r'[ \t\n\r]*,[ \t\n\r]*"([^"\\\x00-\x1f]*)"[ \t\n\r]*:[ \t\n\r]*')
_NUMBER_RE: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_LEGACY_TENANT: Final = TenantContext.explicit_user_workspace("local", "default", None, "system")
_STATUS: Final = {s.value: s for s in RecordStatus}
_SOURCE: Final = {s.value: s for s in TenantSource}
_EMPTY: Final[tuple[str, ...]] = ()

_RECORD_FIELDS: Final = (
    "schema_version",
    "record_id",
    "tenant_context",
    "operation",
    "key",
    "owner",
    "request_fingerprint",
    "status",
    "first_seen_at_ms",
    "last_seen_at_ms",
    "first_seen_event_id",
    "expires_at_ms",
    "outcome",
    "conflict_count",
    "conflict_fingerprints",
)
_RECORD_FIELD_SET: Final = frozenset(_RECORD_FIELDS)
_TENANT_FIELD_SET: Final = frozenset(
    ("org_id", "workspace_id", "deployment_id", "actor_id", "source")
)
_OUTCOME_FIELDS: Final = (
    "outcome_kind",
    "completed_at_ms",
    "primary_ref_kind",
    "primary_ref_id",
    "secondary_ref_kind",
    "secondary_ref_id",
    "details",
)
_OUTCOME_FIELD_SET: Final = frozenset(_OUTCOME_FIELDS)


# --------------------------------------------------------------------------------------------
# Public values


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One record of a file, as read."""

    #: The key in the records map: what the Rust store looked records up by.
    map_key: str
    record: IdempotencyRecord
    #: 1-based line where the record's value (its ``{``) starts.
    line: int
    #: Dotted paths of unknown fields that were ignored, e.g. ``"outcome.baz"``.
    unknown_fields: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FileHeader:
    """What kind of file this is."""

    form: Literal["empty", "legacy", "versioned"]
    #: Top-level ``schema_version`` of a versioned file, ``None`` otherwise.
    schema_version: int | None
    #: Unknown top-level fields of a versioned file (ignored, like Rust does).
    unknown_fields: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Errors inside a record (converted to FileFormatError with a line by the reader)


class _FieldError(Exception):
    """A record value serde would refuse. ``field`` is a dotted path inside the record."""

    def __init__(
        self, message: str, field: str, *, container: str | None = None, locate: bool = False
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        # For a missing field: the path of the object that lacks it (its line is reported).
        self.container = container
        # A problem of the JSON text itself (nesting, a number out of range): the positional
        # parser finds the exact place, as serde_json reports it while parsing.
        self.locate = locate


#: Raised by a ``convert`` function given to :meth:`RecordReader.convert_each` to refuse a
#: record: ``RecordProblem(message, field)`` (``field`` a dotted path inside the record).
RecordProblem = _FieldError


def validate_value(
    value: object, *, containers: int = 2
) -> tuple[IdempotencyRecord, tuple[str, ...]]:
    """Validate one decoded record value exactly like the reader (serde's rules and messages):
    the record and its unknown fields, or :class:`RecordProblem`. ``containers``: how deep
    the record sits in its file (2 in the versioned form, 1 in the legacy one), for the
    nesting limit the Rust parser counts over the whole file. Big integers in the details
    are replaced (in place) by the float the Rust parser holds."""
    return _convert(value, {}, containers)


def unknown_fields(value: dict[str, Any]) -> tuple[str, ...]:
    """Dotted paths of the fields of a decoded record that serde would ignore, sorted."""
    return _unknown_fields(value)


class _SyntaxProblem(Exception):
    def __init__(self, message: str, field: str, pos: int) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.pos = pos


_DuplicateKey = DuplicateKey


class _Unreadable(Exception):
    """The text of a value is not what serde_json reads (NaN, a number out of range, nesting
    too deep): the reader explains it with the positional parser."""


class _NonFinite(_Unreadable):
    pass


class _OutOfRange(_Unreadable):
    pass


class _TooDeep(_Unreadable):
    pass


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _DuplicateKey
    return d


def _reject_constant(name: str) -> Any:
    raise _NonFinite(name)


def _float(text: str) -> float:
    try:
        return jsonvalue.rust_float(text)
    except OutOfRange:
        raise _OutOfRange(text) from None


def _exact_int(text: str) -> int | float:
    """Integers as serde_json holds them (``-0`` is ``-0.0``): for records whose text holds
    a ``-0``, the only integer Python's decoder reads otherwise."""
    try:
        return jsonvalue.rust_int_text(text)
    except OutOfRange:
        raise _OutOfRange(text) from None


_Scanner = Callable[[str, int], tuple[Any, int]]
T = TypeVar("T")
_RecordsFn = Callable[["_Source", set[str], str, bool], Iterator[T]]
# scan_once is the C scanner behind raw_decode (not in typeshed): value, end = scan(text, idx)
# Every scanner reads numbers as the Rust parser does: a float beyond f64 is refused
# (``_float``); an integer keeps Python's exact value (records whose text holds an integer
# ``-0`` are scanned again with ``_exact_int``, see _neg_zero); details convert theirs.
_HOOKS: Final[dict[str, Any]] = {"parse_constant": _reject_constant, "parse_float": _float}
_SCAN: Final[_Scanner] = json.JSONDecoder(  # type: ignore[attr-defined]
    object_pairs_hook=_pairs_hook, **_HOOKS
).scan_once
_PLAIN_SCAN: Final[_Scanner] = json.JSONDecoder(**_HOOKS).scan_once  # type: ignore[attr-defined]
# The bulk path's scanner: objects come out as tuples of (key, value) pairs (the hook is the C
# type ``tuple``: no Python call per object), which plain_value() turns into dicts, finding
# duplicate keys on the way.
_PAIRS_SCAN: Final[_Scanner] = json.JSONDecoder(  # type: ignore[attr-defined]
    object_pairs_hook=tuple, **_HOOKS
).scan_once
_EXACT: Final[dict[Any, _Scanner]] = {
    scan: json.JSONDecoder(  # type: ignore[attr-defined]
        object_pairs_hook=hook, parse_int=_exact_int, **_HOOKS
    ).scan_once
    for scan, hook in ((_SCAN, _pairs_hook), (_PAIRS_SCAN, tuple))
}


def _iterative(hook: Callable[[Any], Any], parse_int: Callable[[str], Any]) -> _Scanner:
    def scan(text: str, idx: int) -> tuple[Any, int]:
        return jsonvalue.decode_iterative(
            text,
            idx,
            make_object=hook,
            parse_float=_float,
            parse_int=parse_int,
            parse_constant=_reject_constant,
        )

    return scan


# The same decoding without recursion, for a value the C scanner cannot finish on what is left
# of the stack (it recurses per level).
_ITERATIVE: Final[dict[Any, _Scanner]] = {
    _SCAN: _iterative(_pairs_hook, int),
    _PLAIN_SCAN: _iterative(dict, int),
    _PAIRS_SCAN: _iterative(tuple, int),
    _EXACT[_SCAN]: _iterative(_pairs_hook, _exact_int),
    _EXACT[_PAIRS_SCAN]: _iterative(tuple, _exact_int),
}
#: An integer ``-0`` (serde_json's float ``-0.0``), or the same characters inside a string.
_NEG_ZERO_RE: Final = re.compile(r"-0(?![0-9.eE])")
#: A ``\u`` escape: where a lone surrogate or a NUL may hide.
_ESCAPE_RE: Final = re.compile(r"\\u")
_c_scanstring: Final[Callable[[str, int], tuple[str, int]]] = json.decoder.scanstring  # type: ignore[attr-defined]


def _describe(value: object) -> str:
    """serde's ``Unexpected`` wording for a JSON value."""
    if value is None:
        return "null"
    if value is True or value is False:
        return f"boolean `{'true' if value else 'false'}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value!r}`"
    if isinstance(value, str):
        return "string " + json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "sequence"
    return "map"


def plain_value(value: Any, limit: int = MAX_DEPTH) -> Any:
    """A value scanned with objects as tuples of pairs, as plain dicts and lists (without
    recursion); the reader's duplicate-key error (which it reports with the field and line) if
    an object repeats a key, and its nesting error (``recursion limit exceeded``, located by
    the reader) if the value nests deeper than ``limit``."""
    try:
        return jsonvalue.plain_value(value, limit)
    except TooDeep:
        raise _FieldError("recursion limit exceeded", "", locate=True) from None


#: Why details may nest no deeper than MAX_DETAILS_DEPTH (the message says what to fix).
DETAILS_TOO_DEEP: Final = (
    f"nested more than {MAX_DETAILS_DEPTH} levels deep: the Rust store's parser refuses a file "
    f"nested {jsonvalue.RUST_RECURSION_LIMIT} levels deep, and the details of a record sit "
    f"{jsonvalue.DETAILS_CONTAINERS} levels down in the file it reads"
)


def details_value(value: Any, *, copy: bool = False) -> Any:
    """Decoded outcome details (objects as dicts or as tuples of pairs) as the Rust store's
    parser holds them: integers beyond u64 / below i64 as the f64 it reads, plain dicts; or
    :class:`RecordProblem` for details nested deeper than MAX_DETAILS_DEPTH or a number beyond
    f64. ``copy``: leave ``value`` untouched (else lists are changed in place)."""
    field = "outcome.details"
    try:
        return jsonvalue.plain_value(value, MAX_DETAILS_DEPTH, rust_numbers=True, copy=copy)
    except TooDeep:
        raise _FieldError(DETAILS_TOO_DEEP, field) from None
    except OutOfRange:
        raise _FieldError("number out of range", field, locate=True) from None


def check_record_text(value: Any, containers: int) -> None:
    """A record with fields serde ignores: they still have to parse (nesting, numbers)."""
    try:
        jsonvalue.check_value(value, MAX_DEPTH - containers)
    except TooDeep:
        raise _FieldError("recursion limit exceeded", "", locate=True) from None
    except OutOfRange:
        raise _FieldError("number out of range", "", locate=True) from None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# --------------------------------------------------------------------------------------------
# Record conversion (serde semantics)


def _missing(path: str, name: str) -> _FieldError:
    return _FieldError(f"missing field `{name}`", _join(path, name), container=path)


def _req_str(d: dict[str, Any], name: str, path: str) -> str:
    v = d.get(name, _MISSING)
    if type(v) is str:
        return v
    if v is _MISSING:
        raise _missing(path, name)
    raise _FieldError(f"invalid type: {_describe(v)}, expected a string", _join(path, name))


def _opt_str(d: dict[str, Any], name: str, path: str) -> str | None:
    v = d.get(name)
    if v is None or type(v) is str:
        return v
    raise _FieldError(f"invalid type: {_describe(v)}, expected a string", _join(path, name))


def _check_uint(v: object, name: str, bits: int) -> int:
    limit = U64_MAX if bits == 64 else U32_MAX
    if type(v) is int:
        if 0 <= v <= limit:
            return v
        raise _FieldError(f"invalid value: integer `{v}`, expected u{bits}", name)
    raise _FieldError(f"invalid type: {_describe(v)}, expected u{bits}", name)


class _Missing:
    pass


_MISSING: Final = _Missing()


def _tenant_from(
    v: object, path: str, cache: dict[tuple[Any, ...], TenantContext]
) -> TenantContext:
    if type(v) is not dict:
        raise _FieldError(f"invalid type: {_describe(v)}, expected struct TenantContext", path)
    d = cast(dict[str, Any], v)
    org = _req_str(d, "org_id", path)
    ws = _req_str(d, "workspace_id", path)
    dep = _opt_str(d, "deployment_id", path)
    actor = _opt_str(d, "actor_id", path)
    raw_source = d.get("source", "local_implicit")
    source = _SOURCE.get(raw_source) if type(raw_source) is str else None
    if source is None:
        field = _join(path, "source")
        if type(raw_source) is str:
            raise _FieldError(
                f"unknown variant `{raw_source}`, expected `local_implicit` or `explicit`", field
            )
        raise _FieldError(f"invalid type: {_describe(raw_source)}, expected enum", field)
    key = (org, ws, dep, actor, source)
    tenant = cache.get(key)
    if tenant is None:
        tenant = TenantContext(org, ws, dep, actor, source)
        if len(cache) < 10_000:
            cache[key] = tenant
    return tenant


def _outcome_from(v: object, path: str, *, copy: bool = False) -> Outcome:
    if type(v) is not dict:
        raise _FieldError(
            f"invalid type: {_describe(v)}, expected struct IdempotencyKeyOutcome", path
        )
    d = cast(dict[str, Any], v)
    kind = _req_str(d, "outcome_kind", path)
    completed = d.get("completed_at_ms", _MISSING)
    if completed is _MISSING:
        raise _missing(path, "completed_at_ms")
    completed_at = _check_uint(completed, _join(path, "completed_at_ms"), 64)
    return Outcome(
        kind,
        completed_at,
        _opt_str(d, "primary_ref_kind", path),
        _opt_str(d, "primary_ref_id", path),
        _opt_str(d, "secondary_ref_kind", path),
        _opt_str(d, "secondary_ref_id", path),
        details_value(d.get("details"), copy=copy),
    )


def _unknown_fields(d: dict[str, Any]) -> tuple[str, ...]:
    out: list[str] = []
    for k in d.keys() - _RECORD_FIELD_SET:
        out.append(k)
    tc = d.get("tenant_context")
    if type(tc) is dict:
        out.extend("tenant_context." + k for k in tc.keys() - _TENANT_FIELD_SET)
    oc = d.get("outcome")
    if type(oc) is dict:
        out.extend("outcome." + k for k in oc.keys() - _OUTCOME_FIELD_SET)
    return tuple(sorted(out))


def _convert(
    v: object,
    cache: dict[tuple[Any, ...], TenantContext],
    containers: int = 2,
    *,
    copy: bool = False,
) -> tuple[IdempotencyRecord, tuple[str, ...]]:
    """Validate one decoded record value like serde; return it and its unknown fields.
    ``containers``: how deep the record sits in the file (see :func:`validate_value`)."""
    if type(v) is not dict:
        raise _FieldError(f"invalid type: {_describe(v)}, expected struct IdempotencyKeyRecord", "")
    d = cast(dict[str, Any], v)
    g = d.get
    sv = g("schema_version", RECORD_SCHEMA_VERSION)
    if type(sv) is not int or not 0 <= sv <= U32_MAX:
        _check_uint(sv, "schema_version", 32)
    record_id = _req_str(d, "record_id", "")
    tc = g("tenant_context", _MISSING)
    tenant = _LEGACY_TENANT if tc is _MISSING else _tenant_from(tc, "tenant_context", cache)
    operation = _req_str(d, "operation", "")
    key = _req_str(d, "key", "")
    owner = _req_str(d, "owner", "")
    fingerprint = _req_str(d, "request_fingerprint", "")
    raw_status = g("status", _MISSING)
    status = _STATUS.get(raw_status) if type(raw_status) is str else None
    if status is None:
        if raw_status is _MISSING:
            raise _missing("", "status")
        if type(raw_status) is str:
            raise _FieldError(
                f"unknown variant `{raw_status}`, expected one of "
                "`reserved`, `completed`, `conflicted`",
                "status",
            )
        raise _FieldError(f"invalid type: {_describe(raw_status)}, expected enum", "status")
    first = g("first_seen_at_ms", _MISSING)
    if type(first) is not int or not 0 <= first <= U64_MAX:
        if first is _MISSING:
            raise _missing("", "first_seen_at_ms")
        _check_uint(first, "first_seen_at_ms", 64)
    last = g("last_seen_at_ms", _MISSING)
    if type(last) is not int or not 0 <= last <= U64_MAX:
        if last is _MISSING:
            raise _missing("", "last_seen_at_ms")
        _check_uint(last, "last_seen_at_ms", 64)
    event_id = _opt_str(d, "first_seen_event_id", "")
    expires = g("expires_at_ms")
    if expires is not None and (type(expires) is not int or not 0 <= expires <= U64_MAX):
        _check_uint(expires, "expires_at_ms", 64)
    raw_outcome = g("outcome")
    outcome = None if raw_outcome is None else _outcome_from(raw_outcome, "outcome", copy=copy)
    count = g("conflict_count", 0)
    if type(count) is not int or not 0 <= count <= U64_MAX:
        _check_uint(count, "conflict_count", 64)
    raw_fps = g("conflict_fingerprints", _EMPTY)
    if raw_fps is _EMPTY:
        fps: tuple[str, ...] = _EMPTY
    else:
        if type(raw_fps) is not list:
            raise _FieldError(
                f"invalid type: {_describe(raw_fps)}, expected a sequence",
                "conflict_fingerprints",
            )
        for i, fp in enumerate(raw_fps):
            if type(fp) is not str:
                raise _FieldError(
                    f"invalid type: {_describe(fp)}, expected a string",
                    f"conflict_fingerprints[{i}]",
                )
        fps = tuple(raw_fps)
    record = IdempotencyRecord(
        schema_version=sv,
        record_id=record_id,
        tenant_context=tenant,
        operation=operation,
        key=key,
        owner=owner,
        request_fingerprint=fingerprint,
        status=status,
        first_seen_at_ms=first,
        last_seen_at_ms=last,
        first_seen_event_id=event_id,
        expires_at_ms=expires,
        outcome=outcome,
        conflict_count=count,
        conflict_fingerprints=fps,
    )
    if len(d) <= 15 and d.keys() <= _RECORD_FIELD_SET:
        tc_ok = type(tc) is not dict or tc.keys() <= _TENANT_FIELD_SET
        oc_ok = type(raw_outcome) is not dict or raw_outcome.keys() <= _OUTCOME_FIELD_SET
        if tc_ok and oc_ok:
            return record, _EMPTY
    check_record_text(d, containers)
    return record, _unknown_fields(d)


def _bad_text(s: str) -> bool:
    if s.isascii():
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _find_surrogate(value: object, path: str) -> str | None:
    """Path of the first string (or key) holding a lone surrogate, which UTF-8 cannot hold
    (without recursion)."""
    stack: list[tuple[object, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if _bad_text(item):
                return where
        elif isinstance(item, list):
            stack.extend((x, f"{where}[{i}]") for i, x in reversed(list(enumerate(item))))
        elif isinstance(item, dict):
            members = []
            for k, x in item.items():
                sub = _join(where, k)
                if _bad_text(k):
                    members.append((k, sub))
                    break
                members.append((x, sub))
            stack.extend(reversed(members))
    return None


#: Text fields of a record (dotted paths): what PostgreSQL stores in ``text`` columns, which
#: cannot hold NUL (details are stored as JSON, where NUL stays an escape).
_TEXT_FIELDS: Final = (
    "record_id",
    "tenant_context.org_id",
    "tenant_context.workspace_id",
    "tenant_context.deployment_id",
    "tenant_context.actor_id",
    "operation",
    "key",
    "owner",
    "request_fingerprint",
    "first_seen_event_id",
    "outcome.outcome_kind",
    "outcome.primary_ref_kind",
    "outcome.primary_ref_id",
    "outcome.secondary_ref_kind",
    "outcome.secondary_ref_id",
)


def _find_nul(record: dict[str, Any]) -> str | None:
    """The dotted path of the first text field of a (plain) record holding NUL, or None."""
    for name in _TEXT_FIELDS:
        head, _, tail = name.partition(".")
        value = record.get(head)
        if tail:
            value = value.get(tail) if type(value) is dict else None
        if type(value) is str and "\x00" in value:
            return name
    fingerprints = record.get("conflict_fingerprints")
    if type(fingerprints) is list:
        for i, fp in enumerate(fingerprints):
            if type(fp) is str and "\x00" in fp:
                return f"conflict_fingerprints[{i}]"
    return None


#: The message for NUL in a text field when the database is PostgreSQL.
NUL_REFUSED: Final = (
    "text containing NUL (\\u0000) cannot be stored in PostgreSQL (only in details)"
)


def record_from_json(value: object, *, map_key: str | None = None) -> IdempotencyRecord:
    """Build a record from an already-decoded JSON value, with the reader's validation.

    Raises :class:`FileFormatError` (with ``record_id=map_key`` and the field, no line). Unknown
    fields are ignored; duplicate keys cannot be seen here (``json.loads`` already merged them).
    """
    try:
        record, _ = _convert(value, {}, copy=True)
    except _FieldError as exc:
        raise FileFormatError(exc.message, record_id=map_key, field=exc.field or None) from None
    except DuplicateKey:  # pragma: no cover - json.loads merges duplicate keys
        raise FileFormatError("duplicate field", record_id=map_key) from None
    bad = _find_surrogate(value, "")
    if bad is not None:
        raise FileFormatError(
            "lone surrogate in string escape", record_id=map_key, field=bad or None
        )
    return record


# --------------------------------------------------------------------------------------------
# Positional slow parser: used only to explain an error (where is the duplicate key, which line
# holds the bad value). Values are parsed with positions; nothing here is on the fast path.


def _pskip_ws(text: str, i: int) -> int:
    m = _WS_RE.match(text, i)
    assert m is not None
    return m.end()


#: The field a nesting error names: the record field it is under (``outcome.details`` for
#: details), not the path down to the 128th level.
_TOP_FIELD_RE: Final = re.compile(r"(?:(?:outcome|tenant_context)\.)?[^.\[]*")


def _top_field(path: str) -> str:
    m = _TOP_FIELD_RE.match(path)
    return m.group() if m is not None and m.group() else path


def _pparse(
    text: str,
    i: int,
    path: str,
    positions: dict[str, int],
    starts: dict[str, int],
    depth: int = 0,
) -> int:
    """Parse one value at ``text[i:]``; fill ``positions[path]`` (value start). Return its end.
    ``depth``: containers around the value in the file (the Rust parser's nesting count)."""
    i = _pskip_ws(text, i)
    positions.setdefault(path, i)
    c = text[i : i + 1]
    if (c == "{" or c == "[") and depth >= MAX_DEPTH:
        raise _SyntaxProblem("recursion limit exceeded", _top_field(path), i)
    if c == "{":
        starts.setdefault(path, i)
        i = _pskip_ws(text, i + 1)
        if text[i : i + 1] == "}":
            return i + 1
        seen: set[str] = set()
        while True:
            if text[i : i + 1] != '"':
                raise _SyntaxProblem("expected a string key", path, i)
            try:
                key, j = _c_scanstring(text, i + 1)
            except json.JSONDecodeError as exc:
                raise _SyntaxProblem(exc.msg, path, exc.pos) from None
            sub = _join(path, key)
            if key in seen:
                raise _SyntaxProblem(f"duplicate field `{key}`", sub, i)
            seen.add(key)
            j = _pskip_ws(text, j)
            if text[j : j + 1] != ":":
                raise _SyntaxProblem("expected ':'", path, j)
            i = _pskip_ws(text, _pparse(text, j + 1, sub, positions, starts, depth + 1))
            c = text[i : i + 1]
            if c == ",":
                i = _pskip_ws(text, i + 1)
                continue
            if c == "}":
                return i + 1
            raise _SyntaxProblem("expected ',' or '}'", path, i)
    if c == "[":
        i = _pskip_ws(text, i + 1)
        if text[i : i + 1] == "]":
            return i + 1
        n = 0
        while True:
            i = _pskip_ws(text, _pparse(text, i, f"{path}[{n}]", positions, starts, depth + 1))
            n += 1
            c = text[i : i + 1]
            if c == ",":
                i += 1
                continue
            if c == "]":
                return i + 1
            raise _SyntaxProblem("expected ',' or ']'", path, i)
    if c == '"':
        try:
            _, j = _c_scanstring(text, i + 1)
        except json.JSONDecodeError as exc:
            raise _SyntaxProblem(exc.msg, path, exc.pos) from None
        return int(j)
    for literal in ("true", "false", "null"):
        if text.startswith(literal, i):
            return i + len(literal)
    m = _NUMBER_RE.match(text, i)
    if m is not None:
        try:
            jsonvalue.check_number(m.group())
        except OutOfRange:
            raise _SyntaxProblem("number out of range", path, i) from None
        return m.end()
    for literal in ("NaN", "Infinity", "-Infinity"):
        if text.startswith(literal, i):
            raise _SyntaxProblem(f"{literal} is not valid JSON", path, i)
    raise _SyntaxProblem("expected a JSON value", path, i)


# --------------------------------------------------------------------------------------------
# Opening: regular files only, and the same file from start to end

#: What identifies the file a reader (or an import) started with:
#: ``(st_dev, st_ino, st_size, st_mtime_ns)``.
FileIdentity = tuple[int, int, int, int]

_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def unreadable(path: str, error: OSError) -> FileFormatError:
    """The error for a file that cannot be opened or measured."""
    return FileFormatError(f"cannot read the file: {error.strerror}", path=path)


def file_changed(path: str) -> FileFormatError:
    """The error for a file that changed (size, mtime, or another file at its path) while it
    was read."""
    return FileFormatError(
        "the file changed while it was read (its size, modification time or identity is not "
        "what it was when reading began); stop every writer of the file, or read a copy",
        path=path,
    )


def _identity(st: os.stat_result) -> FileIdentity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def open_regular(path: str, expect: FileIdentity | None = None) -> tuple[Any, FileIdentity]:
    """``(binary file, identity)``: ``path`` opened for reading, if it is a regular file (and,
    given ``expect``, still that file, unchanged). Never blocks: a FIFO, a directory or a
    device is refused (FileFormatError, one line), not waited on."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        raise unreadable(path, error) from None
    try:
        st = os.fstat(fd)
        for test, kind in _KINDS:
            if test(st.st_mode):
                raise FileFormatError(
                    f"not a regular file ({kind}): only regular files are read; copy it to one",
                    path=path,
                )
        identity = _identity(st)
        if expect is not None and identity != expect:
            raise file_changed(path)
        return os.fdopen(fd, "rb"), identity
    except BaseException:
        os.close(fd)
        raise


def check_unchanged(path: str, identity: FileIdentity) -> None:
    """:func:`file_changed` unless the file at ``path`` still has ``identity``."""
    try:
        now = _identity(os.stat(path))
    except OSError:
        raise file_changed(path) from None
    if now != identity:
        raise file_changed(path)


def file_identity(path: str | os.PathLike[str]) -> FileIdentity:
    """The identity of a regular file that can be read (see :func:`open_regular`)."""
    file, identity = open_regular(os.fspath(path))
    file.close()
    return identity


# --------------------------------------------------------------------------------------------
# Buffered text source with line tracking


class _Source:
    """A file decoded to text chunk by chunk (strict UTF-8), with a cursor and line numbers.

    Only a regular file is read (see :func:`open_regular`), and it must stay the same file:
    :meth:`check_unchanged` at the end compares it with what was opened (``expect``, if
    given, is checked at open)."""

    def __init__(
        self,
        path: str,
        start: int = 0,
        stop: int | None = None,
        expect: FileIdentity | None = None,
    ) -> None:
        self.path = path
        self._file, self.identity = open_regular(path, expect)
        if start:
            self._file.seek(start)
        self._start = start
        self._left = None if stop is None else stop - start  # bytes of the range not yet read
        self.buf = ""
        self.pos = 0
        self.base = 0  # absolute char offset of buf[0] (from ``start``)
        self.eof = False
        self._pending = b""
        self.keep_from = 0  # absolute offset that compaction must keep (a key being read)
        self._line = 1  # line number at absolute offset self._labs, counted from ``start``
        self._labs = 0
        self._lines_before: int | None = 0 if start == 0 else None  # newlines before start

    def close(self) -> None:
        self._file.close()

    def check_unchanged(self) -> None:
        """:func:`file_changed` if the open file's size or mtime, or the file at its path, is
        not what was opened."""
        try:
            now = _identity(os.fstat(self._file.fileno()))
            at_path = _identity(os.stat(self.path))
        except OSError:
            raise file_changed(self.path) from None
        if now != self.identity or at_path != self.identity:
            raise file_changed(self.path)

    @property
    def bytes_read(self) -> int:
        """Bytes of the file read so far (from the start of the file)."""
        return 0 if self._file.closed else self._file.tell()

    def error(self, message: str, *, at: int | None = None, **kw: Any) -> FileFormatError:
        """An error at absolute char offset ``at`` (default: the cursor)."""
        line = self.line_at(self.base + self.pos if at is None else at)
        return FileFormatError(message, path=self.path, line=line, **kw)

    def line_at(self, abs_pos: int) -> int:
        """The 1-based line of the file at absolute char offset ``abs_pos`` (near the cursor)."""
        if self._lines_before is None:  # a range that starts mid-file: count what is before
            # Read from the file already open (not by path: it may have been replaced since).
            count = 0
            left = self._start
            back = self._file.tell()
            self._file.seek(0)
            while left > 0 and (block := self._file.read(min(_CHUNK_BYTES, left))):
                count += block.count(b"\n")
                left -= len(block)
            self._file.seek(back)
            self._lines_before = count
        return self._advance(abs_pos) + self._lines_before

    def _advance(self, abs_pos: int) -> int:
        lo = self._labs - self.base
        hi = abs_pos - self.base
        if hi >= lo:
            self._line += self.buf.count("\n", lo, hi)
        else:
            self._line -= self.buf.count("\n", hi, lo)
        self._labs = abs_pos
        return self._line

    def fill(self) -> bool:
        """Read one more chunk; False at end of file (or of the range)."""
        if self.eof:
            return False
        size = _CHUNK_BYTES if self._left is None else min(_CHUNK_BYTES, self._left)
        data = self._file.read(size) if size else b""
        if self._left is not None:
            self._left -= len(data)
        raw = self._pending + data
        if not data:
            self.eof = True
            if raw:
                self._utf8_error(raw, len(raw) - len(self._pending))
            return False
        try:
            text = raw.decode("utf-8")
            self._pending = b""
        except UnicodeDecodeError as exc:
            if exc.end == len(raw) and exc.reason == "unexpected end of data":
                text = raw[: exc.start].decode("utf-8")
                self._pending = raw[exc.start :]
            else:
                self._utf8_error(raw, exc.start)
        # Compact: drop what is consumed (remember line numbers first).
        cut = max(0, min(self.pos, self.keep_from - self.base))
        self._advance(self.base + cut)
        self.base += cut
        self.buf = self.buf[cut:] + text
        self.pos -= cut
        return True

    def exhausted(self) -> bool:
        """Whether the cursor is at the end of the file (or of the range)."""
        return self.pos >= len(self.buf) and not self.fill()

    def _utf8_error(self, raw: bytes, start: int) -> None:
        line = self.line_at(self.base + len(self.buf)) + raw[:start].count(b"\n")
        raise FileFormatError(
            f"stream did not contain valid UTF-8 (byte offset {start} of this chunk)",
            path=self.path,
            line=line,
        )

    def _truncated(self, exc: json.JSONDecodeError) -> bool:
        """Whether a decode error may only mean the buffer ends too early."""
        if self.eof:
            return False
        return exc.pos >= len(self.buf) - 16 or exc.msg.startswith("Unterminated string")

    def ensure(self, n: int) -> None:
        while len(self.buf) - self.pos < n and self.fill():
            pass

    def peek(self) -> str:
        """Skip JSON whitespace; return the next char ('' at end of file)."""
        buf, pos = self.buf, self.pos
        if pos < len(buf) and buf[pos] not in _JSON_WS:
            return buf[pos]
        while True:
            m = _WS_RE.match(self.buf, self.pos)
            assert m is not None
            self.pos = m.end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return ""

    def expect(self, ch: str, what: str) -> None:
        c = self.peek()
        if c != ch:
            raise self._unexpected(c, what)
        self.pos += 1

    def _unexpected(self, c: str, what: str) -> FileFormatError:
        if c == "":
            return self.error(f"unexpected end of file, expected {what} (truncated JSON?)")
        return self.error(f"expected {what}, found {c!r}")

    def string(self) -> str:
        """Read a JSON string at the cursor (which is on its opening quote)."""
        while True:
            try:
                s, end = _c_scanstring(self.buf, self.pos + 1)
            except json.JSONDecodeError as exc:
                if self._truncated(exc) and self.fill():
                    continue
                if exc.msg.startswith("Unterminated string"):
                    raise self.error(
                        "unexpected end of file inside a string (truncated JSON?)"
                    ) from None
                raise self.error(f"invalid JSON: {exc.msg}", at=self.base + exc.pos) from None
            self.pos = end
            return s

    def value(
        self,
        scan: Callable[[str, int], tuple[Any, int]] = _PLAIN_SCAN,
        *,
        depth: int = 1,
    ) -> Any:
        """Decode one whole JSON value at the cursor (already on its first char). ``depth``:
        containers around it in the file (the Rust parser's nesting count)."""
        if len(self.buf) - self.pos < _READ_AHEAD and not self.eof:
            self.ensure(_READ_AHEAD)
        while True:
            try:
                try:
                    value, end = scan(self.buf, self.pos)
                except StopIteration as stop:  # what raw_decode turns into "Expecting value"
                    raise json.JSONDecodeError("Expecting value", self.buf, stop.value) from None
                except RecursionError:
                    # The C scanner recurses per level: nested too deep for the Rust parser,
                    # or too deep for what is left of this thread's stack.
                    too_deep = jsonvalue.first_too_deep(self.buf, self.pos, None, MAX_DEPTH - depth)
                    if too_deep is None and scan in _ITERATIVE:
                        scan = _ITERATIVE[scan]
                        continue
                    if scan is not _PLAIN_SCAN:
                        raise _TooDeep from None  # the record reader explains it
                    at = self.base + (self.pos if too_deep is None else too_deep)
                    raise self.error("recursion limit exceeded", at=at) from None
            except json.JSONDecodeError as exc:
                if self._truncated(exc) and self.fill():
                    continue
                if exc.pos >= len(self.buf.rstrip(_JSON_WS)) or exc.msg.startswith("Unterminated"):
                    raise self.error(
                        "unexpected end of file (truncated JSON?)", at=self.base + exc.pos
                    ) from None
                raise self.error(f"invalid JSON: {exc.msg}", at=self.base + exc.pos) from None
            except ValueError as exc:  # an integer too long for int(): beyond f64 in any case
                if isinstance(exc, FileFormatError):
                    raise
                if scan is not _PLAIN_SCAN and scan is not _ITERATIVE[_PLAIN_SCAN]:
                    raise _OutOfRange from None
                self.explain_plain(self.pos, depth)
            except _Unreadable:
                if scan is not _PLAIN_SCAN and scan is not _ITERATIVE[_PLAIN_SCAN]:
                    raise  # the record reader explains it with the field
                self.explain_plain(self.pos, depth)
            if end >= len(self.buf) and self.fill():
                continue  # a number may go on in the next chunk
            self.pos = end
            return value

    def explain_plain(self, start: int, depth: int) -> NoReturn:
        """The error for a value outside a record (at ``buf[start:]``, ``depth`` containers
        down) that the Rust parser refuses."""
        try:
            _pparse(self.buf, start, "", {}, {}, depth)
        except _SyntaxProblem as problem:
            raise self.error(problem.message, at=self.base + problem.pos) from None
        raise self.error("NaN and Infinity are not valid JSON", at=self.base + start)


def _members(src: _Source, what: str, *, after_value: bool) -> Iterator[tuple[str, int]]:
    """Walk an object's members. Yields (key, key_pos) with the cursor on the value; the
    consumer must consume the value. ``after_value``: the cursor is after a member's value."""
    if after_value:
        c = src.peek()
    else:
        c = src.peek()
        if c == "}":
            src.pos += 1
            return
    first = not after_value
    while True:
        if not first:
            # Fast path: `, "plain key": ` all in the buffer, in one C-level regex match.
            m = _NEXT_KEY_RE.match(src.buf, src.pos)
            if m is not None and m.end() < len(src.buf):
                key_pos = src.base + m.start(1) - 1
                src.keep_from = key_pos
                src.pos = m.end()
                yield m.group(1), key_pos
                c = src.peek()
                continue
            if c == "}":
                src.pos += 1
                return
            if c != ",":
                raise src._unexpected(c, f"',' or '}}' in {what}")
            src.pos += 1
            c = src.peek()
        first = False
        if c != '"':
            raise src._unexpected(c, f"a string key in {what}")
        key_pos = src.base + src.pos
        src.keep_from = key_pos
        key = src.string()
        src.expect(":", "':'")
        if not src.peek():
            raise src._unexpected("", "a JSON value")
        yield key, key_pos
        c = src.peek()


def _neg_zero(buf: str, start: int, end: int) -> bool:
    """Whether ``buf[start:end]`` (JSON text) may hold the integer ``-0`` (a ``-0`` after
    ``:``, ``[`` or ``,``; possibly inside a string, which only costs an exact decode)."""
    m = _NEG_ZERO_RE.search(buf, start, end)
    while m is not None:
        i = m.start() - 1
        while i >= start and buf[i] in _JSON_WS:
            i -= 1
        if i >= start and buf[i] in ":[,":
            return True
        m = _NEG_ZERO_RE.search(buf, m.end(), end)
    return False


def _record_boundary(src: _Source) -> str:
    """The text that ends a record followed by another in this file's layout: a newline, the
    indent of the closing brace of the record just read (the cursor is after it), ``},``.
    ``""`` when that brace does not start its line (a compact file: no chunk path)."""
    line_start = src.buf.rfind("\n", 0, src.pos - 1)
    m = _INDENT_RE.match(src.buf[line_start : src.pos - 1]) if line_start != -1 else None
    return "" if m is None else "\n" + m.group(1) + "},"


def _skip_value(src: _Source, depth: int = 1) -> None:
    """Skip one value with bounded memory (objects are walked member by member), checking it
    as the Rust parser reads it. ``depth``: containers around it in the file."""
    if src.peek() == "{":
        src.ensure(_READ_AHEAD)
        try:
            value, end = _PLAIN_SCAN(src.buf, src.pos)
        except (StopIteration, ValueError, _Unreadable, RecursionError):
            pass
        else:
            if end < len(src.buf):
                _check_skipped(src, value, src.base + src.pos, depth)
                src.pos = end
                return
        if depth >= MAX_DEPTH:
            raise src.error("recursion limit exceeded")
        src.pos += 1
        for _key, _pos in _members(src, "object", after_value=False):
            _skip_value(src, depth + 1)
        return
    at = src.base + src.pos
    _check_skipped(src, src.value(depth=depth), at, depth)


def _check_skipped(src: _Source, value: Any, at: int, depth: int) -> None:
    """A value outside the records (ignored) must still parse: nesting and numbers."""
    try:
        jsonvalue.check_value(value, MAX_DEPTH - depth)
    except (TooDeep, OutOfRange):
        src.explain_plain(at - src.base, depth)


# --------------------------------------------------------------------------------------------
# The reader


def _check_top_version(src: _Source, value: object, at: int) -> int:
    if type(value) is not int or not 0 <= value <= U32_MAX:
        try:
            _check_uint(value, "schema_version", 32)
        except _FieldError as exc:
            raise src.error(exc.message, field="schema_version", at=at) from None
    version = cast(int, value)
    if version > SUPPORTED_SCHEMA_VERSION:
        raise src.error(
            f"idempotency keys schema version {version} is newer than supported version "
            f"{SUPPORTED_SCHEMA_VERSION}",
            field="schema_version",
            at=at,
        )
    return version


def _rust_blank(src: _Source) -> bool:
    """Rust's ``raw.trim().is_empty() || raw.trim() == "{}"`` for what is left of the file."""
    state = 0  # 0: leading ws, 1: saw '{', 2: saw '{}' then trailing ws
    while True:
        while src.pos < len(src.buf):
            c = src.buf[src.pos]
            if state == 1:
                if c != "}":
                    return False
                state = 2
            elif c == "{" and state == 0:
                state = 1
            elif c not in _RUST_WS:
                return False
            src.pos += 1
        if not src.fill():
            return state != 1


class RecordReader:
    """An open JSON key file: :attr:`header`, then iterate for :class:`FileRecord` (once).

    Opening reads the start of the file (and, unless the first top-level key is
    ``schema_version`` as in every file Rust writes, makes one cheap pass over the whole
    top level first, to find out whether it is the legacy or the versioned form). A newer
    ``schema_version`` is refused at open, before any record is yielded.

    Use as a context manager, or exhaust the iterator, so the file gets closed.

    A part of a versioned file can be read on its own (the importer's parse workers each read
    one): ``start`` is the byte offset just inside the ``records`` object or of the comma after
    one of its records, and ``stop`` (if given) the offset of such a comma, where reading ends
    cleanly. A part that does not start or end where a record does fails like a broken file.
    Line numbers stay those of the whole file.

    Only a regular file is read, never waiting on a FIFO or a device; ``expect`` (see
    :func:`file_identity`) must match the file when it is opened, and whatever was opened must
    be unchanged (size, mtime, the file at its path) when the last record has been read:
    :class:`~idemstore.errors.FileFormatError` otherwise. ``forbid_nul``: refuse NUL in the
    record fields a PostgreSQL ``text`` column holds (for :meth:`convert_each`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        start: int = 0,
        stop: int | None = None,
        expect: FileIdentity | None = None,
        forbid_nul: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        self._src = _Source(self.path, start, stop, expect)
        self._forbid_nul = forbid_nul
        self._form: Literal["empty", "legacy", "versioned"] = "empty"
        self._version: int | None = None
        self._top_unknown: list[str] = []
        self._top_seen: set[str] = set()
        self._after_value = False
        self._prescanned = False
        self._started = False
        # A part of the records (see above): where it starts, whether it ends before the file.
        self._part_start = start
        self._part_stop = stop is not None
        self._part_done = False
        if start:
            self._form = "versioned"
            self._version = SUPPORTED_SCHEMA_VERSION
            self._top_seen = {"schema_version", "records"}
            return
        try:
            self._open()
        except BaseException:
            self._src.close()
            raise

    @property
    def header(self) -> FileHeader:
        """The file's form and version. Unknown top-level fields placed after ``records`` in a
        file whose first key is ``schema_version`` are only known once iteration has ended."""
        return FileHeader(self._form, self._version, tuple(self._top_unknown))

    @property
    def bytes_read(self) -> int:
        """How far into the file reading has got, in bytes (for progress reports)."""
        return self._src.bytes_read

    @property
    def containers(self) -> int:
        """How deep a record sits in this file: the top-level object (legacy), and the
        ``records`` map (versioned)."""
        return 1 if self._form == "legacy" else 2

    def _open(self) -> None:
        src = self._src
        c = src.peek()
        if c == "" or c in _RUST_WS:
            if _rust_blank(src):
                return
            raise src.error("expected a JSON value, found a non-JSON character")
        if c != "{":
            found = _describe(src.value()) if c in '"[-0123456789tfn' else repr(c)
            raise src.error(f"invalid type: {found}, expected a JSON object at the top level")
        src.ensure(_READ_AHEAD)
        mark = src.pos
        if src.buf.startswith("{}", src.pos):
            src.pos += 2
            if _rust_blank(src):
                return
            src.pos = mark
        src.pos += 1
        first = src.peek()
        if first == "}":
            src.pos += 1
            self._check_trailing()
            return
        if first != '"':
            raise src._unexpected(first, "a string key in the top-level object")
        key_abs = src.base + src.pos
        key = src.string()
        if key == "schema_version":
            # The form Rust writes: versioned, version first. No first pass needed.
            src.expect(":", "':'")
            src.peek()
            at = src.base + src.pos
            self._version = _check_top_version(src, src.value(), at)
            self._form = "versioned"
            self._top_seen.add("schema_version")
            self._after_value = True
            return
        # Legacy, or versioned with schema_version further on: find out with a first pass.
        src.pos = key_abs - src.base
        self._prepass()
        self._src.close()
        self._src = _Source(self.path, expect=self._src.identity)
        self._src.expect("{", "'{'")

    def _prepass(self) -> None:
        src = self._src
        any_key = False
        version_seen = False
        for key, _pos in _members(src, "the top-level object", after_value=False):
            any_key = True
            if key not in ("schema_version", "records"):
                self._top_unknown.append(key)
            if key == "schema_version" and not version_seen:
                version_seen = True
                at = src.base + src.pos
                self._version = _check_top_version(src, src.value(), at)
            else:
                _skip_value(src)
        self._check_trailing()
        if version_seen:
            self._form = "versioned"
            self._prescanned = True
        else:
            self._top_unknown.clear()
            self._form = "legacy" if any_key else "empty"

    def _check_trailing(self) -> None:
        src = self._src
        c = src.peek()
        if c != "":
            raise src.error(f"trailing characters after the top-level object: {c!r}")

    def close(self) -> None:
        self._src.close()

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[FileRecord]:
        if self._started:
            raise RuntimeError("a RecordReader can be iterated only once")
        self._started = True
        return self._iterate()

    def convert_each(
        self,
        convert: Callable[[str, Any], T],
        chunk: Callable[[tuple[tuple[str, Any], ...]], list[T] | None] | None = None,
    ) -> Iterator[T]:
        """Iterate (once, instead of ``iter(reader)``) yielding ``convert(map_key, value)``.

        The fast path for bulk work: ``value`` is the record as decoded by the C scanner with
        objects as tuples of ``(key, value)`` pairs (a plain ``dict`` instead when it holds
        ``\\u`` escapes, after the check for lone surrogates; non-finite numbers are refused
        here). ``convert`` validates it and raises :class:`RecordProblem` (see
        :func:`validate_value` for serde's exact message) when the record is refused, or lets the
        reader's duplicate-key error through (:func:`plain_value`); the reader turns either into
        a :class:`FileFormatError` with the field and line.

        ``chunk``, if given, takes the pairs of many records at once (``((map_key, record),
        ...)``, found in the file's own layout, see :meth:`_chunk`) and returns their converted
        items, or None to have them read one by one instead (which then reports any error).
        """
        if self._started:
            raise RuntimeError("a RecordReader can be iterated only once")
        self._started = True

        def records(src: _Source, seen_ids: set[str], what: str, after: bool) -> Iterator[T]:
            return self._converted(convert, chunk, src, seen_ids, what, after)

        return self._iterate(records)

    def _iterate(self, records: _RecordsFn[T] | None = None) -> Iterator[Any]:
        if records is None:

            def records(src: _Source, seen_ids: set[str], what: str, after: bool) -> Iterator[Any]:
                return self._records(src, seen_ids, what, after=after)

        try:
            yield from self._top_level(records)
            if self._form != "empty":
                self._src.check_unchanged()
        finally:
            self._src.close()

    def _top_level(self, records: _RecordsFn[T]) -> Iterator[Any]:
        if self._form == "empty":
            return
        src = self._src
        seen_ids: set[str] = set()
        if self._form == "legacy":
            yield from records(src, seen_ids, "the top-level object", False)
            self._check_trailing()
            return
        after_value = self._after_value
        if self._part_start:
            # A part: inside ``records`` already (just after its brace, or at a comma).
            after = src.peek() == ","
            yield from records(src, seen_ids, "records", after)
            if self._part_done:
                return
            after_value = True
        for key, key_pos in _members(src, "the top-level object", after_value=after_value):
            if key in self._top_seen:
                raise src.error(f"duplicate field `{key}`", at=key_pos, field=key)
            self._top_seen.add(key)
            if key == "schema_version":
                at = src.base + src.pos
                _check_top_version(src, src.value(), at)
            elif key == "records":
                if src.peek() != "{":
                    v = src.value()
                    raise src.error(
                        f"invalid type: {_describe(v)}, expected a map", field="records"
                    )
                src.pos += 1
                yield from records(src, seen_ids, "records", False)
                if self._part_done:
                    return
            else:
                if not self._prescanned:
                    self._top_unknown.append(key)
                _skip_value(src)
        self._check_trailing()

    def _record_value(self, src: _Source, scan: _Scanner, map_key: str) -> tuple[Any, int]:
        """Decode the record value at the cursor: ``(value, start)`` (its offset in
        ``src.buf``), integers read exactly when its text may hold a ``-0``; what serde_json
        would refuse in its text is explained (FileFormatError with field and line)."""
        abs_start = src.base + src.pos
        try:
            value = src.value(scan, depth=self.containers)
            start = abs_start - src.base  # src.buf may have been compacted by value()
            if _neg_zero(src.buf, start, src.pos):
                value, _ = _EXACT[scan](src.buf, start)
        except (_DuplicateKey, _Unreadable):
            raise self._explain(src, map_key, None, start=abs_start - src.base) from None
        return value, start

    def _records(
        self, src: _Source, seen_ids: set[str], what: str, *, after: bool
    ) -> Iterator[FileRecord]:
        cache: dict[tuple[Any, ...], TenantContext] = {}
        for map_key, key_pos in _members(src, what, after_value=after):
            if map_key in seen_ids:
                raise src.error(
                    f"duplicate record id {map_key!r} in {what}", at=key_pos, record_id=map_key
                )
            seen_ids.add(map_key)
            value, start = self._record_value(src, _SCAN, map_key)
            line = src.line_at(src.base + start)
            try:
                record, unknown = _convert(value, cache, self.containers)
            except _FieldError as exc:
                raise self._explain(src, map_key, exc, start=start, line=line) from None
            if _ESCAPE_RE.search(src.buf, start, src.pos) is not None or not map_key.isascii():
                bad = _find_surrogate(map_key, "")
                if bad is not None:
                    raise src.error(
                        "lone surrogate in string escape", at=key_pos, record_id=map_key
                    )
                bad = _find_surrogate(value, "")
                if bad is not None:
                    problem = _FieldError("lone surrogate in string escape", bad)
                    raise self._explain(src, map_key, problem, start=start, line=line)
            yield FileRecord(map_key, record, line, unknown)

    def _converted(
        self,
        convert: Callable[[str, Any], T],
        chunk: Callable[[tuple[tuple[str, Any], ...]], list[T] | None] | None,
        src: _Source,
        seen_ids: set[str],
        what: str,
        after: bool,
    ) -> Iterator[T]:
        boundary: str | None = None
        retry_at = 0  # absolute offset before which the chunk path is not tried again
        part_stop = self._part_stop
        forbid_nul = self._forbid_nul
        limit = MAX_DEPTH - self.containers
        for map_key, key_pos in _members(src, what, after_value=after):
            if map_key in seen_ids:
                raise src.error(
                    f"duplicate record id {map_key!r} in {what}", at=key_pos, record_id=map_key
                )
            seen_ids.add(map_key)
            value, start = self._record_value(src, _PAIRS_SCAN, map_key)
            buf, end = src.buf, src.pos
            try:
                if (
                    _ESCAPE_RE.search(buf, start, end) is not None
                    or not map_key.isascii()
                    or (forbid_nul and "\x00" in map_key)
                ):
                    if _find_surrogate(map_key, "") is not None:
                        raise src.error(
                            "lone surrogate in string escape", at=key_pos, record_id=map_key
                        )
                    if forbid_nul and "\x00" in map_key:
                        raise src.error(NUL_REFUSED, at=key_pos, record_id=map_key)
                    value = plain_value(value, limit)
                    bad = _find_surrogate(value, "")
                    if bad is not None:
                        problem = _FieldError("lone surrogate in string escape", bad)
                        raise self._explain(src, map_key, problem, start=start)
                    bad = _find_nul(value) if forbid_nul and type(value) is dict else None
                    if bad is not None:
                        raise self._explain(
                            src, map_key, _FieldError(NUL_REFUSED, bad), start=start
                        )
                converted = convert(map_key, value)
            except _DuplicateKey:
                raise self._explain(src, map_key, None, start=start) from None
            except _FieldError as exc:
                raise self._explain(src, map_key, exc, start=start) from None
            yield converted
            # Then as many chunks as the file allows, until the end of this part.
            while True:
                if part_stop and src.exhausted():
                    self._part_done = True
                    return
                if chunk is None or src.base + src.pos < retry_at:
                    break
                if boundary is None:
                    boundary = _record_boundary(src)
                if not boundary:
                    break
                items, retry_at = self._chunk(src, chunk, boundary, seen_ids)
                if items is None:
                    break  # record by record up to where that chunk would have ended
                yield from items

    def _chunk(
        self,
        src: _Source,
        chunk: Callable[[tuple[tuple[str, Any], ...]], list[T] | None],
        boundary: str,
        seen_ids: set[str],
    ) -> tuple[list[T] | None, int]:
        """The fast path: many records after the cursor decoded in one call, or None (and the
        cursor unmoved) when they cannot be taken that way; and the absolute offset where the
        chunk ends (or would have ended).

        The cursor is just after a record's value. The chunk ends at the next ``boundary`` (a
        newline, the indent of that record's closing brace, ``},``) at least
        :data:`_CHUNK_CHARS` ahead. A newline cannot occur inside a JSON string, so the cut is
        structural; it is a record's end if and only if the members up to it, wrapped in
        braces, decode as one whole object.
        """
        src.ensure(_CHUNK_CHARS + _READ_AHEAD)
        buf, pos, base = src.buf, src.pos, src.base
        m = _COMMA_RE.match(buf, pos)
        if m is None:
            return None, base + len(buf)
        cut = buf.find(boundary, pos + _CHUNK_CHARS)
        if cut == -1:
            cut = buf.rfind(boundary, m.end())
            if cut == -1:
                return None, base + len(buf)
        stop = cut + len(boundary) - 1  # the comma after the last record of the chunk
        if _ESCAPE_RE.search(buf, m.end(), stop) is not None or _neg_zero(buf, m.end(), stop):
            # Escapes may hide lone surrogates (or NUL), a -0 needs exact integers: checked
            # record by record.
            return None, base + stop
        text = "{" + buf[m.end() : stop] + "}"
        try:
            pairs, end = _PAIRS_SCAN(text, 0)
        except (StopIteration, ValueError, _Unreadable, RecursionError):
            return None, base + stop
        if end != len(text) or type(pairs) is not tuple or not pairs:
            return None, base + stop
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys) or not seen_ids.isdisjoint(keys):
            return None, base + stop
        items = chunk(pairs)
        if items is None:
            return None, base + stop
        seen_ids.update(keys)
        src.pos = stop
        src.keep_from = base + stop
        return items, base + stop

    def _explain(
        self,
        src: _Source,
        map_key: str,
        exc: _FieldError | None,
        *,
        start: int | None = None,
        line: int | None = None,
    ) -> FileFormatError:
        """Turn a fast-path failure into a FileFormatError with the exact field and line."""
        if start is None:
            start = src.pos
        if line is None:
            line = src.line_at(src.base + start)
        text = src.buf
        positions: dict[str, int] = {}
        starts: dict[str, int] = {}
        try:
            _pparse(text, start, "", positions, starts, self.containers)
        except _SyntaxProblem as problem:
            if exc is None or exc.locate:
                at = line + text.count("\n", start, problem.pos)
                return FileFormatError(
                    problem.message,
                    path=self.path,
                    record_id=map_key,
                    field=problem.field or None,
                    line=at,
                )
        if exc is None:  # pragma: no cover - the slow parser found nothing
            return FileFormatError("invalid record", path=self.path, record_id=map_key, line=line)
        if exc.container is not None:
            pos = starts.get(exc.container, start)
        else:
            pos = positions.get(exc.field, start)
        at = line + text.count("\n", start, pos)
        return FileFormatError(
            exc.message, path=self.path, record_id=map_key, field=exc.field or None, line=at
        )


def open_records(path: str | os.PathLike[str]) -> RecordReader:
    """Open a JSON key file for streaming. See :class:`RecordReader`."""
    return RecordReader(path)


def read_records(path: str | os.PathLike[str]) -> list[FileRecord]:
    """Read a whole (small) file into a list."""
    with open_records(path) as reader:
        return list(reader)


# --------------------------------------------------------------------------------------------
# Writing: serde_json::to_string_pretty


def record_to_json(record: IdempotencyRecord) -> dict[str, JSONValue]:
    """The record as serde would serialise it: Rust field order, ``skip_serializing_if``."""
    t = record.tenant_context
    tenant: dict[str, JSONValue] = {"org_id": t.org_id, "workspace_id": t.workspace_id}
    if t.deployment_id is not None:
        tenant["deployment_id"] = t.deployment_id
    if t.actor_id is not None:
        tenant["actor_id"] = t.actor_id
    tenant["source"] = TenantSource(t.source).value
    d: dict[str, JSONValue] = {
        "schema_version": record.schema_version,
        "record_id": record.record_id,
        "tenant_context": tenant,
        "operation": record.operation,
        "key": record.key,
        "owner": record.owner,
        "request_fingerprint": record.request_fingerprint,
        "status": RecordStatus(record.status).value,
        "first_seen_at_ms": record.first_seen_at_ms,
        "last_seen_at_ms": record.last_seen_at_ms,
    }
    if record.first_seen_event_id is not None:
        d["first_seen_event_id"] = record.first_seen_event_id
    if record.expires_at_ms is not None:
        d["expires_at_ms"] = record.expires_at_ms
    o = record.outcome
    if o is not None:
        out: dict[str, JSONValue] = {
            "outcome_kind": o.outcome_kind,
            "completed_at_ms": o.completed_at_ms,
        }
        if o.primary_ref_kind is not None:
            out["primary_ref_kind"] = o.primary_ref_kind
        if o.primary_ref_id is not None:
            out["primary_ref_id"] = o.primary_ref_id
        if o.secondary_ref_kind is not None:
            out["secondary_ref_kind"] = o.secondary_ref_kind
        if o.secondary_ref_id is not None:
            out["secondary_ref_id"] = o.secondary_ref_id
        out["details"] = o.details
        d["outcome"] = out
    d["conflict_count"] = record.conflict_count
    if record.conflict_fingerprints:
        d["conflict_fingerprints"] = list(record.conflict_fingerprints)
    return d


_encode_str: Final[Callable[[str], str]] = json.encoder.encode_basestring


def _format_float(value: float) -> str:
    """serde_json's (ryu's) rendering of a finite f64."""
    if not math.isfinite(value):
        raise InvalidInputError(f"cannot write {value!r}: JSON has no NaN or Infinity")
    if value == 0.0:
        return "-0.0" if math.copysign(1.0, value) < 0 else "0.0"
    sign = "-" if value < 0 else ""
    mantissa, _, exp_text = repr(abs(value)).partition("e")
    exp = int(exp_text) if exp_text else 0
    int_part, _, frac_part = mantissa.partition(".")
    digits = (int_part + frac_part).lstrip("0")
    # position of the decimal point relative to the start of `digits`
    point = (
        len(int_part.lstrip("0")) + exp
        if int_part != "0"
        else exp - (len(frac_part) - len(frac_part.lstrip("0")))
    )
    digits = digits.rstrip("0") or "0"
    n = len(digits)
    k = point - n  # value = digits * 10**k
    if k >= 0 and point <= 16:
        return f"{sign}{digits}{'0' * k}.0"
    if 0 < point <= 16:
        return f"{sign}{digits[:point]}.{digits[point:]}"
    if -5 < point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    e = point - 1
    if n == 1:
        return f"{sign}{digits}e{e}"
    return f"{sign}{digits[0]}.{digits[1:]}e{e}"


def _dump(value: object, indent: str, out: list[str], sort: bool) -> None:
    """Append ``value`` in serde_json's pretty format; ``indent`` is the current line indent."""
    if isinstance(value, str):
        out.append(_encode_str(value))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(str(int(value)))
    elif isinstance(value, float):
        out.append(_format_float(value))
    elif isinstance(value, dict):
        if not value:
            out.append("{}")
            return
        inner = indent + "  "
        items = sorted(value.items()) if sort else value.items()
        out.append("{")
        sep = "\n"
        for k, v in items:
            if not isinstance(k, str):
                raise InvalidInputError(f"JSON object keys must be strings, not {k!r}")
            out.append(f"{sep}{inner}{_encode_str(k)}: ")
            _dump(v, inner, out, sort)
            sep = ",\n"
        out.append(f"\n{indent}}}")
    elif isinstance(value, list | tuple):
        if not value:
            out.append("[]")
            return
        inner = indent + "  "
        out.append("[")
        sep = "\n"
        for v in value:
            out.append(f"{sep}{inner}")
            _dump(v, inner, out, sort)
            sep = ",\n"
        out.append(f"\n{indent}]")
    else:
        raise InvalidInputError(f"cannot write {type(value).__name__} as JSON")


_END: Final[Any] = object()


def _dump_iterative(value: object, indent: str, out: list[str], sort: bool) -> None:
    """:func:`_dump` without recursion (for values deeper than the stack allows it)."""
    # Open containers: (their members, is an object, the indent of their line).
    stack: list[tuple[Iterator[Any], bool, str]] = []
    current: Any = value
    here = indent
    while True:
        if isinstance(current, dict) and current:
            inner = here + "  "
            members: Iterator[Any] = iter(sorted(current.items()) if sort else current.items())
            k, current = next(members)
            if not isinstance(k, str):
                raise InvalidInputError(f"JSON object keys must be strings, not {k!r}")
            out.append(f"{{\n{inner}{_encode_str(k)}: ")
            stack.append((members, True, here))
            here = inner
            continue
        if isinstance(current, list | tuple) and current:
            inner = here + "  "
            members = iter(current)
            current = next(members)
            out.append(f"[\n{inner}")
            stack.append((members, False, here))
            here = inner
            continue
        _dump(current, here, out, sort)  # a scalar or an empty container: no recursion
        while stack:
            members, is_object, outer = stack[-1]
            item: Any = next(members, _END)
            if item is _END:
                stack.pop()
                out.append(f"\n{outer}}}" if is_object else f"\n{outer}]")
                continue
            here = outer + "  "
            if is_object:
                k, current = item
                if not isinstance(k, str):
                    raise InvalidInputError(f"JSON object keys must be strings, not {k!r}")
                out.append(f",\n{here}{_encode_str(k)}: ")
            else:
                current = item
                out.append(f",\n{here}")
            break
        else:
            return


def _dump_details(
    details: object, indent: str, out: list[str], record_id: str, *, for_rust: bool
) -> None:
    """Append outcome details (keys sorted). ``for_rust``: refuse details the Rust store could
    not read back (nested more than MAX_DETAILS_DEPTH deep: possible only in a database
    written before idemstore checked it)."""
    mark = len(out)
    try:
        _dump(details, indent, out, True)
    except RecursionError:  # deep details, and not enough stack left for _dump
        del out[mark:]
        _dump_iterative(details, indent, out, True)
    if (
        for_rust
        and sum(part.count("[") + part.count("{") for part in out[mark:]) > MAX_DETAILS_DEPTH
    ):
        text = "".join(out[mark:])
        if jsonvalue.first_too_deep(text, limit=MAX_DETAILS_DEPTH) is not None:
            raise InvalidInputError(
                f"record {record_id!r}: outcome details {DETAILS_TOO_DEEP}; fix or delete "
                "the record, then write the file again"
            )


def record_text(record: IdempotencyRecord) -> str:
    """One record as the Rust store writes it in its file (``serde_json`` pretty form), for
    showing it (whatever its details)."""
    return _record_text(record, "", for_rust=False)


def _record_text(record: IdempotencyRecord, indent: str, *, for_rust: bool = True) -> str:
    d = record_to_json(record)
    details: object = _MISSING
    outcome = d.get("outcome")
    if isinstance(outcome, dict):
        details = outcome.pop("details")
    out: list[str] = []
    # Struct fields keep their order; only `details` (a serde_json Value) is sorted.
    inner = indent + "  "
    out.append("{")
    sep = "\n"
    for k, v in d.items():
        out.append(f"{sep}{inner}{_encode_str(k)}: ")
        if k == "outcome" and isinstance(v, dict):
            inner2 = inner + "  "
            out.append("{")
            for k2, v2 in v.items():
                out.append(f"\n{inner2}{_encode_str(k2)}: ")
                _dump(v2, inner2, out, False)
                out.append(",")
            out.append(f'\n{inner2}"details": ')
            _dump_details(details, inner2, out, record.record_id, for_rust=for_rust)
            out.append(f"\n{inner}}}")
        else:
            _dump(v, inner, out, False)
        sep = ",\n"
    out.append(f"\n{indent}}}")
    return "".join(out)


def _ordered(records: Iterable[IdempotencyRecord]) -> Iterator[IdempotencyRecord]:
    if isinstance(records, Sequence):
        records = sorted(records, key=lambda r: r.record_id)
    previous: str | None = None
    for record in records:
        if previous is not None and record.record_id <= previous:
            what = "duplicate" if record.record_id == previous else "out-of-order"
            raise InvalidInputError(
                f"{what} record id {record.record_id!r}: an iterator given to write_records "
                "must yield records in strictly ascending record_id order"
            )
        previous = record.record_id
        yield record


def _write_stream(out: TextIO, records: Iterable[IdempotencyRecord]) -> int:
    count = 0
    write = out.write
    write('{\n  "schema_version": 1,\n  "records": {')
    sep = "\n"
    for record in _ordered(records):
        write(f"{sep}    {_encode_str(record.record_id)}: {_record_text(record, '    ')}")
        sep = ",\n"
        count += 1
    write("\n  }\n}" if count else "}\n}")
    return count


def dumps_records(records: Iterable[IdempotencyRecord]) -> str:
    """The whole versioned file as a string (for small stores and tests)."""
    import io

    buf = io.StringIO()
    _write_stream(buf, records)
    return buf.getvalue()


def _cannot_write(path: str, reason: str) -> InvalidInputError:
    return InvalidInputError(f"cannot write {path}: {reason}")


def check_writable(path: str) -> None:
    """:class:`InvalidInputError` (one line) if ``path`` clearly cannot be written: it is a
    directory, or its folder does not exist."""
    if os.path.isdir(path):
        raise _cannot_write(path, "it is a directory; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise _cannot_write(path, f"no such folder {folder}")


def write_records(path: str | os.PathLike[str], records: Iterable[IdempotencyRecord]) -> int:
    """Write a versioned file atomically, one record at a time; return the record count.

    A sequence (list, tuple) is sorted by record id; any other iterable must already yield
    records in strictly ascending ``record_id`` order (e.g. ``ORDER BY record_id`` with a binary
    collation), which is checked. The text goes to ``<path>.tmp``, is flushed and fsynced, then
    renamed over ``path``, and the directory is fsynced, like the Rust store does.
    A path that cannot be written raises :class:`InvalidInputError` (one line; no file left).
    """
    target = os.fspath(path)
    check_writable(target)
    tmp = target + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8", errors="strict", newline="\n") as out:
            count = _write_stream(out, records)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise _cannot_write(target, error.strerror or str(error)) from None
        raise
    directory = os.path.dirname(os.path.abspath(target))
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return count
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return count
