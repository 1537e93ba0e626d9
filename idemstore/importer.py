"""JSON key file -> database (import) and database -> JSON key file (export).

One file is imported in one transaction: every record goes in, or (on any error, or a killed
process) none does. Running it again is safe: records already in the database with the same
content are counted as unchanged; one that exists with other content is kept as the database has
it and reported, unless ``replace=True``. ``dry_run=True`` reads and compares, writes nothing.

The record id in the database is the file's map key (what the Rust store looked records up
by). A record whose ``record_id`` field, or whose id recomputed from tenant, operation and key,
differs from its map key is reported with both ids; ``strict=True`` refuses the file instead.

Speed: records are decoded by the C JSON scanner and validated straight into row tuples
(:func:`_fast_row`); only a record the fast path does not accept goes through the precise
validator (:func:`idemstore.jsonfile.validate_value`), which either refuses it with serde's exact
message, field and line or builds the row the slow way. Rows go in with multi-row ``INSERT``
statements, after one ``SELECT ... WHERE record_id IN (...)`` per batch finds those already
there.

The sync and async entry points run the same :func:`import_call` (one hop for async).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy as sa

from . import jsonfile, ops
from .dialects import Driver
from .errors import FileFormatError, IdemstoreError
from .ids import record_id_from_parts
from .model import U64_MAX, RecordStatus, TenantSource
from .store import IdempotencyStore

if TYPE_CHECKING:
    from .aio import AsyncIdempotencyStore

__all__ = [
    "IdMismatch",
    "IdMismatchError",
    "ImportReport",
    "add_commands",
    "export_file",
    "export_file_async",
    "import_call",
    "import_file",
    "import_file_async",
]

#: Records read per batch (one existence query, then multi-row inserts).
BATCH_RECORDS: Final = 2000
#: At most this many kept ids and id mismatches are listed in a report (all are counted).
REPORT_LIST_LIMIT: Final = 1000
#: Files at least this big get a progress bar on a terminal.
PROGRESS_MIN_BYTES: Final = 8 << 20

Progress = Callable[[int, int, int], None]
"""``progress(records_read, bytes_read, bytes_total)``, called after each batch."""

Row = tuple[Any, ...]
Converted = tuple[Row, tuple[str, ...]]


class IdMismatchError(IdemstoreError):
    """``--strict``: a record's id differs from its map key (both are in the message)."""


@dataclass(frozen=True, slots=True)
class IdMismatch:
    """A record whose ``record_id`` field or recomputed id differs from its map key."""

    map_key: str
    record_id: str
    computed_id: str


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
# Records -> rows

_U32_MAX: Final = 2**32 - 1
_SHIFT: Final = 2**63
_RECORD_KEYS: Final = frozenset(jsonfile._RECORD_FIELDS)
_TENANT_KEYS: Final = jsonfile._TENANT_FIELD_SET
_OUTCOME_KEYS: Final = jsonfile._OUTCOME_FIELD_SET
_STATUSES: Final = frozenset(s.value for s in RecordStatus)
_SOURCES: Final = frozenset(s.value for s in TenantSource)
_LEGACY_TENANT: Final = ("local", "default", None, "system", TenantSource.EXPLICIT.value)


class _Slow(Exception):
    """The fast path does not take this record: use the precise validator."""


def _fast_row(d: Any) -> Row:
    """A valid record's row tuple (no token yet, record id = its ``record_id`` field), or
    :class:`_Slow` for anything unusual. Must never accept what the precise validator refuses:
    a test checks both agree on every sample."""
    if type(d) is not dict:
        raise _Slow
    g = d.get
    sv = g("schema_version", 1)
    tc = g("tenant_context")
    org: Any
    ws: Any
    source: Any
    dep: Any
    actor: Any
    if tc is None:
        if "tenant_context" in d:
            raise _Slow
        org, ws, dep, actor, source = _LEGACY_TENANT
    elif type(tc) is dict:
        org = tc.get("org_id")
        ws = tc.get("workspace_id")
        dep = tc.get("deployment_id")
        actor = tc.get("actor_id")
        source = tc.get("source", "local_implicit")
        if not (
            type(org) is str
            and type(ws) is str
            and (dep is None or type(dep) is str)
            and (actor is None or type(actor) is str)
            and type(source) is str
            and source in _SOURCES
        ):
            raise _Slow
    else:
        raise _Slow
    rid = g("record_id")
    op = g("operation")
    key = g("key")
    owner = g("owner")
    fp = g("request_fingerprint")
    status = g("status")
    first = g("first_seen_at_ms")
    last = g("last_seen_at_ms")
    event = g("first_seen_event_id")
    expires = g("expires_at_ms")
    count = g("conflict_count", 0)
    if not (
        type(sv) is int
        and 0 <= sv <= _U32_MAX
        and type(rid) is str
        and type(op) is str
        and type(key) is str
        and type(owner) is str
        and type(fp) is str
        and type(status) is str
        and status in _STATUSES
        and type(first) is int
        and 0 <= first <= U64_MAX
        and type(last) is int
        and 0 <= last <= U64_MAX
        and (event is None or type(event) is str)
        and (expires is None or (type(expires) is int and 0 <= expires <= U64_MAX))
        and type(count) is int
        and 0 <= count <= U64_MAX
    ):
        raise _Slow
    oc = g("outcome")
    if oc is None:
        kind = completed = pk = pid = sk = sid = details = None
    elif type(oc) is dict:
        kind = oc.get("outcome_kind")
        completed = oc.get("completed_at_ms")
        pk = oc.get("primary_ref_kind")
        pid = oc.get("primary_ref_id")
        sk = oc.get("secondary_ref_kind")
        sid = oc.get("secondary_ref_id")
        if not (
            type(kind) is str
            and type(completed) is int
            and 0 <= completed <= U64_MAX
            and (pk is None or type(pk) is str)
            and (pid is None or type(pid) is str)
            and (sk is None or type(sk) is str)
            and (sid is None or type(sid) is str)
        ):
            raise _Slow
        completed -= _SHIFT
        details = ops.dump_details(oc.get("details"))
    else:
        raise _Slow
    return (
        rid,
        sv,
        org,
        ws,
        dep,
        actor,
        source,
        op,
        key,
        owner,
        fp,
        status,
        first - _SHIFT,
        last - _SHIFT,
        event,
        None if expires is None else expires - _SHIFT,
        kind,
        completed,
        pk,
        pid,
        sk,
        sid,
        details,
        count - _SHIFT,
    )


def _slow_row(d: Any) -> tuple[Row, tuple[str, ...]]:
    """The precise path: serde's exact refusal (:class:`jsonfile.RecordProblem`), or the row."""
    record, _unknown = jsonfile.validate_value(d)
    params = ops.record_params(record, 0)
    return tuple(params[f"p_{c}"] for c in ops.RECORD_COLUMNS[:-1]), record.conflict_fingerprints


def _fingerprints(d: dict[str, Any]) -> tuple[str, ...]:
    fps = d.get("conflict_fingerprints", ())
    if fps == ():
        return ()
    if type(fps) is not list or not all(type(fp) is str for fp in fps):
        raise _Slow
    return tuple(fps)


class _Converter:
    """Turns each decoded record into ``(row without token, fingerprints)``, counting unknown
    fields and id mismatches into the report."""

    def __init__(self, report: ImportReport, strict: bool) -> None:
        self.report = report
        self.strict = strict
        self.unknown: Counter[str] = Counter()

    def __call__(self, map_key: str, d: Any) -> Converted:
        try:
            row = _fast_row(d)
            fps = _fingerprints(d)
        except _Slow:
            row, fps = _slow_row(d)
        if not (
            len(d) <= 15
            and d.keys() <= _RECORD_KEYS
            and (type(tc := d.get("tenant_context")) is not dict or tc.keys() <= _TENANT_KEYS)
            and (type(oc := d.get("outcome")) is not dict or oc.keys() <= _OUTCOME_KEYS)
        ):
            unknown = jsonfile.unknown_fields(d)
            if unknown:
                self.report.records_with_unknown_fields += 1
                self.unknown.update(unknown)
        if len(fps) > 1 and len(set(fps)) != len(fps):
            seen: set[str] = set()
            for i, fp in enumerate(fps):
                if fp in seen:
                    raise jsonfile.RecordProblem(
                        f"conflict fingerprint {fp!r} appears twice: the database keeps each "
                        "fingerprint of a record once",
                        f"conflict_fingerprints[{i}]",
                    )
                seen.add(fp)
        computed = record_id_from_parts(row[2], row[3], row[4], row[7], row[8])
        if row[0] != map_key or computed != map_key:
            self._mismatch(map_key, row[0], computed)
            row = (map_key, *row[1:])
        return row, fps

    def _mismatch(self, map_key: str, record_id: str, computed: str) -> None:
        if self.strict:
            field_name = "record_id" if record_id != map_key else ""
            raise jsonfile.RecordProblem(
                f"id mismatch (--strict): map key {map_key!r}, record_id field {record_id!r}, "
                f"id computed from tenant, operation and key {computed!r}",
                field_name,
            )
        report = self.report
        report.id_mismatches += 1
        if len(report.mismatches) < REPORT_LIST_LIMIT:
            report.mismatches.append(IdMismatch(map_key, record_id, computed))


# --------------------------------------------------------------------------------------------
# The import


def _flush(
    d: Driver, batch: list[Converted], report: ImportReport, *, replace: bool, dry_run: bool
) -> None:
    if not batch:
        return
    existing = ops.fetch_existing(d, [row[0] for row, _ in batch])
    rows: list[Row] = []
    fingerprints: list[tuple[str, str]] = []
    replaced: list[str] = []
    # Reservation tokens: 63 random bits each (secrets.randbits(63)), drawn in one call.
    tokens = iter(struct.unpack(f"<{len(batch)}Q", secrets.token_bytes(8 * len(batch))))
    for row, fps in batch:
        record_id = row[0]
        found = existing.get(record_id)
        if found is not None:
            db_row, db_fps = found
            if db_row[:-1] == row and db_fps == fps:
                report.unchanged += 1
                continue
            if not replace:
                report.kept += 1
                if len(report.kept_ids) < REPORT_LIST_LIMIT:
                    report.kept_ids.append(record_id)
                continue
            report.replaced += 1
            replaced.append(record_id)
        else:
            report.inserted += 1
        rows.append((*row, next(tokens) >> 1))
        for fp in fps:
            fingerprints.append((record_id, fp))
    if dry_run:
        return
    if replaced:
        ops.delete_records(d, replaced)
    ops.insert_rows(d, rows, fingerprints)


def import_call(
    path: str | os.PathLike[str],
    *,
    replace: bool = False,
    strict: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> ops.Call[ImportReport]:
    """The import of one file as one :class:`~idemstore.ops.Call` (one transaction)."""
    target = os.fspath(path)
    try:
        total = os.path.getsize(target)
    except OSError as error:
        raise FileFormatError(f"cannot read the file: {error.strerror}", path=target) from None

    def run(d: Driver) -> ImportReport:
        started = time.perf_counter()
        report = ImportReport(path=target, dry_run=dry_run)
        convert = _Converter(report, strict)
        try:
            reader = jsonfile.open_records(target)
        except OSError as error:
            raise FileFormatError(f"cannot read the file: {error.strerror}", path=target) from None
        with reader:
            report.form = reader.header.form
            batch: list[Converted] = []
            for item in reader.convert_each(convert):
                batch.append(item)
                if len(batch) >= BATCH_RECORDS:
                    report.read += len(batch)
                    _flush(d, batch, report, replace=replace, dry_run=dry_run)
                    batch = []
                    if progress is not None:
                        progress(report.read, reader.bytes_read, total)
            report.read += len(batch)
            _flush(d, batch, report, replace=replace, dry_run=dry_run)
            if progress is not None:
                progress(report.read, total, total)
            unknown = dict(sorted(convert.unknown.items()))
            for name in reader.header.unknown_fields:
                unknown[f"<file>.{name}"] = 1
            report.unknown_fields = unknown
        report.seconds = time.perf_counter() - started
        return report

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
    connection: sa.Connection | None = None,
) -> ImportReport:
    """Import one JSON key file (legacy or versioned) in one transaction; see the module doc.

    Raises :class:`~idemstore.errors.FileFormatError` (file, record id, field, line) for a file
    the Rust store would refuse, and leaves the database as it was.
    """
    call = import_call(path, replace=replace, strict=strict, dry_run=dry_run, progress=progress)
    return _sync_store(store).run(call, connection=connection)


async def import_file_async(
    store: AsyncIdempotencyStore,
    path: str | os.PathLike[str],
    *,
    replace: bool = False,
    strict: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> ImportReport:
    """:func:`import_file` for the async store: the whole import runs in one hop."""
    call = import_call(path, replace=replace, strict=strict, dry_run=dry_run, progress=progress)
    return await store.run(call)


def export_call(path: str | os.PathLike[str]) -> ops.Call[int]:
    """Writing every record to a versioned file, as one read transaction."""
    target = os.fspath(path)

    def run(d: Driver) -> int:
        return jsonfile.write_records(target, ops.iter_records_in_id_order(d))

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
    with IdempotencyStore.from_url(args.database_url) as store:
        for path in args.files:
            big = os.path.exists(path) and os.path.getsize(path) >= PROGRESS_MIN_BYTES
            try:
                report = import_file(
                    store,
                    path,
                    replace=args.replace,
                    strict=args.strict,
                    dry_run=args.dry_run,
                    progress=_bar(sys.stderr) if show_progress and big else None,
                )
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
    with IdempotencyStore.from_url(args.database_url) as store:
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
    parser.set_defaults(handler=cmd_import)

    export = commands.add_parser(
        "export", help="write every record to a versioned JSON key file (Rust-readable)"
    )
    export.add_argument("file", metavar="FILE")
    export.set_defaults(handler=cmd_export)
