"""The transfer commands, ``import`` and ``export``, and their printing: the progress bar, the
report table, the lines about id mismatches, kept records and unknown fields.

The importer (and with it SQLAlchemy) is imported when a command runs, not when this module is
(see :mod:`idemstore.cli.parser`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from ..errors import IdemstoreError
from .database import open_store

if TYPE_CHECKING:
    from ..transfer.importer import ImportReport, Progress
    from ..transfer.parse import WorkerParse

#: Files at least this big get a progress bar on a terminal.
PROGRESS_MIN_BYTES: Final = 8 << 20
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


def cmd_import(args: argparse.Namespace, prestarted: WorkerParse | None = None) -> int:
    """``idemstore import``: each file in one transaction, the report as a table or JSON; exit 2
    if a file of several failed (the others are imported). ``prestarted``: the first file's
    parse workers, started before the database layer loaded (:func:`idemstore.cli.prestart`)."""
    from ..transfer.importer import import_call

    reports: list[ImportReport] = []
    failed: list[tuple[str, str]] = []
    show_progress = sys.stderr.isatty() and not args.json
    started = prestarted
    with open_store(args) as store:
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
    """``idemstore export FILE``: every record, as the Rust module writes its file."""
    from ..transfer.exporter import export_file

    with open_store(args, read_only=True) as store:
        count = export_file(store, args.file)
    _out(f"exported {count} record(s) to {args.file}")
    return 0
