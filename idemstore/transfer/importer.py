"""JSON key file -> database: the import.

One file is imported in one transaction: every record goes in, or (on any error, or a killed
process) none does. Running it again is safe: records already in the database with the same
content are counted as unchanged; one that exists with other content is kept as the database has
it and reported, unless ``replace=True``. ``dry_run=True`` reads and compares, writes nothing.

The record id in the database is the file's map key (what the Rust store looked records up
by). A record whose ``record_id`` field, or whose id recomputed from tenant, operation and key,
differs from its map key is reported with both ids; ``strict=True`` refuses the file instead.

Speed: the file is parsed (decoded by the C JSON scanner, many records per call, checked and
turned into rows by :mod:`idemstore.transfer.rows`) in helper processes, one per part of the
file (:mod:`idemstore.transfer.parse`), while this process inserts their batches with the
driver's ``executemany`` (``COPY`` on PostgreSQL, :mod:`idemstore.db.bulk`). Existing rows are
looked up per batch only when the table was not empty at the start. A record the fast path
does not take goes through the precise validator
(:func:`idemstore.transfer.validate.validate_value`), which either refuses it with serde's
exact message, field and line or builds the row the slow way.

The sync and async entry points run the same :func:`import_call` (one hop for async).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy as sa

from ..db import bulk
from ..db.codec import KEY, Row, content
from ..db.driver import Driver
from ..db.ops import Call
from ..errors import InvalidInputError
from ..store import IdempotencyStore
from .parse import (
    BATCH_RECORDS,
    FileParse,
    PartsFailed,
    WorkerParse,
    default_workers,
    logger,
    open_parse,
)
from .rows import REPORT_LIST_LIMIT, IdMismatch, gc_paused
from .source import FileIdentity, check_unchanged, file_identity

if TYPE_CHECKING:
    from ..aio import AsyncIdempotencyStore

__all__ = [
    "IdMismatch",
    "ImportReport",
    "Progress",
    "import_call",
    "import_file",
    "import_file_async",
    "sync_store",
]

_SAVEPOINT: Final = "idemstore_import"


Progress = Callable[[int, int, int], None]
"""``progress(records_read, bytes_read, bytes_total)``, called after each batch."""


@dataclass(slots=True)
class ImportReport:
    """What an import did (or, with ``dry_run``, would do) to the database."""

    path: str
    form: str = "empty"
    dry_run: bool = False
    read: int = 0
    inserted: int = 0
    unchanged: int = 0
    #: Records already in the database with other content, left as they were.
    kept: int = 0
    replaced: int = 0
    id_mismatches: int = 0
    #: Records that had fields serde ignores.
    records_with_unknown_fields: int = 0
    #: Unknown field path (``outcome.foo``) -> how many records had it; top-level file fields
    #: appear as ``<file>.name``.
    unknown_fields: dict[str, int] = field(default_factory=dict)
    #: The first :data:`REPORT_LIST_LIMIT` kept record ids and id mismatches.
    kept_ids: list[str] = field(default_factory=list)
    mismatches: list[IdMismatch] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# The import


def _flush(
    d: Driver,
    rows: list[Row],
    fingerprints: list[tuple[str, str]],
    report: ImportReport,
    kept_ids: list[str],
    *,
    replace: bool,
    dry_run: bool,
    check: bool,
) -> None:
    """Compare a batch with the database (``check``: it may hold some of these records) and
    write what differs."""
    if not rows:
        return
    existing = bulk.fetch_existing(d, [row[KEY] for row in rows]) if check else {}
    if not existing:
        report.inserted += len(rows)
        if not dry_run:
            bulk.insert_rows(d, rows, fingerprints)
        return
    fps_of: dict[str, list[str]] = {}
    for record_id, fp in fingerprints:
        fps_of.setdefault(record_id, []).append(fp)
    write: list[Row] = []
    replaced: list[str] = []
    for row in rows:
        record_id = row[KEY]
        found = existing.get(record_id)
        if found is not None:
            db_row, db_fps = found
            if content(db_row) == content(row) and db_fps == tuple(fps_of.get(record_id, ())):
                report.unchanged += 1
                continue
            if not replace:
                report.kept += 1
                if len(kept_ids) < REPORT_LIST_LIMIT:
                    kept_ids.append(record_id)
                continue
            report.replaced += 1
            replaced.append(record_id)
        else:
            report.inserted += 1
        write.append(row)
    if dry_run:
        return
    if replaced:
        bulk.delete_records(d, replaced)
    written = {row[KEY] for row in write}
    bulk.insert_rows(d, write, [pair for pair in fingerprints if pair[0] in written])


@dataclass(slots=True)
class _Import:
    """One file's import, as :func:`import_call` set it up (its ``run`` is the Call's)."""

    target: str
    identity: FileIdentity
    replace: bool
    strict: bool
    dry_run: bool
    progress: Progress | None
    workers: int
    started: WorkerParse | None

    def run(self, d: Driver) -> ImportReport:
        # Nothing to compare against when the table is empty: the file's ids are distinct.
        check = bulk.has_records(d)
        # PostgreSQL's text columns cannot hold NUL: refused with the file, line and field.
        forbid_nul = d.dialect.name == "postgresql"
        # The savepoint: an error leaves even a caller's transaction as it was; a part a
        # worker could not read is rolled back and the whole file read here instead.
        with gc_paused(), d.bulk_load(), d.savepoint(_SAVEPOINT) as roll_back:
            parse = open_parse(
                self.target,
                strict=self.strict,
                batch_records=BATCH_RECORDS,
                workers=self.workers,
                started=self.started,
                expect=self.identity,
                forbid_nul=forbid_nul,
            )
            self.log_start(parse, check)
            try:
                with parse:
                    return self.consume(d, parse, check)
            except PartsFailed as failure:
                # Read the whole file here instead: it names the first error, if any.
                logger.info("%s: %s; reading it in one process", self.target, failure)
                roll_back()
            with FileParse(
                self.target,
                strict=self.strict,
                batch_records=BATCH_RECORDS,
                expect=self.identity,
                forbid_nul=forbid_nul,
            ) as parse:
                return self.consume(d, parse, check)

    def log_start(self, parse: FileParse | WorkerParse, check: bool) -> None:
        """One DEBUG line (``idemstore -v import`` shows it): the file, its form, who parses
        it, what the table holds. (An import that goes as planned logs nothing at INFO.)"""
        if isinstance(parse, WorkerParse):
            early = " (started before the database layer loaded)" if parse is self.started else ""
            how = f"{parse.worker_count} parse worker process(es){early}"
        else:
            how = "parsed in this process"
        logger.debug(
            "%s: %s bytes, %s form, %s; %s%s",
            self.target,
            f"{self.identity[2]:,}",
            parse.form,
            how,
            "the table has records: each batch is compared with them"
            if check
            else "the table is empty: batches are inserted without look-ups",
            "; dry run" if self.dry_run else "",
        )

    def consume(self, d: Driver, parse: FileParse | WorkerParse, check: bool) -> ImportReport:
        """Write the batches of ``parse`` (``check``: compare with what the table has)."""
        began = time.perf_counter()
        total = self.identity[2]
        report = ImportReport(path=self.target, dry_run=self.dry_run, form=parse.form)
        kept: dict[int, list[str]] = {}  # per part of the file, so that they list in file order
        batches = 0
        writing = 0.0  # seconds in _flush; the rest is waiting for the parse
        for rows, fingerprints, bytes_read, part in parse:
            batches += 1
            report.read += len(rows)
            flushed = time.perf_counter()
            _flush(
                d,
                rows,
                fingerprints,
                report,
                kept.setdefault(part, []),
                replace=self.replace,
                dry_run=self.dry_run,
                check=check,
            )
            writing += time.perf_counter() - flushed
            if self.progress is not None:
                self.progress(report.read, bytes_read, total)
        report.kept_ids = [k for part in sorted(kept) for k in kept[part]][:REPORT_LIST_LIMIT]
        summary = parse.summary()
        if self.progress is not None:
            self.progress(report.read, total, total)
        report.form = summary.form
        report.records_with_unknown_fields = summary.records_with_unknown_fields
        report.unknown_fields = summary.unknown_fields
        report.id_mismatches = summary.id_mismatches
        report.mismatches = summary.mismatches
        # Every reader checked its own file; this also covers a change after the last of them.
        check_unchanged(self.target, self.identity)
        report.seconds = time.perf_counter() - began
        logger.debug(
            "%s: %s records in %d batch(es) in %.2f s (%s/s): %.2f s %s, %.2f s waiting for "
            "the parse",
            self.target,
            f"{report.read:,}",
            batches,
            report.seconds,
            f"{report.read / report.seconds:,.0f}" if report.seconds > 0 else "-",
            writing,
            "comparing" if self.dry_run else "writing",
            report.seconds - writing,
        )
        return report


def import_call(
    path: str | os.PathLike[str],
    *,
    replace: bool = False,
    strict: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
    started: WorkerParse | None = None,
) -> Call[ImportReport]:
    """The import of one file as one :class:`~idemstore.db.ops.Call` (one transaction).

    ``workers``: parse processes that read the file while this one writes (see
    :mod:`idemstore.transfer.parse`); 0 parses in this process; ``None`` picks
    :func:`~idemstore.transfer.parse.default_workers`. ``started``: workers already started
    for this file (:func:`~idemstore.transfer.parse.start_early`; the command line does that).

    The file must be a regular file that can be read: checked here, before the call takes any
    lock (a FIFO, a directory or a device is refused, never waited on). Every process that
    reads it checks it is still that file; one whose size, mtime or identity changes while it
    is read is refused and nothing is written. Raises :class:`FileFormatError` for these and
    for a file the Rust store could not read; :class:`InvalidInputError` for bad arguments.
    """
    target = os.fspath(path)
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 0
    ):
        raise InvalidInputError(f"workers must be 0 or more, not {workers!r}")
    identity = file_identity(target)
    n_workers = default_workers(identity[2]) if workers is None else workers

    job = _Import(
        target, identity, replace, strict, dry_run, progress, n_workers, started
    )  # fmt: skip
    return Call("read" if dry_run else "write", job.run, alone=True)


def sync_store(store: IdempotencyStore | sa.Engine) -> IdempotencyStore:
    """``store``, or a store over the engine ``store``."""
    return store if isinstance(store, IdempotencyStore) else IdempotencyStore(store)


def import_file(
    store: IdempotencyStore | sa.Engine,
    path: str | os.PathLike[str],
    *,
    replace: bool = False,
    strict: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
    connection: sa.Connection | None = None,
) -> ImportReport:
    """Import one JSON key file (legacy or versioned) in one transaction; see the module doc.

    Raises :class:`~idemstore.errors.FileFormatError` (file, record id, field, line) for a file
    the Rust store would refuse, and leaves the database as it was.
    """
    call = import_call(
        path, replace=replace, strict=strict, dry_run=dry_run, progress=progress, workers=workers
    )
    return sync_store(store).run(call, connection=connection)


async def import_file_async(
    store: AsyncIdempotencyStore,
    path: str | os.PathLike[str],
    *,
    replace: bool = False,
    strict: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
) -> ImportReport:
    """:func:`import_file` for the async store: the whole import runs in one hop."""
    call = import_call(
        path, replace=replace, strict=strict, dry_run=dry_run, progress=progress, workers=workers
    )
    return await store.run(call)
