"""A JSON key file as batches of database rows, parsed in this process or by worker processes.

The importer inserts rows while the file is still being parsed: with workers, the parsing
(JSON decoding, validation, record ids) runs in child processes (:func:`worker_main`, started
as ``python -c``), one per part of the file (:func:`split_points`), which send their batches
back through pipes as ``marshal`` data (both ends run the same interpreter; marshal writes and
reads these tuples of strings and integers several times faster than pickle). The children run
the very code the in-process path runs (:class:`FileParse`), import no database module and never
touch the database, so the transaction, its locks and its rollback stay in the importer.

Errors cross the pipe as data. With one worker they are raised again in the importer as the
same :class:`~idemstore.errors.FileFormatError` (message, file, record, field, line); with
several, any failure raises :class:`PartsFailed`, and the importer rolls back to a savepoint
and reads the whole file itself, which finds the first error in file order (and copes with a
file whose layout fooled the cut). A worker that dies (killed, out of memory) is such a failure.
An importer that dies closes the pipes, and its workers end at their next write.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import marshal
import os
import queue
import re
import selectors
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

from ..db.codec import KEY, Row
from ..errors import FileFormatError, IdemstoreError
from .reader import RecordReader
from .rows import REPORT_LIST_LIMIT, Converter, IdMismatch, gc_paused
from .source import FileIdentity, file_identity, open_regular, unreadable

__all__ = [
    "BATCH_RECORDS",
    "MAX_WORKERS",
    "WORKER_MIN_BYTES",
    "FileParse",
    "ParseSummary",
    "PartsFailed",
    "WorkerParse",
    "default_workers",
    "open_parse",
    "split_points",
    "start_early",
]

logger = logging.getLogger("idemstore.import")

#: Pipe capacity asked for (Linux ``F_SETPIPE_SZ``): one batch or so in flight.
_PIPE_BYTES: Final = 1 << 20
#: Records per batch (what the importer compares and inserts at once).
BATCH_RECORDS: Final = 2000
#: Files at least this big are parsed by worker processes unless told otherwise.
WORKER_MIN_BYTES: Final = 8 << 20
#: At most this many parse workers unless told otherwise.
MAX_WORKERS: Final = 4


@dataclass(slots=True)
class ParseSummary:
    """What the parse found besides the rows (known once every batch has been read)."""

    form: str
    records_with_unknown_fields: int = 0
    #: Unknown field path -> how many records had it (top-level file fields: ``<file>.name``).
    unknown_fields: dict[str, int] = field(default_factory=dict)
    id_mismatches: int = 0
    mismatches: list[IdMismatch] = field(default_factory=list)

    def as_tuple(self) -> tuple[Any, ...]:
        """As plain values (for the pipe)."""
        return (
            self.form,
            self.records_with_unknown_fields,
            self.unknown_fields,
            self.id_mismatches,
            [(m.map_key, m.record_id, m.computed_id) for m in self.mismatches],
        )

    @classmethod
    def from_tuple(cls, values: tuple[Any, ...]) -> ParseSummary:
        form, with_unknown, unknown, mismatch_count, mismatches = values
        return cls(
            form, with_unknown, unknown, mismatch_count, [IdMismatch(*m) for m in mismatches]
        )


def _open_reader(
    path: str,
    start: int,
    stop: int | None,
    expect: FileIdentity | None,
    forbid_nul: bool,
) -> RecordReader:
    try:
        return RecordReader(path, start=start, stop=stop, expect=expect, forbid_nul=forbid_nul)
    except OSError as error:
        raise unreadable(path, error) from None


#: At most ``batch_records`` rows (token last), the ``(record_id, fingerprint)`` pairs of their
#: conflict fingerprints (each record's in first-seen order), how far into the file the parse
#: has got, in bytes, and which part of the file the rows come from (0, 1, ... in file order).
Batch = tuple[list[Row], list[tuple[str, str]], int, int]


class FileParse:
    """The file (or the part ``start``..``stop`` of its records, see
    :class:`~idemstore.transfer.reader.RecordReader`) parsed in this process: iterate for
    :data:`Batch` es, then read :meth:`summary`. Close it (or use ``with``).

    ``expect``: the identity the file must have (:func:`~idemstore.transfer.source.file_identity`),
    checked when it is opened and after its last record; ``forbid_nul``: refuse NUL in text
    fields (a PostgreSQL target)."""

    def __init__(
        self,
        path: str,
        *,
        strict: bool,
        batch_records: int,
        start: int = 0,
        stop: int | None = None,
        expect: FileIdentity | None = None,
        forbid_nul: bool = False,
    ) -> None:
        self.path = path
        self._batch = batch_records
        self._reader = _open_reader(path, start, stop, expect, forbid_nul)
        self._convert = Converter(strict=strict, containers=self._reader.containers)
        self.form: str = self._reader.header.form

    def __enter__(self) -> FileParse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._reader.close()

    def __iter__(self) -> Iterator[Batch]:
        reader, size = self._reader, self._batch
        rows: list[Row] = []
        fingerprints: list[tuple[str, str]] = []
        convert = self._convert
        for row, fps in reader.convert_each(convert, convert.chunk):
            rows.append(row)
            if fps:
                record_id = row[KEY]
                fingerprints.extend([(record_id, fp) for fp in fps])
            if len(rows) >= size:
                yield rows, fingerprints, reader.bytes_read, 0
                rows = []
                fingerprints = []
        if rows:
            yield rows, fingerprints, reader.bytes_read, 0

    def summary(self) -> ParseSummary:
        convert, header = self._convert, self._reader.header
        unknown = dict(sorted(convert.unknown.items()))
        for name in header.unknown_fields:
            unknown[f"<file>.{name}"] = 1
        return ParseSummary(
            form=header.form,
            records_with_unknown_fields=convert.records_with_unknown_fields,
            unknown_fields=unknown,
            id_mismatches=convert.id_mismatches,
            mismatches=list(convert.mismatches),
        )


# --------------------------------------------------------------------------------------------
# Parts of a file

#: The start of a versioned file as Rust writes it, up to the brace that opens ``records``.
_RUST_PREFIX: Final = re.compile(rb'\{\n  "schema_version": 1,\n  "records": \{(?=\n    ")')
#: Between two records of such a file: the comma at offset len(b"\n    }").
_RUST_BETWEEN: Final = b'\n    },\n    "'
_SPLIT_WINDOW: Final = 1 << 20


def split_points(path: str, parts: int, expect: FileIdentity | None = None) -> list[int] | None:
    """Byte offsets that cut the records of a file Rust wrote into ``parts`` parts of about the
    same size: the first just inside ``records``, then the comma after a record for each later
    part. None if the file does not start as Rust writes it or no cut is found.

    A newline cannot occur inside a JSON string, so each cut is where an object ends at the
    indent of a record; the reader of the part before it proves that it is a record's end.
    Raises FileFormatError for a file that cannot be read, is not a regular file, or is not
    ``expect``.
    """
    f, _ = open_regular(path, expect)
    with f:
        m = _RUST_PREFIX.match(f.read(256))
        if m is None:
            return None
        size = os.fstat(f.fileno()).st_size
        points = [m.end()]
        for k in range(1, parts):
            target = points[0] + (size - points[0]) * k // parts
            if target <= points[-1]:
                return None
            f.seek(target)
            at = f.read(_SPLIT_WINDOW).find(_RUST_BETWEEN)
            if at == -1:
                return None
            cut = target + at + len(b"\n    }")
            if cut <= points[-1]:
                return None
            points.append(cut)
    return points


# --------------------------------------------------------------------------------------------
# The worker processes

_HELLO: Final = "idemstore-parse-1"
# The worker imports idemstore exactly as this process did: same sys.path, same order.
_PATH_VAR: Final = "IDEMSTORE_PARSE_WORKER_SYS_PATH"
_WORKER_CODE: Final = (
    "import json, os, sys; "
    f"sys.path[:] = json.loads(os.environ.pop({_PATH_VAR!r})); "
    "from idemstore.transfer.parse import worker_main; sys.exit(worker_main())"
)


#: A message on the pipe: its length, then its marshal data.
_HEADER: Final = struct.Struct("<Q")
#: Messages a worker may have parsed ahead of what the importer has read.
_AHEAD: Final = 16


def _error_message(error: BaseException) -> tuple[str, Any]:
    if isinstance(error, FileFormatError):
        return "format", (error.reason, error.path, error.record_id, error.field, error.line)
    if isinstance(error, IdemstoreError):
        return "idemstore", (type(error).__name__, str(error))
    return "crash", "".join(traceback.format_exception(error))


def worker_main(argv: Sequence[str] | None = None) -> int:
    """A worker: ``PATH [--strict] [--batch N] [--start B --stop B]``; messages on stdout
    (:func:`_send`): a greeting with the file's form, the batches, then the summary or an
    error."""
    parser = argparse.ArgumentParser(prog="idemstore-parse-worker")
    parser.add_argument("path")
    parser.add_argument("--strict", action="store_true")
    parser.add_argument("--batch", type=int, default=BATCH_RECORDS)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--stop", type=int, default=None)
    parser.add_argument("--expect", default=None, help="st_dev:st_ino:st_size:st_mtime_ns")
    parser.add_argument("--forbid-nul", action="store_true")
    args = parser.parse_args(argv)
    expect = None if args.expect is None else _identity_of(args.expect)
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the pipe
    # A thread writes to the pipe, so that parsing goes on while the importer is busy (the
    # pipe holds about one batch); at most _AHEAD messages wait in between.
    pending: queue.Queue[bytes | None] = queue.Queue(maxsize=_AHEAD)
    broken = threading.Event()

    def write() -> None:
        while (data := pending.get()) is not None:
            try:
                out.write(_HEADER.pack(len(data)))
                out.write(data)
                out.flush()
            except (BrokenPipeError, OSError):
                broken.set()
                while pending.get() is not None:  # let the parser finish its puts
                    pass
                return

    writer = threading.Thread(target=write, name="idemstore-parse-writer", daemon=True)
    writer.start()

    def send(message: tuple[Any, ...]) -> None:
        if broken.is_set():
            raise BrokenPipeError
        pending.put(marshal.dumps(message))

    code = 0
    try:
        with (
            gc_paused(),
            FileParse(
                args.path,
                strict=args.strict,
                batch_records=args.batch,
                start=args.start,
                stop=args.stop,
                expect=expect,
                forbid_nul=args.forbid_nul,
            ) as parse,
        ):
            send((_HELLO, parse.form))
            for batch in parse:
                send(("batch", *batch))
            send(("done", parse.summary().as_tuple()))
    except BrokenPipeError:
        code = 1  # the importer is gone: nothing to tell anyone
    except BaseException as error:
        code = 1
        with contextlib.suppress(BrokenPipeError):
            send(("error", *_error_message(error)))
    pending.put(None)
    writer.join()
    return 1 if broken.is_set() else code


def _identity_arg(identity: FileIdentity) -> str:
    return ":".join(map(str, identity))


def _identity_of(text: str) -> FileIdentity:
    dev, ino, size, mtime = (int(x) for x in text.split(":"))
    return (dev, ino, size, mtime)


class PartsFailed(IdemstoreError):
    """A worker reading one part of the file failed: the importer reads the whole file itself
    instead (which reports the first error in file order, if the file has one)."""


def _raise_from(kind: str, payload: Any) -> NoReturn:
    if kind == "format":
        reason, path, record_id, field_name, line = payload
        raise FileFormatError(reason, path=path, record_id=record_id, field=field_name, line=line)
    if kind == "idemstore":
        raise IdemstoreError(f"{payload[0]}: {payload[1]}")
    raise IdemstoreError(f"the parse worker failed:\n{payload}")


class _Worker:
    """One worker process and the read end of its pipe."""

    def __init__(self, path: str, args: list[str]) -> None:
        env = dict(os.environ)
        env[_PATH_VAR] = json.dumps(sys.path)
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_CODE, path, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self.stderr,
                env=env,
            )
        except BaseException:
            self.stderr.close()
            raise
        assert self.proc.stdout is not None
        self.pipe = self.proc.stdout
        self.done = False
        self.bytes_read = 0
        if sys.platform == "linux":
            with contextlib.suppress(OSError):
                import fcntl

                fcntl.fcntl(self.pipe.fileno(), 1031, _PIPE_BYTES)  # F_SETPIPE_SZ

    def read(self) -> tuple[Any, ...] | None:
        """The next message; None at end of pipe or if it is not one of ours."""
        header = self.pipe.read(_HEADER.size)
        if len(header) != _HEADER.size:
            return None
        (size,) = _HEADER.unpack(header)
        data = self.pipe.read(size)
        if len(data) != size:
            return None
        try:
            message = marshal.loads(data)
        except (EOFError, ValueError, TypeError):  # not our protocol
            return None
        return message if type(message) is tuple and message else None

    def stderr_text(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            self.stderr.seek(0)
            return self.stderr.read().decode("utf-8", "replace")[-4000:]
        return ""

    def ended_early(self, path: str) -> IdemstoreError:
        self.proc.wait()
        return IdemstoreError(
            f"the parse worker for {path} ended early (exit status {self.proc.returncode}); "
            f"nothing was imported from it\n{self.stderr_text()}".rstrip()
        )

    def close(self) -> None:
        """Reap the worker (killed unless it has sent everything)."""
        proc = self.proc
        if self.done:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(OSError):
            self.pipe.close()
        proc.wait()
        self.stderr.close()


class WorkerParse:
    """:class:`FileParse` run by worker processes, one per part of the file (same interface).

    With one worker, its error is raised as it is. With several, a failure of any (or a record
    id found in two parts) raises :class:`PartsFailed`: which error comes first in the file is
    then found by reading the whole file in order.
    """

    def __init__(
        self,
        path: str,
        workers: list[_Worker],
        starts: list[int],
        *,
        strict: bool,
        batch_records: int,
        expect: FileIdentity | None = None,
        forbid_nul: bool = False,
    ) -> None:
        self.path = path
        self.strict = strict
        self.batch_records = batch_records
        self.expect = expect
        self.forbid_nul = forbid_nul
        self._workers = workers
        self._starts = starts
        self._summaries: list[ParseSummary | None] = [None] * len(workers)
        self.form = ""

    @classmethod
    def spawn(
        cls,
        path: str,
        *,
        strict: bool,
        batch_records: int,
        workers: int,
        expect: FileIdentity | None = None,
        forbid_nul: bool = False,
    ) -> WorkerParse | None:
        """Start the workers (one per part, fewer if the file cannot be cut), without waiting
        for them; None if no worker can start here. Each opens the file by its path and checks
        that it is ``expect`` (and unchanged after its last record)."""
        # Several parts need selectors over pipes (not on Windows).
        points = split_points(path, workers, expect) if workers > 1 and os.name != "nt" else None
        common = ["--batch", str(batch_records), *(["--strict"] if strict else [])]
        if expect is not None:
            common += ["--expect", _identity_arg(expect)]
        if forbid_nul:
            common.append("--forbid-nul")
        if points is None:
            ranges: list[tuple[int, int | None]] = [(0, None)]
        else:
            ranges = list(zip(points, [*points[1:], None], strict=True))
        started: list[_Worker] = []
        try:
            for start, stop in ranges:
                part = [] if start == 0 else ["--start", str(start)]
                if stop is not None:
                    part += ["--stop", str(stop)]
                started.append(_Worker(path, common + part))
        except OSError as error:
            for w in started:
                w.close()
            logger.warning("cannot start a parse worker (%s): parsing in-process", error)
            return None
        return cls(
            path,
            started,
            [start for start, _ in ranges],
            strict=strict,
            batch_records=batch_records,
            expect=expect,
            forbid_nul=forbid_nul,
        )

    @property
    def worker_count(self) -> int:
        """How many worker processes parse the file (one per part)."""
        return len(self._workers)

    def greet(self) -> bool:
        """Read the workers' greetings: True if all are at work. False if one did not start
        (the caller closes this and parses in-process). With one worker, a file error found
        at open is raised."""
        for w in self._workers:
            first = w.read()
            if first is not None and first[0] == "error" and len(self._workers) == 1:
                self.close()
                _raise_from(first[1], first[2])
            if first is None or first[0] != _HELLO:
                if first is None or first[0] != "error":
                    logger.warning(
                        "a parse worker did not start: parsing in-process\n%s", w.stderr_text()
                    )
                return False
            self.form = first[1]
        return True

    def __enter__(self) -> WorkerParse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _failed(self, worker: _Worker, message: tuple[Any, ...] | None) -> NoReturn:
        single = len(self._workers) == 1
        if message is None:
            error = worker.ended_early(self.path)
            if single:
                raise error
            raise PartsFailed(str(error))
        if single:
            _raise_from(message[1], message[2])
        raise PartsFailed(f"a parse worker refused its part: {message[1:]}")

    def __iter__(self) -> Iterator[Batch]:
        workers = self._workers
        if len(workers) == 1:
            ready: Any = None
        else:
            ready = selectors.DefaultSelector()
            for i, w in enumerate(workers):
                ready.register(w.pipe, selectors.EVENT_READ, i)
        ids: set[str] | None = set() if len(workers) > 1 else None
        live = len(workers)
        try:
            while live:
                events = [(None, 0)] if ready is None else ready.select()
                for key, _ in events:
                    i = 0 if key is None else key.data
                    w = workers[i]
                    message = w.read()
                    if message is None or message[0] == "error":
                        self._failed(w, message)
                    if message[0] == "done":
                        self._summaries[i] = ParseSummary.from_tuple(message[1])
                        w.done = True
                        live -= 1
                        if ready is not None:
                            ready.unregister(w.pipe)
                        continue
                    _, rows, fingerprints, bytes_read, _part = message
                    if ids is not None:
                        before = len(ids)
                        ids.update([row[KEY] for row in rows])
                        if len(ids) != before + len(rows):
                            raise PartsFailed("a record id appears in two parts of the file")
                    w.bytes_read = bytes_read - self._starts[i]
                    yield rows, fingerprints, sum(x.bytes_read for x in workers), i
        finally:
            if ready is not None:
                ready.close()

    def summary(self) -> ParseSummary:
        parts = self._summaries
        assert all(p is not None for p in parts), "summary() before the last batch"
        if len(parts) == 1:
            assert parts[0] is not None
            return parts[0]
        merged = ParseSummary(form=self.form)
        unknown: Counter[str] = Counter()
        for part in parts:
            assert part is not None
            merged.records_with_unknown_fields += part.records_with_unknown_fields
            unknown.update(part.unknown_fields)
            merged.id_mismatches += part.id_mismatches
            merged.mismatches.extend(part.mismatches)
        merged.unknown_fields = dict(sorted(unknown.items()))
        del merged.mismatches[REPORT_LIST_LIMIT:]
        return merged

    def close(self) -> None:
        for w in self._workers:
            w.close()


def open_parse(
    path: str,
    *,
    strict: bool,
    batch_records: int,
    workers: int,
    started: WorkerParse | None = None,
    expect: FileIdentity | None = None,
    forbid_nul: bool = False,
) -> FileParse | WorkerParse:
    """The file's parse: in this process (``workers=0``) or by worker processes, one per part
    of the file (if it can be cut; else one), or by the workers ``started`` for it already
    (:func:`start_early`); in this process if no worker can start or one fails to. ``expect``
    and ``forbid_nul``: see :class:`FileParse`."""
    wanted = (path, strict, batch_records, expect, forbid_nul)
    if (
        started is not None
        and (
            started.path,
            started.strict,
            started.batch_records,
            started.expect,
            started.forbid_nul,
        )
        != wanted
    ):
        started.close()  # started for another file (or another version of it): not ours
        started = None
    if started is None and workers > 0:
        started = WorkerParse.spawn(
            path,
            strict=strict,
            batch_records=batch_records,
            workers=workers,
            expect=expect,
            forbid_nul=forbid_nul,
        )
    if started is not None:
        if started.greet():
            return started
        started.close()
    return FileParse(
        path, strict=strict, batch_records=batch_records, expect=expect, forbid_nul=forbid_nul
    )


def default_workers(size: int) -> int:
    """Parse workers for a file of ``size`` bytes when not told: none for a small file or on a
    single core, else one per core up to :data:`MAX_WORKERS`."""
    cores = os.cpu_count() or 1
    if size < WORKER_MIN_BYTES or cores < 2:
        return 0
    return min(cores, MAX_WORKERS)


def start_early(
    path: str, *, strict: bool, workers: int | None, forbid_nul: bool
) -> WorkerParse | None:
    """For the command line's fast start: the parse workers of ``path`` started right away,
    before the command loads the database layer (some 0.2 s the workers spend reading), if the
    file is big enough to be worth them; None otherwise, or if it cannot be read (the import
    then reports that). The import uses these workers if they match what it needs
    (:func:`open_parse`)."""
    try:
        identity = file_identity(path)
    except FileFormatError:
        return None  # the import reports it
    n = default_workers(identity[2]) if workers is None else workers
    if n <= 0:
        return None
    try:
        return WorkerParse.spawn(
            path,
            strict=strict,
            batch_records=BATCH_RECORDS,
            workers=n,
            expect=identity,
            forbid_nul=forbid_nul,
        )
    except FileFormatError:
        return None  # the file changed (or went) since: the import reports it
