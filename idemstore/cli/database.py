"""The commands on the database: ``migrate``, ``stats``, ``get``, ``reserve`` and
``purge-expired``, and what they print.

The store (and with it SQLAlchemy) is imported when a command runs, not when this module is:
the command line parses its arguments before the database layer loads (see
:mod:`idemstore.cli.parser`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from ..model import RecordStatus, TenantContext, TenantSource

if TYPE_CHECKING:
    from ..store import IdempotencyStore


def open_store(
    args: argparse.Namespace, *, migrate: bool = False, read_only: bool = False
) -> IdempotencyStore:
    """The store at ``--database-url``; ``read_only`` for commands that only read (nothing
    is created or changed, not even SQLite's journal mode)."""
    from ..store import IdempotencyStore

    return IdempotencyStore.from_url(args.database_url, migrate=migrate, read_only=read_only)


def database_name(args: argparse.Namespace) -> str:
    """The database of ``--database-url`` as it may be printed (no secrets)."""
    from ..db.engine import resolve_url, safe_url

    return safe_url(resolve_url(args.database_url))


def database_error(error: BaseException, url: str | None) -> str | None:
    """For a driver error (SQLAlchemy's wrapper): ``database error on URL: reason``, one line,
    secrets masked; None for any other error."""
    exc = sys.modules.get("sqlalchemy.exc")  # loaded if such an error can have happened
    if exc is None or not isinstance(error, exc.DBAPIError):
        return None
    from ..db.engine import redact, resolve_url, safe_url

    resolved = resolve_url(url)
    reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
    return f"database error on {safe_url(resolved)}: {redact(reason, resolved)}"


def _tenant(args: argparse.Namespace) -> TenantContext:
    return TenantContext(
        args.org, args.workspace, args.deployment, args.actor, TenantSource(args.source)
    )


def cmd_migrate(args: argparse.Namespace) -> int:
    """``idemstore migrate``: upgrade the schema to head."""
    with open_store(args, migrate=True) as store:
        store.check_schema()
    print(f"{database_name(args)}: idemstore schema is at head")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """``idemstore stats``: records by operation and status, as a table or JSON."""
    with open_store(args, read_only=True) as store:
        stats = store.stats()
    by_status = {status.value: n for status, n in stats.by_status().items()}
    if args.json:
        payload = {
            "database": database_name(args),
            "total": stats.total,
            "by_status": by_status,
            "by_operation": stats.by_operation(),
            "by_operation_and_status": [
                {"operation": op, "status": status.value, "count": n}
                for (op, status), n in sorted(stats.counts.items())
            ],
        }
        print(json.dumps(payload, indent=2))
        return 0
    print(f"database: {database_name(args)}")
    print(f"records:  {stats.total}")
    print()
    statuses = [s.value for s in RecordStatus]
    width = max([len("operation"), *(len(op) for op in stats.by_operation())])
    print(f"{'operation':<{width}}  " + "  ".join(f"{s:>10}" for s in statuses) + f"  {'total':>8}")
    for operation, total in sorted(stats.by_operation().items()):
        cells = [stats.counts.get((operation, RecordStatus(s)), 0) for s in statuses]
        print(f"{operation:<{width}}  " + "  ".join(f"{n:>10}" for n in cells) + f"  {total:>8}")
    print(
        f"{'(all)':<{width}}  "
        + "  ".join(f"{by_status[s]:>10}" for s in statuses)
        + f"  {stats.total:>8}"
    )
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    """``idemstore get``: one record as the file has it; exit 1 when there is none."""
    with open_store(args, read_only=True) as store:
        record = store.get(_tenant(args), args.operation, args.key)
    if record is None:
        print("no such record", file=sys.stderr)
        return 1
    from ..transfer.writer import record_text  # as the file has it, whatever its depth

    print(record_text(record))
    return 0


def cmd_reserve(args: argparse.Namespace) -> int:
    """``idemstore reserve``: reserve a key; print the result kind and the record's state."""
    with open_store(args) as store:
        result = store.reserve(
            _tenant(args),
            args.operation,
            args.key,
            args.owner,
            args.fingerprint,
            first_seen_event_id=args.event_id,
            expires_at_ms=args.expires_at_ms,
        )
    print(
        f"{type(result).__name__}: {result.record.record_id} "
        f"(status {result.record.status.value}, conflicts {result.record.conflict_count})"
    )
    return 0


def cmd_purge_expired(args: argparse.Namespace) -> int:
    """``idemstore purge-expired``: delete expired records in batches; print how many."""
    with open_store(args) as store:
        removed = store.purge_expired(now_ms=args.now_ms, batch_size=args.batch_size)
    print(f"purged {removed} expired record(s)")
    return 0
