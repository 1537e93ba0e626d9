"""Serde's rules and messages for one record: the precise path.

:func:`convert_record` validates a decoded record value exactly as serde's derived
``Deserialize`` of the Rust module would (field types, ranges, enum variants, defaults of
missing fields, ``null`` as absent) and builds the :class:`~idemstore.model.IdempotencyRecord`;
:class:`RecordProblem` names the field. :func:`parse_positions` reads a record's text with
positions, to say on which line a refused field is (only to explain an error).
"""

from __future__ import annotations

import json
import re
from typing import Any, Final, cast

from .. import jsonvalue
from ..errors import FileFormatError
from ..jsonvalue import MAX_DEPTH, MAX_DETAILS_DEPTH, DuplicateKey, OutOfRange, TooDeep
from ..model import (
    RECORD_SCHEMA_VERSION,
    U64_MAX,
    IdempotencyRecord,
    Outcome,
    TenantContext,
)
from ..rules import DETAILS_TOO_DEEP, U32_MAX
from .fields import (
    LEGACY_TENANT,
    OUTCOME_FIELD_SET,
    RECORD_FIELD_SET,
    SOURCE,
    STATUS,
    TENANT_FIELD_SET,
    TEXT_FIELDS,
)
from .scan import NUMBER_RE, WS_RE, scanstring

_EMPTY: Final[tuple[str, ...]] = ()


class RecordProblem(Exception):
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


def validate_value(
    value: object, *, containers: int = 2
) -> tuple[IdempotencyRecord, tuple[str, ...]]:
    """Validate one decoded record value exactly like the reader (serde's rules and messages):
    the record and its unknown fields, or :class:`RecordProblem`. ``containers``: how deep
    the record sits in its file (2 in the versioned form, 1 in the legacy one), for the
    nesting limit the Rust parser counts over the whole file. Big integers in the details
    are replaced (in place) by the float the Rust parser holds."""
    return convert_record(value, {}, containers)


def unknown_fields(value: dict[str, Any]) -> tuple[str, ...]:
    """Dotted paths of the fields of a decoded record that serde would ignore, sorted."""
    return _unknown_fields(value)


class SyntaxProblem(Exception):
    """A record's text that serde_json refuses, at ``pos`` (field ``field``)."""

    def __init__(self, message: str, field: str, pos: int) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.pos = pos


def describe(value: object) -> str:
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
        raise RecordProblem("recursion limit exceeded", "", locate=True) from None


def details_value(value: Any, *, copy: bool = False) -> Any:
    """Decoded outcome details (objects as dicts or as tuples of pairs) as the Rust store's
    parser holds them: integers beyond u64 / below i64 as the f64 it reads, plain dicts; or
    :class:`RecordProblem` for details nested deeper than MAX_DETAILS_DEPTH or a number beyond
    f64. ``copy``: leave ``value`` untouched (else lists are changed in place)."""
    field = "outcome.details"
    try:
        return jsonvalue.plain_value(value, MAX_DETAILS_DEPTH, rust_numbers=True, copy=copy)
    except TooDeep:
        raise RecordProblem(DETAILS_TOO_DEEP, field) from None
    except OutOfRange:
        raise RecordProblem("number out of range", field, locate=True) from None


def check_record_text(value: Any, containers: int) -> None:
    """A record with fields serde ignores: they still have to parse (nesting, numbers)."""
    try:
        jsonvalue.check_value(value, MAX_DEPTH - containers)
    except TooDeep:
        raise RecordProblem("recursion limit exceeded", "", locate=True) from None
    except OutOfRange:
        raise RecordProblem("number out of range", "", locate=True) from None


def join_path(path: str, name: str) -> str:
    """The dotted path of field ``name`` inside ``path``."""
    return f"{path}.{name}" if path else name


# --------------------------------------------------------------------------------------------
# Record conversion (serde semantics)


def _missing(path: str, name: str) -> RecordProblem:
    return RecordProblem(f"missing field `{name}`", join_path(path, name), container=path)


def _req_str(d: dict[str, Any], name: str, path: str) -> str:
    v = d.get(name, _MISSING)
    if type(v) is str:
        return v
    if v is _MISSING:
        raise _missing(path, name)
    raise RecordProblem(f"invalid type: {describe(v)}, expected a string", join_path(path, name))


def _opt_str(d: dict[str, Any], name: str, path: str) -> str | None:
    v = d.get(name)
    if v is None or type(v) is str:
        return v
    raise RecordProblem(f"invalid type: {describe(v)}, expected a string", join_path(path, name))


def check_uint(v: object, name: str, bits: int) -> int:
    """``v`` if it is a u32/u64 (``bits``), else serde's :class:`RecordProblem` for
    field ``name``."""
    limit = U64_MAX if bits == 64 else U32_MAX
    if type(v) is int:
        if 0 <= v <= limit:
            return v
        raise RecordProblem(f"invalid value: integer `{v}`, expected u{bits}", name)
    raise RecordProblem(f"invalid type: {describe(v)}, expected u{bits}", name)


class _Missing:
    pass


_MISSING: Final = _Missing()


def _tenant_from(
    v: object, path: str, cache: dict[tuple[Any, ...], TenantContext]
) -> TenantContext:
    if type(v) is not dict:
        raise RecordProblem(f"invalid type: {describe(v)}, expected struct TenantContext", path)
    d = cast(dict[str, Any], v)
    org = _req_str(d, "org_id", path)
    ws = _req_str(d, "workspace_id", path)
    dep = _opt_str(d, "deployment_id", path)
    actor = _opt_str(d, "actor_id", path)
    raw_source = d.get("source", "local_implicit")
    source = SOURCE.get(raw_source) if type(raw_source) is str else None
    if source is None:
        field = join_path(path, "source")
        if type(raw_source) is str:
            raise RecordProblem(
                f"unknown variant `{raw_source}`, expected `local_implicit` or `explicit`", field
            )
        raise RecordProblem(f"invalid type: {describe(raw_source)}, expected enum", field)
    key = (org, ws, dep, actor, source)
    tenant = cache.get(key)
    if tenant is None:
        tenant = TenantContext(org, ws, dep, actor, source)
        if len(cache) < 10_000:
            cache[key] = tenant
    return tenant


def _outcome_from(v: object, path: str, *, copy: bool = False) -> Outcome:
    if type(v) is not dict:
        raise RecordProblem(
            f"invalid type: {describe(v)}, expected struct IdempotencyKeyOutcome", path
        )
    d = cast(dict[str, Any], v)
    kind = _req_str(d, "outcome_kind", path)
    completed = d.get("completed_at_ms", _MISSING)
    if completed is _MISSING:
        raise _missing(path, "completed_at_ms")
    completed_at = check_uint(completed, join_path(path, "completed_at_ms"), 64)
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
    for k in d.keys() - RECORD_FIELD_SET:
        out.append(k)
    tc = d.get("tenant_context")
    if type(tc) is dict:
        out.extend("tenant_context." + k for k in tc.keys() - TENANT_FIELD_SET)
    oc = d.get("outcome")
    if type(oc) is dict:
        out.extend("outcome." + k for k in oc.keys() - OUTCOME_FIELD_SET)
    return tuple(sorted(out))


# Over 80 lines on purpose: serde's derived Deserialize is one pass over the fields in their
# declared order, and so is this (each field's rule and message beside the next one's).
def convert_record(
    v: object,
    cache: dict[tuple[Any, ...], TenantContext],
    containers: int = 2,
    *,
    copy: bool = False,
) -> tuple[IdempotencyRecord, tuple[str, ...]]:
    """Validate one decoded record value like serde; return it and its unknown fields.
    ``containers``: how deep the record sits in the file (see :func:`validate_value`)."""
    if type(v) is not dict:
        raise RecordProblem(
            f"invalid type: {describe(v)}, expected struct IdempotencyKeyRecord", ""
        )
    d = cast(dict[str, Any], v)
    g = d.get
    sv = g("schema_version", RECORD_SCHEMA_VERSION)
    if type(sv) is not int or not 0 <= sv <= U32_MAX:
        check_uint(sv, "schema_version", 32)
    record_id = _req_str(d, "record_id", "")
    tc = g("tenant_context", _MISSING)
    tenant = LEGACY_TENANT if tc is _MISSING else _tenant_from(tc, "tenant_context", cache)
    operation = _req_str(d, "operation", "")
    key = _req_str(d, "key", "")
    owner = _req_str(d, "owner", "")
    fingerprint = _req_str(d, "request_fingerprint", "")
    raw_status = g("status", _MISSING)
    status = STATUS.get(raw_status) if type(raw_status) is str else None
    if status is None:
        if raw_status is _MISSING:
            raise _missing("", "status")
        if type(raw_status) is str:
            raise RecordProblem(
                f"unknown variant `{raw_status}`, expected one of "
                "`reserved`, `completed`, `conflicted`",
                "status",
            )
        raise RecordProblem(f"invalid type: {describe(raw_status)}, expected enum", "status")
    first = g("first_seen_at_ms", _MISSING)
    if type(first) is not int or not 0 <= first <= U64_MAX:
        if first is _MISSING:
            raise _missing("", "first_seen_at_ms")
        check_uint(first, "first_seen_at_ms", 64)
    last = g("last_seen_at_ms", _MISSING)
    if type(last) is not int or not 0 <= last <= U64_MAX:
        if last is _MISSING:
            raise _missing("", "last_seen_at_ms")
        check_uint(last, "last_seen_at_ms", 64)
    event_id = _opt_str(d, "first_seen_event_id", "")
    expires = g("expires_at_ms")
    if expires is not None and (type(expires) is not int or not 0 <= expires <= U64_MAX):
        check_uint(expires, "expires_at_ms", 64)
    raw_outcome = g("outcome")
    outcome = None if raw_outcome is None else _outcome_from(raw_outcome, "outcome", copy=copy)
    count = g("conflict_count", 0)
    if type(count) is not int or not 0 <= count <= U64_MAX:
        check_uint(count, "conflict_count", 64)
    raw_fps = g("conflict_fingerprints", _EMPTY)
    if raw_fps is _EMPTY:
        fps: tuple[str, ...] = _EMPTY
    else:
        if type(raw_fps) is not list:
            raise RecordProblem(
                f"invalid type: {describe(raw_fps)}, expected a sequence",
                "conflict_fingerprints",
            )
        for i, fp in enumerate(raw_fps):
            if type(fp) is not str:
                raise RecordProblem(
                    f"invalid type: {describe(fp)}, expected a string",
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
    if len(d) <= 15 and d.keys() <= RECORD_FIELD_SET:
        tc_ok = type(tc) is not dict or tc.keys() <= TENANT_FIELD_SET
        oc_ok = type(raw_outcome) is not dict or raw_outcome.keys() <= OUTCOME_FIELD_SET
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


def find_surrogate(value: object, path: str) -> str | None:
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
                sub = join_path(where, k)
                if _bad_text(k):
                    members.append((k, sub))
                    break
                members.append((x, sub))
            stack.extend(reversed(members))
    return None


def find_nul(record: dict[str, Any]) -> str | None:
    """The dotted path of the first text field of a (plain) record holding NUL, or None."""
    for name in TEXT_FIELDS:
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


def record_from_json(value: object, *, map_key: str | None = None) -> IdempotencyRecord:
    """Build a record from an already-decoded JSON value, with the reader's validation.

    Raises :class:`FileFormatError` (with ``record_id=map_key`` and the field, no line). Unknown
    fields are ignored; duplicate keys cannot be seen here (``json.loads`` already merged them).
    """
    try:
        record, _ = convert_record(value, {}, copy=True)
    except RecordProblem as exc:
        raise FileFormatError(exc.message, record_id=map_key, field=exc.field or None) from None
    except DuplicateKey:  # pragma: no cover - json.loads merges duplicate keys
        raise FileFormatError("duplicate field", record_id=map_key) from None
    bad = find_surrogate(value, "")
    if bad is not None:
        raise FileFormatError(
            "lone surrogate in string escape", record_id=map_key, field=bad or None
        )
    return record


# --------------------------------------------------------------------------------------------
# Positional slow parser: used only to explain an error (where is the duplicate key, which line
# holds the bad value). Values are parsed with positions; nothing here is on the fast path.


def _pskip_ws(text: str, i: int) -> int:
    m = WS_RE.match(text, i)
    assert m is not None
    return m.end()


#: The field a nesting error names: the record field it is under (``outcome.details`` for
#: details), not the path down to the 128th level.
_TOP_FIELD_RE: Final = re.compile(r"(?:(?:outcome|tenant_context)\.)?[^.\[]*")


def _top_field(path: str) -> str:
    m = _TOP_FIELD_RE.match(path)
    return m.group() if m is not None and m.group() else path


def parse_positions(
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
        raise SyntaxProblem("recursion limit exceeded", _top_field(path), i)
    if c == "{":
        starts.setdefault(path, i)
        i = _pskip_ws(text, i + 1)
        if text[i : i + 1] == "}":
            return i + 1
        seen: set[str] = set()
        while True:
            if text[i : i + 1] != '"':
                raise SyntaxProblem("expected a string key", path, i)
            try:
                key, j = scanstring(text, i + 1)
            except json.JSONDecodeError as exc:
                raise SyntaxProblem(exc.msg, path, exc.pos) from None
            sub = join_path(path, key)
            if key in seen:
                raise SyntaxProblem(f"duplicate field `{key}`", sub, i)
            seen.add(key)
            j = _pskip_ws(text, j)
            if text[j : j + 1] != ":":
                raise SyntaxProblem("expected ':'", path, j)
            i = _pskip_ws(text, parse_positions(text, j + 1, sub, positions, starts, depth + 1))
            c = text[i : i + 1]
            if c == ",":
                i = _pskip_ws(text, i + 1)
                continue
            if c == "}":
                return i + 1
            raise SyntaxProblem("expected ',' or '}'", path, i)
    if c == "[":
        i = _pskip_ws(text, i + 1)
        if text[i : i + 1] == "]":
            return i + 1
        n = 0
        while True:
            i = _pskip_ws(
                text, parse_positions(text, i, f"{path}[{n}]", positions, starts, depth + 1)
            )
            n += 1
            c = text[i : i + 1]
            if c == ",":
                i += 1
                continue
            if c == "]":
                return i + 1
            raise SyntaxProblem("expected ',' or ']'", path, i)
    if c == '"':
        try:
            _, j = scanstring(text, i + 1)
        except json.JSONDecodeError as exc:
            raise SyntaxProblem(exc.msg, path, exc.pos) from None
        return int(j)
    for literal in ("true", "false", "null"):
        if text.startswith(literal, i):
            return i + len(literal)
    m = NUMBER_RE.match(text, i)
    if m is not None:
        try:
            jsonvalue.check_number(m.group())
        except OutOfRange:
            raise SyntaxProblem("number out of range", path, i) from None
        return m.end()
    for literal in ("NaN", "Infinity", "-Infinity"):
        if text.startswith(literal, i):
            raise SyntaxProblem(f"{literal} is not valid JSON", path, i)
    raise SyntaxProblem("expected a JSON value", path, i)
