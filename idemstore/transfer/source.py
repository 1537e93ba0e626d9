"""Opening a key file, and reading it as text with a cursor and line numbers.

Only a regular file is read (a FIFO, a directory or a device is refused, never waited on), and
it must stay the same file from the first byte to the last (:func:`open_regular`,
:meth:`TextSource.check_unchanged`): a file that changes while it is read is refused.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from typing import Any, Final, NoReturn

from .. import jsonvalue
from ..errors import FileFormatError
from ..jsonvalue import MAX_DEPTH
from .scan import (
    ITERATIVE,
    JSON_WS,
    PLAIN_SCAN,
    WS_RE,
    TextOutOfRange,
    TextTooDeep,
    Unreadable,
    scanstring,
)
from .validate import SyntaxProblem, parse_positions

_CHUNK_BYTES: Final = 1 << 20
#: Characters a value's decode wants ahead of the cursor before it starts.
_READ_AHEAD: Final = 1 << 16


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


def identity_of(st: os.stat_result) -> FileIdentity:
    """The :data:`FileIdentity` of a ``stat`` result."""
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
        identity = identity_of(st)
        if expect is not None and identity != expect:
            raise file_changed(path)
        return os.fdopen(fd, "rb"), identity
    except BaseException:
        os.close(fd)
        raise


def check_unchanged(path: str, identity: FileIdentity) -> None:
    """:func:`file_changed` unless the file at ``path`` still has ``identity``."""
    try:
        now = identity_of(os.stat(path))
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


class TextSource:
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
            now = identity_of(os.fstat(self._file.fileno()))
            at_path = identity_of(os.stat(self.path))
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

    def read_ahead(self, extra: int = 0) -> None:
        """Have what a value's decode wants ahead of the cursor, plus ``extra`` characters, in
        the buffer (less at the end of the file)."""
        self.ensure(_READ_AHEAD + extra)

    def ensure(self, n: int) -> None:
        while len(self.buf) - self.pos < n and self.fill():
            pass

    def peek(self) -> str:
        """Skip JSON whitespace; return the next char ('' at end of file)."""
        buf, pos = self.buf, self.pos
        if pos < len(buf) and buf[pos] not in JSON_WS:
            return buf[pos]
        while True:
            m = WS_RE.match(self.buf, self.pos)
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
                s, end = scanstring(self.buf, self.pos + 1)
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
        scan: Callable[[str, int], tuple[Any, int]] = PLAIN_SCAN,
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
                    if too_deep is None and scan in ITERATIVE:
                        scan = ITERATIVE[scan]
                        continue
                    if scan is not PLAIN_SCAN:
                        raise TextTooDeep from None  # the record reader explains it
                    at = self.base + (self.pos if too_deep is None else too_deep)
                    raise self.error("recursion limit exceeded", at=at) from None
            except json.JSONDecodeError as exc:
                if self._truncated(exc) and self.fill():
                    continue
                if exc.pos >= len(self.buf.rstrip(JSON_WS)) or exc.msg.startswith("Unterminated"):
                    raise self.error(
                        "unexpected end of file (truncated JSON?)", at=self.base + exc.pos
                    ) from None
                raise self.error(f"invalid JSON: {exc.msg}", at=self.base + exc.pos) from None
            except ValueError as exc:  # an integer too long for int(): beyond f64 in any case
                if isinstance(exc, FileFormatError):
                    raise
                if scan is not PLAIN_SCAN and scan is not ITERATIVE[PLAIN_SCAN]:
                    raise TextOutOfRange from None
                self.explain_plain(self.pos, depth)
            except Unreadable:
                if scan is not PLAIN_SCAN and scan is not ITERATIVE[PLAIN_SCAN]:
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
            parse_positions(self.buf, start, "", {}, {}, depth)
        except SyntaxProblem as problem:
            raise self.error(problem.message, at=self.base + problem.pos) from None
        raise self.error("NaN and Infinity are not valid JSON", at=self.base + start)
