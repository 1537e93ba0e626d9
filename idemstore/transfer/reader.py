"""Streaming reader of the Rust store's JSON idempotency-key file.

The Rust module (``idempotency.rs``) keeps ``{"schema_version": 1, "records": {...}}`` (or,
in old files, a bare ``{"<record_id>": {record}}`` map) and reads it with serde. This module
reads the same files without loading them whole: the top-level object is walked by hand over
a decoded text buffer (:class:`~idemstore.transfer.source.TextSource`), and record values are
decoded with the C JSON scanner (one at a time, or many per call where the file's layout shows
where records end, see :meth:`RecordReader._chunk`), then validated the way serde's derived
``Deserialize`` would (:mod:`idemstore.transfer.validate`).

Reading::

    with open_records(path) as reader:
        print(reader.header.form)
        for file_record in reader:
            ...

Every problem raises :class:`~idemstore.errors.FileFormatError` naming the file, the record
(map key), the field as a dotted path (``outcome.completed_at_ms``, ``conflict_fingerprints[1]``)
and the 1-based line. Records already yielded before an error are not taken back: a caller that
imports must do so in one transaction.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, TypeVar, cast

from .. import jsonvalue
from ..errors import FileFormatError
from ..jsonvalue import MAX_DEPTH, DuplicateKey, OutOfRange, TooDeep
from ..model import IdempotencyRecord, TenantContext
from ..rules import U32_MAX
from .fields import NUL_REFUSED, RUST_WS, SUPPORTED_SCHEMA_VERSION
from .scan import (
    ESCAPE_RE,
    EXACT,
    PAIRS_SCAN,
    PLAIN_SCAN,
    SCAN,
    Scanner,
    Unreadable,
    may_hold_neg_zero,
)
from .source import FileIdentity, TextSource
from .validate import (
    RecordProblem,
    SyntaxProblem,
    check_uint,
    convert_record,
    describe,
    find_nul,
    find_surrogate,
    parse_positions,
    plain_value,
)

#: The records decoded at once by the chunk path are at least this many characters.
_CHUNK_CHARS: Final = 1 << 16
_COMMA_RE: Final = re.compile(r"[ \t\n\r]*,")
_INDENT_RE: Final = re.compile(r"\n([ \t]*)\Z")
# `, "key": ` where the key has no escapes (the common case of the member loop)
_NEXT_KEY_RE: Final = re.compile(r'[ \t\n\r]*,[ \t\n\r]*"([^"\\\x00-\x1f]*)"[ \t\n\r]*:[ \t\n\r]*')
T = TypeVar("T")
_RecordsFn = Callable[[TextSource, set[str], str, bool], Iterator[T]]


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


def _members(src: TextSource, what: str, *, after_value: bool) -> Iterator[tuple[str, int]]:
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


def _record_boundary(src: TextSource) -> str:
    """The text that ends a record followed by another in this file's layout: a newline, the
    indent of the closing brace of the record just read (the cursor is after it), ``},``.
    ``""`` when that brace does not start its line (a compact file: no chunk path)."""
    line_start = src.buf.rfind("\n", 0, src.pos - 1)
    m = _INDENT_RE.match(src.buf[line_start : src.pos - 1]) if line_start != -1 else None
    return "" if m is None else "\n" + m.group(1) + "},"


def _skip_value(src: TextSource, depth: int = 1) -> None:
    """Skip one value with bounded memory (objects are walked member by member), checking it
    as the Rust parser reads it. ``depth``: containers around it in the file."""
    if src.peek() == "{":
        src.read_ahead()
        try:
            value, end = PLAIN_SCAN(src.buf, src.pos)
        except (StopIteration, ValueError, Unreadable, RecursionError):
            pass
        else:
            if end < len(src.buf):
                check_skipped(src, value, src.base + src.pos, depth)
                src.pos = end
                return
        if depth >= MAX_DEPTH:
            raise src.error("recursion limit exceeded")
        src.pos += 1
        for _key, _pos in _members(src, "object", after_value=False):
            _skip_value(src, depth + 1)
        return
    at = src.base + src.pos
    check_skipped(src, src.value(depth=depth), at, depth)


def check_skipped(src: TextSource, value: Any, at: int, depth: int) -> None:
    """A value outside the records (ignored) must still parse: nesting and numbers."""
    try:
        jsonvalue.check_value(value, MAX_DEPTH - depth)
    except (TooDeep, OutOfRange):
        src.explain_plain(at - src.base, depth)


# --------------------------------------------------------------------------------------------
# The reader


def _check_top_version(src: TextSource, value: object, at: int) -> int:
    if type(value) is not int or not 0 <= value <= U32_MAX:
        try:
            check_uint(value, "schema_version", 32)
        except RecordProblem as exc:
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


def _rust_blank(src: TextSource) -> bool:
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
            elif c not in RUST_WS:
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
        self._src = TextSource(self.path, start, stop, expect)
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
        if c == "" or c in RUST_WS:
            if _rust_blank(src):
                return
            raise src.error("expected a JSON value, found a non-JSON character")
        if c != "{":
            found = describe(src.value()) if c in '"[-0123456789tfn' else repr(c)
            raise src.error(f"invalid type: {found}, expected a JSON object at the top level")
        src.read_ahead()
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
        self._src = TextSource(self.path, expect=self._src.identity)
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

        def records(src: TextSource, seen_ids: set[str], what: str, after: bool) -> Iterator[T]:
            return self._converted(convert, chunk, src, seen_ids, what, after)

        return self._iterate(records)

    def _iterate(self, records: _RecordsFn[T] | None = None) -> Iterator[Any]:
        if records is None:

            def records(
                src: TextSource, seen_ids: set[str], what: str, after: bool
            ) -> Iterator[Any]:
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
                    raise src.error(f"invalid type: {describe(v)}, expected a map", field="records")
                src.pos += 1
                yield from records(src, seen_ids, "records", False)
                if self._part_done:
                    return
            else:
                if not self._prescanned:
                    self._top_unknown.append(key)
                _skip_value(src)
        self._check_trailing()

    def _record_value(self, src: TextSource, scan: Scanner, map_key: str) -> tuple[Any, int]:
        """Decode the record value at the cursor: ``(value, start)`` (its offset in
        ``src.buf``), integers read exactly when its text may hold a ``-0``; what serde_json
        would refuse in its text is explained (FileFormatError with field and line)."""
        abs_start = src.base + src.pos
        try:
            value = src.value(scan, depth=self.containers)
            start = abs_start - src.base  # src.buf may have been compacted by value()
            if may_hold_neg_zero(src.buf, start, src.pos):
                value, _ = EXACT[scan](src.buf, start)
        except (DuplicateKey, Unreadable):
            raise self._explain(src, map_key, None, start=abs_start - src.base) from None
        return value, start

    def _records(
        self, src: TextSource, seen_ids: set[str], what: str, *, after: bool
    ) -> Iterator[FileRecord]:
        cache: dict[tuple[Any, ...], TenantContext] = {}
        for map_key, key_pos in _members(src, what, after_value=after):
            if map_key in seen_ids:
                raise src.error(
                    f"duplicate record id {map_key!r} in {what}", at=key_pos, record_id=map_key
                )
            seen_ids.add(map_key)
            value, start = self._record_value(src, SCAN, map_key)
            line = src.line_at(src.base + start)
            try:
                record, unknown = convert_record(value, cache, self.containers)
            except RecordProblem as exc:
                raise self._explain(src, map_key, exc, start=start, line=line) from None
            if ESCAPE_RE.search(src.buf, start, src.pos) is not None or not map_key.isascii():
                bad = find_surrogate(map_key, "")
                if bad is not None:
                    raise src.error(
                        "lone surrogate in string escape", at=key_pos, record_id=map_key
                    )
                bad = find_surrogate(value, "")
                if bad is not None:
                    problem = RecordProblem("lone surrogate in string escape", bad)
                    raise self._explain(src, map_key, problem, start=start, line=line)
            yield FileRecord(map_key, record, line, unknown)

    def _converted(
        self,
        convert: Callable[[str, Any], T],
        chunk: Callable[[tuple[tuple[str, Any], ...]], list[T] | None] | None,
        src: TextSource,
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
            value, start = self._record_value(src, PAIRS_SCAN, map_key)
            buf, end = src.buf, src.pos
            try:
                if (
                    ESCAPE_RE.search(buf, start, end) is not None
                    or not map_key.isascii()
                    or (forbid_nul and "\x00" in map_key)
                ):
                    if find_surrogate(map_key, "") is not None:
                        raise src.error(
                            "lone surrogate in string escape", at=key_pos, record_id=map_key
                        )
                    if forbid_nul and "\x00" in map_key:
                        raise src.error(NUL_REFUSED, at=key_pos, record_id=map_key)
                    value = plain_value(value, limit)
                    bad = find_surrogate(value, "")
                    if bad is not None:
                        problem = RecordProblem("lone surrogate in string escape", bad)
                        raise self._explain(src, map_key, problem, start=start)
                    bad = find_nul(value) if forbid_nul and type(value) is dict else None
                    if bad is not None:
                        raise self._explain(
                            src, map_key, RecordProblem(NUL_REFUSED, bad), start=start
                        )
                converted = convert(map_key, value)
            except DuplicateKey:
                raise self._explain(src, map_key, None, start=start) from None
            except RecordProblem as exc:
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
        src: TextSource,
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
        src.read_ahead(_CHUNK_CHARS)
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
        if ESCAPE_RE.search(buf, m.end(), stop) is not None or may_hold_neg_zero(
            buf, m.end(), stop
        ):
            # Escapes may hide lone surrogates (or NUL), a -0 needs exact integers: checked
            # record by record.
            return None, base + stop
        text = "{" + buf[m.end() : stop] + "}"
        try:
            pairs, end = PAIRS_SCAN(text, 0)
        except (StopIteration, ValueError, Unreadable, RecursionError):
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
        src: TextSource,
        map_key: str,
        exc: RecordProblem | None,
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
            parse_positions(text, start, "", positions, starts, self.containers)
        except SyntaxProblem as problem:
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
