"""JSON key file -> database (import) and database -> JSON key file (export).

One file is imported in one transaction: every record goes in, or (on any error, or a killed
process) none does. Running it again is safe: records already in the database with the same
content are counted as unchanged; one that exists with other content is kept as the database has
it and reported, unless ``replace=True``. ``dry_run=True`` reads and compares, writes nothing.

The record id in the database is the file's map key (what the Rust store looked records up
by). A record whose ``record_id`` field, or whose id recomputed from tenant, operation and key,
differs from its map key is reported with both ids; ``strict=True`` refuses the file instead.

Speed: the file is parsed (decoded by the C JSON scanner, many records per call, checked and
turned into row tuples by :mod:`idemstore._rows`) in helper processes, one per part of the file
(:mod:`idemstore._parse`), while this process inserts their batches with the driver's
``executemany`` (``COPY`` on PostgreSQL). Existing rows are looked up per batch only when the
table was not empty at the start. A record the fast path does not take goes through the precise
validator (:func:`idemstore.jsonfile.validate_value`), which either refuses it with serde's
exact message, field and line or builds the row the slow way.

The sync and async entry points run the same :func:`import_call` (one hop for async).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy as sa

from . import jsonfile, ops
from ._parse import (
    BATCH_RECORDS,
    FileParse,
    PartsFailed,
    WorkerParse,
    default_workers,
    logger,
    open_parse,
)
from ._rows import REPORT_LIST_LIMIT, IdMismatch, Row, gc_paused
from .dialects import Driver
from .errors import IdemstoreError, InvalidInputError
from .store import IdempotencyStore

if TYPE_CHECKING:
    from .aio import AsyncIdempotencyStore

__all__ = [
    "IdMismatch",
    "ImportReport",
    "add_commands",
    "export_file",
    "export_file_async",
    "import_call",
    "import_file",
    "import_file_async",
]

#: Files at least this big get a progress bar on a terminal.
PROGRESS_MIN_BYTES: Final = 8 << 20
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
    existing = ops.fetch_existing(d, [row[0] for row in rows]) if check else {}
    if not existing:
        report.inserted += len(rows)
        if not dry_run:
            ops.insert_rows(d, rows, fingerprints)
        return
    fps_of: dict[str, list[str]] = {}
    for record_id, fp in fingerprints:
        fps_of.setdefault(record_id, []).append(fp)
    write: list[Row] = []
    replaced: list[str] = []
    for row in rows:
        record_id = row[0]
        found = existing.get(record_id)
        if found is not None:
            db_row, db_fps = found
            if db_row[:-1] == row[:-1] and db_fps == tuple(fps_of.get(record_id, ())):
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
        ops.delete_records(d, replaced)
    written = {row[0] for row in write}
    ops.insert_rows(d, write, [pair for pair in fingerprints if pair[0] in written])


def import_call(
    path: str | os.PathLike[str],
    *,
    replace: bool = False,
    strict: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
    started: WorkerParse | None = None,
) -> ops.Call[ImportReport]:
    """The import of one file as one :class:`~idemstore.ops.Call` (one transaction).

    ``workers``: parse processes that read the file while this one writes (see
    :mod:`idemstore._parse`); 0 parses in this process; ``None`` picks
    :func:`~idemstore._parse.default_workers`. ``started``: workers already started for this
    file (:func:`idemstore._parse.prestart`; the command line does that).

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
    identity = jsonfile.file_identity(target)
    total = identity[2]
    n_workers = default_workers(total) if workers is None else workers

    def consume(d: Driver, parse: FileParse | WorkerParse, check: bool) -> ImportReport:
        began = time.perf_counter()
        report = ImportReport(path=target, dry_run=dry_run, form=parse.form)
        kept: dict[int, list[str]] = {}  # per part of the file, so that they list in file order
        for rows, fingerprints, bytes_read, part in parse:
            report.read += len(rows)
            _flush(
                d,
                rows,
                fingerprints,
                report,
                kept.setdefault(part, []),
                replace=replace,
                dry_run=dry_run,
                check=check,
            )
            if progress is not None:
                progress(report.read, bytes_read, total)
        report.kept_ids = [k for part in sorted(kept) for k in kept[part]][:REPORT_LIST_LIMIT]
        summary = parse.summary()
        if progress is not None:
            progress(report.read, total, total)
        report.form = summary.form
        report.records_with_unknown_fields = summary.records_with_unknown_fields
        report.unknown_fields = summary.unknown_fields
        report.id_mismatches = summary.id_mismatches
        report.mismatches = summary.mismatches
        # Every reader checked its own file; this also covers a change after the last of them.
        jsonfile.check_unchanged(target, identity)
        report.seconds = time.perf_counter() - began
        return report

    def run(d: Driver) -> ImportReport:
        # Nothing to compare against when the table is empty: the file's ids are distinct.
        check = ops.has_records(d)
        # PostgreSQL's text columns cannot hold NUL: refused with the file, line and field.
        forbid_nul = d.dialect.name == "postgresql"
        # The savepoint: an error leaves even a caller's transaction as it was; a part a
        # worker could not read is rolled back and the whole file read here instead.
        with gc_paused(), d.bulk_load(), d.savepoint(_SAVEPOINT) as roll_back:
            parse = open_parse(
                target,
                strict=strict,
                batch_records=BATCH_RECORDS,
                workers=n_workers,
                started=started,
                expect=identity,
                forbid_nul=forbid_nul,
            )
            try:
                with parse:
                    return consume(d, parse, check)
            except PartsFailed as failure:
                # Read the whole file here instead: it names the first error, if any.
                logger.info("%s: %s; reading it in one process", target, failure)
                roll_back()
            with FileParse(
                target,
                strict=strict,
                batch_records=BATCH_RECORDS,
                expect=identity,
                forbid_nul=forbid_nul,
            ) as parse:
                return consume(d, parse, check)

    return ops.Call("read" if dry_run else "write", run)


def _sync_store(store: IdempotencyStore | sa.Engine) -> IdempotencyStore:
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
    return _sync_store(store).run(call, connection=connection)


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


def export_call(path: str | os.PathLike[str]) -> ops.Call[int]:
    """Writing every record to a versioned file, as one read transaction. A path that cannot
    be written (a directory, a missing folder) is refused here, before any transaction
    (:class:`InvalidInputError`), as is one that fails while writing."""
    target = os.fspath(path)
    jsonfile.check_writable(target)

    def run(d: Driver) -> int:
        records = ops.iter_records_in_id_order(d)
        try:
            return jsonfile.write_records(target, records)
        finally:
            records.close()  # its cursor, while the connection is open (also on an error)

    return ops.Call("read", run)


def export_file(store: IdempotencyStore | sa.Engine, path: str | os.PathLike[str]) -> int:
    """Write the whole database as a versioned file the Rust module reads (records in
    ``record_id`` order, through a fsynced temp file and a rename); the record count."""
    return _sync_store(store).run(export_call(path))


async def export_file_async(store: AsyncIdempotencyStore, path: str | os.PathLike[str]) -> int:
    """:func:`export_file` for the async store, in one hop."""
    return await store.run(export_call(path))


# --------------------------------------------------------------------------------------------
# CLI

_COUNTS: Final = ("read", "inserted", "unchanged", "kept", "replaced", "id_mismatches")


def _bar(stream: Any) -> Progress:
    def show(records: int, done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        width = 30
        filled = int(width * fraction)
        stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {fraction:6.1%} {records:>10,} records"
        )
        if done >= total:
            stream.write("\n")
        stream.flush()

    return show


def _table(reports: Sequence[ImportReport], totals: dict[str, int]) -> str:
    header = ["file", "form", *_COUNTS, "unknown"]
    lines = [header]
    for r in reports:
        lines.append(
            [
                r.path,
                r.form,
                *(str(getattr(r, c)) for c in _COUNTS),
                str(r.records_with_unknown_fields),
            ]
        )
    if len(reports) > 1:
        lines.append(
            [
                "(total)",
                "",
                *(str(totals[c]) for c in _COUNTS),
                str(totals["records_with_unknown_fields"]),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = [
            cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _details(report: ImportReport) -> list[str]:
    out = []
    for m in report.mismatches:
        out.append(
            f"{report.path}: id mismatch: map key {m.map_key}, record_id field {m.record_id}, "
            f"computed {m.computed_id}"
        )
    if report.id_mismatches > len(report.mismatches):
        out.append(f"{report.path}: ... {report.id_mismatches - len(report.mismatches)} more")
    for record_id in report.kept_ids:
        out.append(
            f"{report.path}: kept {record_id}: the database has other content "
            "(--replace to overwrite)"
        )
    if report.kept > len(report.kept_ids):
        out.append(f"{report.path}: ... {report.kept - len(report.kept_ids)} more kept")
    for name, n in report.unknown_fields.items():
        out.append(f"{report.path}: unknown field {name} ignored in {n} record(s)")
    return out


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def cmd_import(args: argparse.Namespace) -> int:
    reports: list[ImportReport] = []
    failed: list[tuple[str, str]] = []
    show_progress = sys.stderr.isatty() and not args.json
    started: WorkerParse | None = getattr(args, "prestarted", None)  # see idemstore._entry
    with IdempotencyStore.from_url(args.database_url) as store:
        for path in args.files:
            big = os.path.exists(path) and os.path.getsize(path) >= PROGRESS_MIN_BYTES
            call = import_call(
                path,
                replace=args.replace,
                strict=args.strict,
                dry_run=args.dry_run,
                progress=_bar(sys.stderr) if show_progress and big else None,
                workers=args.workers,
                started=started,
            )
            started = None
            try:
                report = store.run(call)
            except IdemstoreError as error:
                if len(args.files) == 1:
                    raise
                failed.append((path, str(error)))
                _err(f"idemstore: error: {error} (nothing imported from it)")
                continue
            reports.append(report)
    totals = {c: sum(getattr(r, c) for r in reports) for c in _COUNTS}
    totals["records_with_unknown_fields"] = sum(r.records_with_unknown_fields for r in reports)
    if args.json:
        payload = {
            "dry_run": args.dry_run,
            "files": [r.as_json() for r in reports],
            "failed": [{"path": p, "error": e} for p, e in failed],
            "totals": totals,
        }
        _out(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        if args.dry_run:
            _out("dry run: nothing was written")
        if reports:
            _out(_table(reports, totals))
        for report in reports:
            for line in _details(report):
                _out(line)
    return 2 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    with IdempotencyStore.from_url(args.database_url, read_only=True) as store:
        count = export_file(store, args.file)
    _out(f"exported {count} record(s) to {args.file}")
    return 0


def add_commands(commands: Any) -> None:
    """Add ``import`` and ``export`` to the ``idemstore`` command's subparsers."""
    parser = commands.add_parser(
        "import",
        help="import JSON key files (legacy or versioned), each in one transaction",
        description=(
            "Import the Rust store's JSON key files. Each file is one transaction: all of it "
            "or, on any error, nothing. Re-running is safe: identical records count as "
            "unchanged; a record the database has with other content is kept (reported) "
            "unless --replace."
        ),
    )
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument(
        "--replace", action="store_true", help="overwrite records the database has differently"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="refuse a file where a record's id differs from its map key",
    )
    parser.add_argument("--dry-run", action="store_true", help="validate and report, write nothing")
    parser.add_argument("--json", action="store_true", help="machine-readable report")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="processes that parse a big file while this one writes (default: one per core, "
        "up to 4, for files of 8 MB or more; 0: parse here)",
    )
    parser.set_defaults(handler=cmd_import)

    export = commands.add_parser(
        "export", help="write every record to a versioned JSON key file (Rust-readable)"
    )
    export.add_argument("file", metavar="FILE")
    export.set_defaults(handler=cmd_export)
