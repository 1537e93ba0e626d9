"""The transfer commands, ``import`` and ``export``, and their printing: the progress line,
the report table, the lines about id mismatches, kept records and unknown fields, the JSON
report (also when an import fails).

The importer (and with it SQLAlchemy) is imported when a command runs, not when this module is
(see :mod:`idemstore.cli.parser`).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, TextIO

from ..errors import IdemstoreError
from .database import database_error, open_store

if TYPE_CHECKING:
    from ..transfer.importer import ImportReport
    from ..transfer.parse import WorkerParse

logger = logging.getLogger("idemstore.import")

#: Files at least this big get a progress line on a terminal.
PROGRESS_MIN_BYTES: Final = 8 << 20
#: The progress line is drawn again at most this often (seconds), and at the end.
PROGRESS_EVERY: Final = 0.1
_COUNTS: Final = ("read", "inserted", "unchanged", "kept", "replaced", "id_mismatches")


def count(n: int) -> str:
    """A count as the command prints it everywhere (the table, the progress line, the log)."""
    return f"{n:,}"


def duration(seconds: float) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour on)."""
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _terminal_columns(stream: TextIO) -> int:
    """The width of the terminal ``stream`` writes to ($COLUMNS if that says otherwise; 80 if
    neither says)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class ProgressLine:
    """The import's progress on a terminal, one line drawn over itself: a bar as wide as the
    terminal leaves room for, the share of the file read, records done, their rate, the time
    elapsed and, until the end, the time left (from the share of the file still to read).

    Called as the importer's ``progress(records, bytes_read, bytes_total)``; :meth:`close`
    ends the line (also when the import fails, so that the error starts a line of its own).
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        columns: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._columns = columns
        self._clock = clock
        self._began = clock()
        self._drawn_at: float | None = None
        self._open = False

    def text(self, records: int, done: int, total: int, elapsed: float) -> str:
        """The line for ``records`` done, ``done`` of ``total`` bytes read, after ``elapsed``
        seconds (without the bar's width decided: see :meth:`__call__`)."""
        fraction = min(1.0, done / total) if total else 1.0
        rate = f"{count(int(records / elapsed))}/s" if elapsed > 0 else "-/s"
        parts = [
            f"{fraction:6.1%}",
            f"{count(records)} records",
            rate,
            f"elapsed {duration(elapsed)}",
        ]
        if fraction < 1.0:
            left = elapsed * (1 - fraction) / fraction if fraction > 0 else None
            parts.append(f"ETA {duration(left)}" if left is not None else "ETA -")
        return "  ".join(parts)

    def __call__(self, records: int, done: int, total: int) -> None:
        now = self._clock()
        finished = done >= total
        if not finished and self._drawn_at is not None and now - self._drawn_at < PROGRESS_EVERY:
            return
        self._drawn_at = now
        text = self.text(records, done, total, now - self._began)
        columns = self._columns or _terminal_columns(self._stream)
        width = max(0, min(40, columns - len(text) - 4))
        fraction = min(1.0, done / total) if total else 1.0
        bar = f"[{'#' * int(width * fraction)}{'.' * (width - int(width * fraction))}] "
        line = (bar if width >= 10 else "") + text
        self._stream.write("\r" + line[: columns - 1].ljust(columns - 1))
        self._open = True
        if finished:
            self.close()
        else:
            self._stream.flush()

    def close(self) -> None:
        """End the line, if one is drawn."""
        if self._open:
            self._stream.write("\n")
            self._stream.flush()
            self._open = False


def _table(reports: Sequence[ImportReport], totals: dict[str, int]) -> str:
    header = ["file", "form", *_COUNTS, "unknown"]
    lines = [header]
    for r in reports:
        lines.append(
            [
                r.path,
                r.form,
                *(count(getattr(r, c)) for c in _COUNTS),
                count(r.records_with_unknown_fields),
            ]
        )
    if len(reports) > 1:
        lines.append(
            [
                "(total)",
                "",
                *(count(totals[c]) for c in _COUNTS),
                count(totals["records_with_unknown_fields"]),
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


def _failure(error: BaseException, url: str | None) -> str | None:
    """The reason an import stopped, as the command's error line says it; None for an error
    that is not one of its failures (a bug: its traceback tells)."""
    if isinstance(error, IdemstoreError):
        return str(error)
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return database_error(error, url)


def _json_report(
    args: argparse.Namespace,
    reports: Sequence[ImportReport],
    failed: Sequence[tuple[str, str]],
    error: str | None,
) -> str:
    totals = {c: sum(getattr(r, c) for r in reports) for c in _COUNTS}
    totals["records_with_unknown_fields"] = sum(r.records_with_unknown_fields for r in reports)
    payload = {
        "dry_run": args.dry_run,
        "files": [r.as_json() for r in reports],
        "failed": [{"path": p, "error": e} for p, e in failed],
        "totals": totals,
        "error": error,
    }
    return json.dumps(payload, indent=2, ensure_ascii=False)


def cmd_import(args: argparse.Namespace, prestarted: WorkerParse | None = None) -> int:
    """``idemstore import``: each file in one transaction, the report as a table or JSON; exit 2
    if a file of several failed (the others are imported). ``prestarted``: the first file's
    parse workers, started before the database layer loaded (:func:`idemstore.cli.prestart`).

    With ``--json`` the report is printed also when the import stops on an error (a file of
    one, a database that cannot be opened, an interrupt): ``error`` holds its one line, and the
    error goes on as it would without ``--json`` (the same line on stderr, the same exit
    status)."""
    reports: list[ImportReport] = []
    failed: list[tuple[str, str]] = []
    level = logger.level
    if getattr(args, "verbose", False):
        logger.setLevel(logging.DEBUG)  # what the import did, file by file (DEBUG lines)
    try:
        _import_files(args, prestarted, reports, failed)
    except BaseException as error:
        reason = _failure(error, args.database_url) if args.json else None
        if reason is not None:
            _out(_json_report(args, reports, failed, reason))
        raise
    finally:
        logger.setLevel(level)
    if args.json:
        _out(_json_report(args, reports, failed, None))
        return 2 if failed else 0
    totals = {c: sum(getattr(r, c) for r in reports) for c in _COUNTS}
    totals["records_with_unknown_fields"] = sum(r.records_with_unknown_fields for r in reports)
    if args.dry_run:
        _out("dry run: nothing was written")
    if reports:
        _out(_table(reports, totals))
    for report in reports:
        for line in _details(report):
            _out(line)
    return 2 if failed else 0


def _import_files(
    args: argparse.Namespace,
    started: WorkerParse | None,
    reports: list[ImportReport],
    failed: list[tuple[str, str]],
) -> None:
    """Import each of ``args.files`` (appending to ``reports`` and ``failed``); the error of a
    single file is raised."""
    from ..transfer.importer import import_call

    show_progress = sys.stderr.isatty() and not args.json
    with open_store(args) as store:
        for path in args.files:
            big = os.path.exists(path) and os.path.getsize(path) >= PROGRESS_MIN_BYTES
            progress = ProgressLine(sys.stderr) if show_progress and big else None
            call = import_call(
                path,
                replace=args.replace,
                strict=args.strict,
                dry_run=args.dry_run,
                progress=progress,
                workers=args.workers,
                started=started,
            )
            started = None
            began = time.perf_counter()
            try:
                report = store.run(call)
            except IdemstoreError as error:
                failed.append((path, str(error)))
                if len(args.files) == 1:
                    raise
                _err(f"idemstore: error: {error} (nothing imported from it)")
                continue
            finally:
                if progress is not None:
                    progress.close()
            seconds = time.perf_counter() - began
            logger.debug(
                "%s: %s in %.2f s in all (%.2f s of it outside the records: starting the "
                "parse, opening the transaction, committing)",
                path,
                "compared" if args.dry_run else "imported",
                seconds,
                max(0.0, seconds - report.seconds),
            )
            reports.append(report)


def cmd_export(args: argparse.Namespace) -> int:
    """``idemstore export FILE``: every record, as the Rust module writes its file. ``-``
    writes that text to standard output (UTF-8, the same bytes as the file) and nothing else
    there; the count goes to stderr."""
    from ..transfer.exporter import export_call, export_file

    if args.file != "-":
        with open_store(args, read_only=True) as store:
            count = export_file(store, args.file)
        _out(f"exported {count} record(s) to {args.file}")
        return 0
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a text-only stream (an application's): write the text to it
        with open_store(args, read_only=True) as store:
            count = store.run(export_call(sys.stdout))
    else:
        sys.stdout.flush()
        out = io.TextIOWrapper(buffer, encoding="utf-8", errors="strict", newline="\n")
        try:
            with open_store(args, read_only=True) as store:
                count = store.run(export_call(out))
        finally:
            out.detach()  # flushed; sys.stdout keeps its buffer
    _err(f"exported {count} record(s) to standard output")
    return 0
