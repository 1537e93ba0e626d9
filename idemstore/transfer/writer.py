"""Writing the Rust store's file: what ``serde_json::to_string_pretty`` writes for the
versioned form, records in key order, atomically through ``<path>.tmp`` (fsynced, renamed, the
folder fsynced), as the Rust store does."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final, TextIO

from .. import jsonvalue
from ..errors import InvalidInputError
from ..jsonvalue import MAX_DETAILS_DEPTH
from ..model import IdempotencyRecord, JSONValue, RecordStatus, TenantSource
from ..rules import DETAILS_TOO_DEEP


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
    details: object = _END
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


#: A record and the key it is stored under in the file's map (normally its own record_id).
Entry = tuple[str, IdempotencyRecord]


def entries_of(records: Iterable[IdempotencyRecord]) -> Iterable[Entry]:
    """Records as entries under their own ``record_id``; a sequence (list, tuple) sorted."""
    if isinstance(records, Sequence):
        records = sorted(records, key=lambda r: r.record_id)
    return ((record.record_id, record) for record in records)


def _ordered(entries: Iterable[Entry]) -> Iterator[Entry]:
    previous: str | None = None
    for key, record in entries:
        if previous is not None and key <= previous:
            what = "duplicate" if key == previous else "out-of-order"
            raise InvalidInputError(
                f"{what} record id {key!r}: records given to write_records must come in "
                "strictly ascending record_id order"
            )
        previous = key
        yield key, record


def _write_stream(out: TextIO, entries: Iterable[Entry]) -> int:
    count = 0
    write = out.write
    write('{\n  "schema_version": 1,\n  "records": {')
    sep = "\n"
    for key, record in _ordered(entries):
        write(f"{sep}    {_encode_str(key)}: {_record_text(record, '    ')}")
        sep = ",\n"
        count += 1
    write("\n  }\n}" if count else "}\n}")
    return count


def write_entries_to(out: TextIO, entries: Iterable[Entry]) -> int:
    """:func:`write_entries` to an open text stream ``out`` (e.g. standard output): the same
    text, written as it goes, nothing flushed or synced; the record count."""
    return _write_stream(out, entries)


def dumps_records(records: Iterable[IdempotencyRecord]) -> str:
    """The whole versioned file as a string (for small stores and tests)."""
    buf = io.StringIO()
    _write_stream(buf, entries_of(records))
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
    return write_entries(path, entries_of(records))


def write_entries(path: str | os.PathLike[str], entries: Iterable[Entry]) -> int:
    """:func:`write_records` for ``(key, record)`` entries, in strictly ascending key order:
    each record is written under its key, its own ``record_id`` field as it is (the export:
    a record imported under another map key keeps both)."""
    target = os.fspath(path)
    check_writable(target)
    tmp = target + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8", errors="strict", newline="\n") as out:
            count = _write_stream(out, entries)
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
